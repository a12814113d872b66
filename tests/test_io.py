from __future__ import annotations

import gzip
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from imagene.io import concat, from_spatialdata, read_legacy_st, read_visium, to_spatialdata
from imagene.io._image import open_lazy

Image.MAX_IMAGE_PIXELS = None
A1_FULL_WIDTH = 6954  # her2st/dims.list


# ------------------------------------------------------------------------------------------- fixtures


def _keys(tab: pd.DataFrame) -> pd.Index:
    """'{x}x{y}' keys of a spot table, written independently of the reader."""
    return pd.Index([f"{round(x)}x{round(y)}" for x, y in zip(tab["x"], tab["y"])])


@pytest.fixture(scope="module")
def b4(data_dir):
    d = data_dir / "her2st" / "B4"
    return read_legacy_st(d / "B4.tsv.gz", d / "B4_selection.tsv", d / "BT10737_D2_HE.jpg")


@pytest.fixture(scope="module")
def c2(data_dir):
    d = data_dir / "her2st" / "C2"
    return read_legacy_st(d / "C2.tsv.gz", d / "C2_selection.tsv", d / "5714_HE_BT_C2.jpg")


@pytest.fixture(scope="module")
def a1(data_dir):
    d = data_dir / "her2st" / "A1"
    return read_legacy_st(
        d / "A1.tsv.gz", d / "A1_selection.tsv", d / "A1_HE_image_dark.png", image_scale=2000 / A1_FULL_WIDTH
    )


@pytest.fixture(scope="module")
def mob1(data_dir):
    d = data_dir / "mouse_olfactory_bulb" / "MOB1"
    return read_legacy_st(d / "MOB1.tsv", d / "alignment_table_MOB1.tsv", d / "MOB1.jpg")


def _synthetic(n: int = 6, *, image: np.ndarray | None = None):
    """Tiny legacy-ST section: n spots on a 2-px-pitch grid row, 3 genes, a 64x64 image."""
    keys = [f"{i + 1}x1" for i in range(n)]
    counts = pd.DataFrame(np.arange(n * 3).reshape(n, 3) % 5, index=keys, columns=["g1", "g2", "g3"])
    spots = pd.DataFrame(
        {"x": np.arange(1, n + 1), "y": np.ones(n), "pixel_x": 8.0 + 8 * np.arange(n), "pixel_y": 20.0}
    )
    if image is None:
        image = np.full((64, 64, 3), 200, np.uint8)
    return counts, spots, image


# ------------------------------------------------------------------------------------------ legacy ST


