"""One Lightning plan and one fit helper for every imagene task that is not an scvi-tools module.

scvi-tools modules (UMPIRE, ST-Align, SIGMMA) train through scvi-tools' runner with
:class:`imagene.train.ContrastiveTrainingPlan`; everything else (ALIGN-ST's section steps, the
gene-encoder pre-trainer, regression heads of models and baselines) subclasses :class:`TaskPlan`
and trains with :func:`fit`. Both paths share :func:`monitoring_settings` (validation, early
stopping, best weights), :func:`imagene.train.checkpoint_settings` and :func:`warmup_cosine`, and
keep per-epoch history in the scvi-tools format (``{name: DataFrame}`` indexed by epoch), so
``model.history`` and :func:`imagene.pl.history` read every model the same way.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as L
import numpy as np
import pandas as pd
import torch

from imagene._settings import settings

logger = logging.getLogger("imagene")

#: learning-rate schedules understood by :class:`TaskPlan` and :class:`imagene.train.ContrastiveTrainingPlan`
LR_SCHEDULES = (None, "warmup_cosine")

#: prefix of the ``trainer.callback_metrics`` entries that carry a :class:`TaskPlan`'s per-epoch history
#: from the rank-0 worker back to the main process under ``ddp_spawn`` (removed again by :func:`fit`)
HISTORY_PREFIX = "imagene_history/"


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_fraction: float = 0.1, min_lr_ratio: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to ``min_lr_ratio``·lr.

    Parameters
    ----------
    optimizer
        The optimiser whose learning rate is scheduled.
    total_steps
        Optimiser steps of the whole run (Lightning: ``trainer.estimated_stepping_batches``).
    warmup_fraction
        Fraction of the steps spent warming up linearly from ``lr / warm`` to ``lr``.
    min_lr_ratio
        The last step's learning rate as a fraction of ``lr``.

    Returns
    -------
    A :class:`torch.optim.lr_scheduler.LambdaLR` to step once per optimiser step.

    Examples
    --------
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = warmup_cosine(opt, 100, warmup_fraction=0.1)
    """
    total = max(1, int(total_steps))
    warm = max(1, int(round(float(warmup_fraction) * total)))
    lo = float(min_lr_ratio)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total - warm))
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_lr_schedule(lr_schedule: str | None) -> str | None:
    """``lr_schedule`` must be one of :data:`LR_SCHEDULES`."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {lr_schedule!r}.")
    return lr_schedule


def history_frames(history: Mapping[str, Iterable[float]]) -> dict[str, pd.DataFrame]:
    """Per-epoch values in the scvi-tools ``model.history`` format: ``{name: DataFrame({name: values})}``.

    Parameters
    ----------
    history
        ``{metric name: one value per epoch}``.

    Returns
    -------
    One single-column DataFrame per metric, indexed by ``epoch`` (0-based).
    """
    out = {}
    for key, values in history.items():
        values = [float(v) for v in values]
        out[key] = pd.DataFrame({key: values}, index=pd.RangeIndex(len(values), name="epoch"))
    return out


def trainer_defaults(trainer_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Lightning settings every imagene fit starts from (a caller's own settings win).

    No logger and no Lightning checkpoints (history is kept on the plan; checkpoints are opt-in
    through ``checkpoint_dir``), no model summary, no sanity validation, and the progress bar of
    ``imagene.settings.progress_bar``.
    """
    kwargs = dict(trainer_kwargs or {})
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("enable_progress_bar", settings.progress_bar)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return kwargs


