"""ST-Align in the evaluation harness: zero-shot clustering on her2st A1 and expression prediction (LOSO).

Runs ``imagene.bench`` with STAlign, its ablations (no ABFN = concatenation, no L_NS, no adaptive
encoders), UMPIRE and the baselines, and writes markdown tables to ``benchmarks/results/``.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/stalign_ablation.py --task clustering --max-epochs 20
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/stalign_ablation.py --task expression --max-epochs 20

Clustering: every method is fitted on A1 without its labels (zero-shot, as in the paper) and its
embedding clustered (k-means / leiden) against the pathologist labels (ARI). Expression: leave one
section out over B4, C2, C3, C4; STAlign predicts by query-reference retrieval and by the MLP probe
(the paper's gene prediction); one trained model serves both, scored as ``name[reference]`` and
``name[probe]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import imagene as ig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import summary_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"


PREDICTIONS = {"reference": {}, "probe": {"method": "probe"}}


def _stalign(name, **kw):
    return ig.bench.ImageneModel(ig.model.STAlign, name=name, model_kwargs=kw, clustering_modalities=("fused",))


ABLATIONS = {"concat": {"fusion": "concat"}, "no_lns": {"niche_loss": False},
             "no_adaptive": {"adaptive_encoders": False}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=["clustering", "expression"], default="clustering")
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (clustering), 0 (expression)")
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "results" / "feature_cache"))
    args = p.parse_args()
    ig.settings.progress_bar = False
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "clustering":
        adata = ig.bench.read_sections(DATA, ["A1"], cache=args.cache)
        methods = [
            ig.bench.ExpressionPCA(),
            ig.bench.ImageFeatures(),
            ig.bench.ImageneModel(name="umpire", clustering_modalities=("joint",)),
            _stalign("stalign"),
        ] + [_stalign(f"stalign_{n}", **kw) for n, kw in ABLATIONS.items()]
        df = ig.bench.run(adata, task="clustering", methods=methods, max_epochs=args.max_epochs, seeds=args.seeds)
    else:
        adata = ig.bench.read_sections(DATA, ["B4", "C2", "C3", "C4"], cache=args.cache)
        methods = [
            ig.bench.MeanExpression(),
            ig.bench.RidgeProbe(),
            ig.bench.ImageneModel(name="umpire", tasks=("expression",)),
            ig.bench.ImageneModel(ig.model.STAlign, name="stalign", tasks=("expression",), predictions=PREDICTIONS),
        ] + [
            ig.bench.ImageneModel(ig.model.STAlign, name=f"stalign_{n}", model_kwargs=kw, tasks=("expression",),
                                  predictions=PREDICTIONS)
            for n, kw in ABLATIONS.items()
        ]
        df = ig.bench.run(adata, task="expression", methods=methods, max_epochs=args.max_epochs, seeds=args.seeds)
    df.to_csv(out / f"stalign_{args.task}.csv", index=False)
    metrics = (["ari_leiden", "nmi_leiden", "ari_kmeans", "nmi_kmeans", "seconds"] if args.task == "clustering"
               else ["pcc_hvg50", "pcc_heg50", "mse_hvg50", "mse_heg50", "seconds"])
    text = summary_table(ig.bench.summarize(df), metrics)
    (out / f"stalign_{args.task}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
