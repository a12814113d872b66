"""Metrics: pure functions on arrays (no AnnData, no torch)."""

from imagene.metrics._expression import gene_pearson, mean_pearson, mse, top_expressed_genes, top_variable_genes

__all__ = ["gene_pearson", "mean_pearson", "mse", "top_expressed_genes", "top_variable_genes"]
