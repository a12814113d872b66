"""Context inputs shared by every model and baseline: multi-scale tile features and neighbour means.

Around each spot, the tissue beyond its own tile and the spots next to it carry much of what its
expression depends on (Hist2ST, TRIPLEX). Three functions build that context from frozen features:

- :func:`context_features` — features of tiles of several sizes centred on each spot, from one call;
- :func:`neighbor_features` — the mean of any ``obsm`` feature over each spot's neighbours in the
  niche graph of :func:`imagene.pp.niches` (optionally distance-weighted);
- :func:`context_matrix` — spot, scale and neighbour blocks concatenated under one ``obsm`` key.

Every feature is a function of one section's image and spot positions only, so the context of a
held-out section never uses another section (no test leakage when a model is fitted elsewhere).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import check_adata, check_obsm, progress, save_key
from imagene._version import __version__
from imagene.pp._features import _tta_views, encode_tiles, resolve_device
from imagene.pp._library import resolve_libraries
from imagene.pp._niches import niche_mean_operator
from imagene.pp._tiles import extract_tiles

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("imagene")

#: suffix of the neighbour-mean keys written by :func:`neighbor_features`
NBR_SUFFIX = "_nbr"
#: suffix of the concatenated key written by :func:`context_matrix`
CONTEXT_SUFFIX = "_context"


def scale_key(prefix: str, tile_size_um: float) -> str:
    """``obsm`` key of the features of tiles of ``tile_size_um`` µm: ``'<prefix>_<size>um'``.

    Parameters
    ----------
    prefix
        Key prefix, e.g. ``'X_he_efficientnet_lite0'``.
    tile_size_um
        Tile side in microns.

    Returns
    -------
    The key, e.g. ``'X_he_efficientnet_lite0_224um'``.

    Examples
    --------
    >>> scale_key("X_he_efficientnet_lite0", 224.0)
    'X_he_efficientnet_lite0_224um'
    """
    return f"{prefix}_{float(tile_size_um):g}um"


def context_features(
    adata: AnnData,
    *,
    tile_sizes_um: Sequence[float] = (112.0, 224.0, 448.0),
    tile_px: int = 224,
    encoder: str | torch.nn.Module = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    tta: str | None = "flips",
    library_key: str | None = None,
    spatial_key: str = KEYS.SPATIAL,
    image: Any = None,
    microns_per_pixel: float | None = None,
    chunk_size: int = 1024,
    batch_size: int = 64,
    device: str = "auto",
    input_px: int | None = None,
    key_prefix: str | None = None,
    show_progress_bar: bool = True,
) -> list[str]:
    """Embed tiles of several sizes centred on each spot with one frozen encoder (multi-scale features).

    For every size in ``tile_sizes_um`` the tiles are cut with :func:`imagene.pp.extract_tiles`
    (from the same image sources, lazily for TIFF / zarr), resampled to ``tile_px``, embedded and
    dropped: at most ``chunk_size`` tiles of one size are held at a time, and nothing but the
    features is written to ``adata``. A tile of 224 µm covers 4 times the area of a 112 µm tile
    around the same centre, at half the resolution when ``tile_px`` is the same.

    Parameters
    ----------
    adata
        Spots with centres in ``obsm[spatial_key]`` (full-resolution pixels) and their sections'
        images, as for :func:`imagene.pp.extract_tiles`.
    tile_sizes_um
        Tile sides in microns, one ``obsm`` key each.
    tile_px
        Side of the tiles given to the encoder (before its own resize to ``input_px``).
    encoder
        Image encoder (see :func:`imagene.pp.embed_tiles`).
    weights
        Local checkpoint of a timm encoder.
    tta
        Test-time augmentation of every tile: ``None``, ``'flips'`` (4 views) or ``'dihedral'``
        (8 views); see :func:`imagene.pp.embed_tiles`.
    library_key
        ``obs`` column of each spot's section (``'section'`` when present).
    spatial_key
        ``obsm`` key of the spot centres.
    image
        Full-resolution image(s) to cut from instead of those registered in ``uns``
        (see :func:`imagene.pp.extract_tiles`).
    microns_per_pixel
        Override of each section's ``microns_per_pixel`` scale factor.
    chunk_size
        Tiles of one size held in memory at a time.
    batch_size
        Tiles per forward pass.
    device
        ``'auto'`` (CUDA when available), ``'cpu'``, ``'cuda'``, ...
    input_px
        Resize tiles to this size before the encoder; ``None`` uses the encoder's native size.
    key_prefix
        Prefix of the keys written; defaults to ``'X_he_<encoder>'``.
    show_progress_bar
        Show a progress bar.

    Returns
    -------
    The ``obsm`` keys written, one per size, and adds to ``adata``:

    - ``obsm['<key_prefix>_<size>um']`` — (n_obs, n_features) float32 features of the tiles of
      ``size`` µm (e.g. ``X_he_efficientnet_lite0_224um``);
    - ``uns['<key_prefix>_<size>um']`` — provenance: ``context`` (``'scale'``), ``encoder``,
      ``weights``, ``tile_size_um``, ``tile_px``, ``input_px``, ``tta``, ``n_features``,
      ``imagene_version``.

    Examples
    --------
    >>> imagene.pp.context_features(adata, tile_sizes_um=(112, 224, 448), tta="flips")
    ['X_he_efficientnet_lite0_112um', 'X_he_efficientnet_lite0_224um', 'X_he_efficientnet_lite0_448um']
    """
    from imagene.nn import get_image_encoder

    check_adata(adata)
    xy = np.asarray(check_obsm(adata, spatial_key, "Spot centres in full-resolution pixels are required."))
    sizes = [float(s) for s in tile_sizes_um]
    if not sizes or any(not np.isfinite(s) or s <= 0 for s in sizes):
        raise ValueError(f"tile_sizes_um must be a non-empty list of positive sizes in microns; got {tile_sizes_um!r}.")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"tile_sizes_um has repeated sizes {tile_sizes_um!r}; each size is one obsm key.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
    _tta_views(tta)
    lib_key, groups = resolve_libraries(adata, library_key)
    dev = resolve_device(device)
    enc = get_image_encoder(encoder, weights=weights).to(dev).eval()
    px = input_px or enc.input_px
    prefix = key_prefix or f"{KEYS.FEATURES_PREFIX}{enc.name}"
    spatial_uns = adata.uns.get("spatial", {})
    chunks = [(lib, idx[i : i + chunk_size]) for lib, idx in groups.items() for i in range(0, len(idx), chunk_size)]
    logger.info(
        "Embedding %s spots at %s µm with %r (tta=%s) on %s", f"{adata.n_obs:,}", sizes, enc.name, tta or "none", dev
    )
    feats = {s: np.empty((adata.n_obs, enc.n_features), dtype=np.float32) for s in sizes}
    steps = [(s, lib, rows) for s in sizes for lib, rows in chunks]
    for size, lib, rows in progress(steps, total=len(steps), desc="context tiles", show=show_progress_bar):
        # a bare AnnData of these spots: the tiles are cut into it, embedded, and dropped with it
        if lib_key is not None:
            obs = adata.obs.iloc[rows][[lib_key]].copy()
        else:
            obs = pd.DataFrame(index=adata.obs_names[rows])
        uns = {"spatial": {lib: spatial_uns[lib]}} if lib in spatial_uns else {}
        shell = AnnData(obs=obs, obsm={spatial_key: xy[rows]}, uns=uns)
        extract_tiles(
            shell, tile_size_um=size, tile_px=tile_px, library_key=lib_key, spatial_key=spatial_key, image=image,
            microns_per_pixel=microns_per_pixel, batch_size=batch_size, show_progress_bar=False,
        )
        feats[size][rows] = encode_tiles(
            shell.obsm[KEYS.TILES], enc, batch_size=batch_size, device=dev, input_px=px, tta=tta
        )
        del shell
    keys = []
    for size in sizes:
        key = scale_key(prefix, size)
        save_key(adata, "obsm", key, feats[size])
        save_key(
            adata,
            "uns",
            key,
            {
                "context": "scale",
                "encoder": enc.name,
                "weights": str(weights) if weights is not None else "default",
                "tile_size_um": size,
                "tile_px": int(tile_px),
                "input_px": int(px),
                "tta": tta or "none",
                "n_features": int(enc.n_features),
                "imagene_version": __version__,
            },
        )
        keys.append(key)
    return keys


def _neighbor_operator(
    connectivities: sp.spmatrix, distances: sp.spmatrix | None, *, include_self: bool, weighted: bool
) -> sp.csr_matrix:
    """Row-stochastic (n, n) operator averaging each spot's neighbours (and itself with ``include_self``)."""
    a = sp.csr_matrix(connectivities)
    if not weighted and include_self:
        return niche_mean_operator(a)
    mask = (a > 0).astype(np.float32).tocsr()
    mask.setdiag(0)
    mask.eliminate_zeros()
    if weighted:
        d = sp.csr_matrix(distances).multiply(mask).tocsr()
        if d.nnz != mask.nnz:
            raise ValueError(
                "The niche graph's distances do not cover its edges (a zero or missing distance between neighbours). "
                "Rebuild it with `imagene.pp.niches(adata)` or pass `weighted=False`."
            )
        sigma = float(np.median(d.data)) if d.nnz else 1.0
        w = d.copy()
        w.data = np.exp(-0.5 * (d.data / sigma) ** 2).astype(np.float32)
    else:
        w = mask
    if include_self:
        w = w + sp.eye(w.shape[0], dtype=np.float32, format="csr")
    w = sp.csr_matrix(w, dtype=np.float32)
    isolated = np.asarray(w.sum(1)).ravel() == 0
    if isolated.any():  # a spot without neighbours keeps its own features
        w = w + sp.diags(isolated.astype(np.float32), format="csr")
    deg = np.asarray(w.sum(1)).ravel()
    return (sp.diags(1.0 / deg).astype(np.float32) @ w).tocsr()


