"""Checkpoints every model trains with: atomic writes, resume from ``last.ckpt``, and a trained-or-raise check."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

logger = logging.getLogger("imagene")

#: the checkpoint ``resume=True`` continues from
LAST_CHECKPOINT = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, then rename it into place.

    A training process killed while saving leaves the previous checkpoint intact (``os.replace`` is
    atomic on POSIX and Windows), so ``resume=True`` never loads a half-written file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


class LastCheckpoint(Callback):
    """Write ``<dirpath>/last.ckpt`` at the end of every training epoch (after its validation).

    Lightning's ``ModelCheckpoint(save_top_k=0, save_last=True)`` writes ``last.ckpt`` only when
    it also saved a top-k checkpoint, i.e. once at the end; this callback writes it every epoch,
    through the trainer (rank 0 only, with the trainer's checkpoint IO: atomic here).
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.dirpath / LAST_CHECKPOINT)


def checkpoint_settings(
    trainer_kwargs: dict, checkpoint_dir: str | os.PathLike | None, resume: bool, *, what: str = "training"
) -> tuple[dict, str | None]:
    """Lightning settings for ``checkpoint_dir`` / ``resume`` (the approach of the gene-encoder pre-trainer).

    ``last.ckpt`` (weights, optimiser, epoch, callback states) is written atomically after every
    epoch; ``resume=True`` continues from it when it exists (and starts afresh, with a log line,
    when it does not). Resume with the same data and settings; ``max_epochs`` counts the epochs
    already done.

    Parameters
    ----------
    trainer_kwargs
        Trainer settings (not modified; a new dict is returned).
    checkpoint_dir
        Folder of the checkpoints, or ``None`` for none.
    resume
        Continue from ``checkpoint_dir/last.ckpt``.
    what
        Name of the run, for the log.

    Returns
    -------
    The trainer settings and the checkpoint path to pass to ``Trainer.fit(ckpt_path=...)``.
    """
    trainer_kwargs = dict(trainer_kwargs)
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True needs `checkpoint_dir=` (the folder of the checkpoints to resume from).")
        return trainer_kwargs, None
    checkpoint_dir = Path(checkpoint_dir)
    callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    callbacks.append(LastCheckpoint(checkpoint_dir))
    trainer_kwargs["callbacks"] = callbacks
    plugins = list(trainer_kwargs.pop("plugins", None) or [])
    if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer_kwargs["plugins"] = plugins
    last = checkpoint_dir / LAST_CHECKPOINT
    if resume and last.exists():
        logger.info("Resuming %s from %s", what, last)
        return trainer_kwargs, str(last)
    if resume:
        logger.info("No checkpoint in %s; starting %s from the current weights", checkpoint_dir, what)
    return trainer_kwargs, None


def trainable_snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the trainable parameters (to tell afterwards whether any optimisation step ran)."""
    return [p.detach().cpu().clone() for p in module.parameters() if p.requires_grad]


def check_optimised(module: torch.nn.Module, before: list[torch.Tensor], *, name: str = "model") -> None:
    """Raise when training left every trainable parameter unchanged: no optimisation step ran.

    This catches runs without a training batch, e.g. a per-rank shard smaller than one batch under
    DDP, which Lightning reports only as a log line.
    """
    after = [p.detach().cpu() for p in module.parameters() if p.requires_grad]
    if not before or len(before) != len(after):
        return
    if all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        raise RuntimeError(
            f"Training the {name} ran no optimisation step (every weight is unchanged), so the model is NOT trained. "
            "Usually no training batch was drawn: fewer training spots than `batch_size` (the last incomplete batch "
            "is dropped), or, with several devices, fewer spots per device than one batch. Lower `batch_size`, "
            "train on more spots, or use fewer devices."
        )


def rank_shard(n: int, trainer: Any, *, equal: bool = True, seed: int | None = None, epoch: int = 0) -> list[int]:
    """Positions ``0..n-1`` this process trains on under DDP (all of them with one process).

    For loaders Lightning cannot shard itself (custom batch samplers, one whole section per batch):
    positions are shuffled with ``seed`` and ``epoch`` (the same order on every rank), then dealt
    round-robin; ``equal`` trims the shards to one length, as DDP needs the same number of steps
    on every rank.
    """
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world <= 1:
        return list(range(n))
    rank = int(trainer.global_rank)
    order = list(range(n))
    if seed is not None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + int(epoch))).tolist()
    per = n // world
    shard = order[rank::world]
    return shard[:per] if equal else shard
