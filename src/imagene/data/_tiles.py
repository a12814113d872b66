"""Tile graphs of an AnnData as arrays a module can batch: whole tiles with their nodes, edges and crop features."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from anndata import AnnData

from imagene._constants import KEYS

#: names of the scales, finest first, and the block grid of each (as in :func:`imagene.pp.tile_graphs`, ``grid=4``)
SCALES = ("micro", "meso", "macro")
GRIDS = (4, 2, 1)


class TileGraphData:
    """Per-tile nodes, micro edges, candidate edges and crop features of one AnnData (numpy).

    Built from the keys of :func:`imagene.pp.tile_graphs` (``grid=4``) and, for the image side,
    :func:`imagene.pp.embed_tile_crops`; see :meth:`from_anndata`. Edges are grouped by tile so
    that a batch of whole tiles is cut without searching the graphs.

    Parameters
    ----------
    tile_of
        (n_obs,) tile of each node.
    blocks
        (n_obs, 3) block of each node at the micro, meso and macro scale.
    micro
        (n_obs, n_obs) sparse micro graph (edges inside one micro block).
    dist
        (n_obs, n_obs) sparse within-tile proximity graph (the candidate edges of the coarser scales).
    crops
        Multi-crop features by block grid (``{'4': (n_tiles, 16, d), '2': ..., '1': ...}``), or ``None``.
    x
        (n_obs, n_genes) gene input of the nodes, or ``None`` (zeros are batched).
    n_genes
        Number of genes (width of the zero input when ``x`` is ``None``).

    Examples
    --------
    >>> data = imagene.data.TileGraphData.from_anndata(adata, x=x, n_genes=adata.n_vars)
    >>> batch = data.collate(data.node_tiles[:8])
    """

    def __init__(
        self,
        tile_of: np.ndarray,
        blocks: np.ndarray,
        micro: Any,
        dist: Any,
        crops: dict[str, np.ndarray] | None,
        x: np.ndarray | None,
        n_genes: int,
    ) -> None:
        import scipy.sparse as sp

        self.n_obs = len(tile_of)
        self.n_tiles = int(tile_of.max()) + 1 if len(tile_of) else 0
        self.tile_of = tile_of.astype(np.int64)
        self.blocks = blocks.astype(np.int64)
        self.crops = crops
        self.x = x
        self.n_genes = n_genes
        order = np.argsort(self.tile_of, kind="stable")
        ptr = np.searchsorted(self.tile_of[order], np.arange(self.n_tiles + 1))
        self.nodes = [order[ptr[t] : ptr[t + 1]] for t in range(self.n_tiles)]
        self.node_tiles = [t for t in range(self.n_tiles) if len(self.nodes[t])]
        m = sp.coo_matrix(micro)
        d = sp.triu(sp.coo_matrix(dist), k=1).tocoo()
        i, j = d.row.astype(np.int64), d.col.astype(np.int64)
        b = self.blocks
        meso = (b[i, 1] == b[j, 1]) & (b[i, 0] != b[j, 0])  # joins two micro blocks of one meso block
        macro = (b[i, 1] != b[j, 1]) & (self.tile_of[i] == self.tile_of[j])  # joins two meso blocks of one tile
        self.micro = self._by_tile(m.row.astype(np.int64), m.col.astype(np.int64))
        self.cand_meso = self._by_tile(i[meso], j[meso])
        self.cand_macro = self._by_tile(i[macro], j[macro])

    @classmethod
    def from_anndata(
        cls,
        adata: AnnData,
        *,
        x: np.ndarray | None = None,
        n_genes: int,
        need_image: bool = True,
        tiles_key: str = KEYS.TILE_GRAPHS,
        crops_key: str = KEYS.TILE_CROPS,
    ) -> TileGraphData:
        """The tile graphs (and crop features) stored in ``adata`` by :func:`imagene.pp.tile_graphs` / :func:`imagene.pp.embed_tile_crops`.

        Parameters
        ----------
        adata
            AnnData with ``obs[f"{tiles_key}_tile"]``, ``obsm[f"{tiles_key}_blocks"]``,
            ``obsp[f"{tiles_key}_connectivities"]`` and ``obsp[f"{tiles_key}_distances"]``
            (and ``uns[crops_key]`` when ``need_image``).
        x
            (n_obs, n_genes) gene input of the nodes (e.g. log-normalised counts), or ``None``.
        n_genes
            Number of genes.
        need_image
            Read the crop features.
        tiles_key, crops_key
            Keys of the tile graphs and of the crop features.

        Returns
        -------
        The :class:`TileGraphData`.
        """
        g = tiles_key
        crops = None
        if need_image:
            crops = {k: np.asarray(v, dtype=np.float32) for k, v in adata.uns[crops_key]["features"].items()}
        return cls(
            np.asarray(adata.obs[f"{g}_tile"]), np.asarray(adata.obsm[f"{g}_blocks"]),
            adata.obsp[f"{g}_connectivities"], adata.obsp[f"{g}_distances"], crops, x, n_genes,
        )

    def split(self, node_val: np.ndarray | None, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation tiles (sorted; tiles without nodes are left out).

        Parameters
        ----------
        node_val
            Boolean mask of the validation nodes (e.g. held-out sections): their tiles validate. ``None``:
            10 % of the tiles at random (at least 2; none with fewer than 8 tiles).
        seed
            Seed of the random split.

        Returns
        -------
        ``(train_tiles, val_tiles)``.
        """
        tiles = np.asarray(self.node_tiles)
        rng = np.random.default_rng(seed)
        if node_val is not None:
            tile_val = np.zeros(self.n_tiles, bool)
            tile_val[self.tile_of[node_val]] = True
            return tiles[~tile_val[tiles]], tiles[tile_val[tiles]]
        n_val = max(2, int(round(0.1 * len(tiles)))) if len(tiles) >= 8 else 0
        perm = rng.permutation(tiles)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def _by_tile(self, r: np.ndarray, c: np.ndarray) -> list[np.ndarray]:
        keep = self.tile_of[r] == self.tile_of[c]
        r, c = r[keep], c[keep]
        t = self.tile_of[r]
        order = np.argsort(t, kind="stable")
        r, c, t = r[order], c[order], t[order]
        ptr = np.searchsorted(t, np.arange(self.n_tiles + 1))
        return [np.stack([r[ptr[k] : ptr[k + 1]], c[ptr[k] : ptr[k + 1]]]) for k in range(self.n_tiles)]

    def collate(self, tiles: Sequence[int], *, with_gene: bool = True, with_image: bool = True) -> dict[str, Any]:
        """One batch of whole tiles as tensors (node positions, tile-local edges, crop features).

        Parameters
        ----------
        tiles
            Tiles of the batch.
        with_gene
            Add the gene input ``x`` and the edges ``micro_edges``, ``cand_meso``, ``cand_macro``
            (node indices local to the batch).
        with_image
            Add the crop features ``crops_micro``, ``crops_meso``, ``crops_macro``.

        Returns
        -------
        Dict of tensors: ``nodes`` (positions in the AnnData), ``node_tile`` (tile of each node in the
        batch), ``blocks``, ``n_tiles`` and the gene / image parts above.
        """
        tiles = np.asarray(tiles, dtype=np.int64)
        nodes = np.concatenate([self.nodes[t] for t in tiles])
        local = np.full(self.n_obs, -1, dtype=np.int64)
        local[nodes] = np.arange(len(nodes))
        tile_local = np.repeat(np.arange(len(tiles)), [len(self.nodes[t]) for t in tiles])

        def edges(per_tile: list[np.ndarray]) -> torch.Tensor:
            e = np.concatenate([per_tile[t] for t in tiles], axis=1) if len(tiles) else np.zeros((2, 0), np.int64)
            return torch.as_tensor(local[e] if e.size else e.reshape(2, 0), dtype=torch.long)

        out: dict[str, Any] = {
            "nodes": torch.as_tensor(nodes),
            "node_tile": torch.as_tensor(tile_local),
            "blocks": torch.as_tensor(self.blocks[nodes]),
            "n_tiles": torch.tensor(len(tiles)),
        }
        if with_gene:
            x = self.x[nodes] if self.x is not None else np.zeros((len(nodes), self.n_genes), np.float32)
            out.update(
                x=torch.as_tensor(x),
                micro_edges=edges(self.micro),
                cand_meso=edges(self.cand_meso),
                cand_macro=edges(self.cand_macro),
            )
        if with_image:
            out.update({f"crops_{s}": torch.as_tensor(self.crops[str(g)][tiles]) for s, g in zip(SCALES, GRIDS)})
        return out

    def batches(self, tiles: Sequence[int], max_nodes: int) -> Iterator[list[int]]:
        """Consecutive groups of whole tiles with at most ``max_nodes`` nodes (one tile at least)."""
        cur, n = [], 0
        for t in tiles:
            k = len(self.nodes[t])
            if cur and n + k > max_nodes:
                yield cur
                cur, n = [], 0
            cur.append(int(t))
            n += k
        if cur:
            yield cur


