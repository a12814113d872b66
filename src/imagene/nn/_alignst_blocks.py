"""ALIGN-ST's building blocks (Zhou et al., MICCAI 2025): nuclei-aware image features, the pathology-guided
genomic prompter, the adaptive gene-gene semantic graph, the GraphSAGE patch refiner and the MSE + PCC loss.

Nothing here imports anndata: a section arrives as tensors (spot features, nuclei maps, a patch
graph) and genes as token states of their text descriptions. :class:`imagene.module.AlignSTModule`
assembles them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class NucleiCNN(nn.Module):
    """Five 3×3 conv + BatchNorm + ReLU blocks on a nuclei map, giving a grid of nuclei tokens.

    Parameters
    ----------
    n_output
        Width of each token.
    n_channels
        Channels of the nuclei map (1 for a nuclei density / mask).
    width
        Channels of the first block (doubled at each stride-2 block, capped at ``n_output``).

    Examples
    --------
    >>> NucleiCNN(64)(torch.rand(2, 1, 32, 32)).shape
    torch.Size([2, 16, 64])
    """

    def __init__(self, n_output: int, *, n_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        chans = [n_channels, width, 2 * width, 4 * width, 4 * width, n_output]
        strides = [1, 2, 2, 2, 1]  # 32 px -> 4 x 4 tokens
        self.blocks = nn.Sequential(*[_conv_bn_relu(chans[i], chans[i + 1], strides[i]) for i in range(5)])

    def forward(self, nuclei: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` maps → ``(B, H/8 · W/8, n_output)`` tokens."""
        return self.blocks(nuclei).flatten(2).transpose(1, 2)


