"""Every bad input a user may pass gives a clear error (or a warning) naming the problem AND the fix,
and never changes the user's AnnData.

Each case builds its input from small real data (her2st, the mouse olfactory bulb, the Visium
layout) or the synthetic H&E + ST generator, runs one call, and asserts: the exception or warning
type, a word of the problem and a word of the fix in the message, and that every AnnData it got is
unchanged (keys and values).
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import imagene as ig

FAST = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False}


# ------------------------------------------------------------------------------------------------
# AnnData snapshots
# ------------------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
        )
    if sp.issparse(a) or sp.issparse(b):
        if not (sp.issparse(a) and sp.issparse(b) and a.shape == b.shape and a.dtype == b.dtype):
            return False
        a, b = sp.csr_matrix(a), sp.csr_matrix(b)
        a.sort_indices()
        b.sort_indices()
        return (
            np.array_equal(a.indptr, b.indptr)
            and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data, b.data, equal_nan=True)
        )
    if isinstance(a, pd.DataFrame):
        return isinstance(b, pd.DataFrame) and a.equals(b) and a.dtypes.equals(b.dtypes) and a.index.equals(b.index)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def snapshot(adata: ad.AnnData) -> dict:
    """Deep copy of everything a user can see in an AnnData."""
    c = adata.copy()
    return {
        "obs": c.obs,
        "var": c.var,
        "X": c.X,
        "obs_names": list(c.obs_names),
        "var_names": list(c.var_names),
        "layers": dict(c.layers),
        "obsm": dict(c.obsm),
        "obsp": dict(c.obsp),
        "varm": dict(c.varm),
        "uns": dict(c.uns),
    }


def assert_unchanged(before: dict, adata: ad.AnnData) -> None:
    after = snapshot(adata)
    for slot in before:
        if isinstance(before[slot], dict):
            assert before[slot].keys() == after[slot].keys(), f"keys of {slot} changed"
        assert _same(before[slot], after[slot]), f"values of {slot} changed"


# ------------------------------------------------------------------------------------------------
# data (module scope: built once)
# ------------------------------------------------------------------------------------------------
def _legacy(data_dir: Path, section: str) -> ad.AnnData:
    if section.startswith("MOB"):
        f = data_dir / "mouse_olfactory_bulb" / section
        return ig.io.read_legacy_st(
            f / f"{section}.tsv", f / f"alignment_table_{section}.tsv", f / f"{section}.jpg", library_id=section
        )
    f = data_dir / "her2st" / section
    if section == "A1":
        return ig.io.read_legacy_st(
            f / "A1.tsv.gz",
            f / "A1_selection.tsv",
            f / "A1_HE_image_dark.png",
            library_id="A1",
            image_scale=2000 / 6954,
        )
    image = next(p for p in f.iterdir() if p.suffix == ".jpg")
    return ig.io.read_legacy_st(f / f"{section}.tsv.gz", f / f"{section}_selection.tsv", image, library_id=section)


_CACHE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def real(data_dir):
    """Readers' output for real sections, read once."""

    def get(name: str) -> ad.AnnData:
        if name not in _CACHE:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _CACHE[name] = (
                    ig.io.read_visium(data_dir / "visium_tiny") if name == "visium" else _legacy(data_dir, name)
                )
        return _CACHE[name].copy()

    return get


@pytest.fixture(scope="module")
def syn():
    """Synthetic sections with small tiles embedded by the offline 'tiny' encoder."""
    a = ig.datasets.synthetic_he_st(n_obs=160, n_vars=30, n_sections=2, image_px=256, seed=0)
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=16, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    return a


