"""imagene: align H&E histology with spatial transcriptomics on AnnData / SpatialData."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from imagene._settings import settings
from imagene._version import __version__

_SUBMODULES = ("bench", "data", "datasets", "io", "metrics", "model", "module", "nn", "pl", "pp", "tl", "train")

if TYPE_CHECKING:  # pragma: no cover
    from imagene import bench, data, datasets, io, metrics, model, module, nn, pl, pp, tl, train  # noqa: F401


def __getattr__(name: str):
    # submodules load on first use so `import imagene` stays fast (torch and scvi load only when needed)
    if name in _SUBMODULES:
        mod = importlib.import_module(f"imagene.{name}")
        settings._apply_third_party()  # Lightning and scvi-tools set their loggers' levels when imported
        return mod
    raise AttributeError(f"module 'imagene' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])


__all__ = ["__version__", "settings", *_SUBMODULES]
