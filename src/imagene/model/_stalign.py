"""ST-Align: spot + niche multi-level image-gene alignment with attention-based fusion."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi.data.fields import LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from imagene._constants import KEYS, REGISTRY_KEYS
from imagene._validate import check_int, renamed_kwarg
from imagene.model._base import AlignmentMixin
from imagene.model._probe import ExpressionProbeMixin
from imagene.model._spot import register_fields
from imagene.module._stalign import STAlignModule
from imagene.pp import spot_niche_inputs
from imagene.train import ContrastiveTrainingPlan

logger = logging.getLogger("imagene")

STAlignModality = Literal["fused", "image", "gene", "niche", "joint"]
_MODALITIES = ("fused", "image", "gene", "niche", "joint")


class STAlign(ExpressionProbeMixin, AlignmentMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """ST-Align: spot- and niche-level image-gene alignment with attention-based fusion (Lin et al., 2024).

    Every spot is seen at two levels. **Spot**: its own small H&E tile (a CNN trained from
    scratch, the paper's 28 px spot images) and its expression. **Niche**: a larger tile around
    the spot and its nearest neighbours (frozen features) and the niche's mean expression (a
    Transformer). An Attention-Based Fusion Network (:class:`imagene.nn.ABFN`) fuses image and
    gene at each level; the loss ``λ1·CL_spot + λ2·CL_niche + (1 − λ1 − λ2)·L_NS`` aligns image
    with gene at both levels and each spot's fused feature with its niche's
    (:class:`imagene.module.STAlignModule`). Inputs: :func:`imagene.pp.spot_niche_inputs` (run by
    :meth:`setup_anndata`); expression from the image: :meth:`predict_expression` (retrieval or
    ``method='probe'``, an MLP from the image latents, the paper's gene prediction).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        Width of every embedding (and of the fused features).
    n_hidden
        Hidden width of the MLP encoders.
    dropout
        Dropout of the MLP encoders.
    n_tokens
        ABFN tokens (``n_latent / n_tokens`` must be even).
    fusion
        ``'abfn'`` (the paper) or ``'concat'`` (ablation: no ABFN).
    niche_loss
        Use the spot-niche contrastive term ``L_NS`` (``False``: ablation).
    adaptive_encoders
        Context-specific encoders (spot CNN from scratch on the spot tiles, Transformer on the
        niche expression). ``False`` (ablation) uses the frozen spot features of ``image_key`` and
        the gene MLP at both levels; it is also what works when no image can be reached.
    lambda_spot, lambda_niche
        ``λ1`` and ``λ2`` of the loss (``1 − λ1 − λ2`` weighs ``L_NS``).
    temperature
        Initial temperature of each InfoNCE term (learned).
    gene_encoder
        Spot-gene encoder: ``'mlp'`` (:class:`imagene.nn.GeneMLPEncoder`) or a name of the gene
        encoder registry (:func:`imagene.nn.get_gene_encoder`, e.g. ``'rank_transformer'``).
    gene_encoder_kwargs
        Settings of that gene encoder.
    niche_transformer_kwargs
        Settings of the niche-gene :class:`imagene.nn.NicheGeneTransformer` (default 2 layers,
        4 heads, dropout 0.1; the paper's ``{"n_layers": 6, "n_heads": 8}``).
    spot_image_encoder
        Registry name of the trainable spot CNN (``'small_cnn'``).
    **module_kwargs
        Passed to :class:`imagene.module.STAlignModule`.

    Examples
    --------
    >>> imagene.model.STAlign.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section")
    >>> model = imagene.model.STAlign(adata)
    >>> model.train(max_epochs=50)
    >>> adata.obsm["X_imagene_fused"] = model.get_latent_representation(modality="fused")
    >>> pred = model.predict_expression(query, method="probe")
    """

    _module_cls = STAlignModule
    _training_plan_cls = ContrastiveTrainingPlan

    def __init__(
        self,
        adata: AnnData,
        n_latent: int = 128,
        n_hidden: int = 256,
        dropout: float = 0.3,
        n_tokens: int = 8,
        fusion: Literal["abfn", "concat"] = "abfn",
        niche_loss: bool = True,
        adaptive_encoders: bool = True,
        lambda_spot: float = 1 / 3,
        lambda_niche: float = 1 / 3,
        temperature: float = 0.07,
        gene_encoder: str = "mlp",
        gene_encoder_kwargs: dict | None = None,
        niche_transformer_kwargs: dict | None = None,
        spot_image_encoder: str = "small_cnn",
        **module_kwargs: Any,
    ) -> None:
        check_int("n_latent", n_latent, 1, hint="It is the width of the shared embedding: pass e.g. `n_latent=64`.")
        check_int("n_hidden", n_hidden, 1, hint="Pass a positive hidden width, e.g. `n_hidden=128`.")
        super().__init__(adata)
        args = self._setup_args
        if adaptive_encoders and not args.get("has_spot_tiles", False):
            raise ValueError(
                "adaptive_encoders=True trains a CNN on spot tiles, but setup_anndata found no image to cut them "
                "from. Pass the full-resolution H&E to `STAlign.setup_anndata(..., image=...)` (or set "
                "uns['spatial'][section]['metadata']['source_image_path']), or use `adaptive_encoders=False`."
            )
        niche_shape = self.adata_manager.get_from_registry(REGISTRY_KEYS.NICHE_IMAGE_KEY).shape
        self.module = self._make_module(
            n_genes=self.summary_stats.n_vars, n_image_features=self.summary_stats[f"n_{REGISTRY_KEYS.IMAGE_KEY}"],
            n_niche_image_features=int(niche_shape[1]), n_latent=n_latent, n_hidden=n_hidden, dropout=dropout,
            n_tokens=n_tokens, fusion=fusion, niche_loss=niche_loss, adaptive_encoders=adaptive_encoders,
            spot_image_encoder=spot_image_encoder, spot_tile_px=int(args["spot_tile_px"]), gene_encoder=gene_encoder,
            gene_encoder_kwargs=gene_encoder_kwargs, niche_transformer_kwargs=niche_transformer_kwargs,
            lambda_spot=lambda_spot, lambda_niche=lambda_niche, temperature=temperature, **module_kwargs,
        )
        self.module.probe.requires_grad_(False)
        self.reference_latent_, self.reference_counts_ = None, None
        self.probe_trained_ = False
        self._model_summary_string = (
            f"STAlign: {self.summary_stats.n_vars} genes, n_latent={n_latent}, fusion={fusion!r}, "
            f"niche_loss={niche_loss}, adaptive_encoders={adaptive_encoders}"
        )
        self.init_params_ = self._get_init_params(locals())

    @property
    def _uses_image_key(self) -> bool:
        """Whether inference reads ``obsm[image_key]`` (the adaptive encoders read the spot tiles instead)."""
        return not self.module.adaptive_encoders

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = "counts",
        *,
        image_key: str = "X_he_efficientnet_lite0",
        niche_key: str = KEYS.NICHE,
        library_key: str | None = None,
        batch_key: str | None = None,
        spot_tiles_key: str = KEYS.SPOT_TILES,
        niche_image_key: str | None = None,
        niche_encoder: str = "efficientnet_lite0",
        spot_tile_size_um: float = 112.0,
        spot_tile_px: int = 28,
        niche_tile_size_um: float | None = None,
        niche_tile_px: int = 128,
        n_niche_neighs: int = 3,
        image: Any = None,
        **kwargs: Any,
    ) -> None:
        """Register the inputs and build those that are missing (spot tiles, niche tiles, niche graph).

        What ``adata`` lacks is built by :func:`imagene.pp.spot_niche_inputs` (validated before
        anything is written) and stored for re-use: the niche graph (``obsp[f"{niche_key}_*"]``,
        ``uns[f"{niche_key}_neighbors"]``), the niche-mean counts ``layers[f"{niche_key}_mean"]``,
        the spot tiles ``obsm[spot_tiles_key]`` and the niche-tile features ``obsm[niche_image_key]``
        (their geometry in ``uns`` under the same keys). When no image can be reached, a warning
        is issued, no spot tiles are stored (the model then needs ``adaptive_encoders=False``) and
        the niche image features are the niche mean of ``obsm[image_key]``. Registration also
        adds ``uns['_scvi_uuid']``, ``uns['_scvi_manager_uuid']`` and ``obs['_scvi_batch']``;
        it returns nothing.

        Parameters
        ----------
        adata
            AnnData (not a view) with raw counts, frozen spot-tile features and spot centres in
            ``obsm['spatial']`` (full-resolution pixels).
        layer
            Layer with raw integer counts (``None`` for ``X``).
        image_key
            ``obsm`` key of the frozen spot-tile features (:func:`imagene.pp.embed_tiles`).
        niche_key
            Prefix of the niche graph keys (:func:`imagene.pp.niches`).
        library_key
            ``obs`` column of sections; niches never cross sections and training validates on
            held-out sections (registered as scvi-tools' batch field, not a covariate of the model).
        batch_key
            Old name of ``library_key`` (deprecated).
        spot_tiles_key, niche_image_key, niche_encoder, spot_tile_size_um, spot_tile_px, niche_tile_size_um, niche_tile_px, n_niche_neighs, image
            Passed to :func:`imagene.pp.spot_niche_inputs` (``niche_image_key`` is its ``key_added``,
            default ``'X_he_niche_<niche_encoder>'``; ``niche_tile_px=224`` is the paper's, 128 is 3x
            cheaper on CPU; ``n_niche_neighs`` is used when the niche graph is built here).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Examples
        --------
        >>> imagene.model.STAlign.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section")
        """
        library_key = renamed_kwarg("library_key", library_key, "batch_key", batch_key, where="STAlign.setup_anndata")
        batch_key = None
        setup_method_args = cls._get_setup_method_args(**locals())
        cls._check_setup(adata, layer, image_key, library_key)
        niche_image_key = niche_image_key or f"{KEYS.NICHE_FEATURES_PREFIX}{niche_encoder}"
        # validated and computed before anything is written; then the missing keys are written
        built = spot_niche_inputs(
            adata, image_key=image_key, layer=layer, library_key=library_key, niche_key=niche_key,
            spot_tiles_key=spot_tiles_key, key_added=niche_image_key, niche_encoder=niche_encoder,
            spot_tile_size_um=float(spot_tile_size_um), spot_tile_px=int(spot_tile_px),
            niche_tile_size_um=niche_tile_size_um, niche_tile_px=int(niche_tile_px),
            n_niche_neighs=int(n_niche_neighs), image=image,
        )
        args = setup_method_args["setup_args"]
        args.update(
            niche_image_key=niche_image_key,
            niche_tile_size_um=built["niche_tile_size_um"],
            n_niche_neighs=built["n_niche_neighs"],
            has_spot_tiles=spot_tiles_key in adata.obsm,
        )
        args.pop("image", None)
        niche = [LayerField(REGISTRY_KEYS.NICHE_X_KEY, f"{niche_key}_mean", is_count_data=False),
                 ObsmField(REGISTRY_KEYS.NICHE_IMAGE_KEY, niche_image_key)]
        tiles = [ObsmField(REGISTRY_KEYS.SPOT_TILES_KEY, spot_tiles_key)] if spot_tiles_key in adata.obsm else []
        register_fields(cls, adata, setup_method_args, layer=layer, image_key=image_key, library_key=library_key,
                        extra=niche, after=tiles, **kwargs)

    def _inputs(self, adata: AnnData, *, image: bool, gene: bool) -> dict[str, Any]:
        """Spot image, niche image, counts and niche counts of ``adata`` (built when missing, never written)."""
        a = self._setup_args
        need_tiles = image and self.module.adaptive_encoders
        query_gene = gene and adata is not self.adata  # the training niche means are registered
        counts = self._gene_input(adata) if gene else None
        got = spot_niche_inputs(
            adata, image_key=a["image_key"], niche_key=a["niche_key"], library_key=self.library_key,
            spot_tiles_key=a["spot_tiles_key"], key_added=a["niche_image_key"], niche_encoder=a["niche_encoder"],
            spot_tile_size_um=a["spot_tile_size_um"], spot_tile_px=a["spot_tile_px"],
            niche_tile_size_um=a["niche_tile_size_um"], niche_tile_px=a["niche_tile_px"],
            n_niche_neighs=a["n_niche_neighs"], niche_graph=query_gene, spot_tiles=need_tiles, niche_features=image,
            niche_expression=False, counts=counts if query_gene else None, inplace=False,
        )
        out: dict[str, Any] = {}
        if gene:
            niche_x = got["niche_mean"] if query_gene else adata.layers[f"{a['niche_key']}_mean"]
            out["x"], out["niche_x"] = counts, sp.csr_matrix(niche_x, dtype=np.float32)
        if image:
            if need_tiles and got["spot_tiles"] is None:
                raise ValueError(
                    "No spot tiles could be cut for this AnnData (no image reachable). Register its H&E in "
                    "uns['spatial'][section]['metadata']['source_image_path'], or store obsm"
                    f"[{a['spot_tiles_key']!r}] ({a['spot_tile_size_um']:g} µm tiles at {a['spot_tile_px']} px)."
                )
            spot = np.asarray(got["spot_tiles"]) if need_tiles else self._image_input(adata, np.arange(adata.n_obs))
            niche, expected = np.asarray(got["niche_features"]), self.module.niche_image.norm.normalized_shape[0]
            if niche.shape[1] != expected:
                raise ValueError(
                    f"Niche image features of this AnnData have {niche.shape[1]} columns; the model was trained on "
                    f"{expected}. Remove obsm[{a['niche_image_key']!r}] so that the model recomputes them."
                )
            out["spot_image"], out["niche_image"] = spot, niche
        return out

    @torch.inference_mode()
    def _embed(self, adata: AnnData, modality: str, indices: Sequence[int] | None, batch_size: int) -> np.ndarray:
        self.module.eval()
        device = next(self.module.parameters()).device
        idx = self._indices(adata, indices)
        inp = self._inputs(adata, image=modality != "gene", gene=modality not in ("image", "probe"))
        out = []
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            t = {k: torch.as_tensor(v[sel].toarray() if sp.issparse(v) else np.asarray(v[sel])).to(device)
                 for k, v in inp.items()}
            out.append(self.module.embed(modality, **t).float().cpu())
        return torch.cat(out).numpy()

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 512,
        *,
        modality: STAlignModality = "fused",
    ) -> np.ndarray:
        """L2-normalised embedding of each spot.

        Parameters
        ----------
        adata, indices
            AnnData to embed (the training AnnData when ``None``; missing tiles, niche features and
            niche graph are built for it, not written) and a subset of it. It needs counts (the
            model's genes, by name) for every modality but ``'image'``, and for every modality but
            ``'gene'`` the features of ``image_key`` and a reachable H&E (or stored tiles / niche features).
        batch_size
            Spots per forward pass.
        modality
            ``'fused'`` (default: the ABFN fusion of the spot's image and expression, ST-Align's
            spot representation for zero-shot clustering), ``'niche'`` (the fused niche feature),
            ``'image'`` (what query-reference prediction uses), ``'gene'`` or ``'joint'``
            (normalised sum of the image and gene embeddings, as in UMPIRE).

        Returns
        -------
        (n_obs, n_latent) float32 array with unit rows; write it yourself
        (``adata.obsm["X_imagene_fused"] = ...``) or use :func:`imagene.tl.embed`.

        Examples
        --------
        >>> z = model.get_latent_representation(modality="fused")
        """
        if modality not in _MODALITIES:
            raise ValueError(f"modality must be one of {list(_MODALITIES)}; got {modality!r}.")
        self._check_trained()
        adata = self._query(adata)
        return self._embed(adata, modality, indices, batch_size)

    def train(
        self,
        max_epochs: int = 50,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        batch_size: int = 128,
        warmup_fraction: float = 0.1,
        validation_sections: Sequence[str] | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        restore_best_weights: bool = True,
        probe_epochs: int = 30,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        """Train the encoders and the ABFN, then the expression probe and the reference bank.

        AdamW with a linear warm-up and a cosine decay of the learning rate. With a ``library_key`` of several sections, whole sections are held out for
        validation (``validation_sections``, default the last) and early stopping watches
        ``recall5_validation`` (spot image↔gene retrieval over the validation set); with one
        section, 10 % of spots are held out at random.

        Parameters
        ----------
        max_epochs, lr, weight_decay
            Maximum passes over the training spots; AdamW settings (peak learning rate).
        batch_size
            Spots per step (the InfoNCE negatives); the last incomplete batch is dropped.
        warmup_fraction
            Fraction of the steps of linear warm-up.
        validation_sections, early_stopping, early_stopping_patience, restore_best_weights
            Sections held out for validation; stop when ``recall5_validation`` has not improved for
            that many epochs; end with the weights of the best epoch (:class:`imagene.train.RestoreBestWeights`).
        probe_epochs
            Epochs of the expression probe (an MLP from the frozen image latents to every gene,
            log-normalised, MSE, trained by :func:`imagene.train.fit`); 0 skips it.
        accelerator, devices, plan_kwargs, datasplitter_kwargs, **trainer_kwargs
            Lightning device settings; passed to :class:`imagene.train.ContrastiveTrainingPlan`,
            :class:`scvi.dataloaders.DataSplitter` and :class:`scvi.train.Trainer`.
        checkpoint_dir, resume
            Write ``last.ckpt`` there after every epoch, and continue from it after an interruption
            (:func:`imagene.train.checkpoint_settings`).

        Returns
        -------
        Nothing; the model is trained in place (``history``, ``is_trained_``, ``probe_trained_``).

        Examples
        --------
        >>> model.train(max_epochs=50)
        """
        plan_kwargs = {"optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay, "lr_schedule": "warmup_cosine",
                       "warmup_fraction": warmup_fraction, **(plan_kwargs or {})}
        self._train_spots(
            max_epochs, plan_kwargs=plan_kwargs, batch_size=batch_size, validation_sections=validation_sections,
            early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
            restore_best_weights=restore_best_weights, accelerator=accelerator, devices=devices,
            datasplitter_kwargs=datasplitter_kwargs, checkpoint_dir=checkpoint_dir, resume=resume,
            **trainer_kwargs,
        )
        self._build_reference()
        if probe_epochs > 0:
            self._train_probe(probe_epochs)

    def predict_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        method: Literal["reference", "probe", "head"] = "reference",
        k: int = 50,
        weighting: Literal["similarity", "softmax", "uniform"] = "similarity",
        gene_list: Sequence[str] | None = None,
        batch_size: int = 512,
        return_numpy: bool = False,
        return_sd: bool = False,
    ) -> pd.DataFrame | np.ndarray | tuple:
        """Predict log-normalised expression (``log1p`` CP10k) from the image alone.

        Parameters
        ----------
        adata, indices
            Query (the training AnnData when ``None``) with ``obsm[image_key]`` and a reachable H&E
            (or the stored spot tiles and niche features), no expression needed; subset of it.
        method
            ``'reference'``: query-reference retrieval as UMPIRE
            (:meth:`imagene.model.AlignmentMixin.predict_expression`, settings ``k`` and
            ``weighting``). ``'probe'``: the MLP probe trained on the training spots' spot and niche
            image latents (ST-Align's gene prediction). ``'head'``: the ridge head of
            :meth:`fit_expression_head`.
        k, weighting, gene_list, batch_size, return_numpy
            As in :meth:`imagene.model.AlignmentMixin.predict_expression` (``k`` and ``weighting``
            for ``method='reference'`` only).
        return_sd
            Also return the per-spot, per-gene spread: the weighted standard deviation of the ``k``
            references (``'reference'``) or of 16 Monte-Carlo-dropout passes of the probe (``'probe'``).

        Returns
        -------
        (n_obs, n_genes) predictions as a DataFrame (obs names × genes) or array; with
        ``return_sd``, a tuple ``(prediction, sd)``.

        Examples
        --------
        >>> pred = model.predict_expression(query, method="probe", gene_list=["ERBB2", "GRB7"])
        """
        if method in ("reference", "head"):
            return super().predict_expression(adata, indices, k=k, weighting=weighting, gene_list=gene_list,
                                              batch_size=batch_size, return_numpy=return_numpy, return_sd=return_sd,
                                              method=method)
        if method != "probe":
            raise ValueError(f"method must be 'reference', 'probe' or 'head'; got {method!r}.")
        adata = self._query(adata)
        cols = self._gene_columns(gene_list)
        pred, sd = self._predict_probe(adata, indices, cols, batch_size, with_sd=return_sd)
        return self._format_prediction(adata, indices, cols, pred, sd, return_numpy)
