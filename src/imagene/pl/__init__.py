"""Plots: predicted vs measured expression on the tissue, training history."""

from imagene.pl._plots import history, predicted_vs_measured

__all__ = ["history", "predicted_vs_measured"]
