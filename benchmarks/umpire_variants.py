"""UMPIRE variants: masked-gene pre-training of the rank-token gene encoder, then the harness comparison.

Stage ``pretrain``: the corpus is ``shared/data/her2st_expression_only`` (28 HER2+ sections of 8
patients, counts only). Whole patients are held out (default: patient H, sections H1-H3); the
encoder is pre-trained by masked-gene modelling on the other sections and its masked-token
accuracy on the held-out patient is reported next to an untrained encoder of the same
architecture and a frequency baseline (the gene most often found at each rank position in the
training corpus). The evaluation sections of the image-gene benchmark (her2st A1, B4, C2, C3,
C4) are NOT part of this folder, so pre-training never sees them. Weights are written to
``benchmarks/results/umpire_gene_encoder.pt``.

Stage ``variants``: ``imagene.bench`` compares, on expression prediction (leave-one-section-out
over B4, C2, C3, C4, next to the ridge probe and mean expression) and linear probing of her2st A1
pathologist labels (embedding of A1 from a model trained on B4, C2, C3, C4 — A1 never seen in
training; probe split: contiguous spatial blocks of A1, ``imagene.tl.linear_probe``):
MLP vs rank-transformer gene encoders, adapter vs fine-tune (pre-trained weights) and REC vs
contrastive.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/umpire_variants.py --stage pretrain --epochs 15
    PYTHONPATH=src python benchmarks/umpire_variants.py --stage variants --max-epochs 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import anndata as ad  # noqa: E402

import imagene as ig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import frame_table, summary_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")
OUT = ROOT / "benchmarks" / "results"
WEIGHTS = OUT / "umpire_gene_encoder.pt"


def read_expression_only(sections=None) -> list[ad.AnnData]:
    """Counts of the her2st expression-only sections (spots ``"{x}x{y}"`` × gene symbols)."""
    folder = DATA / "her2st_expression_only"
    names = sorted(p.name.split(".")[0] for p in folder.glob("*.tsv.gz"))
    out = []
    for s in names if sections is None else sections:
        df = pd.read_csv(folder / f"{s}.tsv.gz", sep="\t", index_col=0)
        df = df.loc[:, ~df.columns.duplicated()]
        a = ad.AnnData(sp.csr_matrix(df.to_numpy(dtype=np.float32)))
        a.obs_names = [f"{s}_{i}" for i in df.index.astype(str)]
        a.var_names = df.columns.astype(str)
        a.obs["section"] = s
        out.append(a)
    return out


def pretrain(args) -> dict:
    import torch

    ig.settings.seed = 0
    secs = read_expression_only()
    held = [a for a in secs if a.obs["section"].iloc[0][0] in args.held_out_patients]
    train = [a for a in secs if a.obs["section"].iloc[0][0] not in args.held_out_patients]
    t0 = time.time()
    pre = ig.model.GeneEncoderPretrainer(
        train, layer=None, n_tokens=args.n_tokens, d_model=args.d_model, n_layers=args.n_layers,
        min_spots=args.min_spots,
    )
    before = pre.evaluate(held)
    pre.train(max_epochs=args.epochs, batch_size=128, lr=2e-3, checkpoint_dir=OUT / "umpire_mlm_ckpt",
              resume=args.resume, accelerator="cpu", enable_progress_bar=False)
    after = pre.evaluate(held, untrained=False)
    pre.save(WEIGHTS)
    res = {
        "corpus_sections": len(train),
        "corpus_spots": int(sum(a.n_obs for a in train)),
        "held_out_sections": [a.obs["section"].iloc[0] for a in held],
        "held_out_spots": int(sum(a.n_obs for a in held)),
        "vocabulary": len(pre.vocabulary.genes),
        "config": pre.config,
        "epochs": args.epochs,
        "threads": torch.get_num_threads(),
        "seconds": round(time.time() - t0, 1),
        "mlm_accuracy_heldout_pretrained": after["pretrained"],
        "mlm_accuracy_heldout_untrained": before["untrained"],
        "mlm_accuracy_heldout_frequency": after["frequency"],
        "n_masked": after["n_masked"],
        "train_loss": pre.history_["train_loss"],
    }
    (OUT / "umpire_pretrain.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return res


class ProbeA1:
    """Linear probing of A1's pathologist labels on the embedding of a model trained on other sections."""

    def __init__(self, a1: ad.AnnData) -> None:
        self.a1 = a1

    def score(self, name: str, z: np.ndarray) -> dict:
        a = self.a1.copy()
        a.obsm["X_probe"] = np.asarray(z)
        res = ig.tl.linear_probe(a, "X_probe", "label", split="spatial_blocks", n_blocks=5)
        return {"method": name, "balanced_accuracy": res["balanced_accuracy"].mean(),
                "balanced_accuracy_sd": res["balanced_accuracy"].std(), "f1_weighted": res["f1_weighted"].mean()}


