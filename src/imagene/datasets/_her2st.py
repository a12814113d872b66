"""Published legacy-ST datasets read from a local copy or downloaded from the authors' repositories.

Nothing of these data ships with imagene: :func:`her2st` and :func:`mouse_olfactory_bulb` read a
folder you point them to (``path=``, or ``$IMAGENE_DATA_DIR/<dataset>``), or download the files
from the authors' public repositories into a cache, checked by SHA-256.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from imagene.datasets._fetch import DATA_ENV, RemoteFile, default_cache_dir, fetch, local_dataset_dir

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("imagene")

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
LABELS_SUFFIX = "_labeled_coordinates.tsv"

# ------------------------------------------------------------------------------------------ her2st

HER2ST_CITATION = (
    "Andersson et al., Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated "
    "cell type interactions, Nature Communications 12, 6012 (2021), https://doi.org/10.1038/s41467-021-26271-2"
)
HER2ST_LICENCE = "none stated by the authors; cite the paper"
HER2ST_HOMEPAGE = "https://github.com/almaan/her2st"
#: raw files of the authors' repository (``data/ST-cnts``, ``data/ST-spotfiles``, ``data/ST-imgs``, ...)
HER2ST_URL = "https://github.com/almaan/her2st/raw/master"
#: sections read by default: the four with a full-size H&E image (patients B and C)
HER2ST_SECTIONS = ("B4", "C2", "C3", "C4")
#: downscaled images of the her2st release: pixels of the file per full-resolution pixel
#: (A1's image is a 2000-px-wide copy of a 6954-px-wide slide, see the release's ``dims.list``)
KNOWN_IMAGE_SCALES = {"A1_HE_image_dark.png": 2000 / 6954}


def _her2st_files(section: str, image: str, image_remote: str, hashes: tuple[str, ...], labels: bool = False):
    files = {
        "counts": RemoteFile(f"data/ST-cnts/{section}.tsv.gz", f"{section}.tsv.gz", hashes[0]),
        "spots": RemoteFile(f"data/ST-spotfiles/{section}_selection.tsv", f"{section}_selection.tsv", hashes[1]),
        "image": RemoteFile(image_remote, image, hashes[2]),
    }
    if labels:
        name = f"{section}{LABELS_SUFFIX}"
        files["labels"] = RemoteFile(f"data/ST-pat/lbl/{name}", name, hashes[3])
    return files


#: the her2st files imagene can download, with their SHA-256 (counts, spot table, image[, labels])
HER2ST_REMOTE: dict[str, dict[str, RemoteFile]] = {
    "A1": _her2st_files(
        "A1", "A1_HE_image_dark.png", "backup/app/www/imgs/A1_HE_image_dark.png",
        ("d91035e5d8a9c4ce7865e4c61446deec1a7318602d41b3220e9fcb3ce7e41fe3",
         "e5f79223be2ea2aebb082c4759059ab7079b0132052d0944209048ac57788c5d",
         "e3836547df4772907bb537e53f41794fe4e603e9a6c99c1f6e91ef4342b95a6d",
         "23a0a68dccd54a8397ea4066994edb7110e88373d5b3bc6e35254dda9253fa5f"),
        labels=True,
    ),
    "B4": _her2st_files(
        "B4", "BT10737_D2_HE.jpg", "data/ST-imgs/B/B4/BT10737_D2_HE.jpg",
        ("e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
         "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
         "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d"),
    ),
    "C2": _her2st_files(
        "C2", "5714_HE_BT_C2.jpg", "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
        ("c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
         "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
         "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e"),
    ),
    "C3": _her2st_files(
        "C3", "5714_HE_BT_D1.jpg", "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg",
        ("e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
         "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
         "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568"),
    ),
    "C4": _her2st_files(
        "C4", "5714_HE_BT_D2.jpg", "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg",
        ("33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
         "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
         "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2"),
    ),
}

# ---------------------------------------------------------------------------- mouse olfactory bulb

MOB_CITATION = (
    "Ståhl et al., Visualization and analysis of gene expression in tissue sections by spatial transcriptomics, "
    "Science 353, 78-82 (2016), https://doi.org/10.1126/science.aaf2403; files as distributed with the STUtility "
    "R package (Bergenstråhle et al., BMC Genomics 21, 482 (2020))"
)
MOB_LICENCE = "MIT (STUtility R package)"
MOB_HOMEPAGE = "https://github.com/jbergenstrahle/STUtility"
MOB_URL = "https://github.com/jbergenstrahle/STUtility/raw/master/inst/extdata/counts"
MOB_SECTIONS = ("MOB1", "MOB2")
MOB_REMOTE: dict[str, dict[str, RemoteFile]] = {
    s: {
        "counts": RemoteFile(f"{s}.tsv", f"{s}.tsv", h[0]),
        "spots": RemoteFile(f"alignment_table_{s}.tsv", f"alignment_table_{s}.tsv", h[1]),
        "image": RemoteFile(f"{s}.jpg", f"{s}.jpg", h[2]),
    }
    for s, h in {
        "MOB1": ("82c0691f800355369fd8a72ff44ba1e3112d4e44a790f490a9fa267876a9352e",
                 "91ade06cf93bc0b3cd728846c34e310a8365200d1ad33498e6a0eb6951a92164",
                 "c1c292187221bab077ac1b15e95cf665db35684c98d6193af56d2e8b7772fe20"),
        "MOB2": ("449dcc351ede5c63f9afe313479dbb830ba32c6e86b56b258276304102d1f7e9",
                 "6d86b226386b0a08f825b3bff4b5c359f00fd52d3f53d77db0376b0f7e0ec30d",
                 "1079fe52f600ec212a6a59cef76b8697fcd776d0cdb10461ad3bb738eaa5c0b6"),
    }.items()
}

_LAYOUT_HINT = (
    "a folder with one sub-folder per section, <S>/ holding the counts <S>.tsv.gz (or .tsv), the spot table "
    "<S>_selection.tsv (or alignment_table_<S>.tsv) and one H&E image"
)


# ------------------------------------------------------------------------------------- local files


def _check_sections(sections: str | Sequence[str]) -> list[str]:
    sections = [sections] if isinstance(sections, str) else [str(s) for s in sections]
    if not sections:
        raise ValueError("`sections` is empty; name one or more sections to read.")
    if len(set(sections)) != len(sections):
        raise ValueError(f"`sections` has duplicates: {sections}; name each section once.")
    return sections


def section_folders(path: str | os.PathLike) -> list[str]:
    """Names of the section folders under ``path`` (sub-folders holding an ``<S>.tsv[.gz]`` counts table)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(
        p.name for p in path.iterdir()
        if p.is_dir() and ((p / f"{p.name}.tsv.gz").exists() or (p / f"{p.name}.tsv").exists())
    )


