"""Calibration of the predicted spread (``layers['imagene_predicted_sd']``) on held-out her2st sections.

For each held-out section (leave-one-section-out over B4, C2, C3, C4; ``--test`` picks some), a
model is trained on the other sections, saved and loaded again without data (the apply path),
and predicts the held-out section from H&E alone with :func:`imagene.tl.predict_expression`.
On the 50 most variable and the 50 most expressed genes of the training sections (log1p CP10k,
the protocol's genes) it reports

- ``within_1sd`` / ``within_2sd``: share of measured values inside prediction ± 1 sd / ± 2 sd
  (a Gaussian would give 0.683 / 0.954);
- ``spearman_sd_abs_error``: rank correlation between predicted sd and absolute error, pooled over
  spots × genes, and ``spearman_per_gene``: its mean over genes (does the sd rank the spots of a
  gene by how wrong they are?);
- ``ood_share``: share of held-out spots flagged ``obs['imagene_ood']``.

Models: ``umpire`` (retrieval; sd = similarity-weighted spread of the k references) and
``stalign_probe`` (MLP probe; sd = 16 Monte-Carlo-dropout passes; frozen-feature ablation
``adaptive_encoders=False`` to stay fast on CPU).

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/uncertainty_calibration.py --test C4 --models umpire
    PYTHONPATH=src python benchmarks/uncertainty_calibration.py          # 4 folds, both models
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import DATA, RESULTS, machine_info, quiet  # noqa: E402

SECTIONS = ("B4", "C2", "C3", "C4")


def calibration(y: np.ndarray, pred: np.ndarray, sd: np.ndarray) -> dict[str, float]:
    """Coverage of ± 1 / 2 sd and rank correlation of sd with the absolute error."""
    err = np.abs(y - pred)
    rho = spearmanr(sd.ravel(), err.ravel()).statistic
    per_gene = [spearmanr(sd[:, j], err[:, j]).statistic for j in range(y.shape[1]) if np.ptp(sd[:, j]) > 0]
    return {
        "within_1sd": float(np.mean(err <= sd)),
        "within_2sd": float(np.mean(err <= 2 * sd)),
        "spearman_sd_abs_error": float(rho),
        "spearman_per_gene": float(np.nanmean(per_gene)) if per_gene else float("nan"),
        "mean_sd": float(sd.mean()),
        "mean_abs_error": float(err.mean()),
    }


def run_fold(adata, test: str, model_name: str, max_epochs: int, workdir: Path) -> dict:
    import imagene as ig
    from imagene._utils import log_normalize
    from imagene.metrics import top_variable_genes

    train = adata[adata.obs["section"] != test].copy()
    query = adata[adata.obs["section"] == test].copy()
    y_train = log_normalize(train.layers["counts"])
    hvg = top_variable_genes(y_train, 50)
    heg = np.argsort(-y_train.mean(0), kind="stable")[:50]
    genes = {"hvg50": train.var_names[hvg], "heg50": train.var_names[heg]}
    t0 = time.perf_counter()
    ig.settings.seed = 0
    fit = {"accelerator": "cpu", "enable_progress_bar": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model_name == "umpire":
            ig.model.UMPIRE.setup_anndata(
                train, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section"
            )
            model = ig.model.UMPIRE(train)
            model.train(max_epochs=max_epochs, **fit)
            cls, kwargs = ig.model.UMPIRE, {}
        else:
            ig.model.STAlign.setup_anndata(
                train, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section"
            )
            model = ig.model.STAlign(train, adaptive_encoders=False)
            model.train(max_epochs=max_epochs, probe_epochs=30, **fit)
            cls, kwargs = ig.model.STAlign, {"method": "probe"}
    model.save(workdir / model_name, overwrite=True)
    loaded = cls.load(workdir / model_name)
    t_fit = time.perf_counter() - t0
    q = query.copy()
    del q.obsm["X_he_efficientnet_lite0"]  # recomputed from the image with the model's tile settings
    out = ig.tl.predict_expression(loaded, q, **kwargs)
    out = q if out is None else out  # the query measures the model's genes: written into its layers
    y = log_normalize(query[:, out.var_names].layers["counts"])
    res = {"test": test, "model": model_name, "n_spots": int(query.n_obs), "fit_s": round(t_fit, 1),
           "ood_share": float(out.obs["imagene_ood"].mean()) if "imagene_ood" in out.obs else None}
    for name, g in genes.items():
        cols = out.var_names.get_indexer(g)
        res[name] = calibration(y[:, cols], out.layers["imagene_predicted"][:, cols],
                                out.layers["imagene_predicted_sd"][:, cols])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test", nargs="*", default=list(SECTIONS), help="held-out sections (default: all four)")
    p.add_argument("--models", nargs="*", default=["umpire", "stalign_probe"], choices=["umpire", "stalign_probe"])
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--cache", default="/tmp/imagene_bench_cache", help="cached tile features")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    quiet()
    import imagene as ig

    adata = ig.bench.read_sections(DATA / "her2st", list(SECTIONS), cache=args.cache)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for test in args.test:
            for m in args.models:
                res = run_fold(adata, test, m, args.max_epochs, Path(tmp))
                rows.append(res)
                h = res["hvg50"]
                print(f"{m:14s} test {test}: ±1sd {h['within_1sd']:.3f}  ±2sd {h['within_2sd']:.3f}  "
                      f"Spearman(sd,|err|) {h['spearman_sd_abs_error']:.3f} (per gene {h['spearman_per_gene']:.3f})  "
                      f"OOD {res['ood_share']}", flush=True)
    summary = {}
    for m in args.models:
        sel = [r for r in rows if r["model"] == m]
        summary[m] = {
            g: {k: (float(np.mean([r[g][k] for r in sel])), float(np.std([r[g][k] for r in sel])))
                for k in sel[0][g]}
            for g in ("hvg50", "heg50")
        }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "uncertainty_calibration.json"
    out.write_text(json.dumps({"machine": machine_info(), "folds": rows, "mean_std_over_folds": summary,
                               "max_epochs": args.max_epochs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
