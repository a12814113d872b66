"""Virtual spots over the tissue of an H&E slide: tissue detection and spot grids."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import save_key

logger = logging.getLogger("imagene")


def _thumbnail(image: Any, max_px: int) -> tuple[np.ndarray, float]:
    if hasattr(image, "thumbnail") and hasattr(image, "level_dimensions"):
        return image.thumbnail(max_px)
    from imagene.io._image import as_rgb, downscale

    return downscale(as_rgb(np.asarray(image)), max_px)


def tissue_mask(
    image: Any,
    *,
    max_px: int = 1024,
    sigma: float = 2.0,
    min_object_fraction: float = 0.001,
    threshold: float | None = None,
) -> tuple[np.ndarray, float]:
    """Where the tissue is, on a low-resolution copy of the slide: Otsu on saturation.

    The method (the usual one of whole-slide tools): take a thumbnail (``max_px`` on its longest
    side, read from a coarse pyramid level), convert to HSV, smooth the saturation channel with a
    Gaussian of ``sigma`` thumbnail pixels, threshold it with Otsu's method (stained tissue is
    saturated, glass and background are grey or white), then drop objects smaller than
    ``min_object_fraction`` of the thumbnail and fill holes.

    Parameters
    ----------
    image
        A :class:`~imagene.io.Slide` (:func:`imagene.io.read_slide`) or an ``(H, W, 3)`` array.
    max_px
        Longest side of the thumbnail the mask is computed on.
    sigma
        Gaussian smoothing of the saturation, in thumbnail pixels.
    min_object_fraction
        Smallest tissue object kept, as a fraction of the thumbnail area.
    threshold
        Saturation threshold in [0, 1] instead of Otsu's.

    Returns
    -------
    ``(mask, scale)``: the boolean ``(h, w)`` mask and its pixels per level-0 pixel.

    Examples
    --------
    >>> mask, scale = imagene.pp.tissue_mask(imagene.io.read_slide("HE.svs"))
    """
    from scipy import ndimage
    from skimage.color import rgb2hsv
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects

    thumb, scale = _thumbnail(image, max_px)
    sat = gaussian(rgb2hsv(thumb)[..., 1], sigma=sigma)
    if threshold is None:
        threshold = float(threshold_otsu(sat)) if np.ptp(sat) > 0 else 1.0
    mask = sat > threshold
    mask = remove_small_objects(mask, max_size=max(1, int(min_object_fraction * mask.size)))
    mask = ndimage.binary_fill_holes(mask)
    logger.info("Tissue covers %.1f%% of the slide (saturation > %.3f)", 100 * mask.mean(), threshold)
    return mask, float(scale)


def _lattice(width: float, height: float, pitch: float, layout: str) -> np.ndarray:
    if layout == "square":
        xs = np.arange(pitch / 2, width, pitch)
        ys = np.arange(pitch / 2, height, pitch)
        gx, gy = np.meshgrid(xs, ys)
        return np.stack([gx.ravel(), gy.ravel()], axis=1)
    row = pitch * np.sqrt(3) / 2  # hexagonal: rows pitch·√3/2 apart, every other row shifted by half a pitch
    pts = []
    for i, y in enumerate(np.arange(pitch / 2, height, row)):
        xs = np.arange(pitch / 2 + (pitch / 2 if i % 2 else 0.0), width, pitch)
        pts.append(np.stack([xs, np.full_like(xs, y)], axis=1))
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def _disc_fraction(mask: np.ndarray, xy_mask: np.ndarray, radius_mask: float) -> np.ndarray:
    """Share of each spot's disc (centre and radius in mask pixels) that lies on tissue."""
    r = max(1, int(np.ceil(radius_mask)))
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    inside = (ox**2 + oy**2) <= max(radius_mask, 0.5) ** 2
    ox, oy = ox[inside], oy[inside]
    h, w = mask.shape
    cx = np.rint(xy_mask[:, 0]).astype(int)[:, None] + ox[None]
    cy = np.rint(xy_mask[:, 1]).astype(int)[:, None] + oy[None]
    ok = (cx >= 0) & (cy >= 0) & (cx < w) & (cy < h)
    vals = np.zeros(cx.shape, bool)
    vals[ok] = mask[cy[ok], cx[ok]]
    return vals.mean(1)


