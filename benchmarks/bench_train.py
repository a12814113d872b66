"""Training steps/s of ``imagene.model.UMPIRE`` vs a bare torch loop over the same ``UMPIREModule``.

Data: synthetic, 5,000 spots x 2,000 genes of sparse Poisson counts (``layers['counts']``) and
1,280-d frozen image features (the width of ``efficientnet_lite0``), one section.

- imagene: ``UMPIRE.setup_anndata`` + ``UMPIRE(adata)`` + ``model.train(max_epochs, batch_size=128)``
  with validation, early stopping and best-weight restore switched off (``train_size=1.0``), so
  every step is a training step: scvi-tools' AnnDataLoader, Lightning, the contrastive
  TrainingPlan. Steps/s is measured inside the run by a Lightning callback (epochs 2..E, steady
  state; median over epochs, and the best epoch), and the whole ``train()`` wall time (Trainer
  set-up included) is reported too.
- bare: a deep copy of the same freshly built module, ``torch.optim.AdamW`` with the plan's
  settings (lr 3e-4, weight decay 0.05, eps 0.01), ``module(tensors)`` → ``loss.backward()`` →
  ``opt.step()`` over shuffled batches of 128 (last incomplete batch dropped, as in imagene).
  Two variants: ``bare`` indexes dense tensors held in memory (pure module compute), and
  ``bare_csr`` slices the CSR counts per batch (the data access any AnnData loop pays).

Interleaved, after one warm-up run of each. A GPU variant runs when CUDA is available.
Run: ``python benchmarks/bench_train.py``.
"""

from __future__ import annotations

import copy
import time

import numpy as np

import _common as C