def section_files(folder: str | os.PathLike, section: str) -> dict[str, Path]:
    """Find the legacy-ST files of ``section`` in ``folder/section/`` (counts, spots, image, optional labels).

    Raises
    ------
    FileNotFoundError
        Naming the missing files and the folders that were found.
    """
    root = Path(folder)
    d = root / section
    if not d.is_dir():
        found = section_folders(root)
        raise FileNotFoundError(
            f"Section folder {d} not found. `path` must be {_LAYOUT_HINT}; section folders found in {root}: {found}."
        )
    counts = next((p for p in (d / f"{section}.tsv.gz", d / f"{section}.tsv") if p.exists()), None)
    spots = next((p for p in (d / f"{section}_selection.tsv", d / f"alignment_table_{section}.tsv") if p.exists()),
                 None)
    images = sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if len(images) > 1:
        he = [p for p in images if "he" in re.split(r"[^a-z]+", p.stem.lower())]
        images = he if len(he) == 1 else images
    missing = [n for n, p in (("counts <S>.tsv.gz", counts), ("spot table <S>_selection.tsv", spots)) if p is None]
    if missing or len(images) != 1:
        what = missing + ([] if len(images) == 1 else [f"exactly one H&E image (found {[p.name for p in images]})"])
        raise FileNotFoundError(f"Section {section!r} in {d} lacks {', '.join(what)}.")
    out = {"counts": counts, "spots": spots, "image": images[0]}
    labels = d / f"{section}{LABELS_SUFFIX}"
    if labels.exists():
        out["labels"] = labels
    return out


def _patient_of(section: str) -> str:
    """her2st convention: the patient is the letter of the section id (``'C2'`` → ``'C'``)."""
    m = re.fullmatch(r"([A-Za-z]+)\d+", section)
    return m.group(1) if m else section


