"""Small shared helpers: key checks, logged writes, progress bars, optional imports."""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from imagene._settings import settings

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("imagene")


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue a user warning at the caller's level."""
    warnings.warn(message, category, stacklevel=settings.warnings_stacklevel + 1)


def check_adata(adata: Any, *, allow_view: bool = True) -> None:
    """Raise a clear error unless ``adata`` is a non-empty AnnData."""
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError("The AnnData has no observations (empty section). Remove empty sections before this step.")
    if not allow_view and adata.is_view:
        raise ValueError("Got a view of an AnnData. Pass a copy instead: `adata = adata[mask].copy()`.")


def check_obsm(adata: AnnData, key: str, hint: str) -> Any:
    """Return ``adata.obsm[key]`` or raise a KeyError that names the fix."""
    if key not in adata.obsm:
        raise KeyError(f"adata.obsm[{key!r}] not found. {hint}")
    return adata.obsm[key]


def save_key(adata: AnnData, slot: str, key: str, value: Any) -> None:
    """Write ``value`` to ``adata.<slot>[key]`` and log it (squidpy's ``_save_data`` convention)."""
    getattr(adata, slot)[key] = value
    logger.info("Adding `adata.%s[%r]`", slot, key)


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", show: bool = True) -> Iterable:
    """Wrap an iterable in a tqdm progress bar when requested and enabled in settings."""
    if not (show and settings.progress_bar):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)


def require(module: str, extra: str | None = None) -> Any:
    """Import an optional dependency or raise an error that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        hint = f"pip install 'imagene[{extra}]'" if extra else f"pip install {module}"
        raise ModuleNotFoundError(f"{module!r} is required for this function: {hint}") from e


def get_counts(adata: AnnData, layer: str | None = "counts", *, check: bool = True) -> Any:
    """Return the counts matrix of ``adata`` (``layers[layer]`` or ``X``), validated as counts."""
    if layer is None:
        mat = adata.X
        where = "adata.X"
    else:
        if layer not in adata.layers:
            raise KeyError(
                f"adata.layers[{layer!r}] not found. Store raw counts there (`adata.layers[{layer!r}] = adata.X.copy()`) "
                "or pass `layer=None` to use adata.X."
            )
        mat = adata.layers[layer]
        where = f"adata.layers[{layer!r}]"
    if check:
        check_counts(mat, where)
    return mat


def check_counts(mat: Any, where: str = "counts") -> None:
    """Raise if ``mat`` has NaN, inf, negative or non-integer values (every stored value is checked)."""
    from imagene._validate import check_counts_values

    check_counts_values(mat, where)


def log_normalize(counts: Any, target_sum: float = 1e4) -> np.ndarray:
    """Library-size normalise to ``target_sum`` and ``log1p``, returned as a dense float32 array."""
    import scipy.sparse as sp

    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    x = x.astype(np.float32, copy=False)
    lib = x.sum(1, keepdims=True)
    lib[lib == 0] = 1.0
    return np.log1p(x / lib * target_sum).astype(np.float32)
