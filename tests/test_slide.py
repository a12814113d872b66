"""Slides: io.read_slide, pp.tissue_mask, pp.spot_grid, SpatialData in and out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy.spatial import cKDTree

import imagene as ig
from imagene.io._image import read_image


def _tissue_image(h=900, w=1200, seed=0) -> np.ndarray:
    """White glass with a pink-purple, textured ellipse of 'tissue' in the middle."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (0.35 * h)) ** 2 + ((xx - w / 2) / (0.3 * w)) ** 2 < 1
    tissue = np.stack([rng.integers(lo, hi, (h, w)) for lo, hi in ((150, 210), (60, 120), (140, 200))], -1)
    img[inside] = tissue[inside].astype(np.uint8)
    return img, inside


def _write_tiff(path, img, mpp=None, tile=(256, 256)):
    opts = {"photometric": "rgb", "compression": "deflate"}
    if tile is not None:
        opts["tile"] = tile
    if mpp is not None:
        opts.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, **opts)
        if tile is not None:
            tw.write(np.ascontiguousarray(img[::2, ::2]), subfiletype=1, **opts)


def test_read_slide_backends_regions_and_microns_per_pixel(tmp_path):
    img, _ = _tissue_image()
    _write_tiff(tmp_path / "tiled.tif", img, mpp=0.5)
    s = ig.io.read_slide(tmp_path / "tiled.tif")
    assert s.backend == "openslide" and s.microns_per_pixel == pytest.approx(0.5)
    assert s.shape == img.shape and s.level_dimensions == [(1200, 900), (600, 450)]
    np.testing.assert_array_equal(s.read_region(100, 50, 70, 40), img[50:90, 100:170])
    np.testing.assert_array_equal(s[50:90, 100:170], img[50:90, 100:170])
    edge = s.read_region(1190, 890, 20, 20)  # white beyond the slide, as the tiler pads
    np.testing.assert_array_equal(edge[:10, :10], img[890:, 1190:])
    assert (edge[10:, :] == 255).all() and (edge[:, 10:] == 255).all()
    with pytest.raises(TypeError, match="whole slide"):
        np.asarray(s)
    lazy = s.to_dask(chunk_px=256)
    np.testing.assert_array_equal(lazy[300:400, 500:650].compute(), img[300:400, 500:650])
    # an untiled TIFF (OpenSlide refuses it) is read through tifffile, still by region
    _write_tiff(tmp_path / "plain.tif", img, mpp=0.25, tile=None)
    t = ig.io.read_slide(tmp_path / "plain.tif")
    assert t.backend == "tifffile" and t.microns_per_pixel == pytest.approx(0.25)
    np.testing.assert_array_equal(t.read_region(100, 50, 70, 40), img[50:90, 100:170])
    # one level only: the thumbnail is averaged down block by block, and matches a whole-image resize
    thumb, scale = t.thumbnail(max_px=300)
    assert thumb.shape == (225, 300, 3) and scale == pytest.approx(0.25)
    expected = np.asarray(Image.fromarray(img).resize((300, 225), Image.Resampling.BOX)).astype(int)
    assert np.abs(thumb.astype(int) - expected).mean() < 2
    # no resolution in the metadata: the error names the argument, which then works
    _write_tiff(tmp_path / "nores.tif", img)
    Image.fromarray(img).save(tmp_path / "he.png")
    for name in ("nores.tif", "he.png"):
        with pytest.raises(ValueError, match="microns_per_pixel="):
            ig.io.read_slide(tmp_path / name)
    p = ig.io.read_slide(tmp_path / "he.png", microns_per_pixel=0.7)
    assert p.backend == "pil" and p.microns_per_pixel == 0.7
    np.testing.assert_array_equal(p.read_region(10, 20, 30, 30), img[20:50, 10:40])
    with pytest.raises(FileNotFoundError):
        ig.io.read_slide(tmp_path / "missing.svs")


def test_tissue_mask_and_spot_grid_layouts(tmp_path):
    img, inside = _tissue_image()
    _write_tiff(tmp_path / "s.tif", img, mpp=2.0)
    slide = ig.io.read_slide(tmp_path / "s.tif")
    mask, scale = ig.pp.tissue_mask(slide, max_px=600)
    assert mask.shape == (450, 600) and scale == pytest.approx(0.5)
    truth = inside[::2, ::2]
    assert (mask == truth).mean() > 0.98
    for layout, n_neigh in (("hex", 6), ("square", 4)):
        grid = ig.pp.spot_grid(slide, pitch_um=40, layout=layout, spot_diameter_um=20)
        xy = grid.obsm["spatial"]
        d, _ = cKDTree(xy).query(xy, k=n_neigh + 1)
        np.testing.assert_allclose(np.median(d[:, 1:], axis=0), 40 / 2.0, rtol=0.02)  # pitch in px
        on = inside[np.rint(xy[:, 1]).astype(int), np.rint(xy[:, 0]).astype(int)]
        assert on.mean() > 0.97 and grid.obs["imagene_in_tissue"].all()
        lib = grid.obs["section"].iloc[0]
        assert grid.n_vars == 0 and grid.uns["spatial"][lib]["scalefactors"]["microns_per_pixel"] == 2.0
    every = ig.pp.spot_grid(slide, pitch_um=40, only_tissue=False)
    assert every.n_obs > grid.n_obs and not every.obs["imagene_in_tissue"].all()
    # the grid carries the slide by path: tiles are cut from the file, region by region
    ig.pp.extract_tiles(grid, tile_size_um=20, tile_px=10, show_progress_bar=False)
    x, y = np.rint(grid.obsm["spatial"][0]).astype(int)
    direct = np.asarray(Image.fromarray(img[y - 5 : y + 5, x - 5 : x + 5]))
    np.testing.assert_array_equal(grid.obsm["imagene_tiles"][0], direct)
    with pytest.raises(ValueError, match="layout"):
        ig.pp.spot_grid(slide, layout="triangle")


