"""Graph building blocks of SIGMMA: a Gumbel-softmax edge sampler under a block constraint, and a
multi-scale graph encoder (torch-geometric convolutions and attention pooling). No anndata here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imagene.nn._mlp import MLP


def gumbel_sigmoid(logits: torch.Tensor, tau: float = 1.0, *, hard: bool = True, sample: bool = True) -> torch.Tensor:
    """Relaxed Bernoulli (binary Gumbel-softmax) sample of ``sigmoid(logits)``.

    ``y = sigmoid((logits + log u - log(1 - u)) / tau)`` with ``u ~ U(0, 1)``; with ``hard=True`` the
    forward value is ``1[y > 0.5]`` and the gradient is that of ``y`` (straight-through).

    Parameters
    ----------
    logits
        Edge logits (any shape).
    tau
        Temperature of the relaxation (lower is closer to a hard sample).
    hard
        Straight-through hard 0/1 values.
    sample
        Add logistic noise; ``False`` gives the deterministic ``sigmoid(logits / tau)`` (inference).

    Returns
    -------
    Tensor of the shape of ``logits`` with values in [0, 1] (exactly 0 or 1 when ``hard``).

    Examples
    --------
    >>> w = gumbel_sigmoid(torch.zeros(5, requires_grad=True), tau=0.5)
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive; got {tau!r}.")
    if sample:
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        logits = logits + torch.log(u) - torch.log1p(-u)
    y = torch.sigmoid(logits / tau)
    if not hard:
        return y
    y_hard = (y > 0.5).to(y.dtype)
    return y_hard - y.detach() + y


