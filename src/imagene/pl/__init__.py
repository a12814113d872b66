"""Plots: expression on the tissue, predicted vs measured, uncertainty, training history, retrieval, benchmark.

Every function takes ``return_fig`` (Figure or Axes) and never calls ``plt.show()``.
"""

from imagene.pl._plots import (
    benchmark,
    history,
    predicted_scatter,
    predicted_vs_measured,
    retrieval_examples,
    training_history,
    uncertainty,
)

__all__ = [
    "benchmark",
    "history",
    "predicted_scatter",
    "predicted_vs_measured",
    "retrieval_examples",
    "training_history",
    "uncertainty",
]
