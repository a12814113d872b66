"""Cross-modal retrieval: Recall@k% of the true partner (BLEEP / HEST style)."""

from __future__ import annotations

import math

import numpy as np


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def recall_at_k(query, reference, *, k_percent: float, batch_size: int = 1024) -> float:
    """Fraction of queries whose true partner ranks in the top ``k_percent`` % of the candidates.

    Row ``i`` of ``query`` is paired with row ``i`` of ``reference`` (e.g. the image and the gene
    embedding of the same spot); every row of ``reference`` is a candidate for every query, ranked
    by cosine similarity. With ``n`` candidates the cut-off is ``k = max(1, ceil(k_percent * n / 100))``,
    the same as the ``recall5_validation`` monitor of training. Ties with the partner are broken at
    random, in expectation: a query with ``g`` candidates strictly more similar than its partner and
    ``t`` others exactly as similar scores ``clip((k - g) / (t + 1), 0, 1)``, so constant
    embeddings score chance (about ``k / n``), never 1. For the other direction swap the arguments.

    Parameters
    ----------
    query
        (n, d) query embeddings.
    reference
        (n, d) candidate embeddings; row ``i`` is the partner of query ``i``.
    k_percent
        Cut-off as a percentage of the candidates, in (0, 100].
    batch_size
        Queries compared at once (bounds memory for large sections).

    Returns
    -------
    Recall in [0, 1] (chance is about ``k_percent / 100``).

    Examples
    --------
    >>> import numpy as np
    >>> from imagene.metrics import recall_at_k
    >>> z = np.eye(10)
    >>> recall_at_k(z, z, k_percent=10)
    1.0
    >>> recall_at_k(z, np.roll(z, 1, axis=0), k_percent=10)
    0.0
    """
    q = np.asarray(query, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if q.ndim != 2 or r.ndim != 2:
        raise ValueError(f"query and reference must be 2-D (n, d) arrays; got shapes {q.shape} and {r.shape}.")
    if q.shape != r.shape:
        raise ValueError(
            f"query and reference must have the same shape (row i of each is one pair); got {q.shape} and {r.shape}."
        )
    if not (np.isfinite(q).all() and np.isfinite(r).all()):
        raise ValueError("query and reference contain NaN or inf; embed every spot before scoring retrieval.")
    if isinstance(k_percent, bool) or not (0 < float(k_percent) <= 100):
        raise ValueError(f"k_percent must be a percentage in (0, 100]; got {k_percent!r}.")
    n = q.shape[0]
    if n == 0:
        raise ValueError("query and reference are empty; there is nothing to retrieve.")
    k = max(1, math.ceil(float(k_percent) * n / 100.0 - 1e-9))
    q, r = _unit_rows(q), _unit_rows(r)
    hits = np.empty(n)
    for start in range(0, n, batch_size):
        sim = q[start : start + batch_size] @ r.T
        rows = np.arange(sim.shape[0])
        own = sim[rows, start + rows][:, None]
        greater = (sim > own).sum(1)
        ties = (sim == own).sum(1) - 1  # the partner itself is not a tie
        hits[start : start + sim.shape[0]] = np.clip((k - greater) / (ties + 1.0), 0.0, 1.0)
    return float(hits.mean())