def variants(args) -> None:
    ig.settings.seed = 0
    ig.settings.progress_bar = False
    cache = str(OUT / "feature_cache")
    key = "X_he_efficientnet_lite0"
    weights = str(WEIGHTS)
    fast = {"accelerator": "cpu", "enable_progress_bar": False}
    models = {
        "umpire_mlp": {},
        "umpire_rank_transformer": {"gene_encoder": "rank_transformer"},
        "umpire_rt_pretrained_adapter": {"gene_encoder": "rank_transformer", "gene_encoder_weights": weights,
                                         "mode": "adapter"},
        "umpire_rt_pretrained_finetune": {"gene_encoder": "rank_transformer", "gene_encoder_weights": weights,
                                          "mode": "finetune"},
        "umpire_rec": {"objective": "rec"},
    }
    rows = []
    train_secs = ["B4", "C2", "C3", "C4"]
    adata = ig.bench.read_sections(DATA / "her2st", train_secs, cache=cache)
    if "expression" in args.tasks:
        methods = [ig.bench.MeanExpression(), ig.bench.RidgeProbe()] + [
            ig.bench.ImageneModel(name=n, model_kwargs=kw, train_kwargs=dict(fast), tasks=("expression",))
            for n, kw in models.items()
        ]
        df = ig.bench.run(adata, task="expression", methods=methods, max_epochs=args.max_epochs, seeds=[0])
        df.to_csv(OUT / "umpire_variants_expression.csv", index=False)
        table = ig.bench.summarize(df)
        (OUT / "umpire_variants_expression.md").write_text(
            summary_table(table, ["pcc_hvg50", "pcc_heg50", "mse_hvg50", "mse_heg50", "seconds"]) + "\n"
        )
        print(table.to_string())
    if "probe" in args.tasks:
        a1 = ig.bench.read_sections(DATA / "her2st", ["A1"], cache=cache)
        probe = ProbeA1(a1)
        rows.append(probe.score("image_features (frozen efficientnet_lite0)", a1.obsm[key]))
        train = adata.copy()
        for n, kw in models.items():
            t0 = time.time()
            ig.model.UMPIRE.setup_anndata(train, layer="counts", image_key=key, library_key="section")
            m = ig.model.UMPIRE(train, **kw)
            m.train(max_epochs=args.max_epochs, **fast)
            z = m.get_latent_representation(a1, modality="image")
            r = probe.score(n, z)
            r["train_s"] = round(time.time() - t0, 1)
            rows.append(r)
            print(r, flush=True)
        res = pd.DataFrame(rows)
        res.to_csv(OUT / "umpire_variants_probe.csv", index=False)
        (OUT / "umpire_variants_probe.md").write_text(frame_table(res, index=False) + "\n")
        print(res.to_string())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["pretrain", "variants"], default="pretrain")
    p.add_argument("--held-out-patients", default="H")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--n-tokens", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--min-spots", type=int, default=2000)
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--tasks", nargs="+", default=["expression", "probe"])
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    pretrain(args) if args.stage == "pretrain" else variants(args)


if __name__ == "__main__":
    main()
