"""UMPIRE's torch module: an image tower and a gene tower aligned by symmetric InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from imagene._constants import REGISTRY_KEYS
from imagene.nn import MLP, GeneMLPEncoder, LogitScale, get_image_encoder, info_nce


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
    ) -> None:
        super().__init__()
        self.backbone = None
        self.input_px = input_px
        if encoder is not None:
            self.backbone = get_image_encoder(encoder)
            n_input = self.backbone.n_features
            if freeze_encoder:
                self.backbone.requires_grad_(False)
        self.freeze_encoder = freeze_encoder
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


class UMPIREModule(BaseModuleClass):
    """Two towers (image, gene) projected to a shared space and aligned by symmetric InfoNCE.

    Parameters
    ----------
    n_genes
        Number of genes of the gene tower's input (raw counts, log-normalised inside).
    n_image_features
        Width of the frozen image features (or channels when tiles are used).
    n_latent
        Width of the shared embedding.
    n_hidden, n_layers, dropout
        MLP sizes of both towers.
    temperature
        Initial InfoNCE temperature.
    learn_temperature
        Learn the temperature (CLIP) or keep it fixed.
    image_encoder, freeze_image_encoder, image_input_px
        Backbone applied to uint8 tiles (see :class:`ImageTower`); ``None`` uses frozen features.
    """

    def __init__(
        self,
        n_genes: int,
        n_image_features: int,
        *,
        n_latent: int = 128,
        n_hidden: int = 512,
        n_layers: int = 1,
        dropout: float = 0.1,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        image_encoder: str | None = None,
        freeze_image_encoder: bool = True,
        image_input_px: int | None = None,
    ) -> None:
        super().__init__()
        self.image_tower = ImageTower(
            n_image_features,
            n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
            encoder=image_encoder,
            freeze_encoder=freeze_image_encoder,
            input_px=image_input_px,
        )
        self.gene_tower = GeneMLPEncoder(n_genes, n_latent, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)
        self.logit_scale = LogitScale(temperature, learnable=learn_temperature)

    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "image": tensors[REGISTRY_KEYS.IMAGE_KEY]}

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding."""
        return F.normalize(self.image_tower(image), dim=-1)

    def encode_gene(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised gene embedding of raw counts."""
        return F.normalize(self.gene_tower(x), dim=-1)

    @auto_move_data
    def inference(self, x: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"z_image": self.encode_image(image), "z_gene": self.encode_gene(x)}

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {}

    def generative(self) -> dict:
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        z_i, z_g = inference_outputs["z_image"], inference_outputs["z_gene"]
        scale = self.logit_scale()
        loss, acc = info_nce(z_i, z_g, scale)
        return LossOutput(
            loss=loss,
            n_obs_minibatch=z_i.shape[0],
            extra_metrics={"top1": acc, "temperature": (1.0 / scale).detach()},
        )

    def sample(self, *args, **kwargs):
        raise NotImplementedError("UMPIREModule is not generative.")
