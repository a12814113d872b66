"""Preprocessing: tiles, frozen image features, niche, patch and tile graphs, spot / niche inputs, section splits."""

from imagene.pp._context import CONTEXT_SUFFIX, context_features, context_matrix, neighbor_features, scale_key
from imagene.pp._features import embed_tiles
from imagene.pp._grid import spot_grid, tissue_mask
from imagene.pp._library import resolve_libraries
from imagene.pp._niches import niche_mean_operator, niches
from imagene.pp._normalize import log_normalize
from imagene.pp._nuclei import nuclei_maps, nuclei_mask
from imagene.pp._patch_graph import patch_graph
from imagene.pp._split import section_split
from imagene.pp._spot_niche import SectionCache, spot_niche_inputs
from imagene.pp._tile_graphs import embed_tile_crops, prepare_tile_graphs, tile_graphs
from imagene.pp._tiles import extract_tiles

__all__ = [
    "CONTEXT_SUFFIX",
    "context_features",
    "context_matrix",
    "embed_tile_crops",
    "embed_tiles",
    "extract_tiles",
    "log_normalize",
    "neighbor_features",
    "niche_mean_operator",
    "niches",
    "nuclei_maps",
    "nuclei_mask",
    "patch_graph",
    "prepare_tile_graphs",
    "resolve_libraries",
    "scale_key",
    "section_split",
    "SectionCache",
    "spot_niche_inputs",
    "spot_grid",
    "tile_graphs",
    "tissue_mask",
]