def neighbor_features(
    adata: AnnData,
    key: str,
    *,
    graph_key: str = KEYS.NICHE,
    weighted: bool = False,
    include_self: bool = False,
    key_added: str | None = None,
) -> str:
    """Average an ``obsm`` feature over each spot's neighbours in the niche graph.

    Parameters
    ----------
    adata
        Spots with ``obsm[key]`` and the graph of :func:`imagene.pp.niches` in
        ``obsp['<graph_key>_connectivities']`` (and ``_distances`` when ``weighted``).
    key
        ``obsm`` key of the (n_obs, d) feature to average.
    graph_key
        Prefix of the graph's ``obsp`` keys (``key_added`` of :func:`imagene.pp.niches`).
    weighted
        Weight neighbour ``j`` of spot ``i`` by ``exp(-d_ij² / (2 σ²))``, ``σ`` the median edge length
        of the graph (the spot itself, with ``include_self``, gets weight 1); ``False`` gives every
        neighbour the same weight.
    include_self
        Average the spot with its neighbours (the niche mean of :func:`imagene.pp.niches`)
        instead of its neighbours alone. A spot without neighbours keeps its own feature.
    key_added
        ``obsm`` key written; defaults to ``'<key>_nbr'``.

    Returns
    -------
    The key written, and adds to ``adata``:

    - ``obsm[key_added]`` — (n_obs, d) float32 neighbour means;
    - ``uns[key_added]`` — provenance: ``context`` (``'neighbors'``), ``sources`` (``[key]``),
      ``graph_key``, ``weighted``, ``include_self``, ``n_features``.

    Examples
    --------
    >>> imagene.pp.niches(adata, n_neighs=6)
    >>> imagene.pp.neighbor_features(adata, "X_he_efficientnet_lite0")
    'X_he_efficientnet_lite0_nbr'
    """
    check_adata(adata)
    x = check_obsm(adata, key, "Pass the obsm key of a (n_obs, d) feature, e.g. from `imagene.pp.embed_tiles`.")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"adata.obsm[{key!r}] must be (n_obs, d) features to average; got shape {x.shape}.")
    conn_key, dist_key = f"{graph_key}_connectivities", f"{graph_key}_distances"
    if conn_key not in adata.obsp:
        raise KeyError(
            f"adata.obsp[{conn_key!r}] not found: no niche graph. Run `imagene.pp.niches(adata)` first "
            f"(or pass the `key_added` it was given as `graph_key=`)."
        )
    if weighted and dist_key not in adata.obsp:
        raise KeyError(f"adata.obsp[{dist_key!r}] not found; `weighted=True` needs the graph's distances.")
    op = _neighbor_operator(
        adata.obsp[conn_key], adata.obsp[dist_key] if weighted else None, include_self=include_self, weighted=weighted
    )
    out = np.asarray(op @ x.astype(np.float32), dtype=np.float32)
    key_added = key_added or f"{key}{NBR_SUFFIX}"
    save_key(adata, "obsm", key_added, out)
    save_key(
        adata,
        "uns",
        key_added,
        {
            "context": "neighbors",
            "sources": [key],
            "graph_key": graph_key,
            "weighted": bool(weighted),
            "include_self": bool(include_self),
            "n_features": int(out.shape[1]),
        },
    )
    return key_added


