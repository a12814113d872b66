"""``imagene.settings``: a readable repr, and quiet by default without hiding imagene's own warnings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import imagene as ig

SRC = str(Path(__file__).resolve().parents[1] / "src")

#: a small UMPIRE fit, save and load, with one imagene warning; run in a fresh interpreter so the
#: warnings and log lines reach stderr as a user sees them (pytest would capture warnings itself)
TRAIN = """
import sys, imagene as ig
if len(sys.argv) > 1:
    ig.settings.third_party_verbosity = sys.argv[1]
a = ig.datasets.synthetic_he_st(n_obs=120, n_vars=30, n_sections=3, image_px=256)
ig.pp.extract_tiles(a, tile_size_um=32, tile_px=32, show_progress_bar=False)
ig.pp.embed_tiles(a, encoder="tiny", device="cpu", show_progress_bar=False)
ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section")
m = ig.model.UMPIRE(a)
m.train(max_epochs=2, accelerator="cpu", batch_size=32)
m.save(sys.argv[0] + "_model", overwrite=True)
ig.model.UMPIRE.load(sys.argv[0] + "_model", adata=a)
ig.nn.get_image_encoder("small_cnn", n_features=8) and ig.nn.get_image_encoder("efficientnet_lite0", pretrained=False)
"""

#: what Lightning and scvi-tools print around a fit and a load when nobody quiets them
NOISE = ("GPU available", "TPU available", "Tip:", "already downloaded", "smaller than the logging interval",
         "LeafSpec", "Trainer.fit` stopped")


def _python(args, tmp_path, **env):
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONWARNINGS": "default", **env}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_repr_lists_every_setting():
    text = repr(ig.settings)
    lines = text.splitlines()
    assert lines[0] == "imagene settings:"
    for name in ("verbosity", "third_party_verbosity", "seed", "progress_bar", "warnings_stacklevel"):
        assert any(line.split()[0] == name for line in lines[1:]), (name, text)
    old = ig.settings.verbosity
    try:
        ig.settings.verbosity = "warning"
        assert "verbosity              WARNING" in repr(ig.settings)
    finally:
        ig.settings.verbosity = old
    with pytest.raises(ValueError, match="'debug', 'info', 'warning' or 'error'"):
        ig.settings.verbosity = "loud"


def test_import_prints_no_syntax_warning(tmp_path):
    # squidpy's docrep templates warn at import ("'n_jobs' is not a valid key!") when nothing filters them
    bare = _python(["-c", "import squidpy"], tmp_path)
    assert "SyntaxWarning" in bare  # the noise is real
    out = _python(["-c", "import imagene, squidpy, imagene.pp, imagene.tl, imagene.pl, imagene.model, imagene.bench"],
                  tmp_path)
    assert "SyntaxWarning" not in out and "Warning" not in out, out


def test_training_is_quiet_by_default_and_imagene_warnings_still_show(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    out = _python([str(script)], tmp_path)
    for noise in NOISE:
        assert noise not in out, (noise, out[-3000:])
    assert "meaningless" in out  # imagene's own warning (random encoder weights)
    assert "Restored the weights of epoch" in out  # and its INFO messages
    # the same run with the third-party loggers at INFO prints Lightning's banners and scvi-tools' load line
    loud = _python([str(script), "info"], tmp_path)
    assert "GPU available" in loud and "already downloaded" in loud


def test_debug_verbosity_lets_third_party_messages_through():
    old = (ig.settings.verbosity, ig.settings.third_party_verbosity)
    try:
        ig.settings.verbosity = "debug"
        assert ig.settings.third_party_verbosity == logging.INFO
        ig.model  # noqa: B018  (loading a submodule applies the levels to Lightning and scvi-tools)
        assert logging.getLogger("lightning.pytorch").level == logging.INFO
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            ig.settings.third_party_verbosity = "info"  # noise filters off: nothing hidden
            warnings.warn_explicit("'n_jobs' is not a valid key!", SyntaxWarning, "decorators.py", 43,
                                   module="docrep.decorators")
        assert [str(w.message) for w in seen] == ["'n_jobs' is not a valid key!"]
    finally:
        ig.settings.verbosity, ig.settings.third_party_verbosity = old
    assert logging.getLogger("lightning.pytorch").level == logging.WARNING
