"""ST-Align's torch module: spot and niche image-gene encoders, ABFN fusion and the three-target loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from imagene._constants import REGISTRY_KEYS
from imagene.nn import (
    ABFN, MLP, ConcatFusion, GeneMLPEncoder, LogitScale, NicheGeneTransformer, get_image_encoder, info_nce,
)


class _FeatureHead(nn.Module):
    """LayerNorm → MLP on frozen features."""

    def __init__(self, n_input: int, n_output: int, *, n_hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(n_input)
        self.mlp = MLP(n_input, n_output, n_hidden=n_hidden, n_layers=1, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x.float()))


class _TileEncoder(nn.Module):
    """A trainable registry backbone on uint8 spot tiles (B, px, px, 3) → (B, n_output)."""

    def __init__(self, name: str, n_output: int, *, input_px: int, width: int | None = None) -> None:
        super().__init__()
        kw = {} if width is None else {"width": int(width)}
        self.backbone = get_image_encoder(name, n_features=n_output, input_px=input_px, **kw)
        self.backbone.train()
        self.input_px = input_px

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        # Spot tiles are uint8 RGB by contract (obsm), but the training data loader hands them over
        # as float32 in 0-255: scale by 255 whatever the dtype so that training and inference agree.
        return self.backbone(self.backbone.prepare(tiles.float() / 255.0, self.input_px))


class STAlignModule(BaseModuleClass):
    """ST-Align (Lin et al., 2024): four encoders, the ABFN and a spot / niche / spot-niche loss.

    Spot level: the spot image (uint8 tiles through a CNN trained from scratch, or frozen tile
    features through an MLP when ``adaptive_encoders=False``) and the spot expression (the gene
    encoder, :class:`imagene.nn.GeneMLPEncoder` by default). Niche level: frozen features of a
    larger niche tile through an MLP, and the niche's mean expression through a trainable
    Transformer (:class:`imagene.nn.NicheGeneTransformer`; the gene MLP when
    ``adaptive_encoders=False``). One fusion module (:class:`imagene.nn.ABFN`, or
    :class:`imagene.nn.ConcatFusion` for ``fusion='concat'``) fuses image and gene at both levels.

    Loss: ``λ1·CL_spot + λ2·CL_niche + (1 − λ1 − λ2)·L_NS`` where ``CL`` is the symmetric image-gene
    InfoNCE (:func:`imagene.nn.info_nce`) at each level and ``L_NS`` the InfoNCE between each spot's
    fused feature and its own niche's fused feature (other niches of the batch are negatives). With
    ``niche_loss=False`` the loss is ``(λ1·CL_spot + λ2·CL_niche) / (λ1 + λ2)``.

    Parameters
    ----------
    n_genes
        Genes of the input counts.
    n_image_features
        Width of the frozen spot-tile features (``obsm[image_key]``).
    n_niche_image_features
        Width of the frozen niche-tile features.
    n_latent
        Width ``d`` of every encoder's output and of the fused features.
    n_hidden
        Hidden width of the MLP encoders and heads.
    dropout
        Dropout of the MLP encoders.
    n_tokens
        Tokens of the ABFN (``n_latent / n_tokens`` must be even).
    fusion
        ``'abfn'`` or ``'concat'`` (ablation).
    niche_loss
        Use the spot-niche term ``L_NS`` (ablation when ``False``).
    adaptive_encoders
        Context-specific encoders (spot CNN from scratch on tiles, niche-gene Transformer); ``False``
        uses the frozen spot features and the gene MLP at both levels (ablation).
    spot_image_encoder
        Registry name of the trainable spot-tile CNN.
    spot_tile_px
        Side of the spot tiles fed to that CNN.
    spot_cnn_width
        Channels of the first stage of the spot CNN (``'small_cnn'``: 16 by default, 4x cheaper than
        32 on CPU; ``None`` for encoders without a ``width`` setting).
    gene_encoder
        Spot-gene encoder: ``'mlp'`` or a name of :func:`imagene.nn.get_gene_encoder`.
    gene_encoder_kwargs
        Settings of that encoder.
    niche_transformer_kwargs
        Settings of :class:`imagene.nn.NicheGeneTransformer` (default 2 layers, 4 heads, dropout
        0.1; the paper: ``{"n_layers": 6, "n_heads": 8}``).
    lambda_spot, lambda_niche
        ``λ1``, ``λ2`` of the loss.
    temperature
        Initial temperature of each InfoNCE term (each term learns its own).
    probe_hidden
        Hidden width of the expression probe (an MLP from the image latent to every gene).
    """

    _pair_keys = ("z_image", "z_gene")

    def __init__(
        self,
        n_genes: int,
        n_image_features: int,
        n_niche_image_features: int,
        *,
        n_latent: int = 128,
        n_hidden: int = 256,
        dropout: float = 0.3,
        n_tokens: int = 8,
        fusion: str = "abfn",
        niche_loss: bool = True,
        adaptive_encoders: bool = True,
        spot_image_encoder: str = "small_cnn",
        spot_tile_px: int = 28,
        spot_cnn_width: int | None = 16,
        gene_encoder: str = "mlp",
        gene_encoder_kwargs: dict[str, Any] | None = None,
        niche_transformer_kwargs: dict[str, Any] | None = None,
        lambda_spot: float = 1 / 3,
        lambda_niche: float = 1 / 3,
        temperature: float = 0.07,
        probe_hidden: int = 256,
    ) -> None:
        super().__init__()
        if fusion not in ("abfn", "concat"):
            raise ValueError(f"fusion must be 'abfn' or 'concat'; got {fusion!r}.")
        if not (lambda_spot >= 0 and lambda_niche >= 0 and lambda_spot + lambda_niche <= 1):
            raise ValueError(
                f"lambda_spot and lambda_niche must be >= 0 with a sum <= 1; got {lambda_spot}, {lambda_niche}."
            )
        if not niche_loss and lambda_spot + lambda_niche == 0:
            raise ValueError("With niche_loss=False, lambda_spot + lambda_niche must be > 0.")
        d = int(n_latent)
        self.n_latent, self.adaptive_encoders, self.niche_loss = d, bool(adaptive_encoders), bool(niche_loss)
        self.lambda_spot, self.lambda_niche = float(lambda_spot), float(lambda_niche)
        # spot image
        if self.adaptive_encoders:
            self.spot_image = _TileEncoder(
                spot_image_encoder, d, input_px=int(spot_tile_px), width=spot_cnn_width
            )
        else:
            self.spot_image = _FeatureHead(n_image_features, d, n_hidden=n_hidden, dropout=dropout)
        # niche image: frozen features of the niche tile
        self.niche_image = _FeatureHead(n_niche_image_features, d, n_hidden=n_hidden, dropout=dropout)
        # spot gene
        kw = {"n_hidden": n_hidden, "dropout": dropout, **(gene_encoder_kwargs or {})}
        if gene_encoder == "mlp":
            self.spot_gene = GeneMLPEncoder(n_genes, d, **kw)
        else:
            from imagene.nn import get_gene_encoder

            self.spot_gene = get_gene_encoder(gene_encoder, n_genes, d, **(gene_encoder_kwargs or {}))
        # niche gene
        if self.adaptive_encoders:
            tkw = {"n_hidden": n_hidden, **(niche_transformer_kwargs or {})}
            self.niche_gene = NicheGeneTransformer(n_genes, d, **tkw)
        else:
            self.niche_gene = GeneMLPEncoder(n_genes, d, n_hidden=n_hidden, dropout=dropout)
        self.fusion = ABFN(d, n_tokens) if fusion == "abfn" else ConcatFusion(d)
        self.logit_scale = LogitScale(temperature)  # spot image-gene (also used by predict_expression)
        self.logit_scale_niche = LogitScale(temperature)
        self.logit_scale_ns = LogitScale(temperature)
        # expression probe (trained after the alignment, on the frozen image latent)
        self.probe = MLP(2 * d, n_genes, n_hidden=probe_hidden, n_layers=1, dropout=0.1)

    # ---- encoders
    def encode_image(self, spot_image: torch.Tensor) -> torch.Tensor:
        """Unnormalised spot image embedding (tiles when adaptive, else frozen features)."""
        return self.spot_image(spot_image)

    def encode_gene(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised spot gene embedding of raw counts."""
        return self.spot_gene(x)

    def encode_niche_image(self, niche_image: torch.Tensor) -> torch.Tensor:
        """Unnormalised niche image embedding of frozen niche-tile features."""
        return self.niche_image(niche_image)

    def encode_niche_gene(self, niche_x: torch.Tensor) -> torch.Tensor:
        """Unnormalised niche gene embedding of niche mean counts."""
        return self.niche_gene(niche_x)

    def fuse(self, image: torch.Tensor, gene: torch.Tensor) -> torch.Tensor:
        """Fused feature (unnormalised) of unnormalised image and gene embeddings."""
        return self.fusion(image, gene)

    def image_probe_input(self, spot_image: torch.Tensor, niche_image: torch.Tensor) -> torch.Tensor:
        """Input of the expression probe: the normalised spot and niche image embeddings, concatenated."""
        return torch.cat(
            [F.normalize(self.encode_image(spot_image), dim=-1), F.normalize(self.encode_niche_image(niche_image), dim=-1)],
            dim=-1,
        )

    def embed(
        self,
        modality: str,
        spot_image: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        niche_image: torch.Tensor | None = None,
        niche_x: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One embedding of a batch: L2-normalised ``'image'``, ``'gene'``, ``'fused'``, ``'niche'`` or
        ``'joint'`` (normalised sum of image and gene), or ``'probe'`` (:meth:`image_probe_input`)."""
        if modality == "probe":
            return self.image_probe_input(spot_image, niche_image)
        if modality == "image":
            z = self.encode_image(spot_image)
        elif modality == "gene":
            z = self.encode_gene(x)
        elif modality == "fused":
            z = self.fuse(self.encode_image(spot_image), self.encode_gene(x))
        elif modality == "niche":
            z = self.fuse(self.encode_niche_image(niche_image), self.encode_niche_gene(niche_x))
        elif modality == "joint":
            z = F.normalize(self.encode_image(spot_image), dim=-1) + F.normalize(self.encode_gene(x), dim=-1)
        else:
            raise ValueError(f"Unknown modality {modality!r}.")
        return F.normalize(z, dim=-1)

    def predict_probe(self, probe_input: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Expression of the probe (clamped at 0), on CPU, from :meth:`image_probe_input` rows (at least one), in batches."""
        device = next(self.parameters()).device
        with torch.inference_mode():
            return torch.cat([
                self.probe(probe_input[s : s + batch_size].to(device)).clamp(min=0).float().cpu()
                for s in range(0, probe_input.shape[0], batch_size)
            ])

    # ---- scvi-tools module contract
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spot = tensors[REGISTRY_KEYS.SPOT_TILES_KEY] if self.adaptive_encoders else tensors[REGISTRY_KEYS.IMAGE_KEY]
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "niche_x": tensors[REGISTRY_KEYS.NICHE_X_KEY],
            "spot_image": spot,
            "niche_image": tensors[REGISTRY_KEYS.NICHE_IMAGE_KEY],
        }

    @auto_move_data
    def inference(
        self, x: torch.Tensor, niche_x: torch.Tensor, spot_image: torch.Tensor, niche_image: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """All six embeddings of a batch (L2-normalised).

        Returns
        -------
        ``z_image``, ``z_gene`` (spot level), ``z_niche_image``, ``z_niche_gene`` (niche level),
        ``f_spot`` and ``f_niche`` (fused spot and niche features).
        """
        h_i, h_g = self.encode_image(spot_image), self.encode_gene(x)
        h_ni, h_ng = self.encode_niche_image(niche_image), self.encode_niche_gene(niche_x)
        f_s, f_n = self.fuse(h_i, h_g), self.fuse(h_ni, h_ng)
        return {
            "z_image": F.normalize(h_i, dim=-1),
            "z_gene": F.normalize(h_g, dim=-1),
            "z_niche_image": F.normalize(h_ni, dim=-1),
            "z_niche_gene": F.normalize(h_ng, dim=-1),
            "f_spot": F.normalize(f_s, dim=-1),
            "f_niche": F.normalize(f_n, dim=-1),
        }

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {}

    def generative(self) -> dict:
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs=None) -> LossOutput:
        """``λ1·CL_spot + λ2·CL_niche + (1 − λ1 − λ2)·L_NS`` (see the class docstring)."""
        out = inference_outputs
        cl_spot, acc = info_nce(out["z_image"], out["z_gene"], self.logit_scale())
        cl_niche, acc_n = info_nce(out["z_niche_image"], out["z_niche_gene"], self.logit_scale_niche())
        l_ns, acc_ns = info_nce(out["f_spot"], out["f_niche"], self.logit_scale_ns())
        l1, l2 = self.lambda_spot, self.lambda_niche
        if self.niche_loss:
            loss = l1 * cl_spot + l2 * cl_niche + (1.0 - l1 - l2) * l_ns
        else:
            loss = (l1 * cl_spot + l2 * cl_niche) / (l1 + l2)
        return LossOutput(
            loss=loss,
            n_obs_minibatch=out["z_image"].shape[0],
            extra_metrics={
                "cl_spot": cl_spot.detach(),
                "cl_niche": cl_niche.detach(),
                "l_ns": l_ns.detach(),
                "top1": acc,
                "top1_niche": acc_n,
                "top1_ns": acc_ns,
                "temperature": (1.0 / self.logit_scale()).detach(),
            },
        )

    def sample(self, *args, **kwargs):
        raise NotImplementedError("STAlignModule is not generative.")
