"""Lightning callbacks shared by the models."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import Callback

logger = logging.getLogger("imagene")

#: prefix of the ``trainer.callback_metrics`` entry that carries the best epoch back from ``ddp_spawn`` workers
BEST_PREFIX = "imagene_best/"


class RestoreBestWeights(Callback):
    """Keep the module weights of the best validation epoch and restore them when training ends.

    Early stopping alone leaves the weights of the LAST epoch, ``patience`` epochs past the best
    one; on small spatial datasets contrastive towers overfit within those epochs.

    Parameters
    ----------
    monitor
        Logged metric to watch.
    mode
        ``'min'`` or ``'max'``.
    """

    def __init__(self, monitor: str = "validation_loss", mode: str = "min") -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'; got {mode!r}.")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._state: dict | None = None

    def state_dict(self) -> dict:
        """Saved in checkpoints, so that a resumed run still restores the best epoch of the whole run."""
        return {"best": self.best, "best_epoch": self.best_epoch, "state": self._state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")
        self._state = state_dict.get("state")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_epoch = value, trainer.current_epoch
            self._state = {k: t.detach().cpu().clone() for k, t in pl_module.module.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:
        if self._state is not None:
            pl_module.module.load_state_dict(self._state)
            if trainer.is_global_zero:
                logger.info("Restored the weights of epoch %d (%s = %.4f)", self.best_epoch + 1, self.monitor,
                            self.best)
            if int(getattr(trainer, "world_size", 1) or 1) > 1:  # for the main process of ddp_spawn
                trainer.callback_metrics[BEST_PREFIX + self.monitor] = torch.tensor(
                    [self.best, self.best_epoch], dtype=torch.float64
                )


def recover_best_epoch(trainer, callbacks, module: torch.nn.Module) -> None:
    """After a ``ddp_spawn`` fit: tell each :class:`RestoreBestWeights` which epoch its worker restored.

    The workers send back only the (restored) weights and ``trainer.callback_metrics``;
    :meth:`RestoreBestWeights.on_train_end` put the best value and epoch there. The callback then
    holds the returned weights, so that :func:`monitor_summary` reports the restored epoch.
    """
    if trainer is None:
        return
    metrics = trainer.callback_metrics
    for cb in callbacks or ():
        key = BEST_PREFIX + getattr(cb, "monitor", "")
        if not isinstance(cb, RestoreBestWeights) or key not in metrics:
            continue
        best, epoch = metrics.pop(key).reshape(-1).tolist()
        if cb._state is None:
            cb.best, cb.best_epoch = float(best), int(epoch)
            cb._state = {k: t.detach().cpu().clone() for k, t in module.state_dict().items()}


def monitor_summary(callbacks, *, monitor: str, mode: str, early_stopping: bool) -> dict:
    """What a fit watched and which epoch's weights it ended with (kept on models as ``train_monitor_``).

    Parameters
    ----------
    callbacks
        The callbacks the trainer ran (a :class:`RestoreBestWeights` among them, or not).
    monitor
        The validation metric watched by early stopping and best-weight restoration.
    mode
        ``'min'`` or ``'max'``.
    early_stopping
        Whether early stopping was on.

    Returns
    -------
    ``{"monitor", "mode", "early_stopping", "restored_epoch", "best_value"}``; ``restored_epoch``
    is 0-based like the index of ``model.history`` (``None``: the last epoch's weights were kept).

    Examples
    --------
    >>> from imagene.train import RestoreBestWeights, monitor_summary
    >>> monitor_summary([RestoreBestWeights()], monitor="validation_loss", mode="min", early_stopping=True)
    {'monitor': 'validation_loss', 'mode': 'min', 'early_stopping': True, 'restored_epoch': None, 'best_value': None}
    """
    best = next((c for c in callbacks or () if isinstance(c, RestoreBestWeights) and c.monitor == monitor), None)
    restored = best is not None and best._state is not None
    return {
        "monitor": monitor,
        "mode": mode,
        "early_stopping": bool(early_stopping),
        "restored_epoch": int(best.best_epoch) if restored else None,
        "best_value": float(best.best) if restored else None,
    }
