"""The ridge expression head shared by the alignment models: selection, prediction, saving, errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.preprocessing import StandardScaler

import imagene as ig
from imagene._utils import log_normalize

FAST = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def data(tiny_he_st):
    a = tiny_he_st(n_obs=480, n_vars=60, n_sections=4, image_px=384, seed=3)
    train = a[a.obs["section"] != "S3"].copy()
    test = a[a.obs["section"] == "S3"].copy()
    ig.settings.seed = 0
    ig.model.UMPIRE.setup_anndata(train, layer="counts", image_key="X_he_tiny", library_key="section")
    m = ig.model.UMPIRE(train, n_hidden=64, n_latent=16, dropout=0.1)
    m.train(max_epochs=20, batch_size=64, lr=3e-3, early_stopping_patience=20, **FAST)
    return m, train, test


def _by_hand(x_tr, y, sec_tr, x_te, sec_te, rank, center):
    """The head recomputed with sklearn and numpy, without imagene's head code."""
    def cen(x, s):
        x = x.astype(np.float64).copy()
        for v in np.unique(s):
            x[s == v] -= x[s == v].mean(0)
        return x

    if center:
        x_tr, x_te = cen(x_tr, sec_tr), cen(x_te, sec_te)
    sc = StandardScaler().fit(x_tr)
    pca = PCA(min(256, x_tr.shape[0] - 1, x_tr.shape[1]), random_state=0).fit(sc.transform(x_tr))
    gp = PCA(rank, random_state=0).fit(y) if rank else None
    t = gp.transform(y) if gp else y
    r = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(pca.transform(sc.transform(x_tr)), t)
    out = r.predict(pca.transform(sc.transform(x_te)))
    return np.clip(gp.inverse_transform(out) if gp else out, 0, None)


def test_head_is_chosen_on_held_out_training_sections_and_equals_a_by_hand_ridge(data):
    m, train, test = data
    table = m.fit_expression_head(inputs="features", ranks=(0, 4, 8), center=(False, True))
    assert len(table) == 6 and table["pcc"].is_monotonic_decreasing
    best = table.iloc[0]
    assert m.expression_head_settings_ == {"inputs": "features", "features_key": "X_he_tiny",
                                           "rank": int(best["rank"]), "center": bool(best["center"])}
    # the validation score of one setting, recomputed by hand: leave each training section out
    y = log_normalize(train.layers["counts"])
    x = train.obsm["X_he_tiny"]
    sec = train.obs["section"].astype(str).to_numpy()
    hvg = np.argsort(-y.var(0))[:50]
    row = table[(table["rank"] == 4) & table["center"]].iloc[0]
    scores = []
    for held in np.unique(sec):
        fit = sec != held
        pred = _by_hand(x[fit], y[fit], sec[fit], x[~fit], sec[~fit], 4, True)
        scores.append(np.nanmean(ig.metrics.gene_pearson(y[~fit][:, hvg], pred[:, hvg])))
    assert row["pcc"] == pytest.approx(np.mean(scores), abs=2e-3)
    # the refitted head on all training spots
    expected = _by_hand(x, y, sec, test.obsm["X_he_tiny"], test.obs["section"].astype(str).to_numpy(),
                        int(best["rank"]), bool(best["center"]))
    got = m.predict_expression(test, method="head", return_numpy=True)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_head_predicts_markers_of_a_held_out_section(data):
    m, train, test = data
    m.fit_expression_head()
    truth = log_normalize(test.layers["counts"])
    markers = np.flatnonzero(test.var["marker_of"].astype(str).to_numpy() != "none")
    head = m.predict_expression(test, method="head", return_numpy=True)
    assert head.shape == (test.n_obs, train.n_vars) and (head >= 0).all()
    assert ig.metrics.mean_pearson(truth[:, markers], head[:, markers]) > 0.3
    # the layer of tl.predict_expression is the same prediction
    q = test.copy()
    ig.tl.predict_expression(m, q, method="head")
    np.testing.assert_allclose(q.layers["imagene_predicted"], head, atol=1e-6)


def test_centring_makes_the_head_blind_to_a_section_offset(data):
    m, _, test = data
    m.fit_expression_head(inputs="features", ranks=(8,), center=(True,))
    shifted = test.copy()
    shifted.obsm["X_he_tiny"] = shifted.obsm["X_he_tiny"] + 5.0
    np.testing.assert_allclose(m.predict_expression(shifted, method="head", return_numpy=True),
                               m.predict_expression(test, method="head", return_numpy=True), atol=1e-4)
    # on a slide grid the means are over the in-tissue spots: off-tissue rows do not move the others
    grid = ad.concat([test, test[:40].copy()], index_unique="-")
    grid.obsm["X_he_tiny"][test.n_obs:] = 100.0
    grid.obs["imagene_in_tissue"] = np.r_[np.ones(test.n_obs, bool), np.zeros(40, bool)]
    np.testing.assert_allclose(m.predict_expression(grid, method="head", return_numpy=True)[: test.n_obs],
                               m.predict_expression(test, method="head", return_numpy=True), atol=1e-4)
    m.fit_expression_head(inputs="features", ranks=(8,), center=(False,))
    assert not np.allclose(m.predict_expression(shifted, method="head", return_numpy=True),
                           m.predict_expression(test, method="head", return_numpy=True), atol=1e-3)


def test_head_is_saved_and_used_by_a_model_loaded_alone(data, tmp_path):
    m, _, test = data
    m.fit_expression_head()
    expected = m.predict_expression(test, method="head", return_numpy=True)
    m.save(tmp_path / "model", overwrite=True)
    alone = ig.model.UMPIRE.load(tmp_path / "model")
    image_only = ad.AnnData(obs=test.obs[["section"]].copy(), obsm={"X_he_tiny": test.obsm["X_he_tiny"]})
    np.testing.assert_array_equal(alone.predict_expression(image_only, method="head", return_numpy=True), expected)
    assert alone.expression_head_settings_ == m.expression_head_settings_


def test_head_errors(data):
    m, train, test = data
    fresh = ig.model.UMPIRE(train, n_hidden=16, n_latent=4)
    with pytest.raises(RuntimeError, match="not trained"):
        fresh.fit_expression_head()
    with pytest.raises(ValueError, match="inputs must be one of"):
        m.fit_expression_head(inputs="tiles")
    with pytest.raises(ValueError, match="ranks must"):
        m.fit_expression_head(ranks=(-1,))
    m.fit_expression_head(ranks=(4,), center=(True,))
    with pytest.raises(ValueError, match="return_sd"):
        m.predict_expression(test, method="head", return_sd=True)
    with pytest.raises(ValueError, match="method must be"):
        m.predict_expression(test, method="ridge")
    no_features = ad.AnnData(obs=test.obs[["section"]].copy())
    with pytest.raises(KeyError, match="X_he_tiny"):
        m.predict_expression(no_features, method="head")
    before = {k: v.copy() for k, v in test.obsm.items()}
    m.predict_expression(test, method="head")
    assert set(test.obsm) == set(before) and all(np.array_equal(test.obsm[k], before[k]) for k in before)


def test_a_model_without_a_head_says_how_to_fit_one(data):
    _, train, test = data
    ig.settings.seed = 0
    other = ig.model.UMPIRE(train, n_hidden=16, n_latent=4)
    other.train(max_epochs=1, batch_size=64, **FAST)
    with pytest.raises(RuntimeError, match="fit_expression_head"):
        other.predict_expression(test, method="head")
