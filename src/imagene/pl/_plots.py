"""Matplotlib figures of imagene's outputs.

Every function draws a new figure and returns it (``return_fig=True``, the default; ``history``
keeps returning its Axes unless asked) or its axes (``return_fig=False``). None calls
``plt.show()``: in a notebook, ``fig = imagene.pl....(...)`` displays the figure once (a returned
figure left as the cell's last expression is displayed by the cell result as well); in a script,
``fig.savefig(...)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import log_normalize

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: layer of the predictive standard deviation, next to ``layers['imagene_predicted']``
PREDICTED_SD = f"{KEYS.PREDICTED}_sd"


# ------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------
def _library_view(adata: AnnData, library_id: str | None, library_key: str) -> tuple[AnnData, str | None]:
    libs = list(adata.uns.get("spatial", {}))
    if library_id is None:
        if len(libs) != 1 and library_key in adata.obs:
            library_id = str(adata.obs[library_key].astype(str).iloc[0])
        elif libs:
            library_id = libs[0]
    if library_id is not None and library_key in adata.obs and adata.obs[library_key].nunique() > 1:
        mask = (adata.obs[library_key].astype(str) == library_id).to_numpy()
        if not mask.any():
            sections = sorted(adata.obs[library_key].astype(str).unique())
            raise ValueError(f"library_id {library_id!r} not in adata.obs[{library_key!r}] ({sections}).")
        adata = adata[mask]
    return adata, library_id


def _check_genes(adata: AnnData, genes: Sequence[str]) -> list[str]:
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("`genes` is empty; pass the genes to draw, e.g. genes=['ERBB2', 'GRB7'].")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"Genes not in adata.var_names: {missing}.")
    return genes


def _layer(adata: AnnData, layer: str, cols: np.ndarray, hint: str) -> np.ndarray:
    if layer not in adata.layers:
        raise KeyError(f"adata.layers[{layer!r}] not found. {hint}")
    mat = adata.layers[layer][:, cols]
    return np.asarray(mat.toarray() if sp.issparse(mat) else mat, dtype=np.float64)


def _measured(adata: AnnData, counts_layer: str | None, cols: np.ndarray) -> np.ndarray:
    """log1p CP10k of the raw counts (normalised over all genes, then the columns taken)."""
    if counts_layer is not None and counts_layer not in adata.layers:
        raise KeyError(f"adata.layers[{counts_layer!r}] not found. Pass the layer of raw counts as `counts_layer=`.")
    counts = adata.X if counts_layer is None else adata.layers[counts_layer]
    return log_normalize(counts)[:, cols].astype(np.float64)


def _tissue(adata: AnnData, lib: str | None) -> tuple[np.ndarray, Any]:
    """Spot positions in the coordinates of the image drawn (hires when present) and that image."""
    entry = adata.uns.get("spatial", {}).get(lib, {}) if lib is not None else {}
    img = entry.get("images", {}).get("hires")
    scale = float(entry.get("scalefactors", {}).get("tissue_hires_scalef", 1.0))
    if KEYS.SPATIAL not in adata.obsm:
        raise KeyError(f"adata.obsm[{KEYS.SPATIAL!r}] not found: spot positions are needed to draw the tissue.")
    xy = np.asarray(adata.obsm[KEYS.SPATIAL], dtype=np.float64)[:, :2] * (scale if img is not None else 1.0)
    return xy, img


def _spot_size(n: int, panel_size: float) -> float:
    """Marker area (points²) so that spots on a square grid about fill a panel of ``panel_size`` inches."""
    return float((0.45 * panel_size * 72 / max(math.sqrt(max(n, 1)), 1.0)) ** 2)


def _draw_tissue(ax: Axes, xy: np.ndarray, img: Any, values: np.ndarray, *, s: float, **scatter: Any):
    if img is not None:
        ax.imshow(img)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=s, linewidths=0, **scatter)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(xy):
        pad = 0.05 * max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1]), 1.0)
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)  # image rows grow downwards
    return sc


def _tissue_grid(
    adata: AnnData, genes: Sequence[str], layer: str, library_id: str | None, library_key: str,
    spot_size: float | None, panel_size: float,
):
    """The section's spots, predictions, tissue image, marker size, and a 2 x n_genes figure for them."""
    import matplotlib.pyplot as plt

    genes = _check_genes(adata, genes)
    sub, lib = _library_view(adata, library_id, library_key)
    cols = adata.var_names.get_indexer(genes)
    pred = _layer(sub, layer, cols, "Run `imagene.tl.predict_expression(model, adata)` first.")
    xy, img = _tissue(sub, lib)
    s = _spot_size(sub.n_obs, panel_size) if spot_size is None else float(spot_size)
    fig, axes = plt.subplots(
        2, len(genes), figsize=(panel_size * len(genes) + 1.0, 2 * panel_size + 0.6), squeeze=False,
        layout="constrained",
    )
    return genes, sub, lib, cols, pred, xy, img, s, fig, axes


