"""Readers and writers: legacy ST, Visium, SpatialData (AnnData in the scanpy spatial layout)."""

from imagene.io._concat import concat
from imagene.io._legacy import infer_microns_per_pixel, read_legacy_st
from imagene.io._slide import Slide, read_slide
from imagene.io._spatialdata import from_spatialdata, predictions_to_spatialdata, to_spatialdata
from imagene.io._visium import read_visium

__all__ = [
    "Slide",
    "concat",
    "from_spatialdata",
    "infer_microns_per_pixel",
    "predictions_to_spatialdata",
    "read_legacy_st",
    "read_slide",
    "read_visium",
    "to_spatialdata",
]