def synthetic(n_obs: int, n_genes: int, n_feat: int, seed: int = 0):
    """Sparse counts with a low-rank structure shared with the image features."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_obs, 8))
    rate = np.exp(z @ rng.normal(scale=0.6, size=(8, n_genes)) - 1.5).astype(np.float32)
    counts = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
    feats = (z @ rng.normal(size=(8, n_feat)) + rng.normal(size=(n_obs, n_feat))).astype(np.float32)
    adata = ad.AnnData(X=counts.copy(), obs=pd.DataFrame(index=[f"s{i}" for i in range(n_obs)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    adata.layers["counts"] = counts
    adata.obsm["X_he_synthetic"] = feats
    return adata


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    info = C.start(args)
    import torch
    from lightning.pytorch.callbacks import Callback

    import imagene as ig
    from imagene._constants import REGISTRY_KEYS

    C.quiet()  # again: importing lightning resets its loggers to INFO (threads stay as set)

    n_obs, n_genes, n_feat = (1000, 500, 1280) if args.quick else (5000, 2000, 1280)
    epochs = 3 if args.quick else 4
    repeats = args.repeats or (1 if args.quick else 3)
    batch_size, lr, wd = 128, 3e-4, 0.05
    adata = synthetic(n_obs, n_genes, n_feat)
    ig.model.UMPIRE.setup_anndata(adata, layer="counts", image_key="X_he_synthetic")
    devices = ["cpu"]
    if torch.cuda.is_available() and not args.no_gpu:
        devices.append("cuda")
    else:
        print("GPU variant skipped: " + ("--no-gpu" if args.no_gpu else "torch.cuda.is_available() is False"))

    class EpochTimer(Callback):
        def __init__(self):
            self.epochs: list[tuple[float, int]] = []

        def on_train_epoch_start(self, trainer, pl_module):
            C.sync(str(pl_module.device))
            self._t, self._step = time.perf_counter(), trainer.global_step

        def on_train_epoch_end(self, trainer, pl_module):
            C.sync(str(pl_module.device))
            self.epochs.append((time.perf_counter() - self._t, trainer.global_step - self._step))

    steps_per_epoch = n_obs // batch_size
    counts_csr = adata.layers["counts"]
    rows, cases = [], {}
    for dev in devices:
        ig.settings.seed = 0
        model = ig.model.UMPIRE(adata)
        bare_module = copy.deepcopy(model.module).to(dev)
        x_dense = torch.as_tensor(counts_csr.toarray(), device=dev)
        f_dense = torch.as_tensor(adata.obsm["X_he_synthetic"], device=dev)
        opt = torch.optim.AdamW([p for p in bare_module.parameters() if p.requires_grad], lr=lr, eps=0.01,
                                weight_decay=wd)
        epoch_log: dict[str, list[tuple[float, int]]] = {"imagene": [], "bare": [], "bare_csr": []}

        def imagene_side(dev=dev, model=model, epochs=epochs):
            timer = EpochTimer()
            model.train(max_epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=wd, train_size=1.0,
                        early_stopping=False, restore_best_weights=False, accelerator="gpu" if dev == "cuda" else "cpu",
                        devices=1, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        limit_val_batches=0, num_sanity_val_steps=0)
            epoch_log["imagene"].extend(timer.epochs[1:])  # epoch 1 is warm-up

        def bare_loop(get_batch, key, dev=dev, module=bare_module, opt=opt, epochs=epochs):
            module.train()
            gen = torch.Generator().manual_seed(0)
            for e in range(epochs):
                C.sync(dev)
                t = time.perf_counter()
                perm = torch.randperm(n_obs, generator=gen)
                for b in range(steps_per_epoch):
                    idx = perm[b * batch_size : (b + 1) * batch_size]
                    _, _, out = module(get_batch(idx))
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                C.sync(dev)
                if e:
                    epoch_log[key].append((time.perf_counter() - t, steps_per_epoch))

        def dense_batch(idx, x=x_dense, f=f_dense, dev=dev):
            idx = idx.to(dev)
            return {REGISTRY_KEYS.X_KEY: x[idx], REGISTRY_KEYS.IMAGE_KEY: f[idx]}

        def csr_batch(idx, dev=dev):
            i = np.sort(idx.numpy())  # scvi-tools' loader also reads sorted rows
            return {REGISTRY_KEYS.X_KEY: torch.as_tensor(counts_csr[i].toarray()).to(dev),
                    REGISTRY_KEYS.IMAGE_KEY: torch.as_tensor(adata.obsm["X_he_synthetic"][i]).to(dev)}

        fns = {
            "imagene": imagene_side,
            "bare": lambda: bare_loop(dense_batch, "bare"),
            "bare_csr": lambda: bare_loop(csr_batch, "bare_csr"),
        }
        # warm-up: one 1-epoch run of each side (the first epoch of every run is not counted anyway)
        imagene_side(epochs=1)
        bare_loop(dense_batch, "bare", epochs=1)
        bare_loop(csr_batch, "bare_csr", epochs=1)
        for k in epoch_log:
            epoch_log[k] = []
        walls = C.side_by_side(fns, repeats=repeats, warmup=0, device=dev)
        n_steps = epochs * steps_per_epoch
        # per-epoch rates: the median is robust to another job taking the cores for a while, the best
        # epoch is the least disturbed figure of each side
        sps = {k: float(np.median([s / t for t, s in v])) for k, v in epoch_log.items()}
        best = {k: max(s / t for t, s in v) for k, v in epoch_log.items()}
        case = {
            "device": dev, "n_obs": n_obs, "n_genes": n_genes, "n_image_features": n_feat, "batch_size": batch_size,
            "epochs_per_run": epochs, "steps_per_epoch": steps_per_epoch, "torch_threads": torch.get_num_threads(),
            "steps_per_s": {k: round(v, 2) for k, v in sps.items()},
            "steps_per_s_best_epoch": {k: round(v, 2) for k, v in best.items()},
            "ratio": round(sps["imagene"] / sps["bare"], 3),
            "ratio_vs_bare_csr": round(sps["imagene"] / sps["bare_csr"], 3),
            "ratio_best_epoch": round(best["imagene"] / best["bare"], 3),
            "train_call_wall_s": C.summarise(walls["imagene"], n_steps),
            "bare_wall_s": C.summarise(walls["bare"], n_steps),
            "wall_ratio": C.ratio(float(np.median(walls["imagene"])), float(np.median(walls["bare"]))),
        }
        cases[dev] = case
        rows.append({"device": dev, "imagene steps/s": case["steps_per_s"]["imagene"],
                     "bare steps/s": case["steps_per_s"]["bare"], "bare_csr steps/s": case["steps_per_s"]["bare_csr"],
                     "ratio": case["ratio"], "ratio vs csr": case["ratio_vs_bare_csr"],
                     "ratio best epoch": case["ratio_best_epoch"],
                     "train() wall s": case["train_call_wall_s"]["median_s"],
                     "bare wall s": case["bare_wall_s"]["median_s"]})
    print(C.table(rows, list(rows[0])))
    C.write("train", {"benchmark": "UMPIRE.train steps/s vs bare torch loop", "machine": info, "cases": cases,
                      "table": rows}, args.out)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
