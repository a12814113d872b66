"""Preprocessing: tiles, frozen image features, niche graphs, section splits."""

from imagene.pp._features import embed_tiles
from imagene.pp._niches import niches
from imagene.pp._split import section_split
from imagene.pp._tiles import extract_tiles

__all__ = ["embed_tiles", "extract_tiles", "niches", "section_split"]
