"""A small synthetic H&E + spatial transcriptomics dataset whose image and expression share tissue domains."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("imagene")

#: H&E-like base colours of the domains (dense tumour-like, stroma-like, adipose-like, then more)
_DOMAIN_RGB = np.array(
    [[150, 80, 170], [230, 140, 180], [245, 225, 235], [190, 110, 150], [120, 70, 140], [215, 180, 200]],
    dtype=np.float64,
)
#: nuclei per pixel in each domain (texture)
_NUCLEI_DENSITY = np.array([4e-3, 1.2e-3, 2e-4, 2.5e-3, 5e-3, 6e-4])
_NUCLEUS_RGB = np.array([70.0, 40.0, 110.0])


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer; got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}; got {value}.")
    return int(value)


def _domain_map(rng: np.random.Generator, px: int, n_domains: int) -> np.ndarray:
    """(px, px) int map of smooth, contiguous domains: Voronoi cells of spread-out centres, warped."""
    if n_domains == 1:
        return np.zeros((px, px), dtype=np.int64)
    angle0 = rng.uniform(0, 2 * np.pi)
    angles = angle0 + 2 * np.pi * np.arange(n_domains) / n_domains + rng.uniform(-0.3, 0.3, n_domains)
    radius = 0.3 * px * rng.uniform(0.8, 1.2, n_domains)
    centres = np.stack([px / 2 + radius * np.cos(angles), px / 2 + radius * np.sin(angles)], axis=1)
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float64)
    # smooth random warp of the coordinates (a few low-frequency waves) gives wavy, organic boundaries
    warp = []
    for _ in range(2):
        f = rng.uniform(0.5, 2.0, size=(3, 2)) * 2 * np.pi / px
        phase = rng.uniform(0, 2 * np.pi, size=3)
        w = sum(np.sin(f[j, 0] * xx + f[j, 1] * yy + phase[j]) for j in range(3))
        warp.append(w / 3 * 0.08 * px)
    xw, yw = xx + warp[0], yy + warp[1]
    d = (xw[None] - centres[:, 0, None, None]) ** 2 + (yw[None] - centres[:, 1, None, None]) ** 2
    return d.argmin(0)


def _paint(rng: np.random.Generator, domains: np.ndarray, n_domains: int) -> np.ndarray:
    """Paint an H&E-like RGB image: domain colour, domain-dependent nuclei density, mild stain noise."""
    from scipy.ndimage import gaussian_filter, maximum_filter

    palette = _DOMAIN_RGB[np.arange(n_domains) % len(_DOMAIN_RGB)]
    density = _NUCLEI_DENSITY[np.arange(n_domains) % len(_NUCLEI_DENSITY)]
    base = palette[domains]  # (px, px, 3)
    base = np.stack([gaussian_filter(base[..., c], sigma=2.0) for c in range(3)], axis=-1)  # soft boundaries
    seeds = rng.random(domains.shape) < density[domains]
    yy, xx = np.mgrid[-3:4, -3:4]
    nuclei = maximum_filter(seeds.astype(np.float64), footprint=(xx**2 + yy**2) <= 7).astype(np.float64)
    nuclei = gaussian_filter(nuclei, sigma=0.7)[..., None]
    img = base * (1 - nuclei) + _NUCLEUS_RGB * nuclei
    img = img * rng.normal(1.0, 0.03, size=3)  # section-wide stain variation (a mild batch effect)
    img = img + rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def synthetic_he_st(
    n_obs: int = 200,
    n_vars: int = 50,
    *,
    n_sections: int = 2,
    image_px: int = 512,
    microns_per_pixel: float = 1.0,
    n_domains: int = 3,
    seed: int = 0,
) -> AnnData:
    """Make a small synthetic H&E + spatial transcriptomics dataset with known tissue domains.

    Each section has a square H&E-like image of ``image_px`` pixels in which ``n_domains`` smooth,
    contiguous tissue domains are painted with their own colour and nuclei density, and spots on a
    regular grid inside the image. Counts are negative binomial (gamma-Poisson, dispersion 10) with
    a per-spot library size; for each domain a block of marker genes is 4x more expressed in that
    domain, so image features carry information about expression. The result has the layout of
    :func:`imagene.io.read_legacy_st` followed by :func:`imagene.io.concat`.

    Parameters
    ----------
    n_obs
        Total number of spots, split as evenly as possible across the sections.
    n_vars
        Number of genes. The first ``n_domains * max(1, n_vars // (2 * n_domains))`` genes are
        domain markers (capped at ``n_vars``), the rest are not domain-dependent.
    n_sections
        Number of sections (``obs['section']``: ``"S0"``, ``"S1"``, ...).
    image_px
        Side of each section's square image, in pixels (the image is the full-resolution image).
    microns_per_pixel
        Microns per image pixel, stored in the scalefactors.
    n_domains
        Number of tissue domains per section (``obs['domain']``: ``"domain_0"``, ...).
    seed
        Random seed; the same seed gives the same data.

    Returns
    -------
    AnnData with integer-valued counts in ``X`` and ``layers['counts']`` (float32 CSR, like the
    readers), ``obsm['spatial']`` (pixels, x = column, y = row), ``obs['section']`` and
    ``obs['domain']`` (categorical ground truth), ``obs['array_x'|'array_y']``,
    ``var['marker_of']`` (the domain a gene marks, or ``"none"``) and ``uns['spatial'][section]``
    with ``images['hires']`` (the whole image, ``tissue_hires_scalef`` 1.0), ``scalefactors`` and
    ``metadata`` (``platform='synthetic'``).

    Examples
    --------
    >>> adata = imagene.datasets.synthetic_he_st(n_obs=100, n_vars=30, seed=1)
    >>> adata.obs.groupby("domain", observed=True).size()
    """
    from anndata import AnnData

    from imagene._constants import KEYS
    from imagene.io import concat

    n_obs = _check_int("n_obs", n_obs, 1)
    n_vars = _check_int("n_vars", n_vars, 1)
    n_sections = _check_int("n_sections", n_sections, 1)
    image_px = _check_int("image_px", image_px, 32)
    n_domains = _check_int("n_domains", n_domains, 1)
    seed = _check_int("seed", seed, 0)
    if n_obs < n_sections:
        raise ValueError(f"`n_obs` ({n_obs}) must be at least `n_sections` ({n_sections}): each section needs a spot.")
    if not (np.isfinite(microns_per_pixel) and microns_per_pixel > 0):
        raise ValueError(f"`microns_per_pixel` must be a positive number; got {microns_per_pixel!r}.")

    rng = np.random.default_rng(seed)
    # genes: baseline means and domain markers (shared by all sections)
    base_mu = rng.lognormal(mean=0.0, sigma=1.0, size=n_vars)
    base_mu = base_mu / base_mu.sum() * 400.0  # ~400 counts per average spot
    per_domain = max(1, n_vars // (2 * n_domains))
    marker_of = np.full(n_vars, -1)
    for k in range(n_domains):
        marker_of[k * per_domain : min((k + 1) * per_domain, n_vars)] = k
    domain_names = [f"domain_{k}" for k in range(n_domains)]
    fold = np.ones((n_domains, n_vars))
    for k in range(n_domains):
        fold[k, marker_of == k] = 4.0
    theta = 10.0
    var = pd.DataFrame(
        {"marker_of": pd.Categorical([domain_names[k] if k >= 0 else "none" for k in marker_of],
                                     categories=[*domain_names, "none"])},
        index=[f"gene_{i:0{len(str(n_vars - 1))}d}" for i in range(n_vars)],
    )

    sizes = [n_obs // n_sections + (i < n_obs % n_sections) for i in range(n_sections)]
    section_rngs = rng.spawn(n_sections)
    adatas = {}
    for i, (n, srng) in enumerate(zip(sizes, section_rngs, strict=True)):
        lib = f"S{i}"
        domains = _domain_map(srng, image_px, n_domains)
        img = _paint(srng, domains, n_domains)
        side = math.ceil(math.sqrt(n))
        pitch = image_px / (side + 1)
        gy, gx = np.divmod(np.arange(n), side)
        xy = np.stack([(gx + 1) * pitch, (gy + 1) * pitch], axis=1)  # (x = column, y = row)
        dom = domains[np.floor(xy[:, 1]).astype(int), np.floor(xy[:, 0]).astype(int)]
        libsize = srng.lognormal(0.0, 0.3, size=n)[:, None]
        mu = libsize * base_mu[None] * fold[dom]
        counts = srng.poisson(srng.gamma(shape=theta, scale=mu / theta)).astype(np.float32)
        X = sp.csr_matrix(counts)
        obs = pd.DataFrame(
            {
                "array_x": gx,
                "array_y": gy,
                "domain": pd.Categorical([domain_names[k] for k in dom], categories=domain_names),
            },
            index=[f"spot_{j}" for j in range(n)],
        )
        a = AnnData(X=X, obs=obs, var=var.copy())
        a.layers[KEYS.COUNTS] = X.copy()
        a.obsm[KEYS.SPATIAL] = xy.astype(np.float64)
        a.uns["spatial"] = {
            lib: {
                "images": {"hires": img},
                "scalefactors": {
                    "tissue_hires_scalef": 1.0,
                    "spot_diameter_fullres": float(0.5 * pitch),
                    "microns_per_pixel": float(microns_per_pixel),
                },
                "metadata": {"platform": "synthetic", "source_image_path": "", "source_image_scale": 1.0},
            }
        }
        adatas[lib] = a
    adata = concat(adatas, library_key=KEYS.SECTION)
    adata.var["marker_of"] = var["marker_of"].reindex(adata.var_names)
    logger.info("Made a synthetic H&E + ST dataset: %d spots, %d genes, %d sections, %d domains.",
                adata.n_obs, adata.n_vars, n_sections, n_domains)
    return adata
