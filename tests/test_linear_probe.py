"""imagene.tl.linear_probe: section and spatial-block folds, scores, errors."""

from __future__ import annotations

import numpy as np
import pytest

import imagene as ig


@pytest.fixture(scope="module")
def labelled():
    a = ig.datasets.synthetic_he_st(n_obs=300, n_vars=20, n_sections=3, image_px=384, seed=3)
    rng = np.random.default_rng(0)
    dom = a.obs["domain"].astype(str).to_numpy()
    onehot = (dom[:, None] == np.unique(dom)[None]).astype(float)
    a.obsm["X_good"] = onehot * 2 + rng.normal(0, 0.5, onehot.shape)  # separates the domains
    a.obsm["X_noise"] = rng.normal(size=(a.n_obs, 3))  # carries nothing
    return a


def test_informative_embedding_beats_noise_across_sections(labelled):
    good = ig.tl.linear_probe(labelled, "X_good", "domain", split="section")
    noise = ig.tl.linear_probe(labelled, "X_noise", "domain", split="section")
    assert list(good["fold"]) == ["S0", "S1", "S2"] and (good["n_test"] == 100).all()
    assert good["balanced_accuracy"].mean() > 0.9 and good["f1_weighted"].mean() > 0.9
    assert noise["balanced_accuracy"].mean() < 0.5  # chance is 1/3


def test_spatial_blocks_are_contiguous_and_stay_inside_one_section(labelled):
    a = labelled[labelled.obs["section"] == "S0"].copy()
    res = ig.tl.linear_probe(a, "X_good", "domain", n_blocks=4)  # auto: one section -> spatial blocks
    assert len(res) <= 4 and res["split"].str.contains("not a random spot split").all()
    assert res["n_test"].sum() == a.n_obs  # each spot is held out exactly once
    with pytest.raises(ValueError, match="split='section' needs 2"):
        ig.tl.linear_probe(a, "X_good", "domain", split="section")


def test_errors_name_the_fix_and_leave_adata_unchanged(labelled):
    a = labelled.copy()
    keys = set(a.obsm), set(a.obs.columns)
    with pytest.raises(KeyError):
        ig.tl.linear_probe(a, "X_missing", "domain")
    with pytest.raises(KeyError, match="label_key"):
        ig.tl.linear_probe(a, "X_good", "missing")
    with pytest.raises(ValueError, match="split"):
        ig.tl.linear_probe(a, "X_good", "domain", split="random")
    assert (set(a.obsm), set(a.obs.columns)) == keys
