"""Training plans and callbacks shared by the models."""

from imagene.train._callbacks import RestoreBestWeights
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
    "rank_shard",
    "trainable_snapshot",
]