def context_matrix(
    adata: AnnData,
    keys: Sequence[str],
    *,
    neighbor_keys: Sequence[str] | None = None,
    graph_key: str = KEYS.NICHE,
    weighted: bool = False,
    key_added: str | None = None,
) -> str:
    """Concatenate spot, scale and neighbour features into one context matrix in ``obsm``.

    Parameters
    ----------
    adata
        Spots with the features in ``obsm`` (and the niche graph for ``neighbor_keys``).
    keys
        ``obsm`` keys concatenated as they are, e.g. the spot features and the larger tiles of
        :func:`context_features`.
    neighbor_keys
        Keys whose neighbour mean (:func:`neighbor_features`, written as ``'<key>_nbr'``) is appended;
        ``None`` uses ``keys[0]`` (the spot), ``()`` none.
    graph_key
        Prefix of the niche graph's ``obsp`` keys.
    weighted
        Distance-weighted neighbour means (see :func:`neighbor_features`).
    key_added
        ``obsm`` key written; defaults to ``'<keys[0]>_context'`` with a trailing ``'_<size>um'``
        removed (e.g. ``'X_he_efficientnet_lite0_context'``).

    Returns
    -------
    The key written, and adds to ``adata``:

    - ``obsm['<key>_nbr']`` for every neighbour key (see :func:`neighbor_features`);
    - ``obsm[key_added]`` — (n_obs, sum of widths) float32 concatenation, blocks in the order
      ``keys``, then the neighbour means;
    - ``uns[key_added]`` — provenance: ``context`` (``'matrix'``), ``sources`` (the blocks' keys in
      order), ``widths``, ``n_features``.

    Examples
    --------
    >>> keys = imagene.pp.context_features(adata, tile_sizes_um=(112, 224, 448))
    >>> imagene.pp.niches(adata, n_neighs=6)
    >>> imagene.pp.context_matrix(adata, keys)
    'X_he_efficientnet_lite0_context'
    """
    import re

    check_adata(adata)
    keys = list(keys)
    if not keys:
        raise ValueError("keys must name at least one obsm feature to concatenate.")
    nbr = keys[:1] if neighbor_keys is None else list(neighbor_keys)
    for k in keys + nbr:
        check_obsm(adata, k, "Compute it first (imagene.pp.embed_tiles / imagene.pp.context_features).")
    blocks = list(keys)
    for k in nbr:
        blocks.append(neighbor_features(adata, k, graph_key=graph_key, weighted=weighted))
    arrays = [np.asarray(adata.obsm[k], dtype=np.float32) for k in blocks]
    bad = [(k, a.shape) for k, a in zip(blocks, arrays, strict=True) if a.ndim != 2]
    if bad:
        raise ValueError(f"Every block must be (n_obs, d) features; got {bad}.")
    out = np.concatenate(arrays, axis=1)
    key_added = key_added or re.sub(r"_\d+(\.\d+)?um$", "", keys[0]) + CONTEXT_SUFFIX
    save_key(adata, "obsm", key_added, out)
    save_key(
        adata,
        "uns",
        key_added,
        {
            "context": "matrix",
            "sources": blocks,
            "widths": [int(a.shape[1]) for a in arrays],
            "n_features": int(out.shape[1]),
        },
    )
    return key_added
