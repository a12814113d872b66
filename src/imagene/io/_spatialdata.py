"""Conversion between the imagene AnnData layout and :class:`spatialdata.SpatialData`."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import check_adata, check_obsm, warn
from imagene.io._image import as_rgb, downscale, open_lazy

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("imagene")

REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
_CHUNK_PX = 1024
_PYRAMID_MIN_PX = 1024  # multiscale levels are added (halving) while the next level stays at least this large


def to_spatialdata(adata: AnnData, *, library_key: str | None = None, table_key: str = "table") -> SpatialData:
    """Convert an AnnData in the imagene / scanpy spatial layout into a :class:`spatialdata.SpatialData`.

    Each section (library) ``lib`` becomes

    - an image element ``f"{lib}_image"`` (c, y, x): the best image available: the full-resolution
      source image (``metadata['source_image_path']``, read from file or zarr store), else
      ``images['fullres']``, else ``images['hires']``; multiscale when large, with a ``Scale``
      transformation mapping its pixels to full-resolution pixels in the coordinate system ``lib``;
    - a shapes element ``f"{lib}_spots"``: circles at ``obsm['spatial']`` with radius
      ``spot_diameter_fullres / 2`` (``Identity`` to coordinate system ``lib``);

    and a single table (a copy of ``adata``) annotating all ``*_spots`` elements through the
    ``obs`` columns ``"region"`` and ``"spot_id"``. The table keeps ``uns['spatial']`` scale factors
    and metadata but not the image arrays, which live as image elements. ``adata`` is not modified.

    Parameters
    ----------
    adata
        AnnData with ``obsm['spatial']`` (full-resolution pixels) and ``uns['spatial']``.
    library_key
        Column of ``obs`` naming each spot's section (an ``uns['spatial']`` key). Not needed for a
        single section; defaults to ``'section'`` (as written by :func:`imagene.io.concat`) when
        there are several.
    table_key
        Name of the table element.

    Returns
    -------
    SpatialData with images ``{lib}_image``, shapes ``{lib}_spots`` and the table ``table_key``.

    Examples
    --------
    >>> sdata = imagene.io.to_spatialdata(adata)
    >>> sdata.write("section.zarr")
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    check_adata(adata)
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or len(spatial) == 0:
        raise KeyError(
            "adata.uns['spatial'] not found or empty. Read the data with imagene.io.read_legacy_st / "
            "read_visium, or add uns['spatial'][library_id] with 'scalefactors' and 'images'."
        )
    xy = np.asarray(
        check_obsm(adata, KEYS.SPATIAL, "Spot centres in full-resolution pixels are required (x = column, y = row)."),
        dtype=np.float64,
    )
    for col in (REGION_KEY, INSTANCE_KEY):
        if col in adata.obs.columns:
            raise ValueError(
                f"adata.obs already has a column {col!r}, which the SpatialData table uses to link spots to shapes. "
                f"Rename it first, e.g. `adata.obs = adata.obs.rename(columns={{{col!r}: '{col}_'}})`."
            )
    labels = _library_labels(adata, library_key, spatial)

    images: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    region = np.empty(adata.n_obs, dtype=object)
    for lib, entry in spatial.items():
        mask = labels == lib
        if not mask.any():
            logger.info("Section %r of uns['spatial'] has no spots; it is left out.", lib)
            continue
        sf = entry.get("scalefactors", {})
        diameter = sf.get("spot_diameter_fullres")
        if diameter is None or not np.isfinite(diameter) or diameter <= 0:
            raise KeyError(
                f"uns['spatial'][{lib!r}]['scalefactors']['spot_diameter_fullres'] is missing or not positive; "
                "set it to the spot diameter in full-resolution pixels."
            )
        ids = np.flatnonzero(mask)
        shapes[f"{lib}_spots"] = ShapesModel.parse(
            xy[mask],
            geometry=0,
            radius=np.full(len(ids), float(diameter) / 2.0),
            index=pd.Index(ids, name=INSTANCE_KEY),
            transformations={lib: Identity()},
        )
        region[mask] = f"{lib}_spots"
        img, scale = _best_image(entry, lib)
        if img is None:
            warn(f"Section {lib!r} has no image; only its spots are written.")
            continue
        c, h, w = img.shape
        factors = []
        size = max(h, w)
        while size // 2 >= _PYRAMID_MIN_PX:
            factors.append(2)
            size //= 2
        images[f"{lib}_image"] = Image2DModel.parse(
            img,
            dims=("c", "y", "x"),
            transformations={lib: Scale([1.0 / scale, 1.0 / scale], axes=("y", "x"))},
            scale_factors=factors or None,
            chunks=(c, _CHUNK_PX, _CHUNK_PX),
        )

    table = _copy_without_images(adata)
    table.obs[REGION_KEY] = pd.Categorical(region, categories=list(shapes))
    table.obs[INSTANCE_KEY] = np.arange(adata.n_obs, dtype=np.int64)
    table = TableModel.parse(table, region=list(shapes), region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(images=images, shapes=shapes, tables={table_key: table})


def from_spatialdata(
    sdata: SpatialData,
    *,
    table_key: str = "table",
    library_key: str = KEYS.SECTION,
    hires_max_px: int = 2000,
) -> AnnData:
    """Convert a :class:`spatialdata.SpatialData` into an AnnData in the imagene / scanpy spatial layout.

    The inverse of :func:`to_spatialdata`. Each shapes element annotated by the table is a section
    ``lib`` (``f"{lib}_spots"`` or ``lib``); its image is ``f"{lib}_image"`` or, failing that, the
    largest image in the same coordinate system, whose units are taken as full-resolution pixels.
    Only a downscaled copy of the image is computed (from a coarser level of a multiscale image
    and/or by block averaging with dask), so large images are never loaded whole when the store is
    on disk: tiles are then cut lazily from the zarr store (``metadata['source_image_path']`` is
    the store, ``metadata['source_image_element']`` the image element).

    Parameters
    ----------
    sdata
        SpatialData with a table annotating shapes elements (spots) and, optionally, images.
    table_key
        Name of the table element.
    library_key
        Column of ``obs`` to write each spot's section into (categorical).
    hires_max_px
        Longest side of ``images['hires']``.

    Returns
    -------
    AnnData (a copy of the table) with ``obsm['spatial']`` (from the table, else the shape
    centroids), ``obs[library_key]`` and ``uns['spatial'][lib]`` with ``images['hires']``
    (plus ``images['fullres']`` when the image is not backed by a zarr store), ``scalefactors``
    and ``metadata``. The linking columns (region and instance keys) are dropped; shapes without
    a table row are ignored.

    Examples
    --------
    >>> import spatialdata
    >>> adata = imagene.io.from_spatialdata(spatialdata.read_zarr("section.zarr"))
    """
    if table_key not in sdata.tables:
        raise KeyError(f"SpatialData has no table {table_key!r} (tables: {list(sdata.tables)}); pass `table_key=`.")
    if not (isinstance(hires_max_px, (int, np.integer)) and hires_max_px > 0):
        raise ValueError(f"hires_max_px must be a positive integer; got {hires_max_px!r}.")
    table = sdata.tables[table_key]
    attrs = table.uns.get("spatialdata_attrs", {})
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    regions = attrs.get("region")
    if region_key is None or instance_key is None or regions is None:
        raise ValueError(
            f"Table {table_key!r} does not annotate any shapes element (no region / instance keys). "
            "Link it with `spatialdata.models.TableModel.parse(table, region=..., region_key=..., instance_key=...)`."
        )
    regions = [regions] if isinstance(regions, str) else list(regions)
    if table.n_obs == 0:
        raise ValueError(f"Table {table_key!r} has no rows.")

    adata = table.copy()
    region_of = adata.obs[region_key].astype(str).to_numpy()
    has_xy = KEYS.SPATIAL in adata.obsm
    xy = np.asarray(adata.obsm[KEYS.SPATIAL], dtype=np.float64) if has_xy else np.full((adata.n_obs, 2), np.nan)
    old_spatial = adata.uns.get("spatial", {}) if isinstance(adata.uns.get("spatial"), dict) else {}
    labels = np.empty(adata.n_obs, dtype=object)
    new_spatial: dict[str, dict] = {}
    for reg in regions:
        mask = region_of == reg
        if not mask.any():
            continue
        lib = reg[: -len("_spots")] if reg.endswith("_spots") else reg
        shapes = sdata.shapes.get(reg)
        if shapes is None and not has_xy:
            raise KeyError(
                f"Table {table_key!r} annotates {reg!r}, which is not a shapes element, and has no obsm['spatial']; "
                "add the shapes element or the spot coordinates."
            )
        cs = _coordinate_system(shapes, lib) if shapes is not None else lib
        if not has_xy:
            xy[mask] = _centroids(shapes, cs, adata.obs.loc[mask, instance_key], reg)
        entry = copy.deepcopy(old_spatial.get(lib, {}))
        sf = dict(entry.get("scalefactors", {}))
        meta = dict(entry.get("metadata", {}))
        imgs = dict(entry.get("images", {}))
        if "spot_diameter_fullres" not in sf and shapes is not None and "radius" in shapes.columns:
            sf["spot_diameter_fullres"] = 2.0 * float(np.median(shapes["radius"])) * _shapes_scale(shapes, cs)
        name = _find_image(sdata, lib, cs)
        if name is None:
            warn(f"No image element found for section {lib!r}; it has no image.")
        else:
            element = sdata.images[name]
            hires, hires_scalef, src_scale = _downscaled_image(element, cs, hires_max_px)
            imgs = {"hires": hires}
            sf["tissue_hires_scalef"] = hires_scalef
            meta["source_image_scale"] = src_scale
            meta.setdefault("platform", "unknown")
            if sdata.path is not None and f"images/{name}" in sdata.elements_paths_on_disk():
                meta["source_image_path"] = str(Path(sdata.path).resolve())
                meta["source_image_element"] = name
            else:
                logger.info("Image %r is not stored on disk; keeping it in memory as images['fullres'].", name)
                imgs["fullres"] = _to_rgb(_levels(element)[0].data)
                meta["source_image_path"] = ""
                meta.pop("source_image_element", None)
        if "microns_per_pixel" not in sf:
            warn(
                f"Section {lib!r} has no scalefactors['microns_per_pixel']; set "
                f"adata.uns['spatial'][{lib!r}]['scalefactors']['microns_per_pixel'] (µm per full-resolution pixel)."
            )
        new_spatial[lib] = {"images": imgs, "scalefactors": sf, "metadata": meta}
        labels[mask] = lib

    keep = pd.notna(labels)
    if not keep.all():
        logger.info("Dropping %d table rows that annotate no listed region.", int((~keep).sum()))
        adata = adata[keep].copy()
        xy, labels = xy[keep], labels[keep]
    if np.isnan(xy).any():
        raise ValueError("Some spots have no coordinates; add obsm['spatial'] to the table or the missing shapes.")
    adata.obsm[KEYS.SPATIAL] = xy
    adata.obs = adata.obs.drop(columns=[c for c in (region_key, instance_key) if c in adata.obs.columns])
    adata.obs[library_key] = pd.Categorical(labels.astype(str), categories=list(new_spatial))
    adata.uns.pop("spatialdata_attrs", None)
    adata.uns["spatial"] = new_spatial
    return adata


# --------------------------------------------------------------------------------------------- helpers


def _library_labels(adata: AnnData, library_key: str | None, spatial: dict) -> np.ndarray:
    libs = list(spatial)
    if library_key is None:
        if len(libs) == 1:
            return np.full(adata.n_obs, libs[0], dtype=object)
        if KEYS.SECTION not in adata.obs:
            raise ValueError(
                f"uns['spatial'] holds several sections {libs}; pass `library_key=` naming the obs column of sections."
            )
        library_key = KEYS.SECTION
    if library_key not in adata.obs:
        raise KeyError(f"adata.obs[{library_key!r}] not found; pass the obs column naming each spot's section.")
    labels = adata.obs[library_key].astype(str).to_numpy(dtype=object)
    unknown = sorted(set(labels) - set(libs))
    if unknown:
        raise ValueError(
            f"Sections {unknown[:5]} of obs[{library_key!r}] have no uns['spatial'] entry ({libs}); "
            "the section names must match the uns['spatial'] keys."
        )
    return labels


def _copy_without_images(adata: AnnData) -> AnnData:
    """Copy of ``adata`` whose ``uns['spatial']`` entries lack ``images`` (never copies the images)."""
    uns = {k: v for k, v in adata.uns.items() if k != "spatial"}
    uns["spatial"] = {
        lib: {k: v for k, v in entry.items() if k != "images"} for lib, entry in adata.uns["spatial"].items()
    }
    shallow = AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        uns=uns,
        obsm=dict(adata.obsm),
        varm=dict(adata.varm),
        layers=dict(adata.layers),
        obsp=dict(adata.obsp),
        varp=dict(adata.varp),
    )
    if adata.raw is not None:
        shallow.raw = adata.raw.to_adata()
    return shallow.copy()  # deep copy: nothing is shared with the caller's object


