"""Image loading and checks shared by the readers and the tiler."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from imagene._utils import warn
from imagene._validate import decode_errors

logger = logging.getLogger("imagene")

LAZY_SUFFIXES = (".tif", ".tiff", ".zarr", ".ome.zarr", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
#: whole-slide formats opened through OpenSlide (:func:`imagene.io.read_slide`)
SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def as_rgb(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Return ``image`` as an (H, W, 3) uint8 array, converting grayscale / RGBA / float with a warning."""
    img = np.asarray(image)
    if img.ndim == 2:
        warn(f"{name} is grayscale; converting to RGB by repeating the channel.")
        img = np.repeat(img[..., None], 3, axis=-1)
    elif img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
        img = np.moveaxis(img, 0, -1)  # channels-first (c, y, x) -> (y, x, c)
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be (H, W), (H, W, 3) or (H, W, 4); got shape {img.shape}.")
    if img.shape[-1] == 1:
        warn(f"{name} is grayscale; converting to RGB by repeating the channel.")
        img = np.repeat(img, 3, axis=-1)
    elif img.shape[-1] == 4:
        warn(f"{name} is RGBA; dropping the alpha channel.")
        img = img[..., :3]
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            warn(f"{name} is 16-bit; rescaling to 8-bit (value / 257).")
            img = img / 257.0
        elif np.issubdtype(img.dtype, np.floating) and img.size and float(np.nanmax(img)) <= 1.0:
            img = img * 255.0
        img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if 0 in img.shape[:2]:
        raise ValueError(f"{name} is empty (shape {img.shape}).")
    return np.ascontiguousarray(img)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a whole image file into an (H, W, 3) uint8 array (grayscale / RGBA converted with a warning)."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    Image.MAX_IMAGE_PIXELS = None  # slides are large on purpose
    with decode_errors(path), Image.open(path) as im:
        if im.mode not in ("RGB", "L", "RGBA", "LA", "P", "I;16", "I", "F"):
            im = im.convert("RGB")
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "LA":
            im = im.convert("RGBA")
        arr = np.asarray(im)
    return as_rgb(arr, name=f"image {path.name!r}")


def read_image_downscaled(path: str | os.PathLike, max_px: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Read an image file directly at reduced size (JPEG draft decoding), for the ``hires`` copy.

    Returns the (h, w, 3) uint8 image, its scale relative to the file's full size, and the full
    size ``(height, width)``. The full-resolution pixels are never decoded for large JPEGs.
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    Image.MAX_IMAGE_PIXELS = None
    with decode_errors(path), Image.open(path) as im:
        full_w, full_h = im.size
        s = min(1.0, max_px / max(full_w, full_h))
        target = (max(1, round(full_w * s)), max(1, round(full_h * s)))
        if s < 1.0 and im.format == "JPEG":
            im.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 size when that is still >= target
        if im.mode not in ("RGB", "L", "RGBA"):
            im = im.convert("RGBA" if "transparency" in im.info or im.mode in ("LA", "PA") else "RGB")
        if im.size != target:
            im = im.resize(target, Image.Resampling.LANCZOS)
        arr = np.asarray(im)
    return as_rgb(arr, name=f"image {path.name!r}"), target[0] / full_w, (full_h, full_w)


def open_lazy(path: str | os.PathLike, element: str | None = None) -> Any:
    """Open an image lazily as a dask array of shape (H, W, C).

    TIFF files are opened through tifffile's zarr interface, whole-slide formats (SVS, NDPI,
    MRXS, ...) through OpenSlide (:func:`imagene.io.read_slide`), SpatialData stores through
    :func:`spatialdata.read_zarr` (``element`` names the image element); other formats
    (JPEG, PNG) cannot be read lazily and are decoded whole by :func:`read_image`.
    """
    import dask.array as da

    p = str(path)
    if element is not None or p.rstrip("/").endswith(".zarr"):
        import spatialdata as sd

        sdata = sd.read_zarr(p, selection=("images",))
        if element is None:
            if len(sdata.images) != 1:
                raise ValueError(f"{p!r} holds images {list(sdata.images)}; name one with `element=`.")
            element = next(iter(sdata.images))
        return spatialdata_image_to_dask(sdata.images[element])
    if p.lower().endswith(SLIDE_ONLY_SUFFIXES):
        from imagene.io._slide import read_slide

        return read_slide(p, microns_per_pixel=1.0).to_dask()  # pixels only: the caller knows the scale
    if p.lower().endswith((".tif", ".tiff")):
        import tifffile
        import zarr

        store = tifffile.imread(p, aszarr=True)
        z = zarr.open(store, mode="r")
        if hasattr(z, "shape"):
            arr = da.from_zarr(z)
        else:  # pyramid: level 0 is full resolution
            arr = da.from_zarr(z["0"])
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = arr.transpose(1, 2, 0)
        return arr
    return da.from_array(read_image(p), chunks=(2048, 2048, 3))


def spatialdata_image_to_dask(element: Any) -> Any:
    """Full-resolution (H, W, C) dask array of a SpatialData image element (DataArray or multiscale DataTree)."""
    try:  # multiscale DataTree: take scale0
        if hasattr(element, "children") and "scale0" in element.children:
            element = next(iter(element["scale0"].values()))
    except (KeyError, TypeError, StopIteration):  # pragma: no cover - defensive
        pass
    dims = tuple(element.dims)
    if dims != ("c", "y", "x"):
        raise ValueError(f"Expected an image element with dims ('c', 'y', 'x'); got {dims}.")
    return element.data.transpose(1, 2, 0)


def downscale(image: np.ndarray, max_px: int) -> tuple[np.ndarray, float]:
    """Downscale ``image`` so its longest side is at most ``max_px``; return it and the scale applied."""
    from PIL import Image

    h, w = image.shape[:2]
    s = min(1.0, max_px / max(h, w))
    if s >= 1.0:
        return image, 1.0
    size = (max(1, round(w * s)), max(1, round(h * s)))
    out = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    return out, size[0] / w
