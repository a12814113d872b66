"""Benchmark harness: leave-one-section-out evaluation of imagene models against baselines.

``python -m imagene.bench`` / ``imagene bench`` runs the tasks ``expression``, ``retrieval`` and
``clustering`` on legacy-ST sections; :func:`run` is the same runner for any AnnData.
"""

from __future__ import annotations

from imagene.bench._baselines import (
    ContextRidge,
    ExpressionPCA,
    ImageFeatures,
    MeanExpression,
    RandomReference,
    RidgeProbe,
    STNetHead,
    ridge_probe,  # noqa: F401  (deprecated alias of RidgeProbe.fit_predict, not in __all__)
)
from imagene.bench._command import main
from imagene.bench._data import read_sections
from imagene.bench._methods import FoldContext, ImageneModel, Method, bleep_style, umpire_context
from imagene.bench._report import per_fold_table, plot_results, summarize, write_results
from imagene.bench._report import summary_table  # noqa: F401  (deprecated alias of summarize)
from imagene.bench._runner import default_methods, run
from imagene.bench._zero_shot import zero_shot

__all__ = [
    "ContextRidge",
    "ExpressionPCA",
    "FoldContext",
    "ImageFeatures",
    "ImageneModel",
    "MeanExpression",
    "Method",
    "RandomReference",
    "RidgeProbe",
    "STNetHead",
    "bleep_style",
    "umpire_context",
    "default_methods",
    "main",
    "per_fold_table",
    "plot_results",
    "read_sections",
    "run",
    "summarize",
    "write_results",
    "zero_shot",
]