def monitoring_settings(
    trainer_kwargs: Mapping[str, Any],
    *,
    monitor: str,
    mode: str,
    early_stopping: bool,
    early_stopping_patience: int,
    restore_best_weights: bool,
    runner: str = "lightning",
    min_delta: float = 0.0,
) -> dict[str, Any]:
    """Trainer settings for validation each epoch, early stopping on ``monitor`` and best-weight restoration.

    Parameters
    ----------
    trainer_kwargs
        The caller's trainer settings (not modified; a new dict is returned).
    monitor, mode
        The validation metric watched, ``'min'`` or ``'max'``.
    early_stopping, early_stopping_patience
        Stop when ``monitor`` has not improved for that many epochs.
    restore_best_weights
        End with the weights of the best epoch (:class:`imagene.train.RestoreBestWeights`).
    runner
        ``'scvi'`` (scvi-tools' ``TrainRunner``, which builds the early-stopping callback from its
        ``early_stopping_*`` settings) or ``'lightning'`` (a plain :class:`lightning.pytorch.Trainer`:
        an :class:`~lightning.pytorch.callbacks.EarlyStopping` callback is added).
    min_delta
        Smallest change of ``monitor`` that counts as an improvement.

    Returns
    -------
    The trainer settings.
    """
    from imagene.train._callbacks import RestoreBestWeights

    if runner not in ("scvi", "lightning"):
        raise ValueError(f"runner must be 'scvi' or 'lightning'; got {runner!r}.")
    kwargs = dict(trainer_kwargs)
    callbacks = list(kwargs.pop("callbacks", None) or [])
    if early_stopping:
        if runner == "scvi":
            kwargs.setdefault("early_stopping_monitor", monitor)
            kwargs.setdefault("early_stopping_mode", mode)
            kwargs.setdefault("early_stopping_patience", early_stopping_patience)
            if min_delta:
                kwargs.setdefault("early_stopping_min_delta", min_delta)
        else:
            from lightning.pytorch.callbacks import EarlyStopping

            callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=early_stopping_patience,
                                           min_delta=min_delta))
    kwargs.setdefault("check_val_every_n_epoch", 1)
    if restore_best_weights:
        callbacks.append(RestoreBestWeights(monitor=monitor, mode=mode))
    if callbacks:
        kwargs["callbacks"] = callbacks
    kwargs.setdefault("enable_checkpointing", False)
    return kwargs


