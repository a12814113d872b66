"""Agreement of a clustering with reference labels (thin, validated wrappers of scikit-learn)."""

from __future__ import annotations

import numpy as np


def _labels(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(labels_true, dtype=object).ravel()
    p = np.asarray(labels_pred, dtype=object).ravel()
    if t.shape != p.shape:
        raise ValueError(f"labels_true and labels_pred must label the same spots; got {t.size} and {p.size} labels.")
    if t.size == 0:
        raise ValueError("No labels to compare.")
    for name, arr in (("labels_true", t), ("labels_pred", p)):
        missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in arr])
        if missing.any():
            raise ValueError(
                f"{name} has {int(missing.sum())} missing labels; drop those spots from both label arrays first."
            )
    return t.astype(str), p.astype(str)


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index between reference labels and a clustering.

    Parameters
    ----------
    labels_true
        (n,) reference labels (e.g. pathologist regions), any hashable values.
    labels_pred
        (n,) cluster labels of the same spots.

    Returns
    -------
    ARI: 1 for identical partitions, about 0 for chance (it can be negative).

    Examples
    --------
    >>> from imagene.metrics import ari
    >>> ari(["a", "a", "b", "b"], [1, 1, 0, 0])
    1.0
    """
    from sklearn.metrics import adjusted_rand_score

    t, p = _labels(labels_true, labels_pred)
    return float(adjusted_rand_score(t, p))


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information (arithmetic normalisation) between reference labels and a clustering.

    Parameters
    ----------
    labels_true
        (n,) reference labels, any hashable values.
    labels_pred
        (n,) cluster labels of the same spots.

    Returns
    -------
    NMI in [0, 1]: 1 for identical partitions, 0 for independent ones.

    Examples
    --------
    >>> from imagene.metrics import nmi
    >>> nmi(["a", "a", "b", "b"], [0, 1, 0, 1])
    0.0
    """
    from sklearn.metrics import normalized_mutual_info_score

    t, p = _labels(labels_true, labels_pred)
    return float(normalized_mutual_info_score(t, p, average_method="arithmetic"))