def _pearson(measured: np.ndarray, pred: np.ndarray) -> np.ndarray:
    from imagene.metrics import gene_pearson

    return gene_pearson(measured, pred)


def _r_text(r: float) -> str:
    return "r undefined (constant)" if not np.isfinite(r) else f"r = {r:.2f}"


def _out(fig: Figure, axes: Any, return_fig: bool):
    return fig if return_fig else axes


# ------------------------------------------------------------------------------------------
# expression
# ------------------------------------------------------------------------------------------
def predicted_vs_measured(
    adata: AnnData,
    genes: Sequence[str],
    *,
    layer: str = KEYS.PREDICTED,
    counts_layer: str | None = KEYS.COUNTS,
    library_id: str | None = None,
    library_key: str = KEYS.SECTION,
    spot_size: float | None = None,
    panel_size: float = 4.0,
    cmap: str = "viridis",
    return_fig: bool = True,
) -> Figure | np.ndarray:
    """Measured (top row) and predicted (bottom row) expression of ``genes`` on the tissue.

    Measured values are log-normalised counts (``log1p`` CP10k, the space of the predictions).
    Each gene's two panels share one colour scale (one colour bar), and the title of its
    predicted panel gives the Pearson r over the section's spots.

    Parameters
    ----------
    adata
        AnnData with predictions in ``layers[layer]`` (:func:`imagene.tl.predict_expression`) and
        raw counts in ``layers[counts_layer]``.
    genes
        Genes to show (one column each).
    layer
        Layer of predictions.
    counts_layer
        Layer of raw counts (``None`` for ``X``).
    library_id
        Section to draw (default: the first one of ``obs[library_key]``).
    library_key
        ``obs`` column of sections.
    spot_size
        Marker area in points² (default: spots about fill the panel).
    panel_size
        Side of each panel in inches.
    cmap
        Colour map.
    return_fig
        Return the Figure (default); ``False`` returns the (2, n_genes) array of Axes.

    Returns
    -------
    The Figure, or the Axes with ``return_fig=False``.

    Examples
    --------
    >>> imagene.tl.predict_expression(model, held_out)
    >>> fig = imagene.pl.predicted_vs_measured(held_out, ["ERBB2", "GRB7"], library_id="C4")
    """
    genes, sub, lib, cols, pred, xy, img, s, fig, axes = _tissue_grid(
        adata, genes, layer, library_id, library_key, spot_size, panel_size
    )
    measured = _measured(sub, counts_layer, cols)
    r = _pearson(measured, pred)
    for j, g in enumerate(genes):
        vmin = float(min(measured[:, j].min(), pred[:, j].min()))
        vmax = float(max(measured[:, j].max(), pred[:, j].max()))
        for i, (vals, what) in enumerate(((measured[:, j], "measured"), (pred[:, j], "predicted"))):
            sc = _draw_tissue(axes[i, j], xy, img, vals, s=s, cmap=cmap, vmin=vmin, vmax=vmax)
            axes[i, j].set_title(f"{g} {what}" + (f"\n{_r_text(r[j])}" if i == 1 else ""))
        fig.colorbar(sc, ax=axes[:, j].tolist(), shrink=0.6, label="log1p CP10k")
    fig.suptitle(f"Section {lib}: measured vs predicted from H&E" if lib else "Measured vs predicted from H&E")
    return _out(fig, axes, return_fig)