def _best_image(entry: dict, lib: str) -> tuple[Any, float] | tuple[None, None]:
    """The largest image available for a section as (c, y, x) and its pixels per full-resolution pixel."""
    meta = entry.get("metadata", {})
    images = entry.get("images", {})
    sf = entry.get("scalefactors", {})
    src = meta.get("source_image_path", "")
    img, scale = None, None
    if src:
        if Path(src).exists():
            img = open_lazy(src, meta.get("source_image_element") or None)
            scale = float(meta.get("source_image_scale", 1.0))
        else:
            warn(f"Source image {src!r} of section {lib!r} does not exist; using the in-memory image instead.")
    if img is None and images.get("fullres") is not None:
        img, scale = images["fullres"], float(meta.get("source_image_scale", 1.0))
    if img is None and images.get("hires") is not None:
        if "tissue_hires_scalef" not in sf:
            raise KeyError(f"uns['spatial'][{lib!r}]['scalefactors']['tissue_hires_scalef'] is missing.")
        img, scale = images["hires"], float(sf["tissue_hires_scalef"])
    if img is None:
        return None, None
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"The image scale of section {lib!r} must be positive; got {scale!r}.")
    if isinstance(img, np.ndarray):
        img = as_rgb(img, name=f"image of section {lib!r}")
    else:  # dask array (H, W, C) from a lazily opened file
        if img.ndim != 3 or img.shape[-1] not in (3, 4):
            raise ValueError(f"The source image of section {lib!r} must be (H, W, 3|4); got {img.shape}.")
        img = img[..., :3]
        if img.dtype != np.uint8:
            warn(f"The source image of section {lib!r} is {img.dtype}; clipping it to uint8.")
            img = img.clip(0, 255).astype(np.uint8)
    return img.transpose(2, 0, 1), scale


