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

from imagene._constants import KEYS

logger = logging.getLogger("imagene")

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
#: known downscaled images of the her2st release: pixels of the file per full-resolution pixel
#: (A1's image is a 2000-px-wide copy of a 6954-px-wide slide; see the data's README)
KNOWN_IMAGE_SCALES = {"A1_HE_image_dark.png": 2000 / 6954}
LABELS_SUFFIX = "_labeled_coordinates.tsv"


def _section_files(data_dir: Path, section: str) -> dict[str, Path]:
    folder = data_dir / section
    if not folder.is_dir():
        found = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
        raise FileNotFoundError(
            f"Section folder {folder} not found. --data must hold one folder per section (<S>/<S>.tsv.gz, "
            f"<S>_selection.tsv, one H&E image); folders found: {found}."
        )
    candidates = [folder / f"{section}{ext}" for ext in (".tsv.gz", ".tsv")]
    counts = next((p for p in candidates if p.exists()), None)
    spots = folder / f"{section}_selection.tsv"
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if len(images) > 1:
        he = [p for p in images if "he" in re.split(r"[^a-z]+", p.stem.lower())]
        images = he if len(he) == 1 else images
    required = (("counts <S>.tsv.gz", counts), ("spot table <S>_selection.tsv", spots))
    missing = [n for n, p in required if p is None or not p.exists()]
    if missing or len(images) != 1:
        what = missing + ([] if len(images) == 1 else [f"exactly one H&E image (found {[p.name for p in images]})"])
        raise FileNotFoundError(f"Section {section!r} in {folder} lacks {', '.join(what)}.")
    out = {"counts": counts, "spots": spots, "image": images[0]}
    labels = folder / f"{section}{LABELS_SUFFIX}"
    if labels.exists():
        out["labels"] = labels
    return out


def _patient_of(section: str) -> str:
    """her2st convention: the patient is the letter of the section id (``'C2'`` → ``'C'``)."""
    m = re.fullmatch(r"([A-Za-z]+)\d+", section)
    return m.group(1) if m else section


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
        Folder of section folders; ``None`` for the her2st sample shipped with imagene
        (:func:`imagene.datasets.demo_paths`: B4, C2, C3, C4 with images at half size).
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
    ``obsm['X_he_<encoder>']``, ``obs['section']``, ``obs['patient']`` (a ``patient`` entry of the
    shipped sample, else the letters of a her2st-style id such as ``'C'`` for ``'C2'``, else the
    section id) and, when any section has labels, ``obs['label']`` (NaN where a spot has none).

    Examples
    --------
    >>> adata = imagene.bench.read_sections("../shared/data/her2st", ["B4", "C2", "C3", "C4"], cache="bench_cache")
    """
    import imagene as ig

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
    adatas: dict[str, AnnData] = {}
    has_labels = False
    for s in sections:
        if data_dir is None:
            paths = ig.datasets.demo_paths()
            if s not in paths:
                raise KeyError(f"Section {s!r} is not in the shipped her2st sample ({list(paths)}); pass data_dir.")
            p = paths[s]
            files = {"counts": p["counts"], "spots": p["spots"], "image": p["image"]}
            scale = scales.get(s, p["image_scale"])
            patient = p["patient"]
        else:
            files = _section_files(Path(data_dir), s)
            scale = scales.get(s, KNOWN_IMAGE_SCALES.get(files["image"].name, 1.0))
            patient = _patient_of(s)
        a = ig.io.read_legacy_st(files["counts"], files["spots"], files["image"], library_id=s, image_scale=scale)
        a.obs["patient"] = patient
        if "labels" in files:
            lab = pd.read_csv(files["labels"], sep="\t")
            if not {"x", "y", "label"} <= set(lab.columns):
                raise ValueError(f"{files['labels']} must have columns x, y, label; got {list(lab.columns)}.")
            keys = lab["x"].round().astype(int).astype(str) + "x" + lab["y"].round().astype(int).astype(str)
            lab = pd.Series(lab["label"].astype(str).to_numpy(), index=keys)
            lab = lab[~lab.index.duplicated(keep="first")]
            a.obs["label"] = lab.reindex(a.obs_names).to_numpy()
            n_labelled = int(a.obs["label"].notna().sum())
            logger.info("Section %r: %d of %d spots have a reference label", s, n_labelled, a.n_obs)
            has_labels = True
        _embed_section(
            a, s, Path(files["image"]), encoder=encoder, tile_px=tile_px, tile_size_um=tile_size_um, cache=cache_dir,
            show_progress_bar=show_progress_bar,
        )
        adatas[s] = a
    for a in adatas.values():
        if has_labels and "label" not in a.obs:
            a.obs["label"] = np.nan
    adata = ig.io.concat(adatas, section_key=KEYS.SECTION)
    adata.obs["patient"] = pd.Categorical(adata.obs["patient"].astype(str))
    if has_labels:
        adata.obs["label"] = adata.obs["label"].astype(object).where(adata.obs["label"].notna(), None)
        adata.obs["label"] = pd.Categorical(adata.obs["label"])
    return adata
