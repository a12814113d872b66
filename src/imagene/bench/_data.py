"""Benchmark data: legacy-ST sections in the her2st folder layout, with cached frozen tile features."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene import pp
from imagene._constants import KEYS
from imagene._version import __version__
from imagene.datasets._her2st import her2st_files, join_sections, read_section

logger = logging.getLogger("imagene")

def _cache_path(cache: Path, section: str, encoder: str, tile_px: int, tile_size_um: float) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{section}__{encoder}__{tile_px}px__{tile_size_um:g}um")
    return cache / f"{safe}.npz"


def _read_cache(path: Path | None, meta: dict, obs_names: pd.Index) -> dict[str, np.ndarray] | None:
    """The arrays cached at ``path`` when they were written for the same settings and spots, else ``None``."""
    if path is None or not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        if json.loads(str(z["meta"])) == meta and list(z["obs_names"]) == list(obs_names):
            return {k: z[k] for k in z.files if k not in ("meta", "obs_names")}
    logger.info("Cache %s is stale (other spots, image or settings); recomputing", path)
    return None


def _write_cache(path: Path | None, meta: dict, obs_names: pd.Index, arrays: dict[str, np.ndarray]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, obs_names=np.asarray(obs_names, dtype=str), meta=np.asarray(json.dumps(meta)), **arrays)


def _section_meta(section: str, image: Path | None, **settings) -> dict:
    return {
        "section": section,
        **settings,
        "image": image.name if image is not None else "",
        "image_bytes": image.stat().st_size if image is not None else 0,
        "imagene_version": __version__,
    }


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
    key = f"{KEYS.FEATURES_PREFIX}{encoder}"
    meta = _section_meta(section, image, encoder=encoder, tile_px=int(tile_px), tile_size_um=float(tile_size_um))
    path = _cache_path(cache, section, encoder, tile_px, tile_size_um) if cache is not None else None
    cached = _read_cache(path, meta, adata.obs_names)
    if cached is not None:
        adata.obsm[key] = cached["features"].astype(np.float32)
        logger.info("Section %r: tile features read from the cache %s", section, path)
        return
    pp.extract_tiles(adata, tile_size_um=tile_size_um, tile_px=tile_px, show_progress_bar=show_progress_bar)
    pp.embed_tiles(adata, encoder=encoder, show_progress_bar=show_progress_bar)
    del adata.obsm[KEYS.TILES]
    _write_cache(path, meta, adata.obs_names, {"features": adata.obsm[key]})


def _context_section(
    adata: AnnData,
    section: str,
    image: Path | None,
    *,
    encoder: str,
    tile_px: int,
    sizes_um: Sequence[float],
    tta: str | None,
    cache: Path | None,
    show_progress_bar: bool,
) -> list[str]:
    """Write the multi-scale features of :func:`imagene.pp.context_features` for one section (cached)."""
    prefix = f"{KEYS.FEATURES_PREFIX}{encoder}"
    keys = [pp.scale_key(prefix, s) for s in sizes_um]
    meta = _section_meta(section, image, encoder=encoder, tile_px=int(tile_px),
                         tile_sizes_um=[float(s) for s in sizes_um], tta=tta or "none")
    path = None
    if cache is not None:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{section}__{encoder}__{tile_px}px__context__{tta or 'none'}")
        path = cache / f"{safe}.npz"
    cached = _read_cache(path, meta, adata.obs_names)
    if cached is not None:
        for i, k in enumerate(keys):
            adata.obsm[k] = cached[f"scale{i}"].astype(np.float32)
        logger.info("Section %r: context features read from the cache %s", section, path)
        return keys
    pp.context_features(adata, tile_sizes_um=sizes_um, tile_px=tile_px, encoder=encoder, tta=tta,
                           show_progress_bar=show_progress_bar)
    _write_cache(path, meta, adata.obs_names, {f"scale{i}": adata.obsm[k] for i, k in enumerate(keys)})
    return keys


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
    context: bool = False,
    context_sizes_um: Sequence[float] | None = None,
    context_tta: str | None = "flips",
    n_neighs: int = 6,
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
    context
        Also build the context features of :class:`imagene.bench.ContextRidge`: tiles of every size
        in ``context_sizes_um`` embedded with ``context_tta`` (:func:`imagene.pp.context_features`,
        cached per section like the spot features), the niche graph of the ``n_neighs`` nearest
        spots of each section (:func:`imagene.pp.niches`) and the context matrix
        (:func:`imagene.pp.context_matrix`: the scales, then the neighbour mean of the first).
    context_sizes_um
        Tile sides of the context; ``None``: ``tile_size_um`` times 1, 2 and 4.
    context_tta
        Test-time augmentation of the context tiles (``None``, ``'flips'``, ``'dihedral'``).
    n_neighs
        Neighbours of each spot in the niche graph of the context.

    Returns
    -------
    AnnData joined by :func:`imagene.io.concat` (genes measured in every section) with raw counts,
    ``obsm['X_he_<encoder>']`` (with ``context``: also ``obsm['X_he_<encoder>_<size>um']`` per size,
    ``'X_he_<encoder>_<first size>um_nbr'``, ``'X_he_<encoder>_context'`` and the niche graph in
    ``obsp``), ``obs['section']``, ``obs['patient']`` (the letters of a her2st-style id such as
    ``'C'`` for ``'C2'``, else the section id) and, when any section has labels, ``obs['label']``
    (NaN where a spot has none).

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
    sizes = [float(tile_size_um) * f for f in (1, 2, 4)] if context_sizes_um is None else list(context_sizes_um)
    context_keys: list[str] = []
    adatas: dict[str, AnnData] = {}
    for s in sections:
        a = read_section(files[s], s, image_scale=scales.get(s))
        _embed_section(
            a, s, Path(files[s]["image"]), encoder=encoder, tile_px=tile_px, tile_size_um=tile_size_um,
            cache=cache_dir, show_progress_bar=show_progress_bar,
        )
        if context:
            context_keys = _context_section(
                a, s, Path(files[s]["image"]), encoder=encoder, tile_px=tile_px, sizes_um=sizes, tta=context_tta,
                cache=cache_dir, show_progress_bar=show_progress_bar,
            )
        adatas[s] = a
    adata = join_sections(adatas)
    if context:
        pp.niches(adata, n_neighs=n_neighs, library_key=KEYS.SECTION, niche_expression=False)
        pp.context_matrix(adata, context_keys)
    return adata
