"""UMPIRE: setup, training, latents, prediction, save/load, and its errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

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


# ------------------------------------------------------------------------------------------
# spatial context: image_context='attention' on a context matrix (imagene.pp.context_matrix)
# ------------------------------------------------------------------------------------------
def _neighbour_synthetic(seed=0, side=18, n_sections=3, n_genes=40, d_img=16, noise=3.0):
    """Expression follows a smooth spatial field; each spot's image feature sees it through heavy noise.

    The mean feature of a spot's neighbours (the second block of the context matrix) averages the
    noise away, so the signal a model can use lives mostly in the neighbour block.
    """
    rng = np.random.default_rng(seed)
    w, proj = rng.normal(size=(4, n_genes)) * 0.8, rng.normal(size=(4, d_img))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2).astype(float)
    counts, feats, xy, sections = [], [], [], []
    for s in range(n_sections):
        phase, freq = rng.uniform(0, 2 * np.pi, size=(4, 2)), rng.uniform(0.25, 0.5, size=(4, 2))
        z = np.stack([np.sin(freq[k, 0] * grid[:, 0] + phase[k, 0]) + np.cos(freq[k, 1] * grid[:, 1] + phase[k, 1])
                      for k in range(4)], axis=1)
        counts.append(rng.poisson(np.exp(1.0 + z @ w)))
        feats.append(z @ proj + noise * rng.normal(size=(len(grid), d_img)))
        xy.append(grid * 100.0)
        sections += [f"S{s}"] * len(grid)
    x = sp.csr_matrix(np.vstack(counts).astype(np.float32))
    a = ad.AnnData(x, obs={"section": np.array(sections)})
    a.obs["section"] = a.obs["section"].astype("category")
    a.obs_names = [f"spot{i}" for i in range(a.n_obs)]
    a.var_names = [f"g{i}" for i in range(n_genes)]
    a.layers["counts"] = x.copy()
    a.obsm["spatial"] = np.vstack(xy)
    a.obsm["X_he_syn"] = np.vstack(feats).astype(np.float32)
    ig.pp.niches(a, library_key="section", niche_expression=False)
    ig.pp.context_matrix(a, ["X_he_syn"])  # the spot, then the mean of its 6 nearest spots
    return a


@pytest.fixture(scope="module")
def neighbour_data():
    a = _neighbour_synthetic()
    return a[a.obs["section"] != "S2"].copy(), a[a.obs["section"] == "S2"].copy()


def _fit_context(train, image_key, **kwargs):
    ig.settings.seed = 0
    ig.model.UMPIRE.setup_anndata(train, layer="counts", image_key=image_key, library_key="section")
    m = ig.model.UMPIRE(train, n_hidden=64, n_latent=16, dropout=0.1, **kwargs)
    m.train(max_epochs=30, batch_size=64, lr=3e-3, weight_decay=1e-4, **FAST)
    return m


def _held_out_pcc(m, test):
    pred = m.predict_expression(test, k=20, return_numpy=True)
    y = log_normalize(test.layers["counts"])
    return np.nanmean([np.corrcoef(pred[:, j], y[:, j])[0, 1] for j in range(y.shape[1])])


@pytest.fixture(scope="module")
def context_model(neighbour_data):
    train, test = neighbour_data
    train = train.copy()
    return _fit_context(train, "X_he_syn_context", image_context="attention"), train, test


def test_context_attention_builds_a_context_tower_and_round_trips(context_model, tmp_path):
    m, train, test = context_model
    tower = m.module.image_tower
    assert isinstance(tower.head, ig.nn.ContextTower) and tower.context_widths == [16, 16]
    assert m.init_params_["non_kwargs"]["context_widths"] == [16, 16]
    assert "image_context='attention' (blocks [16, 16])" in m._model_summary_string
    expected = m.predict_expression(test, return_numpy=True)
    assert expected.shape == (test.n_obs, train.n_vars) and np.isfinite(expected).all()
    m.save(tmp_path / "ctx", overwrite=True)
    for loaded in (ig.model.UMPIRE.load(tmp_path / "ctx", adata=train), ig.model.UMPIRE.load(tmp_path / "ctx")):
        assert loaded.module.image_tower.context_widths == [16, 16]
        np.testing.assert_array_equal(loaded.predict_expression(test, return_numpy=True), expected)
    # the widths travel with the model: a registered AnnData without uns[key] loads too
    bare = train.copy()
    del bare.uns["X_he_syn_context"]
    loaded = ig.model.UMPIRE.load(tmp_path / "ctx", adata=bare)
    np.testing.assert_array_equal(loaded.predict_expression(test, return_numpy=True), expected)
    # a query without the context matrix is told how to build it
    query = test.copy()
    del query.obsm["X_he_syn_context"]
    with pytest.raises(KeyError, match=r"X_he_syn_context.*context matrix.*imagene\.pp\.context_matrix"):
        m.predict_expression(query)


def test_context_attention_errors(neighbour_data):
    train = neighbour_data[0].copy()
    ig.model.UMPIRE.setup_anndata(train, layer="counts", image_key="X_he_syn_context", library_key="section")
    with pytest.raises(ValueError, match="image_context must be one of"):
        ig.model.UMPIRE(train, image_context="concat")
    with pytest.raises(ValueError, match="context_widths are the blocks of image_context='attention'"):
        ig.model.UMPIRE(train, context_widths=[16, 16])
    with pytest.raises(ValueError, match=r"sum to 30, but the image input has 32"):
        ig.model.UMPIRE(train, image_context="attention", context_widths=[16, 14])
    ig.model.UMPIRE(train, image_context="attention", context_widths=[8, 8, 16])  # explicit widths win
    deeper = ig.model.UMPIRE(train, image_context="attention", image_context_kwargs={"n_layers": 2, "n_heads": 2})
    assert len(deeper.module.image_tower.head.encoder.layers) == 2
    del train.uns["X_he_syn_context"]
    missing = r"uns\['X_he_syn_context'\]\['widths'\] is missing.*imagene.pp.context_matrix"
    with pytest.raises(ValueError, match=missing):
        ig.model.UMPIRE(train, image_context="attention")
    # without image_context the context matrix is read as plain features (LayerNorm + MLP), as before
    plain = ig.model.UMPIRE(train)
    assert plain.module.image_tower.context_widths is None
    assert isinstance(plain.module.image_tower.norm, torch.nn.LayerNorm)


def test_context_attention_beats_the_spot_alone_when_the_signal_is_in_the_neighbours(context_model, neighbour_data):
    """Held-out section correlation: the context model reads the neighbour block, the spot-only model cannot."""
    m, _, test = context_model
    plain = _fit_context(neighbour_data[0].copy(), "X_he_syn")
    r_ctx, r_plain = _held_out_pcc(m, test), _held_out_pcc(plain, test)
    assert r_ctx > r_plain + 0.05, (r_ctx, r_plain)
