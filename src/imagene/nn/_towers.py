"""Towers of the two-tower models: an image tower over features or tiles, adapters on frozen encoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imagene.nn._context import ContextTower
from imagene.nn._mlp import MLP
from imagene.nn._registry import get_image_encoder


def adapter(n_input: int, n_output: int, n_hidden: int) -> nn.Sequential:
    """UMPIRE's adapter: two trainable linear layers with a ReLU between them.

    Parameters
    ----------
    n_input, n_output
        Input and output widths.
    n_hidden
        Width of the hidden layer.

    Returns
    -------
    ``Linear(n_input, n_hidden) → ReLU → Linear(n_hidden, n_output)``.
    """
    return nn.Sequential(nn.Linear(n_input, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_output))


class ImageTower(nn.Module):
    """Image side: frozen features → MLP, or uint8 tiles → (optionally frozen) backbone → MLP.

    Parameters
    ----------
    n_input
        Width of the frozen features (ignored when ``encoder`` is given).
    n_output
        Latent width.
    encoder
        Registry name of an image backbone applied to tiles; ``None`` for precomputed features.
    freeze_encoder
        Keep the backbone's weights fixed.
    input_px
        Resize tiles to this size before the backbone (``None``: the backbone's native size).
    head
        ``'mlp'`` (:class:`imagene.nn.MLP`) or ``'adapter'`` (:func:`adapter`: Linear → ReLU → Linear,
        UMPIRE-ADAPTER's trainable layers on a frozen encoder).
    context_widths
        Block widths of a context matrix (``uns[key]['widths']`` of :func:`imagene.pp.context_matrix`):
        the input is then that matrix and a :class:`imagene.nn.ContextTower` (one token per block,
        fused by attention, ``d_model=n_hidden``, the tower's ``dropout``) replaces the LayerNorm and
        ``head`` (each token has its own LayerNorm). ``None``: plain features.
    context_kwargs
        Passed to :class:`imagene.nn.ContextTower` (``d_model``, ``n_heads``, ``n_layers``, ``dropout``).
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        *,
        n_hidden: int = 512,
        n_layers: int = 1,
        dropout: float = 0.1,
        encoder: str | None = None,
        freeze_encoder: bool = True,
        input_px: int | None = None,
        head: str = "mlp",
        context_widths: Sequence[int] | None = None,
        context_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if head not in ("mlp", "adapter"):
            raise ValueError(f"head must be 'mlp' or 'adapter'; got {head!r}.")
        if context_widths is not None and encoder is not None:
            raise ValueError(
                "context_widths describe a context matrix of frozen features; they cannot be combined with an image "
                f"encoder on tiles (encoder={encoder!r})."
            )
        self.backbone = None
        self.input_px = input_px
        if encoder is not None:
            self.backbone = get_image_encoder(encoder)
            n_input = self.backbone.n_features
            if freeze_encoder:
                self.backbone.requires_grad_(False)
        self.freeze_encoder = freeze_encoder
        self.context_widths = None if context_widths is None else [int(w) for w in context_widths]
        if self.context_widths is not None:
            if sum(self.context_widths) != n_input:
                raise ValueError(
                    f"context_widths {self.context_widths} sum to {sum(self.context_widths)}, but the image input has "
                    f"{n_input} columns; pass the uns[key]['widths'] written by imagene.pp.context_matrix for that key."
                )
            self.norm = nn.Identity()
            kwargs = {"d_model": n_hidden, "dropout": dropout, **(context_kwargs or {})}
            self.head = ContextTower(self.context_widths, n_output, **kwargs)
        elif head == "adapter":
            self.norm = nn.LayerNorm(n_input)
            self.head = adapter(n_input, n_output, n_hidden)
        else:
            self.norm = nn.LayerNorm(n_input)
            self.head = MLP(n_input, n_output, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = self.backbone.prepare(image, self.input_px or self.backbone.input_px)
            if self.freeze_encoder:
                self.backbone.eval()
                with torch.no_grad():
                    image = self.backbone(x)
            else:
                image = self.backbone(x)
        return self.head(self.norm(image.float()))


class AdaptedEncoder(nn.Module):
    """A frozen encoder followed by a trainable adapter (UMPIRE-ADAPTER).

    The encoder always runs in evaluation mode without gradients; only the adapter trains.

    Parameters
    ----------
    encoder
        Any module (its weights are frozen here).
    head
        Trainable module applied to the encoder's output (e.g. :func:`adapter`).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.adapter = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.encoder.eval()
        with torch.no_grad():
            h = self.encoder(x)
        return self.adapter(h)
