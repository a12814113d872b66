"""A context image tower: the spot, its larger tiles and its neighbours as tokens fused by attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ContextTower(nn.Module):
    """Fuse a spot's context blocks (its tile, larger tiles around it, its neighbours) into one vector.

    The input is the flat context matrix of :func:`imagene.pp.context_matrix`: blocks of widths
    ``widths`` side by side (spot features, then the features of larger tiles centred on the spot,
    then the mean feature of its neighbours). Each block becomes one token: layer-normalised,
    projected to ``d_model`` and given a learned embedding of its position in the context (spot,
    scale *s*, neighbours), in the spirit of TRIPLEX's target / neighbour / global tokens. A small
    Transformer encoder lets the tokens attend to each other, and the output is the spot token's
    state concatenated with the mean of all tokens, projected to ``n_output``. A learned gate starts
    near the spot token alone, so an untrained tower behaves like a plain projection of the spot
    feature and the context is added only as far as training finds it useful.

    Parameters
    ----------
    widths
        Width of each block, in the order they are concatenated (``uns[key]['widths']`` written by
        :func:`imagene.pp.context_matrix`). The first block is the spot itself.
    n_output
        Output width.
    d_model
        Token width inside the tower.
    n_heads
        Attention heads (must divide ``d_model``).
    n_layers
        Transformer encoder layers; ``0`` mixes the tokens by the mean only.
    dropout
        Dropout inside the encoder layers and on the output.

    Examples
    --------
    >>> tower = ContextTower([1280, 1280, 1280, 1280], n_output=128)
    >>> tower(torch.randn(8, 4 * 1280)).shape
    torch.Size([8, 128])
    """

    def __init__(
        self,
        widths: Sequence[int],
        n_output: int,
        *,
        d_model: int = 256,
        n_heads: int = 4,
        n_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must list the positive width of every context block; got {widths}.")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}.")
        self.widths = widths
        self.n_input = sum(widths)
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, d_model)) for w in widths)
        self.position = nn.Parameter(torch.zeros(len(widths), d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False) if n_layers > 0 else None
        self.gate = nn.Parameter(torch.tensor(-2.0))  # sigmoid(-2) ≈ 0.12: mostly the spot at the start
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * d_model, n_output))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, n_blocks, d_model)`` tokens of the flat context matrix ``x`` (``(n, sum(widths))``)."""
        if x.dim() != 2 or x.shape[1] != self.n_input:
            raise ValueError(
                f"ContextTower expects (n, {self.n_input}) context features (blocks {self.widths}); got "
                f"{tuple(x.shape)}. Build them with imagene.pp.context_matrix and pass its uns['widths']."
            )
        blocks = torch.split(x, self.widths, dim=1)
        return torch.stack([p(b) for p, b in zip(self.proj, blocks, strict=True)], dim=1) + self.position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused representation, ``(n, n_output)``."""
        h = self.tokens(x)
        if self.encoder is not None:
            h = self.encoder(h)
        g = torch.sigmoid(self.gate)
        context = h.mean(dim=1)
        return self.out(torch.cat([h[:, 0], g * context], dim=1))
