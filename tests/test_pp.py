"""imagene.pp: micron tiles (geometry, errors, lazy sources), frozen features, niches, section splits."""

from __future__ import annotations

import copy
import tracemalloc
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from scipy.spatial import cKDTree

import imagene as ig
from imagene.io._image import open_lazy

Image.MAX_IMAGE_PIXELS = None
TILES = "imagene_tiles"
B4_JPEG = "BT10737_D2_HE.jpg"
C2_JPEG = "5714_HE_BT_C2.jpg"
A1_FULL_WIDTH = 6954  # her2st/dims.list


# ------------------------------------------------------------------------------------------- helpers


def _state(a: ad.AnnData) -> dict:
    """What a failed call must leave alone: the keys of every slot (and of each uns['spatial'] entry)."""
    return {
        "obs": list(a.obs.columns),
        "var": list(a.var.columns),
        "obsm": sorted(a.obsm),
        "obsp": sorted(a.obsp),
        "varm": sorted(a.varm),
        "layers": sorted(a.layers),
        "uns": sorted(a.uns),
        "spatial": {
            lib: {k: sorted(v) if isinstance(v, dict) else v for k, v in e.items() if k != "images"}
            | {"images": sorted(e.get("images", {}))}
            for lib, e in a.uns.get("spatial", {}).items()
        },
        "xy": np.asarray(a.obsm["spatial"]).tolist() if "spatial" in a.obsm else None,
    }


