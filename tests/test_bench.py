"""imagene.bench: the split guards, what methods may see, the scores, the methods, and the command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import imagene as ig
import imagene.bench as bench
from imagene.bench import FoldContext, MeanExpression, Method

FAST_UMPIRE = {
    "model_kwargs": {"n_hidden": 32, "n_latent": 8, "dropout": 0.1},
    "train_kwargs": {"batch_size": 64, "accelerator": "cpu", "early_stopping_patience": 3},
}


@pytest.fixture(scope="module")
def synthetic():
    a = ig.datasets.synthetic_he_st(n_obs=240, n_vars=60, n_sections=3, image_px=384, seed=1)
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=32, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    del a.obsm["imagene_tiles"]
    return a


def _log1p_cp10k(counts) -> np.ndarray:
    """Written out here so expected values do not come from the code under test."""
    x = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float64)
    lib = x.sum(1, keepdims=True)
    lib[lib == 0] = 1
    return np.log1p(x / lib * 1e4)


class Spy(Method):
    """Records what the runner hands to a method (the log is shared by the runner's deep copies)."""

    name, tasks, clustering_modalities = "spy", ("expression", "retrieval", "clustering"), ("gene",)
    log: list = []

    def fit(self, train, *, ctx):
        self.ctx_ = ctx
        self.mean_ = _log1p_cp10k(train.layers[ctx.layer]).mean(0)
        Spy.log.append({"stage": "fit", "ctx": ctx, "obs_names": list(train.obs_names), "obs": list(train.obs.columns),
                        "sections": set(train.obs[ctx.library_key].astype(str)), "var": list(train.var_names)})

    def predict_expression(self, test):
        Spy.log.append(
            {"stage": "predict", "nnz": test.X.nnz, "layers": list(test.layers), "obs_names": list(test.obs_names)}
        )
        return np.tile(self.mean_, (test.n_obs, 1))

    def embed(self, adata, modality):
        Spy.log.append({"stage": "embed", "obs": list(adata.obs.columns)})
        return _log1p_cp10k(adata.layers[self.ctx_.layer])


# ------------------------------------------------------------------------------------------
# split guards
# ------------------------------------------------------------------------------------------
def test_spot_split_of_several_sections_is_refused(synthetic):
    with pytest.raises(ValueError, match="split='section'"):
        bench.run(synthetic, split="spot", methods=[MeanExpression()])
    with pytest.raises(ValueError, match="split"):
        bench.run(synthetic, split="random", methods=[MeanExpression()])


def test_spot_split_of_one_section_warns_and_uses_disjoint_folds(synthetic):
    one = synthetic[synthetic.obs["section"] == "S0"].copy()
    Spy.log.clear()
    with pytest.warns(UserWarning, match="optimistic"):
        df = bench.run(one, split="spot", methods=[Spy()], n_spot_folds=4)
    assert df["fold"].nunique() == 4
    fits = [e for e in Spy.log if e["stage"] == "fit"]
    preds = [e for e in Spy.log if e["stage"] == "predict"]
    for f, p in zip(fits, preds, strict=True):
        assert not set(f["obs_names"]) & set(p["obs_names"])
    assert sorted(n for p in preds for n in p["obs_names"]) == sorted(one.obs_names)


def test_leave_one_section_out_shows_methods_training_data_only(synthetic):
    Spy.log.clear()
    df = bench.run(synthetic, methods=[Spy()], n_genes=10)
    assert sorted(df["fold"].unique()) == ["S0", "S1", "S2"]
    fits = [e for e in Spy.log if e["stage"] == "fit"]
    preds = [e for e in Spy.log if e["stage"] == "predict"]
    sections = synthetic.obs["section"].astype(str)
    for f, p in zip(fits, preds, strict=True):
        ctx: FoldContext = f["ctx"]
        assert f["sections"] == {"S0", "S1", "S2"} - {ctx.fold}
        assert set(f["obs_names"]) == set(synthetic.obs_names[(sections != ctx.fold).to_numpy()])
        # held-out spots come without expression
        assert p["nnz"] == 0 and p["layers"] == []
        assert set(p["obs_names"]) == set(synthetic.obs_names[(sections == ctx.fold).to_numpy()])
        # genes and gene sets are chosen on the training spots only
        train = synthetic[(sections != ctx.fold).to_numpy()]
        counts = train.layers["counts"].toarray()
        expected_genes = synthetic.var_names[(counts > 0).mean(0) >= 0.1]
        assert list(ctx.genes) == list(expected_genes) == f["var"]
        y = _log1p_cp10k(counts[:, (counts > 0).mean(0) >= 0.1])
        assert set(ctx.hvg) == set(np.argsort(-y.var(0))[:10])
        assert set(ctx.heg) == set(np.argsort(-y.mean(0))[:10])


def test_patient_split_holds_out_every_section_of_a_patient(synthetic):
    a = synthetic.copy()
    a.obs["patient"] = a.obs["section"].astype(str).map({"S0": "P", "S1": "P", "S2": "Q"})
    Spy.log.clear()
    df = bench.run(a, split="patient", methods=[Spy()])
    assert sorted(df["fold"].unique()) == ["patient P", "patient Q"]
    fits = {e["ctx"].fold: e["sections"] for e in Spy.log if e["stage"] == "fit"}
    assert fits == {"patient P": {"S2"}, "patient Q": {"S0", "S1"}}
    with pytest.raises(KeyError, match="patient"):
        bench.run(synthetic, split="patient", methods=[Spy()], patient_key="donor")


# ------------------------------------------------------------------------------------------
# leakage guards
# ------------------------------------------------------------------------------------------
_FULL = {}


class Peeker(Method):
    """Fits on data it was not given: the runner must notice."""

    name, tasks = "peeker", ("expression",)

    def fit(self, train, *, ctx):
        self.data_ = _FULL["adata"]
        self.mean_ = np.zeros(len(ctx.genes))

    def predict_expression(self, test):
        return np.tile(self.mean_, (test.n_obs, 1))


class Holder(Method):
    name, tasks = "holder", ("expression",)

    def __init__(self, adata=None, scaler=None):
        self.adata, self.scaler = adata, scaler


def test_method_fitted_on_test_spots_is_caught(synthetic):
    _FULL["adata"] = synthetic
    with pytest.raises(RuntimeError, match="held-out fold"):
        bench.run(synthetic, methods=[Peeker()])


def test_methods_carrying_data_or_fitted_preprocessing_are_refused(synthetic):
    from sklearn.preprocessing import StandardScaler

    with pytest.raises(ValueError, match="holds an AnnData"):
        bench.run(synthetic, methods=[Holder(adata=synthetic)])
    fitted = StandardScaler().fit(synthetic.obsm["X_he_tiny"])
    with pytest.raises(ValueError, match="already fitted StandardScaler"):
        bench.run(synthetic, methods=[Holder(scaler={"step": fitted})])
    with pytest.raises(TypeError, match="Method"):
        bench.run(synthetic, methods=[object()])


def test_inputs_fitted_on_all_spots_and_ambiguous_names_are_refused(synthetic):
    a = synthetic.copy()
    a.obsm["X_pca"] = np.zeros((a.n_obs, 5))
    with pytest.raises(ValueError, match="fitted on all spots"):
        bench.run(a, image_key="X_pca", methods=[MeanExpression()])
    b = synthetic.copy()
    b.obs_names = ["spot"] * b.n_obs
    with pytest.raises(ValueError, match="not unique"):
        bench.run(b, methods=[MeanExpression()])
    with pytest.raises(ValueError, match="does not take part"):
        bench.run(synthetic, task="retrieval", methods=[MeanExpression()])
    with pytest.raises(KeyError, match="sect"):
        bench.run(synthetic, library_key="sect", methods=[MeanExpression()])
    # the old name of the keyword still works, with a FutureWarning
    with pytest.warns(FutureWarning, match="library_key"), pytest.raises(KeyError, match="sect"):
        bench.run(synthetic, section_key="sect", methods=[MeanExpression()])


# ------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------
def test_expression_scores_of_the_mean_floor_by_hand(synthetic):
    df = bench.run(synthetic, methods=[MeanExpression()], n_genes=10)
    with pytest.warns(FutureWarning, match="section_key"):
        old = bench.run(synthetic, section_key="section", methods=[MeanExpression()], n_genes=10)
    keep = df["metric"] != "seconds"
    pd.testing.assert_frame_equal(old[keep], df[keep])
    assert list(df.columns) == ["method", "fold", "metric", "value"]
    sections = synthetic.obs["section"].astype(str).to_numpy()
    counts = synthetic.layers["counts"].toarray()
    for fold in ("S0", "S1", "S2"):
        tr, te = sections != fold, sections == fold
        keep = (counts[tr] > 0).mean(0) >= 0.1
        y_tr, y_te = _log1p_cp10k(counts[tr][:, keep]), _log1p_cp10k(counts[te][:, keep])
        hvg = np.argsort(-y_tr.var(0))[:10]
        expected = np.mean((y_te[:, hvg] - y_tr.mean(0)[hvg]) ** 2)
        got = df.query("fold == @fold").set_index("metric")["value"]
        assert got["mse_hvg10"] == pytest.approx(expected, rel=1e-5)
        # a constant prediction has no correlation: reported as undefined, not as 0
        assert np.isnan(got["pcc_hvg10"]) and got["undefined_hvg10"] == 10


def test_summarize_is_mean_and_std_over_folds(synthetic):
    df = bench.run(synthetic, methods=[bench.RidgeProbe(n_components=8), MeanExpression()], n_genes=10)
    s = bench.summarize(df).set_index(["method", "metric"])
    vals = df.query("method == 'ridge_probe' and metric == 'pcc_hvg10'")["value"].to_numpy()
    assert len(vals) == 3
    assert s.loc[("ridge_probe", "pcc_hvg10"), "mean"] == pytest.approx(vals.mean())
    assert s.loc[("ridge_probe", "pcc_hvg10"), "std"] == pytest.approx(vals.std(ddof=1))
    # image features carry the synthetic domains: the probe beats chance on the held-out sections
    assert vals.mean() > 0.2
    table = bench.summarize(df, "expression")
    assert table.loc["mean_expression", "PCC HVG10"] == "undefined"
    with pytest.warns(FutureWarning, match="summarize"):  # the old name, kept as an alias
        pd.testing.assert_frame_equal(bench.summary_table(df, "expression"), table)


class Oracle(Method):
    """Embeds each spot as its own one-hot position in both modalities (or reversed on the gene side)."""

    name, tasks = "oracle", ("retrieval",)

    def __init__(self, reverse=False):
        self.reverse = reverse

    def fit(self, train, *, ctx):
        pass

    def embed(self, adata, modality):
        z = np.eye(adata.n_obs)
        return z[::-1] if (self.reverse and modality == "gene") else z


def test_retrieval_pairs_image_and_gene_of_the_same_spot(synthetic):
    df = bench.run(synthetic, task="retrieval", methods=[Oracle()])
    assert set(df.query("metric != 'seconds'")["value"]) == {1.0}
    bad = Oracle(reverse=True)
    bad.name = "mismatched"
    df = bench.run(synthetic, task="retrieval", methods=[bad])
    assert df.query("metric == 'recall5'")["value"].max() < 0.1
    assert {"recall5_i2g", "recall10_g2i", "recall15"} <= set(df["metric"])


def test_clustering_is_unsupervised_and_scores_reference_labels(synthetic):
    one = synthetic[synthetic.obs["section"] == "S0"].copy()
    Spy.log.clear()
    # gaussian kNN connectivities: the default umap kernel costs a ~30 s numba compilation per process
    df = bench.run(one, task="clustering", label_key="domain", methods=[Spy(), bench.ExpressionPCA(n_comps=10)],
                   seeds=[0], clustering_kwargs={"method": "gauss"})
    assert all("domain" not in e["obs"] for e in Spy.log if e["stage"] in ("fit", "embed"))
    got = df.set_index(["method", "metric"])["value"]
    assert {"ari_leiden", "nmi_leiden", "ari_kmeans", "nmi_kmeans"} <= set(df["metric"])
    # the synthetic expression has one block of marker genes per domain
    assert got[("expression_pca", "ari_kmeans")] > 0.5
    with pytest.raises(KeyError, match="label"):
        bench.run(one, task="clustering", label_key="pathology", methods=[bench.ExpressionPCA()])


# ------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------
class RecordingModel(bench.ImageneModel):
    """Records the sections each fit trained and validated on, and the temperature it ended with."""

    log: list = []

    def fit(self, train, *, ctx):
        super().fit(train, ctx=ctx)
        m = self.model_
        obs = m.adata.obs[ctx.library_key].astype(str)
        RecordingModel.log.append({
            "name": self.name, "fold": ctx.fold, "train": set(obs.iloc[m.train_indices]),
            "validation": set(obs.iloc[m.validation_indices]),
            "temperature": 1.0 / float(m.module.logit_scale().detach()),
        })


def _recording(method: bench.ImageneModel) -> RecordingModel:
    rec = RecordingModel.__new__(RecordingModel)
    rec.__dict__.update(method.__dict__)
    return rec


def test_imagene_models_plug_in_and_validate_on_training_spots(synthetic):
    a = synthetic.copy()
    a.obs["patient"] = a.obs["section"].astype(str).map({"S0": "P", "S1": "P", "S2": "Q"})
    RecordingModel.log.clear()
    umpire = _recording(bench.ImageneModel(**FAST_UMPIRE))
    bleep = _recording(bench.bleep_style(**FAST_UMPIRE))
    df = bench.run(a, task="retrieval", split="patient", methods=[umpire, bleep], max_epochs=3)
    assert set(df["method"]) == {"umpire", "bleep_style"}
    recalls = df.loc[df["metric"] != "seconds", "value"]
    assert len(recalls) == 2 * 2 * 9 and recalls.between(0, 1).all()
    log = {(e["name"], e["fold"]): e for e in RecordingModel.log}
    for name in ("umpire", "bleep_style"):
        # two training sections: a whole training section validates; one section: spots of it
        assert log[(name, "patient Q")]["train"] | log[(name, "patient Q")]["validation"] == {"S0", "S1"}
        assert len(log[(name, "patient Q")]["validation"]) == 1
        assert log[(name, "patient P")]["train"] == log[(name, "patient P")]["validation"] == {"S2"}
    # BLEEP-style: the shared towers with BLEEP's fixed temperature of 1; UMPIRE learns its own from 0.07
    assert log[("bleep_style", "patient Q")]["temperature"] == pytest.approx(1.0)
    assert log[("umpire", "patient Q")]["temperature"] != pytest.approx(0.07, abs=1e-6)


class TwoPredictions(Method):
    """One fit, two predictions: the training mean and the mean plus one (a different, worse prediction)."""

    name, tasks = "two", ("expression",)

    def fit(self, train, *, ctx):
        self.mean_ = _log1p_cp10k(train.layers[ctx.layer][:, train.var_names.get_indexer(ctx.genes)]).mean(0)

    def predict_expression(self, test):
        base = np.tile(self.mean_, (test.n_obs, 1))
        return {"mean": base, "shifted": base + 1.0}


def test_several_predictions_of_one_fit_are_scored_under_their_own_names(synthetic):
    df = bench.run(synthetic, methods=[TwoPredictions(), MeanExpression()], n_genes=10)
    assert {"two[mean]", "two[shifted]", "mean_expression"} <= set(df["method"])
    mse = df[df["metric"] == "mse_hvg10"].pivot(index="fold", columns="method", values="value")
    # the first prediction is the mean floor itself; shifting every value by 1 adds ~1 to the MSE
    np.testing.assert_allclose(mse["two[mean]"], mse["mean_expression"], rtol=1e-6)
    assert (mse["two[shifted]"] > mse["two[mean]"] + 0.5).all()
    # an ImageneModel maps result keys to arguments of the model's predict_expression
    m = bench.ImageneModel(predictions={"k5": {"k": 5}, "uniform": {"weighting": "uniform"}})
    assert m.predictions == {"k5": {"k": 5}, "uniform": {"weighting": "uniform"}}


class CountingRidge(bench.RidgeProbe):
    fits = 0

    def fit(self, train, *, ctx):
        CountingRidge.fits += 1
        super().fit(train, ctx=ctx)


def test_several_tasks_share_one_fit_per_method_and_fold(synthetic):
    CountingRidge.fits = 0
    res = bench.run(synthetic, task=["expression", "retrieval"], methods=[CountingRidge()], n_genes=10)
    assert set(res) == {"expression", "retrieval"}
    assert CountingRidge.fits == 3  # one fit per fold (three sections), scored on both tasks
    single = bench.run(synthetic, task="expression", methods=[CountingRidge()], n_genes=10)
    drop = lambda df: df[df["metric"] != "seconds"].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(drop(res["expression"]), drop(single))
    assert drop(res["retrieval"])["metric"].str.startswith("recall").all()


def test_default_methods_cover_umpire_and_every_baseline():
    assert [m.name for m in bench.default_methods("expression")] == [
        "umpire", "bleep_style", "ridge_probe", "context_ridge", "umpire_context", "stnet_style", "random_reference",
        "mean_expression",
    ]
    assert "mean_expression" not in [m.name for m in bench.default_methods("retrieval")]
    assert [m.name for m in bench.default_methods("clustering")] == [
        "umpire", "expression_pca", "expression_pca_smooth1", "expression_pca_smooth2",
        "image_features", "image_features_smooth1", "image_features_smooth2",
    ]
    with pytest.raises(ValueError, match="task"):
        bench.default_methods("segmentation")


def test_stnet_head_learns_from_image_features(synthetic):
    df = bench.run(synthetic, methods=[bench.STNetHead(max_epochs=30), bench.RandomReference(k=20)], n_genes=10)
    pcc = df.query("metric == 'pcc_hvg10'").groupby("method")["value"].mean()
    assert pcc["stnet_style"] > pcc["random_reference"] + 0.1


def test_ridge_probe_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = x @ rng.normal(size=(5, 3))
    pred = bench.RidgeProbe().fit_predict(x, y, x[:4])
    np.testing.assert_allclose(pred, y[:4], atol=0.05)
    with pytest.warns(FutureWarning, match="RidgeProbe"):  # the old function, kept as an alias
        np.testing.assert_array_equal(bench.ridge_probe(x, y, x[:4]), pred)


# ------------------------------------------------------------------------------------------
# the command on real her2st sections
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def her2st_cmd(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["--data", str(data_dir / "her2st"), "--encoder", "tiny", "--tile-px", "32", "--quiet",
            "--cache", str(out / "cache")]
    return out, args


def test_bench_command_expression_on_real_sections(her2st_cmd, capsys):
    out, args = her2st_cmd
    cmd = [*args, "--task", "expression", "--sections", "C3", "C4", "--methods", "ridge_probe", "mean_expression",
           "--out", str(out / "run1")]
    assert bench.main(cmd) == 0
    stdout = capsys.readouterr().out
    assert "per fold" in stdout and "mean ± std" in stdout and "ridge_probe" in stdout
    res = json.loads((out / "run1" / "results.json").read_text())
    records = pd.DataFrame(res["tasks"]["expression"]["records"])
    assert set(records["fold"]) == {"C3", "C4"} and set(records["method"]) == {"ridge_probe", "mean_expression"}
    assert (out / "run1" / "expression.png").stat().st_size > 5000
    assert "PCC HVG50" in (out / "run1" / "results.md").read_text()
    cached = sorted(p.name for p in (out / "cache").iterdir())
    assert cached == ["C3__tiny__32px__112um.npz", "C4__tiny__32px__112um.npz"]
    # a rerun reads the cached features and reproduces the scores
    mtimes = [p.stat().st_mtime for p in (out / "cache").iterdir()]
    assert bench.main([*cmd[:-1], str(out / "run2")]) == 0
    assert [p.stat().st_mtime for p in (out / "cache").iterdir()] == mtimes
    again = pd.DataFrame(json.loads((out / "run2" / "results.json").read_text())["tasks"]["expression"]["records"])
    keep = records["metric"] != "seconds"
    np.testing.assert_allclose(again[keep]["value"], records[keep]["value"], equal_nan=True)


def test_clustering_of_a1_against_pathologist_labels(her2st_cmd):
    out, args = her2st_cmd
    a1 = bench.read_sections(args[1], ["A1"], encoder="tiny", tile_px=32, cache=out / "cache")
    assert a1.obs["label"].notna().sum() == 346  # every labelled spot of A1 joins its "{x}x{y}" key
    assert a1.uns["spatial"]["A1"]["metadata"]["source_image_scale"] == pytest.approx(2000 / 6954)
    assert (out / "cache" / "A1__tiny__32px__112um.npz").exists()
    df = bench.run(a1, task="clustering", methods=[bench.ExpressionPCA(), bench.ExpressionPCA(smooth=2),
                                                   bench.ImageFeatures()], seeds=[0],
                   clustering_kwargs={"method": "gauss"})
    got = df.set_index(["method", "metric"])["value"]
    # pathologist regions of A1 are recovered from expression far above chance (ARI 0)
    assert got[("expression_pca", "ari_kmeans")] > 0.15
    # the regions are spatially contiguous: averaging over neighbours recovers them better
    assert got[("expression_pca_smooth2", "ari_kmeans")] > got[("expression_pca", "ari_kmeans")]
    assert set(df["fold"]) == {"A1"}


def test_cli_has_bench_subcommand_and_names_a_missing_section(capsys, tmp_path):
    from imagene._cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "--data" in capsys.readouterr().out
    (tmp_path / "data" / "B4").mkdir(parents=True)  # a folder of sections without A1
    (tmp_path / "data" / "B4" / "B4.tsv.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"A1.*section folders found.*B4"):
        main(["bench", "--task", "clustering", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])


# ------------------------------------------------------------------------------------------
# context features (ContextRidge, the guards) and a fixed test set
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_ctx(synthetic):
    a = synthetic.copy()
    ig.pp.niches(a, n_neighs=4, library_key="section", niche_expression=False)
    ig.pp.context_matrix(a, ["X_he_tiny"])  # the spot and the mean of its 4 nearest spots
    return a


def _pearson(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    yc, pc = y - y.mean(0), p - p.mean(0)
    return (yc * pc).sum(0) / np.sqrt((yc**2).sum(0) * (pc**2).sum(0))


def test_context_ridge_is_the_ridge_pipeline_on_the_training_sections_context(synthetic_ctx):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    a = synthetic_ctx
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


def test_context_ridge_on_a_copy_of_the_spot_features_is_the_ridge_probe(synthetic_ctx):
    a = synthetic_ctx.copy()
    a.obsm["X_he_tiny_copy"] = a.obsm["X_he_tiny"].copy()
    a.uns["X_he_tiny_copy"] = {"context": "matrix", "sources": ["X_he_tiny"]}
    df = bench.run(a, image_key="X_he_tiny", n_genes=10,
                   methods=[bench.RidgeProbe(n_components=8), bench.ContextRidge("X_he_tiny_copy", n_components=8)])
    v = df.query("metric == 'pcc_hvg10'").pivot(index="fold", columns="method", values="value")
    np.testing.assert_allclose(v["context_ridge"], v["ridge_probe"], rtol=1e-6)


def test_guards_accept_context_keys_and_refuse_context_of_fitted_representations(synthetic_ctx):
    a = synthetic_ctx.copy()
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


def test_default_methods_skip_context_ridge_without_context(synthetic_ctx, monkeypatch):
    from imagene.bench import _runner

    names = [m.name for m in bench.default_methods("expression")]
    assert names.index("context_ridge") == names.index("ridge_probe") + 1
    assert "context_ridge" in [m.name for m in bench.default_methods("retrieval")]
    a = synthetic_ctx.copy()
    del a.obsm["X_he_tiny_context"]
    # the default list, cut to two cheap methods, run through `methods=None`
    full = _runner.default_methods
    cheap = ("context_ridge", "umpire_context", "mean_expression")
    monkeypatch.setattr(_runner, "default_methods", lambda task: [m for m in full(task) if m.name in cheap])
    with pytest.warns(UserWarning, match=r"Skipping 'context_ridge'.*context_matrix") as record:
        df = bench.run(a, image_key="X_he_tiny", methods=None, n_genes=10)
    assert any("Skipping 'umpire_context'" in str(w.message) for w in record)
    assert set(df["method"]) == {"mean_expression"}


def test_umpire_context_is_umpire_with_a_context_tower_on_the_context_matrix(synthetic_ctx):
    method = bench.umpire_context(model_kwargs={"n_hidden": 32, "n_latent": 8})
    assert method.name == "umpire_context" and method.input_keys("X_he_tiny") == ("X_he_tiny_context",)
    assert method.model_kwargs == {"image_context": "attention", "n_hidden": 32, "n_latent": 8}
    assert bench.ImageneModel().input_keys("X_he_tiny") == ()

    class Probe(type(method)):
        widths: list = []

        def fit(self, train, *, ctx):
            assert train.uns["X_he_tiny_context"]["widths"] == [32, 32]  # the fold carries the block widths
            super().fit(train, ctx=ctx)
            Probe.widths.append(self.model_.module.image_tower.context_widths)

    probe = Probe(name="umpire_context", image_input="{image_key}_context", tasks=("expression", "retrieval"),
                  model_kwargs=method.model_kwargs, train_kwargs={"accelerator": "cpu"}, clustering_modalities=())
    res = bench.run(synthetic_ctx, image_key="X_he_tiny", task=["expression", "retrieval"], methods=[probe],
                    n_genes=10, max_epochs=2)
    assert Probe.widths == [[32, 32]] * 3
    assert np.isfinite(res["expression"].query("metric == 'pcc_hvg10'")["value"]).all()
    assert res["retrieval"]["metric"].str.startswith("recall").any()


def test_context_ridge_head_chooses_rank_and_centring_on_the_training_sections_only(synthetic_ctx):
    a = synthetic_ctx
    fits = []

    class Keep(bench.ContextRidge):
        def fit(self, train, *, ctx):
            super().fit(train, ctx=ctx)
            fits.append((set(train.obs["section"].astype(str)), ctx.test_sections, self.validation_, self.probe_))

    method = Keep(head=True)
    assert method.name == "context_ridge_head"
    df = bench.run(a, methods=[method], n_genes=10)
    sections = a.obs["section"].astype(str).to_numpy()
    counts = a.layers["counts"].toarray()
    x = a.obsm["X_he_tiny_context"].astype(np.float64)
    for train_sections, test_sections, table, head in fits:
        assert not train_sections & set(test_sections) and len(table) == 8  # 4 ranks x 2 centrings
        assert (head.rank, head.center) == (int(table.loc[0, "rank"]), bool(table.loc[0, "center"]))
        fold = test_sections[0]
        tr, te = sections != fold, sections == fold
        keep = (counts[tr] > 0).mean(0) >= 0.1
        y_tr, y_te = _log1p_cp10k(counts[tr][:, keep]), _log1p_cp10k(counts[te][:, keep])
        hvg = np.argsort(-y_tr.var(0))[:10]
        # the chosen head refitted by hand on the training sections, then centred on the held-out one
        xt = x[te] - x[te].mean(0) if head.center else x[te]
        xr = x[tr].copy()
        if head.center:
            for s_ in np.unique(sections[tr]):
                xr[sections[tr] == s_] -= xr[sections[tr] == s_].mean(0)
        ref = ig.model.RidgeHead(head.rank, False).fit(xr, y_tr, None).predict(xt, None)
        got = df.query("fold == @fold").set_index("metric")["value"]
        assert got["pcc_hvg10"] == pytest.approx(np.nanmean(_pearson(y_te[:, hvg], ref[:, hvg])), rel=1e-4)


def test_head_predictions_fit_the_ridge_head_on_the_named_features(synthetic_ctx):
    method = bench.umpire_context()
    assert method.predictions == {"reference": {}, "head": {"method": "head"}}
    assert bench.bleep_style().predictions is None and bench.ImageneModel().predictions is None  # one prediction
    spot = bench.ImageneModel(name="u", predictions={"head": {"method": "head"}}, head_features="{image_key}_context",
                              model_kwargs={"n_hidden": 16, "n_latent": 4}, train_kwargs={"accelerator": "cpu"},
                              tasks=("expression",))
    assert spot.input_keys("X_he_tiny") == ("X_he_tiny_context",)

    class Keep(type(spot)):
        settings: list = []

        def fit(self, train, *, ctx):
            super().fit(train, ctx=ctx)
            Keep.settings.append(self.model_.expression_head_settings_["features_key"])

    keep = Keep(**{k: getattr(spot, k) for k in ("name", "predictions", "head_features", "model_kwargs",
                                                 "train_kwargs", "tasks")})
    res = bench.run(synthetic_ctx, image_key="X_he_tiny", methods=[keep], n_genes=10, max_epochs=2)
    assert Keep.settings == ["X_he_tiny_context"] * 3  # one fit per fold, the head on the context matrix
    pcc = res.query("metric == 'pcc_hvg10'")
    assert set(pcc["method"]) == {"u[head]"} and np.isfinite(pcc["value"]).all()


class Recorder(Method):
    """Records the sections it is fitted on and the spots it predicts (shared log across deep copies)."""

    name, tasks = "recorder", ("expression",)
    log: list = []

    def fit(self, train, *, ctx):
        self.mean_ = _log1p_cp10k(train.layers[ctx.layer]).mean(0)
        Recorder.log.append(("fit", set(train.obs[ctx.library_key].astype(str)), ctx.test_sections))

    def predict_expression(self, test):
        Recorder.log.append(("predict", set(test.obs["section"].astype(str)), test.n_obs))
        return np.tile(self.mean_, (test.n_obs, 1))


def test_fixed_test_set_is_predicted_from_one_fit_on_the_other_sections(synthetic_ctx):
    a = synthetic_ctx
    Recorder.log.clear()
    df = bench.run(a, methods=[Recorder(), MeanExpression()], test_sections=["S2", "S0"], n_genes=10)
    assert list(dict.fromkeys(df["fold"])) == ["S2", "S0"]
    fits = [e for e in Recorder.log if e[0] == "fit"]
    assert fits == [("fit", {"S1"}, ("S0", "S2"))]  # one fit, on the only other section
    sections = a.obs["section"].astype(str).to_numpy()
    preds = [e for e in Recorder.log if e[0] == "predict"]
    assert preds == [("predict", {s}, int((sections == s).sum())) for s in ("S2", "S0")]
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


def test_fixed_test_set_is_checked(synthetic_ctx):
    with pytest.raises(ValueError, match="distinct sections"):
        bench.run(synthetic_ctx, methods=[MeanExpression()], test_sections=["S9"])
    with pytest.raises(ValueError, match="no training section"):
        bench.run(synthetic_ctx, methods=[MeanExpression()], test_sections=["S0", "S1", "S2"])
    with pytest.raises(ValueError, match="split='section'"):
        a = synthetic_ctx.copy()
        a.obs["patient"] = a.obs["section"]
        bench.run(a, methods=[MeanExpression()], split="patient", test_sections=["S0"])
    with pytest.raises(ValueError, match="clustering"):
        bench.run(synthetic_ctx, task="clustering", label_key="domain", methods=[bench.ExpressionPCA()],
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


def test_fold_context_section_key_is_a_deprecated_alias_of_library_key():
    ctx = bench.FoldContext(task="expression", fold="S1", train_sections=("S0",), test_sections=("S1",),
                            library_key="sect", image_key="X", layer="counts", genes=pd.Index(["a"]),
                            hvg=np.array([0]), heg=np.array([0]))
    assert ctx.library_key == "sect"
    with pytest.warns(FutureWarning, match="library_key"):
        assert ctx.section_key == "sect"


def test_smoothing_averages_each_spot_with_its_six_nearest_spots_of_its_own_section():
    from sklearn.neighbors import NearestNeighbors

    from imagene.bench._baselines import smooth_over_neighbors

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(60, 2))
    a = ig.datasets.synthetic_he_st(n_obs=60, n_vars=5, n_sections=2, image_px=64, seed=0)
    a.obsm["spatial"] = np.c_[xy, np.zeros(60)]  # a third column (z) is ignored
    z = rng.normal(size=(60, 3))
    before = {k: v.copy() for k, v in a.obsm.items()}
    got = smooth_over_neighbors(a, z, 1, library_key="section")
    sections = a.obs["section"].astype(str).to_numpy()
    for s_ in np.unique(sections):  # by hand: the spot and its 6 nearest spots of the same section
        idx = np.flatnonzero(sections == s_)
        nn = NearestNeighbors(n_neighbors=7).fit(xy[idx]).kneighbors(xy[idx], return_distance=False)
        np.testing.assert_allclose(got[idx], z[idx][nn].mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(smooth_over_neighbors(a, z, 2, library_key="section"),
                               smooth_over_neighbors(a, got, 1, library_key="section"), rtol=1e-5, atol=1e-6)
    assert smooth_over_neighbors(a, z, 0, library_key="section") is z
    assert set(a.obsm) == set(before) and all(np.array_equal(a.obsm[k], before[k]) for k in before)
    assert not a.obsp.keys()
    with pytest.raises(ValueError, match="rounds"):
        bench.ExpressionPCA(smooth=-1)
