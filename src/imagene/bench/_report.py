"""Results of the benchmark as JSON, markdown tables and bar plots with error bars."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from imagene.bench._tasks import RECALL_PERCENTS

#: headline metrics of each task, in display order (regular expressions over metric names)
HEADLINE: dict[str, tuple[str, ...]] = {
    "expression": (r"pcc_hvg\d+", r"pcc_heg\d+", r"mse_hvg\d+", r"mse_heg\d+"),
    "retrieval": tuple(f"recall{k}_{d}" for k in RECALL_PERCENTS for d in ("i2g", "g2i")),
    "clustering": ("ari_leiden", "nmi_leiden", "ari_kmeans", "nmi_kmeans"),
}


def _title(metric: str) -> str:
    m = re.fullmatch(r"(pcc|mse)_(hvg|heg)(\d+)", metric)
    if m:
        return f"{m.group(1).upper()} {m.group(2).upper()}{m.group(3)}"
    m = re.fullmatch(r"recall(\d+)_(i2g|g2i)", metric)
    if m:
        return f"R@{m.group(1)}% {'img→gene' if m.group(2) == 'i2g' else 'gene→img'}"
    m = re.fullmatch(r"(ari|nmi)_(leiden|kmeans)", metric)
    if m:
        return f"{m.group(1).upper()} {'k-means' if m.group(2) == 'kmeans' else m.group(2)}"
    return metric


def _headline(df: pd.DataFrame, task: str) -> dict[str, str]:
    """``{metric: title}`` of the task's headline metrics present in ``df``, in display order."""
    present = list(dict.fromkeys(df["metric"]))
    out = {}
    for pattern in HEADLINE.get(task, ()):
        for metric in present:
            if re.fullmatch(pattern, metric):
                out[metric] = _title(metric)
    return out


def _fmt(v: float) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _cell(mean: float, std: float, undefined: float | None) -> str:
    if mean is None or not math.isfinite(mean):
        return "undefined" if undefined else "–"
    text = _fmt(mean) if std is None or not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"
    if undefined:
        text += f" ({undefined:g} undef.)"
    return text


def _fold_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and number of folds of each method and metric (the numbers behind :func:`summarize`)."""
    missing = {"method", "fold", "metric", "value"} - set(df.columns)
    if missing:
        raise KeyError(f"df lacks columns {sorted(missing)}; pass the DataFrame returned by imagene.bench.run.")
    order = list(dict.fromkeys(df["method"]))
    metrics = list(dict.fromkeys(df["metric"]))
    g = df.groupby(["method", "metric"], sort=False)["value"]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n_folds": g.count()}).reset_index()
    out["method"] = pd.Categorical(out["method"], categories=order)
    out["metric"] = pd.Categorical(out["metric"], categories=metrics)
    out = out.sort_values(["method", "metric"]).reset_index(drop=True)
    out["method"] = out["method"].astype(str)
    out["metric"] = out["metric"].astype(str)
    return out


def summarize(df: pd.DataFrame, task: str | None = None) -> pd.DataFrame:
    """Mean ± standard deviation of each method and metric over folds: as numbers, or as a display table.

    Parameters
    ----------
    df
        Tidy results of :func:`imagene.bench.run`.
    task
        ``None``: every metric, as numbers. A task (``'expression'``, ``'retrieval'``,
        ``'clustering'``): the display table of that task's headline metrics.

    Returns
    -------
    With ``task=None``, a DataFrame with columns ``method``, ``metric``, ``mean``, ``std`` (sample
    std over folds; NaN for one fold) and ``n_folds`` (folds where the value is defined), methods
    in their order of ``df``. With a task, a DataFrame of strings (``'mean ± std'``) indexed by
    method, one column per headline metric and ``'s / fold'``; undefined Pearson r (constant
    predictions) shows as ``'undefined'``, and a mean over genes that skipped some undefined ones
    says how many.

    Examples
    --------
    >>> df = imagene.bench.run(adata)
    >>> imagene.bench.summarize(df)  # numbers
    >>> imagene.bench.summarize(df, "expression")  # the table the command prints
    """
    if task is None:
        return _fold_stats(df)
    return _summary_table(df, task)


def summary_table(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Deprecated alias of ``imagene.bench.summarize(df, task)`` (FutureWarning); returns its display table."""
    import warnings

    warnings.warn(
        "imagene.bench.summary_table(df, task) is deprecated; use imagene.bench.summarize(df, task).",
        FutureWarning,
        stacklevel=2,
    )
    return summarize(df, task)


def _summary_table(df: pd.DataFrame, task: str) -> pd.DataFrame:
    s = _fold_stats(df)
    stats = {(r.method, r.metric): (r.mean, r.std) for r in s.itertuples()}
    methods = list(dict.fromkeys(df["method"]))
    shown = _headline(df, task)
    table = {}
    for m in methods:
        row = {}
        for metric, title in shown.items():
            if (m, metric) not in stats:
                continue
            mean, std = stats[(m, metric)]
            undefined = None
            if metric.startswith("pcc_"):
                undefined = stats.get((m, metric.replace("pcc_", "undefined_")), (None, None))[0]
            row[title] = _cell(mean, std, undefined)
        if (m, "seconds") in stats:
            row["s / fold"] = f"{stats[(m, 'seconds')][0]:.0f}"
        table[m] = row
    out = pd.DataFrame.from_dict(table, orient="index")
    out.index.name = "method"
    return out