class NucleiFusion(nn.Module):
    """Nuclei-distribution-aware spot features: global tile feature attends to nuclei tokens (residual).

    ``h = g + MHA(q=g, k=v=CNN(nuclei))`` followed by LayerNorm, where ``g`` is the projected
    global tile feature.

    Parameters
    ----------
    n_input
        Width of the global tile features.
    n_hidden
        Output width.
    n_heads
        Attention heads.
    dropout
        Dropout on the projected features.
    """

    def __init__(self, n_input: int, n_hidden: int, *, n_heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(n_input), nn.Dropout(dropout), nn.Linear(n_input, n_hidden))
        self.cnn = NucleiCNN(n_hidden)
        self.attn = nn.MultiheadAttention(n_hidden, n_heads, batch_first=True)
        self.norm = nn.LayerNorm(n_hidden)

    def forward(self, features: torch.Tensor, nuclei: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n_input)`` features and optional ``(B, 1, H, W)`` nuclei maps → ``(B, n_hidden)``."""
        g = self.proj(features.float())
        if nuclei is None:
            return self.norm(g)
        tokens = self.cnn(nuclei.float())
        q = g[:, None]
        fused, _ = self.attn(q, tokens, tokens, need_weights=False)
        return self.norm(g + fused[:, 0])


class GenomicPrompter(nn.Module):
    """Pathology-guided genomic prompter: coupled image and text transformers with deep prompts.

    The image stream is an ``n_layers`` transformer over the section's spot features with
    ``n_prompts`` learnable visual prompt tokens per layer (deep prompting: each layer's prompts are
    replaced by that layer's own). The text stream is an ``n_layers`` transformer over each gene's
    description tokens with a CLS token and ``n_prompts`` text prompts per layer. At every layer
    the text prompts are fused with the visual prompts' outputs (which have attended to the
    section's patches), projected to the text space:
    ``P_text = α · proj(P_visual) + (1 − α) · P_text``. A gene's embedding is its CLS output, so
    it depends on both its description and the tissue it is predicted in.

    Parameters
    ----------
    n_hidden
        Width of both streams.
    n_text_input
        Width of the text token states (384 for all-MiniLM-L6-v2).
    n_layers
        Layers of each stream.
    n_prompts
        Prompt tokens per layer and stream.
    n_heads
        Attention heads.
    alpha
        Weight of the visual prompts in the gated fusion (0.2 in the paper).
    dropout
        Dropout inside the transformer layers.

    Examples
    --------
    >>> p = GenomicPrompter(64, n_text_input=384)
    >>> patches, genes = p(torch.rand(10, 64), torch.rand(7, 12, 384), torch.ones(7, 12, dtype=torch.bool))
    >>> patches.shape, genes.shape
    (torch.Size([10, 64]), torch.Size([7, 64]))
    """

    def __init__(
        self,
        n_hidden: int,
        *,
        n_text_input: int = 384,
        n_layers: int = 4,
        n_prompts: int = 2,
        n_heads: int = 4,
        alpha: float = 0.2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}.")
        self.alpha = float(alpha)
        self.n_prompts = int(n_prompts)

        def layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(
                n_hidden, n_heads, dim_feedforward=2 * n_hidden, dropout=dropout, batch_first=True, norm_first=True
            )

        self.image_layers = nn.ModuleList([layer() for _ in range(n_layers)])
        self.text_layers = nn.ModuleList([layer() for _ in range(n_layers)])
        self.visual_prompts = nn.Parameter(0.02 * torch.randn(n_layers, n_prompts, n_hidden))
        self.text_prompts = nn.Parameter(0.02 * torch.randn(n_layers, n_prompts, n_hidden))
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, n_hidden))
        self.v2t = nn.ModuleList([nn.Linear(n_hidden, n_hidden) for _ in range(n_layers)])
        self.text_in = nn.Sequential(nn.LayerNorm(n_text_input), nn.Linear(n_text_input, n_hidden))
        self.text_skip = nn.Linear(n_text_input, n_hidden)
        self.image_norm = nn.LayerNorm(n_hidden)
        self.text_norm = nn.LayerNorm(n_hidden)

    def encode_image(self, patches: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(n, d)`` spot features of one section → refined ``(n, d)`` and each layer's visual prompt outputs."""
        x = patches[None]
        p = self.n_prompts
        prompt_out = []
        for i, blk in enumerate(self.image_layers):
            x = blk(torch.cat([self.visual_prompts[i][None], x[:, p:] if i else x], dim=1))
            prompt_out.append(x[0, :p])
        return self.image_norm(x[0, p:]), prompt_out

    def encode_text(
        self, tokens: torch.Tensor, mask: torch.Tensor, visual_prompts: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``(G, L, n_text_input)`` token states and ``(G, L)`` mask → ``(G, d)`` gene embeddings (CLS + pooled tokens)."""
        g = tokens.shape[0]
        p = self.n_prompts
        x = self.text_in(tokens.float())
        keep = torch.cat([torch.ones(g, 1 + p, dtype=torch.bool, device=x.device), mask.bool()], dim=1)
        pad = ~keep
        x = torch.cat([self.cls.expand(g, -1, -1), x.new_zeros(g, p, x.shape[-1]), x], dim=1)
        for i, blk in enumerate(self.text_layers):
            prompt = self.text_prompts[i]
            if visual_prompts is not None:
                prompt = self.alpha * self.v2t[i](visual_prompts[i]) + (1.0 - self.alpha) * prompt
            x = torch.cat([x[:, :1], prompt[None].expand(g, -1, -1), x[:, 1 + p :]], dim=1)
            x = blk(x, src_key_padding_mask=pad)
        # residual from the mean-pooled description tokens keeps genes apart (the CLS alone, behind
        # shared prompts, collapses to nearly the same vector for every gene early in training)
        m = mask.float()[..., None]
        pooled = (tokens.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.text_norm(x[:, 0] + self.text_skip(pooled))

    def forward(
        self, patches: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined patch features ``(n, d)`` and slide-conditioned gene embeddings ``(G, d)``."""
        refined, prompts = self.encode_image(patches)
        return refined, self.encode_text(tokens, mask, prompts)


class GeneSemanticGraph(nn.Module):
    """Adaptive semantic interaction graph over genes (top-k affinity neighbours, gated attention).

    ``Z = W_z e``; affinity ``softmax(Z Zᵀ / √D)``; each gene keeps its ``k`` most similar other
    genes; ``β_ij ∝ exp(aᵀ (Z_j ⊙ tanh(Z_i + Z_j)))`` over those neighbours (the paper's gate,
    reduced to a scalar by a learned vector ``a``); output ``W_f [Z_i ; Σ_j β_ij Z_j]``.

    Parameters
    ----------
    n_hidden
        Width of the gene embeddings.
    k
        Neighbours per gene (4 in the paper).

    Examples
    --------
    >>> GeneSemanticGraph(32, k=4)(torch.rand(9, 32)).shape
    torch.Size([9, 32])
    """

    def __init__(self, n_hidden: int, *, k: int = 4) -> None:
        super().__init__()
        self.k = int(k)
        self.proj = nn.Linear(n_hidden, n_hidden)
        self.gate = nn.Linear(n_hidden, 1, bias=False)
        self.out = nn.Linear(2 * n_hidden, n_hidden)

    def neighbours(self, z: torch.Tensor) -> torch.Tensor:
        """``(G, k')`` indices of each gene's top-k affinity neighbours (itself excluded; ``k' = min(k, G-1)``)."""
        aff = torch.softmax(z @ z.T / math.sqrt(z.shape[-1]), dim=-1)
        aff = aff.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), -1.0)
        return aff.topk(min(self.k, z.shape[0] - 1), dim=-1).indices

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        """``(G, d)`` gene embeddings → ``(G, d)`` graph-refined gene embeddings."""
        z = self.proj(genes)
        if z.shape[0] < 2:
            return self.out(torch.cat([z, torch.zeros_like(z)], dim=-1))
        nb = self.neighbours(z)
        zj = z[nb]  # (G, k, d)
        score = self.gate(zj * torch.tanh(z[:, None] + zj)).squeeze(-1)
        beta = torch.softmax(score, dim=-1)
        agg = (beta[..., None] * zj).sum(1)
        return self.out(torch.cat([z, agg], dim=-1))


class SAGERefiner(nn.Module):
    """GraphSAGE (torch-geometric ``SAGEConv``) over a patch graph, with residual connections.

    Parameters
    ----------
    n_hidden
        Feature width (kept).
    n_layers
        SAGE layers.
    dropout
        Dropout between layers.
    """

    def __init__(self, n_hidden: int, *, n_layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        from torch_geometric.nn import SAGEConv

        self.convs = nn.ModuleList([SAGEConv(n_hidden, n_hidden) for _ in range(n_layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(n_hidden) for _ in range(n_layers)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` features and ``(2, E)`` edges → ``(n, d)``."""
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = norm(x + self.dropout(F.gelu(conv(x, edge_index))))
        return x


def mse_pcc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """ALIGN-ST's loss: MSE + (1 − mean per-gene Pearson r over the spots of the batch).

    Parameters
    ----------
    pred, target
        ``(n_spots, n_genes)`` predictions and targets.
    eps
        Guard for constant columns.

    Returns
    -------
    The loss and the batch's mean per-gene Pearson r (detached).
    """
    mse = F.mse_loss(pred, target)
    pc = pred - pred.mean(0)
    tc = target - target.mean(0)
    r = (pc * tc).sum(0) / (pc.norm(dim=0) * tc.norm(dim=0) + eps)
    pcc = r.mean()
    return mse + (1.0 - pcc), pcc.detach()
