"""Nuclei maps per spot from H&E colour deconvolution (hematoxylin channel, Otsu threshold)."""

from __future__ import annotations

import logging

import numpy as np
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import check_adata, progress, save_key

logger = logging.getLogger("imagene")


def nuclei_mask(tiles: np.ndarray, *, threshold: float | None = None, min_size: int = 4) -> np.ndarray:
    """Binary nuclei masks of H&E tiles by colour deconvolution and thresholding.

    Hematoxylin (which stains nuclei) is separated from eosin by the Ruifrok-Johnston colour
    deconvolution (:func:`skimage.color.rgb2hed`); pixels whose hematoxylin density exceeds an
    Otsu threshold (computed over all the tiles given, i.e. per section) are nuclei; objects
    smaller than ``min_size`` pixels are removed (:func:`skimage.morphology.remove_small_objects`).
    This is a classical segmentation, not HoVer-Net: touching nuclei are not separated, which a
    density map does not need.

    Parameters
    ----------
    tiles
        ``(n, px, px, 3)`` uint8 RGB tiles.
    threshold
        Hematoxylin density above which a pixel is a nucleus (default: Otsu over the tiles).
    min_size
        Smallest object kept, in pixels.

    Returns
    -------
    ``(n, px, px)`` boolean masks.

    Examples
    --------
    >>> masks = imagene.pp.nuclei_mask(adata.obsm["imagene_tiles"])
    """
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must be (n, px, px, 3) RGB; got shape {tiles.shape}. Cut them with `extract_tiles`.")
    hema = np.stack([rgb2hed(t)[..., 0] for t in tiles]) if len(tiles) else np.zeros(tiles.shape[:3])
    if threshold is None:
        sample = hema.ravel()[:: max(1, hema.size // 2_000_000)]
        threshold = float(threshold_otsu(sample)) if sample.size and np.ptp(sample) > 0 else float("inf")
    mask = hema > threshold
    if min_size > 1:
        try:  # scikit-image >= 0.26 names the bound max_size (objects <= max_size are removed)
            mask = np.stack([remove_small_objects(m, max_size=min_size - 1) for m in mask]) if len(mask) else mask
        except TypeError:  # older scikit-image: min_size (objects < min_size are removed)
            mask = np.stack([remove_small_objects(m, min_size=min_size) for m in mask]) if len(mask) else mask
    return mask


def nuclei_maps(
    adata: AnnData,
    *,
    map_px: int = 32,
    tile_px: int = 64,
    tile_size_um: float = 112.0,
    tiles_key: str | None = None,
    library_key: str | None = None,
    key_added: str = KEYS.NUCLEI,
    show_progress_bar: bool = True,
    inplace: bool = True,
) -> np.ndarray | None:
    """Nuclei density map of each spot's tile, from hematoxylin colour deconvolution.

    Tiles are taken from ``obsm[tiles_key]`` when given, otherwise cut (``tile_px`` pixels over
    ``tile_size_um`` microns) from each section's H&E image with :func:`imagene.pp.extract_tiles`
    without being stored. Each tile is segmented by :func:`nuclei_mask` (Otsu threshold on the
    hematoxylin channel, per section) and the mask is averaged over ``map_px × map_px`` blocks: the
    map holds the fraction of nucleus pixels in each block (a nuclei-distribution map in the
    spirit of ALIGN-ST's HoVer-Net masks).

    Parameters
    ----------
    adata
        Spots with images registered in ``uns['spatial']`` (see :func:`imagene.pp.extract_tiles`).
    map_px
        Side of the map (``tile_px`` must be a multiple of it).
    tile_px
        Side of the tiles cut for segmentation.
    tile_size_um
        Side of the tiles in microns.
    tiles_key
        ``obsm`` key of existing uint8 tiles to segment instead of cutting new ones.
    library_key
        ``obs`` column of sections (``'section'`` when present).
    key_added
        ``obsm`` key written.
    show_progress_bar
        Show progress bars.
    inplace
        Write ``obsm[key_added]`` (default); ``False``: return the maps and leave ``adata`` as it is
        (what a model does for a query without maps).

    Returns
    -------
    Nothing with ``inplace``; writes ``obsm[key_added]``: float32 ``(n_obs, map_px, map_px)``
    nuclei fractions in [0, 1]. Otherwise that array.

    Examples
    --------
    >>> imagene.pp.nuclei_maps(adata)
    >>> adata.obsm["imagene_nuclei"].shape
    (834, 32, 32)
    """
    from imagene.pp._library import resolve_libraries
    from imagene.pp._tiles import extract_tiles

    check_adata(adata)
    if map_px < 1 or tile_px % map_px:
        raise ValueError(f"tile_px ({tile_px}) must be a positive multiple of map_px ({map_px}).")
    if tiles_key is not None:
        if tiles_key not in adata.obsm:
            raise KeyError(f"adata.obsm[{tiles_key!r}] not found. Cut tiles with `imagene.pp.extract_tiles` first.")
        tiles_all = adata.obsm[tiles_key]
        tile_px = int(tiles_all.shape[1])
        if tile_px % map_px:
            raise ValueError(f"Tiles of {tile_px} px cannot be pooled to {map_px} px; pass a divisor as map_px.")
    _, libs = resolve_libraries(adata, library_key)
    out = np.zeros((adata.n_obs, map_px, map_px), np.float32)
    for lib, idx in progress(libs.items(), total=len(libs), desc="nuclei maps", show=show_progress_bar):
        if tiles_key is not None:
            tiles = np.asarray(tiles_all[idx])
        else:
            sub = AnnData(obs=adata.obs.iloc[idx][[]].copy(), uns={"spatial": {lib: adata.uns["spatial"][lib]}}
                          if lib in adata.uns.get("spatial", {}) else {})
            for k in ("spatial",):
                if k in adata.obsm:
                    sub.obsm[k] = np.asarray(adata.obsm[k])[idx]
            level = logger.level
            logger.setLevel(max(level, logging.WARNING))  # the temporary tiles are not the user's keys
            try:
                extract_tiles(sub, tile_size_um=tile_size_um, tile_px=tile_px, key_added="tiles", show_progress_bar=False)
            finally:
                logger.setLevel(level)
            tiles = np.asarray(sub.obsm["tiles"])
        mask = nuclei_mask(tiles).astype(np.float32)
        f = mask.shape[1] // map_px
        out[idx] = mask.reshape(len(idx), map_px, f, map_px, f).mean((2, 4))
    if not inplace:
        return out
    save_key(adata, "obsm", key_added, out)
    return None
