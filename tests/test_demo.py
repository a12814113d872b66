"""The main job, `imagene demo`, end to end: on its synthetic default and on the real her2st sections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import anndata as ad
import numpy as np
import pytest


def _run_demo(out, *extra):
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    env.pop("IMAGENE_DATA_DIR", None)  # the default demo must need no data folder at all
    proc = subprocess.run(
        [sys.executable, "-m", "imagene", "demo", "--out", str(out), "--quiet", *extra],
        capture_output=True, text=True, env=env, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``imagene demo`` with its embedded default: synthetic sections, nothing read from disk or network."""
    return _run_demo(tmp_path_factory.mktemp("demo") / "out")


@pytest.fixture(scope="module")
def demo_real(tmp_path_factory, data_dir):
    """``imagene demo --data <her2st>``: the same flow on the real sections B4, C2, C3, C4."""
    return _run_demo(tmp_path_factory.mktemp("demo_real") / "out", "--data", str(data_dir / "her2st"))


def _check_outputs(out, stdout):
    for f in ("imagene_demo.h5ad", "metrics.json", "predicted_vs_measured.png"):
        assert (out / f).stat().st_size > 1000
        assert f in stdout
    assert "ridge probe" in stdout


@pytest.mark.slow
def test_demo_default_is_synthetic_and_says_so(demo_run):
    out, stdout = demo_run
    _check_outputs(out, stdout)
    assert "synthetic" in stdout.lower()
    m = json.loads((out / "metrics.json").read_text())
    assert m["synthetic"] is True and "synthetic" in m["data"]
    assert m["test_section"] == "S3" and m["train_sections"] == ["S0", "S1", "S2"]
    assert m["n_test_spots"] == 250  # 1000 synthetic spots over 4 sections
    for block in ("hvg50", "heg50"):
        assert len(m[block]["genes"]) == 50
        # expression is tied to the painted tissue domains: both predictors find it on the held-out section
        assert m[block]["umpire"]["mean_pearson"] > 0.1, m[block]
        assert m[block]["ridge_probe"]["mean_pearson"] > 0.1, m[block]
        assert m[block]["mean_expression"]["mean_pearson"] is None


@pytest.mark.slow
def test_demo_on_real_her2st_sections(demo_real):
    out, stdout = demo_real
    _check_outputs(out, stdout)
    m = json.loads((out / "metrics.json").read_text())
    assert m["synthetic"] is False
    assert m["test_section"] == "C4" and m["train_sections"] == ["B4", "C2", "C3"]
    assert m["n_test_spots"] == 184  # C4: selected spots with counts
    for block in ("hvg50", "heg50"):
        assert len(m[block]["genes"]) == 50
        r_umpire = m[block]["umpire"]["mean_pearson"]
        r_ridge = m[block]["ridge_probe"]["mean_pearson"]
        assert r_umpire > 0.05, m[block]
        assert r_ridge > 0.05, m[block]
        # a constant predictor has no defined correlation: it is reported as such, not as 0
        assert m[block]["mean_expression"]["mean_pearson"] is None
        assert m[block]["mean_expression"]["n_undefined"] == 50
    a = ad.read_h5ad(out / "imagene_demo.h5ad")
    assert set(a.obs.loc[a.obs["imagene_split"] == "test", "section"].astype(str)) == {"C4"}
    assert "ERBB2" in a.var_names  # the her2st marker is among the genes kept and drawn


@pytest.mark.slow
def test_demo_h5ad_carries_the_documented_keys(demo_run):
    out, _ = demo_run
    a = ad.read_h5ad(out / "imagene_demo.h5ad")
    assert {"X_he_efficientnet_lite0", "X_imagene_image", "X_imagene_gene", "X_imagene_joint"} <= set(a.obsm)
    assert {"imagene_niche_connectivities", "imagene_niche_distances"} <= set(a.obsp)
    assert {"counts", "imagene_predicted", "imagene_niche_mean"} <= set(a.layers)
    assert set(a.obs["imagene_split"].astype(str)) == {"train", "test"}
    assert set(a.obs.loc[a.obs["imagene_split"] == "test", "section"].astype(str)) == {"S3"}
    assert np.isfinite(a.layers["imagene_predicted"]).all()
    assert a.obsm["X_he_efficientnet_lite0"].shape == (a.n_obs, 1280)


def test_demo_data_options_are_checked(tmp_path):
    from imagene._demo import load_demo_data

    with pytest.raises(ValueError, match="not both"):
        load_demo_data(tmp_path, dataset="her2st")
    with pytest.raises(FileNotFoundError, match="one folder per section"):
        load_demo_data(tmp_path)
    with pytest.raises(ValueError, match="her2st"):
        load_demo_data(dataset="nonsense")


def test_console_script_is_declared():
    try:
        eps = metadata.entry_points(group="console_scripts")
    except metadata.PackageNotFoundError:  # pragma: no cover
        pytest.skip("imagene is not installed (running from a source tree)")
    names = {ep.name: ep.value for ep in eps}
    if "imagene" not in names:
        pytest.skip("imagene is not installed (running from a source tree)")
    assert names["imagene"] == "imagene._cli:main"
