"""SIGMMA's torch module: multi-crop image heads and a multi-scale graph encoder aligned per scale."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from imagene.nn import MLP, LogitScale, MultiScaleGraphEncoder, info_nce

#: scale names, finest first (block grids 4x4, 2x2, 1x1)
SCALES = ("micro", "meso", "macro")


class SIGMMAModule(BaseModuleClass):
    """Hierarchical multi-scale graph / multi-crop image alignment (Jeong et al.), on tiles.

    Image side: the frozen features of each tile's patches at each scale (4x4 micro, 2x2 meso,
    1x1 macro) are mean-pooled and projected by one MLP head per scale → ``z^I_s``. Gene side:
    :class:`imagene.nn.MultiScaleGraphEncoder` over the tile's node graph (stochastic edges added
    under the block constraint between scales), attention-pooled per scale and projected by one
    linear head per scale → ``z^S_s``. Loss: the symmetric InfoNCE (cosine, learnable
    temperature) of each scale in ``loss_scales``, summed.

    Parameters
    ----------
    n_genes
        Width of the node features (log-normalised expression).
    n_image_features
        Width of the frozen patch features.
    n_latent
        Width of the shared embedding of each scale.
    n_hidden
        Width of the node embeddings and the image heads' hidden layer.
    dropout
        Dropout of the node MLP and the image heads.
    temperature
        Initial InfoNCE temperature (learned).
    use_graph
        ``False``: the "no graph" ablation (1-D gene vector per tile).
    stochastic_edges
        ``False``: the "no stochastic edges" ablation.
    loss_scales
        Scales whose InfoNCE terms are summed (``("macro",)`` is the single-scale ablation).
    tau
        Gumbel relaxation temperature.

    Examples
    --------
    >>> module = SIGMMAModule(n_genes=2000, n_image_features=1280)
    """

    _pair_keys = ("z_image", "z_gene")

    def __init__(
        self,
        n_genes: int,
        n_image_features: int,
        *,
        n_latent: int = 64,
        n_hidden: int = 128,
        dropout: float = 0.2,
        temperature: float = 0.07,
        use_graph: bool = True,
        stochastic_edges: bool = True,
        loss_scales: Sequence[str] = SCALES,
        tau: float = 0.5,
    ) -> None:
        super().__init__()
        unknown = set(loss_scales) - set(SCALES)
        if unknown or not loss_scales:
            raise ValueError(f"loss_scales must be a non-empty subset of {SCALES}; got {tuple(loss_scales)}.")
        self.loss_scales = tuple(s for s in SCALES if s in loss_scales)
        self.graph = MultiScaleGraphEncoder(
            n_genes, n_hidden, n_scales=len(SCALES), use_graph=use_graph, stochastic_edges=stochastic_edges,
            tau=tau, dropout=dropout,
        )
        self.image_norm = nn.LayerNorm(n_image_features)
        self.image_heads = nn.ModuleList(
            MLP(n_image_features, n_latent, n_hidden=n_hidden, n_layers=1, dropout=dropout) for _ in SCALES
        )
        self.gene_heads = nn.ModuleList(nn.Linear(n_hidden, n_latent) for _ in SCALES)
        self.logit_scale = LogitScale(temperature, learnable=True)

    # ---- encoders
    def encode_image_patches(self, patches: torch.Tensor, scale: int) -> torch.Tensor:
        """L2-normalised image embedding of patch features (..., d) at scale ``scale``."""
        return F.normalize(self.image_heads[scale](self.image_norm(patches.float())), dim=-1)

    def encode_image_tiles(self, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale tile embeddings from the (T, b*b, d) patch features of each scale (mean-pooled)."""
        return [self.encode_image_patches(c.float().mean(1), s) for s, c in enumerate(crops)]

    def encode_graph(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Node embeddings of every scale (:class:`imagene.nn.MultiScaleGraphEncoder`)."""
        return self.graph(
            tensors["x"],
            tensors["micro_edges"],
            [tensors["cand_meso"], tensors["cand_macro"]],
            tensors["blocks"],
            tensors["node_tile"],
        )

    def encode_gene_groups(self, h: torch.Tensor, index: torch.Tensor, dim_size: int, scale: int) -> torch.Tensor:
        """L2-normalised gene embedding of groups of nodes (tiles or blocks) at scale ``scale``."""
        return F.normalize(self.gene_heads[scale](self.graph.pool(h, index, dim_size, scale)), dim=-1)

    def node_latents(
        self, tensors: dict[str, torch.Tensor], scales: Sequence[str], pooling: str, *, gene: bool, image: bool
    ) -> torch.Tensor:
        """Per-node embeddings of a batch of whole tiles (:meth:`imagene.data.TileGraphData.collate`).

        At each of ``scales`` a node takes the embedding of its block (``pooling='block'``: its micro /
        meso patch and the attention pool over the nodes of that block; the tile at macro) or of its
        whole tile (``'tile'``): image, gene, or (both) their normalised sum. The scales are
        concatenated and scaled to unit norm.
        """
        node_tile, blocks, n_t = tensors["node_tile"], tensors["blocks"], int(tensors["n_tiles"])
        h = self.encode_graph(tensors)["h"] if gene else None
        zs = []
        for s_name in scales:
            s = SCALES.index(s_name)
            g = (4, 2, 1)[s]
            if pooling == "tile" or g == 1:
                index, n_groups = node_tile, n_t
            else:
                index, n_groups = node_tile * g * g + blocks[:, s], n_t * g * g
            parts = []
            if image:
                crops = tensors[f"crops_{s_name}"]
                if pooling == "tile" or g == 1:
                    zi = self.encode_image_patches(crops.mean(1), s)[node_tile]
                else:
                    zi = self.encode_image_patches(crops[node_tile, blocks[:, s]], s)
                parts.append(zi)
            if gene:
                parts.append(self.encode_gene_groups(h[s], index, n_groups, s)[index])
            z = parts[0] if len(parts) == 1 else F.normalize(parts[0] + parts[1], dim=-1)
            zs.append(z)
        return torch.cat(zs, dim=-1) / len(zs) ** 0.5

    def added_edges(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Edges the graph side adds at the meso and macro scales of a batch: (2, E) batch-local node pairs of weight > 0.5.

        Gumbel samples in training mode, the edges of probability > 0.5 in eval mode.
        """
        res = self.encode_graph(tensors)
        return [e[:, w > 0.5] for e, w in zip(res["edges"], res["weights"], strict=False)]

    def _concat(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        keep = [zs[SCALES.index(s)] for s in self.loss_scales]
        return torch.cat(keep, dim=-1) / len(keep) ** 0.5

    # ---- scvi-tools module contract
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
        return {"tensors": tensors}

    @auto_move_data
    def inference(self, tensors: dict[str, torch.Tensor]) -> dict:
        n_tiles = int(tensors["n_tiles"])
        crops = [tensors["crops_micro"], tensors["crops_meso"], tensors["crops_macro"]]
        z_img = self.encode_image_tiles(crops)
        out = self.encode_graph(tensors)
        z_gene = [self.encode_gene_groups(h, tensors["node_tile"], n_tiles, s) for s, h in enumerate(out["h"])]
        return {
            "z_image_scales": z_img,
            "z_gene_scales": z_gene,
            "z_image": self._concat(z_img),
            "z_gene": self._concat(z_gene),
            "edges": out["edges"],
            "edge_weights": out["weights"],
            "edge_probs": out["probs"],
        }

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {}

    def generative(self) -> dict:
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        scale = self.logit_scale()
        total, metrics = 0.0, {}
        for s in self.loss_scales:
            k = SCALES.index(s)
            loss_s, acc_s = info_nce(inference_outputs["z_image_scales"][k], inference_outputs["z_gene_scales"][k], scale)
            total = total + loss_s
            metrics[f"loss_{s}"] = loss_s.detach()
            metrics[f"top1_{s}"] = acc_s
        probs = inference_outputs["edge_probs"]
        if probs:
            allp = torch.cat([p.detach() for p in probs]) if any(p.numel() for p in probs) else None
            if allp is not None and allp.numel():
                metrics["edge_prob"] = allp.mean()
        metrics["temperature"] = (1.0 / scale).detach()
        n = inference_outputs["z_image"].shape[0]
        return LossOutput(loss=total, n_obs_minibatch=n, extra_metrics=metrics)

    def sample(self, *args, **kwargs):
        raise NotImplementedError("SIGMMAModule is not generative.")
