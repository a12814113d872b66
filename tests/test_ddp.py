"""Data-parallel training on Lightning's own strategies: two CPU processes (gloo) against one.

``strategy="ddp_spawn"`` with ``devices=2`` on CPU runs the same code path as multi-GPU DDP.
"""

from __future__ import annotations

import numpy as np
import pytest

import imagene as ig
from imagene.metrics import recall_at_k

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
    ig.model.AlignST.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section", nuclei_key=None,
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


def test_alignst_refuses_ddp_with_the_fix(data):
    m, kw = _other("AlignST", data)
    with pytest.raises(NotImplementedError, match="devices=1"):
        m.train(max_epochs=1, **kw, **DDP)
    assert not m.is_trained_
