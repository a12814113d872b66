"""Plots: expression on the tissue, predicted vs measured, uncertainty, training history, retrieval, benchmark.

Every function returns the matplotlib Figure (``return_fig=False``: its Axes) and never calls
``plt.show()``.
"""

from imagene.pl._plots import (
    benchmark,
    history,
    predicted_scatter,
    predicted_vs_measured,
    retrieval_examples,
    uncertainty,
)

__all__ = [
    "benchmark",
    "history",
    "predicted_scatter",
    "predicted_vs_measured",
    "retrieval_examples",
    "uncertainty",
]
