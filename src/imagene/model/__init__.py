"""User-facing models (scvi-tools style: setup_anndata, train, get_latent_representation, save/load)."""

from imagene.model._alignst import AlignST
from imagene.model._base import AlignmentMixin
from imagene.model._head import RidgeHead, select_ridge_head
from imagene.model._pretrain import GeneEncoderPretrainer
from imagene.model._sigmma import SIGMMA
from imagene.model._spot import SpotAlignmentModel
from imagene.model._stalign import STAlign
from imagene.model._umpire import UMPIRE

__all__ = [
    "AlignST", "SIGMMA", "STAlign", "UMPIRE", "AlignmentMixin", "GeneEncoderPretrainer", "RidgeHead",
    "SpotAlignmentModel", "select_ridge_head",
]

from imagene._settings import settings as _settings

_settings._apply_third_party()  # quiet Lightning / scvi-tools, which set their loggers when imported