def _levels(element: Any) -> list[Any]:
    """The DataArrays of an image element, finest first (one for a single-scale image)."""
    if hasattr(element, "children") and len(element.children):
        names = sorted(element.children, key=lambda k: int(str(k).removeprefix("scale")) if str(k)[5:].isdigit() else 0)
        return [next(iter(element[k].values())) for k in names]
    return [element]


def _scale_to(arr: Any, cs: str, what: str) -> tuple[float, float]:
    """(sx, sy) of an axis-aligned scaling from the element's pixels to coordinate system ``cs``."""
    from spatialdata.transformations import get_transformation

    t = get_transformation(arr, to_coordinate_system=cs)
    m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)
    if abs(m[0, 1]) > 1e-9 or abs(m[1, 0]) > 1e-9 or abs(m[0, 2]) > 1e-6 or abs(m[1, 2]) > 1e-6:
        raise ValueError(
            f"The transformation of {what} to coordinate system {cs!r} is not a pure scaling ({t}); "
            "only scalings are supported. Transform the image first (spatialdata.transform)."
        )
    if m[0, 0] <= 0 or m[1, 1] <= 0:
        raise ValueError(f"The transformation of {what} to {cs!r} must scale by positive factors; got {t}.")
    return float(m[0, 0]), float(m[1, 1])


