"""Readers and writers: legacy ST, Visium, SpatialData (AnnData in the scanpy spatial layout)."""

from imagene.io._concat import concat
from imagene.io._legacy import infer_microns_per_pixel, read_legacy_st
from imagene.io._spatialdata import from_spatialdata, to_spatialdata
from imagene.io._visium import read_visium

__all__ = ["concat", "from_spatialdata", "infer_microns_per_pixel", "read_legacy_st", "read_visium", "to_spatialdata"]