def test_legacy_b4_spots_and_coordinates(b4, data_dir):
    tab = pd.read_csv(data_dir / "her2st" / "B4" / "B4_selection.tsv", sep="\t")
    tab.index = _keys(tab)
    rows = pd.read_csv(data_dir / "her2st" / "B4" / "B4.tsv.gz", sep="\t", usecols=[0], index_col=0).index
    expected = rows.intersection(tab.index[tab["selected"] == 1])
    # 284 spots are selected in the table, one of them (18x20) has no counts row
    assert b4.n_obs == 283 == len(expected)
    assert set(b4.obs_names) == set(expected)
    for spot in ["10x14", b4.obs_names[100], b4.obs_names[-1]]:
        i = b4.obs_names.get_loc(spot)
        np.testing.assert_allclose(b4.obsm["spatial"][i], tab.loc[spot, ["pixel_x", "pixel_y"]].to_numpy(float))
    sf = b4.uns["spatial"]["B4"]["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(0.735, rel=0.01)
    assert sf["spot_diameter_fullres"] == pytest.approx(100 / sf["microns_per_pixel"])
    meta = b4.uns["spatial"]["B4"]["metadata"]
    assert meta["platform"] == "legacy_st"
    assert Path(meta["source_image_path"]).is_absolute()
    assert Path(meta["source_image_path"]).name == "BT10737_D2_HE.jpg"


def test_legacy_b4_counts_match_tsv(b4, data_dir):
    path = data_dir / "her2st" / "B4" / "B4.tsv.gz"
    with gzip.open(path, "rt") as fh:
        header = pd.Index(fh.readline().rstrip("\n").split("\t"))
    genes = ["ERBB2", "GAPDH", "ACTB", "KRT19"]
    cols = [0] + [header.get_loc(g) for g in genes]
    tsv = pd.read_csv(path, sep="\t", usecols=cols, index_col=0)
    counts = b4.layers["counts"]
    assert sp.issparse(counts)
    dense = counts.toarray()
    np.testing.assert_array_equal(dense, np.round(dense))
    assert dense.min() >= 0
    spots = ["10x14", b4.obs_names[50], b4.obs_names[200]]
    got = b4[spots, genes].layers["counts"].toarray()
    np.testing.assert_array_equal(got, tsv.loc[spots, genes].to_numpy())
    assert tsv.loc[spots, genes].to_numpy().sum() > 0  # the comparison is not between zeros only
    assert (b4.X != b4.layers["counts"]).nnz == 0


def test_legacy_b4_hires_matches_full_image(b4, data_dir):
    full = np.asarray(Image.open(data_dir / "her2st" / "B4" / "BT10737_D2_HE.jpg").convert("RGB"))
    entry = b4.uns["spatial"]["B4"]
    hires, s = entry["images"]["hires"], entry["scalefactors"]["tissue_hires_scalef"]
    assert hires.dtype == np.uint8 and hires.shape[2] == 3 and max(hires.shape[:2]) == 2000
    assert s == pytest.approx(hires.shape[1] / full.shape[1], rel=1e-3)

    def mean(img, x, y, r):
        x, y = int(round(x)), int(round(y))
        return img[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3).mean(0)

    diffs = np.array(
        [np.abs(mean(full, x, y, 25) - mean(hires, x * s, y * s, 5)).max() for x, y in b4.obsm["spatial"][::10]]
    )
    assert diffs.mean() < 4.0
    assert diffs.max() < 20.0


def test_legacy_a1_downscaled_image(a1, data_dir):
    img = np.asarray(Image.open(data_dir / "her2st" / "A1" / "A1_HE_image_dark.png"))
    scale = 2000 / A1_FULL_WIDTH
    xy = a1.obsm["spatial"] * scale
    h, w = img.shape[:2]
    assert ((xy >= 0) & (xy < [w, h])).all()
    assert a1.n_obs == 346
    # README: ~3.4 µm per pixel of the 2000-px image -> ~0.98 µm per full-resolution pixel
    sf = a1.uns["spatial"]["A1"]["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(3.4 * scale, rel=0.05)
    assert a1.uns["spatial"]["A1"]["metadata"]["source_image_scale"] == pytest.approx(scale)
    hires = a1.uns["spatial"]["A1"]["images"]["hires"]
    assert sf["tissue_hires_scalef"] == pytest.approx(scale * hires.shape[0] / h, rel=1e-3)


def test_legacy_mob1_selected_spots_only(mob1, data_dir):
    tab = pd.read_csv(data_dir / "mouse_olfactory_bulb" / "MOB1" / "alignment_table_MOB1.tsv", sep="\t")
    tab.index = _keys(tab)
    selected = set(tab.index[tab["selected"] == 1])
    assert mob1.n_obs == 379
    assert set(mob1.obs_names) <= selected
    assert mob1.var_names[0].startswith("ENSMUSG")
    assert all(g.startswith("ENSMUSG") for g in mob1.var_names)


def test_legacy_wrong_image_scale_raises(data_dir):
    d = data_dir / "mouse_olfactory_bulb" / "MOB1"
    with pytest.raises(ValueError, match="image_scale"):
        read_legacy_st(d / "MOB1.tsv", d / "alignment_table_MOB1.tsv", d / "MOB1.jpg", image_scale=2.0)


def test_legacy_duplicated_spot_ids_raise():
    counts, spots, img = _synthetic()
    counts.index = ["1x1", "1x1", "3x1", "4x1", "5x1", "6x1"]
    with pytest.raises(ValueError, match="Duplicated spot ids"):
        read_legacy_st(counts, spots, img, microns_per_pixel=1.0)


@pytest.mark.parametrize(
    ("value", "match"), [(0.5, "non-integer"), (-1.0, "negative"), (np.nan, "NaN")], ids=["float", "negative", "nan"]
)
def test_legacy_bad_counts_raise(value, match):
    counts, spots, img = _synthetic()
    counts = counts.astype(float)
    counts.iloc[2, 1] = value
    with pytest.raises(ValueError, match=match):
        read_legacy_st(counts, spots, img, microns_per_pixel=1.0)


def test_legacy_empty_counts_raise():
    counts, spots, img = _synthetic()
    with pytest.raises(ValueError, match="no spots"):
        read_legacy_st(counts.iloc[:0], spots, img, microns_per_pixel=1.0)


def test_legacy_does_not_modify_input_frames():
    counts, spots, img = _synthetic()
    counts.index = pd.Index(counts.index, dtype=object)
    before_c, before_s = counts.copy(), spots.copy()
    read_legacy_st(counts, spots, img, microns_per_pixel=1.0)
    pd.testing.assert_frame_equal(counts, before_c)
    pd.testing.assert_frame_equal(spots, before_s)


def test_legacy_grayscale_image_converted(tmp_path):
    counts, spots, _ = _synthetic()
    gray = np.tile(np.arange(64, dtype=np.uint8)[None, :] * 3, (64, 1))
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    with pytest.warns(UserWarning, match="grayscale"):
        adata = read_legacy_st(counts, spots, tmp_path / "gray.png", library_id="g", microns_per_pixel=1.0)
    hires = adata.uns["spatial"]["g"]["images"]["hires"]
    assert hires.shape == (64, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(hires[..., c], gray)


def test_legacy_rgba_image_converted():
    counts, spots, _ = _synthetic()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 7
    with pytest.warns(UserWarning, match="RGBA"):
        adata = read_legacy_st(counts, spots, rgba, library_id="s", microns_per_pixel=1.0)
    hires = adata.uns["spatial"]["s"]["images"]["hires"]
    assert hires.shape == (64, 64, 3)
    np.testing.assert_array_equal(hires[0, 0], [10, 20, 30])


def test_legacy_single_spot_without_mpp_raises():
    counts, spots, img = _synthetic(n=1)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        read_legacy_st(counts, spots, img)


def test_legacy_infers_mpp_on_synthetic_grid():
    counts, spots, img = _synthetic()
    adata = read_legacy_st(counts, spots, img, library_id="s")  # spots 8 px apart on a 200 µm pitch
    assert adata.uns["spatial"]["s"]["scalefactors"]["microns_per_pixel"] == pytest.approx(25.0)


def test_concat_b4_c2(b4, c2):
    out = concat({"B4": b4, "C2": c2})
    assert set(out.uns["spatial"]) == {"B4", "C2"}
    assert out.uns["spatial"]["B4"]["images"]["hires"] is b4.uns["spatial"]["B4"]["images"]["hires"]
    assert isinstance(out.obs["section"].dtype, pd.CategoricalDtype)
    assert list(out.obs["section"].cat.categories) == ["B4", "C2"]
    assert (out.obs["section"] == "B4").sum() == b4.n_obs
    assert (out.obs["section"] == "C2").sum() == c2.n_obs
    assert set(out.var_names) == set(b4.var_names) & set(c2.var_names)
    assert out.n_vars < min(b4.n_vars, c2.n_vars)
    i = out.obs_names.get_loc("10x14-B4")
    np.testing.assert_allclose(out.obsm["spatial"][i], b4.obsm["spatial"][b4.obs_names.get_loc("10x14")])


# -------------------------------------------------------------------------------------------- Visium


@pytest.fixture(scope="module")
def visium(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_visium(data_dir / "visium_tiny")


def test_read_visium_tiny(visium, data_dir):
    import scanpy as sc

    d = data_dir / "visium_tiny"
    raw = sc.read_10x_h5(d / "filtered_feature_bc_matrix.h5")
    raw.var_names_make_unique()
    assert visium.n_obs == raw.n_obs == 100
    expected = raw[visium.obs_names, visium.var_names].X.toarray()
    np.testing.assert_array_equal(visium.layers["counts"].toarray(), expected)
    assert (visium.X != visium.layers["counts"]).nnz == 0
    pos = pd.read_csv(d / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    xy = visium.obsm["spatial"]
    assert xy.dtype == np.float64
    # Space Ranger columns: in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres
    np.testing.assert_allclose(xy, pos.loc[visium.obs_names, [5, 4]].to_numpy(float))
    lib = next(iter(visium.uns["spatial"]))
    entry = visium.uns["spatial"][lib]
    sfj = json.loads((d / "spatial" / "scalefactors_json.json").read_text())
    assert entry["scalefactors"]["microns_per_pixel"] == pytest.approx(55.0 / sfj["spot_diameter_fullres"])
    assert entry["metadata"]["platform"] == "visium"
    assert entry["metadata"]["source_image_path"] == ""
    assert entry["metadata"]["source_image_scale"] == 1.0
    # the hires image is a black placeholder: the real lowres image stands in for it
    hires = entry["images"]["hires"]
    assert hires.shape == (600, 600, 3) and hires.std() > 10
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(sfj["tissue_lowres_scalef"])
    inside = xy * entry["scalefactors"]["tissue_hires_scalef"]
    assert ((inside >= 0) & (inside < 600)).all()


def test_read_visium_blank_hires_warns(data_dir):
    with pytest.warns(UserWarning, match="blank"):
        read_visium(data_dir / "visium_tiny")


def test_read_visium_source_image(tmp_path, data_dir, monkeypatch):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "slide.png")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = read_visium(data_dir / "visium_tiny", source_image_path="slide.png", library_id="lib")
    assert adata.uns["spatial"]["lib"]["metadata"]["source_image_path"] == str((tmp_path / "slide.png").resolve())
    with pytest.raises(FileNotFoundError, match="source_image_path"):
        read_visium(data_dir / "visium_tiny", source_image_path=tmp_path / "missing.tif")
    with pytest.raises(FileNotFoundError, match="counts_file"):
        read_visium(data_dir / "visium_tiny", counts_file="raw_feature_bc_matrix.h5")


# ---------------------------------------------------------------------------------------- SpatialData


def _dict_keys(adata):
    return {lib: {k: sorted(v) for k, v in e.items() if isinstance(v, dict)} for lib, e in adata.uns["spatial"].items()}


def _snapshot(adata):
    entry = next(iter(adata.uns["spatial"].values()))
    return {
        "obs": adata.obs.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns_keys": _dict_keys(adata),
        "images": {k: (v, v.copy()) for k, v in entry["images"].items()},
        "X": adata.X.copy(),
        "uns_top": sorted(adata.uns),
    }


def _assert_unchanged(adata, snap):
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    assert set(adata.obsm) == set(snap["obsm"])
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(adata.obsm[k], v)
    assert sorted(adata.uns) == snap["uns_top"]
    assert _dict_keys(adata) == snap["uns_keys"]
    entry = next(iter(adata.uns["spatial"].values()))
    for k, (obj, copy) in snap["images"].items():
        assert entry["images"][k] is obj
        np.testing.assert_array_equal(obj, copy)
    assert (adata.X != snap["X"]).nnz == 0


def test_to_spatialdata_elements_and_input_unchanged(mob1, data_dir):
    from spatialdata.transformations import get_transformation

    snap = _snapshot(mob1)
    sdata = to_spatialdata(mob1)
    _assert_unchanged(mob1, snap)
    assert set(sdata.images) == {"MOB1_image"} and set(sdata.shapes) == {"MOB1_spots"}
    img = sdata.images["MOB1_image"]
    assert img.dims == ("c", "y", "x") and img.shape == (3, 1905, 1905)
    jpeg = np.asarray(Image.open(data_dir / "mouse_olfactory_bulb" / "MOB1" / "MOB1.jpg").convert("RGB"))
    np.testing.assert_array_equal(np.moveaxis(img.data.compute(), 0, -1), jpeg)
    t = get_transformation(img, to_coordinate_system="MOB1")
    np.testing.assert_allclose(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), np.eye(3))
    shapes = sdata.shapes["MOB1_spots"]
    assert len(shapes) == mob1.n_obs
    np.testing.assert_allclose(np.c_[shapes.geometry.x, shapes.geometry.y], mob1.obsm["spatial"])
    d = mob1.uns["spatial"]["MOB1"]["scalefactors"]["spot_diameter_fullres"]
    np.testing.assert_allclose(shapes["radius"], d / 2)
    table = sdata.tables["table"]
    assert "images" not in table.uns["spatial"]["MOB1"]
    assert table.uns["spatial"]["MOB1"]["scalefactors"] == mob1.uns["spatial"]["MOB1"]["scalefactors"]
    assert (table.obs["region"] == "MOB1_spots").all()
    assert set(table.obs["spot_id"]) == set(shapes.index)
    assert table.uns["spatial"] is not mob1.uns["spatial"]


def test_spatialdata_zarr_round_trip(mob1, tmp_path):
    import spatialdata

    sdata = to_spatialdata(mob1)
    sdata.write(tmp_path / "mob1.zarr")
    back = from_spatialdata(spatialdata.read_zarr(tmp_path / "mob1.zarr"))
    assert list(back.obs_names) == list(mob1.obs_names)
    assert list(back.var_names) == list(mob1.var_names)
    assert (back.layers["counts"] != mob1.layers["counts"]).nnz == 0
    np.testing.assert_allclose(back.obsm["spatial"], mob1.obsm["spatial"])
    assert "region" not in back.obs and "spot_id" not in back.obs
    assert isinstance(back.obs["section"].dtype, pd.CategoricalDtype)
    assert (back.obs["section"] == "MOB1").all()
    e0, e1 = mob1.uns["spatial"]["MOB1"], back.uns["spatial"]["MOB1"]
    assert e1["scalefactors"]["microns_per_pixel"] == pytest.approx(e0["scalefactors"]["microns_per_pixel"])
    assert e1["scalefactors"]["tissue_hires_scalef"] == pytest.approx(e0["scalefactors"]["tissue_hires_scalef"])
    h0, h1 = e0["images"]["hires"], e1["images"]["hires"]
    assert h0.shape == h1.shape
    assert np.abs(h0.astype(float) - h1).mean() < 2.0
    meta = e1["metadata"]
    assert Path(meta["source_image_path"]) == (tmp_path / "mob1.zarr").resolve()
    assert meta["source_image_element"] == "MOB1_image"
    lazy = open_lazy(meta["source_image_path"], meta["source_image_element"])
    assert lazy.shape == (1905, 1905, 3)
    x, y = back.obsm["spatial"][0].round().astype(int)
    np.testing.assert_array_equal(np.asarray(lazy[y - 5 : y + 5, x - 5 : x + 5]), h0[y - 5 : y + 5, x - 5 : x + 5])


def test_spatialdata_round_trip_scaled_multiscale(a1, tmp_path):
    import spatialdata
    from spatialdata.transformations import get_transformation

    sdata = to_spatialdata(a1)
    img = sdata.images["A1_image"]
    assert "scale1" in img.children  # 2138 px high: one coarser level
    t = get_transformation(img, to_coordinate_system="A1")
    m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(np.diag(m)[:2], A1_FULL_WIDTH / 2000)
    sdata.write(tmp_path / "a1.zarr")
    stored = spatialdata.read_zarr(tmp_path / "a1.zarr")
    back = from_spatialdata(stored)
    e0, e1 = a1.uns["spatial"]["A1"], back.uns["spatial"]["A1"]
    assert e1["metadata"]["source_image_scale"] == pytest.approx(2000 / A1_FULL_WIDTH)
    s0 = e0["scalefactors"]["tissue_hires_scalef"]
    assert e1["scalefactors"]["tissue_hires_scalef"] == pytest.approx(s0, rel=1e-3)
    assert np.abs(e0["images"]["hires"].astype(float) - e1["images"]["hires"]).mean() < 2.0
    # from the coarser level only: remove the full-resolution chunks from a copy of the store (zarr would
    # read them as zeros), then ask for a 500-px copy whose scale factor still maps spots onto the tissue
    shutil.copytree(tmp_path / "a1.zarr", tmp_path / "a1_coarse.zarr")
    shutil.rmtree(tmp_path / "a1_coarse.zarr" / "images" / "A1_image" / "s0" / "c")
    small = from_spatialdata(spatialdata.read_zarr(tmp_path / "a1_coarse.zarr"), hires_max_px=500)
    hs = small.uns["spatial"]["A1"]["images"]["hires"]
    s = small.uns["spatial"]["A1"]["scalefactors"]["tissue_hires_scalef"]
    assert max(hs.shape[:2]) == 500
    assert s == pytest.approx(500 / 2138 * 2000 / A1_FULL_WIDTH, rel=1e-2)
    h, s0 = e0["images"]["hires"], e0["scalefactors"]["tissue_hires_scalef"]

    def mean(img, x, y, r):
        x, y = int(round(x)), int(round(y))
        return img[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3).mean(0)

    diffs = [np.abs(mean(h, x * s0, y * s0, 8) - mean(hs, x * s, y * s, 2)).max() for x, y in a1.obsm["spatial"][::7]]
    assert np.mean(diffs) < 6.0


def test_from_spatialdata_in_memory_centroids_and_unmatched_shapes(mob1, data_dir):
    from spatialdata.models import TableModel

    sdata = to_spatialdata(mob1)
    table = sdata.tables["table"][:100].copy()
    del table.obsm["spatial"]
    del table.uns["spatialdata_attrs"]
    sdata.tables["table"] = TableModel.parse(table, region="MOB1_spots", region_key="region", instance_key="spot_id")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = from_spatialdata(sdata, library_key="lib")
    assert back.n_obs == 100  # the 279 shapes without a table row are ignored
    np.testing.assert_allclose(back.obsm["spatial"], mob1.obsm["spatial"][:100])
    assert (back.obs["lib"] == "MOB1").all()
    entry = back.uns["spatial"]["MOB1"]
    assert entry["metadata"]["source_image_path"] == ""  # not on disk: the image is kept in memory
    jpeg = np.asarray(Image.open(data_dir / "mouse_olfactory_bulb" / "MOB1" / "MOB1.jpg").convert("RGB"))
    np.testing.assert_array_equal(entry["images"]["fullres"], jpeg)


def test_to_spatialdata_concatenated_sections(mob1, tmp_path):
    other = mob1[:50].copy()
    other.uns["spatial"] = {"MOB1b": other.uns["spatial"]["MOB1"]}
    both = concat({"MOB1": mob1, "MOB1b": other})
    sdata = to_spatialdata(both)
    assert set(sdata.shapes) == {"MOB1_spots", "MOB1b_spots"}
    assert set(sdata.images) == {"MOB1_image", "MOB1b_image"}
    assert len(sdata.shapes["MOB1b_spots"]) == 50
    back = from_spatialdata(sdata)
    assert list(back.obs_names) == list(both.obs_names)
    assert list(back.obs["section"]) == list(both.obs["section"])
    np.testing.assert_allclose(back.obsm["spatial"], both.obsm["spatial"])


def test_to_spatialdata_reads_tiff_source_lazily(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "slide.tif", img, tile=(32, 32))
    counts, spots, _ = _synthetic()
    adata = read_legacy_st(counts, spots, tmp_path / "slide.tif", library_id="s", microns_per_pixel=1.0)
    element = to_spatialdata(adata).images["s_image"]
    np.testing.assert_array_equal(np.moveaxis(element.data.compute(), 0, -1), img)


def test_to_spatialdata_errors(mob1):
    bad = mob1.copy()
    bad.obs["region"] = "x"
    with pytest.raises(ValueError, match="region"):
        to_spatialdata(bad)
    bad = mob1.copy()
    del bad.uns["spatial"]
    with pytest.raises(KeyError, match="uns\\['spatial'\\]"):
        to_spatialdata(bad)
