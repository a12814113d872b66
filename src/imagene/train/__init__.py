"""Training plans and callbacks shared by the models."""

from imagene.train._callbacks import RestoreBestWeights, monitor_summary
from imagene.train._plan import ContrastiveTrainingPlan

__all__ = ["ContrastiveTrainingPlan", "RestoreBestWeights", "monitor_summary"]

from imagene._settings import settings as _settings

_settings._apply_third_party()  # quiet Lightning / scvi-tools, which set their loggers when imported
