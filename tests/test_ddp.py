"""Data-parallel training on Lightning's own strategies: two CPU processes (gloo) against one.

``strategy="ddp_spawn"`` with ``devices=2`` on CPU runs the same code path as multi-GPU DDP.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import imagene as ig
from imagene._utils import log_normalize
from imagene.metrics import recall_at_k
from imagene.nn import mse_pcc_loss

DDP = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn", "enable_progress_bar": False}
ONE = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def data():
    a = ig.datasets.synthetic_he_st(n_obs=200, n_vars=30, n_sections=2, image_px=256, seed=0)
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=16, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    del a.obsm["imagene_tiles"]
    return a


def _umpire(data, **train):
    a = data.copy()
    ig.settings.seed = 0
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section")
    m = ig.model.UMPIRE(a, n_hidden=16, n_latent=8)
    m.train(max_epochs=3, batch_size=32, early_stopping=False, restore_best_weights=False, **train)
    return m


def test_umpire_ddp_spawn_matches_a_single_process_run(data, tmp_path):
    ddp = _umpire(data, **DDP)
    one = _umpire(data, **ONE)
    for m in (ddp, one):
        assert m.is_trained_
        assert len(m.history["train_loss"]) == 3  # the epochs ran (before: no training batch under DDP)
    # the validation metric is computed once over the whole held-out section, not per shard:
    # it equals the recall of the final weights over every validation spot
    val = np.flatnonzero(ddp.adata.obs["section"].to_numpy() == "S1")
    zi = ddp.get_latent_representation(indices=val, modality="image")
    zg = ddp.get_latent_representation(indices=val, modality="gene")
    by_hand = 0.5 * (recall_at_k(zi, zg, k_percent=5) + recall_at_k(zg, zi, k_percent=5))
    logged = float(ddp.history["recall5_validation"].iloc[-1, 0])
    assert logged == pytest.approx(by_hand, abs=1e-6)
    # similar to one process (each rank sees half the batches, so not identical)
    r_one = float(one.history["recall5_validation"].iloc[-1, 0])
    assert abs(logged - r_one) < 0.15, (logged, r_one)
    # the reference bank covers every training spot, once
    assert ddp.reference_latent_.shape == one.reference_latent_.shape == (ddp.adata.n_obs, 8)
    ddp.save(tmp_path / "ddp")
    one.save(tmp_path / "one")
    files = {d: sorted(p.name for p in (tmp_path / d).rglob("*")) for d in ("ddp", "one")}
    assert files["ddp"] == files["one"] and files["ddp"]


def _other(name, data):
    a = data.copy()
    ig.settings.seed = 0
    if name == "STAlign":
        ig.model.STAlign.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section",
                                       spot_tile_size_um=24, spot_tile_px=16, niche_encoder="tiny", niche_tile_px=16)
        return ig.model.STAlign(a, n_latent=16, n_hidden=16), {"batch_size": 32, "probe_epochs": 1}
    if name == "SIGMMA":
        ig.model.SIGMMA.setup_anndata(a, layer="counts", image_key=None, library_key="section", encoder="tiny",
                                      crop_px=16, tile_size_um=70)
        return ig.model.SIGMMA(a, n_latent=8, n_hidden=16), {"batch_size": 4}
    a.varm["gene_vec"] = np.random.default_rng(1).normal(size=(a.n_vars, 16)).astype(np.float32)
    ig.model.AlignST.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section", nuclei_key=None,
                                   gene_embedding_key="gene_vec")
    return ig.model.AlignST(a, n_hidden=16, n_layers=1), {"seen_genes": list(a.var_names[2:])}


@pytest.mark.parametrize("name", ["STAlign", "SIGMMA"])
def test_other_models_train_under_ddp_spawn(name, data):
    m, kw = _other(name, data)
    before = {k: v.detach().clone() for k, v in m.module.state_dict().items()}
    m.train(max_epochs=2, early_stopping=False, **kw, **DDP)
    assert m.is_trained_
    changed = [k for k, v in m.module.state_dict().items() if not np.array_equal(before[k].numpy(), v.numpy())]
    assert changed  # the weights trained in the worker processes came back
    assert np.isfinite(m.get_latent_representation()).all()
    # the epoch the workers restored is known in the main process (restore_best_weights is on by default)
    monitor = m.train_monitor_
    values = m.history[monitor["monitor"]].iloc[:, 0].to_numpy()
    assert monitor["restored_epoch"] == int(np.argmax(values) if monitor["mode"] == "max" else np.argmin(values))


@pytest.fixture(scope="module")
def three_sections():
    a = ig.datasets.synthetic_he_st(n_obs=240, n_vars=30, n_sections=3, image_px=256, seed=0)
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=16, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    del a.obsm["imagene_tiles"]
    a.varm["gene_vec"] = np.random.default_rng(1).normal(size=(a.n_vars, 16)).astype(np.float32)
    return a


def _alignst(data, **train):
    a = data.copy()
    ig.settings.seed = 0
    ig.model.AlignST.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section", nuclei_key=None,
                                   gene_embedding_key="gene_vec")
    m = ig.model.AlignST(a, n_hidden=16, n_layers=1)
    m.train(max_epochs=3, seen_genes=list(a.var_names[2:]), validation_sections=["S2"], early_stopping=False,
            restore_best_weights=True, **train)
    return m


def test_alignst_ddp_spawn_matches_a_single_process_run(three_sections, tmp_path):
    # nuclei_key=None leaves the nuclei fusion idle (DDP then needs find_unused_parameters); one training
    # section per rank, every rank validates on S2
    ddp = _alignst(three_sections, **DDP)
    one = _alignst(three_sections, **ONE)
    for m in (ddp, one):
        assert m.is_trained_
        assert len(m.history["train_loss"]) == len(m.history["pcc_validation"]) == 3  # the history came back
    # the best epoch restored in the workers is known in the main process, and it is the best of the history
    pcc = ddp.history["pcc_validation"].iloc[:, 0].to_numpy()
    best = ddp.train_monitor_["restored_epoch"]
    assert best == int(np.argmax(pcc)) and ddp.train_monitor_["best_value"] == pytest.approx(pcc[best], abs=1e-6)
    # the validation metric is computed once over the held-out section (reduced over the ranks): it equals
    # the mean per-gene Pearson r of the returned (restored) weights' predictions
    val = np.flatnonzero(ddp.adata.obs["section"].to_numpy() == "S2")
    seen = ddp.seen_genes_
    pred = ddp.predict_expression(gene_list=seen, return_numpy=True)[val]
    y = log_normalize(ddp.adata[val, seen].layers["counts"])
    by_hand = float(mse_pcc_loss(torch.as_tensor(pred), torch.as_tensor(y))[1])
    assert pcc[best] == pytest.approx(by_hand, abs=1e-5)
    # similar to one process: an epoch is one step over both sections (one per rank) instead of two
    # steps, so the loss falls more slowly, but alike
    one_loss = one.history["validation_loss"].iloc[:, 0].to_numpy()
    ddp_loss = ddp.history["validation_loss"].iloc[:, 0].to_numpy()
    assert ddp_loss[-1] < ddp_loss[0] and one_loss[-1] < one_loss[0]
    assert np.allclose(ddp_loss, one_loss, rtol=0.25), (ddp_loss, one_loss)
    assert abs(pcc[best] - one.train_monitor_["best_value"]) < 0.15
    ddp.save(tmp_path / "ddp")
    one.save(tmp_path / "one")
    files = {d: sorted(p.name for p in (tmp_path / d).rglob("*")) for d in ("ddp", "one")}
    assert files["ddp"] == files["one"] and files["ddp"]


def test_alignst_needs_a_training_section_per_process(data):
    m, kw = _other("AlignST", data)
    with pytest.raises(ValueError, match="at most 1 devices"):
        m.train(max_epochs=1, validation_sections=["S1"], **kw, **DDP)
    assert not m.is_trained_
