"""A TrainingPlan that logs contrastive metrics instead of ELBO terms."""

from __future__ import annotations

import torch
from scvi.train import TrainingPlan


class ContrastiveTrainingPlan(TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` for contrastive modules.

    The base plan logs ELBO, reconstruction and KL terms, which are constant zeros for a
    contrastive loss (and would make an ELBO-monitored early stop do nothing). This plan logs
    ``train_loss`` / ``validation_loss`` (from the base class) and the module's extra metrics
    (``top1_train``, ``top1_validation``, ``temperature_train``, ...), nothing else.
    """

    def compute_and_log_metrics(self, loss_output, metrics, mode: str) -> None:  # noqa: ARG002
        n = loss_output.n_obs_minibatch
        for key, met in (loss_output.extra_metrics or {}).items():
            if isinstance(met, torch.Tensor) and met.dim() == 0:
                self.log(
                    f"{key}_{mode}",
                    met.detach(),
                    on_step=self.on_step,
                    on_epoch=self.on_epoch,
                    batch_size=n,
                    sync_dist=self.use_sync_dist,
                )
