"""Tessellate sections into square tiles, with the spatial graph of the spots / cells inside each tile.

Used by :class:`imagene.model.SIGMMA` (Jeong et al.): each tile pairs an H&E square with the
graph of the nodes (cells or spots) whose centres fall inside it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import check_adata, check_obsm, progress, save_key
from imagene.pp._library import resolve_libraries

logger = logging.getLogger("imagene")

#: names of the scales, finest first, for ``grid=4`` (block grids 4x4, 2x2, 1x1)
SCALES = ("micro", "meso", "macro")


def _check_grid(grid: int) -> list[int]:
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 2 or (grid & (grid - 1)):
        raise ValueError(f"grid must be a power of two >= 2 (the paper uses 4); got {grid!r}.")
    out, b = [], int(grid)
    while b >= 1:
        out.append(b)
        b //= 2
    return out


def _microns_per_pixel(adata: AnnData, lib: str, override: float | None) -> float:
    mpp = override
    if mpp is None:
        mpp = adata.uns.get("spatial", {}).get(lib, {}).get("scalefactors", {}).get("microns_per_pixel")
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(
            f"Microns per pixel unknown for section {lib!r}. Set "
            f"adata.uns['spatial'][{lib!r}]['scalefactors']['microns_per_pixel'] or pass `microns_per_pixel=`."
        )
    return float(mpp)


def _pitch_um(xy_um: np.ndarray) -> float:
    """Median distance of each node to its nearest neighbour, in microns."""
    from sklearn.neighbors import NearestNeighbors

    if len(xy_um) < 2:
        return float("nan")
    d, _ = NearestNeighbors(n_neighbors=2).fit(xy_um).kneighbors(xy_um)
    return float(np.median(d[:, 1]))


def tile_graphs(
    adata: AnnData,
    *,
    tile_size_um: float | None = None,
    grid: int = 4,
    library_key: str | None = None,
    spatial_key: str = KEYS.SPATIAL,
    n_neighs: int = 8,
    microns_per_pixel: float | None = None,
    key_added: str = KEYS.TILE_GRAPHS,
    copy: bool = False,
) -> AnnData | None:
    """Tessellate each section into square tiles and build the spatial graph of the nodes inside each tile.

    Nodes are the observations (cells of a Xenium-like table, or spots). Each section is cut
    into a regular grid of ``tile_size_um`` squares anchored at its top-left node; a node
    belongs to the tile its centre falls in. Inside a tile, nodes are placed in the blocks of a
    ``b x b`` grid for ``b = grid, grid/2, ..., 1`` (4x4 micro, 2x2 meso, 1x1 macro for
    ``grid=4``). The spatial proximity graph is the ``n_neighs`` nearest neighbours of each node
    (scikit-learn KD-tree, symmetrised) restricted to pairs in the same tile; the micro graph
    keeps only the pairs inside one micro block, the graph SIGMMA starts from.

    Parameters
    ----------
    adata
        Cells or spots with centres in ``obsm[spatial_key]`` (full-resolution pixels).
    tile_size_um
        Side of a tile in microns. ``None``: ``grid`` times the median nearest-neighbour distance
        of the nodes (one node per micro block on average: 800 µm on legacy ST, whose spots sit
        on a 200 µm pitch). The paper tiles Xenium cells into 128 µm squares (256 px at 0.5 µm/px).
    grid
        Finest block grid (a power of two; the paper uses 4).
    library_key
        ``obs`` column naming each node's section (``'section'`` is used when present).
    spatial_key
        ``obsm`` key of the node centres.
    n_neighs
        Nearest neighbours of each node in the proximity graph.
    microns_per_pixel
        Override of ``uns['spatial'][lib]['scalefactors']['microns_per_pixel']``.
    key_added
        Prefix of the keys written (see Returns).
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` (or the copy); adds:

    - ``obs[f"{key_added}_tile"]`` — integer row of each node's tile in the tile table.
    - ``obsm[f"{key_added}_blocks"]`` — (n_obs, n_scales) int block index (row-major, ``0 .. b*b-1``)
      of each node at ``b = grid, grid/2, ..., 1``.
    - ``obsp[f"{key_added}_connectivities"]`` — the micro graph (edges inside one finest block), 0/1.
    - ``obsp[f"{key_added}_distances"]`` — the within-tile proximity graph (all scales), distances in µm.
    - ``uns[key_added]`` — ``tiles`` (DataFrame: ``section``, ``x0_px``, ``y0_px``, ``size_px``,
      ``n_nodes``, ``microns_per_pixel``), ``tile_size_um``, ``grid``, ``block_grids``,
      ``n_neighs``, ``spatial_key``, ``library_key``.

    Examples
    --------
    >>> imagene.pp.tile_graphs(adata, library_key="section")
    >>> adata.uns["imagene_tile_graphs"]["tiles"].head()
    """
    from sklearn.neighbors import NearestNeighbors

    check_adata(adata)
    grids = _check_grid(grid)
    if isinstance(n_neighs, bool) or not isinstance(n_neighs, (int, np.integer)) or n_neighs < 1:
        raise ValueError(f"n_neighs must be a positive integer; got {n_neighs!r}.")
    if tile_size_um is not None and not (np.isfinite(tile_size_um) and tile_size_um > 0):
        raise ValueError(f"tile_size_um must be a positive number of microns (or None); got {tile_size_um!r}.")
    xy = np.asarray(check_obsm(adata, spatial_key, "Node centres in full-resolution pixels are required."))
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise ValueError(f"adata.obsm[{spatial_key!r}] must be a finite (n_obs, 2) array of pixel coordinates.")
    xy = xy[:, :2].astype(np.float64)
    used_key, groups = resolve_libraries(adata, library_key)
    mpps = {lib: _microns_per_pixel(adata, lib, microns_per_pixel) for lib in groups}
    if tile_size_um is None:
        pitches = [_pitch_um(xy[idx] * mpps[lib]) for lib, idx in groups.items()]
        pitch = float(np.nanmedian(pitches)) if np.isfinite(pitches).any() else float("nan")
        if not np.isfinite(pitch) or pitch <= 0:
            raise ValueError("Cannot infer a tile size from fewer than 2 distinct nodes; pass `tile_size_um=`.")
        tile_size_um = grid * pitch
        logger.info("tile_graphs: tile_size_um=%.1f (grid x median nearest-neighbour distance)", tile_size_um)

    n = adata.n_obs
    tile_of = np.full(n, -1, dtype=np.int64)
    blocks = np.zeros((n, len(grids)), dtype=np.int64)
    rows_all, cols_all, dist_all = [], [], []
    table = []
    for lib, idx in progress(list(groups.items()), desc="tile graphs", show=False):
        mpp = mpps[lib]
        size_px = tile_size_um / mpp
        p = xy[idx]
        origin = p.min(0)
        cell = np.floor((p - origin) / size_px).astype(np.int64)  # (tx, ty) per node
        keys, inverse = np.unique(cell, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        base = len(table)
        for tx, ty in keys:
            x0, y0 = origin[0] + tx * size_px, origin[1] + ty * size_px
            table.append((lib, float(x0), float(y0), float(size_px), mpp))
        tile_of[idx] = base + inverse
        frac = (p - origin) / size_px - cell  # position inside the tile in [0, 1)
        frac = np.clip(frac, 0.0, 1.0 - 1e-9)
        for s, b in enumerate(grids):
            bxy = np.floor(frac * b).astype(np.int64)
            blocks[idx, s] = bxy[:, 1] * b + bxy[:, 0]
        k = int(min(n_neighs + 1, len(idx)))
        if k < 2:
            continue
        d, nb = NearestNeighbors(n_neighbors=k).fit(p).kneighbors(p)
        r = np.repeat(np.arange(len(idx)), k - 1)
        c = nb[:, 1:].ravel()
        dd = d[:, 1:].ravel() * mpp
        same_tile = inverse[r] == inverse[c]
        rows_all.append(idx[r[same_tile]])
        cols_all.append(idx[c[same_tile]])
        dist_all.append(dd[same_tile])
    if rows_all:
        r, c, d = np.concatenate(rows_all), np.concatenate(cols_all), np.concatenate(dist_all)
    else:
        r = c = np.zeros(0, dtype=np.int64)
        d = np.zeros(0)
    dist = sp.coo_matrix((d, (r, c)), shape=(n, n)).tocsr()
    dist = dist.maximum(dist.T).tocsr()  # symmetrise (kNN is not symmetric)
    dist.eliminate_zeros()
    coo = dist.tocoo()
    same_micro = blocks[coo.row, 0] == blocks[coo.col, 0]
    conn = sp.csr_matrix(
        (np.ones(int(same_micro.sum()), dtype=np.float32), (coo.row[same_micro], coo.col[same_micro])), shape=(n, n)
    )
    tiles = pd.DataFrame(table, columns=["section", "x0_px", "y0_px", "size_px", "microns_per_pixel"])
    tiles["n_nodes"] = np.bincount(tile_of, minlength=len(tiles))
    tiles.index = tiles.index.astype(str)

    out = adata.copy() if copy else adata
    save_key(out, "obs", f"{key_added}_tile", tile_of)
    save_key(out, "obsm", f"{key_added}_blocks", blocks)
    save_key(out, "obsp", f"{key_added}_connectivities", conn)
    save_key(out, "obsp", f"{key_added}_distances", dist.astype(np.float32))
    save_key(
        out,
        "uns",
        key_added,
        {
            "tiles": tiles,
            "tile_size_um": float(tile_size_um),
            "grid": int(grid),
            "block_grids": np.asarray(grids, dtype=np.int64),
            "n_neighs": int(n_neighs),
            "spatial_key": spatial_key,
            "library_key": used_key or "",
        },
    )
    logger.info("tile_graphs: %d nodes in %d tiles (%.1f nodes per tile)", n, len(tiles), n / max(len(tiles), 1))
    return out if copy else None


def embed_tile_crops(
    adata: AnnData,
    *,
    encoder: Any = "efficientnet_lite0",
    weights: Any = None,
    input_px: int = 64,
    image: Any = None,
    batch_size: int = 64,
    device: str = "auto",
    tiles_key: str = KEYS.TILE_GRAPHS,
    key_added: str = KEYS.TILE_CROPS,
    show_progress_bar: bool = True,
) -> None:
    """Multi-crop features of each tile: its 4x4, 2x2 and 1x1 patches embedded by a frozen encoder.

    Each tile of :func:`tile_graphs` is cut once from its section's H&E (resolved like
    :func:`imagene.pp.extract_tiles`: ``image``, ``uns['spatial'][lib]['images']['fullres']``,
    ``metadata['source_image_path']``, then hires / lowres; white outside the image), resampled to
    ``grid * input_px`` pixels and split into the ``b x b`` patches of every block grid. Every
    patch is resized to ``input_px`` and embedded by the frozen registry encoder
    (:func:`imagene.nn.get_image_encoder`); SIGMMA mean-pools them per scale. ``input_px`` is far
    below the encoder's native 224 px to keep CPU cost low (21 patches per tile).

    Parameters
    ----------
    adata
        AnnData with the tiles of :func:`tile_graphs` in ``uns[tiles_key]``.
    encoder
        Registry name or module of the frozen image encoder.
    weights
        Local checkpoint for ``encoder``.
    input_px
        Side in pixels of each patch given to the encoder.
    image
        Full-resolution image(s) to cut from instead of those registered in ``uns['spatial']``
        (an array, a path, or a dict keyed by section).
    batch_size
        Patches per forward pass.
    device
        Torch device (``'auto'``: CUDA when available).
    tiles_key
        Key of the tile table written by :func:`tile_graphs`.
    key_added
        ``uns`` key of the features.
    show_progress_bar
        Show a progress bar.

    Returns
    -------
    Nothing; adds ``uns[key_added]``: ``features`` — a dict with one (n_tiles, b*b, d) float32 array per
    block grid ``b`` (keys ``'4'``, ``'2'``, ``'1'`` for ``grid=4``), patches row-major like the block
    indices of :func:`tile_graphs` — plus ``encoder``, ``input_px`` and ``tile_size_um``.

    Examples
    --------
    >>> imagene.pp.tile_graphs(adata)
    >>> imagene.pp.embed_tile_crops(adata, encoder="efficientnet_lite0", input_px=64)
    >>> adata.uns["imagene_tile_crops"]["features"]["4"].shape
    (110, 16, 1280)
    """
    from imagene.nn import get_image_encoder
    from imagene.pp._features import encode_tiles, resolve_device
    from imagene.pp._tiles import _crop, _is_lazy, _resize, _source_for

    check_adata(adata)
    if tiles_key not in adata.uns or "tiles" not in adata.uns[tiles_key]:
        raise KeyError(f"adata.uns[{tiles_key!r}] not found. Run `imagene.pp.tile_graphs(adata)` first.")
    if isinstance(input_px, bool) or not isinstance(input_px, (int, np.integer)) or input_px < 8:
        raise ValueError(f"input_px must be an integer >= 8; got {input_px!r}.")
    meta = adata.uns[tiles_key]
    tiles = meta["tiles"]
    grids = [int(b) for b in np.asarray(meta["block_grids"]).ravel()]
    side = grids[0] * int(input_px)
    # resolve every section's image before doing any work: a missing image fails fast and names the fix
    sections = list(dict.fromkeys(tiles["section"].astype(str)))
    macro = np.empty((len(tiles), side, side, 3), dtype=np.uint8)
    for lib in progress(sections, desc="tile crops", show=show_progress_bar):
        try:
            img, scale, _ = _source_for(adata, lib, image)
        except (KeyError, ValueError) as e:
            raise type(e)(
                f"{e} SIGMMA cuts its multi-crop tiles from the section images: keep "
                "uns['spatial'][section]['metadata']['source_image_path'] pointing at the H&E, or pass `image=`."
            ) from e
        rows = np.flatnonzero(tiles["section"].astype(str).to_numpy() == lib)
        for r in rows:
            x0 = int(np.floor(tiles["x0_px"].iloc[r] * scale))
            y0 = int(np.floor(tiles["y0_px"].iloc[r] * scale))
            s = max(1, int(round(tiles["size_px"].iloc[r] * scale)))
            arr, off = _crop(img, x0, y0, s)
            arr = np.asarray(arr.compute() if _is_lazy(img) and hasattr(arr, "compute") else arr)
            full = np.full((s, s, 3), 255, dtype=np.uint8)
            if arr.size:
                full[off[0] : off[0] + arr.shape[0], off[1] : off[1] + arr.shape[1]] = arr[..., :3]
            macro[r] = _resize(full, side)
    enc = get_image_encoder(encoder, weights=weights)
    dev = resolve_device(device)
    enc = enc.to(dev)
    feats = {}
    n_tiles = len(tiles)
    for b in grids:
        p = side // b
        patches = macro.reshape(n_tiles, b, p, b, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n_tiles * b * b, p, p, 3)
        f = encode_tiles(
            np.ascontiguousarray(patches), enc, batch_size=batch_size, device=dev, input_px=int(input_px),
            show_progress_bar=show_progress_bar,
        )
        feats[str(b)] = f.reshape(n_tiles, b * b, -1).astype(np.float32)
    save_key(
        adata,
        "uns",
        key_added,
        {
            "features": feats,
            "encoder": enc.name if hasattr(enc, "name") else str(encoder),
            "input_px": int(input_px),
            "tile_size_um": float(meta["tile_size_um"]),
        },
    )


def prepare_tile_graphs(
    adata: AnnData,
    *,
    tile_size_um: float | None = None,
    library_key: str | None = None,
    n_neighs: int = 8,
    encoder: Any = "efficientnet_lite0",
    input_px: int = 64,
    crops: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Tile graphs (``grid=4``) and their multi-crop features, reused when present and consistent, else computed.

    The inputs of :class:`imagene.model.SIGMMA`. The tile graphs of :func:`tile_graphs` are reused
    when ``adata`` has them all with a 4x4 grid, ``n_neighs`` and (unless ``None``) ``tile_size_um``;
    else they are built. The crop features of :func:`embed_tile_crops` are reused when the graphs
    were reused and the features come from ``encoder`` at ``input_px`` with one row per tile; else
    they are computed. Nothing else is touched.

    Parameters
    ----------
    adata
        Cells or spots with centres in ``obsm['spatial']`` and, for the crops, each section's image in
        ``uns['spatial']``.
    tile_size_um
        Side of a tile (``None``: any existing tiling, else the default of :func:`tile_graphs`).
    library_key
        ``obs`` column of sections (ignored when not in ``adata.obs``; see :func:`tile_graphs`).
    n_neighs
        Nearest neighbours per node in the within-tile proximity graph.
    encoder
        Frozen encoder of the multi-crop patches (:func:`embed_tile_crops`).
    input_px
        Pixels per patch given to the encoder.
    crops
        Also make sure of the crop features (``False``: the tile graphs only).
    copy
        Write nothing into ``adata``: return the AnnData holding the inputs, ``adata`` itself when it
        already has them all, else a light copy (``obs``, ``obsm['spatial']``, ``uns['spatial']`` and the
        keys below).

    Returns
    -------
    ``None`` (or the AnnData of ``copy``); adds, when they are missing or inconsistent, the keys of
    :func:`tile_graphs` (``obs['imagene_tile_graphs_tile']``, ``obsm['imagene_tile_graphs_blocks']``,
    ``obsp['imagene_tile_graphs_connectivities']`` / ``['imagene_tile_graphs_distances']``,
    ``uns['imagene_tile_graphs']``) and of :func:`embed_tile_crops` (``uns['imagene_tile_crops']``),
    each logged as it is written.

    Examples
    --------
    >>> imagene.pp.prepare_tile_graphs(adata, library_key="section", encoder="efficientnet_lite0", input_px=64)
    >>> imagene.pp.prepare_tile_graphs(adata, library_key="section")  # reused: nothing is added
    """
    check_adata(adata)
    g, c = KEYS.TILE_GRAPHS, KEYS.TILE_CROPS
    meta = adata.uns.get(g)
    has_graph = (
        meta is not None
        and f"{g}_tile" in adata.obs
        and f"{g}_blocks" in adata.obsm
        and f"{g}_connectivities" in adata.obsp
        and f"{g}_distances" in adata.obsp
        and int(meta.get("grid", 0)) == 4
        and (tile_size_um is None or np.isclose(float(meta["tile_size_um"]), float(tile_size_um)))
        and int(meta.get("n_neighs", -1)) == int(n_neighs)
    )
    target = adata
    if not has_graph and copy:
        uns = {"spatial": adata.uns.get("spatial", {})}
        target = AnnData(obs=adata.obs.copy(), obsm={KEYS.SPATIAL: np.asarray(adata.obsm[KEYS.SPATIAL])}, uns=uns)
    if not has_graph:
        lib = library_key if library_key is not None and library_key in adata.obs else None
        tile_graphs(target, tile_size_um=tile_size_um, grid=4, library_key=lib, n_neighs=n_neighs)
    else:
        logger.debug("prepare_tile_graphs: reusing the tile graphs in uns[%r]", g)
    if not crops:
        return target if copy else None
    have = target.uns.get(c)
    n_tiles = len(target.uns[g]["tiles"])
    has_crops = (
        has_graph
        and have is not None
        and str(have.get("encoder")) == str(encoder)
        and int(have.get("input_px", -1)) == int(input_px)
        and np.asarray(have["features"]["4"]).shape[0] == n_tiles
    )
    if not has_crops:
        if target is adata and copy:
            uns = {"spatial": adata.uns.get("spatial", {}), g: adata.uns[g]}
            target = AnnData(
                obs=adata.obs[[f"{g}_tile"]].copy(),
                obsm={f"{g}_blocks": np.asarray(adata.obsm[f"{g}_blocks"])},
                obsp={k: adata.obsp[k] for k in (f"{g}_connectivities", f"{g}_distances")},
                uns=uns,
            )
        embed_tile_crops(target, encoder=encoder, input_px=int(input_px), show_progress_bar=False)
    else:
        logger.debug("prepare_tile_graphs: reusing the crop features in uns[%r]", c)
    return target if copy else None
