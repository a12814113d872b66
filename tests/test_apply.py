"""The apply path: a saved model predicts a new section or an H&E slide alone (issue: a trained model travels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy.spatial import cKDTree

import imagene as ig

FAST = {"accelerator": "cpu", "enable_progress_bar": False}
SRC = str(Path(ig.__file__).resolve().parents[1])


def write_pyramidal_tiff(path: Path, image: np.ndarray, microns_per_pixel: float, levels: int = 4) -> None:
    """A tiled, deflate-compressed pyramidal TIFF with resolution tags, as slide scanners and converters write."""
    opts = {
        "tile": (256, 256), "compression": "deflate", "photometric": "rgb",
        "resolution": (1e4 / microns_per_pixel, 1e4 / microns_per_pixel), "resolutionunit": "CENTIMETER",
    }
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(image, **opts)
        for k in range(1, levels):
            f = 2**k
            tw.write(np.ascontiguousarray(image[::f, ::f]), subfiletype=1, **opts)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------- every model, synthetic sections
@pytest.fixture(scope="module")
def synthetic():
    a = ig.datasets.synthetic_he_st(n_obs=300, n_vars=40, n_sections=3, image_px=384, seed=0)
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=32, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    ig.pp.nuclei_maps(a, show_progress_bar=False)  # the defaults, which AlignST uses for a query without maps
    del a.obsm["imagene_tiles"]
    return a


def _train(name: str, a: ad.AnnData):
    ig.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "UMPIRE":
            ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", library_key="section")
            m = ig.model.UMPIRE(a, n_hidden=32, n_latent=16, dropout=0.1)
            m.train(max_epochs=3, batch_size=64, **FAST)
        elif name == "STAlign":
            ig.model.STAlign.setup_anndata(
                a, layer="counts", image_key="X_he_tiny", batch_key="section", spot_tile_size_um=24, spot_tile_px=16,
                niche_encoder="tiny", niche_tile_px=32,
            )
            m = ig.model.STAlign(a, n_latent=16, n_hidden=32, n_tokens=4)
            m.train(max_epochs=2, batch_size=32, early_stopping=False, probe_epochs=3, **FAST)
        elif name == "SIGMMA":
            ig.model.SIGMMA.setup_anndata(
                a, layer="counts", image_key=None, library_key="section", encoder="tiny", crop_px=16, tile_size_um=70
            )
            m = ig.model.SIGMMA(a, n_latent=16, n_hidden=32)
            m.train(max_epochs=2, batch_size=8, early_stopping=False, **FAST)
        else:
            ig.model.AlignST.setup_anndata(
                a, layer="counts", image_key="X_he_tiny", batch_key="section", gene_embedding_key="emb"
            )
            m = ig.model.AlignST(a, n_hidden=16, n_layers=1)
            m.train(max_epochs=2, seen_genes=list(a.var_names[:20]), **FAST)
    return m


@pytest.mark.parametrize("name", ["UMPIRE", "STAlign", "SIGMMA", "AlignST"])
def test_every_model_predicts_a_slide_after_load_alone(synthetic, name, tmp_path):
    a = synthetic[synthetic.obs["section"] != "S2"].copy()
    if name == "AlignST":  # gene embeddings from varm: they must travel with the model
        a.varm["emb"] = np.random.default_rng(0).normal(size=(a.n_vars, 8)).astype(np.float32)
    m = _train(name, a)
    if name == "SIGMMA":  # set up without image features: its head reads the latent alone
        with pytest.raises(ValueError, match="features_key"):
            m.fit_expression_head()
        m.fit_expression_head(inputs="latent")
    elif name != "AlignST":  # AlignST predicts by gene descriptions, not through the shared head
        m.fit_expression_head()
    m.save(tmp_path / "model", overwrite=True)
    del m
    loaded = getattr(ig.model, name).load(tmp_path / "model")
    assert loaded.adata is None
    genes = loaded.gene_names
    assert len(genes) > 0

    # the query section's H&E as a slide file, and virtual spots at its spot centres
    test = synthetic[synthetic.obs["section"] == "S2"].copy()
    entry = test.uns["spatial"]["S2"]
    img = entry["images"]["hires"]  # scale factor 1: the full-resolution image
    mpp = entry["scalefactors"]["microns_per_pixel"]
    write_pyramidal_tiff(tmp_path / "S2.tif", img, mpp, levels=2)
    slide = ig.io.read_slide(tmp_path / "S2.tif")
    assert slide.microns_per_pixel == pytest.approx(mpp, rel=1e-6)
    grid = ig.pp.spot_grid(slide, positions=test.obsm["spatial"], library_id="S2")
    grid.obs_names = test.obs_names
    before = grid.copy()
    out = ig.tl.predict_expression(loaded, grid)
    assert isinstance(out, ad.AnnData) and out.var_names.equals(genes) and out.n_obs == grid.n_obs
    pred, sd = out.layers["imagene_predicted"], out.layers["imagene_predicted_sd"]
    assert np.isfinite(pred).all() and np.isfinite(sd).all() and (sd >= 0).all()
    assert pred.std(0).max() > 0  # not a constant
    assert set(grid.obs.columns) == set(before.obs.columns)  # the grid's obs is not touched
    # the same pixels through the section's own AnnData (image in memory, spots measured): same prediction
    query = test.copy()
    ref = ig.tl.predict_expression(loaded, query, genes=list(genes))
    got = ref.layers["imagene_predicted"] if ref is not None else query.layers["imagene_predicted"]
    np.testing.assert_allclose(pred, got, atol=1e-4)
    if name == "AlignST":
        return
    # the ridge head travels with the model: the slide grid and the spots predict alike
    head = ig.tl.predict_expression(loaded, grid, method="head")
    assert "imagene_predicted_sd" not in head.layers
    hp = head.layers["imagene_predicted"]
    assert np.isfinite(hp).all() and (hp >= 0).all() and hp.std(0).max() > 0
    query = test.copy()
    query.obs["imagene_in_tissue"] = grid.obs["imagene_in_tissue"].to_numpy()  # the same rows centre the section
    ref = ig.tl.predict_expression(loaded, query, genes=list(genes), method="head")
    got = ref.layers["imagene_predicted"] if ref is not None else query.layers["imagene_predicted"]
    np.testing.assert_allclose(hp, got, atol=1e-3)


# ---------------------------------------------------------------- real her2st sections and a real slide file
@pytest.fixture(scope="module")
def real(_check_path_adata, tmp_path_factory):
    """UMPIRE trained on B4, C2, C3 (200 genes, a few epochs), saved; C4 held out."""
    from imagene._utils import log_normalize

    full = _check_path_adata
    train = full[full.obs["section"] != "C4"]
    mean = np.asarray(log_normalize(train.layers["counts"]).mean(0)).ravel()
    genes = train.var_names[np.argsort(-mean)[:200]]
    train = train[:, genes].copy()
    ig.settings.seed = 0
    ig.model.UMPIRE.setup_anndata(train, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section")
    model = ig.model.UMPIRE(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=8, batch_size=128, **FAST)
    folder = tmp_path_factory.mktemp("apply")
    model.save(folder / "model", overwrite=True)
    test = full[full.obs["section"] == "C4"].copy()
    entry = test.uns["spatial"]["C4"]
    image = np.asarray(Image.open(entry["metadata"]["source_image_path"]).convert("RGB"))
    mpp = float(entry["scalefactors"]["microns_per_pixel"])
    write_pyramidal_tiff(folder / "C4.tif", image, mpp)
    del image
    return {"model": model, "dir": folder / "model", "test": test, "tif": folder / "C4.tif", "mpp": mpp, "genes": genes}


@pytest.mark.slow
def test_real_slide_tiff_predicts_like_the_spots(real):
    """C4's JPEG as a pyramidal TIFF, read back lazily, gridded at the real spots: the spot-based prediction."""
    slide = ig.io.read_slide(real["tif"])
    assert slide.backend == "openslide" and len(slide.level_dimensions) == 4
    assert slide.microns_per_pixel == pytest.approx(real["mpp"], rel=1e-4)
    test = real["test"]
    grid = ig.pp.spot_grid(slide, positions=test.obsm["spatial"], pitch_um=200, spot_diameter_um=100)
    loaded = ig.model.UMPIRE.load(real["dir"])
    out = ig.tl.predict_expression(loaded, grid)
    spots = ig.tl.predict_expression(real["model"], test)  # C4 measures other genes: a new AnnData
    assert spots.var_names.equals(real["genes"]) and out.var_names.equals(real["genes"])
    np.testing.assert_allclose(out.layers["imagene_predicted"], spots.layers["imagene_predicted"], atol=1e-3)
    np.testing.assert_allclose(out.layers["imagene_predicted_sd"], spots.layers["imagene_predicted_sd"], atol=1e-3)
    # the real spots of C4 lie on the detected tissue, and nearly none is flagged out of distribution
    assert grid.obs["imagene_in_tissue"].mean() > 0.9
    assert out.obs["imagene_ood"].mean() < 0.1


