"""Input checks shared by readers, preprocessing and models: each names the problem and the fix.

Every check here only reads its inputs; none writes to an AnnData.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from imagene._utils import warn

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("imagene")

#: a tile counts as glass when fewer than this fraction of its pixels are tissue
GLASS_TILE_TISSUE = 0.05
#: more than this fraction of glass tiles is an error (a warning above 3 %, where correct sections have none)
GLASS_TILES_ERROR = 0.5
GLASS_TILES_WARN = 0.03
#: measured spot pitch below this fraction of the platform's pitch means another coordinate scale
PITCH_RATIO_MIN = 0.7
#: a validation set needs this many spots for a retrieval metric (recall@5 %) to rank anything
MIN_VALIDATION_SPOTS = 20


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------
def check_int(name: str, value: Any, minimum: int = 1, *, hint: str = "") -> int:
    """Return ``value`` as an int, raising unless it is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer; got {value!r} ({type(value).__name__}). {hint}".strip())
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value}. {hint}".strip())
    return int(value)


def check_max_epochs(max_epochs: Any) -> int:
    """``max_epochs`` must be a whole number of epochs >= 1 (0 would leave random weights, -1 trains unbounded)."""
    return check_int(
        "max_epochs", max_epochs, 1,
        hint="Pass a whole number of passes over the data, e.g. `max_epochs=50` (0 trains nothing, -1 never stops).",
    )


def check_positive_float(name: str, value: Any) -> float:
    """A finite number > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number; got {value!r}.") from None
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"`{name}` must be positive and finite; got {value!r}. Pass e.g. `{name}=112`.")
    return v


# ---------------------------------------------------------------------------------------------
# AnnData
# ---------------------------------------------------------------------------------------------
def check_unique_obs_names(adata: AnnData) -> None:
    """Refuse duplicated ``obs_names``: results keyed by spot (tiles, graphs, predictions) would be ambiguous."""
    if adata.obs_names.has_duplicates:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise ValueError(
            f"adata.obs_names has {len(dup)} duplicated name(s), e.g. {dup[:3].tolist()}: spots must be unique. "
            "Call `adata.obs_names_make_unique()` (or concatenate sections with `imagene.io.concat`, which suffixes "
            "each name with its section)."
        )


def check_spatial(adata: AnnData, key: str) -> np.ndarray:
    """Return ``obsm[key]`` as a float (n_obs, 2) array, refusing other widths and non-finite values."""
    if key not in adata.obsm:
        raise KeyError(f"adata.obsm[{key!r}] not found. Spot centres (x = column, y = row, in pixels) are required.")
    xy = np.asarray(adata.obsm[key])
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(
            f"adata.obsm[{key!r}] has shape {xy.shape}; imagene needs 2-D spot centres (n_obs, 2): x = column, "
            f"y = row. Keep the two image axes, e.g. `adata.obsm[{key!r}] = adata.obsm[{key!r}][:, :2]`."
        )
    xy = xy.astype(np.float64, copy=False)
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        raise ValueError(
            f"adata.obsm[{key!r}] has {int(bad.sum())} spot(s) with NaN or inf coordinates, e.g. "
            f"{adata.obs_names[bad][:3].tolist()}. Drop them (`adata = adata[np.isfinite(adata.obsm[{key!r}]).all(1)]"
            ".copy()`) or fix their coordinates."
        )
    return xy


def check_counts_values(mat: Any, where: str = "counts") -> None:
    """Raise if ``mat`` has NaN, inf, negative or non-integer values; every stored value is checked."""
    import scipy.sparse as sp

    data = mat.data if sp.issparse(mat) else np.asarray(mat)
    data = np.asarray(data).ravel()
    if data.size == 0:
        return
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise TypeError(f"{where} has dtype {data.dtype}; raw counts must be numbers.")
    if np.issubdtype(data.dtype, np.integer):
        if (data < 0).any():
            raise ValueError(f"{where} contains negative values; raw counts are required (pass the raw counts layer).")
        return
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(
            f"{where} contains {n_nan} NaN and {n_inf} inf value(s); raw counts are required. Fill or drop them "
            "first (e.g. drop the spots or genes that hold them)."
        )
    if (data < 0).any():
        raise ValueError(f"{where} contains negative values; raw counts are required (pass the raw counts layer).")
    frac = data != np.round(data)
    if frac.any():
        raise ValueError(
            f"{where} contains {int(frac.sum())} non-integer value(s) (e.g. {float(data[frac][0])}); raw counts are "
            "required, not normalised data. Pass the raw counts layer (e.g. `layer='counts'`)."
        )


def as_categorical_codes(values: Any) -> Any:
    """A categorical view of a section column (strings, numbers or categories), never touching the column."""
    import pandas as pd

    return pd.Categorical(pd.Series(values).astype(str))


# ---------------------------------------------------------------------------------------------
# geometry of spots on their image
# ---------------------------------------------------------------------------------------------
def nearest_spot_distances(xy: np.ndarray) -> np.ndarray:
    """Distance of each spot to its nearest other spot (pixels)."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return d[:, 1]


