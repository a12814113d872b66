"""SIGMMA: hierarchical multi-scale graph alignment of H&E tiles and cell- or spot-resolved expression."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData
from scvi.model.base import BaseModelClass

from imagene._constants import KEYS
from imagene._settings import settings
from imagene._utils import log_normalize
from imagene._validate import check_int, check_max_epochs, renamed_kwarg
from imagene.data import TileGraphData, tile_datamodule
from imagene.model._base import AlignmentMixin
from imagene.model._spot import register_fields
from imagene.module._sigmma import SCALES, SIGMMAModule
from imagene.pp import prepare_tile_graphs
from imagene.train import ContrastiveTrainingPlan


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------
class SIGMMA(AlignmentMixin, BaseModelClass):
    """Hierarchical multi-scale graph / multi-crop alignment of H&E tiles and expression (SIGMMA).

    Jeong et al., "Hierarchical Graph-Based Multi-Scale Multi-modal Contrastive Alignment of
    Histopathology Image and Spatial Transcriptome". Each section is tessellated into square tiles
    (:func:`imagene.pp.tile_graphs`); each tile pairs its H&E square with the graph of the nodes
    (cells, or spots) inside it. Image side: the tile's 4x4 (micro), 2x2 (meso) and 1x1 (macro)
    patches embedded by a frozen encoder (:func:`imagene.pp.embed_tile_crops`) and mean-pooled per
    scale. Graph side: log-normalised expression through an MLP, one GraphConv per scale, with
    edges added between scales by a Gumbel-softmax sampler over an MLP edge score, only between
    nodes of neighbouring blocks (same block of the 2x2, then 1x1 grid), and attention pooling per
    scale (:class:`imagene.nn.MultiScaleGraphEncoder`). Loss: symmetric InfoNCE per scale, summed.

    Latents are per node (cell / spot): at each scale a node takes the embedding of its block
    (``pooling='block'``: its own micro / meso patch and the attention pool over the nodes of that
    block; the whole tile at macro) or of its whole tile (``pooling='tile'``).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        Width of the shared embedding of each scale.
    n_hidden
        Width of the node embeddings and of the image heads' hidden layer.
    dropout
        Dropout of the node MLP and the image heads.
    temperature
        Initial InfoNCE temperature (learned).
    use_graph
        ``False``: "no graph" ablation (each tile's nodes by the MLP alone, mean-pooled: a 1-D gene vector).
    stochastic_edges
        ``False``: "no stochastic edges" ablation (every allowed candidate edge kept).
    loss_scales
        Scales whose InfoNCE terms are summed; ``("macro",)`` is the single-scale ablation.
    tau
        Gumbel relaxation temperature.

    Examples
    --------
    >>> imagene.model.SIGMMA.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section")
    >>> model = imagene.model.SIGMMA(adata)
    >>> model.train(max_epochs=100)
    >>> z = model.get_latent_representation(modality="image", scale="macro")
    >>> imagene.tl.retrieve(model, query)
    """

    _module_cls = SIGMMAModule
    _uses_image_key = False  # it embeds its own multi-crop patches
    _training_plan_cls = ContrastiveTrainingPlan

    def __init__(
        self,
        adata: AnnData,
        n_latent: int = 64,
        n_hidden: int = 128,
        dropout: float = 0.2,
        temperature: float = 0.07,
        use_graph: bool = True,
        stochastic_edges: bool = True,
        loss_scales: Sequence[str] = SCALES,
        tau: float = 0.5,
    ) -> None:
        check_int("n_latent", n_latent, 1, hint="It is the width of the shared embedding: pass e.g. `n_latent=64`.")
        check_int("n_hidden", n_hidden, 1, hint="Pass a positive hidden width, e.g. `n_hidden=128`.")
        super().__init__(adata)
        crops = adata.uns.get(KEYS.TILE_CROPS)
        if crops is None:
            raise KeyError(
                f"adata.uns[{KEYS.TILE_CROPS!r}] not found; register the AnnData with `SIGMMA.setup_anndata` first "
                "(it builds the tile graphs and their multi-crop features)."
            )
        loss_scales = tuple(loss_scales)
        self.module = self._make_module(
            n_genes=self.summary_stats.n_vars, n_image_features=int(np.asarray(crops["features"]["4"]).shape[-1]),
            n_latent=n_latent, n_hidden=n_hidden, dropout=dropout, temperature=temperature, use_graph=use_graph,
            stochastic_edges=stochastic_edges, loss_scales=loss_scales, tau=tau,
        )
        self.tile_size_um_ = float(adata.uns[KEYS.TILE_GRAPHS]["tile_size_um"])
        self.reference_latent_ = None
        self.reference_counts_ = None
        self._cache: dict[Any, TileGraphData] = {}
        self._model_summary_string = (
            f"SIGMMA: {self.summary_stats.n_vars} genes, {self.tile_size_um_:.0f} µm tiles, n_latent={n_latent} "
            f"per scale, loss scales {loss_scales}, graph={use_graph}, stochastic edges={stochastic_edges}"
        )
        self.init_params_ = self._get_init_params(locals())

    def _init_without_data(self, init_kwargs: dict) -> None:
        """Plain attributes of a model loaded without data (see :func:`imagene.model._base.load_model`)."""
        self._cache = {}

    # ---- registration
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = "counts",
        *,
        image_key: str | None = "X_he_efficientnet_lite0",
        library_key: str | None = None,
        tile_size_um: float | None = None,
        n_neighs: int = 8,
        encoder: str = "efficientnet_lite0",
        crop_px: int = 64,
        batch_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register the inputs, building the tile graphs and their multi-crop features when absent.

        When ``adata`` has no tile graphs (:func:`imagene.pp.tile_graphs`) or no multi-crop features
        of ``encoder`` at ``crop_px`` (:func:`imagene.pp.embed_tile_crops`), they are computed here
        by :func:`imagene.pp.prepare_tile_graphs` and written to ``adata`` (obs ``imagene_tile_graphs_tile``, obsm ``imagene_tile_graphs_blocks``,
        obsp ``imagene_tile_graphs_connectivities`` / ``_distances``, uns ``imagene_tile_graphs`` and
        ``imagene_tile_crops``), once. The tiles are cut from the H&E of each section
        (``uns['spatial'][section]['metadata']['source_image_path']``). Like every scvi-tools model it
        also adds ``uns['_scvi_uuid']``, ``uns['_scvi_manager_uuid']`` and ``obs['_scvi_batch']``.

        Parameters
        ----------
        adata
            AnnData (not a view) of cells or spots with raw counts, centres in ``obsm['spatial']``
            (full-resolution pixels) and ``uns['spatial']`` with each section's image and microns per pixel.
        layer
            Layer with raw integer counts (``None`` for ``X``).
        image_key
            ``obsm`` key of per-spot frozen features; registered so that one call sets up any imagene
            model, not used by SIGMMA (it embeds its own multi-crop patches). ``None`` to skip.
        library_key
            ``obs`` column of sections; tiles never span sections, and ``train`` validates on a
            held-out section.
        tile_size_um
            Side of a tile (``None``: 4 times the median nearest-neighbour distance, i.e. 800 µm on
            legacy ST; the paper uses 128 µm tiles of Xenium cells).
        n_neighs
            Nearest neighbours per node in the within-tile proximity graph (candidate edges).
        encoder
            Frozen encoder of the multi-crop patches.
        crop_px
            Pixels per patch given to the encoder.
        batch_key
            Old name of ``library_key`` (deprecated).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Returns
        -------
        Nothing.
        """
        library_key = renamed_kwarg("library_key", library_key, "batch_key", batch_key, where="SIGMMA.setup_anndata")
        batch_key = None
        setup_method_args = cls._get_setup_method_args(**locals())
        cls._check_setup(
            adata, layer, image_key, library_key,
            image_hint="Pass `image_key=None` (SIGMMA embeds its own tile crops) or the obsm key of your frozen spot "
            "features.",
        )
        prepare_tile_graphs(
            adata, tile_size_um=tile_size_um, library_key=library_key, n_neighs=n_neighs, encoder=encoder,
            input_px=crop_px,
        )
        register_fields(cls, adata, setup_method_args, layer=layer, image_key=image_key, library_key=library_key,
                        **kwargs)

    # ---- data
    def _tile_data(self, adata: AnnData, *, need_gene: bool, need_image: bool) -> TileGraphData:
        args = self._setup_args
        key = (id(adata), adata.n_obs, need_gene, need_image)
        if adata is self.adata and key in self._cache:
            return self._cache[key]
        src = prepare_tile_graphs(  # a query gets its tiles on a light copy: nothing is written into it
            adata, tile_size_um=self.tile_size_um_, library_key=self.library_key, n_neighs=args.get("n_neighs", 8),
            encoder=args.get("encoder"), input_px=args.get("crop_px", 64), crops=need_image, copy=True,
        )
        x = log_normalize(self._gene_input(adata)) if need_gene else None
        data = TileGraphData.from_anndata(src, x=x, n_genes=self.summary_stats.n_vars, need_image=need_image)
        if adata is self.adata:
            self._cache[key] = data
        return data

    # ---- training
    def train(
        self,
        max_epochs: int = 200,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        batch_size: int = 32,
        validation_sections: Sequence[str] | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        restore_best_weights: bool = True,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        """Train on batches of whole tiles, then store the reference bank of :meth:`predict_expression`.

        With a ``library_key`` of several sections, the tiles of whole sections are held out for
        validation (``validation_sections``, default the last section) and early stopping watches
        ``recall5_validation`` (image→gene and gene→image Recall@5 % over the validation tiles);
        otherwise 10 % of the tiles (never of the spots) are held out.

        Parameters
        ----------
        max_epochs
            Maximum passes over the training tiles.
        lr, weight_decay
            AdamW settings.
        batch_size
            Tiles per step (the InfoNCE negatives).
        validation_sections
            Sections held out for validation.
        early_stopping
            Stop when ``recall5_validation`` has not improved for ``early_stopping_patience`` epochs.
        early_stopping_patience
            Epochs without improvement before stopping.
        restore_best_weights
            End with the weights of the best ``recall5_validation`` epoch.
        accelerator, devices
            Lightning device settings.
        plan_kwargs
            Passed to :class:`imagene.train.ContrastiveTrainingPlan`.
        checkpoint_dir, resume
            Write ``last.ckpt`` there after every epoch, and continue from it after an interruption
            (:func:`imagene.train.checkpoint_settings`).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer`.

        Returns
        -------
        Nothing; ``history``, ``train_indices`` and ``validation_indices`` (node positions) are set.
        """
        from scvi.train import TrainRunner

        from imagene.train import check_optimised, checkpoint_settings, monitoring_settings, trainable_snapshot

        max_epochs = check_max_epochs(max_epochs)
        data = self._tile_data(self.adata, need_gene=True, need_image=True)
        train_tiles, val_tiles = data.split(self._validation_mask(validation_sections), seed=settings.seed)
        if len(train_tiles) < 2:
            raise ValueError(
                f"Only {len(train_tiles)} training tile(s): contrastive training needs several. Use a smaller "
                "`tile_size_um` in setup_anndata, or more sections."
            )
        dm = tile_datamodule(data, train_tiles, val_tiles, min(batch_size, len(train_tiles)))
        has_val = len(val_tiles) >= 2
        if not has_val:
            early_stopping, restore_best_weights = False, False
            trainer_kwargs.setdefault("limit_val_batches", 0)
        plan_kwargs = {"optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay, **(plan_kwargs or {})}
        plan = self._training_plan_cls(self.module, **plan_kwargs)
        trainer_kwargs = monitoring_settings(
            trainer_kwargs, early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
            restore_best_weights=restore_best_weights, monitor="recall5_validation", mode="max", runner="scvi",
        )
        if not has_val:
            trainer_kwargs.pop("check_val_every_n_epoch")
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        trainer_kwargs.setdefault("use_distributed_sampler", False)  # the data module shards tiles by rank
        trainer_kwargs, ckpt_path = checkpoint_settings(trainer_kwargs, checkpoint_dir, resume, what="SIGMMA training")
        if ckpt_path is not None:
            trainer_kwargs["ckpt_path"] = ckpt_path
        self.module.train()  # Lightning keeps the mode a module is in
        before = trainable_snapshot(self.module)
        runner = TrainRunner(
            self, training_plan=plan, data_splitter=dm, max_epochs=max_epochs, accelerator=accelerator,
            devices=devices, early_stopping=early_stopping, **trainer_kwargs,
        )
        with warnings.catch_warnings():
            # a SIGMMA batch holds tiles, nodes and edges of different lengths: Lightning cannot infer
            # a batch size from it for the epoch means and says so at every step; the losses are per tile
            warnings.filterwarnings("ignore", message=".*Trying to infer the `batch_size`")
            runner()
        self._record_monitor(trainer_kwargs, ("recall5_validation", "max"), early_stopping)
        if ckpt_path is None:
            self._require_optimised(before, check_optimised)
        self._build_reference()

    # ---- latents
    @torch.inference_mode()
    def _latent(
        self, adata: AnnData, modality: str, scale: str, pooling: str, indices: np.ndarray, batch_size: int
    ) -> np.ndarray:
        self.module.eval()
        device = next(self.module.parameters()).device
        need_image = modality in ("image", "joint")
        need_gene = modality in ("gene", "joint")
        data = self._tile_data(adata, need_gene=need_gene, need_image=need_image)
        wanted = list(self.module.loss_scales) if scale == "all" else [scale]
        n_lat = self.module.gene_heads[0].out_features
        out = np.zeros((adata.n_obs, n_lat * len(wanted)), dtype=np.float32)
        tiles = sorted(set(data.tile_of[indices].tolist()))
        for group in data.batches(tiles, max(batch_size, 1)):
            t = data.collate(group, with_gene=need_gene, with_image=need_image)
            t = {k: v.to(device) for k, v in t.items()}
            z = self.module.node_latents(t, wanted, pooling, gene=need_gene, image=need_image)
            out[t["nodes"].cpu().numpy()] = z.float().cpu().numpy()
        return out[indices]

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 4096,
        *,
        modality: Literal["image", "gene", "joint"] = "joint",
        scale: Literal["micro", "meso", "macro", "all"] = "all",
        pooling: Literal["block", "tile"] = "block",
    ) -> np.ndarray:
        """Per-node (cell / spot) embedding at one scale or all scales, one finite unit-norm row per node.

        Parameters
        ----------
        adata
            AnnData to embed (the training AnnData when ``None``): it needs ``obsm['spatial']`` and its
            section image in ``uns['spatial']`` for ``'image'`` (the tile crops are cut and embedded on
            the fly when the AnnData has none, without writing into it), the counts for ``'gene'``.
        indices
            Subset of nodes (their whole tiles are encoded).
        batch_size
            Nodes per forward pass (whole tiles are kept together).
        modality
            ``'image'``, ``'gene'`` or ``'joint'`` (normalised sum of both, per scale).
        scale
            ``'micro'``, ``'meso'``, ``'macro'`` or ``'all'`` (the scales of the loss, concatenated and
            scaled to unit norm).
        pooling
            ``'block'``: a node takes the embedding of its block at that scale (its micro / meso patch
            and the attention pool over the nodes of that block; the tile at macro); ``'tile'``: of its
            whole tile (the tile-level embeddings the loss aligns).

        Returns
        -------
        (n_obs, n_latent) float32 array (``n_latent`` times the number of scales for ``'all'``).

        Examples
        --------
        >>> z = model.get_latent_representation(modality="image", scale="micro")
        """
        if modality not in ("image", "gene", "joint"):
            raise ValueError(f"modality must be 'image', 'gene' or 'joint'; got {modality!r}.")
        if scale not in (*SCALES, "all"):
            raise ValueError(f"scale must be one of {[*SCALES, 'all']}; got {scale!r}.")
        if pooling not in ("block", "tile"):
            raise ValueError(f"pooling must be 'block' or 'tile'; got {pooling!r}.")
        self._check_trained()
        adata = self._query(adata)
        idx = self._indices(adata, indices)
        return self._latent(adata, modality, scale, pooling, idx, batch_size)

    def _embed(self, adata: AnnData, modality: str, indices: Sequence[int] | None, batch_size: int) -> np.ndarray:
        return self._latent(adata, modality, "all", "block", self._indices(adata, indices), 4096)

    def embed_scales(
        self, adata: AnnData | None = None, *, modality: Literal["image", "gene", "joint"] = "joint", key_added: str | None = None
    ) -> None:
        """Deprecated: write ``obsm[f"{key_added}_{scale}"]`` (default prefix ``f"X_imagene_sigmma_{modality}"``) per scale and ``'all'``.

        Use ``imagene.tl.embed(model, adata, modality=modality, scale=scale, key_added=...)`` for each scale.
        """
        from imagene._utils import save_key

        warnings.warn(
            "SIGMMA.embed_scales is deprecated and will be removed: call `imagene.tl.embed(model, adata, "
            "modality=..., scale=..., key_added=...)` for each scale.", FutureWarning, stacklevel=2,
        )
        adata = self._query(adata)
        prefix = key_added or f"{KEYS.LATENT_PREFIX}sigmma_{modality}"
        zs = {s: self.get_latent_representation(adata, modality=modality, scale=s) for s in (*SCALES, "all")}
        for s, z in zs.items():
            save_key(adata, "obsm", f"{prefix}_{s}", z)

    def sample_edges(self, adata: AnnData | None = None, *, stochastic: bool = False) -> dict[str, np.ndarray]:
        """Edges the trained graph side adds at the meso and macro scales, as node-position pairs.

        Parameters
        ----------
        adata
            AnnData with counts (the training AnnData when ``None``).
        stochastic
            Draw Gumbel samples (training behaviour) instead of keeping edges whose probability is > 0.5.

        Returns
        -------
        ``{"meso": (2, E) array, "macro": (2, E) array}`` of the kept edges (both directions).

        Examples
        --------
        >>> edges = model.sample_edges()
        """
        self._check_trained()
        adata = self._query(adata)
        data = self._tile_data(adata, need_gene=True, need_image=False)
        was = self.module.training
        self.module.train(stochastic)
        out = {"meso": [], "macro": []}
        try:
            with torch.no_grad():
                for group in data.batches(data.node_tiles, 4096):
                    t = data.collate(group, with_gene=True, with_image=False)
                    nodes = t["nodes"].numpy()
                    for name, e in zip(("meso", "macro"), self.module.added_edges(t), strict=False):
                        out[name].append(nodes[e.numpy()])
        finally:
            self.module.train(was)
        return {k: np.concatenate(v, axis=1) if v else np.zeros((2, 0), np.int64) for k, v in out.items()}

