"""Training every model shares: determinism, resume after a kill, atomic checkpoints, no-step runs.

Small synthetic sections with the offline 'tiny' encoder, CPU, a few epochs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import imagene as ig

FAST = {"accelerator": "cpu", "enable_progress_bar": False}
SRC = str(Path(ig.__file__).resolve().parents[1])

#: the data every test trains on (also rebuilt by the killed subprocess: keep in sync with _SCRIPT)
_DATA = "ig.datasets.synthetic_he_st(n_obs=240, n_vars=30, n_sections=2, image_px=256, seed=0)"
STALIGN_SETUP = {"spot_tile_size_um": 24, "spot_tile_px": 16, "niche_encoder": "tiny", "niche_tile_px": 16}


def _data():
    a = eval(_DATA)  # a constant expression shared with the subprocess script
    ig.pp.extract_tiles(a, tile_size_um=24, tile_px=16, show_progress_bar=False)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
    del a.obsm["imagene_tiles"]
    a.varm["gene_vec"] = np.random.default_rng(1).normal(size=(a.n_vars, 16)).astype(np.float32)
    return a


@pytest.fixture(scope="module")
def data():
    return _data()


def _model(name: str, data):
    """A small model of each kind, set up on a fresh copy of ``data`` and seeded."""
    a = data.copy()
    ig.settings.seed = 0
    if name == "UMPIRE":
        ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section")
        return ig.model.UMPIRE(a, n_hidden=16, n_latent=8), {"batch_size": 32}
    if name == "STAlign":
        ig.model.STAlign.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section", **STALIGN_SETUP)
        return ig.model.STAlign(a, n_latent=16, n_hidden=16), {"batch_size": 32, "probe_epochs": 1}
    if name == "SIGMMA":
        ig.model.SIGMMA.setup_anndata(a, layer="counts", image_key=None, library_key="section", encoder="tiny",
                                      crop_px=16, tile_size_um=70)
        return ig.model.SIGMMA(a, n_latent=8, n_hidden=16), {"batch_size": 8}
    ig.model.AlignST.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section", nuclei_key=None,
                                   gene_embedding_key="gene_vec")
    return ig.model.AlignST(a, n_hidden=16, n_layers=1), {"seen_genes": list(a.var_names[2:])}


MODELS = ["UMPIRE", "STAlign", "SIGMMA", "AlignST"]


def _outputs(name, m):
    z = m.get_latent_representation()
    if name == "AlignST":
        pred = m.predict_expression(gene_list=list(m.adata.var_names[:5]))
    else:
        pred = m.predict_expression(k=5)
    return np.asarray(z), np.asarray(pred)


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_data_gives_bit_identical_latents_and_predictions(name, data):
    outs = []
    for _ in range(2):
        m, kw = _model(name, data)
        m.train(max_epochs=2, early_stopping=False, **kw, **FAST)
        outs.append(_outputs(name, m))
    (z1, p1), (z2, p2) = outs
    assert np.isfinite(z1).all() and np.isfinite(p1).all()
    assert np.array_equal(z1, z2) and np.array_equal(p1, p2)  # bit-identical, not merely close
    # and a different seed does change them (the test can fail)
    m, kw = _model(name, data)
    ig.settings.seed = 1
    m.train(max_epochs=2, early_stopping=False, **kw, **FAST)
    assert not np.array_equal(_outputs(name, m)[0], z1)


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------
def _epochs_done(ckpt: Path) -> int:
    """Epochs a ``last.ckpt`` holds (written at the end of each epoch, whose 0-based index it stores)."""
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"]) + 1


@pytest.mark.parametrize("name", MODELS)
def test_resume_continues_from_the_last_checkpoint(name, data, tmp_path):
    """Stop after 2 epochs, resume to 4: the run ends with 4 epochs, and as good as an uninterrupted one."""
    m, kw = _model(name, data)
    m.train(max_epochs=2, early_stopping=False, checkpoint_dir=tmp_path, **kw, **FAST)
    assert _epochs_done(tmp_path / "last.ckpt") == 2
    assert not list(tmp_path.glob("*.tmp"))  # checkpoints are renamed into place
    m2, _ = _model(name, data)  # a fresh process would rebuild the model like this
    m2.train(max_epochs=4, early_stopping=False, checkpoint_dir=tmp_path, resume=True, **kw, **FAST)
    assert _epochs_done(tmp_path / "last.ckpt") == 4
    z = m2.get_latent_representation()
    assert np.isfinite(z).all()
    with pytest.raises(ValueError, match="checkpoint_dir"):
        m2.train(max_epochs=1, resume=True, **kw, **FAST)


_SCRIPT = """
import sys, time
import numpy as np
import imagene as ig
from lightning.pytorch.callbacks import Callback

class Slow(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        print("epoch", trainer.current_epoch, flush=True)
        time.sleep(1.0)

a = {data}
ig.pp.extract_tiles(a, tile_size_um=24, tile_px=16, show_progress_bar=False)
ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
del a.obsm["imagene_tiles"]
ig.settings.seed = 0
ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section")
m = ig.model.UMPIRE(a, n_hidden=16, n_latent=8)
m.train(max_epochs=8, batch_size=32, early_stopping=False, checkpoint_dir=sys.argv[1], callbacks=[Slow()],
        accelerator="cpu", enable_progress_bar=False)
print("finished", flush=True)
"""


def test_training_killed_midway_resumes_to_the_same_epochs(data, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(data=_DATA)))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            last = ckpt_dir / "last.ckpt"
            if last.exists() and _epochs_done(last) >= 3:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "finished" not in out  # killed mid-way
    done = _epochs_done(ckpt_dir / "last.ckpt")  # a whole checkpoint, never a half-written one
    assert 3 <= done < 8
    # resume in this process with the same data and settings
    a = data.copy()
    ig.settings.seed = 0
    ig.model.UMPIRE.setup_anndata(a, layer="counts", image_key="X_he_tiny", batch_key="section")
    resumed = ig.model.UMPIRE(a, n_hidden=16, n_latent=8)
    resumed.train(max_epochs=8, batch_size=32, early_stopping=False, checkpoint_dir=ckpt_dir, resume=True, **FAST)
    assert _epochs_done(ckpt_dir / "last.ckpt") == 8
    assert len(resumed.history["train_loss"]) == 8 - done  # only the remaining epochs ran
    # the uninterrupted run, for comparison
    b = data.copy()
    ig.settings.seed = 0
    ig.model.UMPIRE.setup_anndata(b, layer="counts", image_key="X_he_tiny", batch_key="section")
    full = ig.model.UMPIRE(b, n_hidden=16, n_latent=8)
    full.train(max_epochs=8, batch_size=32, early_stopping=False, **FAST)
    z = resumed.get_latent_representation()
    assert np.isfinite(z).all()
    r_resumed = float(resumed.history["recall5_validation"].iloc[-1, 0])
    r_full = float(full.history["recall5_validation"].iloc[-1, 0])
    assert abs(r_resumed - r_full) < 0.1, (r_resumed, r_full)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from imagene.train import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is interrupted while writing

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["epoch"] == 1  # the previous checkpoint is intact
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("name", MODELS)
def test_a_run_without_an_optimisation_step_raises_and_is_not_marked_trained(name, data):
    m, kw = _model(name, data)
    with pytest.raises(RuntimeError, match="no optimisation step"):
        m.train(max_epochs=1, early_stopping=False, limit_train_batches=0, **kw, **FAST)
    assert not m.is_trained_
    with pytest.raises(RuntimeError, match="not trained"):
        m.get_latent_representation()