def per_fold_table(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """The headline metrics of every method and fold (numbers rounded to 3 decimals).

    Parameters
    ----------
    df
        Tidy results of :func:`imagene.bench.run`.
    task
        The task of ``df``.

    Returns
    -------
    DataFrame indexed by (method, fold), one column per headline metric.

    Examples
    --------
    >>> imagene.bench.per_fold_table(imagene.bench.run(adata), "expression")
    """
    shown = _headline(df, task)
    sub = df[df["metric"].isin(list(shown))]
    wide = sub.pivot_table(index=["method", "fold"], columns="metric", values="value", sort=False, dropna=False)
    wide = wide[[m for m in shown if m in wide.columns]].rename(columns=shown)
    methods = list(dict.fromkeys(df["method"]))
    wide = wide.reindex(sorted(wide.index, key=lambda ix: (methods.index(ix[0]), str(ix[1]))))
    return wide.round(3)


def _markdown(table: pd.DataFrame) -> str:
    cols = [table.index.name or "", *map(str, table.columns)] if not isinstance(table.index, pd.MultiIndex) else [
        *table.index.names, *map(str, table.columns)
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for ix, row in table.iterrows():
        keys = list(ix) if isinstance(ix, tuple) else [ix]
        vals = [v if isinstance(v, str) else _fmt(v) for v in row.tolist()]
        lines.append("| " + " | ".join([*map(str, keys), *vals]) + " |")
    return "\n".join(lines)


def plot_results(df: pd.DataFrame, task: str):
    """Bar plot of the task's headline metrics: mean over folds per method, error bars ± std.

    Parameters
    ----------
    df, task
        Tidy results of :func:`imagene.bench.run` and their task, as for :func:`per_fold_table`.

    Returns
    -------
    The matplotlib Figure (one panel per metric).

    Examples
    --------
    >>> fig = imagene.bench.plot_results(df, "expression"); fig.savefig("expression.png")
    """
    import matplotlib.pyplot as plt
    import numpy as np

    s = _fold_stats(df)
    shown = _headline(df, task)
    metrics = [m for m in shown if m in set(s["metric"])]
    methods = list(dict.fromkeys(df["method"]))
    n = max(1, len(metrics))
    ncols = 2 if n == 4 else min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, metric in zip(axes.ravel(), metrics, strict=False):
        sub = s[s["metric"] == metric].set_index("method").reindex(methods)
        x = np.arange(len(methods))
        means = sub["mean"].to_numpy(dtype=float)
        stds = np.nan_to_num(sub["std"].to_numpy(dtype=float))
        ax.bar(x, np.nan_to_num(means), yerr=stds, capsize=3, color=[colours(i % 10) for i in range(len(methods))])
        for i, v in enumerate(means):
            if not np.isfinite(v):
                ax.text(i, 0, "undef.", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(x, methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(shown[metric], fontsize=10)
        ax.axhline(0, color="k", lw=0.5)
    for ax in axes.ravel()[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle(f"imagene bench: {task} (mean ± std over folds)", fontsize=11)
    fig.tight_layout()
    return fig


def write_results(
    results: Mapping[str, pd.DataFrame], out: str | os.PathLike, *, config: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``<task>.csv`` and ``<task>.png`` for each task.

    Parameters
    ----------
    results
        Tidy results of :func:`imagene.bench.run`, by task.
    out
        Output folder (created).
    config
        Settings recorded in ``results.json`` (data, sections, encoder, timings, ...).

    Returns
    -------
    Paths written, by name.

    Examples
    --------
    >>> imagene.bench.write_results({"expression": df}, "bench_out", config={"sections": ["B4", "C2"]})
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    payload: dict[str, Any] = {"config": dict(config or {}), "tasks": {}}
    md = ["# imagene bench results", ""]
    for task, df in results.items():
        s = _fold_stats(df)
        payload["tasks"][task] = {
            "records": json.loads(df.to_json(orient="records")),
            "summary": json.loads(s.to_json(orient="records")),
        }
        md += [f"## {task}", "", "Mean ± std over folds:", "", _markdown(_summary_table(df, task)), ""]
        md += ["Per fold:", "", _markdown(per_fold_table(df, task)), ""]
        csv = out / f"{task}.csv"
        df.to_csv(csv, index=False)
        written[f"{task}_csv"] = csv
        fig = plot_results(df, task)
        png = out / f"{task}.png"
        fig.savefig(png, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written[f"{task}_png"] = png
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text("\n".join(md))
    written["json"] = out / "results.json"
    written["markdown"] = out / "results.md"
    return written
