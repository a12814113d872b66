"""The spot-level two-tower model every simple alignment model is built on (UMPIRE is one)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from imagene._constants import REGISTRY_KEYS
from imagene._validate import renamed_kwarg
from imagene.model._base import AlignmentMixin
from imagene.train import ContrastiveTrainingPlan


def register_fields(cls, adata: AnnData, setup_method_args: dict, *, layer: str | None, image_key: str | None,
                    library_key: str | None, extra: Sequence = (), after: Sequence = (), **kwargs: Any) -> None:
    """Register what every alignment model reads on ``cls``: the counts ``layer``, ``obsm[image_key]``
    (when given), ``extra`` fields, the section column ``library_key``, then ``after``."""
    fields = [LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True)]
    if image_key is not None:
        fields.append(ObsmField(REGISTRY_KEYS.IMAGE_KEY, image_key))
    fields += [*extra, CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, library_key), *after]
    manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
    manager.register_fields(adata, **kwargs)
    cls.register_manager(manager)


class SpotAlignmentModel(AlignmentMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """An image tower and a gene tower aligned spot by spot: registration, training and inference, shared.

    A subclass sets ``_module_cls`` (a scvi-tools module with ``encode_image``, ``encode_gene``,
    ``logit_scale`` and a contrastive ``loss``, built from :mod:`imagene.nn`) and builds it in
    ``__init__`` with ``self._make_module(...)``; :meth:`setup_anndata`, :meth:`train` (with
    :class:`imagene.train.ContrastiveTrainingPlan`, early stopping on held-out sections, the
    reference bank), latents, prediction, saving and loading come from here and from
    :class:`AlignmentMixin`. See ``docs/architecture.md`` for a complete example.
    """

    _training_plan_cls = ContrastiveTrainingPlan

    def _train_monitor(self) -> tuple[str, str]:
        """``(metric, mode)`` early stopping and best-weight restoring watch."""
        return ("recall5_validation", "max")

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = "counts",
        *,
        image_key: str = "X_he_efficientnet_lite0",
        library_key: str | None = None,
        batch_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register where the model finds its inputs (no data is copied or changed).

        As for every scvi-tools model, registration adds ``uns['_scvi_uuid']``,
        ``uns['_scvi_manager_uuid']`` and the categorical codes ``obs['_scvi_batch']``; nothing else.

        Parameters
        ----------
        adata
            AnnData (not a view) with raw counts and image features.
        layer
            Layer with raw integer counts (``None`` for ``X``).
        image_key
            ``obsm`` key of frozen tile features (``imagene.pp.embed_tiles``) or of uint8 tiles.
        library_key
            ``obs`` column of sections; when given, ``train`` validates on held-out sections (it is
            registered as scvi-tools' batch field, but the model does not use it as a covariate).
        batch_key
            Old name of ``library_key`` (deprecated).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        library_key = renamed_kwarg("library_key", library_key, "batch_key", batch_key, where=f"{cls.__name__}.setup_anndata")
        batch_key = None
        setup_method_args = cls._get_setup_method_args(**locals())
        cls._check_setup(adata, layer, image_key, library_key)
        register_fields(cls, adata, setup_method_args, layer=layer, image_key=image_key, library_key=library_key,
                        **kwargs)

    def train(
        self,
        max_epochs: int = 100,
        *,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        batch_size: int = 128,
        validation_sections: Sequence[str] | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        restore_best_weights: bool = True,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        """Train the towers, then store the reference bank used by :meth:`predict_expression`.

        With a ``library_key`` of several sections, whole sections are held out for validation
        (``validation_sections``, default: the last section) and early stopping watches
        ``recall5_validation`` (UMPIRE-REC: ``validation_loss``)
        (image→gene and gene→image retrieval over the whole validation
        set; the InfoNCE loss rises with over-confidence long before retrieval stops improving);
        with one section, 10 % of spots are held out at random (fine for early stopping, not for
        evaluation).

        UMPIRE's defaults (dropout 0.5, weight decay 0.05, lr 3e-4, 256 hidden, 64 latent) were chosen
        on her2st with section C3 held out (never on the demo's test section C4): spot-level data
        sets are small, and both towers overfit within a few epochs without strong regularisation.

        Parameters
        ----------
        max_epochs
            Maximum passes over the training spots.
        lr, weight_decay
            AdamW settings.
        batch_size
            Spots per step (the InfoNCE negatives); the last incomplete batch is dropped.
        validation_sections
            Sections held out for validation.
        early_stopping
            Stop when ``recall5_validation`` has not improved for ``early_stopping_patience`` epochs.
        early_stopping_patience
            Epochs without improvement before stopping.
        restore_best_weights
            End with the weights of the epoch of best ``recall5_validation``
            (:class:`imagene.train.RestoreBestWeights`).
        accelerator, devices
            Lightning device settings (``'auto'`` uses a GPU when present).
        plan_kwargs
            Passed to :class:`imagene.train.ContrastiveTrainingPlan`.
        datasplitter_kwargs
            Passed to :class:`scvi.dataloaders.DataSplitter`.
        checkpoint_dir, resume
            Write ``last.ckpt`` there after every epoch, and continue from it after an interruption
            (:func:`imagene.train.checkpoint_settings`).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (Lightning options such as ``strategy="ddp"``,
            ``num_nodes``, ``logger``, ``default_root_dir``).
        """
        plan_kwargs = {"optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay, **(plan_kwargs or {})}
        monitor = self._train_monitor()
        self._train_spots(
            max_epochs, plan_kwargs=plan_kwargs, batch_size=batch_size, validation_sections=validation_sections,
            early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
            restore_best_weights=restore_best_weights, accelerator=accelerator, devices=devices,
            datasplitter_kwargs=datasplitter_kwargs, monitor=monitor, checkpoint_dir=checkpoint_dir,
            resume=resume, **trainer_kwargs,
        )
        self._build_reference()
