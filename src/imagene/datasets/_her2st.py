"""The her2st demo sample shipped inside the package (legacy ST files, downscaled H&E)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("imagene")

#: folder of the shipped sample (inside the installed package)
DATA_DIR = Path(__file__).resolve().parent / "_data" / "her2st"

#: sections shipped, in their default order
HER2ST_SECTIONS = ("B4", "C2", "C3", "C4")

CITATION = (
    "Andersson et al., Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated "
    "cell type interactions, Nature Communications 12, 6012 (2021), https://doi.org/10.1038/s41467-021-26271-2"
)


@cache
def _manifest() -> dict[str, Any]:
    path = DATA_DIR / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"The her2st demo data is missing from the installed package ({path} not found). "
            "Reinstall imagene, or regenerate it from a source checkout with `python scripts/make_demo_data.py`."
        )
    return json.loads(path.read_text())


def _check_sections(sections: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(sections, str):
        sections = (sections,)
    sections = tuple(sections)
    if len(sections) == 0:
        raise ValueError(f"`sections` is empty; pick one or more of {list(HER2ST_SECTIONS)}.")
    known = _manifest()["sections"]
    unknown = [s for s in sections if s not in known]
    if unknown:
        raise KeyError(f"Unknown her2st demo section(s) {unknown}; the shipped sections are {list(known)}.")
    if len(set(sections)) != len(sections):
        raise ValueError(f"`sections` has duplicates: {list(sections)}; name each section once.")
    return sections


def demo_paths() -> dict[str, dict[str, Any]]:
    """Paths of the shipped her2st demo files, per section, for calling the reader yourself.

    The sample is four sections of Andersson et al., Nature Communications 12, 6012 (2021) (cite the
    paper when you use them; the authors state no licence): ``B4`` (patient B) and ``C2``, ``C3``,
    ``C4`` (patient C), in the original legacy ST formats, with H&E images downscaled for size.

    Returns
    -------
    ``{section: {"counts": Path, "spots": Path, "image": Path, "image_scale": float, "patient": str}}``
    where ``counts`` is ``<S>.tsv.gz``, ``spots`` the ``<S>_selection.tsv`` spot table (pixel
    coordinates in full-resolution pixels), ``image`` the downscaled H&E JPEG and ``image_scale``
    its pixels per full-resolution pixel (pass it to :func:`imagene.io.read_legacy_st`).

    Examples
    --------
    >>> p = imagene.datasets.demo_paths()["C2"]
    >>> adata = imagene.io.read_legacy_st(p["counts"], p["spots"], p["image"], image_scale=p["image_scale"])
    """
    out: dict[str, dict[str, Any]] = {}
    for s, m in _manifest()["sections"].items():
        entry: dict[str, Any] = {k: DATA_DIR / v for k, v in m["files"].items()}
        for k, p in entry.items():
            if not p.exists():
                raise FileNotFoundError(
                    f"Demo file {p} ({k} of section {s!r}) is missing from the installed package. Reinstall imagene."
                )
        entry["image_scale"] = float(m["image_scale"])
        entry["patient"] = str(m["patient"])
        out[s] = entry
    return out


def her2st_demo(sections: str | Sequence[str] = HER2ST_SECTIONS) -> AnnData:
    """Load the her2st demo sample shipped with imagene (4 HER2+ breast cancer sections, legacy ST).

    Each section is read from its shipped legacy ST files with :func:`imagene.io.read_legacy_st`
    (spots under tissue that have counts; microns per pixel inferred from the 200 µm spot pitch)
    and the sections are joined with :func:`imagene.io.concat` (genes measured in every section).
    The shipped H&E images are downscaled copies of the originals; their scale is recorded in
    ``uns['spatial'][section]['metadata']['source_image_scale']`` so ``obsm['spatial']`` stays in the
    original full-resolution pixels.

    Data: Andersson et al., "Spatial deconvolution of HER2-positive breast cancer delineates
    tumor-associated cell type interactions", Nature Communications 12, 6012 (2021). The authors
    state no licence; cite the paper when you use these data.

    Parameters
    ----------
    sections
        Sections to load, among ``"B4"`` (patient B), ``"C2"``, ``"C3"``, ``"C4"`` (patient C).

    Returns
    -------
    AnnData with raw counts in ``X`` and ``layers['counts']``, ``obsm['spatial']`` (full-resolution
    pixels), ``obs['section']`` and ``obs['patient']`` (categorical), one ``uns['spatial'][section]``
    entry per section, and ``uns['her2st_demo']`` (citation and licence note).

    Examples
    --------
    >>> adata = imagene.datasets.her2st_demo()
    >>> adata.obs["section"].value_counts()
    """
    from imagene.io import concat, read_legacy_st

    sections = _check_sections(sections)
    paths = demo_paths()
    adatas = {}
    for s in sections:
        p = paths[s]
        adatas[s] = read_legacy_st(p["counts"], p["spots"], p["image"], library_id=s, image_scale=p["image_scale"])
    adata = concat(adatas, section_key="section")
    patient = {s: paths[s]["patient"] for s in sections}
    cats = list(dict.fromkeys(patient[s] for s in sections))
    adata.obs["patient"] = pd.Categorical(adata.obs["section"].astype(str).map(patient), categories=cats)
    adata.uns["her2st_demo"] = {"citation": CITATION, "licence": "none stated by the authors; cite the paper"}
    logger.info("Loaded the her2st demo sample: %d spots, %d genes, sections %s.", adata.n_obs, adata.n_vars,
                list(sections))
    return adata