@pytest.mark.slow
def test_real_slide_spot_grid_covers_the_tissue(real):
    slide = ig.io.read_slide(real["tif"])
    grid = ig.pp.spot_grid(slide, pitch_um=200, layout="hex", spot_diameter_um=100)
    real_xy = real["test"].obsm["spatial"]
    pitch_px = 200 / slide.microns_per_pixel
    d_grid, _ = cKDTree(real_xy).query(grid.obsm["spatial"])
    d_real, _ = cKDTree(grid.obsm["spatial"]).query(real_xy)
    # grid spots fall where the sequenced spots are, and cover most of them
    assert np.mean(d_grid < pitch_px) > 0.85, np.mean(d_grid < pitch_px)
    assert np.mean(d_real < pitch_px) > 0.85, np.mean(d_real < pitch_px)
    assert grid.n_obs > 0.5 * len(real_xy)
    out = ig.tl.predict_expression(ig.model.UMPIRE.load(real["dir"]), grid)
    assert np.isfinite(out.layers["imagene_predicted"]).all() and np.isfinite(out.layers["imagene_predicted_sd"]).all()
    assert out.obs["imagene_ood"].dtype == bool


_CHILD = """
import json, sys, numpy as np, imagene as ig
model_dir, folder, out = sys.argv[1:4]
model = ig.model.UMPIRE.load(model_dir)                      # no training data in this process
from pathlib import Path
f = Path(folder)
image = next(p for p in f.iterdir() if p.suffix.lower() == ".jpg")
query = ig.io.read_legacy_st(f / "C4.tsv.gz", f / "C4_selection.tsv", image, library_id="C4")
res = ig.tl.predict_expression(model, query)                   # other genes: a new AnnData
np.save(out + "_pred.npy", res.layers["imagene_predicted"])
meta = {"genes": list(res.var_names), "query_genes": int(query.n_vars), "obs": list(res.obs_names)}
json.dump(meta, open(out + ".json", "w"))
"""


