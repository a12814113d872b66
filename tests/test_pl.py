"""Figures of imagene.pl on real her2st sections: each renders, returns its Figure, and shows the right numbers."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from sklearn.linear_model import Ridge

import imagene as ig

GENES = ["ERBB2", "GRB7", "KRT19"]
TRAIN, TEST = ["B4", "C2", "C3"], "C4"


def _log1p_cp10k(counts) -> np.ndarray:
    """log1p counts per 10k, by hand (the test's own normalisation, not imagene's)."""
    x = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float64)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)


@pytest.fixture(scope="module")
def predicted(_check_path_adata):
    """Sections B4, C2, C3 train a ridge on the frozen H&E features; C4 gets real predictions (and a bootstrap sd)."""
    adata = _check_path_adata.copy()
    feats = adata.obsm["X_he_efficientnet_lite0"]
    y = _log1p_cp10k(adata.layers["counts"])
    train = adata.obs["section"].isin(TRAIN).to_numpy()
    rng = np.random.default_rng(0)
    fits = []
    for _ in range(5):
        idx = rng.choice(np.flatnonzero(train), train.sum(), replace=True)
        fits.append(Ridge(alpha=100.0).fit(feats[idx], y[idx]).predict(feats).astype(np.float32))
    adata.layers["imagene_predicted"] = np.mean(fits, axis=0)
    adata.layers["imagene_predicted_sd"] = np.std(fits, axis=0)
    return adata


def _tissue_axes(fig: Figure) -> list:
    """Axes that draw spots (colour bars hold other collections)."""
    return [ax for ax in fig.axes if any(isinstance(c, PathCollection) for c in ax.collections)]


def _r(title: str) -> float:
    return float(re.search(r"r = (-?\d+\.\d+)", title).group(1))


def test_predicted_vs_measured_on_the_tissue(predicted):
    fig = ig.pl.predicted_vs_measured(predicted, GENES, library_id=TEST)
    assert isinstance(fig, Figure)
    tissue = _tissue_axes(fig)
    assert len(tissue) == 2 * len(GENES) and len(fig.axes) == 3 * len(GENES)  # + one colour bar per gene
    assert min(fig.get_size_inches()) >= 8  # large panels: 4 inches each
    c4 = predicted[predicted.obs["section"] == TEST]
    cols = predicted.var_names.get_indexer(GENES)
    measured = _log1p_cp10k(c4.layers["counts"])[:, cols]
    pred = np.asarray(c4.layers["imagene_predicted"])[:, cols]
    for j, g in enumerate(GENES):
        top, bottom = tissue[j], tissue[len(GENES) + j]
        assert top.get_title() == f"{g} measured" and bottom.get_title().startswith(f"{g} predicted")
        r = np.corrcoef(measured[:, j], pred[:, j])[0, 1]
        assert _r(bottom.get_title()) == pytest.approx(r, abs=0.006)
        (sc_top,), (sc_bottom,) = top.collections, bottom.collections
        np.testing.assert_allclose(sc_top.get_array(), measured[:, j], rtol=1e-5, atol=1e-6)
        # one colour scale per gene, spanning both panels
        lo, hi = min(measured[:, j].min(), pred[:, j].min()), max(measured[:, j].max(), pred[:, j].max())
        assert sc_top.get_clim() == sc_bottom.get_clim() == pytest.approx((lo, hi), rel=1e-5)
    assert len(tissue[0].images) == 1  # drawn on the H&E image
    plt.close(fig)
    axes = ig.pl.predicted_vs_measured(predicted, GENES, library_id=TEST, return_fig=False)
    assert axes.shape == (2, len(GENES))
    plt.close("all")


def test_predicted_scatter_per_gene(predicted):
    fig = ig.pl.predicted_scatter(predicted, GENES, library_id=TEST, ncols=2)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == len(GENES) and len(fig.axes) == 4  # a 2 x 2 grid, the 4th panel hidden
    c4 = predicted[predicted.obs["section"] == TEST]
    cols = predicted.var_names.get_indexer(GENES)
    measured = _log1p_cp10k(c4.layers["counts"])[:, cols]
    pred = np.asarray(c4.layers["imagene_predicted"])[:, cols]
    for j, ax in enumerate(shown):
        assert ax.get_title().startswith(GENES[j]) and f"n = {c4.n_obs}" in ax.get_title()
        assert _r(ax.get_title()) == pytest.approx(np.corrcoef(measured[:, j], pred[:, j])[0, 1], abs=0.006)
        xy = ax.collections[0].get_offsets()
        np.testing.assert_allclose(xy[:, 0], measured[:, j], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(xy[:, 1], pred[:, j], rtol=1e-5, atol=1e-6)
    plt.close(fig)


def test_uncertainty_on_the_tissue(predicted):
    fig = ig.pl.uncertainty(predicted, GENES[:2], library_id=TEST)
    tissue = _tissue_axes(fig)
    assert len(tissue) == 4
    sd = np.asarray(predicted[predicted.obs["section"] == TEST].layers["imagene_predicted_sd"])
    cols = predicted.var_names.get_indexer(GENES[:2])
    sd_panels = tissue[2:]
    for j, ax in enumerate(sd_panels):
        assert ax.get_title() == f"{GENES[j]} predictive sd"
        np.testing.assert_allclose(ax.collections[0].get_array(), sd[:, cols[j]], rtol=1e-5)
    # one sd scale from 0 for every gene, so uncertainties compare across panels
    clims = {ax.collections[0].get_clim() for ax in sd_panels}
    assert len(clims) == 1 and next(iter(clims)) == pytest.approx((0.0, sd[:, cols].max()), rel=1e-5)
    plt.close(fig)
    no_sd = predicted.copy()
    del no_sd.layers["imagene_predicted_sd"]
    with pytest.raises(KeyError, match="imagene_predicted_sd.*no uncertainty"):
        ig.pl.uncertainty(no_sd, GENES[:1], library_id=TEST)


@pytest.fixture(scope="module")
def trained(_check_path_adata):
    """UMPIRE on the real features of B4, C2, C3 (validation: C3) with early stopping on recall@5 %."""
    adata = _check_path_adata.copy()
    adata = adata[adata.obs["section"].isin(TRAIN)].copy()
    keep = np.asarray(adata.layers["counts"].sum(0)).ravel().argsort()[::-1][:300]
    adata = adata[:, np.sort(keep)].copy()
    ig.model.UMPIRE.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", batch_key="section")
    ig.settings.seed = 0
    model = ig.model.UMPIRE(adata)
    model.train(max_epochs=12, accelerator="cpu", batch_size=128, early_stopping_patience=4)
    return model


def test_history_shows_the_monitored_metric_and_the_restored_epoch(trained, tmp_path):
    hist = trained.history
    monitor = trained.train_monitor_["monitor"]
    assert monitor == "recall5_validation"
    values = hist[monitor].iloc[:, 0].to_numpy(dtype=float)
    best = int(np.argmax(values))  # RestoreBestWeights keeps the first best epoch
    fig = ig.pl.training_history(trained)
    losses, metric = fig.axes
    assert metric.get_ylabel() == monitor
    assert f"restored epoch {best + 1} ({monitor} = {values[best]:.3f})" in metric.get_title()
    for ax in (losses, metric):  # the restored epoch is marked on both panels, counted from 1 as in the log
        vlines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--" and np.ptp(ln.get_xdata()) == 0]
        assert [ln.get_xdata()[0] for ln in vlines] == [best + 1]
    labels = {ln.get_label() for ln in losses.get_lines()}
    assert {"train_loss", "validation_loss"} <= labels
    curve = next(ln for ln in metric.get_lines() if ln.get_label() == monitor)
    np.testing.assert_allclose(curve.get_ydata(), values)
    np.testing.assert_array_equal(curve.get_xdata(), np.arange(1, len(values) + 1))
    plt.close(fig)
    # the record is saved with the model
    trained.save(tmp_path / "m", overwrite=True)
    loaded = ig.model.UMPIRE.load(tmp_path / "m", adata=trained.adata)
    assert loaded.train_monitor_ == trained.train_monitor_
    plt.close(ig.pl.training_history(loaded))
    # the plain curves keep their Axes (and `ax=`)
    ax = ig.pl.history(trained)
    assert [ln.get_label() for ln in ax.get_lines()] == ["train_loss", "validation_loss"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), hist["train_loss"].iloc[:, 0].to_numpy(dtype=float))
    assert isinstance(ig.pl.history(trained, return_fig=True), Figure)
    plt.close("all")


def test_retrieval_examples_show_query_and_match_tiles(trained, data_dir):
    folder = data_dir / "her2st" / TEST
    image = next(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png", ".tif"))
    c4 = ig.io.read_legacy_st(folder / f"{TEST}.tsv.gz", folder / f"{TEST}_selection.tsv", image, library_id=TEST)
    c4 = c4[:60].copy()
    ig.pp.extract_tiles(c4, tile_px=48, show_progress_bar=False)
    ig.pp.embed_tiles(c4, show_progress_bar=False)
    c4 = c4[:, trained.gene_names].copy()
    matches = ig.tl.retrieve(trained, c4, top_n=4)["matches"]
    queries = list(c4.obs_names[:3])
    fig = ig.pl.retrieval_examples(c4, matches, queries=queries, n_matches=4)
    assert len(fig.axes) == 3 * 5
    grid = np.array(fig.axes).reshape(3, 5)
    tiles = c4.obsm["imagene_tiles"]
    for i, q in enumerate(queries):
        np.testing.assert_array_equal(grid[i, 0].images[0].get_array(), tiles[c4.obs_names.get_loc(q)])
        rows = matches[matches["query"] == q].sort_values("rank")
        for j, row in enumerate(rows.itertuples()):
            ax = grid[i, 1 + j]
            title = ax.get_title()
            assert title.startswith(f"#{row.rank} {row.match}") and f"sim {row.similarity:.2f}" in title
            np.testing.assert_array_equal(ax.images[0].get_array(), tiles[c4.obs_names.get_loc(row.match)])
            framed = ax.spines["left"].get_linewidth() == 3
            assert framed == (row.match == q)
    plt.close(fig)


def test_benchmark_bars_are_fold_means_with_std():
    rows = []
    values = {"umpire": [0.31, 0.22, 0.27], "ridge_probe": [0.18, 0.25, 0.2]}
    for method, vals in values.items():
        for fold, v in zip(("B4", "C2", "C3"), vals, strict=True):
            rows += [(method, fold, "pcc_hvg50", v), (method, fold, "mse_hvg50", 1 - v)]
    df = pd.DataFrame(rows, columns=["method", "fold", "metric", "value"])
    fig = ig.pl.benchmark({"expression": df})
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["PCC HVG50", "MSE HVG50"]
    heights = [p.get_height() for p in shown[0].patches]
    np.testing.assert_allclose(heights, [np.mean(values["umpire"]), np.mean(values["ridge_probe"])])
    (errorbars,) = [c for c in shown[0].containers if isinstance(c, ErrorbarContainer)]
    err = errorbars.lines[2][0].get_segments()  # one vertical segment per bar: mean - std to mean + std
    np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in err],
                               [2 * np.std(values["umpire"], ddof=1), 2 * np.std(values["ridge_probe"], ddof=1)])
    plt.close(fig)
    with pytest.raises(ValueError, match="task="):
        ig.pl.benchmark(df)
