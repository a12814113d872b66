"""Training plans shared by the models."""

from imagene.train._plan import ContrastiveTrainingPlan

__all__ = ["ContrastiveTrainingPlan"]
