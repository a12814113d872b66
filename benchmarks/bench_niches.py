"""Time to build niche graphs with ``imagene.pp.niches`` vs a bare scipy cKDTree k-NN + CSR build.

Synthetic cells: 100k and 1M, split into 4 sections, uniform random positions in a
20000 x 20000 px square per section, 50 genes of sparse counts (~10 % non-zero). Two modes:

- ``graph``: ``niches(niche_expression=False)``: squidpy's k-NN graph per section (n_neighs=6),
  connectivities + distances in ``obsp``. Bare: per section ``cKDTree(xy).query(xy, k=7)``, drop
  each cell itself, one CSR of connectivities and one of distances over all cells.
- ``graph+expression``: ``niches(niche_expression=True)``: also the niche-mean counts
  (row-normalised (A + I) @ counts, sparse). Bare: the same CSR build, then the (A + I) / 7
  operator from the same query (self included) @ the CSR counts.

Both sides must give the same neighbour sets (checked). Interleaved, after a warm-up.
Run: ``python benchmarks/bench_niches.py``.
"""

from __future__ import annotations

import time

import numpy as np

import _common as C

K = 6


def synthetic(n: int, n_sections: int = 4, n_genes: int = 50, seed: int = 0):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 20000, size=(n, 2))
    section = np.repeat([f"S{i}" for i in range(n_sections)], -(-n // n_sections))[:n]
    nnz = int(0.1 * n * n_genes)
    counts = sp.csr_matrix(
        (rng.integers(1, 20, nnz).astype(np.float32), (rng.integers(0, n, nnz), rng.integers(0, n_genes, nnz))),
        shape=(n, n_genes),
    )
    counts.sum_duplicates()
    adata = ad.AnnData(X=counts, obs=pd.DataFrame({"section": pd.Categorical(section)},
                                                  index=pd.RangeIndex(n).astype(str)))
    adata.layers["counts"] = counts
    adata.obsm["spatial"] = xy
    return adata


def bare(xy: np.ndarray, section: np.ndarray, counts=None):
    """k-NN per section with cKDTree; connectivities, distances and (optionally) niche-mean counts."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    n = len(xy)
    rows, cols, dists = [], [], []
    for s in np.unique(section):
        idx = np.flatnonzero(section == s)
        d, nb = cKDTree(xy[idx]).query(xy[idx], k=K + 1)
        rows.append(idx)
        cols.append(idx[nb])
        dists.append(d)
    rows, cols, dists = np.concatenate(rows), np.concatenate(cols), np.concatenate(dists)
    order = np.argsort(rows)
    cols, dists = cols[order], dists[order]  # (n, K + 1), column 0 is the cell itself
    indptr = np.arange(0, n * K + 1, K)
    conn = sp.csr_matrix((np.ones(n * K, np.float32), cols[:, 1:].ravel(), indptr), shape=(n, n))
    dist = sp.csr_matrix((dists[:, 1:].ravel(), cols[:, 1:].ravel(), indptr), shape=(n, n))
    out = {"conn": conn, "dist": dist}
    if counts is not None:
        op = sp.csr_matrix((np.full(n * (K + 1), 1.0 / (K + 1), np.float32), cols.ravel(),
                            np.arange(0, n * (K + 1) + 1, K + 1)), shape=(n, n))
        out["mean"] = op @ counts
    return out


def same_neighbours(a, b) -> bool:
    a, b = a.tocsr(), b.tocsr()
    a.sort_indices()
    b.sort_indices()
    return bool(np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices))


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    info = C.start(args)
    import imagene as ig

    sizes = [20_000, 100_000] if args.quick else [100_000, 1_000_000]
    rows, cases = [], {}
    for n in sizes:
        adata = synthetic(n)
        xy, section, counts = adata.obsm["spatial"], adata.obs["section"].to_numpy(), adata.layers["counts"]
        repeats = args.repeats or (3 if n <= 100_000 else 2)
        for mode, expr in (("graph", False), ("graph+expression", True)):
            def ig_side(expr=expr, adata=adata):
                ig.pp.niches(adata, n_neighs=K, library_key="section", niche_expression=expr)

            def bare_side(expr=expr):
                return bare(xy, section, counts if expr else None)

            ig_side()  # the checks double as the warm-up
            ref = bare_side()
            same = same_neighbours(adata.obsp["imagene_niche_connectivities"], ref["conn"])
            if expr:
                diff = abs(adata.layers["imagene_niche_mean"] - ref["mean"]).max()
                same = same and float(diff) < 1e-4
            del ref
            times = C.side_by_side({"imagene": ig_side, "bare": bare_side}, repeats=repeats, warmup=0)
            c = {"n_cells": n, "n_sections": 4, "n_neighs": K, "mode": mode, **C.compare(times, n), "identical": same}
            cases[f"{n}/{mode}"] = c
            rows.append({"cells": f"{n:,}", "mode": mode, "imagene s": c["imagene"]["median_s"],
                         "bare s": c["bare"]["median_s"], "ratio": c["ratio"], "ratio best": c["ratio_best"],
                         "identical": same})
            print(C.table(rows[-1:], list(rows[-1])), flush=True)
        del adata
    print()
    print(C.table(rows, list(rows[0])))
    C.write("niches", {"benchmark": "pp.niches vs bare cKDTree k-NN + CSR", "machine": info, "cases": cases,
                       "table": rows}, args.out)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