class TaskPlan(L.LightningModule):
    """The Lightning plan of every imagene task outside scvi-tools' runner.

    A subclass implements :meth:`step`; the plan logs ``train_loss`` / ``validation_loss`` and
    every metric ``{name}_{mode}`` once per epoch, keeps per-epoch means in :attr:`epoch_history`
    (``history`` in the scvi-tools format, :func:`history_frames`), and optimises
    ``module.parameters()`` with AdamW, optionally under :func:`warmup_cosine`.

    Under DDP every epoch metric is one weighted mean over the batches of all ranks (logged with
    ``sync_dist``; the history sums are all-reduced), and with ``ddp_spawn`` the history travels back
    to the main process in ``trainer.callback_metrics`` (:func:`fit` restores it). A rank that
    serves the whole validation set itself (an unsharded loader) gives the same mean.

    Parameters
    ----------
    module
        The :class:`torch.nn.Module` trained (what :class:`imagene.train.RestoreBestWeights`
        snapshots); a task with several parts wraps them in a :class:`torch.nn.ModuleDict`.
    lr, weight_decay
        AdamW settings.
    lr_schedule
        ``None`` (constant lr) or ``'warmup_cosine'``.
    warmup_fraction, min_lr_ratio
        Settings of ``'warmup_cosine'``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str | None = None,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.01,
    ) -> None:
        super().__init__()
        self.module = module
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.lr_schedule = check_lr_schedule(lr_schedule)
        self.warmup_fraction, self.min_lr_ratio = float(warmup_fraction), float(min_lr_ratio)
        self.epoch_history: dict[str, list[float]] = {}
        self._sums: dict[str, dict[str, list[float]]] = {"train": {}, "validation": {}}

    # ------------------------------------------------------------------ to implement
    def step(self, batch: Any, batch_idx: int, mode: str) -> dict[str, Any]:
        """One batch: ``{"loss": tensor, "n": batch size, name: value or (value, weight), ...}``.

        ``mode`` is ``'train'`` or ``'validation'``. Metric values are floats or 0-d tensors
        weighted by ``n``, or ``(value, weight)`` pairs (e.g. an accuracy over masked tokens).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks
    def _record(self, out: Mapping[str, Any], mode: str) -> None:
        n = int(out.get("n", 1))
        for key, value in out.items():
            if key == "n" or value is None:
                continue
            value, weight = value if isinstance(value, tuple) else (value, n)
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            name = f"{mode}_loss" if key == "loss" else f"{key}_{mode}"
            self.log(name, value, on_step=False, on_epoch=True, batch_size=max(1, int(weight)),
                     prog_bar=key == "loss" or mode == "validation", sync_dist=self._distributed)
            acc = self._sums[mode].setdefault(name, [0.0, 0.0])
            acc[0] += value * weight
            acc[1] += weight

    @property
    def _distributed(self) -> bool:
        trainer = self._trainer
        return trainer is not None and int(getattr(trainer, "world_size", 1) or 1) > 1

    def _close_epoch(self, mode: str) -> None:
        sums, self._sums[mode] = self._sums[mode], {}
        if self.trainer.sanity_checking:
            return
        if self._distributed:  # one mean over the batches of every rank (every rank logs the same metrics)
            names = sorted(sums)
            flat = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=self.device).reshape(-1, 2)
            flat = self.trainer.strategy.reduce(flat, reduce_op="sum").cpu().tolist()
            sums = dict(zip(names, flat, strict=True))
        for name, (total, weight) in sums.items():
            self.epoch_history.setdefault(name, []).append(total / weight if weight else float("nan"))

    def on_train_end(self) -> None:
        if self._distributed:  # ddp_spawn sends only the weights and callback_metrics back: the history rides along
            for name, values in self.epoch_history.items():
                self.trainer.callback_metrics[HISTORY_PREFIX + name] = torch.tensor(values, dtype=torch.float64)

    def training_step(self, batch, batch_idx):
        out = self.step(batch, batch_idx, "train")
        self._record(out, "train")
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        with torch.no_grad():
            out = self.step(batch, batch_idx, "validation")
        self._record(out, "validation")

    def on_train_epoch_end(self) -> None:
        self._close_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._close_epoch("validation")

    def configure_optimizers(self):
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule is None:
            return opt
        sched = warmup_cosine(opt, self.trainer.estimated_stepping_batches, warmup_fraction=self.warmup_fraction,
                              min_lr_ratio=self.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch means in the scvi-tools ``model.history`` format."""
        return history_frames(self.epoch_history)


class RegressionTask(TaskPlan):
    """MSE regression of ``y`` from ``x`` by ``module`` (the heads of models and baselines).

    Batches are ``(x, y)`` pairs (a :class:`torch.utils.data.TensorDataset`); ``validation_loss``
    is the mean squared error over the validation spots.
    """

    def step(self, batch, batch_idx, mode):  # noqa: ARG002
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.module(x), y)
        return {"loss": loss, "n": x.shape[0]}


def tensor_loaders(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    train_idx: np.ndarray | None = None,
    val_idx: np.ndarray | None = None,
    *,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None]:
    """Shuffled training and ordered validation loaders over rows of ``(x, y)`` (``num_workers=0``)."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.as_tensor(np.asarray(x, np.float32)), torch.as_tensor(np.asarray(y, np.float32))
    tr = np.arange(len(x)) if train_idx is None else np.asarray(train_idx)
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=batch_size, shuffle=True, num_workers=0,
                       generator=torch.Generator().manual_seed(int(seed)))
    val = None
    if val_idx is not None and len(val_idx):
        va = np.asarray(val_idx)
        val = DataLoader(TensorDataset(x[va], y[va]), batch_size=max(batch_size, 1024), num_workers=0)
    return train, val