def predicted_scatter(
    adata: AnnData,
    genes: Sequence[str],
    *,
    layer: str = KEYS.PREDICTED,
    counts_layer: str | None = KEYS.COUNTS,
    library_id: str | None = None,
    library_key: str = KEYS.SECTION,
    ncols: int = 4,
    panel_size: float = 3.0,
    return_fig: bool = True,
) -> Figure | np.ndarray:
    """Predicted against measured expression, one scatter per gene, Pearson r in each title.

    Parameters
    ----------
    adata
        AnnData with predictions in ``layers[layer]`` and raw counts in ``layers[counts_layer]``.
    genes
        Genes to show (one panel each).
    layer
        Layer of predictions (``log1p`` CP10k).
    counts_layer
        Layer of raw counts (``None`` for ``X``); measured values are their ``log1p`` CP10k.
    library_id
        Section to draw; ``None`` with several sections in ``obs[library_key]`` uses every spot.
    library_key
        ``obs`` column of sections.
    ncols
        Panels per row.
    panel_size
        Side of each panel in inches.
    return_fig
        Return the Figure (default); ``False`` returns the Axes of the genes.

    Returns
    -------
    The Figure, or the Axes with ``return_fig=False``.

    Examples
    --------
    >>> fig = imagene.pl.predicted_scatter(held_out, ["ERBB2", "GRB7", "KRT19"])
    """
    import matplotlib.pyplot as plt

    genes = _check_genes(adata, genes)
    sub = adata
    if library_id is not None:
        sub, _ = _library_view(adata, library_id, library_key)
    cols = adata.var_names.get_indexer(genes)
    pred = _layer(sub, layer, cols, "Run `imagene.tl.predict_expression(model, adata)` first.")
    measured = _measured(sub, counts_layer, cols)
    r = _pearson(measured, pred)
    ncols = max(1, min(int(ncols), len(genes)))
    nrows = math.ceil(len(genes) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows), squeeze=False,
                             layout="constrained")
    axes = grid.ravel()
    for j, g in enumerate(genes):
        ax = axes[j]
        ax.scatter(measured[:, j], pred[:, j], s=8, alpha=0.6, linewidths=0)
        lo = min(measured[:, j].min(), pred[:, j].min())
        hi = max(measured[:, j].max(), pred[:, j].max())
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="y = x")
        ax.set_title(f"{g}  ({_r_text(r[j])}, n = {sub.n_obs})", fontsize=10)
        ax.set_xlabel("measured (log1p CP10k)")
        ax.set_ylabel("predicted")
    for ax in axes[len(genes) :]:
        ax.set_visible(False)
    return _out(fig, axes[: len(genes)], return_fig)


