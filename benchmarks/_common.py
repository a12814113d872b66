"""Helpers shared by the benchmark scripts: machine info, side-by-side timing, tables, JSON output.

Every benchmark measures the imagene path and a bare baseline doing the same work in the same
process, interleaved (A, B, A, B, ...) after a warm-up of each, and reports the speed ratio
``imagene throughput / bare throughput`` (= bare time / imagene time; 1.0 is parity).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DATA = Path(os.environ.get("IMAGENE_DATA", ROOT.parent / "shared" / "data"))
if not DATA.exists():  # the checkout used for development keeps the data beside /work/main
    DATA = Path("/work/shared/data")

if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))


def parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions of each side (after one warm-up)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for checking that the script runs")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU variant even when a GPU is present")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON results")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both sides (default: torch's default, one per core)")
    return p


def start(args: argparse.Namespace) -> dict[str, Any]:
    """Quiet the logs, apply ``--threads`` and return the machine info of this run."""
    quiet()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return machine_info()


def quiet() -> None:
    """Silence imagene's INFO logs and progress bars and the usual third-party chatter."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import imagene as ig

    ig.settings.verbosity = "warning"
    ig.settings.progress_bar = False
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi", "pytorch_lightning", "squidpy"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine_info() -> dict[str, Any]:
    """CPU count, torch threads and device, library versions and the load at the start of the run."""
    import torch

    import imagene

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "imagene": imagene.__version__,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["memory_gb"] = round(mem / 1024**3, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock times are real."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def side_by_side(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, device: str = "cpu"
) -> dict[str, list[float]]:
    """Warm each function up, then time them interleaved ``repeats`` times; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def summarise(times: list[float], n_items: int) -> dict[str, float]:
    """Median / min seconds and items per second at the median."""
    med = statistics.median(times)
    return {
        "median_s": round(med, 4),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
        "items_per_s": round(n_items / med, 2),
        "repeats": len(times),
    }


def ratio(imagene_s: float, bare_s: float) -> float:
    """Speed ratio imagene / bare (bare time over imagene time)."""
    return round(bare_s / imagene_s, 3)


def compare(times: dict[str, list[float]], n_items: int) -> dict[str, Any]:
    """Summaries of the ``'imagene'`` and ``'bare'`` sides and their speed ratios.

    ``ratio`` compares medians; ``ratio_best`` compares the fastest repeat of each side, which is
    the more stable figure on a machine shared with other jobs.
    """
    ig_s, bare_s = summarise(times["imagene"], n_items), summarise(times["bare"], n_items)
    return {
        "imagene": ig_s,
        "bare": bare_s,
        "ratio": ratio(ig_s["median_s"], bare_s["median_s"]),
        "ratio_best": ratio(ig_s["min_s"], bare_s["min_s"]),
    }


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A small fixed-width text table of ``rows`` (markdown-compatible)."""
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, width)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in width) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def frame_table(df, *, index: bool = True, digits: int = 3) -> str:
    """:func:`table` of a pandas DataFrame (numbers rounded), without pandas' optional ``tabulate``."""
    df = df.round(digits).reset_index() if index else df.round(digits)
    return table(df.astype(str).to_dict(orient="records"), [str(c) for c in df.columns])


def summary_table(summary, metrics: list[str] | None = None, digits: int = 3) -> str:
    """Methods × metrics table of ``mean ± std`` from :func:`imagene.bench.summarize` output."""
    df = summary if metrics is None else summary[summary["metric"].isin(metrics)]
    cell = df.apply(
        lambda r: f"{r['mean']:.{digits}f}" + ("" if r["std"] != r["std"] else f" ± {r['std']:.{digits}f}"), axis=1
    )
    wide = df.assign(cell=cell).pivot(index="method", columns="metric", values="cell")
    wide = wide[[m for m in (metrics or list(dict.fromkeys(df["metric"]))) if m in wide.columns]]
    order = list(dict.fromkeys(df["method"]))
    return table(wide.loc[order].reset_index().to_dict(orient="records"), ["method", *map(str, wide.columns)])


def write(name: str, payload: dict[str, Any], out: Path = RESULTS) -> Path:
    """Write ``payload`` to ``<out>/<name>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return path


B4 = DATA / "her2st" / "B4"
B4_FILES = (B4 / "B4.tsv.gz", B4 / "B4_selection.tsv", B4 / "BT10737_D2_HE.jpg")
SCRATCH = Path(os.environ.get("IMAGENE_BENCH_TMP", "/tmp/imagene_bench"))


def large_tiff(side: int = 20480, tile: int = 512) -> Path:
    """A ``side`` x ``side`` RGB JPEG-compressed tiled TIFF of real H&E (her2st B4 repeated), written once.

    Whole-slide images are tiled, JPEG-compressed TIFFs; this one is read lazily by both sides
    of a benchmark. It is cached in ``$IMAGENE_BENCH_TMP`` (default ``/tmp/imagene_bench``).
    """
    import numpy as np
    import tifffile
    from PIL import Image

    SCRATCH.mkdir(parents=True, exist_ok=True)
    path = SCRATCH / f"he_{side}_t{tile}.tif"
    if path.exists():
        try:
            with tifffile.TiffFile(path) as tf:
                if tf.pages[0].shape[:2] == (side, side):
                    return path
        except Exception:  # noqa: BLE001 - a half-written file: write it again
            pass
    Image.MAX_IMAGE_PIXELS = None
    src = np.asarray(Image.open(B4_FILES[2]).convert("RGB"))
    h, w = src.shape[:2]

    def tiles():
        for y in range(0, side, tile):
            rows = np.arange(y, y + tile) % h
            for x in range(0, side, tile):
                cols = np.arange(x, x + tile) % w
                yield src[rows][:, cols]

    tmp = path.with_suffix(".tmp.tif")
    tifffile.imwrite(
        tmp, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
        compression="jpeg", compressionargs={"level": 90},
    )
    tmp.replace(path)
    return path


def grid_spots(n: int, side: int, margin: int = 200):
    """``n`` spot centres (x, y) on a regular grid covering a ``side`` x ``side`` image, row by row."""
    import numpy as np

    k = int(np.ceil(np.sqrt(n)))
    ax = np.linspace(margin, side - margin, k)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx.ravel(), yy.ravel()], axis=1)[:n].astype(np.float64)


def lazy_adata(xy, path: Path, microns_per_pixel: float, library_id: str = "slide"):
    """An AnnData of spots at ``xy`` whose section image is the lazily read file ``path`` (no counts needed)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    n = len(xy)
    adata = ad.AnnData(
        X=sp.csr_matrix((n, 1), dtype=np.float32),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
    )
    adata.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    adata.uns["spatial"] = {
        library_id: {
            "images": {},
            "scalefactors": {"tissue_hires_scalef": 1.0, "microns_per_pixel": float(microns_per_pixel)},
            "metadata": {"platform": "synthetic", "source_image_path": str(path), "source_image_scale": 1.0},
        }
    }
    return adata