def fit(
    task: TaskPlan,
    train_dataloaders: Any,
    val_dataloaders: Any = None,
    *,
    max_epochs: int,
    monitor: str | None = None,
    mode: str = "min",
    early_stopping: bool = False,
    early_stopping_patience: int = 10,
    min_delta: float = 0.0,
    restore_best_weights: bool = False,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    what: str = "training",
    check_weights_changed: bool = True,
    find_unused_parameters: bool = False,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """Train ``task`` with Lightning: the one fit of every imagene task outside scvi-tools' runner.

    Parameters
    ----------
    task
        The plan (:class:`TaskPlan`).
    train_dataloaders, val_dataloaders
        Lightning loaders (or ``None`` when the task serves its own ``train_dataloader``).
    max_epochs
        Epoch budget.
    monitor, mode
        Validation metric watched by early stopping / best weights (default ``validation_loss``,
        ``'min'``); ignored without validation data.
    early_stopping, early_stopping_patience, min_delta
        Stop when ``monitor`` has not improved by ``min_delta`` for that many epochs.
    restore_best_weights
        End with the weights of the best validation epoch.
    accelerator, devices
        Lightning device settings.
    checkpoint_dir, resume
        ``last.ckpt`` after every epoch, and continue from it (:func:`imagene.train.checkpoint_settings`).
    what
        Name of the run, for logs and errors.
    check_weights_changed
        Raise when no trainable weight moved (a silent no-op fit), except on resumed runs.
    find_unused_parameters
        Under a DDP ``strategy``, let DDP skip parameters that receive no gradient (a task whose
        module has blocks it does not use); no effect without DDP.
    **trainer_kwargs
        Passed to :class:`lightning.pytorch.Trainer` (over :func:`trainer_defaults`).

    Returns
    -------
    The fitted trainer; ``task.monitor_`` says which epoch's weights were kept
    (:func:`imagene.train.monitor_summary`) and ``task.history`` holds the per-epoch metrics.
    """
    from imagene._validate import check_max_epochs
    from imagene.train._callbacks import monitor_summary, recover_best_epoch
    from imagene.train._checkpoint import check_optimised, checkpoint_settings, trainable_snapshot

    max_epochs = check_max_epochs(max_epochs)
    monitor = monitor or "validation_loss"
    validated = val_dataloaders is not None or type(task).val_dataloader is not L.LightningModule.val_dataloader
    if validated:
        trainer_kwargs = monitoring_settings(
            trainer_kwargs, monitor=monitor, mode=mode, early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience, restore_best_weights=restore_best_weights,
            min_delta=min_delta,
        )
    trainer_kwargs = trainer_defaults(trainer_kwargs)
    if find_unused_parameters and "strategy" in trainer_kwargs:
        trainer_kwargs["strategy"] = ddp_find_unused(trainer_kwargs["strategy"])
    trainer_kwargs, ckpt_path = checkpoint_settings(trainer_kwargs, checkpoint_dir, resume, what=what)
    if settings.seed is not None:
        L.seed_everything(settings.seed, verbose=False)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator=accelerator, devices=devices, **trainer_kwargs)
    task.module.train()  # Lightning keeps the mode modules are in (inference leaves them in eval)
    before = trainable_snapshot(task.module)
    trainer.fit(task, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders, ckpt_path=ckpt_path)
    shipped = {k[len(HISTORY_PREFIX):]: trainer.callback_metrics.pop(k) for k in list(trainer.callback_metrics)
               if k.startswith(HISTORY_PREFIX)}
    if shipped and not task.epoch_history:  # ddp_spawn: the epochs ran in the worker processes
        task.epoch_history = {k: [float(x) for x in v.reshape(-1).tolist()] for k, v in shipped.items()}
    recover_best_epoch(trainer, trainer_kwargs.get("callbacks"), task.module)
    task.module.eval()
    task.module.cpu()
    if check_weights_changed and ckpt_path is None:
        check_optimised(task.module, before, name=what)
    task.monitor_ = (
        monitor_summary(trainer_kwargs.get("callbacks"), monitor=monitor, mode=mode, early_stopping=early_stopping)
        if validated else None
    )
    return trainer


def ddp_find_unused(strategy: Any) -> Any:
    """``strategy`` with DDP's ``find_unused_parameters`` on (a name such as ``'ddp_spawn'``, or a DDPStrategy).

    Anything that is not DDP is returned as it is.
    """
    if isinstance(strategy, str):
        name = strategy.lower()
        if name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
            return f"{name}_find_unused_parameters_true"
        return strategy
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, DDPStrategy):
        strategy._ddp_kwargs.setdefault("find_unused_parameters", True)
    return strategy
