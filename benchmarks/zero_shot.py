"""Zero-shot expression of unseen genes (ALIGN-ST protocol) on her2st sections, with baselines.

Per leave-one-section-out fold over B4, C2, C3, C4 (``imagene.bench.zero_shot``): the 250 most
expressed training genes are unseen, the next 256 are seen; AlignST predicts the unseen genes from
their descriptions; the ridge probe trained WITH them is the supervised reference; the
nearest-seen-gene ridge prediction is the gene-agnostic baseline.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/zero_shot.py [--epochs 30] [--test C4] [--quick]

Writes ``benchmarks/results/zero_shot.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(os.environ.get("IMAGENE_DATA", HERE.parent.parent / "shared" / "data"))
SECTIONS = ("B4", "C2", "C3", "C4")


def load(cache: str | None):
    """The four her2st sections read, tiled and embedded with the defaults (features cached per section)."""
    import imagene as ig

    return ig.bench.read_sections(DATA / "her2st", SECTIONS, cache=cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--test", nargs="*", default=None, help="held-out sections (default: all four)")
    p.add_argument("--n-seen", type=int, default=256)
    p.add_argument("--n-unseen", type=int, default=250)
    p.add_argument("--cache", default=str(HERE / "results" / "feature_cache"), help="folder of cached tile features")
    p.add_argument("--quick", action="store_true", help="2 epochs, one fold")
    p.add_argument("--out", type=Path, default=HERE / "results" / "zero_shot.json")
    args = p.parse_args()
    import torch
    from _common import frame_table

    import imagene as ig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    ig.settings.seed = 0
    ig.settings.progress_bar = False
    adata = load(args.cache)
    if "imagene_nuclei" not in adata.obsm:
        ig.pp.nuclei_maps(adata, library_key="section", show_progress_bar=False)
    import pandas as pd

    folds = ["C4"] if args.quick else (args.test or list(SECTIONS))
    epochs = 2 if args.quick else args.epochs
    rows, seconds = [], 0.0
    for fold in folds:  # one fold at a time, the results written after each (a long run can be cut short)
        t = time.perf_counter()
        part = ig.bench.zero_shot(
            adata, test_sections=[fold], n_seen=args.n_seen, n_unseen=args.n_unseen, max_epochs=epochs,
            show_progress_bar=False,
        )
        seconds += time.perf_counter() - t
        rows.append(part)
        res = pd.concat(rows, ignore_index=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "protocol": f"leave-one-section-out over {list(res['fold'].unique())} (of {folds}); unseen = "
            f"{args.n_unseen} most expressed training genes, seen = next {args.n_seen}; AlignST epochs = {epochs}",
            "per_fold": res.to_dict(orient="records"),
            "seconds": seconds,
            "threads": torch.get_num_threads(),
        }, indent=1))
        print(f"fold {fold} done in {time.perf_counter() - t:.0f} s", flush=True)
    print(frame_table(res, index=False))
    summary = res.groupby("method", sort=False)[["pcc_m", "pcc_h", "mse"]].agg(["mean", "std"])
    summary.columns = [f"{a} {b}" for a, b in summary.columns]
    print()
    print(frame_table(summary))


if __name__ == "__main__":
    main()
