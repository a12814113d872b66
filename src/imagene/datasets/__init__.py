"""Datasets: the her2st demo sample shipped with imagene and a synthetic H&E + ST generator."""

from __future__ import annotations

from imagene.datasets._genes import gene_descriptions
from imagene.datasets._her2st import demo_paths, her2st_demo
from imagene.datasets._synthetic import synthetic_he_st

__all__ = ["demo_paths", "gene_descriptions", "her2st_demo", "synthetic_he_st"]
