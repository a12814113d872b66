"""UMPIRE: setup, training, latents, prediction, save/load, and its errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import imagene as ig
from imagene._utils import log_normalize

FAST = {"accelerator": "cpu", "enable_progress_bar": False}


def _synthetic(seed=0, n_obs=360):
    a = ig.datasets.synthetic_he_st(n_obs=n_obs, n_vars=60, n_sections=3, image_px=384, seed=seed)
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=32, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    del a.obsm["imagene_tiles"]
    return a


@pytest.fixture(scope="module")
def synthetic():
    return _synthetic()


@pytest.fixture(scope="module")
def trained(synthetic):
    a = synthetic[synthetic.obs["section"] != "S2"].copy()
    ig.settings.seed = 0
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section")
    m = ig.model.UMPIRE(a, n_hidden=64, n_latent=16, dropout=0.1)
    m.train(max_epochs=30, batch_size=64, lr=3e-3, weight_decay=1e-4, early_stopping_patience=30, **FAST)
    return m, a, synthetic[synthetic.obs["section"] == "S2"].copy()


def test_latents_shapes_and_normalisation(trained):
    m, a, _ = trained
    for modality in ("image", "gene", "joint"):
        z = m.get_latent_representation(modality=modality)
        assert z.shape == (a.n_obs, 16) and z.dtype == np.float32
        assert np.all(np.isfinite(z))
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="modality"):
        m.get_latent_representation(modality="text")


def test_validation_is_a_held_out_section_and_history_moves(trained):
    m, a, _ = trained
    val_sections = set(a.obs["section"].iloc[m.validation_indices].astype(str))
    train_sections = set(a.obs["section"].iloc[m.train_indices].astype(str))
    assert val_sections == {"S1"} and train_sections == {"S0"}
    rec = m.history["recall5_validation"].iloc[:, 0].to_numpy()
    assert len(rec) >= 2 and np.ptp(rec) > 0  # the early-stopping monitor is not constant
    loss = m.history["train_loss"].iloc[:, 0].to_numpy()
    assert loss[-1] < loss[0]


def test_alignment_generalises_to_a_held_out_section(trained):
    """On an unseen section, a spot's image retrieves gene profiles of its own tissue domain.

    Spots of one synthetic domain differ only by noise, so the meaningful target is the domain:
    chance agreement is about 1/3 (three domains), and recall@5 % of the exact partner is capped
    near 15 %.
    """
    m, _, test = trained
    zi = m.get_latent_representation(test, modality="image")
    zg = m.get_latent_representation(test, modality="gene")
    sim = zi @ zg.T
    k = int(np.ceil(0.05 * len(sim)))
    domain = test.obs["domain"].astype(str).to_numpy()
    top = np.argsort(-sim, axis=1)[:, :k]
    assert (domain[top] == domain[:, None]).mean() > 0.6
    rank = (sim > sim.diagonal()[:, None]).sum(1)
    assert rank.mean() < 0.4 * len(sim)  # exact partner ranks above the middle (chance: 0.5 n)


def test_predict_expression_from_image_on_held_out_section(trained):
    m, a, test = trained
    pred = m.predict_expression(test, k=20)
    assert list(pred.columns) == list(a.var_names) and list(pred.index) == list(test.obs_names)
    truth = log_normalize(test.layers["counts"])
    markers = np.flatnonzero(test.var["marker_of"].astype(str).to_numpy() != "none")
    r = ig.metrics.gene_pearson(truth[:, markers], pred.to_numpy()[:, markers])
    assert np.nanmean(r) > 0.3


def test_prediction_is_the_weighted_mean_of_the_nearest_references(trained):
    """Recompute the query-reference prediction independently from the latents."""
    m, a, test = trained
    zq = m.get_latent_representation(test, modality="image")
    bank = m.get_latent_representation(a, modality="gene")
    np.testing.assert_allclose(bank, m.reference_latent_, atol=1e-5)
    expr = log_normalize(a.layers["counts"])
    sim = zq @ bank.T
    k = 7
    top = np.argsort(-sim, axis=1)[:, :k]
    w = np.clip(np.take_along_axis(sim, top, 1), 0, None)
    w /= w.sum(1, keepdims=True)
    expected = np.einsum("qk,qkg->qg", w, expr[top])
    got = m.predict_expression(test, k=k, return_numpy=True)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    uni = m.predict_expression(test, k=1, weighting="uniform", return_numpy=True)
    np.testing.assert_allclose(uni, expr[sim.argmax(1)], atol=1e-5)


def test_save_load_round_trip(trained, tmp_path):
    m, a, test = trained
    m.save(tmp_path / "model", overwrite=True)
    loaded = ig.model.UMPIRE.load(tmp_path / "model", adata=a)
    for modality in ("image", "gene", "joint"):
        np.testing.assert_array_equal(
            loaded.get_latent_representation(test, modality=modality),
            m.get_latent_representation(test, modality=modality),
        )
    np.testing.assert_array_equal(loaded.predict_expression(test, return_numpy=True), m.predict_expression(test, return_numpy=True))
    assert set(loaded.history) == set(m.history)


def test_load_without_data_or_with_other_genes(trained, tmp_path):
    m, a, test = trained
    m.save(tmp_path / "model", overwrite=True)
    expected = m.predict_expression(test, return_numpy=True)
    alone = ig.model.UMPIRE.load(tmp_path / "model")
    assert alone.adata is None and list(alone.gene_names) == list(a.var_names)
    np.testing.assert_array_equal(alone.predict_expression(test, return_numpy=True), expected)
    with pytest.raises(ValueError, match="pass the AnnData"):
        alone.get_latent_representation()
    # a query with other genes (or none) loads the model without registering the query
    other = test[:, test.var_names[:-5]].copy()
    loaded = ig.model.UMPIRE.load(tmp_path / "model", adata=other)
    assert loaded.adata is None
    np.testing.assert_array_equal(loaded.predict_expression(other, return_numpy=True), expected)
    image_only = ad.AnnData(obs=test.obs[[]].copy(), obsm={"X_he_tiny": test.obsm["X_he_tiny"]})
    loaded = ig.model.UMPIRE.load(tmp_path / "model", adata=image_only)
    np.testing.assert_array_equal(loaded.predict_expression(image_only, return_numpy=True), expected)


def test_query_genes_are_matched_by_name(trained):
    m, a, test = trained
    z = m.get_latent_representation(test, modality="gene")
    reordered = test[:, test.var_names[::-1]].copy()
    np.testing.assert_allclose(m.get_latent_representation(reordered, modality="gene"), z, atol=1e-5)
    missing = test[:, test.var_names[5:]].copy()
    with pytest.warns(UserWarning, match="missing"):
        m.get_latent_representation(missing, modality="gene")
    # the image side needs no expression at all
    no_genes = test[:, :0].copy()
    assert m.get_latent_representation(no_genes, modality="image").shape == (test.n_obs, 16)


def test_untrained_model_refuses_to_predict(synthetic):
    a = synthetic.copy()
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny")
    m = ig.model.UMPIRE(a)
    with pytest.raises(RuntimeError, match="not trained"):
        m.predict_expression(a)
    with pytest.raises(RuntimeError, match="not trained"):
        m.get_latent_representation()


def test_setup_anndata_errors_leave_adata_unchanged(synthetic):
    a = synthetic.copy()
    before = {slot: set(getattr(a, slot).keys()) for slot in ("obsm", "layers", "uns", "obsp")}
    with pytest.raises(ValueError, match="view"):
        ig.model.UMPIRE.setup_anndata(a[:10], layer="counts", image_key="X_he_tiny")
    with pytest.raises(KeyError, match="embed_tiles"):
        ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_missing")
    with pytest.raises(KeyError, match="section_typo"):
        ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section_typo")
    b = a.copy()
    b.layers["lognorm"] = sp.csr_matrix(log_normalize(b.layers["counts"]))
    with pytest.raises(ValueError, match="non-integer"):
        ig.model.UMPIRE.setup_anndata(b, layer="lognorm", image_key="X_he_tiny")
    c = a.copy()
    c.layers["counts"] = c.layers["counts"].copy()
    c.layers["counts"].data[0] = -1
    with pytest.raises(ValueError, match="negative"):
        ig.model.UMPIRE.setup_anndata(c, layer="counts", image_key="X_he_tiny")
    after = {slot: set(getattr(a, slot).keys()) for slot in ("obsm", "layers", "uns", "obsp")}
    assert before == after


def test_query_image_features_of_another_encoder_are_refused(trained):
    m, _, test = trained
    q = test.copy()
    q.obsm["X_he_tiny"] = np.zeros((q.n_obs, 8), np.float32)
    with pytest.raises(ValueError, match="encoder"):
        m.predict_expression(q)


def test_trainable_backbone_on_tiles(synthetic):
    """The image tower can fine-tune a registry backbone on uint8 tiles (no frozen features)."""
    a = synthetic[synthetic.obs["section"] != "S2"].copy()
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=32, show_progress_bar=False)
    with pytest.raises(ValueError, match="image_encoder"):
        ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="imagene_tiles")
        ig.model.UMPIRE(a)
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="imagene_tiles", library_key="section")
    m = ig.model.UMPIRE(a, image_encoder="small_cnn", freeze_image_encoder=False, n_hidden=32, n_latent=8)
    before = {k: v.clone() for k, v in m.module.image_tower.backbone.state_dict().items() if v.is_floating_point()}
    m.train(max_epochs=2, batch_size=64, **FAST)
    after = m.module.image_tower.backbone.state_dict()
    assert any(not np.allclose(before[k].numpy(), after[k].numpy()) for k in before)
    z = m.get_latent_representation(modality="image")
    assert z.shape == (a.n_obs, 8) and np.isfinite(z).all()


def test_batch_key_is_the_old_name_of_library_key(synthetic):
    """``setup_anndata(batch_key=...)`` registers the same sections as ``library_key=``, with a FutureWarning."""
    old, new = synthetic.copy(), synthetic.copy()
    with pytest.warns(FutureWarning, match="`batch_key=` of UMPIRE.setup_anndata is renamed `library_key=`"):
        ig.model.UMPIRE.setup_anndata(old, layer="counts", image_key="X_he_tiny", batch_key="section")
    ig.model.UMPIRE.setup_anndata(new, layer="counts", image_key="X_he_tiny", library_key="section")
    m_old, m_new = ig.model.UMPIRE(old), ig.model.UMPIRE(new)
    assert m_old.library_key == m_new.library_key == "section"
    np.testing.assert_array_equal(old.obs["_scvi_batch"], new.obs["_scvi_batch"])
    assert old.obs["_scvi_batch"].nunique() == 3
    with pytest.raises(TypeError, match="pass only `library_key=`"):
        ig.model.UMPIRE.setup_anndata(new, layer="counts", image_key="X_he_tiny", library_key="section",
                                      batch_key="other")