def _downscaled_image(element: Any, cs: str, max_px: int) -> tuple[np.ndarray, float, float]:
    """Compute only a downscaled copy of an image element: (hires, hires px per cs unit, level-0 px per cs unit)."""
    import dask.array as da

    levels = _levels(element)
    base_sx, base_sy = _scale_to(levels[0], cs, "the image")
    if abs(base_sx - base_sy) > 1e-3 * base_sx:
        warn(f"The image has anisotropic pixels ({base_sx:g} x {base_sy:g}); using the x scale.")
    chosen = levels[0]
    for lev in levels[1:]:
        if max(lev.shape[1:]) >= max_px:
            chosen = lev
    sx, _ = _scale_to(chosen, cs, "the image")
    data = chosen.data if isinstance(chosen.data, da.Array) else da.from_array(np.asarray(chosen.data))
    f = max(1, int(max(data.shape[1:]) // max_px))
    if f > 1:
        data = da.coarsen(np.mean, data.astype(np.float32), {1: f, 2: f}, trim_excess=True)
    small = _to_rgb(data, like=chosen.dtype)
    hires, s = downscale(small, max_px)
    return hires, float(s / f / sx), float(1.0 / base_sx)


def _to_rgb(data: Any, like: Any = None) -> np.ndarray:
    """Compute a (c, y, x) array into an (H, W, 3) uint8 image."""
    arr = np.asarray(data.compute() if hasattr(data, "compute") else data)
    arr = np.moveaxis(arr, 0, -1)
    if (like is not None and np.dtype(like) == np.uint8) or arr.dtype == np.uint8:
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return as_rgb(arr, name="image element")


def _coordinate_system(shapes: Any, lib: str) -> str:
    from spatialdata.transformations import get_transformation

    systems = list(get_transformation(shapes, get_all=True))
    if lib in systems:
        return lib
    if "global" in systems:
        return "global"
    return systems[0]


def _shapes_scale(shapes: Any, cs: str) -> float:
    sx, sy = _scale_to(shapes, cs, "the shapes")
    return (sx + sy) / 2.0


def _centroids(shapes: Any, cs: str, ids: pd.Series, region: str) -> np.ndarray:
    from spatialdata import get_centroids

    cent = get_centroids(shapes, coordinate_system=cs).compute()
    missing = ~pd.Index(ids).isin(cent.index)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} table rows point to instances missing from shapes {region!r} "
            f"(e.g. {pd.Index(ids)[missing][:3].tolist()}); the table and the shapes do not match."
        )
    return cent.loc[ids.to_numpy(), ["x", "y"]].to_numpy(dtype=np.float64)


