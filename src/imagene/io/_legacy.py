"""Reader for the legacy Spatial Transcriptomics format (counts tsv + spot table + H&E image)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS, SPOT_DIAMETER_UM, SPOT_PITCH_UM
from imagene._utils import check_counts, warn
from imagene._validate import check_image_file, lattice_regularity
from imagene.io._image import as_rgb, downscale, read_image_downscaled

logger = logging.getLogger("imagene")


def infer_microns_per_pixel(spatial: np.ndarray, pitch_um: float) -> float:
    """Infer microns per full-resolution pixel from the median nearest-spot distance and the array pitch.

    Parameters
    ----------
    spatial
        (n, 2) spot centres in full-resolution pixels.
    pitch_um
        Centre-to-centre spot distance of the platform (200 µm for legacy ST, 100 µm for Visium).
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(spatial, dtype=np.float64)
    if xy.shape[0] < 2:
        raise ValueError(
            "Cannot infer microns per pixel from fewer than 2 spots. Pass `microns_per_pixel=` explicitly."
        )
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise ValueError(
            f"Spot centres must be a finite (n, 2) array to infer microns per pixel; got shape {xy.shape}"
            f"{' with NaN or inf' if xy.ndim == 2 and not np.isfinite(xy).all() else ''}. Drop spots without "
            "coordinates, or pass `microns_per_pixel=` explicitly."
        )
    d, _ = cKDTree(xy).query(xy, k=2)
    nn = np.median(d[:, 1])
    if not np.isfinite(nn) or nn <= 0:
        raise ValueError(
            "Cannot infer microns per pixel: spots share coordinates. Pass `microns_per_pixel=` explicitly."
        )
    regular = lattice_regularity(d[:, 1])
    if regular < 0.5:
        raise ValueError(
            f"Cannot infer microns per pixel from these {xy.shape[0]} spots: their nearest-spot distances vary "
            f"(median {nn:.1f} px), so they do not sit on a full array of the platform's pitch (a sparse "
            f"subset, whose nearest spots are several {pitch_um:g} µm pitches apart, would give a wrong, too small "
            "value). Infer it on the whole section before subsetting, or pass `microns_per_pixel=` explicitly."
        )
    return float(pitch_um / nn)


def _spot_key(x: pd.Series, y: pd.Series) -> pd.Index:
    def fmt(v: pd.Series) -> pd.Series:
        v = pd.to_numeric(v)
        return v.round().astype(int).astype(str)

    return pd.Index(fmt(x) + "x" + fmt(y))