def uncertainty(
    adata: AnnData,
    genes: Sequence[str],
    *,
    layer: str = KEYS.PREDICTED,
    sd_layer: str = PREDICTED_SD,
    library_id: str | None = None,
    library_key: str = KEYS.SECTION,
    spot_size: float | None = None,
    panel_size: float = 4.0,
    cmap: str = "viridis",
    sd_cmap: str = "magma",
    return_fig: bool = True,
) -> Figure | np.ndarray:
    """Predicted expression (top row) and its uncertainty (bottom row) on the tissue.

    Parameters
    ----------
    adata
        AnnData with predictions in ``layers[layer]`` and their standard deviation in
        ``layers[sd_layer]`` (same shape; written by models whose predictions carry uncertainty).
    genes
        Genes to show (one column each).
    layer
        Layer of predictions.
    sd_layer
        Layer of the predictive standard deviation.
    library_id, library_key, spot_size, panel_size
        As in :func:`predicted_vs_measured`.
    cmap
        Colour map of the predictions.
    sd_cmap
        Colour map of the standard deviations (one colour scale shared by every gene's sd panel).
    return_fig
        Return the Figure (default); ``False`` returns the (2, n_genes) array of Axes.

    Returns
    -------
    The Figure, or the Axes with ``return_fig=False``.

    Examples
    --------
    >>> fig = imagene.pl.uncertainty(held_out, ["ERBB2", "GRB7"])
    """
    genes, sub, lib, cols, pred, xy, img, s, fig, axes = _tissue_grid(
        adata, genes, layer, library_id, library_key, spot_size, panel_size
    )
    sd = _layer(
        sub, sd_layer, cols,
        "These predictions carry no uncertainty: draw them with `imagene.pl.predicted_vs_measured`, or write the "
        f"predictive standard deviation (same shape as layers[{layer!r}]) to this layer.",
    )
    if (sd < 0).any():
        raise ValueError(f"adata.layers[{sd_layer!r}] has negative values: it must hold standard deviations.")
    sd_max = float(sd.max()) if sd.size else 1.0
    for j, g in enumerate(genes):
        sc = _draw_tissue(axes[0, j], xy, img, pred[:, j], s=s, cmap=cmap)
        axes[0, j].set_title(f"{g} predicted")
        fig.colorbar(sc, ax=axes[0, j], shrink=0.7, label="log1p CP10k")
        sc_sd = _draw_tissue(axes[1, j], xy, img, sd[:, j], s=s, cmap=sd_cmap, vmin=0.0, vmax=sd_max)
        axes[1, j].set_title(f"{g} predictive sd")
    fig.colorbar(sc_sd, ax=axes[1, :].tolist(), shrink=0.7, label="sd (log1p CP10k)")
    fig.suptitle(f"Section {lib}: prediction and uncertainty" if lib else "Prediction and uncertainty")
    return _out(fig, axes, return_fig)


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def _series(hist: Mapping[str, Any], key: str) -> pd.Series:
    h = hist[key]
    s = h.iloc[:, 0] if isinstance(h, pd.DataFrame) else pd.Series(h)
    return s.astype(float)