def _find_image(sdata: SpatialData, lib: str, cs: str) -> str | None:
    from spatialdata.transformations import get_transformation

    if f"{lib}_image" in sdata.images:
        return f"{lib}_image"
    best, best_px = None, -1
    for name, element in sdata.images.items():
        if cs not in get_transformation(element, get_all=True):
            continue
        px = int(np.prod(_levels(element)[0].shape[1:]))
        if px > best_px:
            best, best_px = name, px
    return best


def predictions_to_spatialdata(
    adata: AnnData,
    sdata: SpatialData | None = None,
    *,
    table_key: str = "imagene_predictions",
    library_key: str | None = None,
    add_image: bool = True,
) -> SpatialData:
    """Put predictions (e.g. of a slide grid) into a new or an existing :class:`spatialdata.SpatialData`.

    ``adata`` is what :func:`imagene.tl.predict_expression` returns (or a query it wrote into):
    spots with ``obsm['spatial']``, ``uns['spatial']`` and the prediction layers. The elements are
    those of :func:`to_spatialdata`: per section a shapes element ``f"{lib}_spots"`` (circles of the
    spot diameter), the section image ``f"{lib}_image"`` (the slide itself, multiscale, read lazily
    from its file) and one table ``table_key`` annotating the shapes, with the predictions in
    ``X`` and ``layers`` (``imagene_predicted``, ``imagene_predicted_sd``) and the flags in ``obs``.
    spatialdata-plot then shows them, e.g.
    ``sdata.pl.render_images(f"{lib}_image").pl.render_shapes(f"{lib}_spots", color="ERBB2", table_name=table_key).pl.show()``.

    Parameters
    ----------
    adata
        Spots with predictions.
    sdata
        SpatialData to add the elements to (``None``: a new one). Elements of the same name are
        not overwritten: an image already there is kept, shapes are renamed ``f"{lib}_spots_imagene"``.
    table_key
        Name of the table; must not exist in ``sdata``.
    library_key
        ``obs`` column of sections (see :func:`to_spatialdata`).
    add_image
        Add the section images (``False``: only shapes and table).

    Returns
    -------
    The SpatialData (``sdata`` itself when given).

    Examples
    --------
    >>> out = imagene.tl.predict_expression(model, grid)
    >>> sdata = imagene.io.predictions_to_spatialdata(out)
    >>> sdata.write("predictions.zarr")
    """
    from spatialdata.models import TableModel

    new = to_spatialdata(adata, library_key=library_key, table_key=table_key)
    if sdata is None:
        if not add_image:
            for name in list(new.images):
                del new.images[name]
        return new
    if table_key in sdata.tables:
        raise ValueError(f"sdata already has a table {table_key!r}; pass another `table_key=`.")
    table = new.tables[table_key]
    rename = {name: (f"{name}_imagene" if name in sdata.shapes else name) for name in new.shapes}
    for old, name in rename.items():
        sdata.shapes[name] = new.shapes[old]
    if add_image:
        for name, image in new.images.items():
            if name not in sdata.images:
                sdata.images[name] = image
    attrs = table.uns.pop("spatialdata_attrs")
    table.obs[REGION_KEY] = pd.Categorical(
        table.obs[REGION_KEY].astype(str).map(rename), categories=[rename[r] for r in new.shapes]
    )
    sdata.tables[table_key] = TableModel.parse(
        table, region=[rename[r] for r in new.shapes], region_key=attrs["region_key"],
        instance_key=attrs["instance_key"],
    )
    logger.info("Added table %r and shapes %s to the SpatialData", table_key, sorted(rename.values()))
    return sdata
