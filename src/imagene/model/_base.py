"""What every imagene model shares: data alignment, latents by modality, query-reference prediction."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from imagene._constants import KEYS, REGISTRY_KEYS
from imagene._utils import check_adata, check_counts, get_counts, warn
from imagene._validate import (
    MIN_VALIDATION_SPOTS,
    check_feature_provenance,
    check_int,
    check_max_epochs,
    check_model_dir,
    check_unique_obs_names,
    check_validation_size,
    ddp_world_size,
    feature_provenance,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger("imagene")

Modality = Literal["image", "gene", "joint"]


class AlignmentMixin:
    """Inference shared by the alignment models (mixed into a scvi-tools ``BaseModelClass``).

    Query data only needs what a modality uses: ``obsm[image_key]`` for the image side, the
    registered counts layer for the gene side (aligned to the model's genes by name).
    """

    # ---- registry helpers
    @property
    def _setup_args(self) -> dict:
        return self.registry_["setup_args"]

    @property
    def image_key(self) -> str:
        """``obsm`` key of the image input registered by ``setup_anndata``."""
        return self._setup_args["image_key"]

    @property
    def library_key(self) -> str | None:
        """``obs`` column of sections registered by ``setup_anndata`` (``None``: one section).

        Sections are held out whole for validation and graphs are built within each; the column is
        not a covariate of the model. Models saved before the rename stored it as ``batch_key``.
        """
        args = self._setup_args
        return args.get("library_key", args.get("batch_key"))

    @property
    def gene_names(self) -> pd.Index:
        """Genes of the model's gene tower, in order."""
        return pd.Index(self.get_var_names())

    @staticmethod
    def _check_setup(
        adata: AnnData, layer: str | None, image_key: str | None, library_key: str | None, *,
        image_hint: str | None = None,
    ):
        """Checks every ``setup_anndata`` shares; returns the raw counts of ``layer``.

        Refuses views (registration writes into the AnnData), a missing ``obsm[image_key]``
        (``None`` skips the check), non-count data and a missing ``obs[library_key]``, each with the fix.
        """
        check_adata(adata)
        check_unique_obs_names(adata)
        if adata.is_view:
            raise ValueError("setup_anndata got a view of an AnnData. Pass a copy: `adata = adata[mask].copy()`.")
        if image_key is not None and image_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{image_key!r}] not found. "
                + (image_hint or "Run `imagene.pp.extract_tiles(adata)` and `imagene.pp.embed_tiles(adata)` first, "
                   "or pass the obsm key of your image features as `image_key=`.")
            )
        counts = get_counts(adata, layer)  # raises on non-count data
        if library_key is not None and library_key not in adata.obs:
            raise KeyError(
                f"adata.obs[{library_key!r}] not found. Pass the obs column of sections as `library_key=`."
            )
        return counts

    def _validation_mask(self, validation_sections: Sequence[str] | None) -> np.ndarray | None:
        """Boolean mask of the spots of the validation sections, or ``None`` with fewer than two sections.

        The default holds out the last section (in category order) of ``library_key``.
        """
        library_key = self.library_key
        if library_key is None:
            return None
        sections = pd.Categorical(self.adata.obs[library_key].astype(str))
        cats = list(sections.categories)
        if len(cats) < 2:
            return None
        validation_sections = [cats[-1]] if validation_sections is None else list(validation_sections)
        unknown = set(validation_sections) - set(cats)
        if unknown:
            raise ValueError(f"validation_sections {sorted(unknown)} not in adata.obs[{library_key!r}] ({cats}).")
        if set(validation_sections) == set(cats):
            raise ValueError("validation_sections cannot hold every section: nothing would be left to train on.")
        logger.info("Validating on held-out section(s) %s", validation_sections)
        return np.isin(np.asarray(sections), validation_sections)

    def _section_split(self, validation_sections: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray] | None:
        """Train and validation spot indices by section (``None``: no sections to split by)."""
        is_val = self._validation_mask(validation_sections)
        return None if is_val is None else (np.flatnonzero(~is_val), np.flatnonzero(is_val))

    def _train_spots(
        self,
        max_epochs: int,
        *,
        plan_kwargs: dict,
        batch_size: int,
        validation_sections: Sequence[str] | None,
        early_stopping: bool,
        early_stopping_patience: int,
        restore_best_weights: bool,
        accelerator: str,
        devices: int | list[int] | str,
        datasplitter_kwargs: dict | None,
        monitor: tuple[str, str] = ("recall5_validation", "max"),
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        **trainer_kwargs,
    ) -> None:
        """Spot-level training with scvi-tools' runner: whole sections held out for validation.

        With a ``library_key`` of several sections the validation spots are those of
        ``validation_sections`` (default the last section); with one section 10 % of the spots
        are held out at random. Batches never exceed the training spots; the last incomplete
        batch is dropped (InfoNCE needs full batches of negatives).
        """
        from scvi.model.base import UnsupervisedTrainingMixin

        from imagene.train import check_optimised, checkpoint_settings, monitoring_settings, trainable_snapshot

        max_epochs = check_max_epochs(max_epochs)
        batch_size = check_int("batch_size", batch_size, 2, hint="InfoNCE needs negatives: pass e.g. `batch_size=128`.")
        datasplitter_kwargs = dict(datasplitter_kwargs or {})
        split = self._section_split(validation_sections)
        n_train = self.adata.n_obs
        if split is not None and "external_indexing" not in datasplitter_kwargs:
            datasplitter_kwargs["external_indexing"] = [split[0], split[1], np.array([], dtype=int)]
            n_train = len(split[0])
            check_validation_size(len(split[1]), "validation set (held-out sections)")
        elif split is None:
            trainer_kwargs.setdefault("train_size", 0.9)
            n_train = int(0.9 * self.adata.n_obs)
            n_val = self.adata.n_obs - n_train
            if n_val < MIN_VALIDATION_SPOTS:
                warn(
                    f"Only {n_val} spot(s) are held out for validation (10% of one section): recall@5% over so few "
                    "spots barely moves, so early stopping is unreliable. Set up with `library_key=` and several "
                    "sections, or pass `early_stopping=False`."
                )
        # each device draws its own batches from its shard of the training spots
        world = ddp_world_size(trainer_kwargs.get("strategy"), devices, trainer_kwargs.get("num_nodes", 1))
        batch_size = int(min(batch_size, max(2, n_train // world)))
        datasplitter_kwargs.setdefault("drop_last", n_train // world > batch_size)
        trainer_kwargs = monitoring_settings(
            trainer_kwargs, early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
            restore_best_weights=restore_best_weights, monitor=monitor[0], mode=monitor[1], runner="scvi",
        )
        trainer_kwargs, ckpt_path = checkpoint_settings(
            trainer_kwargs, checkpoint_dir, resume, what=f"{type(self).__name__} training"
        )
        if ckpt_path is not None:
            trainer_kwargs["ckpt_path"] = ckpt_path
        # Lightning keeps the mode modules are in: a model used for inference before is in eval mode
        self.module.train()
        before = trainable_snapshot(self.module)
        UnsupervisedTrainingMixin.train(
            self,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            batch_size=batch_size,
            early_stopping=early_stopping,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **trainer_kwargs,
        )
        self._record_monitor(trainer_kwargs, monitor, early_stopping)
        if ckpt_path is None:  # a resumed run may legitimately start at its last epoch
            self._require_optimised(before, check_optimised)

    def _require_optimised(self, before: list, check) -> None:
        """Unmark the model as trained and raise when no optimisation step ran."""
        try:
            check(self.module, before, name=type(self).__name__)
        except RuntimeError:
            self.is_trained_ = False
            raise

    def _record_monitor(self, trainer_kwargs: dict, monitor: tuple[str, str], early_stopping: bool) -> None:
        """Keep what the fit watched and the epoch it restored (``train_monitor_``, saved with the model)."""
        from imagene.train import monitor_summary

        self.train_monitor_ = monitor_summary(
            trainer_kwargs.get("callbacks"), monitor=monitor[0], mode=monitor[1], early_stopping=early_stopping
        )

    def _check_trained(self) -> None:
        if not self.is_trained_:
            raise RuntimeError(f"The {type(self).__name__} model is not trained yet. Call `model.train()` first.")

    def _query(self, adata: AnnData | None) -> AnnData:
        return resolve_query(self, adata)

    def _make_module(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        return make_module(self, *args, **kwargs)

    # ---- aligned inputs for any AnnData (query or reference)
    def _image_input(self, adata: AnnData, idx: np.ndarray) -> np.ndarray:
        key = self.image_key
        if key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{key!r}] not found. The model was set up with image_key={key!r}: compute it for this "
                "AnnData the same way (`imagene.pp.extract_tiles` then `imagene.pp.embed_tiles` with the same encoder)."
            )
        arr = adata.obsm[key]
        if adata is not self.adata:
            expected_features = getattr(self, "feature_provenance_", None)
            if expected_features is None and self.adata is not None:
                expected_features = feature_provenance(self.adata, key)
            check_feature_provenance(expected_features, adata, key)
        expected = self.summary_stats[f"n_{REGISTRY_KEYS.IMAGE_KEY}"]
        if arr.shape[1] != expected:
            raise ValueError(
                f"adata.obsm[{key!r}] has {arr.shape[1]} columns but the model was trained on {expected}. "
                "Embed this AnnData's tiles with the encoder used for training."
            )
        return np.asarray(arr[idx])

    def _gene_input(self, adata: AnnData, idx: np.ndarray | None = None) -> sp.csr_matrix:
        """Raw counts of ``adata`` on the model's genes (reordered; missing genes are zero, with a warning)."""
        layer = self._setup_args.get("layer")
        mat = adata.X if layer is None else adata.layers.get(layer)
        if mat is None:
            raise KeyError(f"adata.layers[{layer!r}] not found; the model was set up with layer={layer!r} (raw counts).")
        genes = self.gene_names
        if not adata.var_names.equals(genes):
            pos = adata.var_names.get_indexer(genes)
            missing = int((pos < 0).sum())
            if missing == len(genes):
                raise ValueError("The AnnData shares no gene with the model; check that var_names are gene symbols.")
            if missing:
                warn(f"{missing} of the model's {len(genes)} genes are missing from this AnnData; they are set to 0.")
            mat = sp.csr_matrix(mat)
            cols = mat[:, np.maximum(pos, 0)].tocsc()
            if missing:
                keep = sp.diags((pos >= 0).astype(np.float32))
                cols = cols @ keep
            mat = cols
        mat = sp.csr_matrix(mat, dtype=np.float32)
        if idx is not None:
            mat = mat[idx]
        check_counts(mat, f"counts of the query ({'X' if layer is None else f'layers[{layer!r}]'})")
        return mat

    def _indices(self, adata: AnnData, indices: Sequence[int] | None) -> np.ndarray:
        return np.arange(adata.n_obs) if indices is None else np.asarray(indices)

    @torch.inference_mode()
    def _embed(self, adata: AnnData, modality: str, indices: Sequence[int] | None, batch_size: int) -> np.ndarray:
        self.module.eval()
        device = next(self.module.parameters()).device
        idx = self._indices(adata, indices)
        out = []
        gene = self._gene_input(adata) if modality in ("gene", "joint") else None
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            zs = []
            if modality in ("image", "joint"):
                img = torch.as_tensor(self._image_input(adata, sel)).to(device)
                zs.append(self.module.encode_image(img))
            if gene is not None:
                x = torch.as_tensor(gene[sel].toarray()).to(device)
                zs.append(self.module.encode_gene(x))
            z = zs[0] if len(zs) == 1 else torch.nn.functional.normalize(zs[0] + zs[1], dim=-1)
            out.append(z.float().cpu())
        return torch.cat(out).numpy()

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 512,
        *,
        modality: Modality = "joint",
    ) -> np.ndarray:
        """L2-normalised embedding of each spot.

        Parameters
        ----------
        adata
            AnnData to embed (the training AnnData when ``None``). It needs ``obsm[image_key]`` for
            ``'image'``, the counts layer for ``'gene'`` (matched to the model's genes by name), both
            for ``'joint'``.
        indices
            Subset of observations.
        batch_size
            Spots per forward pass.
        modality
            ``'image'``, ``'gene'`` or ``'joint'`` (normalised sum of the aligned image and gene
            embeddings).

        Returns
        -------
        (n_obs, n_latent) float32 array; write it yourself
        (``adata.obsm["X_imagene_joint"] = ...``) or use :func:`imagene.tl.embed`.
        """
        if modality not in ("image", "gene", "joint"):
            raise ValueError(f"modality must be 'image', 'gene' or 'joint'; got {modality!r}.")
        self._check_trained()
        adata = self._query(adata)
        return self._embed(adata, modality, indices, batch_size)

    # ---- query-reference prediction (UMPIRE / BLEEP style)
    def _build_reference(self, batch_size: int = 512) -> None:
        """Store the training spots' gene embeddings and log-normalised expression (saved with the model)."""
        self.reference_latent_ = self._embed(self.adata, "gene", None, batch_size).astype(np.float32)
        self._set_reference_counts(self._gene_input(self.adata))
        self._store_similarity_threshold(batch_size)

    def _set_reference_counts(self, counts: sp.spmatrix) -> None:
        """Store the reference spots' counts compactly (saved with the model; the expression derives from them)."""
        self.reference_counts_ = compact_counts(counts)
        self._reference_expression = None

    @property
    def reference_expression(self) -> sp.csr_matrix | None:
        """Log-normalised expression (log1p CP10k) of the reference spots, (n_reference, n_genes) CSR."""
        if getattr(self, "_reference_expression", None) is None:
            stored = getattr(self, "reference_counts_", None)
            if stored is None:  # a model saved before the compact bank
                return self.__dict__.get("reference_expression_")
            self._reference_expression = log_normalize_sparse(expand_counts(stored))
        return self._reference_expression

    def _store_similarity_threshold(self, batch_size: int = 512, *, exclude_self: bool = False) -> None:
        """1st percentile of the training spots' best image-to-bank similarity (saved; the OOD threshold).

        ``exclude_self``: the bank holds the training spots' own image embeddings, so each spot's
        best match is itself; the second best is used.
        """
        z = torch.as_tensor(self._embed(self.adata, "image", None, batch_size))
        bank = torch.as_tensor(self.reference_latent_)
        j = 1 if exclude_self and bank.shape[0] > 1 else 0
        best = torch.cat(
            [(z[s : s + 1024] @ bank.T).topk(j + 1, dim=1).values[:, j] for s in range(0, z.shape[0], 1024)]
        )
        self.ood_similarity_threshold_ = float(np.quantile(best.numpy(), 0.01))

    @torch.inference_mode()
    def _predict_reference(
        self,
        adata: AnnData,
        indices: Sequence[int] | None,
        *,
        k: int,
        weighting: str,
        cols: np.ndarray,
        batch_size: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Query-reference retrieval: (prediction, weighted spread of the neighbours, best similarity)."""
        self._check_trained()
        if adata is not None:
            check_adata(adata)
            check_unique_obs_names(adata)
        if getattr(self, "reference_latent_", None) is None:
            raise RuntimeError("The model has no reference bank; train it (or load a trained model) first.")
        if weighting not in ("similarity", "softmax", "uniform"):
            raise ValueError(f"weighting must be 'similarity', 'softmax' or 'uniform'; got {weighting!r}.")
        k = int(min(k, self.reference_latent_.shape[0]))
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}.")
        z_q = torch.as_tensor(self.get_latent_representation(adata, indices, batch_size, modality="image"))
        bank = torch.as_tensor(self.reference_latent_)
        ref = sp.csr_matrix(self.reference_expression[:, cols], dtype=np.float32)
        ref_sq = ref.multiply(ref).tocsr()
        scale = float(self.module.logit_scale().detach().cpu())
        preds, sds, best = [], [], []
        for start in range(0, z_q.shape[0], batch_size):
            sim = z_q[start : start + batch_size] @ bank.T
            top, pos = sim.topk(k, dim=1)
            if weighting == "similarity":
                w = top.clamp(min=0)
                w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
            elif weighting == "softmax":
                w = torch.softmax(top * scale, dim=1)
            else:
                w = torch.ones_like(top)
            w = (w / w.sum(1, keepdim=True)).numpy().astype(np.float64)
            n_q = w.shape[0]
            weights = sp.csr_matrix(
                (w.ravel(), pos.numpy().ravel(), np.arange(0, n_q * k + 1, k)), shape=(n_q, ref.shape[0])
            )
            mean = np.asarray((weights @ ref).todense())
            second = np.asarray((weights @ ref_sq).todense())
            preds.append(mean.astype(np.float32))
            sds.append(np.sqrt(np.clip(second - mean**2, 0, None)).astype(np.float32))
            best.append(top[:, 0].numpy().astype(np.float32))
        if not preds:
            empty = np.zeros((0, len(cols)), np.float32)
            return empty, empty.copy(), np.zeros(0, np.float32)
        return np.concatenate(preds), np.concatenate(sds), np.concatenate(best)

    def _predict_full(self, adata: AnnData, genes: Sequence[str], **kwargs: Any) -> dict[str, np.ndarray | None]:
        """Prediction, spread and best reference similarity of every spot of ``adata`` (see tl.predict_expression)."""
        cols = self._gene_columns(genes)
        kwargs.setdefault("k", 50)
        kwargs.setdefault("weighting", "similarity")
        kwargs.setdefault("batch_size", 512)
        pred, sd, best = self._predict_reference(adata, None, cols=cols, **kwargs)
        return {"pred": pred, "sd": sd, "similarity": best}

    @torch.inference_mode()
    def reference_similarity(self, adata: AnnData | None = None, batch_size: int = 512) -> np.ndarray:
        """Best cosine similarity of each spot's image embedding to the reference bank (n_obs,).

        Spots below ``ood_similarity_threshold_`` (the 1st percentile over the training spots,
        saved with the model) are unlike every training spot: :func:`imagene.tl.predict_expression`
        flags them in ``obs``.
        """
        adata = self._query(adata)
        if getattr(self, "reference_latent_", None) is None:
            raise RuntimeError("The model has no reference bank; train it (or load a trained model) first.")
        z = torch.as_tensor(self.get_latent_representation(adata, None, batch_size, modality="image"))
        bank = torch.as_tensor(self.reference_latent_)
        return torch.cat([(z[s : s + 1024] @ bank.T).max(1).values for s in range(0, z.shape[0], 1024)]).numpy()

    def _gene_columns(self, gene_list: Sequence[str] | None) -> np.ndarray:
        genes = self.gene_names
        if gene_list is None:
            return np.arange(len(genes))
        pos = genes.get_indexer(pd.Index(gene_list))
        if (pos < 0).any():
            unknown = pd.Index(gene_list)[pos < 0][:10].tolist()
            raise KeyError(f"Genes not known to the model: {unknown}. Use genes from `model.gene_names`.")
        return pos

    def predict_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        k: int = 50,
        weighting: Literal["similarity", "softmax", "uniform"] = "similarity",
        gene_list: Sequence[str] | None = None,
        batch_size: int = 512,
        return_numpy: bool = False,
        return_sd: bool = False,
    ) -> pd.DataFrame | np.ndarray | tuple:
        """Predict expression from the image alone by query-reference retrieval.

        Each query spot's image embedding is compared (cosine) with the gene embeddings of the
        reference bank (the training spots, stored with the model); the prediction is the
        weighted mean of the log-normalised expression (``log1p`` of counts per 10k) of the ``k``
        most similar reference spots, and its spread (``return_sd``) the weighted standard
        deviation of those ``k`` references.

        Parameters
        ----------
        adata
            Query with ``obsm[image_key]`` (no expression needed, any genes); the training AnnData when ``None``.
        indices
            Subset of query observations.
        k
            Number of reference neighbours.
        weighting
            ``'similarity'`` (weights ∝ positive cosine similarity), ``'softmax'`` (the model's own
            temperature) or ``'uniform'``.
        gene_list
            Genes to return (default: all of the model's genes, ``model.gene_names``).
        batch_size
            Query spots per step.
        return_numpy
            Return arrays instead of DataFrames.
        return_sd
            Also return the per-spot, per-gene spread.

        Returns
        -------
        (n_obs, n_genes) log-normalised predictions as a DataFrame (obs names × genes) or array;
        with ``return_sd``, a tuple ``(prediction, sd)``.
        """
        adata = self._query(adata)
        cols = self._gene_columns(gene_list)
        pred, sd, _ = self._predict_reference(
            adata, indices, k=k, weighting=weighting, cols=cols, batch_size=batch_size
        )
        return _format_prediction(self, adata, indices, cols, pred, sd if return_sd else None, return_numpy)

    # ---- persistence
    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **kwargs: Any,
    ):
        """Load a saved model, with or without data.

        Parameters
        ----------
        dir_path
            Folder written by ``model.save(dir_path)``.
        adata
            ``None`` (default): the model is loaded from the folder alone and can embed and predict
            any query passed to its methods (:func:`imagene.tl.predict_expression`). An AnnData with
            the model's genes, in order, and raw counts in the registered layer is registered with
            the model as for scvi-tools (``model.adata``; it can then train further). Any other
            AnnData (other genes, no counts) is not registered: the model loads without data and a
            log line says so; pass that AnnData to ``predict_expression`` / ``get_latent_representation``.
        accelerator, device
            Where the module goes (``'auto'``: a GPU when present).
        prefix
            Prefix of the saved file names.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load` when ``adata`` is registered.

        Returns
        -------
        The trained model.

        Examples
        --------
        >>> model = imagene.model.UMPIRE.load("model_dir")
        >>> imagene.tl.predict_expression(model, query)
        """
        check_model_dir(dir_path)
        return load_model(cls, dir_path, adata, accelerator=accelerator, device=device, prefix=prefix, **kwargs)


def default_latent_key(modality: str) -> str:
    """``obsm`` key where :func:`imagene.tl.embed` writes a modality's latent."""
    return f"{KEYS.LATENT_PREFIX}{modality}"


def resolve_query(model: Any, adata: AnnData | None) -> AnnData:
    """``adata``, or the model's training AnnData when ``None``; a clear error when the model has none."""
    if adata is None:
        adata = model.adata
    if adata is None:
        raise ValueError(
            f"This {type(model).__name__} was loaded without its training AnnData: pass the AnnData to embed or "
            "predict, e.g. `model.predict_expression(query)` or `imagene.tl.predict_expression(model, query)`."
        )
    check_adata(adata)
    return adata


def make_module(model: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Build ``model._module_cls(*args, **kwargs)`` and record what inference needs without the training data.

    Saved with the model: the module's arguments (``load`` rebuilds it from them) and the tile
    settings of the image features (``tile_settings_``, used to embed a new slide the same way) and
    their provenance (``feature_provenance_``: a query embedded otherwise is refused).
    """
    model.module_args_ = {"args": list(args), "kwargs": dict(kwargs)}
    model.tile_settings_ = tile_settings(model.adata, model._setup_args.get("image_key"))
    image_key = model._setup_args.get("image_key")
    model.feature_provenance_ = feature_provenance(model.adata, image_key) if image_key else None
    return model._module_cls(*args, **kwargs)


def tile_settings(adata: AnnData, image_key: str | None) -> dict[str, Any]:
    """Tile size, tile pixels and encoder behind ``obsm[image_key]`` (from provenance; the pp defaults otherwise)."""
    out: dict[str, Any] = {"tile_size_um": 112.0, "tile_px": 224, "encoder": None, "input_px": None}
    if image_key is None:
        return out
    if str(image_key).startswith(KEYS.FEATURES_PREFIX):
        out["encoder"] = str(image_key)[len(KEYS.FEATURES_PREFIX) :]
    feats = adata.uns.get(image_key, {}) if adata is not None else {}
    if isinstance(feats, dict):
        out["encoder"] = feats.get("encoder", out["encoder"])
        out["input_px"] = feats.get("input_px")
        tiles = adata.uns.get(feats.get("tiles_key", KEYS.TILES), {})
    else:
        tiles = {}
    if isinstance(tiles, dict) and "tile_size_um" in tiles:
        out["tile_size_um"] = float(tiles["tile_size_um"])
        out["tile_px"] = int(tiles["tile_px"])
    return out


def _format_prediction(model, adata, indices, cols, pred, sd, return_numpy):
    if not return_numpy:
        obs_names = adata.obs_names[np.arange(adata.n_obs) if indices is None else np.asarray(indices)]
        genes = model.gene_names[cols]
        pred = pd.DataFrame(pred, index=obs_names, columns=genes)
        if sd is not None:
            sd = pd.DataFrame(sd, index=obs_names, columns=genes)
    return pred if sd is None else (pred, sd)


def _has_counts(adata: AnnData, layer: str | None) -> bool:
    mat = adata.X if layer is None else adata.layers.get(layer) if layer in adata.layers else None
    if mat is None:
        return False
    return bool(mat.nnz > 0) if sp.issparse(mat) else bool(np.any(np.asarray(mat)))


def _torch_device(accelerator: str, device: int | str) -> torch.device:
    if accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{device}" if isinstance(device, int) else "cuda")


def load_model(
    cls: type,
    dir_path: str | os.PathLike,
    adata: AnnData | None,
    *,
    accelerator: str = "auto",
    device: int | str = "auto",
    prefix: str | None = None,
    **kwargs: Any,
) -> Any:
    """Load a saved imagene model; ``adata`` is registered only when it matches the model (see ``Model.load``)."""
    from scvi.model.base import BaseModelClass

    path = os.path.join(str(dir_path), f"{prefix or ''}model.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No saved model at {path!r}. Save one with `model.save(dir_path)`.")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    var_names = pd.Index(np.asarray(saved.get("var_names", [])).astype(str))
    attr = dict(saved["attr_dict"])
    registry = attr["registry_"]
    layer = registry.get("setup_args", {}).get("layer")
    if adata is not None:
        check_adata(adata)
        if adata.var_names.equals(var_names) and _has_counts(adata, layer):
            return BaseModelClass.load.__func__(
                cls, str(dir_path), adata=adata, accelerator=accelerator, device=device, prefix=prefix, **kwargs
            )
        reason = (
            f"its genes differ from the model's {len(var_names)}" if not adata.var_names.equals(var_names)
            else f"it has no counts in {'X' if layer is None else f'layers[{layer!r}]'}"
        )
        logger.info(
            "Loading %s without training data: the AnnData passed is not registered (%s). Pass it as the query of "
            "predict_expression / get_latent_representation; predictions cover the model's %d genes.",
            cls.__name__, reason, len(var_names),
        )
    if "module_args_" not in attr:
        raise ValueError(
            f"The model in {str(dir_path)!r} was saved by an older imagene that did not store its module settings; "
            "load it with its training AnnData (`load(dir_path, adata=training_adata)`) and save it again."
        )
    attr.pop("registry_")
    init_params = attr.pop("init_params_")
    model = cls.__new__(cls)
    BaseModelClass.__init__(model, None, registry=registry)
    margs = attr["module_args_"]
    model.module = cls._module_cls(*margs["args"], **margs["kwargs"])
    flat = dict(init_params.get("non_kwargs", {}))
    for group in init_params.get("kwargs", {}).values():
        flat.update(group)
    model._model_summary_string = f"{cls.__name__} (loaded from {str(dir_path)!r} without training data)"
    if hasattr(model, "_init_without_data"):
        model._init_without_data(flat)
    for name, value in attr.items():
        setattr(model, name, value)
    model.init_params_ = init_params
    state = dict(saved["model_state_dict"])
    state.pop("pyro_param_store", None)  # scvi-tools stores it for every model; no imagene module uses Pyro
    model.module.load_state_dict(state)
    model.module.to(_torch_device(accelerator, device))
    model.module.eval()
    return model


@torch.no_grad()
def mc_dropout_sd(module: torch.nn.Module, forward: Any, n_samples: int = 16, seed: int = 0) -> np.ndarray:
    """Spread of ``forward()`` over ``n_samples`` passes with the dropout layers of ``module`` active.

    A small Monte-Carlo-dropout ensemble (Gal & Ghahramani, 2016): only ``Dropout`` and
    ``MultiheadAttention`` layers switch to training mode (normalisation layers keep their
    statistics); the module is back in evaluation mode afterwards.
    """
    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.MultiheadAttention))]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in layers:
            m.train()
        draws = np.stack([np.asarray(forward(), dtype=np.float32) for _ in range(n_samples)])
    finally:
        for m in layers:
            m.eval()
        torch.random.set_rng_state(state)
    return draws.std(0).astype(np.float32)


def compact_counts(counts: Any) -> dict[str, Any]:
    """Integer counts as a small CSR record: uint16 values and column indices when they fit (lossless)."""
    x = sp.csr_matrix(counts, dtype=np.float32)
    x.sum_duplicates()
    data = x.data
    small = data.size == 0 or (np.all(data == np.round(data)) and data.min() >= 0 and data.max() < 2**16)
    return {
        "data": data.astype(np.uint16) if small else data,
        "indices": x.indices.astype(np.uint16 if x.shape[1] < 2**16 else np.int32),
        "indptr": x.indptr.astype(np.int64),
        "shape": tuple(int(v) for v in x.shape),
    }


def expand_counts(stored: dict[str, Any]) -> sp.csr_matrix:
    """The CSR float32 counts of :func:`compact_counts`."""
    return sp.csr_matrix(
        (stored["data"].astype(np.float32), stored["indices"].astype(np.int32), stored["indptr"]), shape=stored["shape"]
    )


def log_normalize_sparse(counts: sp.spmatrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """:func:`imagene._utils.log_normalize` on sparse counts, kept sparse (same float32 values)."""
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    lib = np.asarray(x.sum(1), dtype=np.float32).ravel()
    lib[lib == 0] = 1.0
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    x.data = np.log1p(x.data / lib[rows] * np.float32(target_sum)).astype(np.float32)
    return x
