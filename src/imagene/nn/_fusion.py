"""Attention-Based Fusion Network (ABFN) of ST-Align and the niche-gene Transformer encoder.

Plain torch; nothing here imports anndata.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ABFN(nn.Module):
    """Attention-Based Fusion Network: cross-attention between image and gene tokens (ST-Align).

    Each ``d``-dim feature is reshaped to ``n_tokens`` (``s``) tokens of width ``l = d / s``. Image
    tokens attend to gene tokens and gene tokens to image tokens, each direction with its own
    single-head projections ``W_q, W_k, W_v ∈ R^{l×l}``; each enhanced stream is projected by
    ``W_I, W_G ∈ R^{l×l/2}`` and the two halves are concatenated token by token, giving a fused
    feature of width ``d`` again (Lin et al., 2024, Eq. 2-4).

    Parameters
    ----------
    dim
        Width ``d`` of the image and gene features (and of the fused output).
    n_tokens
        Number of tokens ``s``; ``dim`` must be divisible by it and ``dim / n_tokens`` must be even.
    dropout
        Dropout on the attention weights.
    residual
        Add each stream's own tokens to its attended tokens before the projection (a residual
        connection, not in the paper's equations; it keeps each modality's own signal from the
        first step, which stabilises training from scratch).

    Examples
    --------
    >>> import torch
    >>> from imagene.nn import ABFN
    >>> fuse = ABFN(64, n_tokens=8)
    >>> fuse(torch.randn(5, 64), torch.randn(5, 64)).shape
    torch.Size([5, 64])
    """

    def __init__(self, dim: int, n_tokens: int = 8, *, dropout: float = 0.0, residual: bool = True) -> None:
        super().__init__()
        dim, n_tokens = int(dim), int(n_tokens)
        if n_tokens < 1 or dim % n_tokens or (dim // n_tokens) % 2:
            raise ValueError(
                f"ABFN needs `dim` divisible by `n_tokens` into tokens of even width; got dim={dim}, "
                f"n_tokens={n_tokens}. Pick e.g. n_tokens=8 with a dim that is a multiple of 16."
            )
        self.dim, self.n_tokens, self.width = dim, n_tokens, dim // n_tokens
        self.residual = residual
        self.dropout = float(dropout)
        l = self.width
        # image queries gene (image stream enhanced by gene) and gene queries image
        self.q_image, self.k_gene, self.v_gene = (nn.Linear(l, l, bias=False) for _ in range(3))
        self.q_gene, self.k_image, self.v_image = (nn.Linear(l, l, bias=False) for _ in range(3))
        self.w_image = nn.Linear(l, l // 2, bias=False)
        self.w_gene = nn.Linear(l, l // 2, bias=False)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape (B, d) features to (B, s, l) tokens."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ABFN expects (batch, {self.dim}) features; got {tuple(x.shape)}.")
        return x.reshape(x.shape[0], self.n_tokens, self.width)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)

    def forward(self, image: torch.Tensor, gene: torch.Tensor, *, return_attention: bool = False):
        """Fuse (B, d) image and gene features into a (B, d) feature.

        Parameters
        ----------
        image, gene
            (B, d) features of the same spots (or niches).
        return_attention
            Also return the image→gene and gene→image attention maps, each (B, s, s).

        Returns
        -------
        The fused (B, d) feature (and the two attention maps when requested).
        """
        t_i, t_g = self.tokens(image), self.tokens(gene)
        enh_i = self._attend(self.q_image(t_i), self.k_gene(t_g), self.v_gene(t_g))
        enh_g = self._attend(self.q_gene(t_g), self.k_image(t_i), self.v_image(t_i))
        if self.residual:
            enh_i, enh_g = enh_i + t_i, enh_g + t_g
        fused = torch.cat([self.w_image(enh_i), self.w_gene(enh_g)], dim=-1).reshape(image.shape[0], self.dim)
        if not return_attention:
            return fused
        scale = 1.0 / math.sqrt(self.width)
        a_ig = torch.softmax(self.q_image(t_i) @ self.k_gene(t_g).transpose(1, 2) * scale, dim=-1)
        a_gi = torch.softmax(self.q_gene(t_g) @ self.k_image(t_i).transpose(1, 2) * scale, dim=-1)
        return fused, a_ig, a_gi


class ConcatFusion(nn.Module):
    """The "no ABFN" ablation: concatenate the image and gene features and project back to ``d``.

    Parameters
    ----------
    dim
        Width of the inputs and of the output.

    Examples
    --------
    >>> import torch
    >>> from imagene.nn import ConcatFusion
    >>> ConcatFusion(32)(torch.randn(4, 32), torch.randn(4, 32)).shape
    torch.Size([4, 32])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * int(dim), int(dim))

    def forward(self, image: torch.Tensor, gene: torch.Tensor) -> torch.Tensor:
        """(B, d), (B, d) → (B, d)."""
        return self.proj(torch.cat([image, gene], dim=-1))


class NicheGeneTransformer(nn.Module):
    """Trainable Transformer encoder over niche expression (ST-Align's niche-gene encoder).

    The niche's log-normalised expression (library size → ``target_sum``, ``log1p``) is projected
    to ``n_tokens`` tokens of width ``d_model`` (through an ``n_hidden`` bottleneck, plus a learned
    position embedding),
    encoded by a :class:`torch.nn.TransformerEncoder` and mean-pooled to ``n_output``.

    Parameters
    ----------
    n_genes
        Number of genes of the input (mean counts of the niche).
    n_output
        Output width.
    n_tokens
        Tokens the expression is split into.
    d_model
        Token width.
    n_hidden
        Width of the bottleneck between the genes and the tokens.
    n_layers, n_heads, dropout
        Transformer size (the paper: 6 layers, 8 heads, dropout 0.1).
    target_sum
        Library size of the normalisation.

    Examples
    --------
    >>> import torch
    >>> from imagene.nn import NicheGeneTransformer
    >>> enc = NicheGeneTransformer(100, 32, n_tokens=4, d_model=16, n_layers=1, n_heads=2)
    >>> enc(torch.poisson(torch.ones(3, 100))).shape
    torch.Size([3, 32])
    """

    def __init__(
        self,
        n_genes: int,
        n_output: int,
        *,
        n_tokens: int = 16,
        d_model: int = 64,
        n_hidden: int = 256,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
        target_sum: float = 1e4,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.n_tokens, self.d_model, self.target_sum = int(n_tokens), int(d_model), target_sum
        self.embed = nn.Sequential(
            nn.Linear(n_genes, n_hidden),
            nn.LayerNorm(n_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(n_hidden, n_tokens * d_model),
        )
        self.position = nn.Parameter(torch.zeros(1, n_tokens, d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, n_output)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        """(B, n_genes) niche mean counts → (B, n_output)."""
        counts = counts.float()
        lib = counts.sum(1, keepdim=True).clamp(min=1e-6)
        x = torch.log1p(counts / lib * self.target_sum)
        tok = self.embed(x).reshape(x.shape[0], self.n_tokens, self.d_model) + self.position
        return self.out(self.norm(self.encoder(tok)).mean(1))
