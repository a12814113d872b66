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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(os.environ.get("IMAGENE_DATA", HERE.parent.parent / "shared" / "data"))
SECTIONS = ("B4", "C2", "C3", "C4")


def load(cache: str | None):
    """The checks' path AnnData (read, tiled, embedded with the defaults), cached when ``cache`` is set."""
    import anndata as ad

    import imagene as ig

    if cache and Path(cache).exists():
        return ad.read_h5ad(cache)
    parts = {}
    for s in SECTIONS:
        folder = DATA / "her2st" / s
        image = next(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png", ".tif"))
        a = ig.io.read_legacy_st(folder / f"{s}.tsv.gz", folder / f"{s}_selection.tsv", image, library_id=s)
        ig.pp.extract_tiles(a, show_progress_bar=False)
        ig.pp.embed_tiles(a, show_progress_bar=False)
        del a.obsm["imagene_tiles"]
        parts[s] = a
    return ig.io.concat(parts, section_key="section")


def _markdown(df) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--test", nargs="*", default=None, help="held-out sections (default: all four)")
    p.add_argument("--n-seen", type=int, default=256)
    p.add_argument("--n-unseen", type=int, default=250)
    p.add_argument("--cache", default=os.environ.get("IMAGENE_BENCH_CACHE", "/tmp/igcache/check_path.h5ad"))
    p.add_argument("--quick", action="store_true", help="2 epochs, one fold")
    p.add_argument("--out", type=Path, default=HERE / "results" / "zero_shot.json")
    args = p.parse_args()
    import torch

    import imagene as ig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    ig.settings.seed = 0
    ig.settings.progress_bar = False
    adata = load(args.cache)
    if "imagene_nuclei" not in adata.obsm:
        ig.pp.nuclei_maps(adata, library_key="section", show_progress_bar=False)
    t = time.perf_counter()
    res = ig.bench.zero_shot(
        adata,
        test_sections=["C4"] if args.quick else args.test,
        n_seen=args.n_seen,
        n_unseen=args.n_unseen,
        max_epochs=2 if args.quick else args.epochs,
        show_progress_bar=False,
    )
    seconds = time.perf_counter() - t
    print(_markdown(res.round(3)))
    summary = res.groupby("method", sort=False)[["pcc_m", "pcc_h", "mse"]].agg(["mean", "std"])
    summary.columns = [f"{a} {b}" for a, b in summary.columns]
    print()
    print(_markdown(summary.round(3).reset_index()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "protocol": f"leave-one-section-out over {list(res['fold'].unique())}; unseen = {args.n_unseen} most "
                f"expressed training genes, seen = next {args.n_seen}; AlignST epochs = {2 if args.quick else args.epochs}",
                "per_fold": res.to_dict(orient="records"),
                "seconds": seconds,
                "threads": torch.get_num_threads(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
