"""Single source of truth for registry keys (scvi-tools) and AnnData key names."""

from __future__ import annotations

from typing import NamedTuple


class _REGISTRY_KEYS_NT(NamedTuple):
    X_KEY: str = "X"  # same value as scvi.REGISTRY_KEYS.X_KEY
    BATCH_KEY: str = "batch"  # same value as scvi.REGISTRY_KEYS.BATCH_KEY
    IMAGE_KEY: str = "image"  # obsm features or tiles
    NICHE_X_KEY: str = "niche_x"  # layers: niche mean counts (STAlign)
    SPOT_TILES_KEY: str = "spot_tiles"  # obsm: small uint8 spot tiles (STAlign)
    NICHE_IMAGE_KEY: str = "niche_image"  # obsm: frozen features of the niche tiles (STAlign)


REGISTRY_KEYS = _REGISTRY_KEYS_NT()


class _Keys(NamedTuple):
    """AnnData keys written by imagene (every writer takes ``key_added`` to change them)."""

    COUNTS: str = "counts"  # layers: raw integer counts (readers)
    SPATIAL: str = "spatial"  # obsm: spot centres in full-resolution pixels (readers)
    SECTION: str = "section"  # obs: section / library id (io.concat)
    TILES: str = "imagene_tiles"  # obsm: uint8 tiles (n, px, px, 3); uns: provenance
    FEATURES_PREFIX: str = "X_he_"  # obsm: frozen tile features X_he_<encoder>
    LATENT_PREFIX: str = "X_imagene_"  # obsm: model latents X_imagene_<modality>
    NICHE: str = "imagene_niche"  # obsp: <key>_connectivities / _distances, uns: <key>_neighbors, layers: <key>_mean
    PREDICTED: str = "imagene_predicted"  # layers: predicted expression
    PREDICTED_SD: str = "imagene_predicted_sd"  # layers: spread of the prediction (tl.predict_expression)
    REFERENCE_SIMILARITY: str = "imagene_reference_similarity"  # obs: best image-to-reference similarity
    OOD: str = "imagene_ood"  # obs: spot unlike every training spot (tl.predict_expression)
    IN_TISSUE: str = "imagene_in_tissue"  # obs: virtual spot over tissue (pp.spot_grid)
    TISSUE_FRACTION: str = "imagene_tissue_fraction"  # obs: share of the spot's disc on tissue (pp.spot_grid)
    SPLIT: str = "imagene_split"  # obs: train / validation / test
    NUCLEI: str = "imagene_nuclei"  # obsm: (n, px, px) nuclei density maps from H&E deconvolution (pp.nuclei_maps)
    TILE_GRAPHS: str = "imagene_tile_graphs"  # obs: <key>_tile, obsm: <key>_blocks, obsp: <key>_connectivities / _distances, uns: tile table (pp.tile_graphs)
    SPOT_TILES: str = "imagene_spot_tiles"  # obsm: small uint8 spot tiles, uns: provenance (STAlign.setup_anndata)
    NICHE_FEATURES_PREFIX: str = "X_he_niche_"  # obsm: frozen niche-tile features X_he_niche_<encoder>, uns: provenance (STAlign)
    TILE_CROPS: str = "imagene_tile_crops"  # uns: multi-crop patch features per block grid (pp.embed_tile_crops)


KEYS = _Keys()

#: centre-to-centre spot pitch of each platform, in microns (used to infer microns per pixel)
SPOT_PITCH_UM = {"legacy_st": 200.0, "visium": 100.0}
#: spot diameter of each platform, in microns
SPOT_DIAMETER_UM = {"legacy_st": 100.0, "visium": 55.0}
