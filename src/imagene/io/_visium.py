"""Reader for 10x Genomics Visium (Space Ranger ``outs/``), on top of :func:`squidpy.read.visium`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS, SPOT_DIAMETER_UM
from imagene._utils import check_counts, warn
from imagene.io._image import as_rgb

logger = logging.getLogger("imagene")


def read_visium(
    path: str | os.PathLike,
    *,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    library_id: str | None = None,
    source_image_path: str | os.PathLike | None = None,
) -> AnnData:
    """Read a 10x Genomics Visium Space Ranger output folder into the imagene layout.

    Reading is delegated to :func:`squidpy.read.visium`; the result is then brought to the layout
    used throughout imagene: raw integer counts in ``X`` and ``layers['counts']`` (float32 CSR),
    spot centres in ``obsm['spatial']`` as float full-resolution pixels (x = column, y = row),
    RGB ``uint8`` images, ``scalefactors['microns_per_pixel']`` derived from the 55 µm Visium spot
    diameter and ``metadata`` with ``platform``, ``source_image_path`` and ``source_image_scale``.

    When the hires image is missing or blank (a single colour, as in some test data), the lowres
    image is used as ``images['hires']`` (with ``tissue_hires_scalef`` set to the lowres scale
    factor) and a warning is issued.

    Parameters
    ----------
    path
        Space Ranger ``outs/`` folder holding the counts file and the ``spatial/`` folder.
    counts_file
        Counts file in ``path``: ``filtered_feature_bc_matrix.h5`` or ``raw_feature_bc_matrix.h5``.
    library_id
        Name of the section; defaults to the library id stored in the counts file.
    source_image_path
        The full-resolution H&E image given to Space Ranger (the one ``obsm['spatial']`` refers
        to). Tiles are cut from it; without it only the hires image is available.

    Returns
    -------
    AnnData with ``X`` / ``layers['counts']``, ``obsm['spatial']``, ``obs['in_tissue'|'array_row'|'array_col']``
    and ``uns['spatial'][library_id]`` with ``images`` (``hires``, ``lowres``), ``scalefactors``
    (Space Ranger's plus ``microns_per_pixel``) and ``metadata``.

    Examples
    --------
    >>> adata = imagene.io.read_visium("outs/", source_image_path="slide.tif")
    >>> lib = next(iter(adata.uns["spatial"]))
    >>> adata.uns["spatial"][lib]["scalefactors"]["microns_per_pixel"]
    """
    import squidpy as sq

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Visium folder {str(path)!r} does not exist; pass the Space Ranger `outs/` folder.")
    if not (path / counts_file).exists():
        raise FileNotFoundError(
            f"Counts file {counts_file!r} not found in {str(path)!r}; pass `counts_file=` "
            "(e.g. 'raw_feature_bc_matrix.h5')."
        )
    if not (path / "spatial" / "scalefactors_json.json").exists():
        raise FileNotFoundError(
            f"{str(path / 'spatial' / 'scalefactors_json.json')!r} not found; "
            f"is {str(path)!r} a Space Ranger `outs/` folder?"
        )
    src = ""
    if source_image_path is not None:
        sp_path = Path(source_image_path)
        if not sp_path.exists():
            raise FileNotFoundError(
                f"source_image_path {str(sp_path)!r} does not exist; "
                "pass the full-resolution image given to Space Ranger."
            )
        src = str(sp_path.resolve())

    adata = sq.read.visium(path, counts_file=counts_file, library_id=library_id)
    libs = list(adata.uns.get("spatial", {}))
    if len(libs) != 1:  # pragma: no cover - squidpy always writes one entry
        raise RuntimeError(f"Expected one library in the Visium data, got {libs}.")
    lib = libs[0]
    if adata.n_obs == 0:
        raise ValueError(f"The Visium counts in {str(path)!r} have no spots.")

    X = adata.X if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    X = sp.csr_matrix(X, dtype=np.float32)
    check_counts(X, f"counts of Visium section {lib!r}")
    adata.X = X
    adata.layers[KEYS.COUNTS] = X.copy()
    if adata.var_names.has_duplicates:
        warn(f"Visium section {lib!r} has duplicated gene names; making them unique (suffixes -1, -2, ...).")
        adata.var_names_make_unique()

    xy = np.asarray(adata.obsm[KEYS.SPATIAL], dtype=np.float64)
    if np.isnan(xy).any():
        raise ValueError(
            f"{int(np.isnan(xy).any(1).sum())} spots of Visium section {lib!r} have no position in "
            "spatial/tissue_positions*.csv; check that the counts file and the spatial folder come from the same run."
        )
    adata.obsm[KEYS.SPATIAL] = xy

    entry = adata.uns["spatial"][lib]
    sf = {k: float(v) for k, v in entry.get("scalefactors", {}).items()}
    if "spot_diameter_fullres" not in sf or not sf["spot_diameter_fullres"] > 0:
        raise ValueError(f"scalefactors_json.json of {str(path)!r} lacks a positive 'spot_diameter_fullres'.")
    sf["microns_per_pixel"] = SPOT_DIAMETER_UM["visium"] / sf["spot_diameter_fullres"]

    raw_images = {k: np.asarray(v) for k, v in entry.get("images", {}).items() if v is not None}
    blank = "hires" in raw_images and _is_blank(raw_images["hires"])
    if blank:
        del raw_images["hires"]  # a placeholder: not worth converting
    images = {res: as_rgb(img, name=f"{res} image of Visium section {lib!r}") for res, img in raw_images.items()}
    if "hires" not in images and "lowres" in images and "tissue_lowres_scalef" in sf:
        warn(
            f"The hires image of Visium section {lib!r} is {'blank' if blank else 'missing'}; "
            "using the lowres image as images['hires']."
        )
        images["hires"] = images["lowres"]
        sf["tissue_hires_scalef"] = sf["tissue_lowres_scalef"]
    if "hires" not in images:
        warn(f"Visium section {lib!r} has no usable image; only expression and positions were read.")

    metadata = {k: _to_str(v) for k, v in entry.get("metadata", {}).items()}
    metadata.update({"platform": "visium", "source_image_path": src, "source_image_scale": 1.0})
    adata.uns["spatial"] = {lib: {"images": images, "scalefactors": sf, "metadata": metadata}}
    logger.info("Read Visium section %r: %d spots x %d genes.", lib, adata.n_obs, adata.n_vars)
    return adata


def _is_blank(img: np.ndarray) -> bool:
    """Whether an image holds a single value (a placeholder)."""
    return img.size == 0 or bool((img == img.flat[0]).all()) or (
        img.ndim == 3 and bool((img == img.reshape(-1, img.shape[-1])[0]).all())
    )


def _to_str(v: object) -> object:
    """Decode the byte strings h5 metadata come as (``array([b'...'])``) into plain strings."""
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(-1)[0]
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    return v
