"""A TrainingPlan that logs contrastive metrics instead of ELBO terms."""

from __future__ import annotations

import torch
from scvi.train import TrainingPlan

from imagene.metrics import recall_at_k
from imagene.train._task import check_lr_schedule, warmup_cosine


class ContrastiveTrainingPlan(TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` for contrastive modules.

    The base plan logs ELBO, reconstruction and KL terms, which are constant zeros for a
    contrastive loss (and would make an ELBO-monitored early stop do nothing). This plan logs
    ``train_loss`` / ``validation_loss``, the module's extra metrics (``top1_train``,
    ``temperature_train``, ...) and, over the WHOLE validation set at each epoch end,
    ``recall5_validation``: the fraction of validation spots whose own gene embedding is among
    the top 5 % most similar to their image embedding (a retrieval metric independent of the
    batch size, unlike the InfoNCE loss); under DDP the embeddings of every rank are gathered first,
    so the metric is computed once over the whole validation set. Modules name their paired embeddings in
    ``_pair_keys`` (default ``("z_image", "z_gene")``).

    Parameters
    ----------
    *args, **kwargs
        Those of :class:`scvi.train.TrainingPlan`.
    lr_schedule
        ``None`` (scvi-tools' schedule: constant, or ``reduce_lr_on_plateau=True``) or
        ``'warmup_cosine'`` (per-step linear warm-up then cosine decay, :func:`imagene.train.warmup_cosine`;
        an explicit ``reduce_lr_on_plateau=True`` wins).
    warmup_fraction, min_lr_ratio
        Settings of ``'warmup_cosine'``.
    """

    def __init__(
        self,
        *args,
        lr_schedule: str | None = None,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lr_schedule = check_lr_schedule(lr_schedule)
        self.warmup_fraction, self.min_lr_ratio = float(warmup_fraction), float(min_lr_ratio)
        self._val_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure_optimizers(self):
        config = super().configure_optimizers()
        if self.lr_schedule is None or "lr_scheduler" in config:
            return config
        sched = warmup_cosine(config["optimizer"], self.trainer.estimated_stepping_batches,
                              warmup_fraction=self.warmup_fraction, min_lr_ratio=self.min_lr_ratio)
        config["lr_scheduler"] = {"scheduler": sched, "interval": "step"}
        return config

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

    def validation_step(self, batch, batch_idx):
        inference_outputs, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self.log(
            "validation_loss",
            loss_output.loss,
            on_step=self.on_step,
            on_epoch=self.on_epoch,
            batch_size=loss_output.n_obs_minibatch,
            sync_dist=self.use_sync_dist,
        )
        self.compute_and_log_metrics(loss_output, self.val_metrics, "validation")
        ka, kb = getattr(self.module, "_pair_keys", ("z_image", "z_gene"))
        if ka in inference_outputs and kb in inference_outputs:
            self._val_pairs.append((inference_outputs[ka].detach(), inference_outputs[kb].detach()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_pairs:
            return
        za = torch.cat([a for a, _ in self._val_pairs])
        zb = torch.cat([b for _, b in self._val_pairs])
        self._val_pairs = []
        if self.trainer.world_size > 1:  # one metric over the validation spots of every rank, not a mean of shards
            za, zb = gather_rows(self, za), gather_rows(self, zb)
        za, zb = za.float().cpu().numpy(), zb.float().cpu().numpy()
        recall = 0.5 * (recall_at_k(za, zb, k_percent=5) + recall_at_k(zb, za, k_percent=5))
        # every rank holds the same value: no reduction needed
        self.log("recall5_validation", recall, rank_zero_only=False)


def gather_rows(module, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order (ranks may hold different numbers of rows)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = module.all_gather(n).reshape(-1)
    m = int(sizes.max())
    pad = torch.zeros((m - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    gathered = module.all_gather(torch.cat([x, pad]))  # (world, m, ...)
    return torch.cat([gathered[r, : int(sizes[r])] for r in range(gathered.shape[0])])