def spot_grid(
    slide: Any,
    *,
    pitch_um: float = 100.0,
    layout: Literal["hex", "square"] = "hex",
    spot_diameter_um: float = 55.0,
    positions: np.ndarray | None = None,
    only_tissue: bool = True,
    min_tissue_fraction: float = 0.5,
    library_id: str | None = None,
    hires_max_px: int = 2000,
    mask_kwargs: dict | None = None,
) -> AnnData:
    """Virtual spots over the tissue of a slide, as an AnnData without genes, ready for tiling.

    Spots lie on a hexagonal (Visium-like) or square lattice of ``pitch_um`` microns over the
    whole slide; those whose disc of ``spot_diameter_um`` is less than ``min_tissue_fraction`` on
    tissue (:func:`tissue_mask`) are dropped (``only_tissue``) or kept and flagged. The AnnData
    follows the scanpy / imagene spatial layout, so :func:`imagene.pp.extract_tiles`,
    :func:`imagene.pp.embed_tiles`, :func:`imagene.tl.predict_expression` and squidpy plots work
    on it: the slide itself is not loaded, only its path, microns per pixel and a thumbnail are
    stored, and tiles are read from the file region by region.

    Parameters
    ----------
    slide
        A :class:`~imagene.io.Slide` from :func:`imagene.io.read_slide` (or a path, opened with it).
    pitch_um
        Centre-to-centre distance of neighbouring spots (100 µm: Visium; 200 µm: legacy ST).
    layout
        ``'hex'`` or ``'square'``.
    spot_diameter_um
        Diameter of a spot (55 µm: Visium; 100 µm: legacy ST); sets the tissue test and
        ``scalefactors['spot_diameter_fullres']``.
    positions
        ``(n, 2)`` spot centres in level-0 pixels (x, y) to use instead of a lattice (e.g. the
        spots of a sequenced section).
    only_tissue
        Drop spots off tissue; ``False`` keeps them with ``obs['imagene_in_tissue'] == False``.
    min_tissue_fraction
        Share of the disc that must be on tissue.
    library_id
        Name of the slide in ``obs['section']`` and ``uns['spatial']`` (default: the file stem).
    hires_max_px
        Longest side of the thumbnail stored as ``images['hires']``.
    mask_kwargs
        Passed to :func:`tissue_mask`.

    Returns
    -------
    AnnData with ``n_vars = 0``: spot centres in ``obsm['spatial']`` (level-0 pixels, x, y);
    ``obs['section']``, ``obs['imagene_in_tissue']`` (bool) and ``obs['imagene_tissue_fraction']``;
    ``uns['spatial'][library_id]`` with ``images['hires']`` (thumbnail), ``scalefactors``
    (``microns_per_pixel``, ``tissue_hires_scalef``, ``spot_diameter_fullres``) and ``metadata``
    (``source_image_path``: the slide, read lazily by the tiler); ``uns['imagene_grid']`` with
    ``pitch_um``, ``layout`` and ``spot_diameter_um``.

    Examples
    --------
    >>> slide = imagene.io.read_slide("HE.svs")
    >>> grid = imagene.pp.spot_grid(slide, pitch_um=100, layout="hex", spot_diameter_um=55)
    >>> imagene.tl.predict_expression(model, grid)
    """
    from imagene.io._slide import Slide, read_slide

    if not isinstance(slide, Slide):
        slide = read_slide(slide)
    if layout not in ("hex", "square"):
        raise ValueError(f"layout must be 'hex' or 'square'; got {layout!r}.")
    if not (pitch_um > 0 and spot_diameter_um > 0):
        raise ValueError(f"pitch_um and spot_diameter_um must be positive; got {pitch_um}, {spot_diameter_um}.")
    if not 0 <= min_tissue_fraction <= 1:
        raise ValueError(f"min_tissue_fraction must be in [0, 1]; got {min_tissue_fraction}.")
    mpp = slide.microns_per_pixel
    h, w = slide.shape[:2]
    if positions is None:
        pitch_px = pitch_um / mpp
        xy = _lattice(w, h, pitch_px, layout)
    else:
        xy = np.asarray(positions, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
            raise ValueError("positions must be a finite (n, 2) array of level-0 pixel centres (x, y).")
        out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
        if out.any():
            raise ValueError(
                f"{int(out.sum())} of {len(xy)} positions lie outside the {w}x{h} slide; pass level-0 pixels (x, y)."
            )
    mask, mscale = tissue_mask(slide, **(mask_kwargs or {}))
    frac = _disc_fraction(mask, xy * mscale, spot_diameter_um / 2 / mpp * mscale)
    in_tissue = frac >= min_tissue_fraction
    if only_tissue and positions is None:
        xy, frac, in_tissue = xy[in_tissue], frac[in_tissue], in_tissue[in_tissue]
    if len(xy) == 0:
        raise ValueError(
            "No spot lies on tissue. Check the tissue mask (`imagene.pp.tissue_mask(slide)`), lower "
            "min_tissue_fraction, or pass `only_tissue=False`."
        )
    lib = str(library_id or slide.path.stem)
    hires, hscale = slide.thumbnail(hires_max_px)
    obs = pd.DataFrame(
        {
            "section": pd.Categorical([lib] * len(xy)),
            KEYS.IN_TISSUE: in_tissue,
            KEYS.TISSUE_FRACTION: frac.astype(np.float32),
        },
        index=pd.Index([f"spot_{i}" for i in range(len(xy))]),
    )
    grid = AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
    grid.obsm[KEYS.SPATIAL] = xy
    grid.uns["spatial"] = {
        lib: {
            "images": {"hires": hires},
            "scalefactors": {
                "microns_per_pixel": float(mpp),
                "tissue_hires_scalef": float(hscale),
                "spot_diameter_fullres": float(spot_diameter_um / mpp),
            },
            "metadata": {"platform": "imagene_grid", "source_image_path": str(slide.path), "source_image_scale": 1.0},
        }
    }
    save_key(grid, "uns", "imagene_grid", {"pitch_um": float(pitch_um), "layout": layout,
                                            "spot_diameter_um": float(spot_diameter_um)})
    logger.info(
        "%d virtual spots (%s, %g µm pitch) on %r, %d on tissue", len(xy), layout, pitch_um, slide.path.name,
        int(in_tissue.sum()),
    )
    return grid
