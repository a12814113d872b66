"""Package settings: verbosity, seed and progress bars (one object, like ``scvi.settings``)."""

from __future__ import annotations

import logging
import random

import numpy as np

logger = logging.getLogger("imagene")


class ImageneConfig:
    """Global settings of imagene.

    Attributes
    ----------
    verbosity
        Logging level of the ``imagene`` logger (``logging.INFO`` by default).
    seed
        Seed applied to Python, NumPy, torch and ``scvi.settings.seed`` when set.
    progress_bar
        Show progress bars in long loops (tiling, embedding).
    warnings_stacklevel
        Stack level used for user warnings.
    """

    def __init__(self) -> None:
        self._verbosity = logging.INFO
        self._seed: int | None = None
        self.progress_bar = True
        self.warnings_stacklevel = 2
        self._handler: logging.Handler | None = None
        self.verbosity = logging.INFO

    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        if isinstance(level, str):
            level = logging.getLevelName(level.upper())
            if not isinstance(level, int):
                raise ValueError(f"Unknown verbosity {level!r}; use 'debug', 'info', 'warning' or 'error'.")
        self._verbosity = level
        if self._handler is None:
            from rich.console import Console
            from rich.logging import RichHandler

            self._handler = RichHandler(
                level=level, show_path=False, console=Console(stderr=True), show_time=False, markup=False
            )
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(self._handler)
            logger.propagate = False
        self._handler.setLevel(level)
        logger.setLevel(level)

    @property
    def seed(self) -> int | None:
        return self._seed

    @seed.setter
    def seed(self, seed: int | None) -> None:
        self._seed = seed
        if seed is None:
            return
        random.seed(seed)
        np.random.seed(seed)
        import torch

        torch.manual_seed(seed)
        import scvi

        scvi.settings.seed = seed


settings = ImageneConfig()
