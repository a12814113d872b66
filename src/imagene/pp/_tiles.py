"""Cut one tile per spot, of a physical size in microns, from the section's H&E image."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from imagene._constants import KEYS, SPOT_PITCH_UM
from imagene._utils import check_adata, progress, save_key, warn
from imagene._validate import (
    check_positive_float,
    check_spatial,
    check_spot_pitch,
    check_tissue_content,
    check_unique_obs_names,
    thumbnail,
)
from imagene.io._image import LAZY_SUFFIXES, as_rgb, open_lazy, read_image, spatialdata_image_to_dask
from imagene.pp._library import resolve_libraries

logger = logging.getLogger("imagene")


def _is_lazy(img: Any) -> bool:
    return type(img).__module__.split(".")[0] in ("dask", "zarr")


def _as_image(img: Any, name: str) -> Any:
    """(H, W, 3) uint8 numpy for in-memory input; lazy (H, W, C) dask for path / dask / zarr / SpatialData input."""
    if isinstance(img, (str, os.PathLike)):
        img = open_lazy(img)
    elif _is_image_element(img):  # xarray DataArray / DataTree from SpatialData
        img = spatialdata_image_to_dask(img)
    if not _is_lazy(img):
        return as_rgb(np.asarray(img), name=name)
    import dask.array as da

    if not type(img).__module__.startswith("dask"):  # a zarr array: slicing it would read eagerly
        img = da.from_zarr(img)
    if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
        img = img.transpose(1, 2, 0)  # channels first
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:  # grayscale: repeat the channel lazily
        warn(f"{name} is grayscale; converting to RGB by repeating the channel.")
        img = da.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"{name} must have shape (H, W, 3); got {img.shape}.")
    _check_uint8(img, name)
    return img


def _check_uint8(img: Any, name: str) -> None:
    """Lazy images are cut as they are: refuse other dtypes rather than wrap them around silently."""
    if np.dtype(img.dtype) != np.uint8:
        raise ValueError(
            f"{name} has dtype {np.dtype(img.dtype)}; tiles are cut from 8-bit RGB images. Convert it to uint8 "
            "first, e.g. `(image // 257).astype('uint8')` for 16-bit or `(image * 255).astype('uint8')` for floats "
            "in [0, 1]."
        )


def _is_image_element(img: Any) -> bool:
    """Whether ``img`` is a SpatialData image element (xarray DataArray, or a multiscale DataTree)."""
    return hasattr(img, "dims") or hasattr(img, "children")


def _source_for(adata: AnnData, lib: str, image: Any) -> tuple[Any, float, str]:
    """(image, pixels of image per full-resolution pixel, description) for one section."""
    if image is not None:
        img = image
        # a multiscale SpatialData image (xarray DataTree) is a Mapping too: it is one image, not a dict
        if isinstance(image, Mapping) and not _is_image_element(image):
            if lib not in image:
                raise KeyError(
                    f"`image` has no entry for section {lib!r} (it holds {list(image)}). Pass a dict with one "
                    "full-resolution image per section, keyed like adata.uns['spatial'] / the library_key column."
                )
            img = image[lib]
        return _as_image(img, f"image of section {lib!r}"), 1.0, "user-supplied image"
    entry = adata.uns.get("spatial", {}).get(lib)
    if entry is None:
        raise KeyError(
            f"adata.uns['spatial'][{lib!r}] not found: no image is registered for section {lib!r}. "
            "Read the section with an imagene.io reader or pass `image=` (full-resolution array or path)."
        )
    images = entry.get("images", {})
    meta = entry.get("metadata", {})
    sf = entry.get("scalefactors", {})
    if "fullres" in images:  # the source image held in memory: same scale as source_image_path
        return as_rgb(images["fullres"]), float(meta.get("source_image_scale", 1.0)), "uns fullres image"
    src = meta.get("source_image_path", "")
    if src:
        scale = float(meta.get("source_image_scale", 1.0))
        if not Path(src).exists():
            warn(f"Source image {src!r} of section {lib!r} not found; falling back to the images stored in uns.")
        else:
            element = meta.get("source_image_element") or None
            if element is not None or str(src).lower().rstrip("/").endswith(LAZY_SUFFIXES):
                return _as_image(open_lazy(src, element), f"image {src!r}"), scale, f"{src} (lazy)"
            return read_image(src), scale, src
    for name in ("hires", "lowres"):
        if name in images:
            key = f"tissue_{name}_scalef"
            if key not in sf:
                raise KeyError(
                    f"adata.uns['spatial'][{lib!r}]['scalefactors'][{key!r}] not found for its {name} image. "
                    f"Set it ({name} px per full-resolution px) or pass the full-resolution image as `image=`."
                )
            return as_rgb(images[name]), float(sf[key]), f"uns {name} image"
    raise ValueError(
        f"Section {lib!r} has no image (no uns['spatial'][{lib!r}]['images'] and no source_image_path). "
        "Pass `image=` with the full-resolution H&E."
    )


def _check_geometry(
    adata: AnnData, lib: str, image: Any, xy_full: np.ndarray, mpp: float, tile_full: float, spatial_key: str
) -> None:
    """Spots against their image: the platform's spot pitch, and tiles on tissue rather than glass.

    ``image`` is the section's resolved user image (``None``: the images of ``uns``).
    """
    entry = adata.uns.get("spatial", {}).get(lib, {})
    platform = str(entry.get("metadata", {}).get("platform", ""))
    if platform in SPOT_PITCH_UM:
        check_spot_pitch(xy_full, mpp, SPOT_PITCH_UM[platform], lib, spatial_key)
    if len(xy_full) < 10:
        return
    thumb = thumbnail(adata, lib, image)
    if thumb is not None:
        check_tissue_content(thumb[0], thumb[1], xy_full, tile_full, lib, spatial_key)


def _crop_windows(centres: np.ndarray, size: float) -> np.ndarray:
    """Integer (x0, y0, s) windows of side ``s`` pixels centred on ``centres``."""
    s = max(1, int(round(size)))
    x0 = np.floor(centres[:, 0] - s / 2 + 0.5).astype(np.int64)
    y0 = np.floor(centres[:, 1] - s / 2 + 0.5).astype(np.int64)
    return np.stack([x0, y0, np.full_like(x0, s)], axis=1)


def _crop(img: Any, x0: int, y0: int, s: int) -> Any:
    """Crop [y0, y0+s) x [x0, x0+s), padding with white outside the image (lazy arrays stay lazy)."""
    h, w = img.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + s, w), min(y0 + s, h)
    return img[ya:yb, xa:xb, :3], (ya - y0, xa - x0)


def _resize(tile: np.ndarray, px: int) -> np.ndarray:
    if tile.shape[0] == px and tile.shape[1] == px:
        return tile
    from PIL import Image

    method = Image.Resampling.BILINEAR if tile.shape[0] < px else Image.Resampling.BOX
    return np.asarray(Image.fromarray(tile).resize((px, px), method))


def extract_tiles(
    adata: AnnData,
    *,
    tile_size_um: float = 112.0,
    tile_px: int = 224,
    library_key: str | None = None,
    spatial_key: str = KEYS.SPATIAL,
    image: Any = None,
    microns_per_pixel: float | None = None,
    store: str | os.PathLike | None = None,
    max_memory_gb: float = 2.0,
    check_scale: bool = True,
    batch_size: int = 256,
    key_added: str = KEYS.TILES,
    show_progress_bar: bool = True,
) -> None:
    """Cut one square tile per spot, centred on it, of ``tile_size_um`` microns, resampled to ``tile_px``.

    The image of each section is resolved in this order: ``image`` (full-resolution), an in-memory
    ``uns['spatial'][lib]['images']['fullres']``, the file in ``metadata['source_image_path']``
    (TIFF and SpatialData zarr stores are read lazily, tile by tile; JPEG / PNG are decoded one
    section at a time), then the ``hires`` / ``lowres`` image with its scale factor. Tiles near the
    image border are padded with white.

    Parameters
    ----------
    adata
        Spots with centres in ``obsm[spatial_key]`` in full-resolution pixels.
    tile_size_um
        Side of a tile in microns (112 µm covers a 100 µm legacy-ST spot).
    tile_px
        Side of the stored tile in pixels.
    library_key
        ``obs`` column naming each spot's section (``'section'`` is used when present).
    spatial_key
        ``obsm`` key of the spot centres.
    image
        Full-resolution image(s) to cut from instead of those registered in ``uns``: an array,
        a dask array, a SpatialData image element, a path, or a dict keyed by section.
    microns_per_pixel
        Override of ``uns['spatial'][lib]['scalefactors']['microns_per_pixel']``.
    store
        Path of a chunked zarr array to write tiles to (for large data); ``obsm`` then holds a lazy
        dask view of it. ``None`` keeps tiles in memory.
    max_memory_gb
        Refuse to hold more than this in memory when ``store`` is ``None``.
    check_scale
        Check the spots against their image and raise when they look like they are in another scale
        (or have x and y swapped): spots span under 5 % of the image; spots packed closer than the
        platform's spot pitch (legacy ST 200 µm, Visium 100 µm) at ``microns_per_pixel``; more than
        half of the tiles on glass (a warning above 3 %), or far fewer with x and y exchanged. The
        tissue check uses the ``hires`` / ``lowres`` image (or an in-memory image); ``False`` skips it.
    batch_size
        Tiles cut (and, for lazy images, read) per step.
    key_added
        Key of the tiles in ``obsm`` and of their provenance in ``uns``.
    show_progress_bar
        Show a progress bar.

    Returns
    -------
    Nothing; adds to ``adata``:

    - ``obsm[key_added]`` — (n_obs, tile_px, tile_px, 3) uint8 tiles (numpy, or dask over ``store``).
    - ``uns[key_added]`` — provenance: ``tile_size_um``, ``tile_px``, ``microns_per_pixel`` and image
      source per section, ``store``, ``spatial_key``, ``coordinate_system``.

    Examples
    --------
    >>> imagene.pp.extract_tiles(adata, tile_size_um=112, tile_px=224)
    >>> adata.obsm["imagene_tiles"].shape
    (1184, 224, 224, 3)
    """
    check_adata(adata)
    check_unique_obs_names(adata)
    spatial = check_spatial(adata, spatial_key)
    if isinstance(tile_px, bool) or not isinstance(tile_px, (int, np.integer)):
        raise TypeError(f"tile_px must be an integer number of pixels; got {tile_px!r}.")
    tile_size_um = check_positive_float("tile_size_um", tile_size_um)
    if tile_px < 1:
        raise ValueError(f"tile_px must be a positive number of pixels; got {tile_px}. Pass e.g. `tile_px=224`.")
    _, groups = resolve_libraries(adata, library_key)

    # resolve and validate every section before writing anything
    plans = []
    for lib, idx in groups.items():
        img, scale, desc = _source_for(adata, lib, image)
        mpp = microns_per_pixel
        if mpp is None:
            mpp = adata.uns.get("spatial", {}).get(lib, {}).get("scalefactors", {}).get("microns_per_pixel")
        if mpp is None or not np.isfinite(mpp) or mpp <= 0:
            raise ValueError(
                f"Microns per pixel unknown for section {lib!r}. Set "
                f"adata.uns['spatial'][{lib!r}]['scalefactors']['microns_per_pixel'] or pass `microns_per_pixel=`; "
                "imagene.io.infer_microns_per_pixel(spots, pitch_um) infers it from the spot pitch."
            )
        size_src = tile_size_um / mpp * scale
        if size_src < 1:
            raise ValueError(
                f"A {tile_size_um} µm tile is {size_src:.2f} px in the image of section {lib!r} (zero-sized). "
                "Use a larger tile_size_um or a higher-resolution image."
            )
        if tile_px / size_src > 4:
            warn(
                f"Section {lib!r}: a {tile_size_um} µm tile spans only {size_src:.1f} px of its image ({desc}); "
                f"tiles are upsampled {tile_px / size_src:.1f}x. Provide the full-resolution image for sharper tiles."
            )
        xy = spatial[idx, :2] * scale
        h, w = img.shape[:2]
        outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
        if outside.any():
            raise ValueError(
                f"{int(outside.sum())} of {len(idx)} spots of section {lib!r} lie outside its {w}x{h} image ({desc}). "
                f"obsm[{spatial_key!r}] must be in full-resolution pixels of this section's image; if they are in "
                "hires/lowres pixels, divide them by the tissue_hires_scalef / tissue_lowres_scalef."
            )
        if check_scale and len(idx) >= 10:
            span = (np.ptp(xy[:, 0]) / w, np.ptp(xy[:, 1]) / h)
            if max(span) < 0.05:
                raise ValueError(
                    f"Spots of section {lib!r} span only {100 * span[0]:.1f}% x {100 * span[1]:.1f}% of its image: "
                    "the coordinates look like they are in another scale than the image (e.g. lowres coordinates "
                    "with a hires image). Convert obsm['spatial'] to full-resolution pixels, or pass "
                    "`check_scale=False` if the tissue really is that small."
                )
        if check_scale:
            _check_geometry(adata, lib, None if image is None else img, spatial[idx], mpp, tile_size_um / mpp,
                            spatial_key)
        plans.append((lib, idx, img, xy, size_src, mpp, desc))

    n = adata.n_obs
    nbytes = n * tile_px * tile_px * 3
    if store is None:
        if nbytes > max_memory_gb * 1024**3:
            raise ValueError(
                f"{n:,} tiles of {tile_px} px need {nbytes / 1024**3:.1f} GB in memory "
                f"(max_memory_gb={max_memory_gb}). "
                "Pass `store='tiles.zarr'` to stream them to a chunked zarr array, or lower tile_px."
            )
        out: Any = np.zeros((n, tile_px, tile_px, 3), dtype=np.uint8)
    else:
        import zarr

        chunk = max(1, min(batch_size, n))
        out = zarr.open_array(
            str(store), mode="w", shape=(n, tile_px, tile_px, 3), chunks=(chunk, tile_px, tile_px, 3), dtype="uint8"
        )
    logger.info("Extracting %s tiles of %g µm at %d px", f"{n:,}", tile_size_um, tile_px)

    import dask

    steps = [(p, s) for p in plans for s in range(0, len(p[1]), batch_size)]
    for (lib, idx, img, xy, size_src, _, _), start in progress(
        steps, total=len(steps), desc="tiles", show=show_progress_bar
    ):
        sel = slice(start, start + batch_size)
        wins = _crop_windows(xy[sel], size_src)
        crops = [_crop(img, int(x0), int(y0), int(s)) for x0, y0, s in wins]
        arrays = [c for c, _ in crops]
        if _is_lazy(img):
            is_dask = type(img).__module__.startswith("dask")
            arrays = dask.compute(*arrays) if is_dask else [np.asarray(a) for a in arrays]
        batch = np.empty((len(wins), tile_px, tile_px, 3), dtype=np.uint8)
        for j, ((x0, y0, s), arr, (_, off)) in enumerate(zip(wins, arrays, crops, strict=True)):
            arr = np.asarray(arr)
            if arr.shape[:2] != (s, s):  # pad with white where the window leaves the image
                full = np.full((s, s, 3), 255, dtype=np.uint8)
                full[off[0] : off[0] + arr.shape[0], off[1] : off[1] + arr.shape[1]] = arr
                arr = full
            batch[j] = _resize(np.ascontiguousarray(arr[..., :3], dtype=np.uint8), tile_px)
        rows = idx[sel]
        if store is None:
            out[rows] = batch
        else:
            out.oindex[rows] = batch

    if store is not None:
        import dask.array as da

        out = da.from_zarr(str(store))
    save_key(adata, "obsm", key_added, out)
    save_key(
        adata,
        "uns",
        key_added,
        {
            "tile_size_um": float(tile_size_um),
            "tile_px": int(tile_px),
            "microns_per_pixel": {str(p[0]): float(p[5]) for p in plans},
            "source": {str(p[0]): str(p[6]) for p in plans},
            "store": str(store) if store is not None else "",
            "spatial_key": spatial_key,
            "coordinate_system": "full-resolution pixels",
        },
    )
