"""Torch-only modules of each model (no AnnData)."""

from imagene.module._alignst import AlignSTModule
from imagene.module._sigmma import SIGMMAModule
from imagene.module._stalign import STAlignModule
from imagene.module._umpire import UMPIREModule

__all__ = [
    "AlignSTModule",
    "SIGMMAModule",
    "STAlignModule",
    "UMPIREModule",
]

from imagene._settings import settings as _settings

_settings._apply_third_party()  # quiet Lightning / scvi-tools, which set their loggers when imported