class TileDataset(torch.utils.data.Dataset):
    """The tiles of a :class:`TileGraphData` as a torch dataset of tile indices (batched by its ``collate``).

    Parameters
    ----------
    data
        The tile graphs.
    tiles
        Tiles of the dataset (e.g. the training tiles).
    """

    def __init__(self, data: TileGraphData, tiles: np.ndarray) -> None:
        self.data, self.tiles = data, np.asarray(tiles, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> int:
        return int(self.tiles[i])


class TileBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of ``batch_size`` tiles; a last batch smaller than half a batch joins the previous one.

    Parameters
    ----------
    n
        Number of tiles.
    batch_size
        Tiles per batch (at least 2: the InfoNCE negatives).
    shuffle
        Draw a new order every epoch (``torch.randperm``); else the tiles in order.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool) -> None:
        self.n, self.batch_size, self.shuffle = n, max(2, int(batch_size)), shuffle

    def _batches(self) -> list[list[int]]:
        order = torch.randperm(self.n).tolist() if self.shuffle else list(range(self.n))
        out = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(out) > 1 and len(out[-1]) < self.batch_size // 2:
            last = out.pop()
            out[-1] = out[-1] + last
        return out

    def __iter__(self):
        yield from self._batches()

    def __len__(self) -> int:
        n_batches = -(-self.n // self.batch_size)
        last = self.n - (n_batches - 1) * self.batch_size
        return n_batches - 1 if n_batches > 1 and last < self.batch_size // 2 else n_batches


class TileGraphDataModule(pl.LightningDataModule):
    """Batches of whole tiles (nodes, edges, crop features) for SIGMMA (module level: picklable for ``ddp_spawn``).

    Under DDP each rank takes its share of the tiles (:func:`imagene.train.rank_shard`: Lightning
    cannot shard a batch sampler).

    Parameters
    ----------
    data
        The tile graphs.
    train_tiles, val_tiles
        Tiles of the training and validation batches.
    batch_size
        Tiles per batch.
    train_idx, val_idx
        Node positions of the training and validation tiles (the ``train_indices`` /
        ``validation_indices`` a scvi-tools model records); ``None``: the nodes of those tiles.
    """

    def __init__(
        self, data: TileGraphData, train_tiles, val_tiles, batch_size: int, train_idx=None, val_idx=None
    ) -> None:
        super().__init__()
        if train_idx is None or val_idx is None:
            node_val = np.isin(data.tile_of, val_tiles)
            train_idx, val_idx = np.flatnonzero(~node_val), np.flatnonzero(node_val)
        self.data, self.train_tiles, self.val_tiles, self.batch_size = data, train_tiles, val_tiles, batch_size
        self.train_idx, self.val_idx, self.test_idx = train_idx, val_idx, np.array([], dtype=int)

    def _loader(self, tiles, shuffle):
        from imagene.train import rank_shard

        # under DDP each rank takes its share of the tiles (Lightning cannot shard a batch sampler)
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        tiles = np.asarray(tiles)[rank_shard(len(tiles), trainer, equal=shuffle, seed=0 if shuffle else None,
                                             epoch=epoch)]
        ds = TileDataset(self.data, tiles)
        sampler = TileBatchSampler(len(ds), self.batch_size, shuffle)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=self.data.collate, num_workers=0)

    def train_dataloader(self):
        """Shuffled batches of the training tiles."""
        return self._loader(self.train_tiles, True)

    def val_dataloader(self):
        """Batches of the validation tiles in order (none without validation tiles)."""
        return self._loader(self.val_tiles, False) if len(self.val_tiles) else []


def tile_datamodule(
    data: TileGraphData, train_tiles, val_tiles, batch_size: int, train_idx=None, val_idx=None
) -> TileGraphDataModule:
    """The :class:`TileGraphDataModule` of a training run (the data splitter given to scvi-tools' ``TrainRunner``).

    Parameters
    ----------
    data
        The tile graphs.
    train_tiles, val_tiles
        Tiles of the training and validation batches.
    batch_size
        Tiles per batch.
    train_idx, val_idx
        Node positions of the training and validation tiles (``None``: the nodes of those tiles).

    Returns
    -------
    The data module.
    """
    return TileGraphDataModule(data, train_tiles, val_tiles, batch_size, train_idx, val_idx)
