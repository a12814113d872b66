"""Matplotlib figures for model outputs (return the Figure / Axes; never call ``plt.show``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import log_normalize

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _library_view(adata: AnnData, library_id: str | None, library_key: str) -> tuple[AnnData, str]:
    libs = list(adata.uns.get("spatial", {}))
    if library_id is None:
        if len(libs) != 1 and library_key in adata.obs:
            library_id = str(adata.obs[library_key].astype(str).iloc[0])
        elif libs:
            library_id = libs[0]
    if library_id is not None and library_key in adata.obs and adata.obs[library_key].nunique() > 1:
        adata = adata[adata.obs[library_key].astype(str) == library_id]
    return adata, library_id


def predicted_vs_measured(
    adata: AnnData,
    genes: Sequence[str],
    *,
    layer: str = KEYS.PREDICTED,
    counts_layer: str | None = KEYS.COUNTS,
    library_id: str | None = None,
    library_key: str = KEYS.SECTION,
    spot_size: float | None = None,
    cmap: str = "viridis",
) -> Figure:
    """Measured (top row) and predicted (bottom row) expression of ``genes`` on the tissue image.

    Measured values are log-normalised counts (``log1p`` CP10k, as the predictions); each gene
    shares one colour scale between its two panels and its Pearson r is printed in the title.

    Parameters
    ----------
    adata
        AnnData with predictions in ``layers[layer]`` and raw counts in ``layers[counts_layer]``.
    genes
        Genes to show.
    layer
        Layer of predictions.
    counts_layer
        Layer of raw counts (``None`` for ``X``).
    library_id
        Section to draw (needed when ``adata`` holds several).
    library_key
        ``obs`` column of sections.
    spot_size
        Marker size in points² (default from the spot diameter).
    cmap
        Colour map.

    Returns
    -------
    The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from imagene.metrics import gene_pearson

    if layer not in adata.layers:
        raise KeyError(f"adata.layers[{layer!r}] not found. Run `imagene.tl.predict_expression(model, adata)` first.")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"Genes not in adata.var_names: {missing}.")
    sub, lib = _library_view(adata, library_id, library_key)
    cols = adata.var_names.get_indexer(list(genes))
    counts = sub.X if counts_layer is None else sub.layers[counts_layer]
    measured = log_normalize(counts)[:, cols]
    pred = np.asarray(sub.layers[layer][:, cols].toarray() if sp.issparse(sub.layers[layer]) else sub.layers[layer][:, cols])
    r = gene_pearson(measured, pred)
    entry = adata.uns.get("spatial", {}).get(lib, {}) if lib is not None else {}
    img = entry.get("images", {}).get("hires")
    scale = float(entry.get("scalefactors", {}).get("tissue_hires_scalef", 1.0))
    xy = np.asarray(sub.obsm[KEYS.SPATIAL])[:, :2] * (scale if img is not None else 1.0)
    fig, axes = plt.subplots(2, len(genes), figsize=(3.2 * len(genes), 6.4), squeeze=False)
    if spot_size is None:
        spot_size = 12.0
    for j, g in enumerate(genes):
        vmin = min(measured[:, j].min(), pred[:, j].min())
        vmax = max(measured[:, j].max(), pred[:, j].max())
        for i, (vals, name) in enumerate(((measured[:, j], "measured"), (pred[:, j], "predicted"))):
            ax: Axes = axes[i, j]
            if img is not None:
                ax.imshow(img)
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=vals, s=spot_size, cmap=cmap, vmin=vmin, vmax=vmax, linewidths=0)
            if img is None:
                ax.invert_yaxis()
                ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if img is not None and len(xy):
                pad = 0.05 * max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1]), 1.0)
                ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
                ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
            ax.set_title(f"{g} {name}" + (f"\nr = {r[j]:.2f}" if i == 1 else ""), fontsize=9)
        fig.colorbar(sc, ax=axes[:, j].tolist(), shrink=0.6, label="log1p CP10k")
    fig.suptitle(f"Section {lib}: measured vs predicted from H&E" if lib else "Measured vs predicted from H&E")
    return fig


def history(model: Any, *, keys: Sequence[str] = ("train_loss", "validation_loss"), ax: Axes | None = None) -> Axes:
    """Plot training curves from ``model.history`` (one line per key found).

    Parameters
    ----------
    model
        A trained model.
    keys
        History entries to draw (e.g. ``'top1_validation'``).
    ax
        Axes to draw on.

    Returns
    -------
    The Axes.
    """
    import matplotlib.pyplot as plt

    hist = getattr(model, "history", None) or {}
    found = [k for k in keys if k in hist]
    if not found:
        raise KeyError(f"None of {list(keys)} in model.history ({sorted(hist)}). Train the model first.")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    for k in found:
        h = hist[k]
        ax.plot(h.index, h.iloc[:, 0].astype(float), label=k, marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.legend()
    return ax
