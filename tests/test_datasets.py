"""imagene.datasets: the shipped her2st sample against the original files, and the synthetic generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

import imagene.datasets as ds

Image.MAX_IMAGE_PIXELS = None  # the original slides are ~92 Mpx on purpose

SECTIONS = ("B4", "C2", "C3", "C4")
PATIENT = {"B4": "B", "C2": "C", "C3": "C", "C4": "C"}
ORIGINAL_IMAGE = {
    "B4": "BT10737_D2_HE.jpg",
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
}
#: spots under tissue (selected == 1) that have a row in the counts, counted by hand from the files
N_SPOTS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184}


def _key(tab: pd.DataFrame) -> pd.Index:
    return pd.Index(tab["x"].round().astype(int).astype(str) + "x" + tab["y"].round().astype(int).astype(str))


@pytest.fixture(scope="module")
def demo():
    return ds.her2st_demo()


@pytest.fixture(scope="module")
def originals(data_dir):
    out = {}
    for s in SECTIONS:
        counts = pd.read_csv(data_dir / "her2st" / s / f"{s}.tsv.gz", sep="\t", index_col=0)
        tab = pd.read_csv(data_dir / "her2st" / s / f"{s}_selection.tsv", sep="\t")
        tab.index = _key(tab)
        out[s] = (counts, tab)
    return out


def _section(adata, s):
    sub = adata[adata.obs["section"] == s]
    keys = [f"{x}x{y}" for x, y in zip(sub.obs["array_x"], sub.obs["array_y"], strict=True)]
    return sub, pd.Index(keys)


# ---------------------------------------------------------------- shipped sample


def test_shipped_files_are_inside_package_and_originals_copied_unchanged(data_dir):
    paths = ds.demo_paths()
    assert set(paths) == set(SECTIONS)
    pkg = Path(ds.__file__).resolve().parent
    for s, p in paths.items():
        for k in ("counts", "spots", "image"):
            assert p[k].is_file() and pkg in p[k].resolve().parents
        assert p["patient"] == PATIENT[s]
        # counts and spot table are the original files, byte for byte
        assert p["counts"].read_bytes() == (data_dir / "her2st" / s / f"{s}.tsv.gz").read_bytes()
        assert p["spots"].read_bytes() == (data_dir / "her2st" / s / f"{s}_selection.tsv").read_bytes()
        # the recorded scale is the shipped image's width over the original image's width
        with Image.open(p["image"]) as small, Image.open(data_dir / "her2st" / s / ORIGINAL_IMAGE[s]) as big:
            assert p["image_scale"] == pytest.approx(small.size[0] / big.size[0], abs=1e-12)
            assert p["image_scale"] < 1.0
            assert small.size[1] == pytest.approx(big.size[1] * p["image_scale"], abs=1)
    manifest = json.loads((pkg / "_data" / "her2st" / "manifest.json").read_text())
    assert "6012" in manifest["citation"] and "Andersson" in manifest["citation"]
    assert "6012" in (pkg / "_data" / "her2st" / "README.md").read_text()
    sample = sum(f.stat().st_size for f in (pkg / "_data" / "her2st").rglob("*") if f.is_file())
    assert sample < 12.5e6
    # everything shipped as package data (the sample plus the 2 MB gene-description table) stays small
    total = sum(f.stat().st_size for f in (pkg / "_data").rglob("*") if f.is_file())
    assert total < 15e6


def test_demo_sections_spots_and_patients(demo, originals):
    assert list(demo.obs["section"].cat.categories) == list(SECTIONS)
    assert set(demo.uns["spatial"]) == set(SECTIONS)
    for s in SECTIONS:
        counts, tab = originals[s]
        expected = tab.index[tab["selected"] == 1].intersection(counts.index)
        assert len(expected) == N_SPOTS[s]
        sub, keys = _section(demo, s)
        assert sub.n_obs == N_SPOTS[s]
        assert set(keys) == set(expected)
        assert (sub.obs["patient"] == PATIENT[s]).all()
    assert demo.n_obs == sum(N_SPOTS.values())


def test_demo_spatial_equals_original_pixels(demo, originals):
    for s in SECTIONS:
        _, tab = originals[s]
        sub, keys = _section(demo, s)
        np.testing.assert_array_equal(sub.obsm["spatial"], tab.loc[keys, ["pixel_x", "pixel_y"]].to_numpy(float))


def test_demo_counts_equal_originals(demo, originals):
    common = set.intersection(*(set(originals[s][0].columns) for s in SECTIONS))
    assert set(demo.var_names) == common  # inner join over the sections
    genes = list(demo.var_names)
    for s in SECTIONS:
        counts, _ = originals[s]
        sub, keys = _section(demo, s)
        expected = counts.loc[keys, genes].to_numpy()
        for layer in (sub.X, sub.layers["counts"]):
            got = layer.toarray() if sp.issparse(layer) else np.asarray(layer)
            np.testing.assert_array_equal(got, expected)


def _patch_means(img: np.ndarray, xy: np.ndarray, radius: int) -> np.ndarray:
    out = []
    for x, y in np.round(xy).astype(int):
        out.append(img[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1].reshape(-1, 3).mean(0))
    return np.asarray(out)


@pytest.mark.parametrize("section", SECTIONS)
def test_demo_image_colour_matches_original(demo, data_dir, section):
    with Image.open(data_dir / "her2st" / section / ORIGINAL_IMAGE[section]) as im:
        full = np.asarray(im.convert("RGB"))
    sub, _ = _section(demo, section)
    xy = sub.obsm["spatial"]
    r = 48  # full-resolution pixels (~35 µm) around each spot centre
    ref = _patch_means(full, xy, r)

    # the shipped (downscaled) source image, located through the stored source scale
    meta = demo.uns["spatial"][section]["metadata"]
    s = meta["source_image_scale"]
    with Image.open(meta["source_image_path"]) as im:
        small = np.asarray(im.convert("RGB"))
    got = _patch_means(small, xy * s, round(r * s))
    diff = np.abs(got - ref)
    assert diff.mean() < 1.5 and diff.max() < 8
    # the comparison can fail: the same colours at the wrong spots are far off
    perm = np.random.default_rng(0).permutation(len(xy))
    assert np.abs(got[perm] - ref).mean() > 5 * diff.mean()

    # the in-memory hires copy, located through tissue_hires_scalef
    hires = demo.uns["spatial"][section]["images"]["hires"]
    sf = demo.uns["spatial"][section]["scalefactors"]["tissue_hires_scalef"]
    assert sf == pytest.approx(hires.shape[1] / full.shape[1], rel=1e-3)
    got_h = _patch_means(hires, xy * sf, round(r * sf))
    diff_h = np.abs(got_h - ref)
    assert diff_h.mean() < 3 and diff_h.max() < 15


def test_demo_one_section_and_bad_sections():
    one = ds.her2st_demo("C2")
    assert one.n_obs == N_SPOTS["C2"]
    assert list(one.obs["section"].cat.categories) == ["C2"]
    assert list(one.obs["patient"].unique()) == ["C"]
    with pytest.raises(KeyError, match="B4"):
        ds.her2st_demo(sections=("Z9",))
    with pytest.raises(ValueError, match="empty"):
        ds.her2st_demo(sections=())


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_per_seed():
    a = ds.synthetic_he_st(n_obs=60, n_vars=20, seed=3)
    b = ds.synthetic_he_st(n_obs=60, n_vars=20, seed=3)
    c = ds.synthetic_he_st(n_obs=60, n_vars=20, seed=4)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert (a.obs["domain"] == b.obs["domain"]).all()
    for lib in a.uns["spatial"]:
        img_a, img_b = (d.uns["spatial"][lib]["images"]["hires"] for d in (a, b))
        np.testing.assert_array_equal(img_a, img_b)
    assert not np.array_equal(a.X.toarray(), c.X.toarray())
    assert not np.array_equal(a.uns["spatial"]["S0"]["images"]["hires"], c.uns["spatial"]["S0"]["images"]["hires"])


def test_synthetic_layout_and_integer_counts():
    a = ds.synthetic_he_st(n_obs=101, n_vars=17, n_sections=2, image_px=256, microns_per_pixel=0.5, seed=1)
    assert a.shape == (101, 17)
    assert a.obs["section"].value_counts().to_dict() == {"S0": 51, "S1": 50}
    assert isinstance(a.obs["domain"].dtype, pd.CategoricalDtype)
    x = a.X.toarray()
    assert (x >= 0).all() and np.array_equal(x, np.round(x)) and x.sum() > 0
    np.testing.assert_array_equal(x, a.layers["counts"].toarray())
    assert a.obs_names.is_unique
    for lib in ("S0", "S1"):
        entry = a.uns["spatial"][lib]
        img = entry["images"]["hires"]
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        assert entry["scalefactors"]["tissue_hires_scalef"] == 1.0
        assert entry["scalefactors"]["microns_per_pixel"] == 0.5
        assert entry["scalefactors"]["spot_diameter_fullres"] > 0
        assert entry["metadata"]["platform"] == "synthetic"
        xy = a.obsm["spatial"][(a.obs["section"] == lib).to_numpy()]
        assert (xy > 0).all() and (xy < 256).all()
        # a regular grid: one distinct pitch between neighbours along x
        steps = np.unique(np.round(np.diff(np.unique(xy[:, 0])), 6))
        assert len(steps) == 1


def test_synthetic_domain_signal_in_image_and_expression():
    a = ds.synthetic_he_st(n_obs=300, n_vars=60, n_sections=2, seed=0)
    dom = a.obs["domain"].cat.codes.to_numpy()
    k = len(a.obs["domain"].cat.categories)
    assert k == 3 and all((dom == j).sum() >= 10 for j in range(k))

    # image: mean colour around each spot; nearest domain centroid recovers the domain
    colour = np.zeros((a.n_obs, 3))
    for lib in a.uns["spatial"]:
        m = (a.obs["section"] == lib).to_numpy()
        colour[m] = _patch_means(a.uns["spatial"][lib]["images"]["hires"].astype(float), a.obsm["spatial"][m], 6)
    centroids = np.stack([colour[dom == j].mean(0) for j in range(k)])
    pred = np.argmin(((colour[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == dom).mean() > 0.9

    # expression (raw counts; library sizes do not depend on the domain): each domain's marker genes
    # are clearly higher there (generated 4x), the other genes are not
    x = a.X.toarray()
    marker = a.var["marker_of"].astype(str).to_numpy()
    for j, name in enumerate(a.obs["domain"].cat.categories):
        for genes, lo, hi in ((marker == name, 2.5, 6.0), (marker == "none", 0.8, 1.25)):
            assert genes.sum() > 0
            ratio = x[dom == j][:, genes].mean(0) / x[dom != j][:, genes].mean(0)
            assert lo < np.median(ratio) < hi


def test_synthetic_bad_input():
    with pytest.raises(ValueError, match="n_sections"):
        ds.synthetic_he_st(n_obs=2, n_sections=3)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        ds.synthetic_he_st(microns_per_pixel=0)
    with pytest.raises(TypeError, match="n_obs"):
        ds.synthetic_he_st(n_obs=10.5)
