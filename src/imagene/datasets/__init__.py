"""Datasets: published sections read from a local copy or downloaded from their source, and synthetic data.

imagene ships no third-party data. :func:`her2st` and :func:`mouse_olfactory_bulb` read a local copy
(``path=``, or ``$IMAGENE_DATA_DIR/<dataset>``) or download the files from the authors' repositories
into a cache (checked by SHA-256). :func:`synthetic_he_st` makes H&E-like sections with tissue
domains, the embedded default of ``imagene demo``.
"""

from __future__ import annotations

from imagene.datasets._genes import gene_descriptions
from imagene.datasets._her2st import her2st, her2st_files, mouse_olfactory_bulb
from imagene.datasets._synthetic import synthetic_he_st

__all__ = ["gene_descriptions", "her2st", "her2st_files", "mouse_olfactory_bulb", "synthetic_he_st"]