def _spatialdata_io_like(data_dir, factor=0.5):
    """MOB1 the way spatialdata-io builds a Visium-like object: a downscaled image with a Scale transform."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    folder = data_dir / "mouse_olfactory_bulb" / "MOB1"
    full = read_image(folder / "MOB1.jpg")
    h, w = full.shape[:2]
    hires = np.asarray(Image.fromarray(full).resize((round(w * factor), round(h * factor)), Image.Resampling.LANCZOS))
    tab = pd.read_csv(folder / "alignment_table_MOB1.tsv", sep="\t")
    tab = tab[tab["selected"] == 1]
    xy = tab[["pixel_x", "pixel_y"]].to_numpy(float)
    image = Image2DModel.parse(
        hires.transpose(2, 0, 1), dims=("c", "y", "x"),
        transformations={"global": Scale([1 / factor] * 2, axes=("y", "x"))},
    )
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), 8.0), index=pd.Index(np.arange(len(xy))),
                               transformations={"global": Identity()})
    import anndata as ad

    table = ad.AnnData(obs=pd.DataFrame({"region": pd.Categorical(["MOB1"] * len(xy)), "spot_id": np.arange(len(xy))},
                                        index=[f"s{i}" for i in range(len(xy))]))
    table = TableModel.parse(table, region="MOB1", region_key="region", instance_key="spot_id")
    return SpatialData(images={"MOB1_hires_image": image}, shapes={"MOB1": shapes}, tables={"table": table}), hires, xy


def test_from_spatialdata_in_memory_scaled_image_tiles(data_dir):
    sdata, hires, xy = _spatialdata_io_like(data_dir)
    with pytest.warns(UserWarning, match="microns_per_pixel"):
        a = ig.io.from_spatialdata(sdata)
    ig.pp.extract_tiles(a, tile_size_um=100, tile_px=16, microns_per_pixel=3.2, show_progress_bar=False)
    # the same tiles as cut from the downscaled image directly, at halved coordinates
    import anndata as ad

    b = ad.AnnData(obs=pd.DataFrame(index=a.obs_names), obsm={"spatial": xy * 0.5})
    ig.pp.extract_tiles(b, tile_size_um=100, tile_px=16, image=hires, microns_per_pixel=6.4, library_key=None,
                        show_progress_bar=False)
    np.testing.assert_array_equal(a.obsm["imagene_tiles"], b.obsm["imagene_tiles"])


def test_predictions_to_spatialdata_new_and_existing(tmp_path, data_dir):
    import spatialdata

    img, _ = _tissue_image()
    _write_tiff(tmp_path / "s.tif", img, mpp=2.0)
    grid = ig.pp.spot_grid(ig.io.read_slide(tmp_path / "s.tif"), pitch_um=60, library_id="slide")
    rng = np.random.default_rng(0)
    import anndata as ad

    out = ad.AnnData(X=rng.random((grid.n_obs, 3)).astype(np.float32), obs=grid.obs.copy(),
                     var=pd.DataFrame(index=["ERBB2", "GRB7", "KRT19"]), obsm={"spatial": grid.obsm["spatial"]},
                     uns={"spatial": grid.uns["spatial"]})
    out.layers["imagene_predicted"] = out.X.copy()
    out.layers["imagene_predicted_sd"] = out.X / 10
    sdata = ig.io.predictions_to_spatialdata(out)
    assert set(sdata.images) == {"slide_image"} and set(sdata.shapes) == {"slide_spots"}
    table = sdata.tables["imagene_predictions"]
    np.testing.assert_array_equal(table.layers["imagene_predicted_sd"], out.layers["imagene_predicted_sd"])
    assert len(sdata.shapes["slide_spots"]) == out.n_obs
    np.testing.assert_array_equal(np.asarray(ig.io._image.spatialdata_image_to_dask(sdata.images["slide_image"])), img)
    sdata.write(tmp_path / "p.zarr")
    back = spatialdata.read_zarr(tmp_path / "p.zarr")
    np.testing.assert_allclose(np.asarray(back.tables["imagene_predictions"].X), out.X)
    # into an existing SpatialData: its elements are kept, ours are added
    existing, _, _ = _spatialdata_io_like(data_dir)
    ig.io.predictions_to_spatialdata(out, existing)
    assert {"MOB1_hires_image", "slide_image"} <= set(existing.images)
    assert {"MOB1", "slide_spots"} <= set(existing.shapes) and {"table", "imagene_predictions"} <= set(existing.tables)
    with pytest.raises(ValueError, match="already has a table"):
        ig.io.predictions_to_spatialdata(out, existing)
