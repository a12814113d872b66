"""Torch-only modules of each model (no AnnData)."""

from imagene.module._umpire import ImageTower, UMPIREModule

__all__ = ["ImageTower", "UMPIREModule"]
