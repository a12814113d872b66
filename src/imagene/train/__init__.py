"""Training plans and callbacks shared by the models."""

from imagene.train._callbacks import RestoreBestWeights, monitor_summary
from imagene.train._checkpoint import (
    AtomicCheckpointIO,
    LastCheckpoint,
    check_optimised,
    checkpoint_settings,
    rank_shard,
    trainable_snapshot,
)
from imagene.train._plan import ContrastiveTrainingPlan

__all__ = [
    "AtomicCheckpointIO",
    "ContrastiveTrainingPlan",
    "LastCheckpoint",
    "RestoreBestWeights",
    "check_optimised",
    "checkpoint_settings",
    "monitor_summary",
    "rank_shard",
    "trainable_snapshot",
]

from imagene._settings import settings as _settings

_settings._apply_third_party()  # quiet Lightning / scvi-tools, which set their loggers when imported
