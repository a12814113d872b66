"""The patch graph of one section: spatial neighbours ∪ feature-similarity neighbours (ALIGN-ST's graph)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def patch_graph(coords: np.ndarray, features: np.ndarray, *, n_spatial: int = 6, n_feature: int = 6) -> np.ndarray:
    """Edges of one section's patch graph: spatial kNN ∪ feature-similarity kNN, symmetrised.

    The graph :class:`imagene.model.AlignST` refines its spots over (GraphSAGE). It is returned,
    not stored: nothing is written into an AnnData.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres of one section.
    features
        ``(n, d)`` tile features of the same spots (neighbours by cosine similarity).
    n_spatial, n_feature
        Neighbours per spot in each graph (capped at ``n - 1``; ``n_feature=0``: spatial graph only).

    Returns
    -------
    ``(2, E)`` int64 edge index of the union, both directions, no self loops
    (``torch_geometric.utils.from_scipy_sparse_matrix`` of the symmetrised adjacency).

    Examples
    --------
    >>> idx = adata.obs["section"] == "B4"
    >>> edges = imagene.pp.patch_graph(adata.obsm["spatial"][idx], adata.obsm["X_he_efficientnet_lite0"][idx])
    """
    from sklearn.neighbors import kneighbors_graph
    from torch_geometric.utils import from_scipy_sparse_matrix

    coords, features = np.asarray(coords), np.asarray(features)
    if coords.ndim != 2 or features.ndim != 2 or coords.shape[0] != features.shape[0]:
        raise ValueError(
            f"coords (n, 2) and features (n, d) must have one row per spot; got {coords.shape} and {features.shape}."
        )
    n = coords.shape[0]
    adj = sp.csr_matrix((n, n), dtype=np.float32)
    if n > 1:
        adj = adj + kneighbors_graph(coords, min(n_spatial, n - 1), include_self=False)
        if n_feature > 0:
            adj = adj + kneighbors_graph(features, min(n_feature, n - 1), metric="cosine", include_self=False)
    adj = ((adj + adj.T) > 0).astype(np.float32)
    edge_index, _ = from_scipy_sparse_matrix(sp.coo_matrix(adj))
    return edge_index.numpy()
