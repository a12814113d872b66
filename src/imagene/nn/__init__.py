"""Reusable torch building blocks: the image encoder registry, gene encoders, heads and losses.

Nothing here imports anndata.
"""

from imagene.nn._image import ImageEncoder
from imagene.nn._losses import LogitScale, info_nce
from imagene.nn._mlp import MLP, GeneMLPEncoder
from imagene.nn._registry import get_image_encoder, list_image_encoders, register_image_encoder

__all__ = [
    "MLP",
    "GeneMLPEncoder",
    "ImageEncoder",
    "LogitScale",
    "get_image_encoder",
    "info_nce",
    "list_image_encoders",
    "register_image_encoder",
]
