"""Benchmark data: legacy-ST sections in the her2st folder layout, with cached frozen tile features."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData

from imagene._constants import KEYS
from imagene.datasets._her2st import her2st_files, join_sections, read_section

logger = logging.getLogger("imagene")

def _cache_path(cache: Path, section: str, encoder: str, tile_px: int, tile_size_um: float) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{section}__{encoder}__{tile_px}px__{tile_size_um:g}um")
    return cache / f"{safe}.npz"


def _embed_section(
    adata: AnnData,
    section: str,
    image: Path | None,
    *,
    encoder: str,
    tile_px: int,
    tile_size_um: float,
    cache: Path | None,
    show_progress_bar: bool,
) -> None:
    """Write ``obsm['X_he_<encoder>']`` for one section, from the cache when it matches."""
    import imagene as ig

    key = f"{KEYS.FEATURES_PREFIX}{encoder}"
    meta = {
        "section": section,
        "encoder": encoder,
        "tile_px": int(tile_px),
        "tile_size_um": float(tile_size_um),
        "image": image.name if image is not None else "",
        "image_bytes": image.stat().st_size if image is not None else 0,
        "imagene_version": ig.__version__,
    }
    path = _cache_path(cache, section, encoder, tile_px, tile_size_um) if cache is not None else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            same = json.loads(str(z["meta"])) == meta and list(z["obs_names"]) == list(adata.obs_names)
            if same:
                adata.obsm[key] = z["features"].astype(np.float32)
                logger.info("Section %r: tile features read from the cache %s", section, path)
                return
        logger.info("Section %r: cache %s is stale (other spots, image or settings); re-embedding", section, path)
    ig.pp.extract_tiles(adata, tile_size_um=tile_size_um, tile_px=tile_px, show_progress_bar=show_progress_bar)
    ig.pp.embed_tiles(adata, encoder=encoder, show_progress_bar=show_progress_bar)
    del adata.obsm[KEYS.TILES]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, features=adata.obsm[key], obs_names=np.asarray(adata.obs_names, dtype=str),
                 meta=np.asarray(json.dumps(meta)))


def read_sections(
    data_dir: str | os.PathLike | None,
    sections: Sequence[str],
    *,
    encoder: str = "efficientnet_lite0",
    tile_px: int = 224,
    tile_size_um: float = 112.0,
    image_scale: Mapping[str, float] | None = None,
    cache: str | os.PathLike | None = None,
    show_progress_bar: bool = False,
) -> AnnData:
    """Read legacy-ST sections in the her2st folder layout and embed their tiles (cached per section).

    Each section ``S`` is a folder ``<data_dir>/S/`` holding ``S.tsv.gz`` (counts; spots ``"{x}x{y}"``
    × genes), ``S_selection.tsv`` (spot table in full-resolution pixels) and one H&E image; an
    optional ``S_labeled_coordinates.tsv`` (her2st pathologist labels; columns ``x``, ``y``,
    ``label``) is joined by rounding ``x``, ``y`` to the spot key. Tiles of ``tile_size_um`` µm are
    cut with :func:`imagene.pp.extract_tiles` and embedded with :func:`imagene.pp.embed_tiles`;
    with ``cache``, the features of each section are stored there and reused when the spots, the
    image file and the settings are unchanged.

    Parameters
    ----------
    data_dir
        Folder of section folders (see :func:`imagene.datasets.her2st`); ``None`` to download the her2st
        sections named in ``sections`` from the authors' repository (or read ``$IMAGENE_DATA_DIR/her2st``).
    sections
        Sections to read.
    encoder
        Image encoder (registry name).
    tile_px
        Tile size in pixels.
    tile_size_um
        Tile side in microns.
    image_scale
        Pixels of a section's image file per full-resolution pixel, by section (default 1, or the
        known scale of a her2st downscaled image such as ``A1_HE_image_dark.png``: 2000 / 6954).
    cache
        Folder of cached features (``None``: no cache).
    show_progress_bar
        Progress bars while tiling and embedding.

    Returns
    -------
    AnnData joined by :func:`imagene.io.concat` (genes measured in every section) with raw counts,
    ``obsm['X_he_<encoder>']``, ``obs['section']``, ``obs['patient']`` (the letters of a her2st-style
    id such as ``'C'`` for ``'C2'``, else the section id) and, when any section has labels,
    ``obs['label']`` (NaN where a spot has none).

    Examples
    --------
    >>> adata = imagene.bench.read_sections("../shared/data/her2st", ["B4", "C2", "C3", "C4"], cache="bench_cache")
    """
    sections = [sections] if isinstance(sections, str) else list(sections)
    if not sections:
        raise ValueError("`sections` is empty; name the sections to read (folder names under data_dir).")
    if len(set(sections)) != len(sections):
        raise ValueError(f"`sections` has duplicates: {sections}.")
    scales = dict(image_scale or {})
    unknown = set(scales) - set(sections)
    if unknown:
        raise ValueError(f"image_scale names sections {sorted(unknown)} that are not read ({sections}).")
    cache_dir = Path(cache) if cache is not None else None
    files = her2st_files(sections, path=data_dir, show_progress_bar=show_progress_bar)
    adatas: dict[str, AnnData] = {}
    for s in sections:
        a = read_section(files[s], s, image_scale=scales.get(s))
        _embed_section(
            a, s, Path(files[s]["image"]), encoder=encoder, tile_px=tile_px, tile_size_um=tile_size_um,
            cache=cache_dir, show_progress_bar=show_progress_bar,
        )
        adatas[s] = a
    return join_sections(adatas)