def _resolve(
    dataset: str,
    sections: list[str],
    remote: Mapping[str, Mapping[str, RemoteFile]],
    *,
    path: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    base_url: str,
    homepage: str,
    show_progress_bar: bool,
) -> dict[str, dict[str, Path]]:
    """Files of each section: from ``path`` (or ``$IMAGENE_DATA_DIR/<dataset>``), else downloaded into the cache."""
    local = Path(path) if path is not None else local_dataset_dir(dataset)
    if local is not None:
        if not local.is_dir():
            raise FileNotFoundError(f"`path` {local} is not a folder; it must be {_LAYOUT_HINT}.")
        return {s: section_files(local, s) for s in sections}
    unknown = [s for s in sections if s not in remote]
    if unknown:
        raise KeyError(
            f"Section(s) {unknown} of {dataset} cannot be downloaded by imagene (known: {sorted(remote)}). Get them "
            f"from {homepage} and pass `path=` ({_LAYOUT_HINT})."
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return {
        s: fetch(remote[s], base_url=base_url, folder=cache / dataset / s, homepage=homepage,
                 layout_hint=_LAYOUT_HINT, show_progress_bar=show_progress_bar)
        for s in sections
    }


def read_section(files: Mapping[str, Path], section: str, *, image_scale: float | None = None) -> AnnData:
    """Read one legacy-ST section from its files (see :func:`section_files`), with its labels when present.

    ``image_scale`` defaults to the known scale of a downscaled release image (her2st A1), else 1.
    Adds ``obs['patient']`` (her2st convention: the letters of the section id) and, with a labels
    table (columns ``x``, ``y``, ``label``), ``obs['label']`` joined by rounding ``x``, ``y`` to the spot key.
    """
    from imagene.io import read_legacy_st

    scale = image_scale if image_scale is not None else KNOWN_IMAGE_SCALES.get(Path(files["image"]).name, 1.0)
    a = read_legacy_st(files["counts"], files["spots"], files["image"], library_id=section, image_scale=scale)
    a.obs["patient"] = _patient_of(section)
    if "labels" in files:
        lab = pd.read_csv(files["labels"], sep="\t")
        if not {"x", "y", "label"} <= set(lab.columns):
            raise ValueError(f"{files['labels']} must have columns x, y, label; got {list(lab.columns)}.")
        keys = lab["x"].round().astype(int).astype(str) + "x" + lab["y"].round().astype(int).astype(str)
        lab = pd.Series(lab["label"].astype(str).to_numpy(), index=keys)
        lab = lab[~lab.index.duplicated(keep="first")]
        a.obs["label"] = lab.reindex(a.obs_names).to_numpy()
        logger.info("Section %r: %d of %d spots have a reference label", section, int(a.obs["label"].notna().sum()),
                    a.n_obs)
    return a


def join_sections(adatas: Mapping[str, AnnData]) -> AnnData:
    """Join sections read by :func:`read_section` (genes measured in every section), with categorical obs."""
    from imagene._constants import KEYS
    from imagene.io import concat

    has_labels = any("label" in a.obs for a in adatas.values())
    for a in adatas.values():
        if has_labels and "label" not in a.obs:
            a.obs["label"] = np.nan
    adata = concat(dict(adatas), library_key=KEYS.SECTION)
    adata.obs["patient"] = pd.Categorical(adata.obs["patient"].astype(str),
                                          categories=list(dict.fromkeys(adata.obs["patient"].astype(str))))
    if has_labels:
        lab = adata.obs["label"].astype(object)
        adata.obs["label"] = pd.Categorical(lab.where(lab.notna(), None))
    return adata


# ------------------------------------------------------------------------------------ public API

_PATH_DOC = """path
        Local copy: a folder with one sub-folder per section (``<S>/`` holding the counts table, the spot
        table and one H&E image, as the authors distribute them). Default: ``$IMAGENE_DATA_DIR/{name}``
        when the environment variable ``IMAGENE_DATA_DIR`` is set, else the files are downloaded.
    cache_dir
        Where downloads are kept (``<cache_dir>/{name}/<S>/``). Default: ``$IMAGENE_CACHE_DIR``, else the
        user cache folder of imagene (``pooch.os_cache('imagene')``). Files already there with the right
        hash are not downloaded again.
    base_url
        Where the files are downloaded from (default: the authors' repository); a mirror must keep the
        repository's layout.
    show_progress_bar
        Progress bars while downloading."""


def her2st_files(
    sections: str | Sequence[str] = HER2ST_SECTIONS,
    *,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    base_url: str = HER2ST_URL,
    show_progress_bar: bool = True,
) -> dict[str, dict[str, Path]]:
    """Local paths of the her2st files of each section (downloading them when needed).

    Parameters are those of :func:`her2st`.

    Returns
    -------
    ``{section: {"counts": Path, "spots": Path, "image": Path[, "labels": Path]}}``.
    """
    return _resolve("her2st", _check_sections(sections), HER2ST_REMOTE, path=path, cache_dir=cache_dir,
                    base_url=base_url, homepage=HER2ST_HOMEPAGE, show_progress_bar=show_progress_bar)


def her2st(
    sections: str | Sequence[str] = HER2ST_SECTIONS,
    *,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    base_url: str = HER2ST_URL,
    show_progress_bar: bool = True,
) -> AnnData:
    """HER2-positive breast cancer sections, legacy Spatial Transcriptomics (human), with full-size H&E.

    Andersson et al., "Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated
    cell type interactions", *Nature Communications* 12, 6012 (2021),
    https://doi.org/10.1038/s41467-021-26271-2; data from the authors' repository
    https://github.com/almaan/her2st. **Licence:** the authors state none; imagene does not
    redistribute these data. Cite the paper wherever you use them.

    Without ``path``, the files of each section (about 5 MB each: counts, spot table, H&E JPEG) are
    downloaded from the authors' repository into ``cache_dir`` and checked against the SHA-256
    hashes recorded in imagene (``imagene.datasets._her2st.HER2ST_REMOTE``); sections ``A1`` (with
    the pathologist's region labels and a 2000-px-wide image), ``B4``, ``C2``, ``C3``, ``C4`` can
    be downloaded. With ``path``, any section folder there is read.

    Parameters
    ----------
    sections
        Sections to read; default the four with a full-size H&E (``B4`` of patient B; ``C2``,
        ``C3``, ``C4`` of patient C).
    {path_doc}

    Returns
    -------
    AnnData joined by :func:`imagene.io.concat` (genes measured in every section) with raw counts in
    ``X`` and ``layers['counts']``, ``obsm['spatial']`` (full-resolution pixels), ``obs['section']``,
    ``obs['patient']`` and, when a section has labels (A1), ``obs['label']`` (categorical; NaN where
    a spot has none), one ``uns['spatial'][section]`` per section and ``uns['dataset']`` (name,
    citation, licence, source).

    Raises
    ------
    ConnectionError
        Offline without ``path``: the message names the URL, the page to get the data and ``path=``.
    ValueError
        A downloaded file does not match its recorded hash.

    Examples
    --------
    >>> adata = imagene.datasets.her2st(["B4", "C2"])  # downloads about 10 MB once
    >>> adata = imagene.datasets.her2st(path="her2st")  # a local copy
    """
    sections = _check_sections(sections)
    files = her2st_files(sections, path=path, cache_dir=cache_dir, base_url=base_url,
                         show_progress_bar=show_progress_bar)
    adata = join_sections({s: read_section(files[s], s) for s in sections})
    adata.uns["dataset"] = _provenance("her2st", HER2ST_CITATION, HER2ST_LICENCE, HER2ST_HOMEPAGE)
    logger.info("Read her2st: %d spots, %d genes, sections %s.", adata.n_obs, adata.n_vars, sections)
    return adata


def mouse_olfactory_bulb(
    sections: str | Sequence[str] = MOB_SECTIONS,
    *,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    base_url: str = MOB_URL,
    show_progress_bar: bool = True,
) -> AnnData:
    """Mouse olfactory bulb sections, legacy Spatial Transcriptomics, with low-resolution H&E.

    Ståhl et al., "Visualization and analysis of gene expression in tissue sections by spatial
    transcriptomics", *Science* 353, 78-82 (2016); files as distributed with the STUtility R package
    (Bergenstråhle et al., *BMC Genomics* 21, 482, 2020; https://github.com/jbergenstrahle/STUtility).
    **Licence:** MIT (STUtility). Genes are Ensembl mouse gene ids (about 1,000 per section); images
    are 1905 × 1905 px of the whole array (about 6.3 µm per pixel).

    Without ``path``, the files (counts ``<S>.tsv``, ``alignment_table_<S>.tsv``, ``<S>.jpg``; about
    4 MB per section) are downloaded from the STUtility repository and checked against recorded
    SHA-256 hashes.

    Parameters
    ----------
    sections
        Sections to read (``"MOB1"``, ``"MOB2"``).
    {path_doc}

    Returns
    -------
    AnnData as :func:`her2st` (``obs['patient']`` is ``"MOB"``).

    Examples
    --------
    >>> adata = imagene.datasets.mouse_olfactory_bulb()
    """
    sections = _check_sections(sections)
    files = _resolve("mouse_olfactory_bulb", sections, MOB_REMOTE, path=path, cache_dir=cache_dir, base_url=base_url,
                     homepage=MOB_HOMEPAGE, show_progress_bar=show_progress_bar)
    adata = join_sections({s: read_section(files[s], s) for s in sections})
    adata.uns["dataset"] = _provenance("mouse_olfactory_bulb", MOB_CITATION, MOB_LICENCE, MOB_HOMEPAGE)
    logger.info("Read the mouse olfactory bulb: %d spots, %d genes, sections %s.", adata.n_obs, adata.n_vars,
                sections)
    return adata


def _provenance(name: str, citation: str, licence: str, homepage: str) -> dict[str, Any]:
    return {"name": name, "citation": citation, "licence": licence, "source": homepage}


her2st.__doc__ = her2st.__doc__.format(path_doc=_PATH_DOC.format(name="her2st"))
mouse_olfactory_bulb.__doc__ = mouse_olfactory_bulb.__doc__.format(
    path_doc=_PATH_DOC.format(name="mouse_olfactory_bulb")
)
__all__ = ["DATA_ENV", "her2st", "her2st_files", "mouse_olfactory_bulb"]
