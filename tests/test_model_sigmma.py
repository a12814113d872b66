"""SIGMMA: tile graphs, the block-constrained Gumbel edge sampler, per-scale latents, retrieval, save/load.

Spot level on synthetic sections and on the checks' path (her2st B4, C2, C3, C4); cell level on a
synthetic Xenium-like SpatialData (cells over a real H&E crop of her2st C3) read with
``imagene.io.from_spatialdata``.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch

import imagene as ig
from imagene._constants import KEYS

FAST = {"accelerator": "cpu", "enable_progress_bar": False}
G = KEYS.TILE_GRAPHS
SCALES = ("micro", "meso", "macro")


def _synthetic(seed=0):
    return ig.datasets.synthetic_he_st(n_obs=360, n_vars=60, n_sections=3, image_px=384, seed=seed)


@pytest.fixture(scope="module")
def synthetic():
    return _synthetic()


@pytest.fixture(scope="module")
def trained(synthetic):
    a = synthetic[synthetic.obs["section"] != "S2"].copy()
    ig.settings.seed = 0
    # 70 µm tiles of 2 spot pitches: ~20 tiles per section, enough InfoNCE negatives
    ig.model.SIGMMA.setup_anndata(
        a, layer="counts", image_key=None, library_key="section", encoder="tiny", crop_px=16, tile_size_um=70
    )
    m = ig.model.SIGMMA(a, n_latent=16, n_hidden=32, dropout=0.1)
    m.train(max_epochs=20, batch_size=8, lr=3e-3, early_stopping=False, **FAST)
    return m, a, synthetic[synthetic.obs["section"] == "S2"].copy()


# ------------------------------------------------------------------ pp.tile_graphs
def test_tile_graphs_blocks_nest_and_micro_edges_stay_in_blocks(synthetic):
    a = synthetic.copy()
    ig.pp.tile_graphs(a, tile_size_um=200, library_key="section", n_neighs=6)
    tile = a.obs[f"{G}_tile"].to_numpy()
    blocks = a.obsm[f"{G}_blocks"]
    tiles = a.uns[G]["tiles"]
    assert blocks.shape == (a.n_obs, 3) and list(a.uns[G]["block_grids"]) == [4, 2, 1]
    assert tiles["n_nodes"].sum() == a.n_obs and (tiles["n_nodes"] > 0).all()
    # a tile never spans two sections, and every node lies inside its tile's square
    assert (tiles["section"].to_numpy()[tile] == a.obs["section"].astype(str).to_numpy()).all()
    xy = a.obsm["spatial"]
    x0, y0, size = (tiles[c].to_numpy()[tile] for c in ("x0_px", "y0_px", "size_px"))
    assert np.allclose(size, 200.0)  # 1 µm per pixel in the synthetic sections
    assert ((xy[:, 0] >= x0 - 1e-6) & (xy[:, 0] < x0 + size) & (xy[:, 1] >= y0 - 1e-6) & (xy[:, 1] < y0 + size)).all()
    # blocks nest: the 2x2 block is the 4x4 block's parent, the 1x1 block is the whole tile
    b4x, b4y = blocks[:, 0] % 4, blocks[:, 0] // 4
    assert (blocks[:, 1] == (b4y // 2) * 2 + b4x // 2).all() and (blocks[:, 2] == 0).all()
    # the 4x4 block is where the node sits inside the tile
    assert (np.floor((xy[:, 0] - x0) / (size / 4)) == b4x).all()
    # micro graph: symmetric, only inside one micro block of one tile; distance graph inside tiles
    conn = a.obsp[f"{G}_connectivities"].tocoo()
    assert conn.nnz > 0 and (abs(a.obsp[f"{G}_connectivities"] - a.obsp[f"{G}_connectivities"].T)).nnz == 0
    assert (blocks[conn.row, 0] == blocks[conn.col, 0]).all() and (tile[conn.row] == tile[conn.col]).all()
    dist = a.obsp[f"{G}_distances"].tocoo()
    assert (tile[dist.row] == tile[dist.col]).all() and dist.nnz > conn.nnz


def test_tile_graphs_bad_input_leaves_adata_untouched(synthetic):
    a = synthetic.copy()
    before = (set(a.obs), set(a.obsm), set(a.obsp), set(a.uns))
    with pytest.raises(ValueError, match="power of two"):
        ig.pp.tile_graphs(a, grid=3)
    with pytest.raises(ValueError, match="tile_size_um"):
        ig.pp.tile_graphs(a, tile_size_um=-5)
    with pytest.raises(KeyError, match="tile_graphs"):
        ig.pp.embed_tile_crops(a, encoder="tiny")
    assert (set(a.obs), set(a.obsm), set(a.obsp), set(a.uns)) == before


def test_embed_tile_crops_missing_image_names_the_fix(synthetic):
    a = synthetic[synthetic.obs["section"] == "S0"].copy()
    ig.pp.tile_graphs(a, library_key="section")
    a.uns["spatial"]["S0"]["images"] = {}
    a.uns["spatial"]["S0"].setdefault("metadata", {})["source_image_path"] = "/nonexistent/he.jpg"
    with pytest.raises((KeyError, ValueError, FileNotFoundError), match="source_image_path|image="):
        ig.pp.embed_tile_crops(a, encoder="tiny", input_px=16)
    assert KEYS.TILE_CROPS not in a.uns


def test_prepare_tile_graphs_builds_once_then_reuses_and_copy_writes_nothing(synthetic, caplog):
    import logging

    a = synthetic[synthetic.obs["section"] == "S0"].copy()
    before = (set(a.obs), set(a.obsm), set(a.obsp), set(a.uns))
    light = ig.pp.prepare_tile_graphs(a, tile_size_um=70, library_key="section", encoder="tiny", input_px=16, copy=True)
    assert (set(a.obs), set(a.obsm), set(a.obsp), set(a.uns)) == before  # copy=True: nothing written into a
    assert light is not a and KEYS.TILE_CROPS in light.uns and f"{G}_tile" in light.obs
    with caplog.at_level(logging.INFO, logger="imagene"):
        assert ig.pp.prepare_tile_graphs(a, tile_size_um=70, library_key="section", encoder="tiny", input_px=16) is None
    added = {r.getMessage() for r in caplog.records if r.getMessage().startswith("Adding")}
    for key in (f"obs['{G}_tile']", f"obsm['{G}_blocks']", f"obsp['{G}_connectivities']", f"obsp['{G}_distances']",
                f"uns['{G}']", f"uns['{KEYS.TILE_CROPS}']"):
        assert f"Adding `adata.{key}`" in added, added  # every key it adds is logged
    np.testing.assert_array_equal(light.obs[f"{G}_tile"].to_numpy(), a.obs[f"{G}_tile"].to_numpy())
    np.testing.assert_array_equal(light.uns[KEYS.TILE_CROPS]["features"]["4"], a.uns[KEYS.TILE_CROPS]["features"]["4"])
    # consistent inputs are reused: nothing is recomputed, and copy=True returns the AnnData itself
    feats = a.uns[KEYS.TILE_CROPS]["features"]["4"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imagene"):
        ig.pp.prepare_tile_graphs(a, tile_size_um=70, library_key="section", encoder="tiny", input_px=16)
        assert ig.pp.prepare_tile_graphs(a, encoder="tiny", input_px=16, copy=True) is a
    assert not [r for r in caplog.records if r.getMessage().startswith("Adding")]
    assert a.uns[KEYS.TILE_CROPS]["features"]["4"] is feats
    # other crop settings: only the crops are recomputed
    ig.pp.prepare_tile_graphs(a, tile_size_um=70, library_key="section", encoder="tiny", input_px=24)
    assert a.uns[KEYS.TILE_CROPS]["input_px"] == 24


# ------------------------------------------------------------------ the Gumbel edge sampler
def _random_graph(n=80, n_tiles=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    node_tile = torch.randint(0, n_tiles, (n,), generator=g)
    b4 = torch.randint(0, 16, (n,), generator=g)
    b2 = (b4 // 4 // 2) * 2 + (b4 % 4) // 2
    blocks = torch.stack([b4, b2, torch.zeros_like(b4)], 1)
    i, j = torch.triu_indices(n, n, offset=1)
    return torch.randn(n, 8, generator=g), torch.stack([i, j]), blocks, node_tile


def test_gumbel_sampler_never_joins_non_neighbouring_blocks():
    torch.manual_seed(0)
    h, cand, blocks, node_tile = _random_graph()
    sampler = ig.nn.GumbelEdgeSampler(8, 16, tau=0.5)
    sampler.train()
    n_kept = 0
    for _ in range(10):  # many stochastic draws
        e, w, p = sampler(h, cand, block=blocks[:, 1], group=node_tile)
        kept = e[:, w > 0.5]
        n_kept += kept.shape[1]
        i, j = kept
        assert (blocks[i, 1] == blocks[j, 1]).all()  # same meso block = two neighbouring micro blocks
        assert (node_tile[i] == node_tile[j]).all() and (i != j).all()
        assert set(w.detach().unique().tolist()) <= {0.0, 1.0}  # hard straight-through values
        assert ((p > 0) & (p < 1)).all()
    assert n_kept > 0  # the check saw edges
    # the whole encoder: edges added at meso stay in one meso block, at macro in one tile
    enc = ig.nn.MultiScaleGraphEncoder(8, 16)
    enc.train()
    micro = cand[:, (blocks[cand[0], 0] == blocks[cand[1], 0]) & (node_tile[cand[0]] == node_tile[cand[1]])]
    out = enc(h, torch.cat([micro, micro.flip(0)], 1), [cand, cand], blocks, node_tile)
    assert len(out["h"]) == 3 and all(x.shape == (80, 16) for x in out["h"])
    (em, wm), (eM, wM) = zip(out["edges"], out["weights"], strict=True)
    assert (blocks[em[0, wm > 0.5], 1] == blocks[em[1, wm > 0.5], 1]).all()
    assert (node_tile[eM[0, wM > 0.5]] == node_tile[eM[1, wM > 0.5]]).all()


def test_gumbel_sampler_gradients_reach_the_edge_scorer():
    torch.manual_seed(0)
    h, cand, blocks, node_tile = _random_graph(60, 3)
    sampler = ig.nn.GumbelEdgeSampler(8, 16, tau=0.5)
    sampler.train()
    e, w, _ = sampler(h, cand, block=blocks[:, 1], group=node_tile)
    target = torch.randn(w.shape[0])
    (w * target).sum().backward()
    grads = [p.grad for p in sampler.scorer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # straight-through: the forward value is hard, the gradient is the relaxed sigmoid's
    logits = torch.zeros(1000, requires_grad=True)
    y = ig.nn.gumbel_sigmoid(logits, tau=1.0)
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0} and 0.4 < float(y.mean()) < 0.6  # p = sigmoid(0)
    y.sum().backward()
    assert (logits.grad > 0).all()
    with pytest.raises(ValueError, match="tau"):
        ig.nn.gumbel_sigmoid(logits, tau=0.0)
    # no stochastic edges: every allowed candidate is kept, nothing to learn
    fixed = ig.nn.GumbelEdgeSampler(8, tau=0.5, stochastic=False)
    e2, w2, _ = fixed(h, cand, block=blocks[:, 1], group=node_tile)
    n_allowed = int(ig.nn.GumbelEdgeSampler.allowed(cand, blocks[:, 1], node_tile).sum())
    assert e2.shape[1] == 2 * n_allowed and bool((w2 == 1).all())


# ------------------------------------------------------------------ the model, spot level (synthetic)
def test_per_scale_latents_shapes_finite_and_obsm(trained):
    m, a, held = trained
    for modality in ("image", "gene", "joint"):
        for scale in SCALES:
            z = m.get_latent_representation(modality=modality, scale=scale)
            assert z.shape == (a.n_obs, 16) and np.isfinite(z).all()
            assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-4)
        z = m.get_latent_representation(modality=modality)
        assert z.shape == (a.n_obs, 48) and np.isfinite(z).all()
    # micro latents differ between spots of one tile (block pooling), macro latents do not
    tile = a.obs[f"{G}_tile"].to_numpy()
    zi_micro = m.get_latent_representation(modality="image", scale="micro")
    zi_macro = m.get_latent_representation(modality="image", scale="macro")
    t = np.bincount(tile).argmax()
    rows = np.flatnonzero(tile == t)
    assert np.allclose(zi_macro[rows], zi_macro[rows[0]], atol=1e-5)
    assert not np.allclose(zi_micro[rows], zi_micro[rows[0]], atol=1e-3)
    # held-out section: the model builds its tiles itself without writing into the query
    keys = set(held.obsm) | set(held.uns)
    z = m.get_latent_representation(held, modality="image", scale="meso")
    assert z.shape == (held.n_obs, 16) and np.isfinite(z).all() and (set(held.obsm) | set(held.uns)) == keys
    for s in SCALES:  # one obsm key per scale through the one embedding tool
        ig.tl.embed(m, held, modality="gene", scale=s, key_added=f"X_gene_{s}")
        np.testing.assert_array_equal(held.obsm[f"X_gene_{s}"], m.get_latent_representation(held, modality="gene", scale=s))
    with pytest.warns(FutureWarning, match="tl.embed"):  # the old method: a deprecated alias writing the same keys
        m.embed_scales(held, modality="gene")
    for s in (*SCALES, "all"):
        assert held.obsm[f"X_imagene_sigmma_gene_{s}"].shape[0] == held.n_obs
    np.testing.assert_array_equal(held.obsm["X_imagene_sigmma_gene_micro"], held.obsm["X_gene_micro"])
    with pytest.raises(ValueError, match="scale"):
        m.get_latent_representation(scale="nano")
    h = m.history["train_loss"]["train_loss"].to_numpy()
    assert h[-1] < h[0]  # the contrastive loss goes down


def test_retrieval_on_a_held_out_section_beats_chance(trained):
    m, _, held = trained
    res = ig.tl.retrieve(m, held, top_n=3)
    rec = res["recall"]
    assert list(rec.index) == [5, 10, 15]
    assert ((rec.to_numpy() >= 0) & (rec.to_numpy() <= 1)).all()
    assert (rec["mean"].diff().dropna() >= 0).all()  # recall grows with k
    # synthetic domains are visible in the image and drive the marker genes: far above chance (15 %)
    assert rec.loc[15, "mean"] > 0.3, rec  # 0.47 when written
    assert len(res["matches"]) == 3 * held.n_obs
    # a model whose latents ignore the data scores chance: the metric is not trivially high
    class Shuffled:
        adata = held

        def get_latent_representation(self, adata, modality, **kw):
            z = m.get_latent_representation(adata, modality=modality, **kw)
            return np.random.default_rng(0).permutation(z) if modality == "gene" else z

    assert ig.tl.retrieve(Shuffled(), held)["recall"].loc[15, "mean"] < rec.loc[15, "mean"]
    with pytest.raises(ValueError, match="k_percents"):
        ig.tl.retrieve(m, held, k_percents=())


def test_save_load_round_trip(trained, tmp_path):
    m, a, held = trained
    m.save(tmp_path / "sigmma", overwrite=True)
    m2 = ig.model.SIGMMA.load(tmp_path / "sigmma", adata=a)
    for modality in ("image", "gene"):
        z1 = m.get_latent_representation(held, modality=modality)
        z2 = m2.get_latent_representation(held, modality=modality)
        np.testing.assert_allclose(z1, z2, atol=1e-5)
    assert m2.module.loss_scales == SCALES and m2.tile_size_um_ == m.tile_size_um_


@pytest.mark.parametrize(
    ("kwargs", "n_scales"),
    [({"use_graph": False}, 3), ({"loss_scales": ("macro",)}, 1), ({"stochastic_edges": False}, 3)],
)
def test_ablations_train_and_embed(synthetic, kwargs, n_scales):
    a = synthetic[synthetic.obs["section"] != "S2"].copy()
    ig.model.SIGMMA.setup_anndata(a, layer="counts", image_key=None, library_key="section", encoder="tiny", crop_px=16)
    m = ig.model.SIGMMA(a, n_latent=8, n_hidden=16, **kwargs)
    m.train(max_epochs=2, batch_size=8, early_stopping=False, **FAST)
    z = m.get_latent_representation(modality="image")
    assert z.shape == (a.n_obs, 8 * n_scales) and np.isfinite(z).all()
    if kwargs.get("use_graph") is False:
        assert not hasattr(m.module.graph, "samplers")  # 1-D gene vector: no graph layers at all
    edges = m.sample_edges(stochastic=True)
    if kwargs.get("stochastic_edges") is False:
        # every block-constrained candidate is kept, identically on every draw
        again = m.sample_edges(stochastic=True)
        assert all(np.array_equal(edges[k], again[k]) for k in ("meso", "macro")) and edges["meso"].shape[1] > 0
    blocks, tile = a.obsm[f"{G}_blocks"], a.obs[f"{G}_tile"].to_numpy()
    for name, s in (("meso", 1), ("macro", 2)):
        i, j = edges[name]
        assert (blocks[i, s] == blocks[j, s]).all() and (tile[i] == tile[j]).all()


def test_setup_errors_do_not_touch_adata(synthetic):
    a = synthetic[synthetic.obs["section"] == "S0"].copy()
    before = (set(a.obs), set(a.obsm), set(a.uns))
    with pytest.raises(KeyError, match="image_key=None"):
        ig.model.SIGMMA.setup_anndata(a, image_key="X_missing")
    with pytest.raises(KeyError, match="library_key"):
        ig.model.SIGMMA.setup_anndata(a, image_key=None, library_key="nope")
    with pytest.raises(TypeError, match="renamed"):
        ig.model.SIGMMA.setup_anndata(a, image_key=None, library_key="section", batch_key="other")
    assert (set(a.obs), set(a.obsm), set(a.uns)) == before


def test_batch_key_is_the_old_name_of_library_key(synthetic):
    import warnings

    got = {}
    for kw in ("library_key", "batch_key"):
        a = synthetic[synthetic.obs["section"] != "S2"].copy()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ig.model.SIGMMA.setup_anndata(
                a, layer="counts", image_key=None, encoder="tiny", crop_px=16, tile_size_um=70, **{kw: "section"}
            )
        renamed = [w for w in rec if issubclass(w.category, FutureWarning) and "library_key" in str(w.message)]
        assert len(renamed) == (kw == "batch_key"), [str(w.message) for w in rec]
        m = ig.model.SIGMMA(a, n_latent=8, n_hidden=16)
        got[kw] = (m.library_key, m.adata_manager.registry["setup_args"], a.obs["_scvi_batch"].to_numpy(),
                   a.obs[f"{G}_tile"].to_numpy())
    (lk, args, codes, tiles), (lk2, args2, codes2, tiles2) = got["library_key"], got["batch_key"]
    assert lk == lk2 == "section" and args == args2 and args["batch_key"] is None
    np.testing.assert_array_equal(codes, codes2)
    np.testing.assert_array_equal(tiles, tiles2)


# ------------------------------------------------------------------ cell level: Xenium-like SpatialData
def _xenium_like(data_dir, n_cells=500, crop=1024, seed=0):
    """Cells with coordinates and expression over a real H&E crop of her2st C3, as a SpatialData.

    Gene programs follow the local H&E (haematoxylin density and eosin) around each cell, so image
    and expression share signal as in real tissue.
    """
    import anndata as ad
    from PIL import Image
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel

    Image.MAX_IMAGE_PIXELS = None
    img = np.asarray(Image.open(data_dir / "her2st" / "C3" / "5714_HE_BT_D1.jpg").convert("RGB"))
    cy, cx = img.shape[0] // 2, img.shape[1] // 2
    img = np.ascontiguousarray(img[cy - crop // 2 : cy + crop // 2, cx - crop // 2 : cx + crop // 2])
    rng = np.random.default_rng(seed)
    xy = rng.uniform(8, crop - 8, size=(n_cells, 2))
    win = np.stack([img[int(y) - 8 : int(y) + 8, int(x) - 8 : int(x) + 8].reshape(-1, 3).mean(0) for x, y in xy])
    feat = (win - win.mean(0)) / (win.std(0) + 1e-6)  # (n, 3) local colour
    n_genes = 40
    loadings = rng.normal(0, 0.8, size=(3, n_genes))
    rate = np.exp(1.0 + feat @ loadings)
    counts = rng.poisson(rate).astype(np.float32)
    table = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
    table.var_names = [f"G{i}" for i in range(n_genes)]
    table.layers["counts"] = counts.copy()
    table.obs["region"] = pd.Categorical(["cell_circles"] * n_cells)
    table.obs["cell_id"] = np.arange(n_cells)
    table.uns["spatial"] = {"cell_circles": {"scalefactors": {"microns_per_pixel": 0.7371}}}
    circles = ShapesModel.parse(xy, geometry=0, radius=np.full(n_cells, 6.0), index=np.arange(n_cells))
    image = Image2DModel.parse(img.transpose(2, 0, 1), dims=("c", "y", "x"))
    table = TableModel.parse(table, region="cell_circles", region_key="region", instance_key="cell_id")
    return SpatialData(images={"he_image": image}, shapes={"cell_circles": circles}, tables={"table": table})


@pytest.mark.slow
def test_cell_level_xenium_like_spatialdata(data_dir):
    sdata = _xenium_like(data_dir)
    cells = ig.io.from_spatialdata(sdata)
    assert cells.n_obs == 500 and "fullres" in cells.uns["spatial"]["cell_circles"]["images"]
    ig.settings.seed = 0
    # the paper's 128 µm tiles of cells: ~36 tiles of ~14 cells on this 755 µm crop
    ig.model.SIGMMA.setup_anndata(cells, layer="counts", image_key=None, tile_size_um=128, encoder="tiny", crop_px=16)
    tiles = cells.uns[G]["tiles"]
    assert 25 <= len(tiles) <= 49 and cells.uns[KEYS.TILE_CROPS]["features"]["4"].shape[:2] == (len(tiles), 16)
    m = ig.model.SIGMMA(cells, n_latent=16, n_hidden=32)
    m.train(max_epochs=10, batch_size=8, lr=3e-3, early_stopping=False, **FAST)
    for scale in (*SCALES, "all"):
        z = m.get_latent_representation(modality="gene", scale=scale)
        assert z.shape[0] == cells.n_obs and np.isfinite(z).all()
    edges = m.sample_edges(stochastic=True)
    blocks, tile = cells.obsm[f"{G}_blocks"], cells.obs[f"{G}_tile"].to_numpy()
    i, j = edges["meso"]
    assert (blocks[i, 1] == blocks[j, 1]).all() and (tile[i] == tile[j]).all()


# ------------------------------------------------------------------ the path our checks call
@pytest.mark.slow
def test_checks_path_defaults(check_path_adata):
    adata = check_path_adata
    n = adata.n_obs
    t0 = time.perf_counter()
    ig.model.SIGMMA.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section")
    model = ig.model.SIGMMA(adata)
    model.train(max_epochs=5)
    z = model.get_latent_representation()
    seconds = time.perf_counter() - t0
    assert z.shape[0] == n == 834 and np.isfinite(z).all()
    # tiles of 4 spot pitches (800 µm on legacy ST), never spanning sections, every spot in one
    meta = adata.uns[G]
    assert np.isclose(meta["tile_size_um"], 800.0, rtol=0.05)
    tile = adata.obs[f"{G}_tile"].to_numpy()
    assert (meta["tiles"]["section"].to_numpy()[tile] == adata.obs["section"].astype(str).to_numpy()).all()
    assert adata.uns[KEYS.TILE_CROPS]["features"]["1"].shape == (len(meta["tiles"]), 1, 1280)
    for scale in SCALES:
        zi = model.get_latent_representation(modality="image", scale=scale)
        assert zi.shape == (n, 64) and np.isfinite(zi).all()
    assert model.history["train_loss"].shape[0] == 5
    print(f"SIGMMA checks' path: setup + train(5) + latents in {seconds:.1f} s")