def training_history(
    model: Any,
    *,
    keys: Sequence[str] | None = None,
    monitor: str | None = None,
    return_fig: bool = True,
) -> Figure | np.ndarray:
    """Training curves, the metric early stopping watched, and the epoch whose weights were kept.

    The left panel shows the losses; the right one the monitored validation metric (from
    ``model.train_monitor_``, set by training) with the restored epoch marked on both panels, so
    the figure and the log line "Restored the weights of epoch N" agree. Epochs are counted from 1
    as in that log line.

    Parameters
    ----------
    model
        A trained model (``model.history``: per-epoch values by name).
    keys
        Curves for the left panel (default: the losses found, ``train_loss``,
        ``validation_loss``, ...).
    monitor
        Metric for the right panel (default: the one training monitored).
    return_fig
        Return the Figure (default); ``False`` returns the Axes.

    Returns
    -------
    The Figure, or the Axes with ``return_fig=False``.

    Examples
    --------
    >>> model.train(max_epochs=100)
    >>> fig = imagene.pl.training_history(model)
    """
    import matplotlib.pyplot as plt

    hist = getattr(model, "history", None) or {}
    if not hist:
        raise KeyError("model.history is empty. Train the model first (`model.train()`).")
    record = getattr(model, "train_monitor_", None) or {}
    monitor = monitor or record.get("monitor")
    if keys is None:
        keys = [k for k in hist if "loss" in k and k != monitor]
    found = [k for k in keys if k in hist]
    if not found and monitor is None:
        raise KeyError(f"None of {list(keys)} in model.history ({sorted(hist)}). Pass `keys=` from these names.")
    if monitor is not None and monitor not in hist:
        raise KeyError(f"{monitor!r} not in model.history ({sorted(hist)}); it was not logged during training.")
    n_panels = int(bool(found)) + int(monitor is not None)
    fig, axes = plt.subplots(1, n_panels, figsize=(5.0 * n_panels, 3.6), squeeze=False, layout="constrained")
    axes = axes.ravel()
    restored = record.get("restored_epoch") if record.get("monitor") == monitor else None
    if found:
        ax = axes[0]
        for k in found:
            s = _series(hist, k)
            ax.plot(np.asarray(s.index) + 1, s.to_numpy(), label=k, marker="o", ms=2.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title("losses")
        ax.legend(fontsize=8)
    if monitor is not None:
        ax = axes[-1]
        s = _series(hist, monitor)
        ax.plot(np.asarray(s.index) + 1, s.to_numpy(), color="C2", marker="o", ms=2.5, label=monitor)
        ax.set_xlabel("epoch")
        ax.set_ylabel(monitor)
        mode = record.get("mode", "")
        title = f"{monitor}" + (f" ({mode}; early stopping)" if record.get("early_stopping") else "")
        if restored is not None:
            value = float(s.loc[restored]) if restored in s.index else record.get("best_value")
            title += f"\nrestored epoch {restored + 1} ({monitor} = {value:.3f})"
            ax.plot([restored + 1], [value], marker="*", ms=12, color="C3", ls="none", label="restored")
        else:
            title += "\nweights of the last epoch kept"
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    if restored is not None:
        for ax in axes:
            ax.axvline(restored + 1, color="C3", ls="--", lw=1)
    return _out(fig, axes, return_fig)


def history(
    model: Any,
    *,
    keys: Sequence[str] = ("train_loss", "validation_loss"),
    ax: Axes | None = None,
    return_fig: bool = False,
) -> Axes | Figure:
    """Training curves from ``model.history`` on one Axes (one line per key found).

    :func:`training_history` shows the metric early stopping watched and the epoch whose
    weights were kept as well.

    Parameters
    ----------
    model
        A trained model.
    keys
        History entries to draw (e.g. ``'top1_validation'``).
    ax
        Axes to draw on (default: a new figure).
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    The Axes (the Figure with ``return_fig=True``).

    Examples
    --------
    >>> ax = imagene.pl.history(model, keys=["train_loss", "validation_loss"])
    """
    import matplotlib.pyplot as plt

    hist = getattr(model, "history", None) or {}
    found = [k for k in keys if k in hist]
    if not found:
        raise KeyError(f"None of {list(keys)} in model.history ({sorted(hist)}). Train the model first.")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    for k in found:
        s = _series(hist, k)
        ax.plot(np.asarray(s.index) + 1, s.to_numpy(), label=k, marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.legend()
    return ax.figure if return_fig else ax


# ------------------------------------------------------------------------------------------
# retrieval
# ------------------------------------------------------------------------------------------
def retrieval_examples(
    adata: AnnData,
    matches: pd.DataFrame,
    *,
    queries: Sequence[str] | int = 4,
    n_matches: int = 5,
    reference: AnnData | None = None,
    tiles_key: str = KEYS.TILES,
    panel_size: float = 1.8,
    return_fig: bool = True,
) -> Figure | np.ndarray:
    """Query tiles next to the tiles of their top matches (one row per query).

    A match framed in green is the query's own spot (a correct retrieval).

    Parameters
    ----------
    adata
        AnnData of the queries with their tiles in ``obsm[tiles_key]``.
    matches
        Columns ``query``, ``rank``, ``match``, ``similarity`` (obs names), as in
        ``imagene.tl.retrieve(model, adata, top_n=5)["matches"]``.
    queries
        Obs names of the queries to show, or how many (the first ones in ``matches``).
    n_matches
        Matches per query (the best ranks).
    reference
        AnnData of the matches (default: ``adata``).
    tiles_key
        ``obsm`` key of the uint8 tiles (:func:`imagene.pp.extract_tiles`).
    panel_size
        Side of each tile panel in inches.
    return_fig
        Return the Figure (default); ``False`` returns the (n_queries, 1 + n_matches) Axes.

    Returns
    -------
    The Figure, or the Axes with ``return_fig=False``.

    Examples
    --------
    >>> res = imagene.tl.retrieve(model, held_out, top_n=5)
    >>> fig = imagene.pl.retrieval_examples(held_out, res["matches"], queries=3)
    """
    import matplotlib.pyplot as plt

    reference = adata if reference is None else reference
    needed = {"query", "rank", "match", "similarity"}
    if not isinstance(matches, pd.DataFrame) or needed - set(matches.columns):
        raise KeyError(
            f"`matches` needs columns {sorted(needed)}; pass `imagene.tl.retrieve(model, adata, top_n=5)['matches']`."
        )
    for name, a in (("adata", adata), ("reference", reference)):
        if tiles_key not in a.obsm:
            raise KeyError(f"{name}.obsm[{tiles_key!r}] not found. Run `imagene.pp.extract_tiles({name})` first.")
    if isinstance(queries, int | np.integer):
        queries = list(dict.fromkeys(matches["query"]))[: int(queries)]
    queries = [str(q) for q in queries]
    unknown = [q for q in queries if q not in set(matches["query"].astype(str))]
    if unknown or not queries:
        raise ValueError(f"Queries {unknown or queries} have no rows in `matches`.")
    q_pos = adata.obs_names.get_indexer(queries)
    if (q_pos < 0).any():
        raise KeyError(f"Queries not in adata.obs_names: {[q for q, p in zip(queries, q_pos, strict=True) if p < 0]}.")
    fig, axes = plt.subplots(
        len(queries), 1 + n_matches, figsize=(panel_size * (1 + n_matches), panel_size * len(queries) + 0.4),
        squeeze=False, layout="constrained",
    )
    tiles, ref_tiles = adata.obsm[tiles_key], reference.obsm[tiles_key]
    for i, (q, qp) in enumerate(zip(queries, q_pos, strict=True)):
        rows = matches[matches["query"].astype(str) == q].sort_values("rank").head(n_matches)
        axes[i, 0].imshow(np.asarray(tiles[qp]))
        axes[i, 0].set_title(f"query {q}", fontsize=8)
        for j in range(n_matches):
            ax = axes[i, 1 + j]
            if j < len(rows):
                row = rows.iloc[j]
                mp = reference.obs_names.get_loc(str(row["match"]))
                ax.imshow(np.asarray(ref_tiles[mp]))
                ax.set_title(f"#{int(row['rank'])} {row['match']}\nsim {float(row['similarity']):.2f}", fontsize=7)
                if str(row["match"]) == q and reference is adata:
                    for spine in ax.spines.values():
                        spine.set_edgecolor("tab:green")
                        spine.set_linewidth(3)
            else:
                ax.set_visible(False)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Retrieval: query tile and the tiles of its top matches")
    return _out(fig, axes, return_fig)


# ------------------------------------------------------------------------------------------
# benchmark
# ------------------------------------------------------------------------------------------
def benchmark(results: pd.DataFrame | Mapping[str, pd.DataFrame], task: str | None = None, *,
              return_fig: bool = True) -> Figure | np.ndarray:
    """Bars of the benchmark's headline metrics: mean over folds per method, error bars ± std.

    Parameters
    ----------
    results
        Tidy results of :func:`imagene.bench.run` (columns ``method``, ``fold``, ``metric``,
        ``value``), or a mapping of task to such results (then ``task`` picks one).
    task
        ``'expression'``, ``'retrieval'`` or ``'clustering'`` (which metrics are headline); with
        one task in a mapping it may be left out.
    return_fig
        Return the Figure (default); ``False`` returns the Axes of the metrics.

    Returns
    -------
    The Figure (one panel per metric), or its visible Axes with ``return_fig=False``.

    Examples
    --------
    >>> df = imagene.bench.run(adata, task="expression")
    >>> fig = imagene.pl.benchmark(df, "expression")
    """
    from imagene.bench._report import plot_results

    if isinstance(results, Mapping):
        if task is None:
            if len(results) != 1:
                raise ValueError(f"`results` holds tasks {sorted(results)}: pass `task=` to pick one.")
            task = next(iter(results))
        if task not in results:
            raise KeyError(f"Task {task!r} not in `results` ({sorted(results)}).")
        results = results[task]
    if task is None:
        raise ValueError("Pass `task=` ('expression', 'retrieval' or 'clustering'): it sets the headline metrics.")
    fig = plot_results(results, task)
    return _out(fig, [ax for ax in fig.axes if ax.get_visible()], return_fig)
