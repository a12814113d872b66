"""Reusable torch building blocks: the image encoder registry, gene encoders, heads and losses.

Nothing here imports anndata.
"""

from imagene.nn._alignst_blocks import (
    GeneSemanticGraph,
    GenomicPrompter,
    NucleiCNN,
    NucleiFusion,
    SAGERefiner,
    mse_pcc_loss,
)
from imagene.nn._context import ContextTower
from imagene.nn._fusion import ABFN, ConcatFusion, NicheGeneTransformer
from imagene.nn._gene_transformer import (
    SPECIAL_TOKENS,
    GeneVocabulary,
    RankTokenizer,
    RankTransformerGeneEncoder,
    get_gene_encoder,
    list_gene_encoders,
    load_gene_encoder,
    mask_tokens,
    nonzero_gene_means,
    read_gene_encoder_file,
    register_gene_encoder,
    save_gene_encoder,
)
from imagene.nn._graph import GumbelEdgeSampler, MultiScaleGraphEncoder, gumbel_sigmoid
from imagene.nn._image import ImageEncoder
from imagene.nn._losses import LogitScale, info_nce
from imagene.nn._mlp import MLP, GeneMLPEncoder
from imagene.nn._registry import get_image_encoder, list_image_encoders, register_image_encoder
from imagene.nn._towers import AdaptedEncoder, ImageTower, adapter
from imagene.nn._text import TextEncoder, get_text_encoder, minilm_path

__all__ = [
    "AdaptedEncoder",
    "ImageTower",
    "adapter",
    "ContextTower",
    "ABFN",
    "ConcatFusion",
    "NicheGeneTransformer",
    "MLP",
    "GeneMLPEncoder",
    "GumbelEdgeSampler",
    "GeneVocabulary",
    "RankTokenizer",
    "RankTransformerGeneEncoder",
    "get_gene_encoder",
    "list_gene_encoders",
    "load_gene_encoder",
    "mask_tokens",
    "nonzero_gene_means",
    "read_gene_encoder_file",
    "save_gene_encoder",
    "SPECIAL_TOKENS",
    "register_gene_encoder",
    "ImageEncoder",
    "LogitScale",
    "MultiScaleGraphEncoder",
    "get_image_encoder",
    "gumbel_sigmoid",
    "info_nce",
    "list_image_encoders",
    "register_image_encoder",
    "GeneSemanticGraph",
    "GenomicPrompter",
    "NucleiCNN",
    "NucleiFusion",
    "SAGERefiner",
    "mse_pcc_loss",
    "TextEncoder",
    "get_text_encoder",
    "minilm_path",
]
