"""Training plans and callbacks shared by the models."""

from imagene.train._callbacks import RestoreBestWeights
from imagene.train._plan import ContrastiveTrainingPlan

__all__ = ["ContrastiveTrainingPlan", "RestoreBestWeights"]