def read_legacy_st(
    counts: str | os.PathLike | pd.DataFrame,
    spots: str | os.PathLike | pd.DataFrame,
    image: str | os.PathLike | np.ndarray | None,
    *,
    library_id: str | None = None,
    microns_per_pixel: float | None = None,
    image_scale: float = 1.0,
    in_tissue_only: bool = True,
    hires_max_px: int = 2000,
) -> AnnData:
    """Read one section in the legacy Spatial Transcriptomics format.

    The counts table has one row per spot named ``"{x}x{y}"`` (array coordinates) and one column
    per gene; the spot table has columns ``x y pixel_x pixel_y`` (``selected`` optional), where
    ``pixel_x`` / ``pixel_y`` (finite numbers) are the column / row of the spot centre in the **full-resolution**
    H&E image. Rows are joined on ``f"{x}x{y}"``.

    Parameters
    ----------
    counts
        Path to the counts ``.tsv`` / ``.tsv.gz`` (spots × genes) or a DataFrame of it.
    spots
        Path to the spot table (``*_selection.tsv`` / ``alignment_table_*.tsv``) or a DataFrame.
    image
        Path to the H&E image (JPEG, PNG, TIFF) or an (H, W, 3) array; ``None`` for no image.
    library_id
        Name of the section; defaults to the counts file name without suffixes.
    microns_per_pixel
        Microns per full-resolution pixel. Inferred from the 200 µm spot pitch when not given.
    image_scale
        Pixels of ``image`` per full-resolution pixel: ``1.0`` for the full-size image, e.g.
        ``2000 / 6954`` for a 2000-px-wide copy of a 6954-px-wide slide.
    in_tissue_only
        Keep only spots with ``selected == 1`` when the spot table has that column.
    hires_max_px
        The image is stored in ``uns['spatial'][library_id]['images']['hires']`` downscaled to at
        most this many pixels per side (for plotting); tiles are cut from the full image.

    Returns
    -------
    AnnData with raw counts in ``X`` and ``layers['counts']`` (float32 CSR), spot centres in
    ``obsm['spatial']`` (full-resolution pixels), ``obs['array_x'|'array_y']``, and
    ``uns['spatial'][library_id]`` with ``images['hires']``, ``scalefactors``
    (``tissue_hires_scalef``, ``spot_diameter_fullres``, ``microns_per_pixel``) and ``metadata``
    (``source_image_path``, ``source_image_scale``, ``platform``).

    Examples
    --------
    >>> adata = imagene.io.read_legacy_st("B4.tsv.gz", "B4_selection.tsv", "BT10737_D2_HE.jpg")
    """
    if library_id is None:
        library_id = Path(counts).name.split(".")[0] if not isinstance(counts, pd.DataFrame) else "section"
    df = counts if isinstance(counts, pd.DataFrame) else pd.read_csv(counts, sep="\t", index_col=0)
    if df.shape[0] == 0:
        raise ValueError(f"Counts table of section {library_id!r} has no spots (empty section).")
    df = df.set_axis(df.index.astype(str), axis=0)  # a new frame: never rename the caller's rows
    non_numeric = [c for c, t in df.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if non_numeric:
        raise ValueError(
            f"Counts table of section {library_id!r} has non-numeric columns {non_numeric[:5]}; it must hold "
            "spots as rows (first column = spot id '{x}x{y}') and genes as columns of integer counts."
        )
    if df.index.has_duplicates:
        dup = df.index[df.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicated spot ids in the counts of section {library_id!r}: {dup}. Each spot must appear once.")
    tab = spots if isinstance(spots, pd.DataFrame) else pd.read_csv(spots, sep="\t")
    missing = {"x", "y", "pixel_x", "pixel_y"} - set(tab.columns)
    if missing:
        raise ValueError(f"Spot table of section {library_id!r} lacks columns {sorted(missing)}; expected x, y, pixel_x, pixel_y.")
    tab = tab.copy()
    coords = tab[["x", "y", "pixel_x", "pixel_y"]].apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(coords.to_numpy(dtype=np.float64)).all(1)
    if bad.any():
        raise ValueError(
            f"Spot table of section {library_id!r} has {int(bad.sum())} row(s) with missing or non-numeric x, y, "
            f"pixel_x or pixel_y (first at row {int(np.flatnonzero(bad)[0])}). Drop those rows "
            "(`spots = spots.dropna(subset=['x', 'y', 'pixel_x', 'pixel_y'])`) or fill in their coordinates."
        )
    tab.index = _spot_key(tab["x"], tab["y"])
    if in_tissue_only and "selected" in tab.columns:
        tab = tab[tab["selected"].astype(int) == 1]
    tab = tab[~tab.index.duplicated(keep="first")]
    keep = df.index.intersection(tab.index, sort=False)
    if len(keep) == 0:
        raise ValueError(
            f"No spot of the counts of section {library_id!r} matches the spot table on '{{x}}x{{y}}' "
            f"(counts rows look like {df.index[:3].tolist()}, table keys like {tab.index[:3].tolist()})."
        )
    if len(keep) < len(df):
        logger.info("Section %r: keeping %d of %d spots found in the spot table%s.", library_id, len(keep), len(df),
                    " and under tissue" if in_tissue_only and "selected" in tab.columns else "")
    df = df.loc[keep]
    tab = tab.loc[keep]

    values = df.to_numpy()
    check_counts(values, f"counts of section {library_id!r}")
    X = sp.csr_matrix(values.astype(np.float32))
    obs = pd.DataFrame(
        {"array_x": tab["x"].to_numpy(), "array_y": tab["y"].to_numpy()}, index=pd.Index(keep, name=None)
    )
    var = pd.DataFrame(index=df.columns.astype(str))
    adata = AnnData(X=X, obs=obs, var=var)
    if adata.var_names.has_duplicates:
        warn(f"Section {library_id!r} has duplicated gene names; making them unique (suffixes -1, -2, ...).")
        adata.var_names_make_unique()
    adata.layers[KEYS.COUNTS] = X.copy()
    adata.obsm[KEYS.SPATIAL] = tab[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)

    if microns_per_pixel is None:
        microns_per_pixel = infer_microns_per_pixel(adata.obsm[KEYS.SPATIAL], SPOT_PITCH_UM["legacy_st"])
        logger.info("Section %r: inferred %.3f µm per full-resolution pixel from the 200 µm spot pitch.",
                    library_id, microns_per_pixel)
    elif not (np.isfinite(microns_per_pixel) and microns_per_pixel > 0):
        raise ValueError(f"microns_per_pixel must be a positive number; got {microns_per_pixel!r}.")
    if not (np.isfinite(image_scale) and image_scale > 0):
        raise ValueError(f"image_scale must be a positive number; got {image_scale!r}.")

    spatial: dict = {
        "images": {},
        "scalefactors": {
            "tissue_hires_scalef": float(image_scale),
            "spot_diameter_fullres": SPOT_DIAMETER_UM["legacy_st"] / microns_per_pixel,
            "microns_per_pixel": float(microns_per_pixel),
        },
        "metadata": {"platform": "legacy_st", "source_image_path": "", "source_image_scale": float(image_scale)},
    }
    if image is not None:
        if isinstance(image, (str, os.PathLike)):
            check_image_file(image)
            spatial["metadata"]["source_image_path"] = str(Path(image).resolve())
            # the hires copy is decoded at reduced size; tiles are cut from the file later
            hires, s, shape = read_image_downscaled(image, hires_max_px)
        else:
            img = as_rgb(image, name=f"image of section {library_id!r}")
            shape = img.shape
            hires, s = downscale(img, hires_max_px)
            if s < 1.0:
                spatial["images"]["fullres"] = img  # an in-memory image larger than hires: keep it for tiling
        spatial["images"]["hires"] = hires
        spatial["scalefactors"]["tissue_hires_scalef"] = float(image_scale * s)
        _check_spots_in_image(adata.obsm[KEYS.SPATIAL] * image_scale, shape, library_id)
    adata.uns["spatial"] = {library_id: spatial}
    return adata


def _check_spots_in_image(xy: np.ndarray, shape: tuple[int, ...], library_id: str) -> None:
    h, w = shape[:2]
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if out.any():
        raise ValueError(
            f"{int(out.sum())} of {len(xy)} spots of section {library_id!r} lie outside its {w}x{h} image. "
            "Check that pixel_x / pixel_y refer to this image and that `image_scale` is the image's size "
            "relative to the full-resolution image (e.g. 2000 / full width for a downscaled copy)."
        )
