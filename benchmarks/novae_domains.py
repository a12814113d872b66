"""Spatial domains of her2st A1: Novae (trained from scratch) beside expression PCA and its smoothed versions.

Novae (Blampey et al., *Nat Methods* 2025) is the spatial-domain model a squidpy user would pick
today. Its pretrained weights come from a model hub, which this machine cannot reach, so it is
trained from scratch on A1's own spots (without the labels), with its default architecture and
``fit`` settings, and plugs into the harness as an :class:`imagene.bench.Method`: the same
clustering task, the same leiden / k-means on its latent (``obsm['novae_latent']``), the same
seeds as every other method. Novae's own ``assign_domains`` (hierarchical clustering of its
prototypes) is scored as a second row.

``novae`` is not a dependency of imagene; it installs into the same environment::

    pip install -c requirements/constraints.txt novae
    OMP_NUM_THREADS=2 python benchmarks/novae_domains.py [--seeds 0 1 2] [--epochs 20]

Writes ``benchmarks/results/novae_domains/`` (``results.md``, ``clustering.csv``, ...).
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
    p.add_argument("--cache", default="/tmp/novae_cache")
    args = p.parse_args(argv)
    a1 = bench.read_sections(DATA / "her2st", ["A1"], encoder="efficientnet_lite0", cache=args.cache)
    methods = [
        bench.ExpressionPCA(), bench.ExpressionPCA(smooth=1), bench.ExpressionPCA(smooth=2),
        Novae(args.epochs), Novae(args.epochs, own_domains=True),
    ]
    df = bench.run(a1, task="clustering", methods=methods, seeds=args.seeds, label_key="label",
                   ignore_labels=("undetermined",), max_epochs=args.epochs)
    cmd = "OMP_NUM_THREADS=2 python benchmarks/novae_domains.py " + " ".join(argv or sys.argv[1:])
    out = RESULTS / "novae_domains"
    bench.write_results({"clustering": df}, out, config={"command": cmd, "sections": ["A1"], "seeds": args.seeds})
    print(bench.summarize(df, "clustering").to_string())
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
