"""UMPIRE with spatial / multi-scale context (``image_context='attention'``) against UMPIRE and the ridge probes (LOSO).

Leave-one-section-out with :func:`imagene.bench.run` on her2st B4, C2, C3, C4: ``ridge_probe`` and
``umpire`` on the frozen EfficientNet-Lite0 feature of the 112 µm spot tile, ``context_ridge`` and
``umpire_context`` (:func:`imagene.bench.umpire_context`: UMPIRE at its defaults with a
:class:`imagene.nn.ContextTower` image tower) on the context matrix: the spot feature, tiles of
224 and 448 µm around the spot, and the mean spot feature of its 6 nearest spots in its section
(4 blocks, 5,120 features). Without flip averaging (``--tta none``, the default here: a quarter of
the tile forward passes of ``imagene bench --context``, which averages every tile over 4 flips).
Expression (PCC HVG50 / HEG50) and retrieval (Recall@5 %) are scored on one fit per fold; the
models early-stop on a held-out TRAINING section, never on the test section.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/context_umpire.py --cache /tmp/wctx_cache

Writes ``benchmarks/results/context_umpire.{json,md}``. With ``--validation`` it reports instead
what the models see during training: for each fold, the best ``recall5_validation`` (the
early-stopping metric, mean of image→gene and gene→image Recall@5 % on the held-out TRAINING
section) of UMPIRE and of UMPIRE with ``image_context='attention'``, on all genes
(``context_umpire_validation.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, quiet

import imagene as ig
from imagene.bench._report import _markdown, per_fold_table

HER2ST = ("B4", "C2", "C3", "C4")
ENCODER = "efficientnet_lite0"
SPOT = f"X_he_{ENCODER}"
CONTEXT = f"{SPOT}_context"


def read(cache: Path, tta: str | None):
    """her2st with the context matrix [spot, 224 µm, 448 µm, neighbour mean of the spot] in ``obsm[CONTEXT]``."""
    if tta is None:  # the 112 µm spot tile without flips is the spot feature itself: embed only the larger tiles
        adata = ig.bench.read_sections(DATA / "her2st", HER2ST, encoder=ENCODER, cache=cache, context=True,
                                       context_sizes_um=[224.0, 448.0], context_tta=None)
        ig.pp.context_matrix(adata, [SPOT, f"{SPOT}_224um", f"{SPOT}_448um"], key_added=CONTEXT)
    else:
        adata = ig.bench.read_sections(DATA / "her2st", HER2ST, encoder=ENCODER, cache=cache, context=True,
                                       context_tta=tta)
    return adata


def validation(adata, epochs: int) -> list[dict]:
    """Best validation Recall@5 % (held-out training section) of umpire and umpire_context, per fold."""
    import numpy as np

    rows = []
    for test in HER2ST:
        train = adata[adata.obs["section"] != test].copy()
        train.obs["section"] = train.obs["section"].cat.remove_unused_categories()
        for name, key, kwargs in [("umpire", SPOT, {}), ("umpire_context", CONTEXT, {"image_context": "attention"})]:
            ig.settings.seed = 0
            ig.model.UMPIRE.setup_anndata(train, layer="counts", image_key=key, library_key="section")
            model = ig.model.UMPIRE(train, **kwargs)
            model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
            val = sorted(set(train.obs["section"].iloc[model.validation_indices].astype(str)))
            best = float(np.nanmax(model.history["recall5_validation"].iloc[:, 0].to_numpy()))
            rows.append({"fold": test, "validation": val, "method": name, "recall5_validation": round(best, 4)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("/tmp/imagene_context_cache"))
    p.add_argument("--tta", default="none", choices=["none", "flips"], help="flip averaging of the context tiles")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--validation", action="store_true", help="only the validation recall of the two UMPIREs per fold")
    args = p.parse_args()
    quiet()
    t0 = time.perf_counter()
    adata = read(args.cache, None if args.tta == "none" else args.tta)
    widths = adata.uns[CONTEXT]["widths"]
    print(f"read + context: {time.perf_counter() - t0:.0f} s; {CONTEXT} widths {widths}", flush=True)
    if args.validation:
        rows = validation(adata, args.epochs)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "context_umpire_validation.json").write_text(json.dumps(rows, indent=1))
        return
    methods = [ig.bench.RidgeProbe(), ig.bench.ContextRidge(), ig.bench.ImageneModel(), ig.bench.umpire_context()]
    t1 = time.perf_counter()
    dfs = ig.bench.run(adata, library_key="section", task=["expression", "retrieval"], methods=methods,
                       image_key=SPOT, max_epochs=args.epochs, seeds=[0])
    out = {"command": " ".join(sys.argv), "tta": args.tta, "seconds": round(time.perf_counter() - t1, 1)}
    md = []
    for task, df in dfs.items():
        md += [f"## {task}: per fold", "", _markdown(per_fold_table(df, task)), "",
               f"## {task}: mean ± std over folds", "", _markdown(ig.bench.summarize(df, task)), ""]
        out[task] = df.to_dict("records")
    text = "\n".join(md)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "context_umpire.json").write_text(json.dumps(out, indent=1, default=float))
    (args.out / "context_umpire.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
