"""The expression probe of a model: an MLP from frozen image latents to every gene, and its prediction."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from imagene._utils import log_normalize
from imagene.model._base import mc_dropout_sd

logger = logging.getLogger("imagene")


class ExpressionProbeMixin:
    """Train and use ``module.probe`` (mixed in after :class:`~imagene.model.AlignmentMixin`).

    The host model's ``_embed(adata, "probe", indices, batch_size)`` gives the probe's input rows
    and its module a ``predict_probe(rows, batch_size)`` (e.g. :class:`imagene.module.STAlignModule`);
    ``method='probe'`` of :func:`imagene.tl.predict_expression` reaches :meth:`_predict_full`.
    """

    probe_trained_: bool = False

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

    def _predict_probe(
        self, adata: AnnData, indices: Sequence[int] | None, cols: np.ndarray, batch_size: int, *, with_sd: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """MLP-probe prediction and, with ``with_sd``, its Monte-Carlo-dropout spread (16 passes)."""
        self._check_trained()
        if not self.probe_trained_:
            raise RuntimeError("The expression probe is not trained; call `model.train(probe_epochs=30)`.")
        x = torch.as_tensor(self._embed(adata, "probe", indices, batch_size))

        def forward() -> np.ndarray:
            return self.module.predict_probe(x, batch_size).numpy()[:, cols] if len(x) else np.zeros((0, len(cols)), np.float32)

        self.module.eval()
        pred = forward()
        sd = mc_dropout_sd(self.module.probe, forward) if with_sd else None
        return pred, sd

    def _predict_full(self, adata: AnnData, genes: Sequence[str], **kwargs: Any) -> dict[str, np.ndarray | None]:
        if kwargs.get("method") != "probe":
            return super()._predict_full(adata, genes, **kwargs)
        cols = self._gene_columns(genes)
        pred, sd = self._predict_probe(adata, None, cols, int(kwargs.get("batch_size", 512)), with_sd=True)
        return {"pred": pred, "sd": sd, "similarity": None}
