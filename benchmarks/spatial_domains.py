"""Spatial domains of her2st A1: smoothed baselines, smoothed imagene embeddings and Novae, 3 seeds.

Every method is fitted on A1's own spots without the labels and clustered by the harness
(``imagene.bench.run(task="clustering")``: leiden and k-means with as many clusters as classes).
Groups (``--groups``): ``baselines`` (expression PCA, unscaled and scaled, and the image features,
each raw and averaged once / twice over every spot and its 6 nearest spots), ``models`` (UMPIRE's
joint latent and STAlign's fused embedding, averaged once and twice the same way) and ``novae``.


Novae (Blampey et al., *Nat Methods* 2025) is the spatial-domain model a squidpy user would pick
today. Its pretrained weights come from a model hub, which this machine cannot reach, so it is
trained from scratch on A1's own spots (without the labels), with its default architecture and
``fit`` settings, and plugs into the harness as an :class:`imagene.bench.Method`: the same
clustering task, the same leiden / k-means on its latent (``obsm['novae_latent']``), the same
seeds as every other method. Novae's own ``assign_domains`` (hierarchical clustering of its
prototypes) is scored as a second row.

``novae`` is not a dependency of imagene; it installs into the same environment::

    pip install -c requirements/constraints.txt novae
    OMP_NUM_THREADS=2 python benchmarks/spatial_domains.py --groups novae [--seeds 0 1 2] [--epochs 20]
    OMP_NUM_THREADS=2 python benchmarks/spatial_domains.py --groups baselines models

Writes ``benchmarks/results/spatial_domains_<groups>/`` (``results.md``, ``clustering.csv``, ...).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from _common import DATA, RESULTS

import imagene.bench as bench
from imagene.bench import FoldContext, Method


class Novae(Method):
    """Novae trained from scratch on the given spots; embeds them as its latent representation."""

    name = "novae"
    tasks = ("clustering",)
    clustering_modalities = ("gene",)

    def __init__(self, max_epochs: int = 20, own_domains: bool = False) -> None:
        self.max_epochs = max_epochs
        self.own_domains = own_domains
        if own_domains:
            self.name = "novae[assign_domains]"

    def _prepared(self, adata):
        import scanpy as sc

        a = adata[:, self.ctx_.genes].copy()
        a.X = a.layers[self.ctx_.layer].copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        return a

    def fit(self, train, *, ctx: FoldContext) -> None:
        import novae

        self.ctx_ = ctx
        a = self._prepared(train)
        novae.spatial_neighbors(a, n_neighs=6, delaunay=False, coord_type="generic", verbose=False)
        self.model_ = novae.Novae(a)
        self.model_.fit(a, max_epochs=self.max_epochs, accelerator="cpu", num_workers=0, enable_progress_bar=False)

    def embed(self, adata, modality: str = "gene") -> np.ndarray:
        import novae

        a = self._prepared(adata)
        novae.spatial_neighbors(a, n_neighs=6, delaunay=False, coord_type="generic", verbose=False)
        self.model_.compute_representations(a, accelerator="cpu", num_workers=0)
        if not self.own_domains:
            return np.asarray(a.obsm["novae_latent"])
        self.model_.assign_domains(a, n_domains=self.ctx_.n_clusters, key_added="domains")
        # one-hot domains: leiden and k-means on them give back Novae's own partition
        codes = a.obs["domains"].astype("category").cat.codes.to_numpy()
        return np.eye(codes.max() + 1)[codes] + 1e-3 * np.random.default_rng(0).normal(size=(len(codes), codes.max() + 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20, help="Novae's max_epochs (its default)")
    p.add_argument("--model-epochs", type=int, default=100, help="UMPIRE / STAlign max_epochs (the harness default)")
    p.add_argument("--cache", default="/tmp/novae_cache")
    p.add_argument("--groups", nargs="+", choices=["baselines", "models", "novae"], default=["novae"])
    args = p.parse_args(argv)
    a1 = bench.read_sections(DATA / "her2st", ["A1"], encoder="efficientnet_lite0", cache=args.cache)
    methods = []
    if "baselines" in args.groups:
        for r in (0, 1, 2):
            methods += [bench.ExpressionPCA(smooth=r), bench.ExpressionPCA(scale=True, smooth=r), bench.ImageFeatures(smooth=r)]
    if "models" in args.groups:
        import imagene as ig

        for r in (1, 2):
            methods += [
                bench.ImageneModel(name=f"umpire_smooth{r}", clustering_modalities=("joint",), smooth=r),
                # STAlign at the 20 epochs of benchmarks/stalign_ablation.py, whose unsmoothed rows are in docs
                bench.ImageneModel(ig.model.STAlign, name=f"stalign_smooth{r}", clustering_modalities=("fused",),
                                   smooth=r, train_kwargs={"max_epochs": 20}),
            ]
    if "novae" in args.groups:
        methods += [bench.ExpressionPCA(), Novae(args.epochs), Novae(args.epochs, own_domains=True)]
    df = bench.run(a1, task="clustering", methods=methods, seeds=args.seeds, label_key="label",
                   ignore_labels=("undetermined",), max_epochs=args.model_epochs)
    cmd = "OMP_NUM_THREADS=2 python benchmarks/spatial_domains.py " + " ".join(argv or sys.argv[1:])
    out = RESULTS / ("spatial_domains_" + "_".join(args.groups))
    bench.write_results({"clustering": df}, out, config={"command": cmd, "sections": ["A1"], "seeds": args.seeds})
    print(bench.summarize(df, "clustering").to_string())
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
