"""Concatenate sections, each keeping its own image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import pandas as pd
from anndata import AnnData

from imagene._constants import KEYS
from imagene._validate import check_gene_sets_measured, renamed_kwarg


def concat(
    adatas: Mapping[str, AnnData] | Sequence[AnnData],
    *,
    library_key: str | None = None,
    join: str = "inner",
    section_key: str | None = None,
) -> AnnData:
    """Concatenate sections into one AnnData with a section column, keeping each section's image.

    Parameters
    ----------
    adatas
        Sections keyed by library id, or a list of single-library AnnData (their
        ``uns['spatial']`` key is used as the id).
    library_key
        Column of ``obs`` holding the section id (default ``'section'``; categorical, equal to the
        ``uns['spatial']`` key, so it is the ``library_key`` of squidpy and of every imagene function).
    join
        ``'inner'`` keeps genes measured in every section (recommended), ``'outer'`` all genes:
        genes a section did not measure become zero counts there, with a warning (models would
        take them for true zeros).
    section_key
        Old name of ``library_key`` (deprecated).

    Returns
    -------
    AnnData with ``obs[library_key]``, observation names suffixed ``-<section>``, and
    ``uns['spatial']`` holding one entry per section.
    """
    library_key = renamed_kwarg("library_key", library_key, "section_key", section_key, where="imagene.io.concat")
    library_key = KEYS.SECTION if library_key is None else library_key
    if not isinstance(adatas, Mapping):
        named = {}
        for a in adatas:
            libs = list(a.uns.get("spatial", {}))
            if len(libs) != 1:
                raise ValueError("Pass a dict {library_id: adata} when a section has no single uns['spatial'] entry.")
            named[libs[0]] = a
        adatas = named
    if len(adatas) == 0:
        raise ValueError("No sections to concatenate.")
    spatial = {}
    for lib, a in adatas.items():
        if a.n_obs == 0:
            raise ValueError(f"Section {lib!r} is empty; drop it before concatenating.")
        entries = a.uns.get("spatial", {})
        if lib in entries:
            spatial[lib] = entries[lib]
        elif len(entries) == 1:
            spatial[lib] = next(iter(entries.values()))
    check_gene_sets_measured(dict(adatas), join)
    out = ad.concat(dict(adatas), label=library_key, join=join, index_unique="-", merge="same")
    out.obs[library_key] = pd.Categorical(out.obs[library_key], categories=list(adatas))
    out.uns["spatial"] = spatial
    return out
