"""The expression space predictions live in: log1p of counts per 10k."""

from __future__ import annotations

from typing import Any

import numpy as np
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import get_counts
from imagene._utils import log_normalize as _log_normalize


def log_normalize(data: AnnData | Any, *, layer: str | None = KEYS.COUNTS, target_sum: float = 1e4) -> np.ndarray:
    """Library-size normalise raw counts to ``target_sum`` and take ``log1p``, as a dense float32 array.

    This is the space of ``layers['imagene_predicted']`` and of every expression metric in imagene
    (the same as :func:`scanpy.pp.normalize_total` with ``target_sum=1e4`` followed by
    :func:`scanpy.pp.log1p`), returned as a new array: ``data`` is left unchanged.

    Parameters
    ----------
    data
        An AnnData (counts read from ``layers[layer]``, or ``X`` when ``layer`` is ``None``) or a
        (spots, genes) array / sparse matrix of raw counts.
    layer
        Layer of raw counts of an AnnData.
    target_sum
        Counts per spot after normalisation.

    Examples
    --------
    >>> y = imagene.pp.log_normalize(adata)  # (n_obs, n_vars) float32
    """
    counts = get_counts(data, layer) if isinstance(data, AnnData) else data
    return _log_normalize(counts, target_sum=target_sum)
