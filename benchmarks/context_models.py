"""Every alignment model with and without context, next to the ridge probe and the context ridge (LOSO).

Leave-one-section-out with :func:`imagene.bench.run` on her2st B4, C2, C3, C4 (``--mob``: the
mouse olfactory bulb MOB1 <-> MOB2), tasks expression and retrieval from one fit per fold:

- ``ridge_probe`` / ``context_ridge``: StandardScaler -> PCA(256) -> ridge on the spot features /
  on the context matrix (spot tile over 4 flips, tiles of 224 and 448 µm, mean of the 6 nearest
  spots), as in ``imagene bench --context``; ``context_ridge_head``: the models' ridge head on the
  context matrix without a model (rank and centring chosen on the training sections alone);
- ``umpire`` (spot features) and ``umpire_context`` (its image tower a ContextTower on the context
  matrix); ``stalign`` and ``sigmma`` at their defaults (their image towers read their own tiles:
  STAlign a niche of neighbouring tiles, SIGMMA multi-scale tile graphs).

Each model is scored twice: ``[reference]`` (query-reference prediction) and ``[head]`` (the
ridge head of ``model.fit_expression_head(features_key=<context matrix>)``: a reduced-rank ridge
from the context matrix and the model's image latent, rank and per-section centring chosen by
leave-one-section-out over the fold's TRAINING sections); ``stalign`` also ``[probe]``. Retrieval
compares the image and gene latents (context enters it only through the image tower).

Usage (from the repository root)::

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/context_models.py --cache /tmp/context_cache --seeds 0
    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/context_models.py --cache /tmp/context_cache --mob

Writes ``benchmarks/results/context_models_<her2st|mob>_<methods>.json`` and ``.md``.
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
from _common import DATA, RESULTS, machine_info, quiet  # noqa: E402
from context_baselines import _read_mob  # noqa: E402

import imagene as ig  # noqa: E402
from imagene.bench._report import _markdown, per_fold_table  # noqa: E402

SPOT = "X_he_efficientnet_lite0"
CONTEXT = "{image_key}_context"
HEAD = {"reference": {}, "head": {"method": "head"}}


def methods(names: list[str]) -> list:
    """The methods named in ``names`` (``baselines``, ``umpire``, ``umpire_context``, ``stalign``, ``sigmma``)."""
    b = ig.bench
    table = {
        "baselines": [b.RidgeProbe(), b.ContextRidge(), b.ContextRidge(head=True)],
        "umpire": [b.ImageneModel(name="umpire", predictions=HEAD, head_features=CONTEXT,
                                  tasks=("expression", "retrieval"))],
        "umpire_context": [b.umpire_context(head_features=CONTEXT)],
        "stalign": [b.ImageneModel(ig.model.STAlign, name="stalign", head_features=CONTEXT,
                                   predictions={**HEAD, "probe": {"method": "probe"}},
                                   tasks=("expression", "retrieval"))],
        "sigmma": [b.ImageneModel(ig.model.SIGMMA, name="sigmma", predictions=HEAD, head_features=CONTEXT,
                                  tasks=("expression", "retrieval"))],
    }
    unknown = set(names) - set(table)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {sorted(table)}")
    return [m for n in names for m in table[n]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("/tmp/imagene_context_cache"))
    p.add_argument("--mob", action="store_true", help="MOB1 <-> MOB2 instead of her2st")
    p.add_argument("--methods", nargs="+", default=["baselines", "umpire", "umpire_context", "stalign", "sigmma"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    quiet()
    if args.mob:
        adata, tissue = _read_mob(args.cache), "mob"
    else:
        adata = ig.bench.read_sections(DATA / "her2st", ["B4", "C2", "C3", "C4"], cache=args.cache, context=True)
        tissue = "her2st"
    t0 = time.perf_counter()
    dfs = ig.bench.run(adata, library_key="section", task=["expression", "retrieval"], methods=methods(args.methods),
                       image_key=SPOT, max_epochs=args.max_epochs, seeds=args.seeds)
    out = {"command": " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1), "machine": machine_info()}
    md = [f"# context models: {tissue}, seeds {args.seeds}", "", f"`{out['command']}` ({out['seconds']} s)", ""]
    for task, df in dfs.items():
        md += [f"## {task}: mean ± std over folds (and seeds)", "", _markdown(ig.bench.summarize(df, task)), "",
               f"## {task}: per fold", "", _markdown(per_fold_table(df, task)), ""]
        out[task] = df.to_dict("records")
    text = "\n".join(md)
    print(text)
    stem = f"context_models_{tissue}_{'_'.join(args.methods)}" + ("" if args.seeds == [0] else "_seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=1, default=float))
    (args.out / f"{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
