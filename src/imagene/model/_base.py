"""What every imagene model shares: data alignment, latents by modality, query-reference prediction."""

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
from imagene.model._head import ExpressionHeadMixin
from imagene.model._reference import ReferenceBankMixin
from imagene.model._saving import load_model

logger = logging.getLogger("imagene")

Modality = Literal["image", "gene", "joint"]


class AlignmentMixin(ExpressionHeadMixin, ReferenceBankMixin):
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
        from imagene.train._callbacks import recover_best_epoch

        # ddp_spawn: the workers restored the best weights; their epoch comes back in callback_metrics
        recover_best_epoch(getattr(self, "trainer", None), trainer_kwargs.get("callbacks"), self.module)
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