class GumbelEdgeSampler(nn.Module):
    """Stochastic edge addition: score candidate node pairs with an MLP, keep them by a relaxed Bernoulli draw.

    A candidate edge ``(i, j)`` is scored by an MLP on the symmetric pair features
    ``[h_i + h_j, h_i * h_j]`` and kept with probability ``sigmoid(score)``, sampled by
    :func:`gumbel_sigmoid` (straight-through, so gradients reach the MLP). Only pairs whose nodes
    lie in the same tile and the same block of the current block grid (two neighbouring blocks of
    the finer grid) can ever be kept: others are removed before scoring.

    Parameters
    ----------
    n_input
        Width of the node features.
    n_hidden
        Hidden width of the edge-scoring MLP.
    tau
        Relaxation temperature.
    stochastic
        Sample edges (the paper); ``False`` keeps every allowed candidate with weight 1 (the "no
        stochastic edges" ablation: a fixed block-constrained proximity graph).

    Examples
    --------
    >>> sampler = GumbelEdgeSampler(32)
    >>> edge_index, weight, prob = sampler(h, candidates, block=blocks[:, 1], group=node_tile)
    """

    def __init__(self, n_input: int, n_hidden: int = 64, *, tau: float = 0.5, stochastic: bool = True) -> None:
        super().__init__()
        self.scorer = MLP(2 * n_input, 1, n_hidden=n_hidden, n_layers=1, dropout=0.0)
        self.tau = float(tau)
        self.stochastic = bool(stochastic)

    @staticmethod
    def allowed(candidates: torch.Tensor, block: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        """Mask of the candidate pairs that join two distinct nodes of the same block (and group)."""
        i, j = candidates
        ok = (block[i] == block[j]) & (i != j)
        if group is not None:
            ok &= group[i] == group[j]
        return ok

    def forward(
        self,
        h: torch.Tensor,
        candidates: torch.Tensor,
        *,
        block: torch.Tensor,
        group: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample edges among ``candidates``.

        Parameters
        ----------
        h
            (N, d) node features.
        candidates
            (2, E) candidate pairs (each unordered pair once).
        block
            (N,) block index of each node in the current block grid.
        group
            (N,) tile of each node (pairs across tiles are never kept).

        Returns
        -------
        ``edge_index`` (2, 2K) of the allowed candidates in both directions, their ``edge_weight``
        (2K,) (hard 0/1 values with straight-through gradients in training; 1 for kept edges at
        inference, where only those are returned), and the keep probability of each allowed pair (K,).
        """
        candidates = candidates[:, self.allowed(candidates, block, group)]
        if candidates.shape[1] == 0:
            empty = h.new_zeros(0)
            return candidates.new_zeros((2, 0)), empty, empty
        i, j = candidates
        if not self.stochastic:
            prob = h.new_ones(candidates.shape[1])
            w = prob
        else:
            logits = self.scorer(torch.cat([h[i] + h[j], h[i] * h[j]], dim=-1)).squeeze(-1)
            prob = torch.sigmoid(logits)
            w = gumbel_sigmoid(logits, self.tau, hard=True, sample=self.training)
            if not self.training:  # inference: keep only the chosen edges
                keep = w > 0.5
                candidates, w, i, j = candidates[:, keep], w[keep], i[keep], j[keep]
        edge_index = torch.cat([candidates, candidates.flip(0)], dim=1)
        return edge_index, torch.cat([w, w]), prob


class MultiScaleGraphEncoder(nn.Module):
    """SIGMMA's graph side: node MLP, then one GNN layer per scale with stochastic edges added between scales.

    Scale 0 (micro) convolves over the given micro graph (edges inside one finest block); before
    each coarser scale ``s`` a :class:`GumbelEdgeSampler` adds edges among the candidate pairs of
    that scale (nodes in the same block of grid ``s``), and the next
    :class:`torch_geometric.nn.GraphConv` convolves over all edges so far. Each scale ends with
    global attention pooling (:class:`torch_geometric.nn.aggr.AttentionalAggregation`) over the
    nodes of each tile, or of each block for block-level embeddings.

    Parameters
    ----------
    n_input
        Node input width (genes).
    n_hidden
        Node embedding width.
    n_scales
        Number of scales (3: micro, meso, macro).
    use_graph
        ``False``: the "no graph" ablation (1-D gene vector): node MLP only, mean pooling, no edges.
    stochastic_edges
        Sample the added edges (``False``: keep every allowed candidate).
    tau
        Gumbel relaxation temperature.
    dropout
        Dropout of the node MLP.

    Examples
    --------
    >>> enc = MultiScaleGraphEncoder(n_genes, 128)
    >>> out = enc(x, micro_edges, [cand_meso, cand_macro], blocks, node_tile, n_tiles)
    """

    def __init__(
        self,
        n_input: int,
        n_hidden: int = 128,
        *,
        n_scales: int = 3,
        use_graph: bool = True,
        stochastic_edges: bool = True,
        tau: float = 0.5,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        from torch_geometric.nn import GraphConv
        from torch_geometric.nn.aggr import AttentionalAggregation

        self.n_scales = int(n_scales)
        self.use_graph = bool(use_graph)
        self.node_mlp = MLP(n_input, n_hidden, n_hidden=n_hidden, n_layers=1, dropout=dropout)
        if self.use_graph:
            self.convs = nn.ModuleList(GraphConv(n_hidden, n_hidden, aggr="add") for _ in range(self.n_scales))
            self.norms = nn.ModuleList(nn.LayerNorm(n_hidden) for _ in range(self.n_scales))
            self.samplers = nn.ModuleList(
                GumbelEdgeSampler(n_hidden, n_hidden, tau=tau, stochastic=stochastic_edges)
                for _ in range(self.n_scales - 1)
            )
            self.pools = nn.ModuleList(
                AttentionalAggregation(gate_nn=nn.Linear(n_hidden, 1)) for _ in range(self.n_scales)
            )

    def forward(
        self,
        x: torch.Tensor,
        micro_edge_index: torch.Tensor,
        candidates: Sequence[torch.Tensor],
        blocks: torch.Tensor,
        node_tile: torch.Tensor,
    ) -> dict[str, list[torch.Tensor]]:
        """Node embeddings at every scale and the edges sampled on the way.

        Parameters
        ----------
        x
            (N, n_input) node features (log-normalised expression).
        micro_edge_index
            (2, E) micro graph, both directions.
        candidates
            One (2, E_s) tensor of candidate pairs per coarser scale.
        blocks
            (N, n_scales) block index of each node per scale (finest first).
        node_tile
            (N,) tile of each node.

        Returns
        -------
        ``{"h": [per-scale (N, n_hidden)], "edges": [per added scale (2, E)], "weights": [...],
        "probs": [...]}``.
        """
        h = self.node_mlp(x)
        if not self.use_graph:
            return {"h": [h] * self.n_scales, "edges": [], "weights": [], "probs": []}
        edge_index = micro_edge_index
        weight = h.new_ones(edge_index.shape[1])
        hs, added, weights, probs = [], [], [], []
        for s in range(self.n_scales):
            if s > 0:
                e, w, p = self.samplers[s - 1](h, candidates[s - 1], block=blocks[:, s], group=node_tile)
                added.append(e)
                weights.append(w)
                probs.append(p)
                edge_index = torch.cat([edge_index, e], dim=1)
                weight = torch.cat([weight, w])
            h = self.norms[s](h + F.gelu(self.convs[s](h, edge_index, edge_weight=weight)))
            hs.append(h)
        return {"h": hs, "edges": added, "weights": weights, "probs": probs}

    def pool(self, h: torch.Tensor, index: torch.Tensor, dim_size: int, scale: int) -> torch.Tensor:
        """Pool node embeddings of one scale per group (tile or block): attention pooling, or the mean without graph.

        Parameters
        ----------
        h
            (N, d) node embeddings of scale ``scale``.
        index
            (N,) group of each node in ``0 .. dim_size - 1``.
        dim_size
            Number of groups.
        scale
            Scale index (selects the attention pool).

        Returns
        -------
        (dim_size, d) pooled embeddings (zeros for empty groups).
        """
        if not self.use_graph:
            from torch_geometric.utils import scatter

            return scatter(h, index, dim=0, dim_size=dim_size, reduce="mean")
        return self.pools[scale](h, index, dim_size=dim_size)