def lattice_regularity(nn: np.ndarray) -> float:
    """Fraction of spots whose nearest neighbour lies within 15 % of the median distance (1 on a full array).

    A sparse subset of an array has nearest spots one, two or more pitches apart: its regularity is
    low, and so is its 10th percentile against its median; either returns 0 here.
    """
    med = np.median(nn)
    if not np.isfinite(med) or med <= 0:
        return 0.0
    if np.percentile(nn, 10) < 0.85 * med:
        return 0.0
    return float(np.mean(np.abs(nn - med) <= 0.15 * med))


def check_spot_pitch(xy: np.ndarray, mpp: float, pitch_um: float, lib: str, spatial_key: str) -> None:
    """Spots packed more densely than the platform allows: coordinates in another scale than ``mpp``."""
    if xy.shape[0] < 10:
        return
    nn = nearest_spot_distances(xy)
    if lattice_regularity(nn) < 0.5:
        return  # a sparse or irregular subset: the pitch is not measurable
    measured = float(np.median(nn)) * mpp
    if measured < PITCH_RATIO_MIN * pitch_um:
        raise ValueError(
            f"Spots of section {lib!r} are {measured:.1f} µm apart (median nearest spot: {np.median(nn):.1f} px at "
            f"{mpp:.3g} µm/px), but the platform's spot pitch is {pitch_um:g} µm: obsm[{spatial_key!r}] looks like "
            "it is in another scale than the image (e.g. lowres or hires coordinates with a full-resolution image). "
            "Convert the coordinates to full-resolution pixels (divide by the tissue_lowres_scalef / "
            "tissue_hires_scalef), or fix microns_per_pixel; pass `check_scale=False` to skip this check."
        )