@pytest.fixture(scope="module")
def trained(syn):
    """A UMPIRE trained 2 epochs on section S0 (the query is S1)."""
    a = syn[syn.obs["section"] == "S0"].copy()
    del a.obsm["imagene_tiles"]
    ig.settings.seed = 0
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny")
    m = ig.model.UMPIRE(a, n_hidden=16, n_latent=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.train(max_epochs=2, batch_size=32, early_stopping=False, **FAST)
    return m


def _fresh(syn) -> ad.AnnData:
    a = syn.copy()
    del a.obsm["imagene_tiles"]
    return a


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """``build(ctx)`` returns ``(call, adatas)``: the call to make and every AnnData it receives."""

    build: Callable
    expect: type  # exception type, or a Warning subclass for cases handled with a warning
    problem: str  # regex of the problem
    fix: str  # regex of the fix
    status: str = "silent before"  # silent before / raw error before / raised before
    extra: Callable | None = field(default=None)  # further check of the result (warning cases)


class Ctx:
    def __init__(self, real, syn, trained, tmp_path, data_dir):
        self.real, self.syn, self.trained, self.tmp, self.data = real, syn, trained, tmp_path, data_dir


def _scaled(name, factor):
    def build(c):
        a = c.real(name)
        a.obsm["spatial"] = a.obsm["spatial"] * factor
        return (lambda: ig.pp.extract_tiles(a, tile_px=16, show_progress_bar=False)), [a]

    return build


def _swapped(name):
    def build(c):
        a = c.real(name)
        a.obsm["spatial"] = a.obsm["spatial"][:, ::-1].copy()
        return (lambda: ig.pp.extract_tiles(a, tile_px=16, show_progress_bar=False)), [a]

    return build


def _sparse_mpp(c):
    a = c.real("MOB1")
    sel = np.random.default_rng(0).choice(a.n_obs, 20, replace=False)
    xy = a.obsm["spatial"][sel]
    return (lambda: ig.io.infer_microns_per_pixel(xy, 200.0)), [a]


def _dup(call):
    def build(c):
        a = _fresh(c.syn)
        a.obs_names = ["spot"] * a.n_obs
        return (lambda: call(a, c)), [a]

    return build


def _dup_tiles(a, c):
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=16, show_progress_bar=False)


def _dup_setup(a, c):
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny")


def _dup_predict(c):
    q = _fresh(c.syn)[:40].copy()
    q.obs_names = ["spot"] * q.n_obs
    return (lambda: c.trained.predict_expression(q)), [q]


def _three_columns(call):
    def build(c):
        a = _fresh(c.syn)
        a.obsm["spatial"] = np.c_[a.obsm["spatial"], np.zeros(a.n_obs)]
        return (lambda: call(a)), [a]

    return build


def _umpire_setup(c, **setup):
    a = _fresh(c.syn)
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", **setup)
    return a


def _train(c, **kw):
    a = _umpire_setup(c, library_key="section")
    m = ig.model.UMPIRE(a, n_hidden=16, n_latent=8)
    before = snapshot(a)

    def call():
        m.train(batch_size=32, **{"max_epochs": 1, **kw}, **FAST)

    return call, [a], before


def _train_case(**kw):
    def build(c):
        call, adatas, before = _train(c, **kw)
        c.before_override = before  # registered AnnData: compare after setup
        return call, adatas

    return build


def _n_latent(value):
    def build(c):
        a = _umpire_setup(c)
        c.before_override = snapshot(a)
        return (lambda: ig.model.UMPIRE(a, n_latent=value)), [a]

    return build


def _other_encoder(**embed):
    def build(c):
        q = c.syn[c.syn.obs["section"] == "S1"].copy()
        if "encoder" in embed:
            enc = ig.nn.get_image_encoder(embed["encoder"], n_features=32)
            ig.pp.embed_tiles(q, encoder=enc, key_added="X_he_tiny", show_progress_bar=False)
        else:
            ig.pp.embed_tiles(q, encoder="tiny", show_progress_bar=False, **embed)
        del q.obsm["imagene_tiles"]
        return (lambda: c.trained.predict_expression(q)), [q]

    return build


def _outer(c):
    a = _fresh(c.syn)
    s0 = a[a.obs["section"] == "S0", :20].copy()
    s1 = a[a.obs["section"] == "S1", 10:].copy()
    for s, lib in ((s0, "S0"), (s1, "S1")):
        s.uns["spatial"] = {lib: a.uns["spatial"][lib]}
        del s.obs["section"]
    return (lambda: ig.io.concat({"S0": s0, "S1": s1}, join="outer")), [s0, s1]


def _tiny_validation(c):
    a = _fresh(c.syn)
    keep = (a.obs["section"] == "S0").to_numpy()
    keep[np.flatnonzero(~keep)[0]] = True  # one spot of S1
    a = a[keep].copy()
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section")
    m = ig.model.UMPIRE(a, n_hidden=16, n_latent=8)
    c.before_override = snapshot(a)
    return (lambda: m.train(max_epochs=1, batch_size=32, **FAST)), [a]


