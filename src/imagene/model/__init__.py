"""User-facing models (scvi-tools style: setup_anndata, train, get_latent_representation, save/load)."""

from imagene.model._base import AlignmentMixin
from imagene.model._umpire import UMPIRE

__all__ = ["UMPIRE", "AlignmentMixin"]