def tissue_mask(image: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of stained tissue: coloured pixels (H&E is pink and purple), not grey or white
    glass, fiducials or a black background."""
    img = np.asarray(image[..., :3], dtype=np.int16)
    mx, mn = img.max(-1), img.min(-1)
    return ((mx - mn) >= 20) & (mx >= 35)


def _window_tissue(mask: np.ndarray, xy: np.ndarray, r: int) -> np.ndarray:
    """Tissue fraction of the (2r+1)-pixel square around each point of the mask (integral image)."""
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), dtype=np.int64)
    ii[1:, 1:] = np.cumsum(np.cumsum(mask, 0), 1)
    x = np.round(xy[:, 0]).astype(np.int64)
    y = np.round(xy[:, 1]).astype(np.int64)
    x0, x1 = np.clip(x - r, 0, w), np.clip(x + r + 1, 0, w)
    y0, y1 = np.clip(y - r, 0, h), np.clip(y + r + 1, 0, h)
    area = (2 * r + 1) ** 2  # outside the image counts as glass (tiles are padded with white)
    s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return s / area


def thumbnail(adata: AnnData, lib: str, image: Any) -> tuple[np.ndarray, float] | None:
    """A small in-memory copy of a section's image and its scale (thumbnail px per full-resolution px).

    Uses the ``hires`` / ``lowres`` image of ``uns['spatial']`` (the one that is not blank) or strides
    an in-memory image; ``None`` when only a lazy image is at hand (reading it whole is not cheap).
    """
    entry = adata.uns.get("spatial", {}).get(lib, {}) if image is None else {}
    images, sf = entry.get("images", {}), entry.get("scalefactors", {})
    for name in ("hires", "lowres"):
        img, key = images.get(name), f"tissue_{name}_scalef"
        if img is not None and key in sf and np.asarray(img).ndim == 3 and np.ptp(np.asarray(img)[::8, ::8]) > 0:
            return np.asarray(img), float(sf[key])
    if image is None and "fullres" in images:
        image = images["fullres"]
    lazy = type(image).__module__.split(".")[0] in ("dask", "zarr")
    if image is None or lazy or isinstance(image, str | os.PathLike):
        return None
    arr = np.asarray(image)
    if arr.ndim != 3:
        return None
    step = max(1, int(np.ceil(max(arr.shape[:2]) / 1500)))
    return arr[::step, ::step], 1.0 / step


def check_tissue_content(
    thumb: np.ndarray, scale: float, xy: np.ndarray, tile_px_full: float, lib: str, spatial_key: str
) -> None:
    """Refuse tiles that land mostly on glass (coordinates in another scale, or x and y swapped).

    Parameters
    ----------
    thumb, scale
        Thumbnail of the section and its pixels per full-resolution pixel.
    xy
        (n, 2) spot centres in full-resolution pixels.
    tile_px_full
        Side of a tile in full-resolution pixels.
    """
    t = xy * scale
    if (t < 0).any() or (t[:, 0] >= thumb.shape[1]).any() or (t[:, 1] >= thumb.shape[0]).any():
        return  # spots outside the image: the tiler's own check says so, with its fix
    mask = tissue_mask(thumb)
    if mask.mean() > 0.95 or mask.mean() < 0.005:
        return  # no glass to tell tiles apart (a crop of tissue) or no visible tissue: nothing to compare
    r = max(1, int(round(0.5 * tile_px_full * scale)))
    glass = float(np.mean(_window_tissue(mask, xy * scale, r) < GLASS_TILE_TISSUE))
    if glass <= GLASS_TILES_WARN:
        return
    swapped = float(np.mean(_window_tissue(mask, xy[:, ::-1] * scale, r) < GLASS_TILE_TISSUE))
    if swapped < glass / 3:
        raise ValueError(
            f"{100 * glass:.0f}% of the tiles of section {lib!r} would be glass, but only {100 * swapped:.0f}% with x "
            f"and y exchanged: obsm[{spatial_key!r}] looks like (row, column). Store (x = column, y = row): "
            f"`adata.obsm[{spatial_key!r}] = adata.obsm[{spatial_key!r}][:, ::-1].copy()`; pass `check_scale=False` "
            "to skip this check."
        )
    msg = (
        f"{100 * glass:.0f}% of the tiles of section {lib!r} would be glass (under {100 * GLASS_TILE_TISSUE:.0f}% "
        f"tissue): obsm[{spatial_key!r}] does not follow the tissue of its image (coordinates in another scale, "
        "another image, or spots off the tissue). Convert the coordinates to full-resolution pixels of this image, "
        "keep only spots under tissue, or pass `check_scale=False` to skip this check."
    )
    if glass > GLASS_TILES_ERROR:
        raise ValueError(msg)
    warn(msg)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def feature_provenance(adata: AnnData, key: str) -> dict | None:
    """The ``uns[key]`` record written by :func:`imagene.pp.embed_tiles` (encoder, weights, input_px), if any."""
    rec = adata.uns.get(key)
    if not isinstance(rec, dict) or "encoder" not in rec:
        return None
    keys = ("encoder", "weights", "input_px")
    out = {k: (str(rec[k]) if k != "input_px" else int(rec[k])) for k in keys if k in rec}
    if "/" in out.get("weights", "") or "\\" in out.get("weights", ""):
        # a checkpoint file: the same weights live at another path on another machine (a model trained here and
        # applied there), so the file name is what is compared
        out["weights"] = os.path.basename(out["weights"].replace("\\", "/"))
    return out


def check_feature_provenance(expected: dict | None, adata: AnnData, key: str) -> None:
    """Refuse a query whose image features come from another encoder (or input size) than the model's."""
    got = feature_provenance(adata, key)
    if expected is None or got is None:
        return
    diff = {k: (expected[k], got[k]) for k in expected if k in got and expected[k] != got[k]}
    if diff:
        what = ", ".join(f"{k} {v[1]!r} (model: {v[0]!r})" for k, v in diff.items())
        raise ValueError(
            f"adata.obsm[{key!r}] was embedded with {what}: its features are not comparable with the model's. "
            "Re-embed the query's tiles as for training: `imagene.pp.embed_tiles(adata, "
            f"encoder={expected.get('encoder')!r}, input_px={expected.get('input_px')!r})`."
        )


def check_validation_size(n_val: int, what: str = "validation set") -> None:
    """Refuse validation sets too small for recall@5 % to rank anything (one spot scores 1 by construction)."""
    if 0 < n_val < MIN_VALIDATION_SPOTS:
        raise ValueError(
            f"The {what} has only {n_val} spot(s): recall@5% over so few spots is 1 by construction and early stopping "
            f"would watch a constant. Hold out a section of at least {MIN_VALIDATION_SPOTS} spots "
            "(`validation_sections=[...]`), or drop the small section before setup."
        )


def check_model_dir(dir_path: Any) -> None:
    """A saved model is a folder holding ``model.pt``."""
    path = os.fspath(dir_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Model folder {path!r} does not exist. Pass the folder written by `model.save(dir_path)` "
            "(it holds model.pt)."
        )
    if not os.path.isfile(os.path.join(path, "model.pt")):
        raise FileNotFoundError(
            f"{path!r} holds no model.pt: it is not a folder written by `model.save(dir_path)`. Pass that folder."
        )


def check_gene_sets_measured(adatas: dict, join: str) -> None:
    """Warn that an outer join fills genes a section never measured with zero counts."""
    if join != "outer":
        return
    sets = {lib: set(map(str, a.var_names)) for lib, a in adatas.items()}
    union = set().union(*sets.values())
    missing = {lib: len(union - s) for lib, s in sets.items() if len(union - s)}
    if missing:
        warn(
            f"join='outer' of sections with different genes: {missing} gene(s) per section were never measured there "
            "and become zero counts, which models would train on as true zeros. Use join='inner' (genes measured in "
            "every section) or subset every section to shared genes first."
        )


# ---------------------------------------------------------------------------------------------
# image files
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def decode_errors(path: Any):
    """Turn a decoder's ``OSError`` (truncated or corrupt file) into one that names the file and the fix."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        raise OSError(
            f"Could not decode image file {os.fspath(path)!r} ({type(e).__name__}: {e}): the file looks truncated "
            "or corrupt. Download or export it again (compare its size with the original)."
        ) from e


def check_image_file(path: Any) -> None:
    """Refuse at read time an image file that tiling would refuse later (TIFFs that are not 8-bit)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"Image file {p!r} does not exist.")
    if p.lower().endswith((".tif", ".tiff", ".svs")):
        import tifffile

        with decode_errors(p), tifffile.TiffFile(p) as tif:
            dtype = np.dtype(tif.series[0].dtype)
        if dtype != np.uint8:
            raise ValueError(
                f"Image file {p!r} has dtype {dtype}; tiles are cut from 8-bit RGB images, and TIFFs are read lazily "
                "as they are. Convert it to 8-bit first, e.g. `tifffile.imwrite('he_8bit.tif', (tifffile.imread(path) "
                "// 257).astype('uint8'))` for 16-bit, and pass that file."
            )


