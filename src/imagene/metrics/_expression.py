"""Expression-prediction metrics and gene-set selection (fit on training data only)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _dense(a) -> np.ndarray:
    return np.asarray(a.toarray() if sp.issparse(a) else a, dtype=np.float64)


def _same_shape(t: np.ndarray, p: np.ndarray) -> None:
    if t.shape != p.shape:
        raise ValueError(
            f"y_true and y_pred must have the same shape (spots x genes, same gene order); got {t.shape} and {p.shape}."
        )


def gene_pearson(y_true, y_pred) -> np.ndarray:
    """Pearson r per gene (column) between measured and predicted expression.

    A gene whose measured or predicted values are constant over the spots has no defined
    correlation: it gets NaN (not 0), so callers can report how many genes were undefined
    (``np.isnan(r).sum()``) instead of silently scoring them. Constancy is tested exactly
    (all values equal), so a broadcast mean prediction is always undefined.

    Parameters
    ----------
    y_true
        (n_obs, n_genes) measured expression (dense or sparse), e.g. ``log1p`` CP10k.
    y_pred
        (n_obs, n_genes) predictions in the same space and gene order.

    Returns
    -------
    (n_genes,) float64 array of Pearson r, NaN where undefined.

    Examples
    --------
    >>> import numpy as np
    >>> from imagene.metrics import gene_pearson
    >>> y = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]])
    >>> gene_pearson(y, np.array([[2.0, 0.0], [4.0, 1.0], [6.0, 3.0]]))
    array([ 1., nan])
    """
    t, p = _dense(y_true), _dense(y_pred)
    _same_shape(t, p)
    if t.ndim != 2:
        raise ValueError(f"y_true and y_pred must be 2-D (spots x genes); got {t.ndim}-D arrays.")
    if t.shape[0] == 0:
        return np.full(t.shape[1], np.nan)
    constant = (t.max(0) == t.min(0)) | (p.max(0) == p.min(0))
    t = t - t.mean(0)
    p = p - p.mean(0)
    num = (t * p).sum(0)
    den = np.sqrt((t**2).sum(0) * (p**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[constant | (den == 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def mean_pearson(y_true, y_pred) -> float:
    """Mean per-gene Pearson r over the genes where it is defined.

    Parameters
    ----------
    y_true
        (n_obs, n_genes) measured expression.
    y_pred
        (n_obs, n_genes) predictions in the same space and gene order.

    Returns
    -------
    The mean of :func:`gene_pearson` over defined genes; NaN when no gene is defined (e.g. a
    constant prediction).

    Examples
    --------
    >>> import numpy as np
    >>> from imagene.metrics import mean_pearson
    >>> y = np.array([[1.0, 3.0], [2.0, 1.0], [3.0, 2.0]])
    >>> round(mean_pearson(y, np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])), 3)
    0.75
    """
    r = gene_pearson(y_true, y_pred)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def mse(y_true, y_pred) -> float:
    """Mean squared error over all entries (use it on ``log1p``-normalised expression).

    Parameters
    ----------
    y_true
        (n_obs, n_genes) measured expression.
    y_pred
        (n_obs, n_genes) predictions in the same space and gene order.

    Returns
    -------
    The mean of ``(y_true - y_pred) ** 2``.

    Examples
    --------
    >>> import numpy as np
    >>> from imagene.metrics import mse
    >>> mse(np.array([[0.0, 1.0]]), np.array([[1.0, 3.0]]))
    2.5
    """
    t, p = _dense(y_true), _dense(y_pred)
    _same_shape(t, p)
    return float(np.mean((t - p) ** 2))


def top_variable_genes(x, n: int = 50) -> np.ndarray:
    """Column indices of the ``n`` most variable genes, highest variance first.

    Choose gene sets on the TRAINING sections only (pass their ``log1p`` CP10k expression):
    selecting them on the test section would leak its signal into the evaluation.

    Parameters
    ----------
    x
        (n_obs, n_genes) training expression (dense or sparse).
    n
        Number of genes.

    Returns
    -------
    (min(n, n_genes),) integer column indices.

    Examples
    --------
    >>> import numpy as np
    >>> from imagene.metrics import top_variable_genes
    >>> top_variable_genes(np.array([[0.0, 0.0, 5.0], [1.0, 4.0, 5.0]]), n=2)
    array([1, 0])
    """
    v = _dense(x).var(0)
    return np.argsort(-v, kind="stable")[:n]


def top_expressed_genes(x, n: int = 50) -> np.ndarray:
    """Column indices of the ``n`` most expressed genes (highest mean), highest first.

    Choose gene sets on the TRAINING sections only (see :func:`top_variable_genes`).

    Parameters
    ----------
    x
        (n_obs, n_genes) training expression (dense or sparse).
    n
        Number of genes.

    Returns
    -------
    (min(n, n_genes),) integer column indices.

    Examples
    --------
    >>> import numpy as np
    >>> from imagene.metrics import top_expressed_genes
    >>> top_expressed_genes(np.array([[0.0, 0.0, 5.0], [1.0, 4.0, 5.0]]), n=2)
    array([2, 1])
    """
    m = np.asarray(x.mean(0)).ravel() if sp.issparse(x) else _dense(x).mean(0)
    return np.argsort(-m, kind="stable")[:n]
