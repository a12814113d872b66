"""Rank-token gene encoder: vocabulary, tokenisation, masking, pre-training, save/load, UMPIRE modes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import imagene as ig
from imagene.nn import GeneVocabulary, RankTokenizer, get_gene_encoder, load_gene_encoder, mask_tokens

FAST = {"accelerator": "cpu", "enable_progress_bar": False}
#: ids of the special tokens and of the first gene
PAD, MASK, FIRST = 0, 1, 4


# ---------------------------------------------------------------- vocabulary and tokenisation
def test_vocabulary_ids_special_tokens_and_unknown_genes():
    vocab = GeneVocabulary(["ERBB2", "KRT19", "ACTB"])
    assert len(vocab) == 7  # 4 special tokens + 3 genes
    assert vocab.ids(["ACTB", "ERBB2", "NOT_A_GENE", "<mask>"]).tolist() == [6, 4, -1, -1]
    assert "KRT19" in vocab and "<pad>" not in vocab
    with pytest.raises(ValueError, match="unique"):
        GeneVocabulary(["A", "A"])
    with pytest.raises(ValueError, match="special tokens"):
        GeneVocabulary(["A", "<cls>"])


def test_tokens_are_genes_sorted_by_cp10k_over_corpus_mean():
    # CP10k: A=6250, B=3125, C=0, D=625; divided by the means (10, 1, 1, 1): A=625, B=3125, D=625.
    # B first; A and D tie and keep input order; C (zero) is never a token; the rest is padding.
    tok = RankTokenizer(GeneVocabulary(["A", "B", "C", "D"]), np.array([10.0, 1, 1, 1]), n_tokens=5)
    ids = tok.tokenize(np.array([[10, 5, 0, 1]]), ["A", "B", "C", "D"])
    assert ids.dtype == torch.int64
    assert ids.tolist() == [[5, 4, 7, PAD, PAD]]
    # without the mean correction A (the most counted gene) comes first
    flat = RankTokenizer(GeneVocabulary(["A", "B", "C", "D"]), np.ones(4), n_tokens=2)
    assert flat.tokenize(np.array([[10, 5, 0, 1]]), ["A", "B", "C", "D"]).tolist() == [[4, 5]]


def test_query_genes_are_matched_by_symbol_and_unknown_genes_dropped():
    tok = RankTokenizer(GeneVocabulary(["A", "B"]), np.ones(2), n_tokens=3)
    # columns in another order, plus a gene the vocabulary lacks (X, the most expressed) and a missing one
    ids = tok.tokenize(np.array([[100, 1, 2]]), ["X", "B", "A"])
    assert ids.tolist() == [[4, 5, PAD]]  # A (2 counts) then B; X is never a token
    with pytest.raises(ValueError, match="None of the input genes"):
        tok.tokenize(np.array([[1, 2]]), ["X", "Y"])


def test_tokenize_sparse_dense_and_batches_agree():
    rng = np.random.default_rng(0)
    x = rng.poisson(0.5, size=(50, 40)).astype(np.float32)
    genes = [f"g{i}" for i in range(40)]
    tok = RankTokenizer(GeneVocabulary(genes), rng.uniform(0.5, 2, 40), n_tokens=16)
    dense = tok.tokenize(x, genes, batch_size=7)
    np.testing.assert_array_equal(dense.numpy(), tok.tokenize(sp.csr_matrix(x), genes).numpy())
    # each row: distinct real tokens, then only padding, as many real tokens as expressed genes (max 16)
    for row, counts in zip(dense.numpy(), x):
        real = row[row != PAD]
        assert len(set(real)) == len(real) == min(16, int((counts > 0).sum()))
        assert (row[len(real):] == PAD).all()


def test_mask_tokens_is_bert_style_and_leaves_padding():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(FIRST, 1000, (400, 100), generator=gen)
    ids[:, 80:] = PAD
    inputs, labels = mask_tokens(ids, vocab_size=1000, generator=gen)
    chosen = labels != -100
    real = ids != PAD
    assert not chosen[~real].any()  # padding is never a target
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unchosen tokens unchanged
    assert abs(chosen[real].float().mean().item() - 0.15) < 0.01
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    assert abs(masked - 0.8) < 0.02
    assert abs(kept - 0.1) < 0.02 + 0.01  # 10 % kept (+ random replacements that hit the same id, ~0.01 %)
    assert (inputs[chosen] >= FIRST).sum().item() / n > 0.18  # kept + random genes
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(ids, vocab_size=1000, mask_prob=0.0)


def test_gene_encoder_registry_builds_both_encoders():
    x = torch.poisson(torch.rand(6, 30) * 3)
    assert set(ig.nn.list_gene_encoders()) >= {"mlp", "rank_transformer"}
    for name in ("mlp", "rank_transformer"):
        enc = get_gene_encoder(name, 30, 8)
        assert enc(x).shape == (6, 8) and enc.n_output == 8
    with pytest.raises(ValueError, match="Unknown gene encoder"):
        get_gene_encoder("bert", 30, 8)
    with pytest.raises(ValueError, match="rank_transformer"):
        get_gene_encoder("mlp", 30, 8, weights="x.pt")


# ---------------------------------------------------------------- pre-training and save/load
def _corpus():
    a = ig.datasets.synthetic_he_st(n_obs=450, n_vars=60, n_sections=3, image_px=384, seed=1)
    return [a[a.obs["section"] == s].copy() for s in ("S0", "S1", "S2")]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    ig.settings.seed = 0
    s0, s1, s2 = _corpus()
    pre = ig.model.GeneEncoderPretrainer([s0, s1], n_tokens=24, d_model=32, n_layers=1, min_spots=5)
    before = pre.evaluate([s2])
    ckpt = tmp_path_factory.mktemp("mlm")
    pre.train(max_epochs=15, batch_size=32, lr=3e-3, checkpoint_dir=ckpt, validation=[s2], **FAST)
    path = ckpt / "gene_encoder.pt"
    pre.save(path)
    return pre, before, pre.evaluate([s2]), path, ckpt, (s0, s1, s2)


def test_pretraining_beats_an_untrained_encoder_on_a_held_out_section(pretrained):
    pre, before, after, *_ = pretrained
    assert after["n_masked"] > 300
    # 64 tokens: an untrained encoder is near chance (~1.6 %); masked-gene modelling learns the ranks
    assert before["untrained"] < 0.08
    # above both the untrained encoder and the per-position frequency baseline
    assert after["pretrained"] > max(2 * before["untrained"], after["frequency"]) + 0.02, (before, after)
    assert len(pre.history_["train_loss"]) == 15
    assert pre.history_["train_loss"][-1] < pre.history_["train_loss"][0]
    assert len(pre.history_["mlm_accuracy_validation"]) == 15
    # the same history in the scvi-tools format every model has, so imagene.pl.history draws it
    ax = ig.pl.history(pre, keys=["train_loss", "mlm_accuracy_validation"])
    drawn = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    assert set(drawn) == {"train_loss", "mlm_accuracy_validation"}
    np.testing.assert_allclose(drawn["mlm_accuracy_validation"], pre.history_["mlm_accuracy_validation"])


def test_nonzero_gene_means_pools_detected_spots_only():
    # spot 1: CP10k (10000, 0); spot 2: (6000, 4000); gene 3 never detected -> 1
    counts = np.array([[1, 0, 0], [3, 2, 0]])
    np.testing.assert_allclose(ig.nn.nonzero_gene_means(counts), [8000.0, 4000.0, 1.0])
    sums, n = ig.nn.nonzero_gene_means(sp.csr_matrix(counts), return_sums=True)
    np.testing.assert_allclose(sums, [16000.0, 4000.0, 0.0])
    np.testing.assert_array_equal(n, [2, 1, 0])


def test_save_load_round_trip_keeps_vocabulary_means_and_predictions(pretrained):
    pre, _, after, path, _, (_, _, s2) = pretrained
    back = ig.model.GeneEncoderPretrainer.load(path)
    assert back.vocabulary.genes == pre.vocabulary.genes
    np.testing.assert_allclose(back.tokenizer.gene_means, pre.tokenizer.gene_means)
    assert torch.equal(back.tokenize([s2]), pre.tokenize([s2]))
    assert back.evaluate([s2], untrained=False) == pytest.approx({k: after[k] for k in ("pretrained", "frequency",
                                                                                         "n_masked")})
    with pytest.raises(FileNotFoundError, match="not found"):
        ig.model.GeneEncoderPretrainer.load(path.parent / "missing.pt")


def test_loaded_encoder_matches_genes_by_symbol_for_another_panel(pretrained):
    *_, path, _, (_, _, s2) = pretrained
    x = s2.layers["counts"]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    genes = list(s2.var_names)
    enc = load_gene_encoder(path, genes).eval()
    # a query panel: columns reversed, one unknown gene added, one vocabulary gene missing (gene_00)
    perm = np.arange(len(genes))[::-1][:-1]
    q_genes = [genes[i] for i in perm] + ["NOT_IN_VOCAB"]
    q = np.concatenate([x[:, perm], np.full((len(x), 1), 50.0)], axis=1)
    enc_q = load_gene_encoder(path, q_genes).eval()
    ref = x.copy()
    ref[:, 0] = 0  # the same spots without gene_00 (which the query lacks)
    with torch.no_grad():
        h_ref = enc(torch.as_tensor(ref, dtype=torch.float32))
        h_q = enc_q(torch.as_tensor(q, dtype=torch.float32))
    np.testing.assert_allclose(h_q.numpy(), h_ref.numpy(), atol=1e-5)  # same tokens, library size aside
    with pytest.raises(ValueError, match="None of the input genes"):
        load_gene_encoder(path, [f"X{i}" for i in range(5)])


def test_checkpoint_resume_continues_the_epoch_count(pretrained):
    pre, *_, ckpt, (s0, s1, _) = pretrained
    assert (ckpt / "last.ckpt").exists()
    pre.train(max_epochs=16, batch_size=32, checkpoint_dir=ckpt, resume=True, **FAST)
    assert pre.epochs_trained_ == 16
    assert len(pre.history_["train_loss"]) == 16  # one more epoch, not 16 more
    with pytest.raises(ValueError, match="checkpoint_dir"):
        pre.train(max_epochs=1, resume=True, **FAST)


def test_a_fresh_run_overwrites_the_last_checkpoint_of_an_old_one(tmp_path):
    """A new run into a folder holding an old last.ckpt must replace it, not write last-v1.ckpt beside it."""
    ig.settings.seed = 0
    s0, s1, _ = _corpus()
    old = ig.model.GeneEncoderPretrainer([s0], n_tokens=8, d_model=16, n_layers=1, min_spots=5)
    old.train(max_epochs=1, batch_size=32, checkpoint_dir=tmp_path, **FAST)
    new = ig.model.GeneEncoderPretrainer([s1], n_tokens=8, d_model=16, n_layers=1, min_spots=5)
    new.train(max_epochs=2, batch_size=32, checkpoint_dir=tmp_path, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # the checkpoint is the new run's (2 epochs done), not the old one's (1); written at the end of
    # each epoch, it stores that epoch's 0-based index
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] + 1 == 2


# ---------------------------------------------------------------- UMPIRE with the gene encoder
@pytest.fixture(scope="module")
def umpire_data():
    a = ig.datasets.synthetic_he_st(n_obs=240, n_vars=60, n_sections=2, image_px=384, seed=2)
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=32, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    del a.obsm["imagene_tiles"]
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section")
    return a


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("mode", ["adapter", "finetune"])
def test_umpire_modes_with_pretrained_weights(pretrained, umpire_data, mode):
    path = pretrained[3]
    ig.settings.seed = 0
    m = ig.model.UMPIRE(umpire_data, gene_encoder="rank_transformer", gene_encoder_weights=str(path), mode=mode,
                        n_hidden=32, n_latent=8)
    tower = m.module.gene_tower
    encoder = tower.encoder if mode == "adapter" else tower
    body_before = {k: v for k, v in _params(encoder).items() if not k.startswith("head.")}
    # the pre-trained weights were loaded
    saved = torch.load(path, weights_only=False)["state_dict"]
    torch.testing.assert_close(body_before["token_embedding.weight"], saved["token_embedding.weight"])
    all_before = _params(m.module)
    m.train(max_epochs=2, batch_size=32, **FAST)
    after = _params(m.module)
    changed = {k for k in after if not torch.equal(after[k], all_before[k])}
    body = {k for k in after if ".transformer." in k or "token_embedding" in k}
    if mode == "adapter":
        assert not changed & body  # the pre-trained encoder is frozen
        assert any("adapter" in k for k in changed) and any(k.startswith("image_tower") for k in changed)
        assert all(not p.requires_grad for p in tower.encoder.parameters())
    else:
        assert changed & body  # fine-tuning moves the pre-trained encoder too
    z = m.get_latent_representation()
    assert z.shape == (umpire_data.n_obs, 8) and np.isfinite(z).all()


def test_umpire_default_mode_and_errors(pretrained, umpire_data):
    path = str(pretrained[3])
    assert ig.model.UMPIRE(umpire_data, gene_encoder="rank_transformer", gene_encoder_weights=path).module.mode == (
        "adapter"
    )
    assert ig.model.UMPIRE(umpire_data, gene_encoder="rank_transformer").module.mode == "finetune"
    assert ig.model.UMPIRE(umpire_data).module.mode == "finetune"  # today's default is unchanged
    with pytest.raises(ValueError, match="rank_transformer"):
        ig.model.UMPIRE(umpire_data, gene_encoder_weights=path)
    with pytest.raises(ValueError, match="mode"):
        ig.model.UMPIRE(umpire_data, mode="frozen")
    with pytest.raises(ValueError, match="objective"):
        ig.model.UMPIRE(umpire_data, objective="mlm")
    with pytest.raises(FileNotFoundError, match="not found"):
        ig.model.UMPIRE(umpire_data, gene_encoder="rank_transformer", gene_encoder_weights="/nonexistent.pt")


def test_umpire_rec_reconstructs_top_variable_genes(umpire_data):
    ig.settings.seed = 0
    m = ig.model.UMPIRE(umpire_data, objective="rec", n_rec_genes=20, n_hidden=32, n_latent=8)
    assert len(m.rec_genes_) == 20 and set(m.rec_genes_) <= set(umpire_data.var_names)
    m.train(max_epochs=3, batch_size=32, **FAST)
    loss = m.history["validation_loss"].iloc[:, 0].to_numpy(dtype=float)
    assert np.isfinite(loss).all()
    z = m.get_latent_representation(modality="image")
    assert z.shape == (umpire_data.n_obs, 8) and np.isfinite(z).all()
    with pytest.raises(ValueError, match="objective='rec'"):
        m.get_latent_representation(modality="gene")
    pred = m.predict_expression(umpire_data, return_numpy=True)
    assert pred.shape == (umpire_data.n_obs, umpire_data.n_vars) and np.isfinite(pred).all()


# ---------------------------------------------------------------- the checks' path
@pytest.mark.slow
def test_checks_path_rank_transformer_defaults(check_path_adata):
    a = check_path_adata
    before = set(a.obsm), set(a.layers), set(a.obs.columns)
    ig.settings.seed = 0
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_efficientnet_lite0", batch_key="section")
    model = ig.model.UMPIRE(a, gene_encoder="rank_transformer")
    model.train(max_epochs=5, **FAST)
    z = model.get_latent_representation()
    assert z.shape == (a.n_obs, 64) and np.isfinite(z).all()
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert len(model.history["train_loss"]) == 5
    assert (set(a.obsm), set(a.layers)) == before[:2]  # nothing written beyond scvi's registration
