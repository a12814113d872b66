"""imagene.bench with context features (ContextRidge, the guards) and with a fixed test set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import imagene as ig
import imagene.bench as bench
from imagene.bench import MeanExpression, Method


@pytest.fixture(scope="module")
def synthetic():
    a = ig.datasets.synthetic_he_st(n_obs=240, n_vars=60, n_sections=3, image_px=384, seed=1)
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=32, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    del a.obsm["imagene_tiles"]
    ig.pp.niches(a, n_neighs=4, library_key="section", niche_expression=False)
    ig.pp.context_matrix(a, ["X_he_tiny"])  # the spot and the mean of its 4 nearest spots
    return a


def _log1p_cp10k(counts) -> np.ndarray:
    x = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float64)
    lib = x.sum(1, keepdims=True)
    lib[lib == 0] = 1
    return np.log1p(x / lib * 1e4)


def _pearson(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    yc, pc = y - y.mean(0), p - p.mean(0)
    return (yc * pc).sum(0) / np.sqrt((yc**2).sum(0) * (pc**2).sum(0))


def test_context_ridge_is_the_ridge_pipeline_on_the_training_sections_context(synthetic):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    a = synthetic
    assert a.obsm["X_he_tiny_context"].shape == (a.n_obs, 64)
    df = bench.run(a, methods=[bench.ContextRidge(n_components=8)], n_genes=10)
    sections = a.obs["section"].astype(str).to_numpy()
    counts = a.layers["counts"].toarray()
    x = a.obsm["X_he_tiny_context"].astype(np.float64)
    for fold in ("S0", "S2"):
        tr, te = sections != fold, sections == fold
        keep = (counts[tr] > 0).mean(0) >= 0.1
        y_tr, y_te = _log1p_cp10k(counts[tr][:, keep]), _log1p_cp10k(counts[te][:, keep])
        hvg = np.argsort(-y_tr.var(0))[:10]
        scaler = StandardScaler().fit(x[tr])
        pca = PCA(8, random_state=0).fit(scaler.transform(x[tr]))
        ridge = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(pca.transform(scaler.transform(x[tr])), y_tr)
        pred = ridge.predict(pca.transform(scaler.transform(x[te])))
        got = df.query("fold == @fold").set_index("metric")["value"]
        assert got["pcc_hvg10"] == pytest.approx(np.nanmean(_pearson(y_te[:, hvg], pred[:, hvg])), rel=1e-4)
    # the neighbours carry the synthetic domains too: above chance on held-out sections
    assert df.query("metric == 'pcc_hvg10'")["value"].mean() > 0.1


def test_context_ridge_on_a_copy_of_the_spot_features_is_the_ridge_probe(synthetic):
    a = synthetic.copy()
    a.obsm["X_he_tiny_copy"] = a.obsm["X_he_tiny"].copy()
    a.uns["X_he_tiny_copy"] = {"context": "matrix", "sources": ["X_he_tiny"]}
    df = bench.run(a, image_key="X_he_tiny", n_genes=10,
                   methods=[bench.RidgeProbe(n_components=8), bench.ContextRidge("X_he_tiny_copy", n_components=8)])
    v = df.query("metric == 'pcc_hvg10'").pivot(index="fold", columns="method", values="value")
    np.testing.assert_allclose(v["context_ridge"], v["ridge_probe"], rtol=1e-6)


def test_guards_accept_context_keys_and_refuse_context_of_fitted_representations(synthetic):
    a = synthetic.copy()
    assert {"X_he_tiny_nbr", "X_he_tiny_context"} <= set(a.obsm)
    # with image_key=None the spot features are found: context keys are not candidates
    df = bench.run(a, methods=[MeanExpression()], n_genes=10)
    assert set(df["fold"]) == {"S0", "S1", "S2"}
    a.obsm["X_pca"] = np.random.default_rng(0).normal(size=(a.n_obs, 5))
    ig.pp.context_matrix(a, ["X_he_tiny", "X_pca"], neighbor_keys=(), key_added="X_he_mixed")
    with pytest.raises(ValueError, match=r"built from 'X_pca'"):
        bench.run(a, image_key="X_he_tiny", methods=[bench.ContextRidge("X_he_mixed")])
    with pytest.raises(KeyError, match=r"context_ridge.*X_he_nothing.*imagene.pp.context_features"):
        bench.run(a, image_key="X_he_tiny", methods=[bench.ContextRidge("X_he_nothing")])


def test_default_methods_skip_context_ridge_without_context(synthetic, monkeypatch):
    from imagene.bench import _runner

    names = [m.name for m in bench.default_methods("expression")]
    assert names.index("context_ridge") == names.index("ridge_probe") + 1
    assert "context_ridge" in [m.name for m in bench.default_methods("retrieval")]
    a = synthetic.copy()
    del a.obsm["X_he_tiny_context"]
    # the default list, cut to two cheap methods, run through `methods=None`
    full = _runner.default_methods
    monkeypatch.setattr(
        _runner, "default_methods", lambda task: [m for m in full(task) if m.name in ("context_ridge", "mean_expression")]
    )
    with pytest.warns(UserWarning, match=r"Skipping 'context_ridge'.*context_matrix"):
        df = bench.run(a, image_key="X_he_tiny", methods=None, n_genes=10)
    assert set(df["method"]) == {"mean_expression"}


class Recorder(Method):
    """Records the sections it is fitted on and the spots it predicts (shared log across deep copies)."""

    name, tasks = "recorder", ("expression",)
    log: list = []

    def fit(self, train, *, ctx):
        self.mean_ = _log1p_cp10k(train.layers[ctx.layer]).mean(0)
        Recorder.log.append(("fit", set(train.obs[ctx.section_key].astype(str)), ctx.test_sections))

    def predict_expression(self, test):
        Recorder.log.append(("predict", set(test.obs["section"].astype(str)), test.n_obs))
        return np.tile(self.mean_, (test.n_obs, 1))


def test_fixed_test_set_is_predicted_from_one_fit_on_the_other_sections(synthetic):
    a = synthetic
    Recorder.log.clear()
    df = bench.run(a, methods=[Recorder(), MeanExpression()], test_sections=["S2", "S0"], n_genes=10)
    assert list(dict.fromkeys(df["fold"])) == ["S2", "S0"]
    fits = [e for e in Recorder.log if e[0] == "fit"]
    assert fits == [("fit", {"S1"}, ("S0", "S2"))]  # one fit, on the only other section
    sections = a.obs["section"].astype(str).to_numpy()
    preds = [e for e in Recorder.log if e[0] == "predict"]
    assert preds == [("predict", {"S2"}, int((sections == "S2").sum())), ("predict", {"S0"}, int((sections == "S0").sum()))]
    # scores of each test section by hand: genes, HVGs and the mean from S1 alone
    counts = a.layers["counts"].toarray()
    tr = sections == "S1"
    keep = (counts[tr] > 0).mean(0) >= 0.1
    y_tr = _log1p_cp10k(counts[tr][:, keep])
    hvg = np.argsort(-y_tr.var(0))[:10]
    for s in ("S0", "S2"):
        y_te = _log1p_cp10k(counts[sections == s][:, keep])
        got = df.query("fold == @s and method == 'mean_expression' and metric == 'mse_hvg10'")["value"].item()
        assert got == pytest.approx(np.mean((y_te[:, hvg] - y_tr.mean(0)[hvg]) ** 2), rel=1e-5)


def test_fixed_test_set_is_checked(synthetic):
    with pytest.raises(ValueError, match="distinct sections"):
        bench.run(synthetic, methods=[MeanExpression()], test_sections=["S9"])
    with pytest.raises(ValueError, match="no training section"):
        bench.run(synthetic, methods=[MeanExpression()], test_sections=["S0", "S1", "S2"])
    with pytest.raises(ValueError, match="split='section'"):
        a = synthetic.copy()
        a.obs["patient"] = a.obs["section"]
        bench.run(a, methods=[MeanExpression()], split="patient", test_sections=["S0"])
    with pytest.raises(ValueError, match="clustering"):
        bench.run(synthetic, task="clustering", label_key="domain", methods=[bench.ExpressionPCA()],
                  test_sections=["S0"])


def test_bench_command_with_context_and_a_fixed_test_section(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = ["--data", str(data_dir / "her2st"), "--encoder", "tiny", "--tile-px", "32", "--quiet",
           "--cache", str(tmp_path / "cache"), "--task", "expression", "--sections", "C3", "C4",
           "--test-sections", "C4", "--context", "--methods", "ridge_probe", "context_ridge", "--out", str(out)]
    assert bench.main(cmd) == 0
    res = json.loads((out / "results.json").read_text())
    records = pd.DataFrame(res["tasks"]["expression"]["records"])
    assert set(records["fold"]) == {"C4"} and set(records["method"]) == {"ridge_probe", "context_ridge"}
    assert res["config"]["test_sections"] == ["C4"] and res["config"]["context"] is True
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert "C3__tiny__32px__context__flips.npz" in cached and "C4__tiny__32px__context__flips.npz" in cached
    # without --context the context ridge is left out, and the command says so
    plain = [c for c in cmd[:-1] if c != "--context"]
    assert bench.main([*plain, str(tmp_path / "plain")]) == 0
    assert "skipping ['context_ridge']" in capsys.readouterr().err
