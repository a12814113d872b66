"""STAlign: the ABFN, the three-target loss, setup / train / latents / prediction / save-load, ablations, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import imagene as ig
from imagene._utils import log_normalize
from imagene.nn import ABFN, ConcatFusion, NicheGeneTransformer

FAST = {"accelerator": "cpu", "enable_progress_bar": False}
SMALL = {"n_latent": 32, "n_hidden": 64, "n_tokens": 4, "dropout": 0.1}


# ---------------------------------------------------------------------------------------------
# building blocks (fast)
# ---------------------------------------------------------------------------------------------
def test_abfn_shapes_attention_and_errors():
    torch.manual_seed(0)
    fuse = ABFN(64, n_tokens=8)
    img, gene = torch.randn(5, 64), torch.randn(5, 64)
    out, a_ig, a_gi = fuse(img, gene, return_attention=True)
    assert out.shape == (5, 64) and torch.isfinite(out).all()
    assert a_ig.shape == a_gi.shape == (5, 8, 8)  # s x s token attention per spot
    torch.testing.assert_close(a_ig.sum(-1), torch.ones(5, 8))  # rows are distributions
    # W_q, W_k, W_v are l x l (l = d / s = 8); W_I, W_G are l x l/2
    assert fuse.q_image.weight.shape == (8, 8) and fuse.w_image.weight.shape == (4, 8)
    # the first half of each token comes from the image stream, the second from the gene stream
    out2 = fuse(img, torch.randn(5, 64))
    tok, tok2 = out.reshape(5, 8, 8), out2.reshape(5, 8, 8)
    assert not torch.allclose(tok[..., 4:], tok2[..., 4:])
    # cross-attention: the image half depends on the gene input (values come from gene tokens)
    assert not torch.allclose(tok[..., :4], tok2[..., :4])
    with pytest.raises(ValueError, match="n_tokens"):
        ABFN(60, n_tokens=8)
    with pytest.raises(ValueError, match="features"):
        fuse(torch.randn(5, 32), torch.randn(5, 32))
    assert ConcatFusion(16)(torch.randn(3, 16), torch.randn(3, 16)).shape == (3, 16)


def test_spot_tile_encoder_reads_uint8_and_float_tiles_alike():
    """The training loader hands uint8 obsm tiles over as float32 (0-255); inference passes uint8.

    Both must give the same embedding, or the CNN learns on one scale and is used on another.
    """
    from imagene.module._stalign import _TileEncoder

    torch.manual_seed(0)
    enc = _TileEncoder("small_cnn", 16, input_px=16, width=4).eval()
    tiles = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    torch.testing.assert_close(enc(tiles), enc(tiles.float()))


def test_niche_transformer_is_configurable_to_the_paper_size():
    enc = NicheGeneTransformer(50, 32, n_tokens=4, d_model=16, n_layers=6, n_heads=8, dropout=0.1)
    assert len(enc.encoder.layers) == 6 and enc.encoder.layers[0].self_attn.num_heads == 8
    z = enc(torch.poisson(torch.ones(3, 50)))
    assert z.shape == (3, 32) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="divisible"):
        NicheGeneTransformer(50, 32, d_model=30, n_heads=4)


def _module(**kw):
    torch.manual_seed(0)
    return ig.module.STAlignModule(40, 24, 24, adaptive_encoders=False, **{**SMALL, **kw})


def _outputs(rng, n=32, d=32, noise=0.3):
    """Unit embeddings where image/gene and spot/niche partners are close (row i pairs with row i)."""
    base = torch.as_tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    other = torch.as_tensor(rng.normal(size=(n, d)), dtype=torch.float32)

    def near(x):
        return torch.nn.functional.normalize(x + noise * torch.as_tensor(rng.normal(size=x.shape), dtype=torch.float32), dim=-1)

    return {
        "z_image": near(base), "z_gene": near(base),
        "z_niche_image": near(other), "z_niche_gene": near(other),
        "f_spot": near(base + other), "f_niche": near(base + other),
    }


@pytest.mark.parametrize("niche_loss", [True, False])
def test_loss_paired_batch_scores_lower_than_shuffled(niche_loss):
    m = _module(niche_loss=niche_loss)
    out = _outputs(np.random.default_rng(0))
    perm = torch.as_tensor(np.random.default_rng(1).permutation(32))
    paired = m.loss({}, out)
    for shuffled_keys in (("z_gene",), ("z_niche_gene",), ("f_niche",)):
        shuffled = {k: (v[perm] if k in shuffled_keys else v) for k, v in out.items()}
        loss = m.loss({}, shuffled)
        if shuffled_keys == ("f_niche",) and not niche_loss:
            # the ablation drops L_NS: shuffling the niche partners changes nothing
            torch.testing.assert_close(loss.loss, paired.loss)
        else:
            assert float(loss.loss) > float(paired.loss) + 0.5, (shuffled_keys, float(loss.loss), float(paired.loss))
    # the weights: λ1·CL_spot + λ2·CL_niche + (1-λ1-λ2)·L_NS
    m2 = _module(lambda_spot=0.5, lambda_niche=0.2)
    lo = m2.loss({}, out)
    e = lo.extra_metrics
    expected = 0.5 * e["cl_spot"] + 0.2 * e["cl_niche"] + 0.3 * e["l_ns"]
    torch.testing.assert_close(lo.loss.detach(), expected)
    with pytest.raises(ValueError, match="lambda"):
        _module(lambda_spot=0.8, lambda_niche=0.4)
    with pytest.raises(ValueError, match="fusion"):
        _module(fusion="sum")


# ---------------------------------------------------------------------------------------------
# the model on synthetic sections (a real image on disk-free arrays, tiny encoders)
# ---------------------------------------------------------------------------------------------
def _synthetic(seed=0, n_obs=300):
    a = ig.datasets.synthetic_he_st(n_obs=n_obs, n_vars=60, n_sections=3, image_px=384, seed=seed)
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=32, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    del a.obsm["imagene_tiles"]
    return a


SETUP = {"spot_tile_size_um": 24, "spot_tile_px": 16, "niche_encoder": "tiny", "niche_tile_px": 32}


@pytest.fixture(scope="module")
def synthetic():
    return _synthetic()


@pytest.fixture(scope="module")
def trained(synthetic):
    a = synthetic[synthetic.obs["section"] != "S2"].copy()
    ig.settings.seed = 0
    ig.model.STAlign.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section", **SETUP)
    m = ig.model.STAlign(a, **SMALL)
    m.train(max_epochs=25, batch_size=32, lr=3e-3, early_stopping=False, probe_epochs=40, **FAST)
    return m, a, synthetic[synthetic.obs["section"] == "S2"].copy()


def test_setup_builds_niche_graph_tiles_and_niche_features(trained):
    m, a, _ = trained
    n = a.n_obs
    conn = a.obsp["imagene_niche_connectivities"]
    assert conn.shape == (n, n) and "imagene_niche_distances" in a.obsp
    sec = a.obs["section"].to_numpy()
    rows, cols = conn.nonzero()
    assert np.all(sec[rows] == sec[cols])  # niches never cross sections
    assert np.all(np.diff(sp.csr_matrix(conn).indptr) == 3)  # the paper's 3 nearest spots
    # niche mean = mean of the spot and its neighbours' counts
    c = sp.csr_matrix(a.layers["counts"]).toarray()
    i = 7
    nb = sp.csr_matrix(conn)[i].indices
    np.testing.assert_allclose(np.asarray(a.layers["imagene_niche_mean"][i].todense()).ravel(), c[[i, *nb]].mean(0), rtol=1e-5)
    tiles = a.obsm["imagene_spot_tiles"]
    assert tiles.shape == (n, 16, 16, 3) and tiles.dtype == np.uint8 and tiles.std() > 5
    niche = a.obsm["X_he_niche_tiny"]
    assert niche.shape[0] == n and np.isfinite(niche).all()
    assert a.uns["X_he_niche_tiny"]["tile_size_um"] > 24  # larger than a spot tile


def test_latents_one_finite_unit_row_per_spot_for_every_modality(trained):
    m, a, test = trained
    for modality in ("fused", "image", "gene", "niche", "joint"):
        z = m.get_latent_representation(modality=modality)
        assert z.shape == (a.n_obs, 32) and z.dtype == np.float32 and np.isfinite(z).all(), modality
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    # a query section is prepared on the fly and nothing is written to it
    keys = set(test.obsm) | set(test.obsp) | set(test.layers)
    z = m.get_latent_representation(test, modality="fused")
    assert z.shape == (test.n_obs, 32) and np.isfinite(z).all()
    assert set(test.obsm) | set(test.obsp) | set(test.layers) == keys
    with pytest.raises(ValueError, match="modality"):
        m.get_latent_representation(modality="text")


def test_training_aligns_image_and_gene_on_a_held_out_section(trained):
    m, _, test = trained
    loss = m.history["train_loss"].iloc[:, 0].to_numpy()
    assert loss[-5:].mean() < loss[:3].mean()
    zi = m.get_latent_representation(test, modality="image")
    zg = m.get_latent_representation(test, modality="gene")
    sim = zi @ zg.T
    domain = test.obs["domain"].astype(str).to_numpy()
    top = np.argsort(-sim, axis=1)[:, : int(np.ceil(0.05 * len(sim)))]
    assert (domain[top] == domain[:, None]).mean() > 0.6  # chance ~ 1/3 (three domains)
    # the fused embedding separates the tissue domains of the unseen section (zero-shot clustering)
    from sklearn.cluster import KMeans

    zf = m.get_latent_representation(test, modality="fused")
    labels = KMeans(3, n_init=10, random_state=0).fit_predict(zf)
    assert ig.metrics.ari(domain, labels) > 0.3


def test_trained_module_scores_paired_batches_lower_than_shuffled(trained):
    m, _, test = trained
    mod = m.module
    mod.eval()
    inp = m._inputs(test, image=True, gene=True)
    n = min(64, test.n_obs)
    dense = {k: (v[:n].toarray() if sp.issparse(v) else np.asarray(v[:n])) for k, v in inp.items()}
    t = {k: torch.as_tensor(v) for k, v in dense.items()}
    perm = torch.as_tensor(np.random.default_rng(0).permutation(n))
    with torch.no_grad():
        paired = mod.loss({}, mod.inference(**t)).loss
        shuffled = mod.loss({}, mod.inference(**{**t, "x": t["x"][perm], "niche_x": t["niche_x"][perm]})).loss
    assert float(shuffled) > float(paired)


def test_predictions_into_layers_reference_and_probe(trained):
    m, a, test = trained
    truth = log_normalize(test.layers["counts"])
    truth = truth.toarray() if sp.issparse(truth) else np.asarray(truth)
    markers = np.arange(30)  # the synthetic domain marker genes
    m.fit_expression_head()  # the ridge head shared by every alignment model, on the two training sections
    for method in ("reference", "probe", "head"):
        q = test.copy()
        ig.tl.predict_expression(m, q, method=method)
        pred = q.layers["imagene_predicted"]
        assert pred.shape == q.shape and np.isfinite(pred).all() and (pred >= 0).all()
        r = ig.metrics.mean_pearson(truth[:, markers], np.asarray(pred)[:, markers])
        assert r > 0.2, (method, r)
    with pytest.raises(ValueError, match="method"):
        m.predict_expression(test, method="ridge")


def test_save_load_round_trip(trained, tmp_path):
    m, a, test = trained
    m.save(tmp_path / "m", overwrite=True)
    m2 = ig.model.STAlign.load(tmp_path / "m", adata=a)
    for modality in ("fused", "niche", "image"):
        np.testing.assert_allclose(
            m2.get_latent_representation(test, modality=modality),
            m.get_latent_representation(test, modality=modality),
            atol=1e-5,
        )
    np.testing.assert_allclose(
        m2.predict_expression(test, method="probe", return_numpy=True),
        m.predict_expression(test, method="probe", return_numpy=True),
        atol=1e-4,
    )
    np.testing.assert_allclose(
        m2.predict_expression(test, return_numpy=True), m.predict_expression(test, return_numpy=True), atol=1e-4
    )


@pytest.mark.parametrize(
    "switch",
    [{"fusion": "concat"}, {"niche_loss": False}, {"adaptive_encoders": False}],
)
def test_ablation_switches_train_and_embed(synthetic, switch):
    a = synthetic[synthetic.obs["section"] != "S2"].copy()
    ig.model.STAlign.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section", **SETUP)
    m = ig.model.STAlign(a, **{**SMALL, **switch})
    m.train(max_epochs=2, batch_size=64, probe_epochs=1, **FAST)
    key, value = next(iter(switch.items()))
    if key == "fusion":
        assert isinstance(m.module.fusion, ConcatFusion)
    elif key == "niche_loss":
        # without L_NS its value is still logged but does not enter the loss
        assert not m.module.niche_loss
    else:
        assert isinstance(m.module.niche_gene, ig.nn.GeneMLPEncoder)
    z = m.get_latent_representation(modality="fused")
    assert z.shape == (a.n_obs, 32) and np.isfinite(z).all()


def test_without_image_adaptive_encoders_need_one_and_the_fallback_works(synthetic):
    a = synthetic[synthetic.obs["section"] != "S2"].copy()
    for lib in a.uns["spatial"]:
        a.uns["spatial"][lib].pop("images", None)
        a.uns["spatial"][lib].get("metadata", {}).pop("source_image_path", None)
    with pytest.warns(UserWarning, match="no H&E image"):
        ig.model.STAlign.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section", **SETUP)
    assert "imagene_spot_tiles" not in a.obsm
    # the documented fallback: niche image features are the niche mean of the spot features
    conn = sp.csr_matrix(a.obsp["imagene_niche_connectivities"])
    i = 3
    idx = [i, *conn[i].indices]
    np.testing.assert_allclose(a.obsm["X_he_niche_tiny"][i], a.obsm["X_he_tiny"][idx].mean(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="adaptive_encoders=False"):
        ig.model.STAlign(a, **SMALL)
    m = ig.model.STAlign(a, adaptive_encoders=False, **SMALL)
    m.train(max_epochs=1, batch_size=64, probe_epochs=0, **FAST)
    assert np.isfinite(m.get_latent_representation()).all()


def test_batch_key_is_the_old_name_of_library_key(synthetic):
    a = synthetic[synthetic.obs["section"] != "S2"].copy()
    b = a.copy()
    ig.model.STAlign.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section", **SETUP)
    with pytest.warns(FutureWarning, match="library_key"):
        ig.model.STAlign.setup_anndata(b, layer="counts", image_key="X_he_tiny", batch_key="section", **SETUP)
    ma, mb = ig.model.STAlign(a, **SMALL), ig.model.STAlign(b, **SMALL)
    assert ma.library_key == mb.library_key == "section"
    assert ma._setup_args == mb._setup_args
    np.testing.assert_array_equal(a.obs["_scvi_batch"], b.obs["_scvi_batch"])
    for key in ("imagene_spot_tiles", "X_he_niche_tiny"):
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])


def test_setup_errors_leave_adata_unchanged(synthetic):
    a = synthetic.copy()
    before = (set(a.obsm), set(a.obsp), set(a.layers), set(a.uns))
    with pytest.raises(KeyError, match="embed_tiles"):
        ig.model.STAlign.setup_anndata(a, layer="counts", image_key="X_he_missing", **SETUP)
    with pytest.raises(KeyError, match="library_key"):
        ig.model.STAlign.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="nope", **SETUP)
    with pytest.raises(ValueError, match="view"):
        ig.model.STAlign.setup_anndata(a[:50], layer="counts", image_key="X_he_tiny", **SETUP)
    assert (set(a.obsm), set(a.obsp), set(a.layers), set(a.uns)) == before


# ---------------------------------------------------------------------------------------------
# the path our checks call: real her2st sections, defaults
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_checks_path_real_sections(check_path_adata):
    adata = check_path_adata
    n = adata.n_obs
    ig.settings.seed = 0
    ig.model.STAlign.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", batch_key="section")
    # the spot tiles the model cut itself (28 px, the paper's size) and the niche tile features
    assert adata.obsm["imagene_spot_tiles"].shape == (n, 28, 28, 3)
    assert adata.obsm["imagene_spot_tiles"].std() > 10  # real tissue, not padding
    assert adata.obsm["X_he_niche_efficientnet_lite0"].shape == (n, 1280)
    size = adata.uns["X_he_niche_efficientnet_lite0"]["tile_size_um"]
    assert 400 <= size <= 800  # covers the spot and its 3 nearest neighbours (legacy ST pitch: 200 µm)
    # the niche graph of the checks' path (6 neighbours, per section) is the one used
    assert np.all(np.diff(sp.csr_matrix(adata.obsp["imagene_niche_connectivities"]).indptr) == 6)
    model = ig.model.STAlign(adata)
    model.train(max_epochs=5, enable_progress_bar=False)
    z = model.get_latent_representation()
    assert z.shape == (n, 128) and np.isfinite(z).all()
    assert len(model.history["train_loss"]) == 5
    # held-out section C4 validates; the early-stopping monitor is a real retrieval score
    assert set(adata.obs["section"].iloc[model.validation_indices]) == {"C4"}
    rec = model.history["recall5_validation"].iloc[:, 0].to_numpy()
    assert np.all((rec >= 0) & (rec <= 1))
    ig.tl.predict_expression(model, adata, method="probe")
    pred = adata.layers["imagene_predicted"]
    assert pred.shape == adata.shape and np.isfinite(pred).all()