def _raises_untouched(a: ad.AnnData, exc: type[Exception], match: str, **kwargs) -> None:
    """extract_tiles(a, **kwargs) raises exc matching ``match`` and leaves ``a`` exactly as it was."""
    before = _state(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the upsampling warning that precedes a scale error
        with pytest.raises(exc, match=match):
            ig.pp.extract_tiles(a, show_progress_bar=False, **kwargs)
    assert _state(a) == before
    assert TILES not in a.obsm and TILES not in a.uns


def _counts_head(path, n_genes: int = 20) -> pd.DataFrame:
    """The first genes of a legacy-ST counts table (tiles do not need every gene; reading all is slow)."""
    return pd.read_csv(path, sep="\t", index_col=0, usecols=range(n_genes + 1))


def _window(img: np.ndarray, x0: int, y0: int, s: int) -> np.ndarray:
    """img[y0:y0+s, x0:x0+s] with white outside the image (written independently of the tiler)."""
    out = np.full((s, s, 3), 255, dtype=np.uint8)
    h, w = img.shape[:2]
    ya, yb, xa, xb = max(y0, 0), min(y0 + s, h), max(x0, 0), min(x0 + s, w)
    if ya < yb and xa < xb:
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = img[ya:yb, xa:xb]
    return out


def _is_centred_crop(tile: np.ndarray, img: np.ndarray, x: float, y: float, s: int) -> bool:
    """Whether ``tile`` is the s x s window of ``img`` centred on (x, y), under either pixel convention.

    Pixel i covering [i, i+1) puts the window at round(x - s/2); pixel i centred on i (matplotlib's
    imshow, scanpy's plots) at round(x - (s-1)/2). They differ by at most one pixel.
    """
    xs = {int(np.floor(x - s / 2 + 0.5)), int(np.floor(x - s / 2 + 1))}
    ys = {int(np.floor(y - s / 2 + 0.5)), int(np.floor(y - s / 2 + 1))}
    return any(np.array_equal(tile, _window(img, x0, y0, s)) for x0 in xs for y0 in ys)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def b4(data_dir):
    d = data_dir / "her2st" / "B4"
    return ig.io.read_legacy_st(_counts_head(d / "B4.tsv.gz"), d / "B4_selection.tsv", d / B4_JPEG, library_id="B4")


@pytest.fixture(scope="module")
def b4_full(data_dir):
    """The full-size B4 H&E, decoded by PIL directly (not through imagene)."""
    with Image.open(data_dir / "her2st" / "B4" / B4_JPEG) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def b4_tiles(b4):
    """B4 tiled with the defaults, from the image registered in uns (its source_image_path)."""
    a = b4.copy()
    ig.pp.extract_tiles(a, show_progress_bar=False)
    return a


@pytest.fixture(scope="module")
def syn():
    """Two small synthetic sections (256 px images at 1 µm / px) tiled at 32 µm / 32 px."""
    a = ig.datasets.synthetic_he_st(n_obs=60, n_vars=12, n_sections=2, image_px=256, seed=3)
    ig.pp.extract_tiles(a, tile_size_um=32, tile_px=32, show_progress_bar=False)
    return a


# -------------------------------------------------------------------------------- tiles: geometry


def test_tiles_shape_dtype_and_centre_on_the_spot(b4_tiles, b4_full):
    a = b4_tiles
    tiles, xy = a.obsm[TILES], a.obsm["spatial"]
    assert isinstance(tiles, np.ndarray)
    assert tiles.shape == (a.n_obs, 224, 224, 3) and tiles.dtype == np.uint8
    mpp = a.uns["spatial"]["B4"]["scalefactors"]["microns_per_pixel"]
    s = 112 / mpp  # source pixels spanned by a 112 µm tile (~153)
    k = 224 / s  # tile px per source px

    def image_mean(cx, cy, r=8):
        x, y = int(round(cx)), int(round(cy))
        return b4_full[y - r : y + r, x - r : x + r].reshape(-1, 3).mean(0)

    # centre: 16 source px around the spot <-> the matching tile pixels
    h = int(round(8 * k))
    centre = tiles[:, 112 - h : 112 + h, 112 - h : 112 + h].reshape(a.n_obs, -1, 3).mean(1)
    ref = np.stack([image_mean(x, y) for x, y in xy])
    err = np.abs(centre - ref).mean(1)
    shuffled = np.abs(centre - np.roll(ref, a.n_obs // 2, axis=0)).mean(1)
    assert np.median(err) < 3.0
    assert np.quantile(err, 0.95) < 8.0
    assert np.median(shuffled) > 5 * np.median(err)
    # corners: the tile spans tile_size_um, so its top-left / bottom-right 16 source px sit s/2 from the spot
    tl = tiles[:, : 2 * h, : 2 * h].reshape(a.n_obs, -1, 3).mean(1)
    br = tiles[:, -2 * h :, -2 * h :].reshape(a.n_obs, -1, 3).mean(1)
    ref_tl = np.stack([image_mean(x - s / 2 + 8, y - s / 2 + 8) for x, y in xy])
    ref_br = np.stack([image_mean(x + s / 2 - 8, y + s / 2 - 8) for x, y in xy])
    assert np.median(np.abs(tl - ref_tl).mean(1)) < 3.0
    assert np.median(np.abs(br - ref_br).mean(1)) < 3.0
    assert np.median(np.abs(tl - ref_br).mean(1)) > 3 * np.median(np.abs(tl - ref_tl).mean(1))


def test_tile_is_the_exact_crop_of_tile_size_um(b4, b4_full):
    mpp = b4.uns["spatial"]["B4"]["scalefactors"]["microns_per_pixel"]
    s = 151  # odd: one centre pixel
    a = b4.copy()
    a.obsm["spatial"] = np.round(b4.obsm["spatial"])  # integer centres: the crop is unambiguous
    ig.pp.extract_tiles(a, tile_size_um=s * mpp, tile_px=s, image=b4_full, show_progress_bar=False)
    tiles = a.obsm[TILES]
    assert tiles.shape == (a.n_obs, s, s, 3)
    assert a.uns[TILES]["tile_size_um"] == pytest.approx(s * mpp)
    for i, (x, y) in enumerate(a.obsm["spatial"].astype(int)):
        np.testing.assert_array_equal(tiles[i], b4_full[y - s // 2 : y + s // 2 + 1, x - s // 2 : x + s // 2 + 1])

    # sub-pixel centres: the centre pixel is the one holding the spot under either pixel convention
    b = b4.copy()
    ig.pp.extract_tiles(b, tile_size_um=s * mpp, tile_px=s, image=b4_full, show_progress_bar=False)
    for i, (x, y) in enumerate(b.obsm["spatial"]):
        assert _is_centred_crop(b.obsm[TILES][i], b4_full, x, y, s), f"tile {i} is not centred on spot ({x}, {y})"


def test_downscaled_image_gives_the_tiles_of_the_full_image(data_dir, tmp_path):
    d = data_dir / "her2st" / "C2"
    with Image.open(d / C2_JPEG) as im:  # a half-size copy, as a user may have it (written to a temporary folder)
        im.convert("RGB").resize((im.width // 2, im.height // 2), Image.LANCZOS).save(tmp_path / "C2_HE.jpg", quality=85)
        scale = (im.width // 2) / im.width
    demo = ig.io.read_legacy_st(d / "C2.tsv.gz", d / "C2_selection.tsv", tmp_path / "C2_HE.jpg", library_id="C2",
                                image_scale=scale)
    assert demo.uns["spatial"]["C2"]["metadata"]["source_image_scale"] == pytest.approx(0.5, abs=1e-4)
    full = demo.copy()
    ig.pp.extract_tiles(demo, tile_px=64, show_progress_bar=False)
    ig.pp.extract_tiles(full, tile_px=64, image=str(d / C2_JPEG), show_progress_bar=False)
    assert demo.uns[TILES]["source"]["C2"].endswith("C2_HE.jpg")
    assert full.uns[TILES]["source"]["C2"] == "user-supplied image"
    a, b = demo.obsm[TILES].astype(np.float64), full.obsm[TILES].astype(np.float64)
    diff = np.abs(a - b).mean((1, 2, 3))
    shuffled = np.abs(a - np.roll(b, demo.n_obs // 2, axis=0)).mean((1, 2, 3))
    assert np.median(diff) < 12.0  # texture lost to downscaling + JPEG, not misplacement:
    assert np.median(shuffled) > 4 * np.median(diff)
    assert np.abs(a.mean((1, 2)) - b.mean((1, 2))).mean() < 1.5  # same colours
    inner = np.s_[:, 8:56, 8:56]
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):  # no offset: moving one tile pixel only makes it worse
        moved = np.abs(a[inner] - b[:, 8 + dy : 56 + dy, 8 + dx : 56 + dx]).mean((1, 2, 3))
        assert np.median(moved) > np.median(np.abs(a[inner] - b[inner]).mean((1, 2, 3))) + 2


def test_border_spots_are_padded_white(b4, b4_full):
    mpp = b4.uns["spatial"]["B4"]["scalefactors"]["microns_per_pixel"]
    s, half = 151, 75
    h, w = b4_full.shape[:2]
    a = b4.copy()
    xy = a.obsm["spatial"].copy()
    xy[0] = (10, 20)  # top-left corner: 65 columns and 55 rows outside
    xy[1] = (w - 6, h - 4)  # bottom-right corner
    a.obsm["spatial"] = xy
    ig.pp.extract_tiles(a, tile_size_um=s * mpp, tile_px=s, image=b4_full, show_progress_bar=False)
    t0, t1 = a.obsm[TILES][0], a.obsm[TILES][1]
    assert (t0[: half - 20] == 255).all() and (t0[:, : half - 10] == 255).all()
    np.testing.assert_array_equal(t0[half - 20 :, half - 10 :], b4_full[: 20 + half + 1, : 10 + half + 1])
    np.testing.assert_array_equal(t0, _window(b4_full, 10 - half, 20 - half, s))
    np.testing.assert_array_equal(t1, _window(b4_full, w - 6 - half, h - 4 - half, s))
    assert (t1[-(half - 3) :] == 255).all() and (t1[:, -(half - 5) :] == 255).all()
    assert (t1[: half, : half] != 255).any()  # the part inside the image is real tissue / glass, not padding


def test_tiles_provenance(b4_tiles):
    prov = b4_tiles.uns[TILES]
    mpp = b4_tiles.uns["spatial"]["B4"]["scalefactors"]["microns_per_pixel"]
    src = b4_tiles.uns["spatial"]["B4"]["metadata"]["source_image_path"]
    assert src.endswith(B4_JPEG)
    assert prov == {
        "tile_size_um": 112.0,
        "tile_px": 224,
        "microns_per_pixel": {"B4": mpp},
        "source": {"B4": src},
        "store": "",
        "spatial_key": "spatial",
        "coordinate_system": "full-resolution pixels",
    }


def test_tiles_of_two_sections_from_their_own_images(syn):
    tiles = syn.obsm[TILES]
    other = {"S0": "S1", "S1": "S0"}
    for lib in ("S0", "S1"):
        img = syn.uns["spatial"][lib]["images"]["hires"]
        rows = np.flatnonzero(syn.obs["section"] == lib)
        for i in rows[[0, len(rows) // 2, -1]]:
            x, y = syn.obsm["spatial"][i]
            assert _is_centred_crop(tiles[i], img, x, y, 32)
            assert not _is_centred_crop(tiles[i], syn.uns["spatial"][other[lib]]["images"]["hires"], x, y, 32)
    assert syn.uns[TILES]["microns_per_pixel"] == {"S0": 1.0, "S1": 1.0}


# ----------------------------------------------------------------------------------- tiles: errors


def test_lowres_coordinates_with_hires_image_raise(data_dir):
    with pytest.warns(UserWarning, match="blank"):  # the hires image of this test data is a placeholder
        v = ig.io.read_visium(data_dir / "visium_tiny")
    lib = next(iter(v.uns["spatial"]))
    v.obsm["spatial"] = v.obsm["spatial"] * v.uns["spatial"][lib]["scalefactors"]["tissue_lowres_scalef"]
    _raises_untouched(v, ValueError, r"another scale.*full-resolution pixels.*check_scale=False")


def test_coordinates_scaled_into_a_corner_raise(b4, b4_full):
    a = b4.copy()
    a.obsm["spatial"] = b4.obsm["spatial"] * 0.05
    _raises_untouched(a, ValueError, r"span only .*another scale", image=b4_full)
    ig.pp.extract_tiles(a, image=b4_full, check_scale=False, tile_px=16, show_progress_bar=False)  # the way out
    assert a.obsm[TILES].shape == (a.n_obs, 16, 16, 3)


def test_spots_outside_the_image_raise(b4, b4_full):
    a = b4.copy()
    xy = a.obsm["spatial"].copy()
    xy[3, 0] = b4_full.shape[1] + 40
    a.obsm["spatial"] = xy
    _raises_untouched(a, ValueError, r"1 of 283 spots .* outside .*full-resolution pixels", image=b4_full)


def test_zero_sized_tile_raises(b4, b4_full):
    _raises_untouched(b4.copy(), ValueError, r"zero-sized.*larger tile_size_um", tile_size_um=0.3, image=b4_full)


def test_bad_tile_size_arguments_raise(b4, b4_full):
    _raises_untouched(b4.copy(), ValueError, "must be positive", tile_size_um=-5, image=b4_full)
    _raises_untouched(b4.copy(), TypeError, "tile_px must be an integer", tile_px=224.0, image=b4_full)


def test_unknown_microns_per_pixel_raises(b4, b4_full):
    a = b4.copy()
    del a.uns["spatial"]["B4"]["scalefactors"]["microns_per_pixel"]
    _raises_untouched(a, ValueError, r"Microns per pixel unknown.*microns_per_pixel=", image=b4_full)
    ig.pp.extract_tiles(a, image=b4_full, microns_per_pixel=0.7, tile_px=16, show_progress_bar=False)
    assert a.uns[TILES]["microns_per_pixel"] == {"B4": 0.7}


def test_no_image_raises_naming_image_argument(syn):
    a = syn.copy()
    del a.obsm[TILES], a.uns[TILES]
    a.obs = a.obs.drop(columns="section")
    single = a[a.obs_names[:30]].copy()
    single.uns["spatial"] = {}
    _raises_untouched(single, KeyError, r"uns\['spatial'\].*not found.*`image=`")
    del single.uns["spatial"]
    _raises_untouched(single, KeyError, r"`image=`")
    single.uns["spatial"] = {"S0": copy.deepcopy(syn.uns["spatial"]["S0"])}
    single.uns["spatial"]["S0"]["images"] = {}
    _raises_untouched(single, ValueError, r"has no image.*`image=`")


def test_several_sections_without_library_key_raise(syn):
    a = syn.copy()
    del a.obsm[TILES], a.uns[TILES]
    a.obs = a.obs.drop(columns="section")
    _raises_untouched(a, ValueError, r"2 sections.*library_key=")


def test_image_dict_without_the_section_raises(syn):
    a = syn.copy()
    del a.obsm[TILES], a.uns[TILES]
    only_s0 = {"S0": a.uns["spatial"]["S0"]["images"]["hires"]}
    _raises_untouched(a, KeyError, r"no entry for section 'S1'", image=only_s0)


def test_max_memory_exceeded_raises_naming_store(b4, b4_full):
    _raises_untouched(b4.copy(), ValueError, r"max_memory_gb.*store=", image=b4_full, max_memory_gb=0.01)


# ------------------------------------------------------------------------------- tiles: lazy images


BIG = 6000


@pytest.fixture(scope="module")
def big_image():
    return np.random.default_rng(0).integers(0, 256, (BIG, BIG, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def big_tiff(big_image, tmp_path_factory):
    import tifffile

    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    tifffile.imwrite(path, big_image, tile=(256, 256))
    return path


def _big_section(source: str = "", n: int = 40) -> ad.AnnData:
    """Spots in the left third of the 6000 px slide (0.5 µm / px), registered like a reader would."""
    rng = np.random.default_rng(1)
    xy = np.stack([rng.uniform(150, 1900, n), rng.uniform(150, BIG - 150, n)], axis=1)
    a = ad.AnnData(X=sp.csr_matrix((n, 3), dtype=np.float32), obsm={"spatial": xy})
    a.uns["spatial"] = {
        "slide": {
            "images": {"hires": np.full((60, 60, 3), 230, np.uint8)},
            "scalefactors": {"tissue_hires_scalef": 0.01, "microns_per_pixel": 0.5},
            "metadata": {"platform": "synthetic", "source_image_path": source, "source_image_scale": 1.0},
        }
    }
    return a


LAZY = {"tile_size_um": 60.0, "tile_px": 48, "show_progress_bar": False}  # 120 source px -> 48 px


@pytest.fixture(scope="module")
def big_reference(big_image):
    a = _big_section()
    ig.pp.extract_tiles(a, image=big_image, **LAZY)
    return a.obsm[TILES]


def test_lazy_tiff_source_streams_tiles_to_a_zarr_store(big_tiff, big_image, big_reference, tmp_path):
    import dask.array as da
    import zarr

    a = _big_section(str(big_tiff))
    store = tmp_path / "tiles.zarr"
    open_lazy(big_tiff)[:8, :8].compute()  # warm up: first-time imports would count as allocations
    tracemalloc.start()
    try:
        ig.pp.extract_tiles(a, store=store, batch_size=8, **LAZY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < big_image.nbytes / 20, f"peak {peak / 1e6:.0f} MB tiling a {big_image.nbytes / 1e6:.0f} MB image"
    tiles = a.obsm[TILES]
    assert isinstance(tiles, da.Array) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles.compute(), big_reference)
    assert a.uns[TILES]["store"] == str(store)
    assert a.uns[TILES]["source"]["slide"] == f"{big_tiff} (lazy)"
    # obsm is a view of the store, not a copy: a write to the zarr array shows through
    z = zarr.open_array(str(store), mode="r+")
    assert z.shape == big_reference.shape
    z[5] = 0
    assert (np.asarray(a.obsm[TILES][5]) == 0).all()
    assert (np.asarray(a.obsm[TILES][4]) == big_reference[4]).all()


class _CountingArray:
    """Array-like that records how many pixels are read from it (to prove nothing reads it whole)."""

    def __init__(self, arr: np.ndarray):
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, arr.ndim
        self.read = np.zeros(arr.shape[:2], dtype=bool)

    def __getitem__(self, key):
        out = self.arr[key]
        if isinstance(key, tuple) and len(key) >= 2 and all(isinstance(k, slice) for k in key[:2]):
            self.read[key[:2]] = True
        else:  # pragma: no cover - any other access counts as reading everything
            self.read[:] = True
        return out


def test_dask_image_is_read_only_around_the_spots(big_image, big_reference):
    import dask.array as da

    src = _CountingArray(big_image)
    lazy = da.from_array(src, chunks=(500, 500, 3))
    a = _big_section()
    ig.pp.extract_tiles(a, image=lazy, batch_size=16, **LAZY)
    np.testing.assert_array_equal(a.obsm[TILES], big_reference)
    assert src.read.mean() < 0.4  # spots sit in the left third: the rest is never read
    assert not src.read[:, 2600:].any()


def test_spatialdata_image_elements(big_image):
    from spatialdata.models import Image2DModel

    img = big_image[:800, :800]
    xy = np.random.default_rng(2).uniform(40, 760, size=(25, 2))
    a = ad.AnnData(X=sp.csr_matrix((25, 2), dtype=np.float32), obsm={"spatial": xy})
    a.uns["spatial"] = {"s": {"images": {}, "scalefactors": {"microns_per_pixel": 1.0}, "metadata": {}}}
    kw = {"tile_size_um": 41.0, "tile_px": 41, "show_progress_bar": False}
    ref = a.copy()
    ig.pp.extract_tiles(ref, image=img, **kw)
    cyx = np.ascontiguousarray(np.moveaxis(img, -1, 0))
    single = Image2DModel.parse(cyx, dims=("c", "y", "x"))
    multi = Image2DModel.parse(cyx, dims=("c", "y", "x"), scale_factors=[2, 2])
    for element in (single, multi, {"s": multi}):
        b = a.copy()
        ig.pp.extract_tiles(b, image=element, **kw)
        np.testing.assert_array_equal(b.obsm[TILES], ref.obsm[TILES])
    # exact 41 px crops around the spots
    for i in (0, 7, 24):
        assert _is_centred_crop(ref.obsm[TILES][i], img, *xy[i], 41)
    # a one-channel element is grayscale: its channel is repeated
    gray = Image2DModel.parse(cyx[1:2], dims=("c", "y", "x"))
    g = a.copy()
    with pytest.warns(UserWarning, match="grayscale"):
        ig.pp.extract_tiles(g, image=gray, **kw)
    np.testing.assert_array_equal(g.obsm[TILES], np.repeat(ref.obsm[TILES][..., 1:2], 3, axis=-1))


def test_zarr_and_grayscale_lazy_images(big_image):
    import dask.array as da
    import zarr

    img = big_image[:600, :600]
    xy = np.random.default_rng(3).uniform(30, 570, size=(20, 2))
    a = ad.AnnData(X=sp.csr_matrix((20, 2), dtype=np.float32), obsm={"spatial": xy})
    a.uns["spatial"] = {"s": {"images": {}, "scalefactors": {"microns_per_pixel": 1.0}, "metadata": {}}}
    kw = {"tile_size_um": 31.0, "tile_px": 31, "show_progress_bar": False}
    ref = a.copy()
    ig.pp.extract_tiles(ref, image=img, **kw)
    z = zarr.create_array(store={}, shape=img.shape, chunks=(128, 128, 3), dtype="uint8")
    z[:] = img
    b = a.copy()
    ig.pp.extract_tiles(b, image=z, **kw)
    np.testing.assert_array_equal(b.obsm[TILES], ref.obsm[TILES])
    # channels-first dask input
    c = a.copy()
    ig.pp.extract_tiles(c, image=da.from_array(np.moveaxis(img, -1, 0), chunks=(3, 100, 100)), **kw)
    np.testing.assert_array_equal(c.obsm[TILES], ref.obsm[TILES])
    # a grayscale lazy image becomes RGB, like an in-memory one
    gray = img[..., 1]
    g = a.copy()
    with pytest.warns(UserWarning, match="grayscale"):
        ig.pp.extract_tiles(g, image=da.from_array(gray, chunks=100), **kw)
    np.testing.assert_array_equal(g.obsm[TILES], np.repeat(ref.obsm[TILES][..., 1:2], 3, axis=-1))
    # non-8-bit lazy images are refused (cutting them would wrap values around silently)
    wide = da.from_array(img.astype(np.uint16) * 257)
    _raises_untouched(a.copy(), ValueError, r"dtype uint16.*uint8", image=wide, tile_size_um=31.0, tile_px=31)


# ------------------------------------------------------------------------------------- embed_tiles


def test_embed_tiles_tiny(syn):
    a = syn.copy()
    ig.pp.embed_tiles(a, encoder="tiny", batch_size=64, device="cpu", show_progress_bar=False)
    f = a.obsm["X_he_tiny"]
    assert isinstance(f, np.ndarray) and f.shape == (a.n_obs, 32) and f.dtype == np.float32
    assert np.isfinite(f).all()
    assert a.uns["X_he_tiny"] == {
        "encoder": "tiny",
        "weights": "random (seed 0)",  # the tiny CNN's weights are its seeded initialisation
        "model_kwargs": "{}",
        "input_px": 32,
        "n_features": 32,
        "tiles_key": TILES,
        "tta": "none",
        "imagene_version": ig.__version__,
    }
    # batch composition does not change a spot's features
    b = syn.copy()
    ig.pp.embed_tiles(b, encoder="tiny", batch_size=7, device="cpu", key_added="feats", show_progress_bar=False)
    assert "X_he_tiny" not in b.obsm and "feats" in b.obsm and b.uns["feats"]["encoder"] == "tiny"
    np.testing.assert_allclose(b.obsm["feats"], f, rtol=1e-5, atol=1e-6)
    # each row depends on its own tile only: reversing the spots reverses the features
    r = syn[::-1].copy()
    ig.pp.embed_tiles(r, encoder="tiny", device="cpu", show_progress_bar=False)
    np.testing.assert_allclose(r.obsm["X_he_tiny"], f[::-1], rtol=1e-5, atol=1e-6)
    # different tiles, different features
    assert len(np.unique(f.round(4), axis=0)) == a.n_obs


def test_embed_tiles_from_a_zarr_store_matches_memory(syn, tmp_path):
    a = syn.copy()
    del a.obsm[TILES], a.uns[TILES]
    ig.pp.extract_tiles(a, tile_size_um=32, tile_px=32, store=tmp_path / "t.zarr", batch_size=16,
                        show_progress_bar=False)
    b = syn.copy()
    for x in (a, b):
        ig.pp.embed_tiles(x, encoder="tiny", device="cpu", show_progress_bar=False)
    np.testing.assert_allclose(a.obsm["X_he_tiny"], b.obsm["X_he_tiny"], rtol=1e-5, atol=1e-6)


def test_embed_tiles_without_tiles_raises(syn):
    a = syn.copy()
    del a.obsm[TILES]
    with pytest.raises(KeyError, match=r"imagene.pp.extract_tiles"):
        ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    assert "X_he_tiny" not in a.obsm and "X_he_tiny" not in a.uns


@pytest.fixture(scope="module")
def a1_labelled(data_dir):
    """20 A1 spots with pathologist labels: 10 adipose tissue, 10 invasive cancer, plus 2 spots listed twice."""
    d = data_dir / "her2st" / "A1"
    a = ig.io.read_legacy_st(
        _counts_head(d / "A1.tsv.gz", 5), d / "A1_selection.tsv", d / "A1_HE_image_dark.png",
        image_scale=2000 / A1_FULL_WIDTH, library_id="A1",
    )
    lab = pd.read_csv(d / "A1_labeled_coordinates.tsv", sep="\t").dropna(subset=["x", "y"])
    lab.index = [f"{round(x)}x{round(y)}" for x, y in zip(lab["x"], lab["y"], strict=True)]
    a.obs["label"] = lab["label"].reindex(a.obs_names).to_numpy()
    adipose = np.flatnonzero(a.obs["label"] == "adipose tissue")[:10]
    cancer = np.flatnonzero(a.obs["label"] == "invasive cancer")[:10]
    assert len(adipose) == len(cancer) == 10
    sel = np.r_[adipose, cancer, adipose[0], cancer[0]]
    with pytest.warns(UserWarning, match="not unique"):
        b = a[sel].copy()
    b.obs_names_make_unique()
    return b


def test_embed_tiles_efficientnet_lite0_real_tiles(a1_labelled):
    a = a1_labelled.copy()
    with pytest.warns(UserWarning, match="upsampled"):  # the A1 image is a 2000 px copy of the slide
        ig.pp.extract_tiles(a, tile_size_um=112, tile_px=224, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="efficientnet_lite0", input_px=224, device="cpu", show_progress_bar=False)
    f = a.obsm["X_he_efficientnet_lite0"]
    assert f.shape == (22, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    assert a.uns["X_he_efficientnet_lite0"]["input_px"] == 224
    # a spot cut twice gives the same tile and the same features
    for i, j in ((0, 20), (10, 21)):
        np.testing.assert_array_equal(a.obsm[TILES][i], a.obsm[TILES][j])
        np.testing.assert_allclose(f[i], f[j], rtol=1e-5, atol=1e-5)
    # adipose and invasive cancer differ: their mean features lie further apart than for any shuffled labelling
    g = f[:20].astype(np.float64)
    y = np.r_[np.zeros(10, bool), np.ones(10, bool)]

    def gap(lab):
        return np.linalg.norm(g[lab].mean(0) - g[~lab].mean(0))

    rng = np.random.default_rng(0)
    null = np.array([gap(rng.permutation(y)) for _ in range(200)])
    assert gap(y) > np.quantile(null, 0.99)
    assert np.linalg.norm(f[0] - f[10]) > 0.1 * np.linalg.norm(f[0])


# ------------------------------------------------------------------------------------------ niches


@pytest.fixture(scope="module")
def two_sections():
    """Two synthetic sections on the same grid (same coordinates!), jittered so that k-NN has no ties."""
    a = ig.datasets.synthetic_he_st(n_obs=80, n_vars=8, n_sections=2, image_px=128, seed=5)
    rng = np.random.default_rng(0)
    a.obsm["spatial"] = a.obsm["spatial"] + rng.normal(0, 2.0, size=a.obsm["spatial"].shape)
    return a


def test_niches_are_the_k_nearest_spots_of_the_same_section(two_sections):
    a = two_sections.copy()
    k = 5
    ig.pp.niches(a, n_neighs=k)
    conn = sp.csr_matrix(a.obsp["imagene_niche_connectivities"])
    dist = sp.csr_matrix(a.obsp["imagene_niche_distances"])
    assert conn.shape == dist.shape == (a.n_obs, a.n_obs)
    assert (np.diff(conn.indptr) == k).all()
    assert conn.diagonal().sum() == 0
    sections = a.obs["section"].to_numpy()
    xy = a.obsm["spatial"]
    for lib in ("S0", "S1"):
        rows = np.flatnonzero(sections == lib)
        d, nn = cKDTree(xy[rows]).query(xy[rows], k=k + 1)
        for r, i in enumerate(rows):
            got = np.sort(conn[i].indices)
            assert (sections[got] == lib).all()  # never across sections (they overlap in space)
            np.testing.assert_array_equal(got, np.sort(rows[nn[r, 1:]]))
            np.testing.assert_allclose(np.sort(dist[i].data), d[r, 1:], rtol=1e-6)
    assert a.uns["imagene_niche_neighbors"]["connectivities_key"] == "imagene_niche_connectivities"
    assert a.uns["imagene_niche_neighbors"]["distances_key"] == "imagene_niche_distances"
    assert a.uns["imagene_niche_neighbors"]["params"]["n_neighbors"] == k


def test_niche_mean_by_hand(two_sections):
    a = two_sections.copy()
    k = 4
    ig.pp.niches(a, n_neighs=k)
    mean = a.layers["imagene_niche_mean"]
    assert sp.issparse(mean) and mean.shape == a.shape
    counts = a.layers["counts"].toarray()
    xy = a.obsm["spatial"]
    for i in (0, 17, 40, 79):
        same = np.flatnonzero(a.obs["section"].to_numpy() == a.obs["section"].iloc[i])
        order = same[np.argsort(np.linalg.norm(xy[same] - xy[i], axis=1))]
        assert order[0] == i
        expected = counts[order[: k + 1]].sum(0) / (k + 1)
        np.testing.assert_allclose(mean[i].toarray().ravel(), expected, rtol=1e-5)
        nbrs = a.obsp["imagene_niche_connectivities"][i].indices  # the same spots, read from the graph
        np.testing.assert_allclose(mean[i].toarray().ravel(), counts[[i, *nbrs]].mean(0), rtol=1e-5)
    assert not np.allclose(mean.toarray(), counts)  # averaging did something


def test_niches_squidpy_convention(two_sections):
    import squidpy as sq

    a = two_sections.copy()
    ig.pp.niches(a, n_neighs=3, key_added="nb", niche_expression=False)
    assert "nb_mean" not in a.layers
    key = a.uns["nb_neighbors"]["connectivities_key"]
    assert key == "nb_connectivities" and key in a.obsp
    # squidpy's graph tools find the graph by its key
    a.obs["domain"] = a.obs["domain"].astype("category")
    sq.gr.nhood_enrichment(a, cluster_key="domain", connectivity_key="nb", n_perms=10, seed=0, show_progress_bar=False)
    assert a.uns["domain_nhood_enrichment"]["count"].shape == (3, 3)


def test_niches_without_uns_spatial_still_respect_sections(two_sections):
    a = two_sections.copy()
    del a.uns["spatial"]  # e.g. a concatenated AnnData whose images were dropped
    ig.pp.niches(a, n_neighs=4, niche_expression=False)
    conn = sp.coo_matrix(a.obsp["imagene_niche_connectivities"])
    sections = a.obs["section"].to_numpy()
    assert (sections[conn.row] == sections[conn.col]).all()


def test_niches_errors_leave_adata_untouched(two_sections):
    a = two_sections.copy()
    small = ad.concat([a[a.obs["section"] == "S0"], a[np.flatnonzero(a.obs["section"] == "S1")[:4]]], merge="same")
    small.uns["spatial"] = a.uns["spatial"]
    before = _state(small)
    with pytest.raises(ValueError, match=r"only 4 spots.*Lower n_neighs"):
        ig.pp.niches(small, n_neighs=4)
    assert _state(small) == before
    with pytest.raises(ValueError, match="n_neighs must be >= 1"):
        ig.pp.niches(a, n_neighs=0)
    with pytest.raises(KeyError, match="layer=None"):
        ig.pp.niches(a, n_neighs=3, layer="raw")
    assert not any(k.startswith("imagene_niche") for k in (*a.obsp, *a.uns, *a.layers))


# ----------------------------------------------------------------------------------- section_split


def test_section_split_labels_by_section():
    a = ig.datasets.synthetic_he_st(n_obs=30, n_vars=4, n_sections=3, image_px=64)
    ig.pp.section_split(a, test_sections=["S2"], validation_sections=["S1"])
    split = a.obs["imagene_split"]
    assert list(split.cat.categories) == ["train", "validation", "test"]
    expected = a.obs["section"].astype(str).map({"S0": "train", "S1": "validation", "S2": "test"})
    assert (split.astype(str) == expected).all()
    # one name given as a string, and key_added
    ig.pp.section_split(a, test_sections="S0", key_added="fold")
    assert (a.obs["fold"].astype(str) == np.where(a.obs["section"] == "S0", "test", "train")).all()


def test_section_split_errors():
    a = ig.datasets.synthetic_he_st(n_obs=30, n_vars=4, n_sections=3, image_px=64)
    before = _state(a)
    with pytest.raises(ValueError, match=r"test_sections \['S9'\] not found"):
        ig.pp.section_split(a, test_sections=["S9"])
    with pytest.raises(ValueError, match=r"\['S1'\] are in both"):
        ig.pp.section_split(a, test_sections=["S1"], validation_sections=["S1", "S2"])
    with pytest.raises(ValueError, match="No training section left"):
        ig.pp.section_split(a, test_sections=["S0", "S1"], validation_sections=["S2"])
    with pytest.raises(KeyError, match="library_key="):
        ig.pp.section_split(a, test_sections=["S0"], library_key="slide")
    assert _state(a) == before


def test_section_key_is_the_old_name_of_library_key():
    """``section_key=`` (io.concat, pp.section_split, tl.linear_probe) still works, with a FutureWarning."""
    parts = {s: ig.datasets.synthetic_he_st(n_obs=20, n_vars=4, n_sections=1, image_px=64, seed=i)
             for i, s in enumerate(["A", "B"])}
    with pytest.warns(FutureWarning, match="library_key"):
        old = ig.io.concat(parts, section_key="slide")
    new = ig.io.concat(parts, library_key="slide")
    assert list(old.obs["slide"]) == list(new.obs["slide"]) == ["A"] * 20 + ["B"] * 20
    with pytest.warns(FutureWarning, match="library_key"):
        ig.pp.section_split(old, test_sections=["B"], section_key="slide")
    ig.pp.section_split(new, test_sections=["B"], library_key="slide")
    assert old.obs["imagene_split"].tolist() == new.obs["imagene_split"].tolist() == ["train"] * 20 + ["test"] * 20
    with pytest.raises(TypeError, match="pass only `library_key=`"):
        ig.io.concat(parts, library_key="slide", section_key="other")
