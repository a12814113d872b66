"""ALIGN-ST: zero-shot expression of genes never measured in training, from H&E and gene descriptions."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass

from imagene._constants import KEYS, REGISTRY_KEYS
from imagene._settings import settings
from imagene._utils import get_counts, log_normalize, warn
from imagene._validate import check_int, check_max_epochs, ddp_world_size
from imagene.model._base import AlignmentMixin, make_module, mc_dropout_sd, resolve_query
from imagene.module._alignst import AlignSTModule, mse_pcc_loss

logger = logging.getLogger("imagene")

_NUCLEI_KEY = "nuclei"


def patch_graph(coords: np.ndarray, features: np.ndarray, *, n_spatial: int = 6, n_feature: int = 6) -> np.ndarray:
    """Edges of one section's patch graph: spatial kNN ∪ feature-similarity kNN, symmetrised.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres.
    features
        ``(n, d)`` tile features (cosine similarity).
    n_spatial, n_feature
        Neighbours per spot in each graph.

    Returns
    -------
    ``(2, E)`` int64 edge index (``torch_geometric.utils.from_scipy_sparse_matrix`` of the union).
    """
    from sklearn.neighbors import kneighbors_graph
    from torch_geometric.utils import from_scipy_sparse_matrix

    n = coords.shape[0]
    adj = sp.csr_matrix((n, n), dtype=np.float32)
    if n > 1:
        adj = adj + kneighbors_graph(coords, min(n_spatial, n - 1), include_self=False)
        if n_feature > 0:
            adj = adj + kneighbors_graph(features, min(n_feature, n - 1), metric="cosine", include_self=False)
    adj = ((adj + adj.T) > 0).astype(np.float32)
    edge_index, _ = from_scipy_sparse_matrix(sp.coo_matrix(adj))
    return edge_index.numpy()


class _SectionPlanModule(L.LightningModule):
    """Lightning wrapper of an AlignST module (module level: picklable for ``ddp_spawn``)."""

    def __init__(
        self, module: AlignSTModule, lr: float, weight_decay: float, n_genes_per_step: int | None, seed: int
    ) -> None:
        super().__init__()
        self.module = module
        self.lr, self.weight_decay, self.n_genes_per_step = lr, weight_decay, n_genes_per_step
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch_losses: list[float] = []
        self.epoch_pcc: list[float] = []
        self.epoch_val_pcc: list[float] = []
        self._buf: list[tuple[float, float]] = []
        self._val_buf: list[float] = []
        self.train_batches: list[dict] = []

    def train_dataloader(self):
        """One whole section per step; under DDP each rank trains on its share of the sections."""
        from imagene.train import rank_shard

        shard = [_as_tensors(self.train_batches[i]) for i in rank_shard(len(self.train_batches), self.trainer, seed=0)]
        return torch.utils.data.DataLoader(shard, batch_size=None, shuffle=True, num_workers=0)

    def training_step(self, batch, batch_idx):  # noqa: ARG002
        tokens, mask, y = batch["tokens"], batch["mask"], batch["y"]
        n_genes_per_step = self.n_genes_per_step
        if n_genes_per_step is not None and tokens.shape[0] > n_genes_per_step:
            sel = torch.randperm(tokens.shape[0], generator=self.gen)[:n_genes_per_step].to(tokens.device)
            tokens, mask, y = tokens[sel], mask[sel], y[:, sel]
        out = self.module(batch["features"], batch.get("nuclei"), batch["edge_index"], tokens, mask)
        loss, pcc = mse_pcc_loss(out["pred"], y)
        self._buf.append((float(loss.detach()), float(pcc)))
        self.log("train_loss", loss, batch_size=y.shape[0], prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: ARG002
        # all seen genes, no sampling: a fixed target for early stopping
        out = self.module(batch["features"], batch.get("nuclei"), batch["edge_index"], batch["tokens"],
                          batch["mask"])
        loss, pcc = mse_pcc_loss(out["pred"], batch["y"])
        n = batch["y"].shape[0]
        self.log("validation_loss", loss, batch_size=n, on_epoch=True)
        self.log("pcc_validation", pcc, batch_size=n, on_epoch=True, prog_bar=True)
        self._val_buf.append(float(pcc))

    def on_validation_epoch_end(self) -> None:
        if self._val_buf and not self.trainer.sanity_checking:
            self.epoch_val_pcc.append(float(np.mean(self._val_buf)))
        self._val_buf = []

    def on_train_epoch_end(self) -> None:
        if self._buf:
            self.epoch_losses.append(float(np.mean([b[0] for b in self._buf])))
            self.epoch_pcc.append(float(np.mean([b[1] for b in self._buf])))
        self._buf = []

    def configure_optimizers(self):
        return torch.optim.AdamW(self.module.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def _as_tensors(batch: dict) -> dict:
    return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class _SectionPlan:
    @staticmethod
    def build(module: AlignSTModule, lr: float, weight_decay: float, n_genes_per_step: int | None, seed: int):
        return _SectionPlanModule(module, lr, weight_decay, n_genes_per_step, seed)


class AlignST(BaseModelClass):
    """Zero-shot spatial expression from H&E and gene descriptions (ALIGN-ST, Zhou et al., MICCAI 2025).

    Each gene is a text description (``"<SYMBOL>: <name>. Aliases: ... . GO: ..."`` from the table
    shipped with imagene, :func:`imagene.datasets.gene_descriptions`, or your own), embedded token
    by token by a real offline language model (all-MiniLM-L6-v2, :class:`imagene.nn.TextEncoder`),
    or a user-supplied gene embedding from ``varm``. Spots are frozen tile features fused with a
    nuclei map (H&E colour deconvolution, :func:`imagene.pp.nuclei_maps`) by a small CNN and
    cross-attention. A pathology-guided genomic prompter couples an image transformer over the
    section's spots and a text transformer over each description through gated prompt fusion; an
    adaptive top-k gene graph refines the gene embeddings; GraphSAGE refines the spots over a
    spatial + feature-similarity graph; and ``ŷ_{i,c} = F_i · F_cᵀ`` (log1p CP10k), trained with
    MSE + (1 − PCC). Any gene with a description can be predicted, also genes never measured.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_hidden
        Width of every stream (the spot latent).
    n_layers
        Layers of the prompter's image and text transformers (4 in the paper).
    n_prompts
        Prompts per layer and stream (2 in the paper).
    alpha
        Weight of the visual prompts in the text prompts (0.2 in the paper).
    k_genes
        Neighbours per gene in the semantic graph (4 in the paper).
    n_spatial_neighbors, n_feature_neighbors
        Neighbours per spot in the spatial and the feature-similarity patch graph.
    max_text_length
        Tokens kept per description (short for speed; descriptions start with symbol and name).
    dropout
        Dropout.
    **module_kwargs
        Passed to :class:`imagene.module.AlignSTModule`.

    Examples
    --------
    >>> imagene.model.AlignST.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", batch_key="section")
    >>> model = imagene.model.AlignST(adata)
    >>> model.train(max_epochs=50)
    >>> pred = model.predict_expression(query, genes=["ERBB2", "KRT19"])  # any gene with a description
    >>> adata.obsm["X_imagene_alignst"] = model.get_latent_representation()
    """

    _module_cls = AlignSTModule

    def __init__(
        self,
        adata: AnnData,
        n_hidden: int = 128,
        n_layers: int = 4,
        n_prompts: int = 2,
        alpha: float = 0.2,
        k_genes: int = 4,
        n_spatial_neighbors: int = 6,
        n_feature_neighbors: int = 6,
        max_text_length: int = 32,
        dropout: float = 0.1,
        **module_kwargs: Any,
    ) -> None:
        check_int("n_hidden", n_hidden, 1, hint="Pass a positive hidden width, e.g. `n_hidden=128`.")
        super().__init__(adata)
        args = self._setup_args
        self._init_without_data(
            {"n_spatial_neighbors": n_spatial_neighbors, "n_feature_neighbors": n_feature_neighbors,
             "max_text_length": max_text_length}
        )
        emb_key = args.get("gene_embedding_key")
        n_text = 384 if emb_key is None else int(adata.varm[emb_key].shape[1])
        self.module = make_module(
            self,
            self.summary_stats[f"n_{REGISTRY_KEYS.IMAGE_KEY}"],
            n_text_input=n_text,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_prompts=n_prompts,
            alpha=alpha,
            k_genes=k_genes,
            dropout=dropout,
            use_nuclei=self.use_nuclei,
            **module_kwargs,
        )
        self.seen_genes_: list[str] | None = None
        self.gene_embedding_table_: pd.DataFrame | None = None
        self._model_summary_string = (
            f"AlignST: image input {self.image_key!r}, nuclei maps {'on' if self.use_nuclei else 'off'}, "
            f"gene side {'text (all-MiniLM-L6-v2)' if emb_key is None else f'varm[{emb_key!r}]'}, n_hidden={n_hidden}"
        )
        self.init_params_ = self._get_init_params(locals())

    def _init_without_data(self, init_kwargs: dict) -> None:
        """Plain attributes, set from the init arguments (also for a model loaded without data)."""
        self.use_nuclei = self._setup_args.get("nuclei_key") is not None
        self.n_spatial_neighbors = int(init_kwargs.get("n_spatial_neighbors", 6))
        self.n_feature_neighbors = int(init_kwargs.get("n_feature_neighbors", 6))
        self.max_text_length = int(init_kwargs.get("max_text_length", 32))
        self._token_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    #: the loader of every imagene model: with or without data (see :meth:`imagene.model.UMPIRE.load`)
    load = classmethod(AlignmentMixin.load.__func__)

    @property
    def gene_names(self) -> pd.Index:
        """The model's genes: the seen (training) genes, predicted by default; any gene with a description can be asked for."""
        return pd.Index(self.seen_genes_ or [])

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = "counts",
        *,
        image_key: str = "X_he_efficientnet_lite0",
        batch_key: str | None = None,
        spatial_key: str = KEYS.SPATIAL,
        nuclei_key: str | None = KEYS.NUCLEI,
        gene_text: Mapping[str, str] | pd.Series | None = None,
        gene_embedding_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register the inputs; compute the nuclei maps when they are missing.

        Besides scvi-tools' registration keys (``uns['_scvi_uuid']``, ``uns['_scvi_manager_uuid']``,
        ``obs['_scvi_batch']``), this writes ``obsm[nuclei_key]`` when it is absent, with
        :func:`imagene.pp.nuclei_maps` (tiles cut from each section's H&E via
        ``uns['spatial'][section]['metadata']['source_image_path']`` or the stored images). When no
        image can be read, a warning says so and the model uses the global tile features only.

        Parameters
        ----------
        adata
            AnnData (not a view) with raw counts, frozen tile features and spot coordinates.
        layer
            Layer of raw integer counts (``None`` for ``X``).
        image_key
            ``obsm`` key of frozen tile features (:func:`imagene.pp.embed_tiles`).
        batch_key
            ``obs`` column of sections: graphs and prompts are built per section.
        spatial_key
            ``obsm`` key of spot centres.
        nuclei_key
            ``obsm`` key of ``(n, px, px)`` nuclei maps (yours, e.g. from a HoVer-Net mask, or
            computed); ``None`` to use global tile features only.
        gene_text
            Your descriptions, symbol → text; they override the shipped ones.
        gene_embedding_key
            ``varm`` key of your own gene embeddings (e.g. an LLM's, ``(n_vars, D)``), used instead
            of the text encoder (each gene is then one token).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        AlignmentMixin._check_setup(adata, layer, image_key, batch_key)
        if np.asarray(adata.obsm[image_key]).ndim != 2:
            raise ValueError(f"adata.obsm[{image_key!r}] must be (n_obs, n_features) frozen tile features.")
        if spatial_key not in adata.obsm:
            raise KeyError(f"adata.obsm[{spatial_key!r}] (spot centres) not found; pass `spatial_key=`.")
        if gene_embedding_key is not None and gene_embedding_key not in adata.varm:
            raise KeyError(f"adata.varm[{gene_embedding_key!r}] not found; store your (n_vars, D) gene embeddings there.")
        if gene_text is not None and not isinstance(gene_text, (Mapping, pd.Series)):
            raise TypeError(f"gene_text must be a dict or Series symbol -> text; got {type(gene_text).__name__}.")
        if nuclei_key is not None and nuclei_key not in adata.obsm:
            from imagene.pp import nuclei_maps

            try:
                nuclei_maps(adata, library_key=batch_key, key_added=nuclei_key, show_progress_bar=False)
            except (FileNotFoundError, KeyError, ValueError, OSError) as e:
                warn(
                    f"Nuclei maps could not be computed ({e}); AlignST will use the global tile features only. "
                    f"Register the H&E images or pass your own maps in adata.obsm[{nuclei_key!r}]."
                )
                nuclei_key = None
        if nuclei_key is not None and np.asarray(adata.obsm[nuclei_key]).ndim not in (3, 4):
            raise ValueError(f"adata.obsm[{nuclei_key!r}] must hold (n_obs, px, px) nuclei maps.")
        gene_text = None if gene_text is None else {str(k): str(v) for k, v in dict(gene_text).items()}
        setup_method_args = cls._get_setup_method_args(
            cls=cls, adata=adata, layer=layer, image_key=image_key, batch_key=batch_key, spatial_key=spatial_key,
            nuclei_key=nuclei_key, gene_text=gene_text, gene_embedding_key=gene_embedding_key, kwargs=kwargs,
        )
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            ObsmField(REGISTRY_KEYS.IMAGE_KEY, image_key),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @property
    def _setup_args(self) -> dict:
        return self.registry_["setup_args"]

    @property
    def image_key(self) -> str:
        """``obsm`` key of the frozen tile features."""
        return self._setup_args["image_key"]

    # ------------------------------------------------------------------ genes
    def _gene_tokens(
        self,
        genes: Sequence[str],
        gene_text: Mapping[str, str] | pd.Series | None = None,
        gene_embeddings: pd.DataFrame | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token states ``(G, L, D)`` and mask of ``genes`` (text encoder, or one token from varm embeddings)."""
        emb_key = self._setup_args.get("gene_embedding_key")
        genes = [str(g) for g in genes]
        if emb_key is not None:
            if self.adata is not None:
                table = pd.DataFrame(np.asarray(self.adata.varm[emb_key]), index=self.adata.var_names)
            else:  # loaded without data: the seen genes' embeddings were saved with the model
                table = self.gene_embedding_table_ if self.gene_embedding_table_ is not None else pd.DataFrame()
            if gene_embeddings is not None:
                table = pd.concat([table[~table.index.isin(gene_embeddings.index)], pd.DataFrame(gene_embeddings)])
            missing = [g for g in genes if g not in table.index]
            if missing:
                raise KeyError(
                    f"No embedding for {len(missing)} genes (e.g. {missing[:5]}); the model uses "
                    f"varm[{emb_key!r}]: pass `gene_embeddings=` (DataFrame genes x {table.shape[1]}) for new genes."
                )
            vals = table.loc[genes].to_numpy(np.float32)[:, None, :]
            return vals, np.ones(vals.shape[:2], bool)
        from imagene.datasets import gene_descriptions
        from imagene.nn import get_text_encoder

        user = dict(self._setup_args.get("gene_text") or {})
        if gene_text is not None:
            user.update({str(k): str(v) for k, v in dict(gene_text).items()})
        texts = gene_descriptions(genes, gene_text=user or None)
        missing = [g for g in genes if g not in texts.index]
        if missing:
            raise KeyError(
                f"No description for {len(missing)} genes (e.g. {missing[:5]}). Pass them as `gene_text=` "
                "({symbol: description}) or leave them out."
            )
        todo = [g for g in genes if (g, texts[g]) not in self._token_cache]
        if todo:
            states, mask = get_text_encoder().encode_tokens(
                [texts[g] for g in todo], max_length=self.max_text_length, show_progress_bar=settings.progress_bar
            )
            for g, s, m in zip(todo, states, mask, strict=True):
                self._token_cache[(g, texts[g])] = (s.astype(np.float16), m)
        pairs = [self._token_cache[(g, texts[g])] for g in genes]
        return np.stack([p[0] for p in pairs]).astype(np.float32), np.stack([p[1] for p in pairs])

    def _default_seen_genes(self, n_seen_genes: int, exclude: Sequence[str]) -> list[str]:
        """The ``n_seen_genes`` most expressed training genes (mean log1p CP10k) with a description, minus ``exclude``."""
        from imagene.datasets import gene_descriptions

        x = log_normalize(self._counts(self.adata))
        order = np.argsort(-x.mean(0), kind="stable")
        names = self.adata.var_names[order]
        names = names[~names.isin(list(exclude))]
        if self._setup_args.get("gene_embedding_key") is None:
            user = self._setup_args.get("gene_text") or None
            has = gene_descriptions(list(names[: 4 * n_seen_genes + 100]), gene_text=user).index
            names = names[names.isin(has)]
        return list(names[:n_seen_genes])

    # ------------------------------------------------------------------ sections
    def _counts(self, adata: AnnData) -> sp.csr_matrix:
        layer = self._setup_args.get("layer")
        return sp.csr_matrix(get_counts(adata, layer, check=False), dtype=np.float32)

    def _sections(self, adata: AnnData) -> dict[str, np.ndarray]:
        key = self._setup_args.get("batch_key")
        if key is None or key not in adata.obs:
            return {"all": np.arange(adata.n_obs)}
        codes = pd.Categorical(adata.obs[key].astype(str))
        return {str(c): np.flatnonzero(codes == c) for c in codes.categories if (codes == c).any()}

    def _section_inputs(self, adata: AnnData, idx: np.ndarray) -> dict[str, torch.Tensor]:
        key = self.image_key
        if key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{key!r}] not found. The model was set up with image_key={key!r}: compute it for this "
                "AnnData the same way (`imagene.pp.extract_tiles` then `imagene.pp.embed_tiles`)."
            )
        feats = np.asarray(adata.obsm[key])[idx].astype(np.float32)
        if feats.shape[1] != self.summary_stats[f"n_{REGISTRY_KEYS.IMAGE_KEY}"]:
            raise ValueError(
                f"adata.obsm[{key!r}] has {feats.shape[1]} columns but the model was trained on "
                f"{self.summary_stats[f'n_{REGISTRY_KEYS.IMAGE_KEY}']}; embed the tiles with the training encoder."
            )
        spatial_key = self._setup_args.get("spatial_key", KEYS.SPATIAL)
        if spatial_key not in adata.obsm:
            raise KeyError(f"adata.obsm[{spatial_key!r}] (spot centres) not found; the patch graph needs them.")
        coords = np.asarray(adata.obsm[spatial_key])[idx, :2].astype(np.float64)
        edges = patch_graph(coords, feats, n_spatial=self.n_spatial_neighbors, n_feature=self.n_feature_neighbors)
        out = {"features": torch.as_tensor(feats), "edge_index": torch.as_tensor(edges, dtype=torch.long)}
        if self.use_nuclei:
            nk = self._setup_args["nuclei_key"]
            if nk not in adata.obsm:
                from imagene.pp import nuclei_maps

                logger.info("Computing nuclei maps of the query (obsm[%r])", nk)
                nuclei_maps(adata, library_key=self._setup_args.get("batch_key"), key_added=nk, show_progress_bar=False)
            nuc = np.asarray(adata.obsm[nk])[idx].astype(np.float32)
            out["nuclei"] = torch.as_tensor(nuc[:, None] if nuc.ndim == 3 else np.moveaxis(nuc, -1, 1))
        return out

    # ------------------------------------------------------------------ train
    def train(
        self,
        max_epochs: int = 100,
        *,
        seen_genes: Sequence[str] | None = None,
        n_seen_genes: int = 256,
        unseen_genes: Sequence[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        n_genes_per_step: int | None = 128,
        validation_sections: Sequence[str] | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        restore_best_weights: bool = True,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        """Train on the seen genes; each step is one whole section (its patch graph, full batch).

        Parameters
        ----------
        max_epochs
            Passes over the sections.
        seen_genes
            Genes to train on. Default: the ``n_seen_genes`` most expressed genes of the training
            AnnData (mean log1p CP10k) that have a description, minus ``unseen_genes`` (cheap on
            14k genes; the paper trains on a measured panel).
        n_seen_genes
            Size of the default seen-gene set.
        unseen_genes
            Genes kept out of training (e.g. the ones to predict zero-shot).
        lr, weight_decay
            AdamW settings.
        n_genes_per_step
            Genes sampled per step (all when ``None``); sampling keeps the gene graph and text
            transformer cheap and varies each gene's graph neighbours.
        validation_sections
            Sections of ``batch_key`` held out of training: after each epoch the model predicts
            their seen genes (``pcc_validation``, mean per-gene Pearson r, and ``validation_loss`` in
            ``history_``). ``None`` (default): every section trains, for ``max_epochs``.
        early_stopping, early_stopping_patience
            With validation sections, stop when ``pcc_validation`` has not improved for that many epochs.
        restore_best_weights
            With validation sections, end with the weights of the epoch of best ``pcc_validation``
            (:class:`imagene.train.RestoreBestWeights`).
        accelerator, devices
            Lightning settings.
        checkpoint_dir, resume
            Write ``last.ckpt`` there after every epoch, and continue from it after an interruption
            (:func:`imagene.train.checkpoint_settings`).
        **trainer_kwargs
            Passed to :class:`lightning.Trainer`.
        """
        import lightning as L

        from imagene.train import check_optimised, checkpoint_settings, trainable_snapshot

        max_epochs = check_max_epochs(max_epochs)
        seed = settings.seed if settings.seed is not None else 0
        unseen = [str(g) for g in (unseen_genes or [])]
        if seen_genes is None:
            seen = self._default_seen_genes(int(n_seen_genes), unseen)
        else:
            seen = [str(g) for g in seen_genes]
            absent = [g for g in seen if g not in self.adata.var_names]
            if absent:
                raise KeyError(f"seen_genes not in adata.var_names: {absent[:5]}; train on measured genes only.")
            overlap = set(seen) & set(unseen)
            if overlap:
                raise ValueError(f"{len(overlap)} genes are both seen and unseen (e.g. {sorted(overlap)[:5]}).")
        if len(seen) < 2:
            raise ValueError("At least 2 seen genes are needed to train; pass more `seen_genes=`.")
        tokens, mask = self._gene_tokens(seen)
        y_all = log_normalize(self._counts(self.adata)[:, self.adata.var_names.get_indexer(seen)])
        held: set[str] = set()
        if validation_sections:
            # the same section checks as every other model (unknown sections, all sections held out)
            if AlignmentMixin._validation_mask(self, validation_sections) is None:
                raise ValueError(
                    "validation_sections needs sections: call setup_anndata with `batch_key=` (two or more sections)."
                )
            held = {str(v) for v in validation_sections}
        batches, val_batches = [], []
        for name, idx in self._sections(self.adata).items():
            b = self._section_inputs(self.adata, idx)
            b.update(tokens=torch.as_tensor(tokens), mask=torch.as_tensor(mask), y=torch.as_tensor(y_all[idx]))
            (val_batches if name in held else batches).append(b)
        torch.manual_seed(seed)
        plan = _SectionPlan.build(self.module, lr, weight_decay, n_genes_per_step, seed)
        # served by plan.train_dataloader (sharded by rank under DDP); numpy, as ddp_spawn cannot share
        # every tensor with its processes
        plan.train_batches = [{k: v.numpy() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        if ddp_world_size(trainer_kwargs.get("strategy"), devices, trainer_kwargs.get("num_nodes", 1)) > 1:
            raise NotImplementedError(
                "AlignST does not train under DDP yet (one whole section per step; the multi-process run stalls). "
                "Train it on one device: `devices=1` without `strategy=`."
            )
        val_loader = None
        if val_batches:
            val_loader = torch.utils.data.DataLoader(val_batches, batch_size=None, shuffle=False, num_workers=0)
            # plain Lightning here (not scvi-tools' runner): early stopping is a callback, not trainer settings
            trainer_kwargs = AlignmentMixin._monitoring_kwargs(
                trainer_kwargs, early_stopping=False, early_stopping_patience=early_stopping_patience,
                restore_best_weights=restore_best_weights, monitor="pcc_validation", mode="max",
            )
            if early_stopping:
                from lightning.pytorch.callbacks import EarlyStopping

                trainer_kwargs["callbacks"] = [
                    *trainer_kwargs.get("callbacks", []),
                    EarlyStopping(monitor="pcc_validation", mode="max", patience=early_stopping_patience),
                ]
        trainer_kwargs.setdefault("logger", False)
        trainer_kwargs.setdefault("enable_checkpointing", False)
        trainer_kwargs.setdefault("enable_model_summary", False)
        trainer_kwargs.setdefault("enable_progress_bar", settings.progress_bar)
        trainer_kwargs.setdefault("num_sanity_val_steps", 0)
        trainer_kwargs, ckpt_path = checkpoint_settings(trainer_kwargs, checkpoint_dir, resume, what="AlignST training")
        trainer_kwargs.setdefault("use_distributed_sampler", False)
        trainer = L.Trainer(max_epochs=max_epochs, accelerator=accelerator, devices=devices, **trainer_kwargs)
        self.module.train()
        before = trainable_snapshot(self.module)
        trainer.fit(plan, val_dataloaders=val_loader, ckpt_path=ckpt_path)
        self.module.eval()
        self.module.cpu()
        if ckpt_path is None:
            check_optimised(self.module, before, name="AlignST")
        self.seen_genes_ = list(seen)
        emb_key = self._setup_args.get("gene_embedding_key")
        if emb_key is not None:  # saved with the model, so that it predicts without the training AnnData
            self.gene_embedding_table_ = pd.DataFrame(
                np.asarray(self.adata.varm[emb_key])[self.adata.var_names.get_indexer(seen)], index=pd.Index(seen)
            )
        self.history_ = {
            "train_loss": pd.DataFrame({"train_loss": plan.epoch_losses}),
            "train_pcc": pd.DataFrame({"train_pcc": plan.epoch_pcc}),
        }
        if val_batches:
            self.history_["pcc_validation"] = pd.DataFrame({"pcc_validation": plan.epoch_val_pcc})
            from imagene.train import monitor_summary

            self.train_monitor_ = monitor_summary(
                trainer_kwargs.get("callbacks"), monitor="pcc_validation", mode="max", early_stopping=early_stopping
            )
        else:
            self.train_monitor_ = None  # nothing was validated
        self.is_trained_ = True
        logger.info("AlignST trained on %d seen genes over %d sections", len(seen), len(batches))

    # ------------------------------------------------------------------ inference
    def _check_trained(self) -> None:
        if not self.is_trained_:
            raise RuntimeError("The AlignST model is not trained yet. Call `model.train()` first.")

    @torch.inference_mode()
    def _forward_sections(
        self,
        adata: AnnData,
        genes: Sequence[str],
        gene_text: Mapping[str, str] | pd.Series | None = None,
        gene_embeddings: pd.DataFrame | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Spot latents ``(n, d)``, predictions ``(n, G)`` and each section's gene embeddings ``(G, d)``.

        The module's mode is left as it is (evaluation, or Monte-Carlo dropout in ``_predict_full``).
        """
        genes = list(genes)
        # the gene graph sees the requested genes together with the seen genes (as context), so a
        # gene's prediction does not depend on which other genes were requested
        context = [g for g in (self.seen_genes_ or []) if g not in set(genes)]
        tokens, mask = self._gene_tokens(genes + context, gene_text, gene_embeddings)
        tokens_t, mask_t = torch.as_tensor(tokens), torch.as_tensor(mask)
        latent = np.zeros((adata.n_obs, self.module.spot_head.out_features), np.float32)
        pred = np.zeros((adata.n_obs, len(genes)), np.float32)
        gene_emb = []
        for idx in self._sections(adata).values():
            b = self._section_inputs(adata, idx)
            out = self.module(b["features"], b.get("nuclei"), b["edge_index"], tokens_t, mask_t)
            latent[idx] = out["spots"].numpy()
            pred[idx] = out["pred"][:, : len(genes)].numpy()
            gene_emb.append(out["genes"][: len(genes)].numpy())
        return latent, pred, gene_emb

    def get_latent_representation(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, *, modality: str = "image"
    ) -> np.ndarray:
        """Spot embedding ``F_i`` (after nuclei fusion, the prompter's image stream and GraphSAGE).

        Parameters
        ----------
        adata
            AnnData with ``obsm[image_key]`` and spot centres (the training AnnData when ``None``);
            graphs are built per section (``batch_key``).
        indices
            Rows to return.
        modality
            ``'image'`` (the only modality: ALIGN-ST embeds spots from the image alone).

        Returns
        -------
        ``(n_obs, n_hidden)`` float32 array.
        """
        if modality != "image":
            raise ValueError(f"AlignST embeds spots from the image only: modality must be 'image'; got {modality!r}.")
        self._check_trained()
        adata = resolve_query(self, adata)
        self.module.eval()
        latent = np.zeros((adata.n_obs, self.module.spot_head.out_features), np.float32)
        with torch.inference_mode():
            for idx in self._sections(adata).values():
                b = self._section_inputs(adata, idx)
                latent[idx] = self.module.encode_spots(b["features"], b.get("nuclei"), b["edge_index"])[0].numpy()
        return latent if indices is None else latent[np.asarray(indices)]

    def predict_expression(
        self,
        adata: AnnData | None = None,
        genes: Sequence[str] | None = None,
        *,
        gene_text: Mapping[str, str] | pd.Series | None = None,
        gene_embeddings: pd.DataFrame | None = None,
        return_numpy: bool = False,
        return_sd: bool = False,
    ) -> pd.DataFrame | np.ndarray | tuple:
        """Predicted log1p CP10k expression of any gene with a description, seen in training or not.

        Parameters
        ----------
        adata
            Query with ``obsm[image_key]`` and spot centres (no expression needed); the training
            AnnData when ``None``. Its nuclei maps are computed when missing (``obsm[nuclei_key]``).
        genes
            Genes to predict (default: the seen genes); they need not be in ``adata`` or in the
            training AnnData, only to have a description (shipped, set up, or ``gene_text``).
        gene_text
            Extra descriptions, symbol → text.
        gene_embeddings
            New genes' embeddings (DataFrame genes × D) when the model uses ``varm`` embeddings.
        return_numpy
            Return arrays instead of DataFrames.
        return_sd
            Also return the per-spot, per-gene spread over 16 Monte-Carlo-dropout passes.

        Returns
        -------
        ``(n_obs, n_genes)`` DataFrame (obs names × genes) or array (a tuple ``(prediction, sd)``
        with ``return_sd``); :func:`imagene.tl.predict_expression` writes it into the AnnData.

        Examples
        --------
        >>> pred = model.predict_expression(query, genes=["ERBB2", "GATA3"])
        """
        self._check_trained()
        adata = resolve_query(self, adata)
        genes = list(self.seen_genes_) if genes is None else [str(g) for g in genes]
        if not genes:
            raise ValueError("genes is empty; pass the symbols of the genes to predict.")
        if len(set(genes)) != len(genes):
            raise ValueError("genes holds duplicates; pass each symbol once.")
        out = self._predict_full(adata, genes, gene_text=gene_text, gene_embeddings=gene_embeddings, sd=return_sd)
        pred, sd = out["pred"], out["sd"]
        if not return_numpy:
            pred = pd.DataFrame(pred, index=adata.obs_names, columns=pd.Index(genes))
            sd = None if sd is None else pd.DataFrame(sd, index=adata.obs_names, columns=pd.Index(genes))
        return (pred, sd) if return_sd else pred

    def _predict_full(
        self, adata: AnnData, genes: Sequence[str], *, sd: bool = True, **kwargs: Any
    ) -> dict[str, np.ndarray | None]:
        """Prediction and Monte-Carlo-dropout spread (16 passes) of ``genes`` (see tl.predict_expression)."""
        genes = [str(g) for g in genes]
        self.module.eval()
        _, pred, _ = self._forward_sections(adata, genes, kwargs.get("gene_text"), kwargs.get("gene_embeddings"))
        spread = None
        if sd:
            spread = mc_dropout_sd(
                self.module,
                lambda: self._forward_sections(adata, genes, kwargs.get("gene_text"), kwargs.get("gene_embeddings"))[1],
            )
        return {"pred": pred, "sd": spread, "similarity": None}

    def get_gene_embedding(
        self,
        genes: Sequence[str] | None = None,
        adata: AnnData | None = None,
        *,
        gene_text: Mapping[str, str] | pd.Series | None = None,
    ) -> pd.DataFrame:
        """Gene embeddings ``F_c`` (text stream + semantic graph), averaged over the sections of ``adata``.

        The prompts are conditioned on each section's spots, so the embedding of a gene depends
        slightly on the tissue; the mean over sections is returned. Store it with
        ``adata.varm["imagene_gene_embedding"] = emb.reindex(adata.var_names).to_numpy()``.

        Parameters
        ----------
        genes
            Genes (default: the seen genes).
        adata
            Sections conditioning the prompts (the training AnnData when ``None``).
        gene_text
            Extra descriptions.

        Returns
        -------
        DataFrame genes × ``n_hidden``.
        """
        self._check_trained()
        adata = resolve_query(self, adata)
        genes = list(self.seen_genes_) if genes is None else [str(g) for g in genes]
        self.module.eval()
        _, _, embs = self._forward_sections(adata, genes, gene_text)
        return pd.DataFrame(np.mean(embs, axis=0), index=pd.Index(genes))
