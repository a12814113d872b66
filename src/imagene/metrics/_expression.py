"""Expression-prediction metrics and gene-set selection (fit on training data only)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _dense(a) -> np.ndarray:
    return np.asarray(a.toarray() if sp.issparse(a) else a, dtype=np.float64)


def gene_pearson(y_true, y_pred) -> np.ndarray:
    """Pearson r per gene (column) between measured and predicted expression.

    Parameters
    ----------
    y_true, y_pred
        (n_obs, n_genes) arrays (dense or sparse) of the same shape.

    Returns
    -------
    (n_genes,) array; NaN where either column is constant (r is undefined there), so callers
    can report how many genes were undefined instead of silently scoring them 0.
    """
    t, p = _dense(y_true), _dense(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same shape; got {t.shape} and {p.shape}.")
    t = t - t.mean(0)
    p = p - p.mean(0)
    num = (t * p).sum(0)
    den = np.sqrt((t**2).sum(0) * (p**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den == 0] = np.nan
    return r


def mean_pearson(y_true, y_pred) -> float:
    """Mean per-gene Pearson r over genes where it is defined (NaN if none)."""
    r = gene_pearson(y_true, y_pred)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def mse(y_true, y_pred) -> float:
    """Mean squared error over all entries (use on log1p-normalised expression)."""
    t, p = _dense(y_true), _dense(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same shape; got {t.shape} and {p.shape}.")
    return float(np.mean((t - p) ** 2))


def top_variable_genes(x, n: int = 50) -> np.ndarray:
    """Column indices of the ``n`` most variable genes of ``x`` (pass TRAINING data only), highest first."""
    v = _dense(x).var(0)
    return np.argsort(-v, kind="stable")[:n]


def top_expressed_genes(x, n: int = 50) -> np.ndarray:
    """Column indices of the ``n`` most expressed genes (mean) of ``x`` (TRAINING data only), highest first."""
    m = np.asarray(x.mean(0)).ravel() if sp.issparse(x) else _dense(x).mean(0)
    return np.argsort(-m, kind="stable")[:n]
