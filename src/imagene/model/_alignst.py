"""ALIGN-ST: zero-shot expression of genes never measured in training, from H&E and gene descriptions."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.model.base import BaseModelClass

from imagene._constants import KEYS, REGISTRY_KEYS
from imagene._settings import settings
from imagene._validate import check_int, check_max_epochs, ddp_world_size, renamed_kwarg
from imagene.model._alignst_parts import (
    SectionTask,
    check_inputs,
    choose_seen_genes,
    forward_sections,
    nuclei_of,
    prediction_genes,
    section_inputs,
    sections,
    training_sections,
)
from imagene.model._base import AlignmentMixin, make_module, mc_dropout_sd
from imagene.model._spot import register_fields
from imagene.module import AlignSTModule
from imagene.train import fit

logger = logging.getLogger("imagene")


class AlignST(AlignmentMixin, BaseModelClass):
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
    >>> imagene.model.AlignST.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section")
    >>> model = imagene.model.AlignST(adata)
    >>> model.train(max_epochs=50)
    >>> pred = model.predict_expression(query, gene_list=["ERBB2", "KRT19"])  # any gene with a description
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
            self, self.summary_stats[f"n_{REGISTRY_KEYS.IMAGE_KEY}"], n_text_input=n_text, n_hidden=n_hidden,
            n_layers=n_layers, n_prompts=n_prompts, alpha=alpha, k_genes=k_genes, dropout=dropout,
            use_nuclei=self.use_nuclei, **module_kwargs,
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
        library_key: str | None = None,
        spatial_key: str = KEYS.SPATIAL,
        nuclei_key: str | None = KEYS.NUCLEI,
        gene_text: Mapping[str, str] | pd.Series | None = None,
        gene_embedding_key: str | None = None,
        batch_key: str | None = None,
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
        library_key
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
        batch_key
            Old name of ``library_key`` (deprecated).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        library_key = renamed_kwarg("library_key", library_key, "batch_key", batch_key, where="AlignST.setup_anndata")
        cls._check_setup(adata, layer, image_key, library_key)
        nuclei_key, gene_text = check_inputs(adata, image_key, spatial_key, nuclei_key, gene_text, gene_embedding_key,
                                             library_key)
        setup_method_args = cls._get_setup_method_args(
            cls=cls, adata=adata, layer=layer, image_key=image_key, library_key=library_key, spatial_key=spatial_key,
            nuclei_key=nuclei_key, gene_text=gene_text, gene_embedding_key=gene_embedding_key, kwargs=kwargs,
        )
        register_fields(cls, adata, setup_method_args, layer=layer, image_key=image_key, library_key=library_key,
                        **kwargs)

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
            Sections of ``library_key`` held out of training: after each epoch the model predicts
            their seen genes (``pcc_validation``, mean per-gene Pearson r, and ``validation_loss`` in
            ``history``). ``None`` (default): every section trains, for ``max_epochs``.
        early_stopping, early_stopping_patience
            With validation sections, stop when ``pcc_validation`` has not improved for that many epochs.
        restore_best_weights
            With validation sections, end with the weights of the epoch of best ``pcc_validation``
            (:class:`imagene.train.RestoreBestWeights`).
        accelerator, devices
            Lightning settings; under DDP (``strategy="ddp"``, ...) each process trains on its share of the
            training sections (at least one each) and validates on every held-out section.
        checkpoint_dir, resume
            Write ``last.ckpt`` there after every epoch, and continue from it after an interruption
            (:func:`imagene.train.checkpoint_settings`).
        **trainer_kwargs
            Passed to :func:`imagene.train.fit` (:class:`lightning.pytorch.Trainer` settings).
        """
        max_epochs = check_max_epochs(max_epochs)
        seed = settings.seed if settings.seed is not None else 0
        seen = choose_seen_genes(self, seen_genes, n_seen_genes, unseen_genes)
        held = {str(v) for v in (validation_sections or [])}
        # the same section checks as every other model (unknown sections, all sections held out)
        if held and self._validation_mask(validation_sections) is None:
            raise ValueError(
                "validation_sections needs sections: call setup_anndata with `library_key=` (two or more sections)."
            )
        batches, val_batches = training_sections(self, seen, held)
        world = ddp_world_size(trainer_kwargs.get("strategy"), devices, trainer_kwargs.get("num_nodes", 1))
        if world > len(batches):
            raise ValueError(
                f"AlignST trains one whole section per step: {len(batches)} training section(s) cannot be shared "
                f"by {world} DDP processes. Use at most {len(batches)} devices, or hold out fewer validation sections."
            )
        torch.manual_seed(seed)
        # served by task.train_dataloader (sharded by rank under DDP); every rank validates on every section
        task = SectionTask(self.module, batches, lr=lr, weight_decay=weight_decay, n_genes_per_step=n_genes_per_step,
                           seed=seed)
        val_loader = None
        if val_batches:
            val_loader = torch.utils.data.DataLoader(val_batches, batch_size=None, shuffle=False, num_workers=0)
        trainer_kwargs.setdefault("use_distributed_sampler", False)
        fit(
            task, None, val_loader, max_epochs=max_epochs, monitor="pcc_validation", mode="max",
            early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
            restore_best_weights=restore_best_weights, accelerator=accelerator, devices=devices,
            checkpoint_dir=checkpoint_dir, resume=resume, what="AlignST training",
            find_unused_parameters=not self.use_nuclei,  # DDP: the nuclei fusion is idle without nuclei maps
            **trainer_kwargs,
        )
        self.seen_genes_ = list(seen)
        emb_key = self._setup_args.get("gene_embedding_key")
        if emb_key is not None:  # saved with the model, so that it predicts without the training AnnData
            self.gene_embedding_table_ = pd.DataFrame(
                np.asarray(self.adata.varm[emb_key])[self.adata.var_names.get_indexer(seen)], index=pd.Index(seen)
            )
        self.history_ = task.history
        self.train_monitor_ = task.monitor_  # None when nothing was validated
        self.is_trained_ = True
        logger.info("AlignST trained on %d seen genes over %d sections", len(seen), len(batches))

    # ------------------------------------------------------------------ inference
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 512,  # noqa: ARG002
        *,
        modality: str = "image",
    ) -> np.ndarray:
        """Spot embedding ``F_i`` (after nuclei fusion, the prompter's image stream and GraphSAGE).

        Parameters
        ----------
        adata
            AnnData with ``obsm[image_key]`` and spot centres (the training AnnData when ``None``);
            graphs are built per section (``library_key``). Missing nuclei maps are computed in
            memory; ``adata`` is not written.
        indices
            Rows to return.
        batch_size
            Unused (the shared signature): each pass is one whole section.
        modality
            ``'image'`` (the only modality: ALIGN-ST embeds spots from the image alone).

        Returns
        -------
        ``(n_obs, n_hidden)`` float32 array.
        """
        if modality != "image":
            raise ValueError(f"AlignST embeds spots from the image only: modality must be 'image'; got {modality!r}.")
        self._check_trained()
        adata = self._query(adata)
        self.module.eval()
        latent = np.zeros((adata.n_obs, self.module.spot_head.out_features), np.float32)
        nuclei = nuclei_of(self, adata)
        with torch.inference_mode():
            for idx in sections(self, adata).values():
                b = section_inputs(self, adata, idx, nuclei)
                latent[idx] = self.module.encode_spots(b["features"], b.get("nuclei"), b["edge_index"])[0].numpy()
        return latent if indices is None else latent[np.asarray(indices)]

    def predict_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        k: int = 50,
        weighting: str = "similarity",
        gene_list: Sequence[str] | None = None,
        batch_size: int = 512,  # noqa: ARG002
        return_numpy: bool = False,
        return_sd: bool = False,
        gene_text: Mapping[str, str] | pd.Series | None = None,
        gene_embeddings: pd.DataFrame | None = None,
        genes: Sequence[str] | None = None,
    ) -> pd.DataFrame | np.ndarray | tuple:
        """Predicted log1p CP10k expression of any gene with a description, seen in training or not.

        The signature of every imagene model (:meth:`imagene.model.UMPIRE.predict_expression`);
        ALIGN-ST predicts directly (``F_i · F_cᵀ``), not by query-reference retrieval.

        Parameters
        ----------
        adata
            Query with ``obsm[image_key]`` and spot centres (no expression needed); the training
            AnnData when ``None``. Missing nuclei maps are computed in memory (``adata`` is not written).
        indices
            Subset of query observations.
        k, weighting
            Retrieval settings of the other models; ALIGN-ST does not retrieve (other values warn).
        gene_list
            Genes to predict (default: the seen genes); they need not be in ``adata`` or in the
            training AnnData, only to have a description (shipped, set up, or ``gene_text``).
        batch_size
            Unused: each pass is one whole section.
        return_numpy
            Return arrays instead of DataFrames.
        return_sd
            Also return the per-spot, per-gene spread over 16 Monte-Carlo-dropout passes.
        gene_text
            Extra descriptions, symbol → text.
        gene_embeddings
            New genes' embeddings (DataFrame genes × D) when the model uses ``varm`` embeddings.
        genes
            Old name of ``gene_list`` (deprecated).

        Returns
        -------
        ``(n_obs, n_genes)`` DataFrame (obs names × genes) or array (a tuple ``(prediction, sd)``
        with ``return_sd``); :func:`imagene.tl.predict_expression` writes it into an AnnData.

        Examples
        --------
        >>> pred = model.predict_expression(query, gene_list=["ERBB2", "GATA3"])
        """
        gene_list = prediction_genes(self, gene_list, genes, indices, k, weighting)
        adata = self._query(adata)
        out = self._predict_full(adata, gene_list, gene_text=gene_text, gene_embeddings=gene_embeddings, sd=return_sd)
        rows = self._indices(adata, indices)
        pred, sd = out["pred"][rows], None if out["sd"] is None else out["sd"][rows]
        if not return_numpy:
            pred = pd.DataFrame(pred, index=adata.obs_names[rows], columns=pd.Index(gene_list))
            sd = None if sd is None else pd.DataFrame(sd, index=adata.obs_names[rows], columns=pd.Index(gene_list))
        return (pred, sd) if return_sd else pred

    def _predict_full(
        self, adata: AnnData, genes: Sequence[str], *, sd: bool = True, **kwargs: Any
    ) -> dict[str, np.ndarray | None]:
        """Prediction and Monte-Carlo-dropout spread (16 passes) of ``genes`` (see tl.predict_expression)."""
        genes, text, emb = [str(g) for g in genes], kwargs.get("gene_text"), kwargs.get("gene_embeddings")
        self.module.eval()
        pred = forward_sections(self, adata, genes, text, emb)[1]
        spread = mc_dropout_sd(self.module, lambda: forward_sections(self, adata, genes, text, emb)[1]) if sd else None
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
        adata = self._query(adata)
        genes = list(self.seen_genes_) if genes is None else [str(g) for g in genes]
        self.module.eval()
        _, _, embs = forward_sections(self, adata, genes, gene_text)
        return pd.DataFrame(np.mean(embs, axis=0), index=pd.Index(genes))
