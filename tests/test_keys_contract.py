"""The AnnData keys contract: every public writer adds exactly its documented keys and changes nothing else.

Readers are checked on the full set of keys of what they return; functions that write into an
AnnData are checked by diffing every slot before / after the call.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import imagene as ig

SLOTS = ("obs", "var", "obsm", "varm", "obsp", "varp", "layers", "uns")
SPATIAL_ENTRY = {"images", "scalefactors", "metadata"}
LEGACY_SCALEFACTORS = {"tissue_hires_scalef", "spot_diameter_fullres", "microns_per_pixel"}
METADATA = {"platform", "source_image_path", "source_image_scale"}


# ------------------------------------------------------------------------------------------- helpers


def _keys(a: AnnData) -> dict[str, set[str]]:
    return {
        slot: set(getattr(a, slot).columns if slot in ("obs", "var") else getattr(a, slot).keys()) for slot in SLOTS
    }


def _equal(x, y) -> bool:
    """Deep equality of AnnData values (arrays, sparse, dask, frames, nested dicts)."""
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if sp.issparse(x) or sp.issparse(y):
        return sp.issparse(x) and sp.issparse(y) and x.shape == y.shape and (x != y).nnz == 0
    if isinstance(x, (pd.Series, pd.DataFrame, pd.Index)):
        return x.equals(y)
    if hasattr(x, "compute"):  # dask
        x = x.compute()
    if hasattr(y, "compute"):
        y = y.compute()
    if isinstance(x, (np.ndarray, list, tuple)) or isinstance(y, (np.ndarray, list, tuple)):
        x, y = np.asarray(x), np.asarray(y)
        return x.shape == y.shape and x.dtype == y.dtype and bool(np.array_equal(x, y, equal_nan=x.dtype.kind == "f"))
    return bool(x == y)


def _added(before: AnnData, after: AnnData) -> dict[str, set[str]]:
    """Keys ``after`` gained over ``before`` (a deep copy taken earlier), per slot; asserts nothing else changed."""
    kb, ka = _keys(before), _keys(after)
    for slot in SLOTS:
        assert kb[slot] <= ka[slot], f"keys removed from {slot}: {kb[slot] - ka[slot]}"
    assert after.shape == before.shape
    assert after.obs_names.equals(before.obs_names) and after.var_names.equals(before.var_names)
    assert _equal(before.X, after.X), "X changed"
    for slot in ("obs", "var"):
        for col in kb[slot]:
            assert getattr(before, slot)[col].equals(getattr(after, slot)[col]), f"{slot}[{col!r}] changed"
    for slot in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        for key in kb[slot]:
            assert _equal(getattr(before, slot)[key], getattr(after, slot)[key]), f"{slot}[{key!r}] changed"
    return {slot: ka[slot] - kb[slot] for slot in SLOTS if ka[slot] - kb[slot]}


def _spatial_entry_keys(a: AnnData) -> dict[str, dict[str, set[str]]]:
    return {
        lib: {"entry": set(e), **{k: set(e[k]) for k in SPATIAL_ENTRY & set(e)}} for lib, e in a.uns["spatial"].items()
    }


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def syn() -> AnnData:
    return ig.datasets.synthetic_he_st(n_obs=100, n_vars=24, n_sections=2, image_px=192, seed=1)


@pytest.fixture(scope="module")
def featured(syn) -> AnnData:
    a = syn.copy()
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=32, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", device="cpu", show_progress_bar=False)
    return a


@pytest.fixture(scope="module")
def trained(featured):
    a = featured.copy()
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section")
    m = ig.model.UMPIRE(a, n_hidden=32, n_latent=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes about tiny data
        m.train(max_epochs=2, batch_size=32, accelerator="cpu", enable_progress_bar=False)
    return m


# ------------------------------------------------------------------------------------------- readers


def test_read_legacy_st_keys(data_dir):
    d = data_dir / "mouse_olfactory_bulb" / "MOB1"
    a = ig.io.read_legacy_st(d / "MOB1.tsv", d / "alignment_table_MOB1.tsv", d / "MOB1.jpg", library_id="MOB1")
    assert _keys(a) == {
        "obs": {"array_x", "array_y"}, "var": set(), "obsm": {"spatial"}, "varm": set(), "obsp": set(),
        "varp": set(), "layers": {"counts"}, "uns": {"spatial"},
    }
    assert _spatial_entry_keys(a) == {
        "MOB1": {"entry": SPATIAL_ENTRY, "images": {"hires"}, "scalefactors": LEGACY_SCALEFACTORS, "metadata": METADATA}
    }
    # an in-memory image larger than hires_max_px is also kept whole, for tiling
    from PIL import Image

    with Image.open(d / "MOB1.jpg") as im:
        img = np.asarray(im.convert("RGB"))
    b = ig.io.read_legacy_st(d / "MOB1.tsv", d / "alignment_table_MOB1.tsv", img, library_id="MOB1", hires_max_px=500)
    assert _spatial_entry_keys(b)["MOB1"]["images"] == {"hires", "fullres"}
    c = ig.io.read_legacy_st(d / "MOB1.tsv", d / "alignment_table_MOB1.tsv", None, library_id="MOB1")
    assert _spatial_entry_keys(c)["MOB1"]["images"] == set()


def test_read_visium_keys(data_dir):
    with pytest.warns(UserWarning, match="blank"):
        a = ig.io.read_visium(data_dir / "visium_tiny")
    assert _keys(a) == {
        "obs": {"in_tissue", "array_row", "array_col"}, "var": {"gene_ids", "feature_types", "genome"},
        "obsm": {"spatial"}, "varm": set(), "obsp": set(), "varp": set(), "layers": {"counts"}, "uns": {"spatial"},
    }
    (lib,) = a.uns["spatial"]
    keys = _spatial_entry_keys(a)[lib]
    assert keys["entry"] == SPATIAL_ENTRY
    assert keys["images"] == {"hires", "lowres"}
    assert keys["scalefactors"] == {
        "spot_diameter_fullres", "tissue_hires_scalef", "fiducial_diameter_fullres", "tissue_lowres_scalef",
        "microns_per_pixel",
    }
    assert METADATA <= keys["metadata"]


def test_synthetic_and_concat_keys(syn):
    assert _keys(syn) == {
        "obs": {"array_x", "array_y", "domain", "section"}, "var": {"marker_of"}, "obsm": {"spatial"},
        "varm": set(), "obsp": set(), "varp": set(), "layers": {"counts"}, "uns": {"spatial"},
    }
    assert _spatial_entry_keys(syn) == {
        lib: {"entry": SPATIAL_ENTRY, "images": {"hires"}, "scalefactors": LEGACY_SCALEFACTORS, "metadata": METADATA}
        for lib in ("S0", "S1")
    }
    parts = {lib: syn[syn.obs["section"] == lib].copy() for lib in ("S0", "S1")}
    for lib, p in parts.items():
        p.obs = p.obs.drop(columns="section")
        p.uns["spatial"] = {lib: syn.uns["spatial"][lib]}
    copies = {lib: p.copy() for lib, p in parts.items()}
    out = ig.io.concat(parts, library_key="slide")
    assert _keys(out)["obs"] == {"array_x", "array_y", "domain", "slide"}
    assert _keys(out)["uns"] == {"spatial"} and set(out.uns["spatial"]) == {"S0", "S1"}
    assert _keys(out)["layers"] == {"counts"} and _keys(out)["obsm"] == {"spatial"}
    for lib in parts:  # the inputs are left alone
        assert _added(copies[lib], parts[lib]) == {}


def test_her2st_keys(data_dir):
    a = ig.datasets.her2st(("C2",), path=data_dir / "her2st", show_progress_bar=False)
    assert _keys(a) == {
        "obs": {"array_x", "array_y", "section", "patient"}, "var": set(), "obsm": {"spatial"}, "varm": set(),
        "obsp": set(), "varp": set(), "layers": {"counts"}, "uns": {"spatial", "dataset"},
    }
    assert _spatial_entry_keys(a) == {
        "C2": {"entry": SPATIAL_ENTRY, "images": {"hires"}, "scalefactors": LEGACY_SCALEFACTORS, "metadata": METADATA}
    }


def test_spatialdata_round_trip_keys(syn):
    before = syn.copy()
    sdata = ig.io.to_spatialdata(syn)
    assert _added(before, syn) == {}  # to_spatialdata leaves its input alone
    back = ig.io.from_spatialdata(sdata)
    assert _keys(back) == _keys(syn)
    entries = {lib: k["entry"] for lib, k in _spatial_entry_keys(back).items()}
    assert entries == {"S0": SPATIAL_ENTRY, "S1": SPATIAL_ENTRY}
    for lib in ("S0", "S1"):
        keys = _spatial_entry_keys(back)[lib]
        assert keys["images"] == {"hires", "fullres"}  # in-memory SpatialData: the image is kept whole
        assert LEGACY_SCALEFACTORS <= keys["scalefactors"]
        assert METADATA <= keys["metadata"]


# ------------------------------------------------------------------------------------------ pp writers


def test_extract_tiles_keys(syn, tmp_path):
    a = syn.copy()
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=16, show_progress_bar=False)
    assert _added(syn, a) == {"obsm": {"imagene_tiles"}, "uns": {"imagene_tiles"}}
    b = syn.copy()
    ig.pp.extract_tiles(b, tile_size_um=24, tile_px=16, key_added="t", store=tmp_path / "t.zarr",
                        show_progress_bar=False)
    assert _added(syn, b) == {"obsm": {"t"}, "uns": {"t"}}


def test_embed_tiles_keys(featured):
    a = featured.copy()
    del a.obsm["X_he_tiny"], a.uns["X_he_tiny"]
    before = a.copy()
    ig.pp.embed_tiles(a, encoder="tiny", device="cpu", show_progress_bar=False)
    assert _added(before, a) == {"obsm": {"X_he_tiny"}, "uns": {"X_he_tiny"}}
    b = before.copy()
    ig.pp.embed_tiles(b, encoder="tiny", device="cpu", key_added="feat", show_progress_bar=False)
    assert _added(before, b) == {"obsm": {"feat"}, "uns": {"feat"}}


def test_niches_keys(syn):
    a = syn.copy()
    ig.pp.niches(a, n_neighs=4)
    assert _added(syn, a) == {
        "obsp": {"imagene_niche_connectivities", "imagene_niche_distances"},
        "uns": {"imagene_niche_neighbors"},
        "layers": {"imagene_niche_mean"},
    }
    b = syn.copy()
    ig.pp.niches(b, n_neighs=4, key_added="nb", niche_expression=False)
    assert _added(syn, b) == {"obsp": {"nb_connectivities", "nb_distances"}, "uns": {"nb_neighbors"}}


def test_context_keys(featured):
    a = featured.copy()
    before = a.copy()
    keys = ig.pp.context_features(a, tile_sizes_um=(24, 48), tile_px=16, encoder="tiny", device="cpu",
                                  show_progress_bar=False)
    assert _added(before, a) == {"obsm": set(keys), "uns": set(keys)} == {
        "obsm": {"X_he_tiny_24um", "X_he_tiny_48um"}, "uns": {"X_he_tiny_24um", "X_he_tiny_48um"}
    }
    ig.pp.niches(a, n_neighs=4, niche_expression=False)
    graph = a.copy()
    key = ig.pp.context_matrix(a, keys)
    assert _added(graph, a) == {"obsm": {"X_he_tiny_24um_nbr", key}, "uns": {"X_he_tiny_24um_nbr", key}}
    assert key == "X_he_tiny_context"


def test_section_split_keys(syn):
    a = syn.copy()
    ig.pp.section_split(a, test_sections=["S1"])
    assert _added(syn, a) == {"obs": {"imagene_split"}}
    b = syn.copy()
    ig.pp.section_split(b, test_sections=["S1"], key_added="fold")
    assert _added(syn, b) == {"obs": {"fold"}}


# ---------------------------------------------------------------------------------- model / tl writers


@pytest.mark.parametrize("library_key", ["section", None])
def test_setup_anndata_adds_nothing_but_scvi_registration(featured, library_key):
    """scvi-tools registration adds two uns uuids and obs['_scvi_batch'] (documented), nothing else."""
    a = featured.copy()
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key=library_key)
    assert _added(featured, a) == {"uns": {"_scvi_uuid", "_scvi_manager_uuid"}, "obs": {"_scvi_batch"}}


def test_training_adds_nothing(trained):
    # the training AnnData holds exactly what setup_anndata registered, even after train()
    keys = _keys(trained.adata)
    assert keys["obsm"] == {"spatial", "imagene_tiles", "X_he_tiny"}
    assert keys["layers"] == {"counts"} and keys["obsp"] == set()
    assert keys["uns"] == {"spatial", "imagene_tiles", "X_he_tiny", "_scvi_uuid", "_scvi_manager_uuid"}


def test_tl_embed_keys(trained, featured):
    q = featured.copy()
    ig.tl.embed(trained, q)
    assert _added(featured, q) == {"obsm": {"X_imagene_joint"}}
    z = q.obsm["X_imagene_joint"]
    assert z.shape == (q.n_obs, 16) and z.dtype == np.float32
    r = featured.copy()
    ig.tl.embed(trained, r, modality="image", key_added="z_img")
    assert _added(featured, r) == {"obsm": {"z_img"}}
    own = trained.adata.copy()
    try:
        ig.tl.embed(trained, modality="gene")  # into the model's own AnnData
        assert _added(own, trained.adata) == {"obsm": {"X_imagene_gene"}}
    finally:
        trained.adata.obsm.pop("X_imagene_gene", None)


def test_tl_predict_expression_keys(trained, featured):
    q = featured.copy()
    assert ig.tl.predict_expression(trained, q) is None
    assert _added(featured, q) == {
        "layers": {"imagene_predicted", "imagene_predicted_sd"},
        "obs": {"imagene_reference_similarity", "imagene_ood"},
    }
    pred = q.layers["imagene_predicted"]
    assert isinstance(pred, np.ndarray) and pred.shape == (q.n_obs, q.n_vars) and pred.dtype == np.float32
    assert not np.isnan(pred).any() and (pred >= 0).all() and pred.max() > 0
    sd = q.layers["imagene_predicted_sd"]
    assert sd.shape == pred.shape and sd.dtype == np.float32 and (sd >= 0).all() and sd.max() > 0
    assert q.obs["imagene_ood"].dtype == bool

    # one rule for genes: a query whose genes are not the model's (other genes, a subset, another
    # order) is left untouched and a NEW AnnData over the model's genes is returned
    genes = list(trained.gene_names[:10])
    extra = AnnData(
        X=sp.csr_matrix((featured.n_obs, 12), dtype=np.float32),
        obs=featured.obs[["section"]].copy(),
        var=pd.DataFrame(index=[*genes, "NOT_A_GENE_1", "NOT_A_GENE_2"]),
        obsm={"X_he_tiny": featured.obsm["X_he_tiny"].copy()},
    )
    for query in (extra, featured[:, genes[::-1]].copy()):
        before = query.copy()
        out = ig.tl.predict_expression(trained, query, key_added="pred")
        assert isinstance(out, AnnData) and out is not query
        assert _added(before, query) == {}
        assert out.var_names.equals(trained.gene_names) and out.obs_names.equals(query.obs_names)
        assert list(out.obs["section"]) == list(query.obs["section"])
        np.testing.assert_allclose(out.layers["pred"], pred, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.layers["imagene_predicted_sd"], sd, rtol=1e-5, atol=1e-6)
    # genes= chooses the predicted genes; they equal the query's here, so they go into its layers
    sub = featured[:, genes[::-1]].copy()
    sub_before = sub.copy()
    assert ig.tl.predict_expression(trained, sub, genes=sub.var_names, key_added="pred", sd_key_added=None) is None
    assert _added(sub_before, sub) == {"layers": {"pred"}, "obs": {"imagene_reference_similarity", "imagene_ood"}}
    np.testing.assert_allclose(sub.layers["pred"], pred[:, :10][:, ::-1], rtol=1e-5, atol=1e-6)
