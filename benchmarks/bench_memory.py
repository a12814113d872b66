"""Peak RSS of tiling + embedding at 10k / 50k / 200k synthetic spots on a large lazily read image.

Each size runs in a fresh Python process (so peaks do not carry over): the spots lie on a
regular grid over a 20480 x 20480 JPEG-tiled TIFF of real H&E (read lazily through tifffile →
zarr → dask), ``imagene.pp.extract_tiles(store=<zarr>)`` streams 32 µm tiles at 32 px to a zarr
store (so ``obsm`` holds a lazy view, not the pixels), then ``imagene.pp.embed_tiles`` with the
``'tiny'`` encoder reads them back batch by batch. The child reports ``ru_maxrss`` (peak resident
set of the process) after each stage, its RSS after imports and set-up (baseline: Python, torch,
imagene and the AnnData of spots), and the time of each stage. A second fresh process runs the
bare reference of the embedding stage on the same store (zarr batch reads, the same encoder,
features written into a preallocated array) and reports its peak.

Target: flat memory, peak(200k) / peak(10k) <= 1.2. For scale, keeping the 200k tiles in memory
instead would take 200,000 x 32 x 32 x 3 B = 614 MB.
Run: ``python benchmarks/bench_memory.py`` (10k and 50k spots, ~7 min on 2 busy cores);
``python benchmarks/bench_memory.py --sizes 10000 50000 200000`` adds 200k (~15 min more).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import _common as C

TILE_UM, TILE_PX, SIDE = 32.0, 32, 20480


def child(n: int, side: int, store: str) -> dict:
    """Run tiling + embedding of ``n`` spots in this process; return timings and memory."""
    import resource

    import psutil

    C.quiet()
    import torch  # noqa: F401 - imported by embed_tiles anyway: part of the baseline, not of the work

    import imagene as ig

    path = C.large_tiff(side)
    mpp = 0.7325  # her2st B4's µm per pixel: the TIFF repeats B4's pixels
    adata = C.lazy_adata(C.grid_spots(n, side, margin=64), path, mpp)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    ig.pp.extract_tiles(adata, tile_size_um=TILE_UM, tile_px=TILE_PX, store=store, show_progress_bar=False)
    t_tiles = time.perf_counter() - t
    rss_tiles = proc.memory_info().rss
    peak_tiles = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    ig.pp.embed_tiles(adata, encoder="tiny", batch_size=256, device="cpu", show_progress_bar=False)
    t_embed = time.perf_counter() - t
    feats = adata.obsm["X_he_tiny"]
    if feats.shape != (n, 32) or not (feats == feats).all():
        raise RuntimeError(f"unexpected features {feats.shape}")
    return {
        "n_spots": n,
        "baseline_rss_mb": round(rss0 / 2**20, 1),
        "peak_rss_after_tiles_mb": round(peak_tiles / 2**20, 1),
        "rss_after_tiles_mb": round(rss_tiles / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_minus_baseline_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0 / 2**20, 1),
        "tiles_s": round(t_tiles, 2),
        "tiles_per_s": round(n / t_tiles, 1),
        "embed_s": round(t_embed, 2),
        "embed_tiles_per_s": round(n / t_embed, 1),
        "store_mb": round(sum(f.stat().st_size for f in C.Path(store).rglob("*") if f.is_file()) / 2**20, 1),
    }


def child_bare(n: int, store: str) -> dict:
    """Bare reference for the embedding stage: read the same zarr store batch by batch, run the same
    'tiny' encoder, write the features into a preallocated array; peak RSS over the same baseline."""
    import resource

    import numpy as np
    import psutil
    import torch
    import zarr

    C.quiet()
    import imagene as ig

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    z = zarr.open_array(store, mode="r")
    enc = ig.nn.get_image_encoder("tiny").eval()
    feats = np.empty((z.shape[0], enc.n_features), np.float32)
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, z.shape[0], 256):
            x = torch.from_numpy(np.ascontiguousarray(z[s : s + 256]))
            feats[s : s + len(x)] = enc(x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()).numpy()
    t_embed = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n_spots": n, "bare_embed_baseline_rss_mb": round(rss0 / 2**20, 1),
            "bare_embed_peak_rss_mb": round(peak, 1),
            "bare_embed_peak_minus_baseline_mb": round(peak - rss0 / 2**20, 1), "bare_embed_s": round(t_embed, 2)}


def run_child(flag: str, n: int, side: int, threads: int | None) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, flag, str(n), "--side", str(side)]
        + (["--threads", str(threads)] if threads else []),
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"{flag} for {n} spots failed (exit {proc.returncode})")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--child", type=int, default=None, help=argparse_hidden())
    p.add_argument("--child-bare", type=int, default=None, help=argparse_hidden())
    p.add_argument("--side", type=int, default=None)
    args = p.parse_args()
    side = args.side or (4096 if args.quick else SIDE)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child is not None:  # tiles to the store, embed; the store is kept for --child-bare
        print("RESULT " + json.dumps(child(args.child, side, store_path(args.child))), flush=True)
        return
    if args.child_bare is not None:
        print("RESULT " + json.dumps(child_bare(args.child_bare, store_path(args.child_bare))), flush=True)
        return

    info = C.start(args)
    # 200k spots take ~15 min on 2 busy cores (tiling ~250 tiles/s): pass --sizes 10000 50000 200000
    sizes = args.sizes or ([2000, 5000, 20000] if args.quick else [10_000, 50_000])
    C.large_tiff(side)  # written once, outside the measured processes
    results = []
    for n in sizes:
        t = time.perf_counter()
        try:
            res = run_child("--child", n, side, args.threads)
            res.update(run_child("--child-bare", n, side, args.threads))
        finally:
            shutil.rmtree(store_path(n), ignore_errors=True)
        res["wall_s"] = round(time.perf_counter() - t, 1)
        res["embed_stage_growth_mb"] = round(res["peak_rss_mb"] - res["peak_rss_after_tiles_mb"], 1)
        results.append(res)
        print(C.table([res], COLS), flush=True)
    ratio = round(results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"], 3)
    ratio_tiles = round(results[-1]["peak_rss_after_tiles_mb"] / results[0]["peak_rss_after_tiles_mb"], 3)
    ratio_bare = round(results[-1]["bare_embed_peak_rss_mb"] / results[0]["bare_embed_peak_rss_mb"], 3)
    ratio_net = round(results[-1]["peak_minus_baseline_mb"] / results[0]["peak_minus_baseline_mb"], 3)
    print()
    print(C.table(results, COLS))
    print(f"peak RSS {results[-1]['n_spots']:,} / {results[0]['n_spots']:,} spots: {ratio} "
          f"(above baseline: {ratio_net}; tiling stage only: {ratio_tiles}; bare embedding: {ratio_bare}); "
          "target <= 1.2")
    C.write("memory", {"benchmark": "peak RSS of extract_tiles(store=zarr) + embed_tiles('tiny')",
                       "image": f"{side}x{side} JPEG-tiled TIFF (lazy)", "tile_size_um": TILE_UM, "tile_px": TILE_PX,
                       "machine": info, "sizes": results, "ratio_peak_rss": ratio,
                       "ratio_peak_above_baseline": ratio_net, "ratio_peak_rss_tiling_stage": ratio_tiles,
                       "ratio_bare_embed_peak_rss": ratio_bare}, args.out)


COLS = ["n_spots", "baseline_rss_mb", "peak_rss_after_tiles_mb", "peak_rss_mb", "peak_minus_baseline_mb",
        "embed_stage_growth_mb", "bare_embed_peak_minus_baseline_mb", "tiles_per_s", "embed_tiles_per_s", "wall_s"]


def store_path(n: int) -> str:
    return str(C.SCRATCH / f"tiles_{n}.zarr")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
