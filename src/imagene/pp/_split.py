"""Section-level splits (never by spot: neighbouring spots share signal)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import check_adata, save_key
from imagene._validate import renamed_kwarg


def section_split(
    adata: AnnData,
    *,
    test_sections: Sequence[str],
    validation_sections: Sequence[str] = (),
    library_key: str | None = None,
    key_added: str = KEYS.SPLIT,
    section_key: str | None = None,
) -> None:
    """Label each spot ``'train'``, ``'validation'`` or ``'test'`` by its section.

    Parameters
    ----------
    adata
        AnnData with a section column.
    test_sections
        Sections held out for testing (a list, or one section name).
    validation_sections
        Sections held out for validation / early stopping (a list, or one section name).
    library_key
        ``obs`` column of sections (default ``'section'``).
    key_added
        ``obs`` column written.
    section_key
        Old name of ``library_key`` (deprecated).

    Returns
    -------
    Nothing; adds ``obs[key_added]``, categorical with categories train / validation / test.
    """
    library_key = renamed_kwarg("library_key", library_key, "section_key", section_key, where="imagene.pp.section_split")
    library_key = KEYS.SECTION if library_key is None else library_key
    check_adata(adata)
    # a single section name is a str, itself a Sequence[str]: never split it into characters
    test_sections = [test_sections] if isinstance(test_sections, str) else list(test_sections)
    validation_sections = [validation_sections] if isinstance(validation_sections, str) else list(validation_sections)
    if library_key not in adata.obs:
        raise KeyError(f"adata.obs[{library_key!r}] not found. Pass the obs column of sections as `library_key=`.")
    sections = adata.obs[library_key].astype(str)
    known = set(sections)
    for name, group in (("test_sections", test_sections), ("validation_sections", validation_sections)):
        unknown = set(map(str, group)) - known
        if unknown:
            raise ValueError(f"{name} {sorted(unknown)} not found in adata.obs[{library_key!r}] ({sorted(known)}).")
    both = set(map(str, test_sections)) & set(map(str, validation_sections))
    if both:
        raise ValueError(
            f"Sections {sorted(both)} are in both test_sections and validation_sections; hold each section out once."
        )
    labels = pd.Series("train", index=adata.obs_names)
    labels[sections.isin(list(map(str, validation_sections))).to_numpy()] = "validation"
    labels[sections.isin(list(map(str, test_sections))).to_numpy()] = "test"
    if (labels == "train").sum() == 0:
        raise ValueError("No training section left; hold out fewer sections.")
    save_key(adata, "obs", key_added, pd.Categorical(labels, categories=["train", "validation", "test"]))
