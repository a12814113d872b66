"""Peak RSS of the H&E-only path on a large pyramidal slide against one with 10x fewer pixels.

The path a user runs on a slide never sequenced: ``io.read_slide`` (OpenSlide) →
``pp.spot_grid`` (tissue mask on a coarse level, hex spots at a 400 µm pitch) →
``pp.extract_tiles`` (112 µm tiles at 32 px, read region by region from the file) →
``pp.embed_tiles`` (``'tiny'`` encoder). The slides are JPEG-compressed, tiled, pyramidal TIFFs
(levels /1, /4, /16, /64 as separate pages, as scanners write them) of real H&E (her2st B4
repeated), 40960 x 40960 px (1.7 gigapixel, 5 GB as raw RGB) and 12952 x 12952 px (10x fewer
pixels), written once to ``$IMAGENE_BENCH_TMP`` (default ``/tmp/imagene_bench``). Each size runs in
a fresh process, which reports its RSS after imports (baseline) and its peak RSS (``ru_maxrss``)
after each stage.

Target: flat memory, peak(40960²) / peak(12952²) <= 1.2 (the spot count grows 10x with the
tissue; the pixels are never held whole).
Run: ``python benchmarks/bench_slide_memory.py`` (~5 min on 2 cores, most of it writing the slides once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

SIDES = (12952, 40960)
MPP = 0.7325  # her2st B4's µm per pixel: the slides repeat B4's pixels


def pyramid_tiff(side: int, tile: int = 512) -> Path:
    """A ``side``² JPEG-compressed tiled pyramidal TIFF of real H&E with resolution tags (written once)."""
    import numpy as np
    import tifffile
    from PIL import Image

    C.SCRATCH.mkdir(parents=True, exist_ok=True)
    path = C.SCRATCH / f"he_pyramid_{side}.tif"
    if path.exists():
        return path
    Image.MAX_IMAGE_PIXELS = None
    src = np.asarray(Image.open(C.B4_FILES[2]).convert("RGB"))
    h, w = src.shape[:2]

    def tiles(step: int, n: int):
        for y in range(0, n, tile):
            rows = (np.arange(y, y + tile) * step) % h
            for x in range(0, n, tile):
                cols = (np.arange(x, x + tile) * step) % w
                yield src[rows][:, cols]

    opts = {"tile": (tile, tile), "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 90},
            "resolution": (1e4 / MPP, 1e4 / MPP), "resolutionunit": "CENTIMETER", "dtype": np.uint8}
    tmp = path.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, step in enumerate((1, 4, 16, 64)):
            n = side // step
            if n < tile:
                break
            tw.write(tiles(step, n), shape=(n, n, 3), subfiletype=0 if k == 0 else 1, **opts)
    tmp.replace(path)
    return path


def child(side: int) -> dict:
    import resource

    import psutil

    C.quiet()
    import torch  # noqa: F401 - part of the baseline, imported by embed_tiles anyway

    import imagene as ig

    path = pyramid_tiff(side)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss

    def peak() -> float:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    out = {"side_px": side, "gigapixels": round(side * side / 1e9, 3), "baseline_rss_mb": round(rss0 / 2**20, 1)}
    t = time.perf_counter()
    slide = ig.io.read_slide(path)
    grid = ig.pp.spot_grid(slide, pitch_um=400, spot_diameter_um=100)
    out.update(n_spots=int(grid.n_obs), grid_s=round(time.perf_counter() - t, 1), peak_after_grid_mb=peak())
    t = time.perf_counter()
    ig.pp.extract_tiles(grid, tile_size_um=112, tile_px=32, show_progress_bar=False)
    out.update(tiles_s=round(time.perf_counter() - t, 1), peak_after_tiles_mb=peak())
    t = time.perf_counter()
    ig.pp.embed_tiles(grid, encoder="tiny", device="cpu", show_progress_bar=False)
    out.update(embed_s=round(time.perf_counter() - t, 1), peak_rss_mb=peak())
    out["peak_minus_baseline_mb"] = round(out["peak_rss_mb"] - out["baseline_rss_mb"], 1)
    out["raw_rgb_gb"] = round(side * side * 3 / 2**30, 2)
    return out


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--sides", type=int, nargs="*", default=list(SIDES))
    p.add_argument("--child", type=int, default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return
    info = C.start(args)
    rows = []
    for side in args.sides:
        pyramid_tiff(side)  # written before the measured process starts
        env = {**os.environ, "PYTHONPATH": str(C.ROOT / "src")}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        proc = subprocess.run([sys.executable, __file__, "--child", str(side)], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ratio = round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)
    ratio_net = round(rows[-1]["peak_minus_baseline_mb"] / max(rows[0]["peak_minus_baseline_mb"], 1e-9), 3)
    print(f"peak RSS {rows[-1]['side_px']}² / {rows[0]['side_px']}²: {ratio} (above baseline: {ratio_net})")
    C.write("slide_memory", {"benchmark": "peak RSS of read_slide -> spot_grid -> extract_tiles -> embed_tiles",
                             "machine": info, "sizes": rows, "ratio_peak_rss": ratio,
                             "ratio_peak_above_baseline": ratio_net}, args.out)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
