"""Whole-slide images (OpenSlide, tifffile) and plain images, read region by region."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("imagene")

#: formats OpenSlide reads (``.tif`` / ``.tiff``: generic tiled TIFF, Philips, Ventana...)
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")
#: plain images, decoded whole by PIL (they cannot be read by region)
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class Slide:
    """A slide image read lazily, region by region, at any pyramid level.

    Behaves like a read-only ``(H, W, 3)`` uint8 array of level 0 (``shape``, ``dtype``,
    ``ndim``, ``slide[y0:y1, x0:x1]``) so that :func:`dask.array.from_array` and the tiler read
    only the regions they need. Make one with :func:`imagene.io.read_slide`.

    Attributes
    ----------
    path
        The file.
    microns_per_pixel
        Microns per level-0 pixel.
    backend
        ``'openslide'``, ``'tifffile'`` or ``'pil'`` (plain images, decoded whole on first read).
    level_dimensions
        ``(width, height)`` of each pyramid level, finest first.
    level_downsamples
        Downsample factor of each level relative to level 0.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, path: Path, backend: str, handle: Any, microns_per_pixel: float, levels: list[tuple[int, int]]):
        self.path = path
        self.backend = backend
        self._handle = handle
        self.microns_per_pixel = float(microns_per_pixel)
        self.level_dimensions = [tuple(int(v) for v in lv) for lv in levels]
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = [w0 / lv[0] for lv in self.level_dimensions]

    # ---- array-like view of level 0
    @property
    def shape(self) -> tuple[int, int, int]:
        w, h = self.level_dimensions[0]
        return (h, w, 3)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key
        steps_ok = isinstance(ys, slice) and isinstance(xs, slice) and ys.step in (None, 1) and xs.step in (None, 1)
        if not steps_ok:
            raise IndexError("A Slide is read by rectangular regions: index it with slices without step.")
        h, w = self.shape[:2]
        y0, y1, _ = ys.indices(h)
        x0, x1, _ = xs.indices(w)
        region = self.read_region(x0, y0, max(0, x1 - x0), max(0, y1 - y0))
        return region[:, :, cs]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(
            f"Refusing to load the whole slide {self.path.name!r} ({self.shape[1]}x{self.shape[0]} px) into memory. "
            "Read regions with `slide.read_region(...)` or a thumbnail with `slide.thumbnail(...)`."
        )

    def __repr__(self) -> str:
        w, h = self.level_dimensions[0]
        return (
            f"Slide({self.path.name!r}, {w}x{h} px, {self.microns_per_pixel:.4g} µm/px, "
            f"{len(self.level_dimensions)} level(s), backend={self.backend!r})"
        )

    # ---- reading
    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """RGB pixels of a region as an ``(height, width, 3)`` uint8 array (white outside the slide).

        Parameters
        ----------
        x, y
            Top-left corner in level-0 pixels.
        width, height
            Size of the region in pixels of ``level``.
        level
            Pyramid level.

        Returns
        -------
        ``(height, width, 3)`` uint8 array.
        """
        width, height = int(width), int(height)
        if width <= 0 or height <= 0:
            return np.zeros((max(height, 0), max(width, 0), 3), np.uint8)
        if self.backend == "openslide":
            rgba = np.asarray(self._handle.read_region((int(x), int(y)), int(level), (width, height)))
            rgb = rgba[..., :3].copy()
            rgb[rgba[..., 3] == 0] = 255  # transparent (outside the scanned area): white, as the tiler pads
            return rgb
        out = np.full((height, width, 3), 255, np.uint8)
        arr = self._level_array(level)
        ds = self.level_downsamples[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        lh, lw = arr.shape[:2]
        xa, ya, xb, yb = max(lx, 0), max(ly, 0), min(lx + width, lw), min(ly + height, lh)
        if xb > xa and yb > ya:
            part = np.asarray(arr[ya:yb, xa:xb])
            if part.ndim == 2:
                part = np.repeat(part[..., None], 3, axis=-1)
            out[ya - ly : yb - ly, xa - lx : xb - lx] = part[..., :3]
        return out

    def _level_array(self, level: int) -> Any:
        if self.backend == "pil":
            if self._handle.get("image") is None:
                from imagene.io._image import read_image

                self._handle["image"] = read_image(self.path)
            return self._handle["image"]
        return self._handle[level]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def thumbnail(self, max_px: int = 2000) -> tuple[np.ndarray, float]:
        """A downscaled RGB copy whose longest side is at most ``max_px``, read from a coarse level.

        When the slide has no level coarse enough (e.g. a single-level TIFF), the finest useful
        level is read block by block and each block is averaged down as it is read, so memory stays
        bounded by one block (never the whole slide).

        Returns
        -------
        ``(image, scale)``: the ``(h, w, 3)`` uint8 image and its pixels per level-0 pixel.
        """
        from imagene.io._image import downscale

        w0, h0 = self.level_dimensions[0]
        target = max(w0, h0) / float(max_px)
        if self.backend == "pil":
            small, s = downscale(self._level_array(0), max_px)
            return small, float(s)
        level = self.best_level(max(target, 1.0))
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        f = max(1, int(target / ds))  # further integer reduction, done block by block
        out = np.empty((-(-lh // f), -(-lw // f), 3), np.uint8)
        block = f * 256
        for by in range(0, lh, block):
            for bx in range(0, lw, block):
                bw, bh = min(block, lw - bx), min(block, lh - by)
                reg = self.read_region(int(round(bx * ds)), int(round(by * ds)), bw, bh, level=level)
                if f > 1:
                    ph, pw = -(-bh // f) * f - bh, -(-bw // f) * f - bw
                    reg = np.pad(reg, ((0, ph), (0, pw), (0, 0)), mode="edge")
                    reg = reg.reshape(reg.shape[0] // f, f, reg.shape[1] // f, f, 3).mean((1, 3))
                    reg = reg.round().astype(np.uint8)
                out[by // f : by // f + reg.shape[0], bx // f : bx // f + reg.shape[1]] = reg
        small, s = downscale(out, max_px)
        return small, float(s * out.shape[1] / w0)

    def to_dask(self, chunk_px: int = 1024) -> Any:
        """Level 0 as a lazy ``(H, W, 3)`` dask array whose chunks are read on demand."""
        import dask.array as da

        chunks = (chunk_px, chunk_px, 3)
        return da.from_array(self, chunks=chunks, asarray=False, fancy=False, name=f"slide-{self.path}")

    def close(self) -> None:
        """Release the file handle."""
        if self.backend == "openslide":
            self._handle.close()


def _mpp_from_openslide(props: Any) -> float | None:
    import openslide

    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        v = props.get(key)
        if v not in (None, ""):
            try:
                mpp = float(v)
            except ValueError:
                continue
            if mpp > 0:
                return mpp
    return _mpp_from_resolution(props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit"))


def _mpp_from_resolution(res: Any, unit: Any) -> float | None:
    """Microns per pixel from a TIFF XResolution (pixels per unit) and ResolutionUnit."""
    if res in (None, "", 0):
        return None
    if isinstance(res, tuple):
        res = res[0] / res[1] if res[1] else 0
    try:
        res = float(res)
    except (TypeError, ValueError):
        return None
    unit = str(getattr(unit, "name", unit)).lower()
    per_unit = {"centimeter": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(unit)
    if per_unit is None or res <= 0:
        return None  # no unit: the resolution is not physical
    return per_unit / res


def _open_tifffile(path: Path) -> tuple[list[Any], float | None]:
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].pages[0] if tf.series else tf.pages[0]
        tags = page.tags
        res = tags.get("XResolution")
        unit = tags.get("ResolutionUnit")
        mpp = _mpp_from_resolution(res.value if res else None, unit.value if unit else None)
    z = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    levels = [z] if hasattr(z, "shape") else [z[k] for k in sorted(z.array_keys(), key=int)]
    fixed = []
    for lv in levels:
        if lv.ndim == 3 and lv.shape[0] in (3, 4) and lv.shape[-1] not in (3, 4):
            raise ValueError(f"{path.name!r} stores channels first; convert it to an (H, W, 3) RGB TIFF.")
        fixed.append(lv)
    return fixed, mpp


def read_slide(
    path: str | os.PathLike,
    microns_per_pixel: float | None = None,
    *,
    backend: str = "auto",
) -> Slide:
    """Open an H&E slide lazily: whole-slide formats through OpenSlide, TIFF through tifffile, plain images through PIL.

    - **Whole-slide images** (SVS, NDPI, MRXS, SCN, BIF, generic tiled / pyramidal TIFF...) are
      opened with OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel); regions are
      read on demand, the slide is never loaded whole.
    - **TIFF files OpenSlide cannot read** (e.g. untiled, or channels other than RGB) fall back to
      tifffile's zarr interface, also region by region, pyramid levels included.
    - **Plain JPEG / PNG** images cannot be read by region: they are decoded whole on first read.

    Microns per pixel come from the slide's metadata (``openslide.mpp-x``, else the TIFF
    resolution tags with a physical unit); a slide without them needs ``microns_per_pixel=``.

    Parameters
    ----------
    path
        The slide file.
    microns_per_pixel
        Microns per level-0 pixel; overrides the metadata (required when it has none).
    backend
        ``'auto'``, ``'openslide'``, ``'tifffile'`` or ``'pil'``.

    Returns
    -------
    A :class:`~imagene.io.Slide` (array-like, lazy).

    Examples
    --------
    >>> slide = imagene.io.read_slide("HE.svs")
    >>> grid = imagene.pp.spot_grid(slide, pitch_um=100)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Slide file {str(path)!r} does not exist.")
    if backend not in ("auto", "openslide", "tifffile", "pil"):
        raise ValueError(f"backend must be 'auto', 'openslide', 'tifffile' or 'pil'; got {backend!r}.")
    if microns_per_pixel is not None and not (np.isfinite(microns_per_pixel) and microns_per_pixel > 0):
        raise ValueError(f"microns_per_pixel must be a positive number; got {microns_per_pixel!r}.")
    suffix = path.suffix.lower()
    if backend == "auto":
        backend = "pil" if suffix in PLAIN_SUFFIXES else "openslide"
    mpp: float | None = None
    slide_args: tuple[str, Any, list[tuple[int, int]]]
    if backend == "openslide":
        import openslide

        try:
            handle = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            if suffix not in (".tif", ".tiff"):
                raise ValueError(
                    f"OpenSlide cannot read {path.name!r}. Convert it to a pyramidal TIFF, or pass a plain "
                    "JPEG / PNG / TIFF image."
                ) from None
            backend = "tifffile"
        else:
            mpp = _mpp_from_openslide(handle.properties)
            slide_args = ("openslide", handle, list(handle.level_dimensions))
    if backend == "tifffile":
        levels, mpp = _open_tifffile(path)
        slide_args = ("tifffile", levels, [(lv.shape[1], lv.shape[0]) for lv in levels])
    elif backend == "pil":
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as im:
            size = im.size
        slide_args = ("pil", {"image": None}, [size])
    if microns_per_pixel is not None:
        mpp = float(microns_per_pixel)
    if mpp is None:
        raise ValueError(
            f"The microns per pixel of {path.name!r} are not in its metadata. Pass them: "
            f"`imagene.io.read_slide({path.name!r}, microns_per_pixel=0.5)` (the scanner's resolution; "
            "about 0.25 at 40x and 0.5 at 20x)."
        )
    slide = Slide(path.resolve(), slide_args[0], slide_args[1], mpp, slide_args[2])
    logger.info("Opened %r", slide)
    return slide
