"""Run every benchmark one after the other and print the headline ratios.

Each script runs in its own process and writes ``benchmarks/results/<name>.json``; this script
then reads those files and prints one summary table (also written to ``results/summary.json``).
``--quick``, ``--no-gpu`` and ``--threads`` are passed to every script.
Run: ``python benchmarks/run_all.py`` (about 20 minutes on 2 CPU cores; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common as C

SCRIPTS = ("tiles", "embed", "train", "niches", "memory")


def headline(name: str, res: dict) -> list[dict]:
    """One row per measured case: what, imagene figure, bare figure, ratio."""
    rows = []
    if name == "tiles":
        for case, c in res["cases"].items():
            rows.append({"benchmark": "tiles", "case": case, "imagene": f"{c['imagene']['items_per_s']} tiles/s",
                         "bare": f"{c['bare']['items_per_s']} tiles/s", "ratio": c["ratio"],
                         "ratio best": c["ratio_best"]})
    elif name == "embed":
        for case, c in res["cases"].items():
            rows.append({"benchmark": "embed", "case": case, "imagene": f"{c['imagene']['items_per_s']} tiles/s",
                         "bare": f"{c['bare']['items_per_s']} tiles/s", "ratio": c["ratio"],
                         "ratio best": c["ratio_best"]})
    elif name == "train":
        for case, c in res["cases"].items():
            rows.append({"benchmark": "train", "case": case, "imagene": f"{c['steps_per_s']['imagene']} steps/s",
                         "bare": f"{c['steps_per_s']['bare']} steps/s", "ratio": c["ratio"],
                         "ratio best": c["ratio_best_epoch"]})
    elif name == "niches":
        for case, c in res["cases"].items():
            rows.append({"benchmark": "niches", "case": case, "imagene": f"{c['imagene']['median_s']} s",
                         "bare": f"{c['bare']['median_s']} s", "ratio": c["ratio"], "ratio best": c["ratio_best"]})
    elif name == "memory":
        first, last = res["sizes"][0], res["sizes"][-1]
        rows.append({"benchmark": "memory", "case": f"peak RSS {last['n_spots']:,} / {first['n_spots']:,} spots",
                     "imagene": f"{last['peak_rss_mb']} MB vs {first['peak_rss_mb']} MB", "bare": "",
                     "ratio": res["ratio_peak_rss"], "ratio best": ""})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides of every benchmark")
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    p.add_argument("--out", default=str(C.RESULTS))
    args = p.parse_args()
    flags = (["--quick"] if args.quick else []) + (["--no-gpu"] if args.no_gpu else []) + ["--out", args.out]
    flags += ["--threads", str(args.threads)] if args.threads else []
    t0 = time.perf_counter()
    walls, failed = {}, []
    for name in args.only:
        print(f"\n=== bench_{name}.py ===", flush=True)
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, str(C.HERE / f"bench_{name}.py"), *flags]).returncode
        walls[name] = round(time.perf_counter() - t, 1)
        if rc:
            failed.append(name)
    rows = []
    for name in args.only:
        path = C.Path(args.out) / f"{name}.json"
        if name not in failed and path.exists():
            rows += headline(name, json.loads(path.read_text()))
    print("\n=== summary (ratio = imagene / bare speed; 1.0 = parity) ===")
    print(C.table(rows, ["benchmark", "case", "imagene", "bare", "ratio", "ratio best"]))
    print(f"wall per script (s): {walls}; total {time.perf_counter() - t0:.0f} s")
    C.write("summary", {"machine": C.machine_info(), "wall_s": walls, "failed": failed, "rows": rows},
            C.Path(args.out))
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
