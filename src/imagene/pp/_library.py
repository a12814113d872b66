"""Resolve which section (library) each spot belongs to."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._constants import KEYS


def resolve_libraries(adata: AnnData, library_key: str | None) -> tuple[str | None, dict[str, np.ndarray]]:
    """Return the library key used and ``{library_id: integer positions of its spots}``.

    With ``library_key=None``: ``obs['section']`` (written by :func:`imagene.io.concat`) is used when
    ``uns['spatial']`` holds several sections or the column names several sections; otherwise the
    single ``uns['spatial']`` entry (or ``''`` when there is none) covers all spots.

    Parameters
    ----------
    adata
        AnnData of one or several sections.
    library_key
        ``obs`` column of sections, or ``None`` to infer it as above.

    Returns
    -------
    ``(library_key or None, {library id: positions})``; sections without spots are left out.

    Examples
    --------
    >>> key, libs = imagene.pp.resolve_libraries(adata, "section")
    """
    libs = list(adata.uns.get("spatial", {}))
    if library_key is None:
        several = KEYS.SECTION in adata.obs and adata.obs[KEYS.SECTION].astype(str).nunique() > 1
        if len(libs) <= 1 and not several:
            return None, {libs[0] if libs else "": np.arange(adata.n_obs)}
        if KEYS.SECTION in adata.obs:
            library_key = KEYS.SECTION
        else:
            raise ValueError(
                f"adata.uns['spatial'] holds {len(libs)} sections {libs}; pass `library_key=` naming the obs column "
                "that says which section each spot belongs to."
            )
    if library_key not in adata.obs:
        raise KeyError(f"adata.obs[{library_key!r}] not found. Pass the obs column holding the section of each spot.")
    codes = pd.Categorical(adata.obs[library_key].astype(str))
    out = {str(c): np.flatnonzero(codes == c) for c in codes.categories}
    return library_key, {k: v for k, v in out.items() if len(v)}
