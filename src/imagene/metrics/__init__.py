"""Metrics: pure functions on arrays (no AnnData, no torch).

Expression (per-gene Pearson r, MSE, gene sets chosen on training data), cross-modal retrieval
(Recall@k %) and clustering agreement (ARI, NMI).
"""

from __future__ import annotations

from imagene.metrics._clustering import ari, nmi
from imagene.metrics._expression import gene_pearson, mean_pearson, mse, top_expressed_genes, top_variable_genes
from imagene.metrics._retrieval import recall_at_k

__all__ = [
    "ari",
    "gene_pearson",
    "mean_pearson",
    "mse",
    "nmi",
    "recall_at_k",
    "top_expressed_genes",
    "top_variable_genes",
]
