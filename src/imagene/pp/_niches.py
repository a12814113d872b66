"""Niche graphs: each spot and its k nearest spots within its section (squidpy underneath)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import check_adata, get_counts, save_key
from imagene._validate import as_categorical_codes, check_spatial, check_unique_obs_names
from imagene.pp._library import resolve_libraries

logger = logging.getLogger("imagene")


def niche_mean_operator(connectivities: sp.spmatrix) -> sp.csr_matrix:
    """Row-normalised ``(A + I)`` of a niche graph: multiplying by it averages each spot with its neighbours.

    Parameters
    ----------
    connectivities
        ``(n, n)`` niche graph (any non-zero entry is an edge), e.g.
        ``obsp["imagene_niche_connectivities"]`` of :func:`imagene.pp.niches`.

    Returns
    -------
    ``(n, n)`` float32 CSR operator; ``op @ counts`` is the niche mean of ``counts``.

    Examples
    --------
    >>> op = imagene.pp.niche_mean_operator(adata.obsp["imagene_niche_connectivities"])
    >>> niche_counts = op @ adata.layers["counts"]
    """
    a = (sp.csr_matrix(connectivities) > 0).astype(np.float32)
    a = a + sp.eye(a.shape[0], dtype=np.float32, format="csr")
    a.data[:] = 1.0
    deg = np.asarray(a.sum(1)).ravel()
    return sp.diags(1.0 / deg).astype(np.float32) @ a


def niches(
    adata: AnnData,
    *,
    n_neighs: int = 6,
    library_key: str | None = None,
    spatial_key: str = KEYS.SPATIAL,
    layer: str | None = KEYS.COUNTS,
    niche_expression: bool = True,
    key_added: str = KEYS.NICHE,
) -> None:
    """Build the niche graph: the ``n_neighs`` nearest spots of each spot within its section.

    The graph is built by :func:`squidpy.gr.spatial_neighbors_knn` (per section, combined block-
    diagonally), so it follows squidpy's key convention and feeds squidpy's graph tools
    (``connectivity_key=f"{key_added}_connectivities"``).

    Parameters
    ----------
    adata
        Spots with centres in ``obsm[spatial_key]``.
    n_neighs
        Neighbours per spot (the niche is the spot plus these).
    library_key
        ``obs`` column of each spot's section (categorical, string or numbers; the column is not
        changed); ``'section'`` is used when present. Neighbours never cross sections.
    spatial_key
        ``obsm`` key of spot centres.
    layer
        Layer with raw counts averaged over each niche (``None`` for ``X``).
    niche_expression
        Also store the niche-averaged expression in ``layers[f"{key_added}_mean"]``.
    key_added
        Prefix of the keys written.

    Returns
    -------
    Nothing; adds to ``adata``:

    - ``obsp[f"{key_added}_connectivities"]``, ``obsp[f"{key_added}_distances"]`` — CSR k-NN graph.
    - ``uns[f"{key_added}_neighbors"]`` — squidpy's graph parameters.
    - ``layers[f"{key_added}_mean"]`` — sparse mean counts of each spot and its neighbours
      (when ``niche_expression``).

    Examples
    --------
    >>> imagene.pp.niches(adata, n_neighs=6, library_key="section")
    """
    import squidpy as sq

    check_adata(adata)
    check_unique_obs_names(adata)
    xy = check_spatial(adata, spatial_key)
    if n_neighs < 1:
        raise ValueError(f"n_neighs must be >= 1; got {n_neighs}.")
    library_key, groups = resolve_libraries(adata, library_key)
    smallest = min(len(v) for v in groups.values())
    if smallest <= n_neighs:
        raise ValueError(
            f"A section has only {smallest} spots, not more than n_neighs={n_neighs}. "
            "Lower n_neighs or drop that section."
        )
    counts = get_counts(adata, layer) if niche_expression else None
    # squidpy reads the section column as a categorical: give it a categorical copy in a bare AnnData
    # (spots and coordinates only), so a string column works and the user's column is never converted
    obs = pd.DataFrame(index=adata.obs_names.copy())
    if library_key is not None:
        obs[library_key] = as_categorical_codes(adata.obs[library_key].to_numpy())
    bare = AnnData(obs=obs, obsm={spatial_key: xy})
    res = sq.gr.spatial_neighbors_knn(
        bare, spatial_key=spatial_key, library_key=library_key, n_neighs=n_neighs, copy=True
    )
    conn, dist = sp.csr_matrix(res.connectivities), sp.csr_matrix(res.distances)
    if np.asarray(xy).shape[0] != conn.shape[0]:  # pragma: no cover - defensive
        raise RuntimeError("squidpy returned a graph of the wrong size.")
    save_key(adata, "obsp", f"{key_added}_connectivities", conn)
    save_key(adata, "obsp", f"{key_added}_distances", dist)
    save_key(
        adata,
        "uns",
        f"{key_added}_neighbors",
        {
            "connectivities_key": f"{key_added}_connectivities",
            "distances_key": f"{key_added}_distances",
            "params": {"n_neighbors": int(n_neighs), "coord_type": "generic", "library_key": library_key or ""},
        },
    )
    if niche_expression:
        mean = niche_mean_operator(conn) @ sp.csr_matrix(counts, dtype=np.float32)
        save_key(adata, "layers", f"{key_added}_mean", sp.csr_matrix(mean, dtype=np.float32))
