"""The main job, `imagene demo`, end to end on the sample shipped inside the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import anndata as ad
import numpy as np
import pytest


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "imagene", "demo", "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_demo_writes_three_outputs_and_reports_them(demo_run):
    out, stdout = demo_run
    for f in ("imagene_demo.h5ad", "metrics.json", "predicted_vs_measured.png"):
        assert (out / f).stat().st_size > 1000
        assert f in stdout
    assert "ridge probe" in stdout


@pytest.mark.slow
def test_demo_metrics_are_honest_and_above_zero(demo_run):
    out, _ = demo_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_section"] == "C4" and "C4" not in m["train_sections"]
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


@pytest.mark.slow
def test_demo_h5ad_carries_the_documented_keys(demo_run):
    out, _ = demo_run
    a = ad.read_h5ad(out / "imagene_demo.h5ad")
    assert {"X_he_efficientnet_lite0", "X_imagene_image", "X_imagene_gene", "X_imagene_joint"} <= set(a.obsm)
    assert {"imagene_niche_connectivities", "imagene_niche_distances"} <= set(a.obsp)
    assert {"counts", "imagene_predicted", "imagene_niche_mean"} <= set(a.layers)
    assert set(a.obs["imagene_split"].astype(str)) == {"train", "test"}
    assert set(a.obs.loc[a.obs["imagene_split"] == "test", "section"].astype(str)) == {"C4"}
    assert np.isfinite(a.layers["imagene_predicted"]).all()
    assert a.obsm["X_he_efficientnet_lite0"].shape == (a.n_obs, 1280)


def test_console_script_is_declared():
    try:
        eps = metadata.entry_points(group="console_scripts")
    except metadata.PackageNotFoundError:  # pragma: no cover
        pytest.skip("imagene is not installed (running from a source tree)")
    names = {ep.name: ep.value for ep in eps}
    if "imagene" not in names:
        pytest.skip("imagene is not installed (running from a source tree)")
    assert names["imagene"] == "imagene._cli:main"