def _counts_value(value, where="one"):
    def build(c):
        a = _fresh(c.syn)
        x = a.layers["counts"].tocsr().copy()
        x.data[len(x.data) // 2] = value  # a single stored value among thousands
        a.layers["counts"] = x
        return (lambda: ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny")), [a]

    return build


def _tile_size(value):
    def build(c):
        a = _fresh(c.syn)
        return (lambda: ig.pp.extract_tiles(a, tile_size_um=value, tile_px=16, show_progress_bar=False)), [a]

    return build


def _missing_model(c):
    a = _fresh(c.syn)
    return (lambda: ig.model.UMPIRE.load(c.tmp / "no_such_model", adata=a)), [a]


def _hub_weights(c):
    a = c.syn.copy()
    return (
        lambda: ig.pp.embed_tiles(a, encoder="tiny", weights="hf-hub:timm/resnet18.a1_in1k", show_progress_bar=False)
    ), [a]


def _nan_spatial_niches(c):
    a = _fresh(c.syn)
    a.obsm["spatial"] = a.obsm["spatial"].copy()
    a.obsm["spatial"][3, 0] = np.nan
    return (lambda: ig.pp.niches(a, library_key="section")), [a]


def _nan_pixel_x(c):
    f = c.data / "mouse_olfactory_bulb" / "MOB1"
    spots = pd.read_csv(f / "alignment_table_MOB1.tsv", sep="\t")
    spots.loc[spots.index[spots["selected"] == 1][0], "pixel_x"] = np.nan
    counts = pd.read_csv(f / "MOB1.tsv", sep="\t", index_col=0)
    return (lambda: ig.io.read_legacy_st(counts, spots, f / "MOB1.jpg", library_id="MOB1")), []


def _truncated_jpeg(c):
    src = c.data / "mouse_olfactory_bulb" / "MOB1"
    data = (src / "MOB1.jpg").read_bytes()
    bad = c.tmp / "MOB1_truncated.jpg"
    bad.write_bytes(data[: len(data) // 3])
    return (
        lambda: ig.io.read_legacy_st(src / "MOB1.tsv", src / "alignment_table_MOB1.tsv", bad, library_id="MOB1")
    ), []


def _tiff16(c):
    import tifffile

    src = c.data / "mouse_olfactory_bulb" / "MOB1"
    from PIL import Image

    img = np.asarray(Image.open(src / "MOB1.jpg").convert("RGB")).astype(np.uint16) * 257
    path = c.tmp / "MOB1_16bit.tif"
    tifffile.imwrite(path, img)
    return (
        lambda: ig.io.read_legacy_st(src / "MOB1.tsv", src / "alignment_table_MOB1.tsv", path, library_id="MOB1")
    ), []


def _hub_online(c):
    def call():
        old = os.environ.pop("HF_HUB_OFFLINE", None)
        t = time.perf_counter()
        try:
            ig.nn.get_image_encoder("hf-hub:timm/resnet18.a1_in1k")
        finally:
            c.elapsed = time.perf_counter() - t
            if old is not None:
                os.environ["HF_HUB_OFFLINE"] = old

    return call, []


# already raising before this module
def _view(c):
    a = _fresh(c.syn)
    v = a[:50]
    return (lambda: ig.model.UMPIRE.setup_anndata(v, layer="counts", image_key="X_he_tiny")), [a]


def _missing_image_key(c):
    a = _fresh(c.syn)
    return (lambda: ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_resnet")), [a]


def _missing_layer(c):
    a = _fresh(c.syn)
    return (lambda: ig.model.UMPIRE.setup_anndata(a, layer="raw", image_key="X_he_tiny")), [a]


def _outside(c):
    a = c.real("MOB1")
    a.obsm["spatial"] = a.obsm["spatial"] * 10
    return (lambda: ig.pp.extract_tiles(a, tile_px=16, show_progress_bar=False)), [a]


def _no_mpp(c):
    a = _fresh(c.syn)
    for lib in a.uns["spatial"]:
        del a.uns["spatial"][lib]["scalefactors"]["microns_per_pixel"]
    return (lambda: ig.pp.extract_tiles(a, tile_px=16, show_progress_bar=False)), [a]


def _wrong_width(c):
    q = _fresh(c.syn)[:30].copy()
    q.obsm["X_he_tiny"] = q.obsm["X_he_tiny"][:, :10]
    return (lambda: c.trained.predict_expression(q)), [q]


def _untrained(c):
    a = _umpire_setup(c)
    m = ig.model.UMPIRE(a, n_hidden=16, n_latent=8)
    c.before_override = snapshot(a)
    return (lambda: m.predict_expression()), [a]


def _no_shared_genes(c):
    q = _fresh(c.syn)[:30].copy()
    q.var_names = [f"other_{i}" for i in range(q.n_vars)]
    return (lambda: c.trained.get_latent_representation(q, modality="gene")), [q]


def _unknown_validation(c):
    a = _umpire_setup(c, library_key="section")
    m = ig.model.UMPIRE(a, n_hidden=16, n_latent=8)
    c.before_override = snapshot(a)
    return (lambda: m.train(max_epochs=1, validation_sections=["S9"], **FAST)), [a]


def _few_spots_niches(c):
    a = _fresh(c.syn)
    return (lambda: ig.pp.niches(a, n_neighs=200, library_key="section")), [a]


def _empty(c):
    a = _fresh(c.syn)[[]].copy()
    return (lambda: ig.pp.niches(a)), [a]


def _grayscale(c):
    a = _fresh(c.syn)
    s0 = a[a.obs["section"] == "S0"].copy()
    s0.uns["spatial"] = {"S0": a.uns["spatial"]["S0"]}
    gray = a.uns["spatial"]["S0"]["images"]["hires"].mean(-1).astype(np.uint8)
    return (lambda: ig.pp.extract_tiles(s0.copy(), image=gray, tile_size_um=24, tile_px=16, show_progress_bar=False)), [
        s0
    ]


def _adapter_random(c):
    a = _umpire_setup(c)
    c.before_override = snapshot(a)
    return (lambda: ig.model.UMPIRE(a, mode="adapter", n_hidden=16, n_latent=8)), [a]


CASES: dict[str, Case] = {
    # 1. scale mismatch (silent before)
    "scale_x0.1_her2st_C3": Case(_scaled("C3", 0.1), ValueError, r"another scale", r"full-resolution pixels"),
    "scale_x0.1_her2st_B4": Case(_scaled("B4", 0.1), ValueError, r"another scale", r"full-resolution pixels"),
    "scale_x0.1_MOB2": Case(_scaled("MOB2", 0.1), ValueError, r"another scale", r"full-resolution pixels"),
    "scale_x0.1_visium": Case(_scaled("visium", 0.1), ValueError, r"glass|another scale", r"full-resolution pixels"),
    # 2. microns per pixel from a sparse subset
    "infer_mpp_sparse_subset": Case(
        _sparse_mpp, ValueError, r"do not sit on a full array", r"whole section|microns_per_pixel="
    ),
    # 3. duplicated obs_names
    "dup_obs_names_extract_tiles": Case(_dup(_dup_tiles), ValueError, r"duplicated", r"obs_names_make_unique"),
    "dup_obs_names_niches": Case(
        _dup(lambda a, c: ig.pp.niches(a, library_key="section")), ValueError, r"duplicated", r"obs_names_make_unique"
    ),
    "dup_obs_names_setup": Case(_dup(_dup_setup), ValueError, r"duplicated", r"obs_names_make_unique"),
    "dup_obs_names_predict": Case(_dup_predict, ValueError, r"duplicated", r"obs_names_make_unique"),
    # 4. 3-column spatial, swapped x/y
    "spatial_3_columns_extract_tiles": Case(
        _three_columns(lambda a: ig.pp.extract_tiles(a, tile_size_um=24, tile_px=16, show_progress_bar=False)),
        ValueError,
        r"has shape \(\d+, 3\)",
        r"\[:, :2\]",
    ),
    "spatial_3_columns_niches": Case(
        _three_columns(lambda a: ig.pp.niches(a, library_key="section")),
        ValueError,
        r"has shape \(\d+, 3\)",
        r"\[:, :2\]",
    ),
    "swapped_xy_MOB1_square_image": Case(_swapped("MOB1"), ValueError, r"looks like \(row, column\)", r"\[:, ::-1\]"),
    "swapped_xy_her2st_C2": Case(_swapped("C2"), ValueError, r"looks like \(row, column\)", r"\[:, ::-1\]"),
    # 5. epochs and widths
    "max_epochs_0": Case(_train_case(max_epochs=0), ValueError, r"max_epochs", r"max_epochs=50"),
    "max_epochs_-1": Case(_train_case(max_epochs=-1), ValueError, r"max_epochs", r"max_epochs=50"),
    "max_epochs_1.5": Case(_train_case(max_epochs=1.5), TypeError, r"must be an integer", r"max_epochs=50"),
    "no_optimisation_step": Case(
        _train_case(limit_train_batches=0), RuntimeError, r"no optimisation step", r"Lower `batch_size`"
    ),
    "n_latent_0": Case(_n_latent(0), ValueError, r"n_latent", r"n_latent=64"),
    "n_latent_-3": Case(_n_latent(-3), ValueError, r"n_latent", r"n_latent=64"),
    # 6. query embedded otherwise than the model's features
    "provenance_other_input_px": Case(_other_encoder(input_px=24), ValueError, r"input_px 24", r"embed_tiles"),
    "provenance_other_encoder_same_width": Case(
        _other_encoder(encoder="small_cnn"), ValueError, r"encoder 'small_cnn'", r"embed_tiles"
    ),
    # 7. outer join of different gene sets
    "concat_outer_different_genes": Case(_outer, UserWarning, r"never measured", r"join='inner'"),
    # 8. a validation section too small to rank
    "validation_section_of_one_spot": Case(_tiny_validation, ValueError, r"only 1 spot", r"validation_sections"),
    # raw or misleading errors before
    "inf_counts": Case(_counts_value(np.inf), ValueError, r"inf value", r"drop", "raw error before"),
    "one_non_integer_count": Case(_counts_value(0.5), ValueError, r"non-integer", r"layer='counts'", "silent before"),
    "tile_size_um_inf": Case(_tile_size(np.inf), ValueError, r"tile_size_um", r"tile_size_um=112", "raw error before"),
    "missing_model_directory": Case(
        _missing_model, FileNotFoundError, r"does not exist", r"model\.save", "raw error before"
    ),
    "weights_hf_hub_for_local_encoder": Case(
        _hub_weights, FileNotFoundError, r"is a hub id", r"encoder=", "raw error before"
    ),
    "nan_spatial_niches": Case(
        _nan_spatial_niches, ValueError, r"NaN or inf coordinates", r"Drop them", "raw error before"
    ),
    "nan_pixel_x_read_legacy_st": Case(
        _nan_pixel_x, ValueError, r"missing or non-numeric", r"dropna", "raw error before"
    ),
    "truncated_jpeg": Case(
        _truncated_jpeg, OSError, r"MOB1_truncated\.jpg.*truncated or corrupt", r"again", "raw error before"
    ),
    "tiff_16_bit_refused_at_read": Case(_tiff16, ValueError, r"dtype uint16", r"8-bit", "raw error before"),
    "hub_encoder_offline_fails_fast": Case(
        _hub_online,
        RuntimeError,
        r"not reachable|could not be fetched",
        r"weights='/path/to/checkpoint",
        "raw error before",
    ),
    # raised before (kept, so that they keep raising)
    "setup_on_a_view": Case(_view, ValueError, r"view", r"\.copy\(\)", "raised before"),
    "missing_image_key": Case(_missing_image_key, KeyError, r"not found", r"embed_tiles", "raised before"),
    "missing_counts_layer": Case(_missing_layer, KeyError, r"not found", r"layer=None", "raised before"),
    "negative_counts": Case(_counts_value(-1.0), ValueError, r"negative", r"raw counts layer", "raised before"),
    "nan_counts": Case(_counts_value(np.nan), ValueError, r"NaN", r"drop", "raised before"),
    "spots_outside_image": Case(_outside, ValueError, r"outside", r"divide them", "raised before"),
    "microns_per_pixel_unknown": Case(
        _no_mpp, ValueError, r"Microns per pixel unknown", r"microns_per_pixel=", "raised before"
    ),
    "query_feature_width": Case(_wrong_width, ValueError, r"has 10 columns", r"Embed", "raised before"),
    "predict_untrained": Case(_untrained, RuntimeError, r"not trained", r"model\.train\(\)", "raised before"),
    "query_shares_no_gene": Case(_no_shared_genes, ValueError, r"no gene", r"gene symbols", "raised before"),
    "unknown_validation_section": Case(_unknown_validation, ValueError, r"not in adata\.obs", r"S0", "raised before"),
    "niches_more_neighbours_than_spots": Case(
        _few_spots_niches, ValueError, r"only \d+ spots", r"Lower n_neighs", "raised before"
    ),
    "empty_anndata": Case(_empty, ValueError, r"no observations", r"Remove empty sections", "raised before"),
    # handled with a warning
    "grayscale_image": Case(_grayscale, UserWarning, r"grayscale", r"repeating the channel", "raised before"),
    "adapter_on_random_encoder": Case(
        _adapter_random, UserWarning, r"randomly initialised", r"gene_encoder_weights=|mode='finetune'", "raised before"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, real, syn, trained, tmp_path, data_dir):
    case = CASES[name]
    ctx = Ctx(real, syn, trained, tmp_path, data_dir)
    ctx.before_override = None
    call, adatas = case.build(ctx)
    before = [snapshot(a) for a in adatas]
    if ctx.before_override is not None:
        before[0] = ctx.before_override
    if issubclass(case.expect, Warning):
        with pytest.warns(case.expect) as rec:
            call()
        msgs = [str(w.message) for w in rec if issubclass(w.category, case.expect)]
        msg = next((m for m in msgs if re.search(case.problem, m, re.I)), " | ".join(msgs))
    else:
        with pytest.raises(case.expect) as exc:
            call()
        msg = str(exc.value)
        if isinstance(exc.value, KeyError):
            msg = exc.value.args[0]
    assert re.search(case.problem, msg, re.I | re.S), f"problem {case.problem!r} not named in: {msg}"
    assert re.search(case.fix, msg, re.I | re.S), f"fix {case.fix!r} not named in: {msg}"
    for b, a in zip(before, adatas, strict=True):
        assert_unchanged(b, a)
    if name == "hub_encoder_offline_fails_fast":
        assert ctx.elapsed < 15, f"took {ctx.elapsed:.1f} s"


def test_at_least_30_cases_and_each_kind():
    kinds = pd.Series({k: c.status for k, c in CASES.items()})
    assert len(CASES) >= 30
    assert kinds.value_counts().to_dict().keys() >= {"silent before", "raw error before", "raised before"}


# ------------------------------------------------------------------------------------------------
# inputs that must pass: correct real sections, string section columns
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["B4", "C2", "C3", "C4", "A1", "MOB1", "MOB2", "visium"])
def test_correct_real_sections_pass_the_geometry_checks(name, real):
    from imagene.pp._tiles import _check_geometry

    a = real(name)
    lib = next(iter(a.uns["spatial"]))
    mpp = a.uns["spatial"][lib]["scalefactors"]["microns_per_pixel"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither an error nor a warning
        _check_geometry(a, lib, None, a.obsm["spatial"], mpp, 112.0 / mpp, "spatial")


def test_mob_section_tiles_pass_end_to_end(real):
    a = real("MOB1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ig.pp.extract_tiles(a, tile_px=16, show_progress_bar=False)
    assert a.obsm["imagene_tiles"].shape == (a.n_obs, 16, 16, 3)


def test_niches_accepts_a_string_section_column_without_changing_it(syn):
    a = _fresh(syn)
    parts = {}
    for lib in ("S0", "S1"):
        s = a[a.obs["section"] == lib].copy()
        del s.obs["section"]
        s.obs["section"] = lib  # a plain string column, as users write it
        parts[lib] = s
    joined = ad.concat(list(parts.values()))
    assert joined.obs["section"].dtype == object
    joined.uns["spatial"] = a.uns["spatial"]
    before = joined.obs.copy()
    ig.pp.niches(joined, library_key="section")
    assert joined.obs.equals(before) and joined.obs["section"].dtype == object  # the user's column untouched
    conn = joined.obsp["imagene_niche_connectivities"].tocoo()
    sec = joined.obs["section"].to_numpy()
    assert conn.nnz > 0 and (sec[conn.row] == sec[conn.col]).all()  # no edge crosses sections
