"""UMPIRE's torch module: an image tower and a gene tower aligned by symmetric InfoNCE."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from imagene._constants import REGISTRY_KEYS
from imagene.nn import AdaptedEncoder, GeneMLPEncoder, ImageTower, LogitScale, adapter, get_gene_encoder, info_nce

#: training objectives of UMPIRE
OBJECTIVES = ("contrastive", "rec")
#: how the pre-trained encoders are trained
MODES = ("adapter", "finetune")


class UMPIREModule(BaseModuleClass):
    """Two towers (image, gene) projected to a shared space and aligned by symmetric InfoNCE.

    With ``objective='rec'`` (UMPIRE-REC) there is no gene tower: the image embedding is trained
    to reconstruct the log-normalised expression of selected genes (``rec_genes``) by MSE.

    Parameters
    ----------
    n_genes
        Number of genes of the gene tower's input (raw counts, log-normalised inside).
    n_image_features
        Width of the frozen image features (or channels when tiles are used).
    n_latent
        Width of the shared embedding.
    n_hidden, n_layers, dropout
        MLP sizes of both towers (``n_hidden`` is also the adapters' hidden width).
    temperature
        Initial InfoNCE temperature.
    learn_temperature
        Learn the temperature (CLIP) or keep it fixed.
    image_encoder, freeze_image_encoder, image_input_px
        Backbone applied to uint8 tiles (see :class:`ImageTower`); ``None`` uses frozen features.
    gene_encoder
        Gene encoder registry name (:func:`imagene.nn.get_gene_encoder`): ``'mlp'`` or ``'rank_transformer'``.
    gene_encoder_kwargs
        Passed to :func:`imagene.nn.get_gene_encoder` (e.g. ``weights`` and ``genes`` for a pre-trained
        rank transformer, ``gene_means``, ``n_tokens``, ``d_model``).
    mode
        ``'finetune'``: every parameter trains (encoders with MLP heads). ``'adapter'``: the gene
        encoder and the image backbone are frozen and each side gets a trainable :func:`adapter`.
    objective
        ``'contrastive'`` (symmetric InfoNCE) or ``'rec'`` (MSE reconstruction of ``rec_genes`` from
        the image embedding).
    rec_genes
        Column positions (in the gene input) of the genes reconstructed by ``objective='rec'``.
    image_context_widths
        Block widths of a context matrix image input (:func:`imagene.pp.context_matrix`): the image
        tower is then a :class:`imagene.nn.ContextTower` (see :class:`imagene.nn.ImageTower`).
    image_context_kwargs
        Passed to :class:`imagene.nn.ContextTower`.
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
        gene_encoder: str = "mlp",
        gene_encoder_kwargs: dict | None = None,
        mode: str = "finetune",
        objective: str = "contrastive",
        rec_genes: Sequence[int] | None = None,
        image_context_widths: Sequence[int] | None = None,
        image_context_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}; got {mode!r}.")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}; got {objective!r}.")
        if mode == "adapter" and image_encoder is not None and not freeze_image_encoder:
            raise ValueError("mode='adapter' freezes the image backbone; pass freeze_image_encoder=True or mode='finetune'.")
        self.mode, self.objective = mode, objective
        self.image_tower = ImageTower(
            n_image_features,
            n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
            encoder=image_encoder,
            freeze_encoder=freeze_image_encoder,
            input_px=image_input_px,
            head="adapter" if mode == "adapter" else "mlp",
            context_widths=image_context_widths,
            context_kwargs=image_context_kwargs,
        )
        self.gene_tower = None
        self.rec_decoder = None
        if objective == "contrastive":
            kwargs = dict(gene_encoder_kwargs or {})
            if mode == "finetune":
                if gene_encoder == "rank_transformer":
                    kwargs = {"n_hidden": n_hidden, "n_head_layers": n_layers, "dropout": dropout, **kwargs}
                else:
                    kwargs = {"n_hidden": n_hidden, "n_layers": n_layers, "dropout": dropout, **kwargs}
                self.gene_tower = get_gene_encoder(gene_encoder, n_genes, n_latent, **kwargs)
            else:
                if gene_encoder == "mlp":
                    kwargs = {"n_hidden": n_hidden, "n_layers": n_layers, "dropout": dropout, **kwargs}
                    enc = get_gene_encoder(gene_encoder, n_genes, n_latent, **kwargs)
                else:
                    enc = get_gene_encoder(gene_encoder, n_genes, None, **kwargs)
                self.gene_tower = AdaptedEncoder(enc, adapter(enc.n_output, n_latent, n_hidden))
        else:
            if rec_genes is None or len(rec_genes) == 0:
                raise ValueError("objective='rec' needs rec_genes (positions of the genes to reconstruct).")
            self.register_buffer("rec_genes", torch.as_tensor(np.asarray(rec_genes), dtype=torch.long))
            self.rec_decoder = nn.Linear(n_latent, len(rec_genes))
        self.logit_scale = LogitScale(temperature, learnable=learn_temperature and objective == "contrastive")

    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "image": tensors[REGISTRY_KEYS.IMAGE_KEY]}

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding."""
        return F.normalize(self.image_tower(image), dim=-1)

    def encode_gene(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised gene embedding of raw counts."""
        if self.gene_tower is None:
            raise ValueError(
                "This UMPIRE module was trained with objective='rec' and has no gene tower; use the image embedding "
                "(modality='image')."
            )
        return F.normalize(self.gene_tower(x), dim=-1)

    @auto_move_data
    def inference(self, x: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.objective == "rec":
            h = self.image_tower(image)
            return {"z_image": F.normalize(h, dim=-1), "h_image": h}
        return {"z_image": self.encode_image(image), "z_gene": self.encode_gene(x)}

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {}

    def generative(self) -> dict:
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        if self.objective == "rec":
            x = tensors[REGISTRY_KEYS.X_KEY].float()
            target = GeneMLPEncoder.normalize(x)[:, self.rec_genes]
            pred = self.rec_decoder(inference_outputs["h_image"])
            loss = F.mse_loss(pred, target)
            return LossOutput(loss=loss, n_obs_minibatch=x.shape[0], extra_metrics={"mse": loss.detach()})
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
