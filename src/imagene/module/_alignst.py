"""ALIGN-ST's module (Zhou et al., MICCAI 2025), assembled from the blocks of :mod:`imagene.nn`.

Nothing here imports anndata: a section arrives as tensors (spot features, nuclei maps, a patch
graph) and genes as token states of their text descriptions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from imagene.nn import GeneSemanticGraph, GenomicPrompter, NucleiFusion, SAGERefiner


class AlignSTModule(nn.Module):
    """ALIGN-ST: predicts ``ŷ_{i,c} = F_i · F_cᵀ`` for any gene ``c`` with a description.

    Spot side: global tile features fused with nuclei tokens (:class:`imagene.nn.NucleiFusion`), the image
    stream of the :class:`imagene.nn.GenomicPrompter` over the whole section, then :class:`imagene.nn.SAGERefiner` over
    the section's spatial + feature-similarity graph → ``F_i``. Gene side: the text stream of the
    prompter over description tokens (prompts coupled to the section's visual prompts), then the
    :class:`imagene.nn.GeneSemanticGraph` → ``F_c``.

    Parameters
    ----------
    n_image_features
        Width of the frozen tile features.
    n_text_input
        Width of the gene token states.
    n_hidden
        Width of every stream.
    n_layers
        Prompter layers per stream.
    n_prompts
        Prompts per layer.
    n_heads
        Attention heads.
    alpha
        Prompt fusion weight.
    k_genes
        Neighbours in the gene graph.
    n_sage_layers
        GraphSAGE layers.
    dropout
        Dropout.
    use_nuclei
        Fuse nuclei maps (``False``: global features only).
    """

    def __init__(
        self,
        n_image_features: int,
        *,
        n_text_input: int = 384,
        n_hidden: int = 128,
        n_layers: int = 4,
        n_prompts: int = 2,
        n_heads: int = 4,
        alpha: float = 0.2,
        k_genes: int = 4,
        n_sage_layers: int = 2,
        dropout: float = 0.1,
        use_nuclei: bool = True,
    ) -> None:
        super().__init__()
        self.use_nuclei = bool(use_nuclei)
        self.fusion = NucleiFusion(n_image_features, n_hidden, n_heads=n_heads, dropout=dropout)
        self.prompter = GenomicPrompter(
            n_hidden, n_text_input=n_text_input, n_layers=n_layers, n_prompts=n_prompts, n_heads=n_heads,
            alpha=alpha, dropout=dropout,
        )
        self.gene_graph = GeneSemanticGraph(n_hidden, k=k_genes)
        self.sage = SAGERefiner(n_hidden, n_layers=n_sage_layers, dropout=dropout)
        self.spot_head = nn.Linear(n_hidden, n_hidden)
        self.gene_head = nn.Linear(n_hidden, n_hidden)
        self.scale = 1.0 / math.sqrt(n_hidden)

    def on_load(self, model: Any, **kwargs: Any) -> None:  # noqa: ARG002
        """Hook scvi-tools' ``BaseModelClass.load`` calls after loading the weights (nothing to do)."""

    def encode_spots(
        self, features: torch.Tensor, nuclei: torch.Tensor | None, edge_index: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One section's spot features ``F_i (n, d)`` and each prompter layer's visual prompts (no gene side)."""
        h = self.fusion(features, nuclei if self.use_nuclei else None)
        patches, prompts = self.prompter.encode_image(h)
        return self.spot_head(self.sage(patches, edge_index)), prompts

    def forward(
        self,
        features: torch.Tensor,
        nuclei: torch.Tensor | None,
        edge_index: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One section: spot features ``F_i (n, d)``, gene embeddings ``F_c (G, d)`` and predictions ``(n, G)``."""
        spots, prompts = self.encode_spots(features, nuclei, edge_index)
        genes = self.prompter.encode_text(tokens, mask, prompts)
        genes = self.gene_head(self.gene_graph(genes))
        return {"spots": spots, "genes": genes, "pred": self.scale * spots @ genes.T}
