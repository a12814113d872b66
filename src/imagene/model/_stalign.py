"""ST-Align: spot + niche multi-level image-gene alignment with attention-based fusion."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from imagene._constants import KEYS, REGISTRY_KEYS
from imagene._utils import log_normalize, save_key, warn
from imagene._validate import check_int
from imagene.model._base import AlignmentMixin, _format_prediction, mc_dropout_sd
from imagene.module._stalign import STAlignModule
from imagene.pp._niches import niche_mean_operator
from imagene.train import ContrastiveTrainingPlan

logger = logging.getLogger("imagene")

STAlignModality = Literal["fused", "image", "gene", "niche", "joint"]
_MODALITIES = ("fused", "image", "gene", "niche", "joint")

#: per-section tiles / niche features already computed in this process (the same sections are
#: prepared again and again by benchmark folds, ablations and query AnnDatas)
_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CACHE_SIZE = 64
_ENCODERS: dict[str, torch.nn.Module] = {}


def _cached(key: tuple, fn) -> np.ndarray:
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = fn()
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


class STAlign(AlignmentMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """ST-Align: spot- and niche-level image-gene alignment with attention-based fusion (Lin et al., 2024).

    Every spot is seen at two levels. **Spot**: its own small H&E tile (a CNN trained from
    scratch, the paper's 28 px spot images) and its expression (the gene encoder). **Niche**: a
    larger tile around the spot and its nearest neighbours (frozen features of a pretrained
    encoder) and the niche's mean expression (a trainable Transformer). An Attention-Based Fusion
    Network (:class:`imagene.nn.ABFN`) fuses image and gene at each level, and the loss
    ``λ1·CL_spot + λ2·CL_niche + (1 − λ1 − λ2)·L_NS`` aligns image with gene at both levels and
    each spot's fused feature with its own niche's (:class:`imagene.module.STAlignModule`).

    :meth:`setup_anndata` builds what the model needs and the AnnData lacks (spot tiles, niche
    tiles and their features, the niche graph). Latents: :meth:`get_latent_representation`;
    expression from the image alone: :meth:`predict_expression` (query-reference retrieval, or
    ``method='probe'``: an MLP from the image latents, the paper's gene prediction).

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
    >>> imagene.model.STAlign.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", batch_key="section")
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
            n_genes=self.summary_stats.n_vars,
            n_image_features=self.summary_stats[f"n_{REGISTRY_KEYS.IMAGE_KEY}"],
            n_niche_image_features=int(niche_shape[1]),
            n_latent=n_latent,
            n_hidden=n_hidden,
            dropout=dropout,
            n_tokens=n_tokens,
            fusion=fusion,
            niche_loss=niche_loss,
            adaptive_encoders=adaptive_encoders,
            spot_image_encoder=spot_image_encoder,
            spot_tile_px=int(args["spot_tile_px"]),
            gene_encoder=gene_encoder,
            gene_encoder_kwargs=gene_encoder_kwargs,
            niche_transformer_kwargs=niche_transformer_kwargs,
            lambda_spot=lambda_spot,
            lambda_niche=lambda_niche,
            temperature=temperature,
            **module_kwargs,
        )
        self.module.probe.requires_grad_(False)
        self.reference_latent_ = None
        self.reference_counts_ = None
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

    # ------------------------------------------------------------------------------------------
    # registration
    # ------------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = "counts",
        *,
        image_key: str = "X_he_efficientnet_lite0",
        niche_key: str = KEYS.NICHE,
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

        Built when absent (validated before anything is written) and stored for re-use:

        - the niche graph, ``obsp[f"{niche_key}_connectivities"]`` / ``_distances`` and
          ``uns[f"{niche_key}_neighbors"]`` (:func:`imagene.pp.niches` with ``n_niche_neighs``
          neighbours, the paper's 3), and ``layers[f"{niche_key}_mean"]``, the niche-averaged counts;
        - ``obsm[spot_tiles_key]``: small uint8 spot tiles (``spot_tile_size_um`` µm at
          ``spot_tile_px`` px, :func:`imagene.pp.extract_tiles`), ``uns[spot_tiles_key]`` their geometry;
        - ``obsm[niche_image_key]`` (default ``'X_he_niche_<niche_encoder>'``): frozen features
          (:func:`imagene.pp._features.encode_tiles`) of a tile of ``niche_tile_size_um`` µm
          around each spot (default: twice the median distance to the 3rd nearest spot plus
          ``spot_tile_size_um``, so the tile covers the spot and its 3 nearest neighbours; 512 µm on
          legacy ST) at ``niche_tile_px`` px, ``uns[niche_image_key]`` their geometry.

        Images come from ``image`` (full-resolution, an array / path or a dict by section) or
        from each section's ``uns['spatial']`` entry (``metadata['source_image_path']``). When no
        image can be reached, a warning is issued, no spot tiles are stored (the model then needs
        ``adaptive_encoders=False``) and the niche image features are the niche mean of
        ``obsm[image_key]``. Registration also adds ``uns['_scvi_uuid']``,
        ``uns['_scvi_manager_uuid']`` and ``obs['_scvi_batch']``, as for every scvi-tools model.

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
        batch_key
            ``obs`` column of sections; training validates on held-out sections.
        spot_tiles_key
            ``obsm`` key of the small spot tiles.
        niche_image_key
            ``obsm`` key of the niche-tile features.
        niche_encoder
            Frozen image encoder of the niche tiles (registry name).
        spot_tile_size_um, spot_tile_px
            Geometry of the spot tiles.
        niche_tile_size_um, niche_tile_px
            Geometry of the niche tiles (``niche_tile_px=224`` is the paper's; 128 is 3x cheaper on CPU).
        n_niche_neighs
            Neighbours of a niche when the graph is built here.
        image
            Full-resolution image(s) to cut tiles from instead of the registered ones.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Returns
        -------
        Nothing; registers ``adata`` and adds the keys listed above where they were missing.

        Examples
        --------
        >>> imagene.model.STAlign.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", batch_key="section")
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        counts = cls._check_setup(adata, layer, image_key, batch_key)
        niche_image_key = niche_image_key or f"{KEYS.NICHE_FEATURES_PREFIX}{niche_encoder}"
        geometry = {
            "spot_tile_size_um": float(spot_tile_size_um),
            "spot_tile_px": int(spot_tile_px),
            "niche_tile_size_um": niche_tile_size_um,
            "niche_tile_px": int(niche_tile_px),
            "niche_encoder": niche_encoder,
            "n_niche_neighs": int(n_niche_neighs),
        }
        built = _prepare(
            adata,
            counts=counts,
            image_key=image_key,
            niche_key=niche_key,
            library_key=batch_key,
            spot_tiles_key=spot_tiles_key,
            niche_image_key=niche_image_key,
            image=image,
            need_spot_tiles=True,
            **geometry,
        )
        # everything is validated and computed: write the missing keys
        for slot, key, value in built["writes"]:
            save_key(adata, slot, key, value)
        args = setup_method_args["setup_args"]
        args.update(
            niche_image_key=niche_image_key,
            niche_tile_size_um=built["niche_tile_size_um"],
            n_niche_neighs=built["n_niche_neighs"],
            has_spot_tiles=spot_tiles_key in adata.obsm,
        )
        args.pop("image", None)
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            ObsmField(REGISTRY_KEYS.IMAGE_KEY, image_key),
            LayerField(REGISTRY_KEYS.NICHE_X_KEY, f"{niche_key}_mean", is_count_data=False),
            ObsmField(REGISTRY_KEYS.NICHE_IMAGE_KEY, niche_image_key),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        ]
        if spot_tiles_key in adata.obsm:
            fields.append(ObsmField(REGISTRY_KEYS.SPOT_TILES_KEY, spot_tiles_key))
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    # ------------------------------------------------------------------------------------------
    # inputs of any AnnData (the training one or a query)
    # ------------------------------------------------------------------------------------------
    def _inputs(self, adata: AnnData, *, image: bool, gene: bool) -> dict[str, Any]:
        """Spot image, niche image, counts and niche counts of ``adata`` (built when missing, never written)."""
        a = self._setup_args
        out: dict[str, Any] = {}
        if gene:
            counts = self._gene_input(adata)
            if adata is self.adata:
                niche_x = sp.csr_matrix(adata.layers[f"{a['niche_key']}_mean"], dtype=np.float32)
            else:
                conn = _niche_graph(adata, a["niche_key"], a["batch_key"], a["n_niche_neighs"])[0]
                niche_x = sp.csr_matrix(niche_mean_operator(conn) @ counts, dtype=np.float32)
            out["x"], out["niche_x"] = counts, niche_x
        if image:
            need_tiles = self.module.adaptive_encoders
            have = a["niche_image_key"] in adata.obsm and (not need_tiles or a["spot_tiles_key"] in adata.obsm)
            if have:
                built = {}
            else:
                built = _prepare(
                    adata,
                    counts=None,
                    image_key=a["image_key"],
                    niche_key=a["niche_key"],
                    library_key=a["batch_key"],
                    spot_tiles_key=a["spot_tiles_key"],
                    niche_image_key=a["niche_image_key"],
                    image=None,
                    need_spot_tiles=need_tiles,
                    spot_tile_size_um=a["spot_tile_size_um"],
                    spot_tile_px=a["spot_tile_px"],
                    niche_tile_size_um=a["niche_tile_size_um"],
                    niche_tile_px=a["niche_tile_px"],
                    niche_encoder=a["niche_encoder"],
                    n_niche_neighs=a["n_niche_neighs"],
                )
            values = {key: value for slot, key, value in built.get("writes", []) if slot == "obsm"}

            def get(key: str) -> np.ndarray:
                return np.asarray(values[key] if key in values else adata.obsm[key])

            if need_tiles:
                if a["spot_tiles_key"] not in values and a["spot_tiles_key"] not in adata.obsm:
                    raise ValueError(
                        "No spot tiles could be cut for this AnnData (no image reachable). Register its H&E in "
                        "uns['spatial'][section]['metadata']['source_image_path'], or store "
                        f"obsm[{a['spot_tiles_key']!r}] ({a['spot_tile_size_um']:g} µm tiles at {a['spot_tile_px']} px)."
                    )
                out["spot_image"] = get(a["spot_tiles_key"])
            else:
                out["spot_image"] = self._image_input(adata, np.arange(adata.n_obs))
            niche = get(a["niche_image_key"])
            expected = self.module.niche_image.norm.normalized_shape[0]
            if niche.shape[1] != expected:
                raise ValueError(
                    f"Niche image features of this AnnData have {niche.shape[1]} columns; the model was trained on "
                    f"{expected}. Remove obsm[{a['niche_image_key']!r}] so that the model recomputes them."
                )
            out["niche_image"] = niche
        return out

    @torch.inference_mode()
    def _embed(self, adata: AnnData, modality: str, indices: Sequence[int] | None, batch_size: int) -> np.ndarray:
        self.module.eval()
        device = next(self.module.parameters()).device
        idx = self._indices(adata, indices)
        need_image = modality in ("image", "fused", "niche", "joint", "probe")
        need_gene = modality in ("gene", "fused", "niche", "joint")
        inp = self._inputs(adata, image=need_image, gene=need_gene)
        m = self.module
        out = []
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            t = {}
            for key, value in inp.items():
                v = value[sel]
                v = v.toarray() if sp.issparse(v) else np.asarray(v)
                t[key] = torch.as_tensor(v).to(device)
            if modality == "image":
                z = m.encode_image(t["spot_image"])
            elif modality == "gene":
                z = m.encode_gene(t["x"])
            elif modality == "fused":
                z = m.fuse(m.encode_image(t["spot_image"]), m.encode_gene(t["x"]))
            elif modality == "niche":
                z = m.fuse(m.encode_niche_image(t["niche_image"]), m.encode_niche_gene(t["niche_x"]))
            elif modality == "joint":
                z = torch.nn.functional.normalize(m.encode_image(t["spot_image"]), dim=-1) + torch.nn.functional.normalize(
                    m.encode_gene(t["x"]), dim=-1
                )
            else:  # probe input
                out.append(m.image_probe_input(t["spot_image"], t["niche_image"]).float().cpu())
                continue
            out.append(torch.nn.functional.normalize(z, dim=-1).float().cpu())
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
        adata
            AnnData to embed (the training AnnData when ``None``); missing tiles, niche features
            and niche graph are built for it (not written). It needs counts (the model's genes,
            matched by name) for every modality but ``'image'``, and for every modality but
            ``'gene'`` the image features of ``image_key`` and a reachable H&E (or the stored
            tiles / niche features).
        indices
            Subset of observations.
        batch_size
            Spots per forward pass.
        modality
            ``'fused'`` (default: the ABFN fusion of the spot's image and expression, ST-Align's
            spot representation for zero-shot spatial clustering), ``'niche'`` (the fused niche
            feature), ``'image'`` (spot image only; what query-reference prediction uses),
            ``'gene'`` (spot expression only) or ``'joint'`` (normalised sum of the image and
            gene embeddings, as in UMPIRE).

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

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
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

        AdamW with a linear warm-up (``warmup_fraction`` of the steps) and a cosine decay of the
        learning rate. With a ``batch_key`` of several sections, whole sections are held out for
        validation (``validation_sections``, default the last) and early stopping watches
        ``recall5_validation`` (spot image↔gene retrieval over the validation set); with one
        section, 10 % of spots are held out at random.

        Parameters
        ----------
        max_epochs
            Maximum passes over the training spots.
        lr, weight_decay
            AdamW settings (peak learning rate).
        batch_size
            Spots per step (the InfoNCE negatives); the last incomplete batch is dropped.
        warmup_fraction
            Fraction of the steps of linear warm-up.
        validation_sections
            Sections held out for validation.
        early_stopping, early_stopping_patience
            Stop when ``recall5_validation`` has not improved for that many epochs.
        restore_best_weights
            End with the weights of the best epoch (:class:`imagene.train.RestoreBestWeights`).
        probe_epochs
            Epochs of the expression probe (an MLP from the frozen image latents to every gene,
            log-normalised, MSE); 0 skips it.
        accelerator, devices
            Lightning device settings.
        plan_kwargs
            Passed to the training plan (:class:`imagene.train.ContrastiveTrainingPlan` options).
        datasplitter_kwargs
            Passed to :class:`scvi.dataloaders.DataSplitter`.
        checkpoint_dir, resume
            Write ``last.ckpt`` there after every epoch, and continue from it after an interruption
            (:func:`imagene.train.checkpoint_settings`).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer`.

        Returns
        -------
        Nothing; the model is trained in place (``history``, ``is_trained_``).

        Examples
        --------
        >>> model.train(max_epochs=50)
        """
        plan_kwargs = {
            "optimizer": "AdamW",
            "lr": lr,
            "weight_decay": weight_decay,
            "lr_schedule": "warmup_cosine",
            "warmup_fraction": warmup_fraction,
            **(plan_kwargs or {}),
        }
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

    def _train_probe(self, epochs: int, batch_size: int = 128, lr: float = 1e-3) -> None:
        """Fit the MLP probe: frozen image latents of the training spots → log-normalised expression."""
        from imagene.train import RegressionTask, fit, tensor_loaders

        x = self._embed(self.adata, "probe", None, 512)
        y = log_normalize(self._gene_input(self.adata))
        probe = self.module.probe
        device = next(probe.parameters()).device
        probe.requires_grad_(True)
        task = RegressionTask(probe, lr=lr, weight_decay=1e-4)
        loader, _ = tensor_loaders(x, y, batch_size=batch_size, seed=0)
        try:
            fit(task, loader, max_epochs=epochs, what="the STAlign expression probe",
                accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, enable_progress_bar=False)
        finally:
            probe.requires_grad_(False)
            probe.eval()
            probe.to(device)
        self.probe_trained_ = True
        logger.info("Trained the expression probe for %d epochs (last epoch MSE %.4f)", epochs,
                    task.epoch_history["train_loss"][-1])

    # ------------------------------------------------------------------------------------------
    # prediction
    # ------------------------------------------------------------------------------------------
    def predict_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        method: Literal["reference", "probe"] = "reference",
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
        adata
            Query with ``obsm[image_key]`` and a reachable H&E (or the stored spot tiles and niche
            features); no expression needed. The training AnnData when ``None``.
        indices
            Subset of query observations.
        method
            ``'reference'``: query-reference retrieval as UMPIRE (the ``k`` training spots whose
            gene embedding is closest to the query's spot image embedding, weighted by
            ``weighting``; see :meth:`imagene.model.AlignmentMixin.predict_expression`).
            ``'probe'``: the MLP probe trained after the alignment on the training spots' spot and
            niche image latents (ST-Align's gene prediction).
        k, weighting
            Retrieval settings (``method='reference'``).
        gene_list
            Genes to return (default: all of the model's genes).
        batch_size
            Query spots per step.
        return_numpy
            Return arrays instead of DataFrames.
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
        if method == "reference":
            return super().predict_expression(
                adata, indices, k=k, weighting=weighting, gene_list=gene_list, batch_size=batch_size,
                return_numpy=return_numpy, return_sd=return_sd,
            )
        if method != "probe":
            raise ValueError(f"method must be 'reference' or 'probe'; got {method!r}.")
        adata = self._query(adata)
        cols = self._gene_columns(gene_list)
        pred, sd = self._predict_probe(adata, indices, cols, batch_size, with_sd=return_sd)
        return _format_prediction(self, adata, indices, cols, pred, sd, return_numpy)

    def _predict_probe(
        self, adata: AnnData, indices: Sequence[int] | None, cols: np.ndarray, batch_size: int, *, with_sd: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """MLP-probe prediction and, with ``with_sd``, its Monte-Carlo-dropout spread (16 passes)."""
        self._check_trained()
        if not self.probe_trained_:
            raise RuntimeError("The expression probe is not trained; call `model.train(probe_epochs=30)`.")
        x = torch.as_tensor(self._embed(adata, "probe", indices, batch_size))
        device = next(self.module.parameters()).device

        def forward() -> np.ndarray:
            if not x.shape[0]:
                return np.zeros((0, len(cols)), np.float32)
            with torch.inference_mode():
                return np.concatenate(
                    [
                        self.module.probe(x[s : s + batch_size].to(device)).clamp(min=0).float().cpu().numpy()[:, cols]
                        for s in range(0, x.shape[0], batch_size)
                    ]
                )

        self.module.eval()
        pred = forward()
        sd = mc_dropout_sd(self.module.probe, forward) if with_sd else None
        return pred, sd

    def _predict_full(self, adata: AnnData, genes: Sequence[str], **kwargs: Any) -> dict[str, np.ndarray | None]:
        method = kwargs.pop("method", "reference")
        if method == "reference":
            return super()._predict_full(adata, genes, **kwargs)
        if method != "probe":
            raise ValueError(f"method must be 'reference' or 'probe'; got {method!r}.")
        cols = self._gene_columns(genes)
        pred, sd = self._predict_probe(adata, None, cols, int(kwargs.get("batch_size", 512)), with_sd=True)
        return {"pred": pred, "sd": sd, "similarity": None}


# ----------------------------------------------------------------------------------------------
# building spot tiles, niche tiles and niche graphs (no writes: the caller writes)
# ----------------------------------------------------------------------------------------------
def _light_copy(adata: AnnData, obs_cols: Sequence[str]) -> AnnData:
    """An AnnData with only what tiling and niche graphs read (spots, sections, uns['spatial'])."""
    obs = adata.obs[[c for c in obs_cols if c in adata.obs]].copy()
    light = AnnData(obs=obs, obsm={KEYS.SPATIAL: np.asarray(adata.obsm[KEYS.SPATIAL])})
    light.uns["spatial"] = adata.uns.get("spatial", {})
    return light


def _libraries(adata: AnnData, library_key: str | None) -> tuple[str | None, dict[str, np.ndarray]]:
    from imagene.pp._library import resolve_libraries

    return resolve_libraries(adata, library_key)


def _niche_graph(
    adata: AnnData, niche_key: str, library_key: str | None, n_neighs: int
) -> tuple[sp.csr_matrix, list[tuple[str, str, Any]]]:
    """The niche connectivities of ``adata`` (from obsp, or built) and the keys to write when built."""
    key = f"{niche_key}_connectivities"
    if key in adata.obsp:
        return sp.csr_matrix(adata.obsp[key]), []
    import imagene as ig

    if KEYS.SPATIAL not in adata.obsm:
        raise KeyError(
            f"adata.obsp[{key!r}] and adata.obsm['spatial'] not found: the niche graph cannot be built. "
            "Run `imagene.pp.niches(adata)` or store the spot centres in obsm['spatial']."
        )
    lib_key, _ = _libraries(adata, library_key)
    light = _light_copy(adata, [lib_key] if lib_key else [])
    ig.pp.niches(light, n_neighs=n_neighs, library_key=lib_key, niche_expression=False, key_added=niche_key)
    writes = [("obsp", k, light.obsp[k]) for k in (key, f"{niche_key}_distances")]
    writes.append(("uns", f"{niche_key}_neighbors", light.uns[f"{niche_key}_neighbors"]))
    return sp.csr_matrix(light.obsp[key]), writes


def _section_image(adata: AnnData, lib: str, image: Any):
    """(image array, image px per full-resolution px, microns per full-resolution px, description)."""
    from imagene.pp._tiles import _source_for

    img, scale, desc = _source_for(adata, lib, image)
    mpp = adata.uns.get("spatial", {}).get(lib, {}).get("scalefactors", {}).get("microns_per_pixel")
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(
            f"Microns per pixel unknown for section {lib!r}: set "
            f"adata.uns['spatial'][{lib!r}]['scalefactors']['microns_per_pixel'] (imagene.io readers do)."
        )
    return img, float(scale), float(mpp), desc


def _neighbour_distance_um(xy: np.ndarray, mpp: float, k: int = 3) -> float:
    from scipy.spatial import cKDTree

    if len(xy) <= k:
        return 0.0
    dist, _ = cKDTree(xy).query(xy, k=k + 1)
    return float(np.median(dist[:, k]) * mpp)


def _tiles(img: Any, xy: np.ndarray, scale: float, mpp: float, size_um: float, px: int, lib: str) -> np.ndarray:
    """Tiles of ``size_um`` µm at ``px`` px around ``xy`` (full-resolution px) with imagene.pp.extract_tiles."""
    import imagene as ig

    light = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(xy))]), obsm={KEYS.SPATIAL: xy * scale})
    ig.pp.extract_tiles(
        light, tile_size_um=size_um, tile_px=int(px), image=img, microns_per_pixel=mpp / scale, check_scale=False,
        library_key=None, key_added="tiles", show_progress_bar=False,
    )
    return np.asarray(light.obsm["tiles"])


def _encoder(name: str) -> torch.nn.Module:
    if name not in _ENCODERS:
        from imagene.nn import get_image_encoder

        _ENCODERS.clear()
        _ENCODERS[name] = get_image_encoder(name)
    return _ENCODERS[name]


def _prepare(
    adata: AnnData,
    *,
    counts: Any,
    image_key: str,
    niche_key: str,
    library_key: str | None,
    spot_tiles_key: str,
    niche_image_key: str,
    image: Any,
    need_spot_tiles: bool,
    spot_tile_size_um: float,
    spot_tile_px: int,
    niche_tile_size_um: float | None,
    niche_tile_px: int,
    niche_encoder: str,
    n_niche_neighs: int,
) -> dict[str, Any]:
    """Compute the niche graph / mean counts, spot tiles and niche features missing from ``adata``."""
    from imagene.pp._features import encode_tiles, resolve_device

    writes: list[tuple[str, str, Any]] = []
    conn, graph_writes = _niche_graph(adata, niche_key, library_key, n_niche_neighs)
    writes += graph_writes
    neighbors = adata.uns.get(f"{niche_key}_neighbors") or dict(graph_writes[-1][2] if graph_writes else {})
    n_neighs = int(neighbors.get("params", {}).get("n_neighbors", n_niche_neighs))
    if counts is not None and f"{niche_key}_mean" not in adata.layers:
        mean = niche_mean_operator(conn) @ sp.csr_matrix(counts, dtype=np.float32)
        writes.append(("layers", f"{niche_key}_mean", sp.csr_matrix(mean, dtype=np.float32)))

    want_spot = need_spot_tiles and spot_tiles_key not in adata.obsm
    want_niche = niche_image_key not in adata.obsm
    size_used = niche_tile_size_um
    if want_spot or want_niche:
        lib_key, groups = _libraries(adata, library_key)
        spatial = np.asarray(adata.obsm[KEYS.SPATIAL], dtype=np.float64)[:, :2]
        sections = {}
        try:
            for lib, idx in groups.items():
                sections[lib] = _section_image(adata, lib, image)
        except (KeyError, ValueError, FileNotFoundError, OSError) as e:
            sections = None
            reason = f"{type(e).__name__}: {e}"
        if sections is None:
            warn(
                f"STAlign: no H&E image could be reached ({reason}). No spot tiles are cut (use "
                "adaptive_encoders=False) and the niche image features are the niche mean of "
                f"obsm[{image_key!r}]. Pass `image=` or set uns['spatial'][section]['metadata']['source_image_path'] "
                "to use the image itself."
            )
            if want_niche:
                feats = np.asarray(adata.obsm[image_key], dtype=np.float32)
                writes.append(("obsm", niche_image_key, np.asarray(niche_mean_operator(conn) @ feats, np.float32)))
        else:
            if size_used is None:
                d3 = np.median(
                    [_neighbour_distance_um(spatial[idx], sections[lib][2]) for lib, idx in groups.items()]
                )
                size_used = float(round(2 * d3 + spot_tile_size_um))
            spot_tiles = np.zeros((adata.n_obs, spot_tile_px, spot_tile_px, 3), np.uint8) if want_spot else None
            niche_feats = None
            device = resolve_device("auto")
            for lib, idx in groups.items():
                img, scale, mpp, desc = sections[lib]
                xy = spatial[idx]
                digest = hashlib.sha1(np.ascontiguousarray(xy).tobytes()).hexdigest()
                if want_spot:
                    key = ("spot", desc, lib, spot_tile_size_um, spot_tile_px, digest)
                    spot_tiles[idx] = _cached(
                        key, lambda: _tiles(img, xy, scale, mpp, spot_tile_size_um, spot_tile_px, lib)
                    )
                if want_niche:
                    key = ("niche", desc, lib, size_used, niche_tile_px, niche_encoder, digest)

                    def _niche(img=img, xy=xy, scale=scale, mpp=mpp, lib=lib):
                        tiles = _tiles(img, xy, scale, mpp, size_used, niche_tile_px, lib)
                        enc = _encoder(niche_encoder).to(device)
                        return encode_tiles(tiles, enc, device=device, input_px=niche_tile_px)

                    feats = _cached(key, _niche)
                    if niche_feats is None:
                        niche_feats = np.zeros((adata.n_obs, feats.shape[1]), np.float32)
                    niche_feats[idx] = feats
            if want_spot:
                writes.append(("obsm", spot_tiles_key, spot_tiles))
                writes.append(
                    ("uns", spot_tiles_key, {"tile_size_um": float(spot_tile_size_um), "tile_px": int(spot_tile_px),
                                             "coordinate_system": "full-resolution pixels"})
                )
            if want_niche:
                writes.append(("obsm", niche_image_key, niche_feats))
                writes.append(
                    ("uns", niche_image_key, {"tile_size_um": float(size_used), "tile_px": int(niche_tile_px),
                                              "encoder": niche_encoder, "input_px": int(niche_tile_px)})
                )
    elif size_used is None:
        size_used = adata.uns.get(niche_image_key, {}).get("tile_size_um")
    return {"writes": writes, "niche_tile_size_um": size_used, "n_niche_neighs": n_neighs}