@pytest.mark.slow
def test_saved_model_is_small_and_predicts_in_another_process(real, data_dir, tmp_path):
    size = _dir_size(real["dir"])
    # 200 genes x ~650 reference spots plus the towers: under 3 MB (the training AnnData alone is ~60 MB)
    assert size < 3 * 1024**2, size
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(real["dir"]), str(data_dir / "her2st" / "C4"), str(tmp_path / "res")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "res.json").read_text())
    assert meta["genes"] == list(real["genes"]) and meta["query_genes"] != len(real["genes"])
    pred = np.load(tmp_path / "res_pred.npy")
    test = real["test"]
    expected = ig.tl.predict_expression(real["model"], test)
    assert [f"{o}-C4" for o in meta["obs"]] == list(test.obs_names)  # io.concat suffixes the section
    np.testing.assert_allclose(pred, expected.layers["imagene_predicted"], atol=1e-3)


@pytest.mark.slow
def test_predict_command_writes_spatialdata_png_and_summary(real, tmp_path, capsys):
    import spatialdata

    from imagene._cli import main

    out = tmp_path / "C4_pred.zarr"
    rc = main(["predict", "--model", str(real["dir"]), "--slide", str(real["tif"]), "--out", str(out),
               "--pitch-um", "400", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "UMPIRE predicted 200 genes" in text
    summary = json.loads((tmp_path / "C4_pred_summary.json").read_text())
    assert summary["n_genes"] == 200 and summary["n_spots"] > 20 and len(summary["plotted_genes"]) == 4
    assert (tmp_path / "C4_pred.png").stat().st_size > 10_000
    sdata = spatialdata.read_zarr(out)
    table = sdata.tables["imagene_predictions"]
    assert table.n_obs == summary["n_spots"] and list(table.var_names) == list(real["genes"])
    assert np.isfinite(table.layers["imagene_predicted_sd"]).all()
    assert set(sdata.images) == {"C4_image"} and len(sdata.shapes["C4_spots"]) == table.n_obs
