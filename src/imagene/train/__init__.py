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
from imagene.train._task import (
    LR_SCHEDULES,
    RegressionTask,
    TaskPlan,
    fit,
    history_frames,
    monitoring_settings,
    tensor_loaders,
    trainer_defaults,
    warmup_cosine,
)

__all__ = [
    "AtomicCheckpointIO",
    "ContrastiveTrainingPlan",
    "LR_SCHEDULES",
    "RegressionTask",
    "TaskPlan",
    "LastCheckpoint",
    "RestoreBestWeights",
    "check_optimised",
    "checkpoint_settings",
    "fit",
    "history_frames",
    "monitor_summary",
    "monitoring_settings",
    "rank_shard",
    "tensor_loaders",
    "trainable_snapshot",
    "trainer_defaults",
    "warmup_cosine",
]

from imagene._settings import settings as _settings

_settings._apply_third_party()  # quiet Lightning / scvi-tools, which set their loggers when imported
