"""Fully connected blocks: the gene MLP encoder and projection heads."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """``n_layers`` of Linear → LayerNorm → GELU → Dropout, then a Linear to ``n_output``.

    Parameters
    ----------
    n_input, n_output
        Input and output widths.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers (0 gives a single linear map).
    dropout
        Dropout after each hidden layer.
    """

    def __init__(self, n_input: int, n_output: int, *, n_hidden: int = 512, n_layers: int = 1, dropout: float = 0.1):
        layers: list[nn.Module] = []
        d = n_input
        for _ in range(n_layers):
            layers += [nn.Linear(d, n_hidden), nn.LayerNorm(n_hidden), nn.GELU(), nn.Dropout(dropout)]
            d = n_hidden
        layers.append(nn.Linear(d, n_output))
        super().__init__(*layers)


class GeneMLPEncoder(nn.Module):
    """Gene tower: MLP on log-normalised expression (library size → ``target_sum``, then ``log1p``).

    Takes raw counts (B, n_genes) and returns (B, n_output) unnormalised embeddings.
    """

    def __init__(
        self,
        n_genes: int,
        n_output: int,
        *,
        n_hidden: int = 512,
        n_layers: int = 1,
        dropout: float = 0.1,
        target_sum: float = 1e4,
    ) -> None:
        super().__init__()
        self.target_sum = target_sum
        self.mlp = MLP(n_genes, n_output, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)

    @staticmethod
    def normalize(counts: torch.Tensor, target_sum: float = 1e4) -> torch.Tensor:
        """Library-size normalisation and ``log1p`` (identical to ``imagene._utils.log_normalize``)."""
        lib = counts.sum(1, keepdim=True).clamp(min=1.0)
        return torch.log1p(counts / lib * target_sum)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.normalize(counts.float(), self.target_sum))
