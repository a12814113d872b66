"""Package settings: verbosity, seed and progress bars (one object, like ``scvi.settings``)."""

from __future__ import annotations

import logging
import random
import warnings

import numpy as np

logger = logging.getLogger("imagene")

#: loggers of the libraries imagene trains with; their INFO lines (device banners, tips, "already
#: downloaded") are about settings imagene makes, not the user
THIRD_PARTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric", "scvi")

#: (category, message regex, module regex) of third-party warnings a user of imagene cannot act on
THIRD_PARTY_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    # docrep, as squidpy uses it at import, warns about its own docstring templates
    # ("SyntaxWarning: 'n_jobs' is not a valid key!")
    (SyntaxWarning, r".*is not a valid key", r"docrep"),
    # Lightning, about trainer and loader settings imagene chooses
    (Warning, r".*smaller than the logging interval", r"lightning|pytorch_lightning"),
    (Warning, r".*does not have many workers", r"lightning|pytorch_lightning"),
    (Warning, r".*isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning|pytorch_lightning"),
    (Warning, r".*Trying to infer the `batch_size`", r"lightning|pytorch_lightning"),
    (Warning, r".*`srun` command is available on your system", r"lightning|pytorch_lightning"),
)


def _level(level: int | str, what: str) -> int:
    if isinstance(level, str):
        named = logging.getLevelName(level.upper())
        if not isinstance(named, int):
            raise ValueError(f"Unknown {what} {level!r}; use 'debug', 'info', 'warning' or 'error'.")
        return named
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"`{what}` must be a logging level (int) or its name; got {type(level).__name__}.")
    return level


class ImageneConfig:
    """Global settings of imagene (``imagene.settings``).

    ``print(imagene.settings)`` shows every setting and its value.

    Attributes
    ----------
    verbosity
        Level of imagene's own log messages (``'info'`` by default: keys written, sizes, devices).
        Setting it to ``'debug'`` also sets ``third_party_verbosity`` to ``'info'``, so the
        messages of Lightning and scvi-tools come back. imagene's warnings are shown at every level.
    third_party_verbosity
        Level of the Lightning and scvi-tools loggers (``'warning'`` by default: no "GPU
        available" banners, logger tips or "already downloaded" lines). Above ``'info'``,
        third-party warnings a user cannot act on are filtered too (docrep's SyntaxWarnings
        when squidpy is imported, Lightning's remarks on trainer settings imagene chooses; see
        ``imagene._settings.THIRD_PARTY_NOISE``). Their errors always show.
    seed
        Seed applied to Python, NumPy, torch and ``scvi.settings.seed`` when set.
    progress_bar
        Show progress bars in long loops (tiling, embedding, training).
    warnings_stacklevel
        Stack level used for user warnings.

    Examples
    --------
    >>> import imagene as ig
    >>> ig.settings.verbosity = "warning"  # only warnings and errors from imagene
    >>> ig.settings.verbosity = "info"
    >>> ig.settings.third_party_verbosity = "info"  # Lightning's and scvi-tools' messages as they come
    >>> ig.settings.third_party_verbosity = "warning"
    """

    def __init__(self) -> None:
        self._verbosity = logging.INFO
        self._third_party = logging.WARNING
        self._seed: int | None = None
        self.progress_bar = True
        self.warnings_stacklevel = 2
        self._handler: logging.Handler | None = None
        self._quiet_filters = False
        self.verbosity = logging.INFO
        self.third_party_verbosity = logging.WARNING

    def __repr__(self) -> str:
        rows = [
            ("verbosity", logging.getLevelName(self._verbosity), "imagene's own messages"),
            (
                "third_party_verbosity",
                logging.getLevelName(self._third_party),
                "Lightning, scvi-tools" + ("; known noise filtered" if self._quiet_filters else ""),
            ),
            ("seed", repr(self._seed), "Python, NumPy, torch, scvi-tools"),
            ("progress_bar", repr(self.progress_bar), "tiling, embedding, training"),
            ("warnings_stacklevel", repr(self.warnings_stacklevel), ""),
        ]
        width = max(len(r[0]) for r in rows)
        vwidth = max(len(r[1]) for r in rows)
        lines = [f"  {k:<{width}}  {v:<{vwidth}}  {note}".rstrip() for k, v, note in rows]
        return "imagene settings:\n" + "\n".join(lines)

    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        level = _level(level, "verbosity")
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
        if level <= logging.DEBUG and self._third_party > logging.INFO:
            self.third_party_verbosity = logging.INFO

    @property
    def third_party_verbosity(self) -> int:
        return self._third_party

    @third_party_verbosity.setter
    def third_party_verbosity(self, level: int | str) -> None:
        self._third_party = _level(level, "third_party_verbosity")
        self._apply_third_party()

    def _apply_third_party(self) -> None:
        """Set the third-party loggers' levels and the noise filters (again after those libraries load).

        Lightning and scvi-tools set their loggers' levels when they are imported, so this runs
        again each time an imagene submodule is loaded.
        """
        for name in THIRD_PARTY_LOGGERS:
            if name in logging.Logger.manager.loggerDict or name == "scvi":
                logging.getLogger(name).setLevel(self._third_party)
        quiet = self._third_party > logging.INFO
        if quiet != self._quiet_filters:
            # inserted in front of the user's filters; `filterwarnings` replaces an identical entry,
            # so switching back and forth does not grow the list
            action = "ignore" if quiet else "default"
            for category, message, module in THIRD_PARTY_NOISE:
                warnings.filterwarnings(action, message=message, category=category, module=module)
            self._quiet_filters = quiet

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
