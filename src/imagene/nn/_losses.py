"""Contrastive losses shared by every model."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    z_a: torch.Tensor, z_b: torch.Tensor, logit_scale: torch.Tensor | float, *, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE (CLIP) loss between paired, L2-normalised embeddings.

    Parameters
    ----------
    z_a, z_b
        (B, d) L2-normalised embeddings; row ``i`` of ``z_a`` is the positive of row ``i`` of ``z_b``,
        every other row of the batch is a negative.
    logit_scale
        Inverse temperature (``exp`` of the learnable log-scale).
    reduction
        ``'mean'`` or ``'none'`` (per-pair loss).

    Returns
    -------
    The loss and the top-1 retrieval accuracy of the batch (both directions averaged).
    """
    logits = logit_scale * z_a @ z_b.T
    target = torch.arange(logits.shape[0], device=logits.device)
    per_pair = 0.5 * (
        F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
    )
    with torch.no_grad():
        acc = 0.5 * ((logits.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean())
    loss = per_pair.mean() if reduction == "mean" else per_pair
    return loss, acc


class LogitScale(torch.nn.Module):
    """Learnable inverse temperature, stored in log space and clamped as in CLIP."""

    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(1.0 / temperature).log(), requires_grad=learnable)
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)