def ddp_world_size(strategy: Any, devices: Any, num_nodes: Any = 1) -> int:
    """Number of processes a data-parallel Lightning run splits each epoch over (1 without DDP)."""
    name = strategy if isinstance(strategy, str) else type(strategy).__name__.lower() if strategy is not None else ""
    if "ddp" not in str(name).lower():
        return 1
    if isinstance(devices, int | numbers.Integral) and not isinstance(devices, bool) and devices > 0:
        n = int(devices)
    elif isinstance(devices, list | tuple):
        n = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        n = int(devices)
    else:
        n = 1
    return max(1, n * int(num_nodes or 1))


def check_hub_reachable(what: str, timeout: float = 3.0) -> None:
    """Raise ``OSError`` at once when the Hugging Face hub cannot be reached, instead of after the hub client's retries.

    Skipped when ``HF_HUB_OFFLINE`` is set (the hub client then fails at once by itself) and behind
    a proxy (``HTTPS_PROXY``), where a direct connection says nothing.
    """
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return
    if _hub_cached(what):
        return  # the hub client falls back to the local copy
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise OSError(
            f"The Hugging Face hub ({host}:{port}) is not reachable ({type(e).__name__}: {e}), so {what!r} cannot be "
            "downloaded."
        ) from e


def _hub_cached(what: str) -> bool:
    """Whether the hub repository of ``what`` (``'hf-hub:owner/name'`` or a timm model name) is cached locally."""
    repo = what.removeprefix("hf-hub:") if what.startswith("hf-hub:") else None
    if repo is None:
        try:
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(what)
            repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        except Exception:  # noqa: BLE001 - an unknown name has no cache either
            repo = None
    if not repo:
        return False
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return False
    return os.path.isdir(os.path.join(HF_HUB_CACHE, "models--" + repo.split("@")[0].replace("/", "--")))


# ---------------------------------------------------------------------------------------------
# renamed arguments
# ---------------------------------------------------------------------------------------------
def renamed_kwarg(new: str, new_value: Any, old: str, old_value: Any, *, where: str = "") -> Any:
    """The value of a renamed keyword argument, accepting its old name with a :class:`FutureWarning`.

    Parameters
    ----------
    new, new_value
        The current name and the value passed under it (``None``: not passed).
    old, old_value
        The old name and the value passed under it (``None``: not passed).
    where
        The function, for the message.

    Returns
    -------
    ``new_value``, or ``old_value`` when only the old name was used.

    Examples
    --------
    >>> renamed_kwarg("library_key", "section", "batch_key", None)
    'section'
    """
    if old_value is None:
        return new_value
    at = f" of {where}" if where else ""
    if new_value is not None and new_value != old_value:
        raise TypeError(f"`{old}`{at} was renamed `{new}`: pass only `{new}=` (got both, with different values).")
    import warnings

    warnings.warn(
        f"`{old}=`{at} is renamed `{new}=` (the obs column of sections, as in squidpy); `{old}=` will be removed.",
        FutureWarning,
        stacklevel=3,
    )
    return old_value
