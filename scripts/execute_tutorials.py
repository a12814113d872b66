"""Execute the tutorials and store their outputs in place (what the docs render and GitHub shows).

Usage::

    IMAGENE_DATA_DIR=../shared/data python scripts/execute_tutorials.py [--fast] [NAME ...]

``--fast`` sets ``IMAGENE_TUTORIAL_FAST=1`` (the setting the test suite uses; each notebook says
what it changes). The notebooks run in a temporary folder, so stored outputs name no path of this
machine; stderr warnings that name local paths are dropped, and the script refuses to store a
notebook whose other outputs mention the checkout, the virtual environment, the data folder or the
temporary folder, or hold an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"


def _drop_noise(nb: nbformat.NotebookNode, forbidden: list[str]) -> int:
    """Drop stderr streams that name paths of this machine (third-party warnings); return how many."""
    n = 0
    for cell in nb.cells:
        keep = []
        for out in cell.get("outputs", []):
            noisy = out.get("output_type") == "stream" and out.get("name") == "stderr"
            if noisy and any(f in out.get("text", "") for f in forbidden):
                n += 1
                continue
            keep.append(out)
        if "outputs" in cell:
            cell["outputs"] = keep
    return n


def _leaks(nb: nbformat.NotebookNode, forbidden: list[str]) -> list[str]:
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {i}: error {out.get('ename')}: {out.get('evalue')}")
            text = out.get("text", "") + "".join(str(v) for k, v in out.get("data", {}).items() if k.startswith("text"))
            for f in forbidden:
                if f in text:
                    found.append(f"cell {i}: output mentions {f!r}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all), e.g. 01_quickstart")
    parser.add_argument("--fast", action="store_true", help="IMAGENE_TUTORIAL_FAST=1")
    args = parser.parse_args(argv)
    paths = sorted(TUTORIALS.glob("*.ipynb"))
    if args.names:
        paths = [p for p in paths if p.stem in args.names or p.name in args.names]
    env_fast = "1" if args.fast else "0"
    os.environ["IMAGENE_TUTORIAL_FAST"] = env_fast
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    status = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory(prefix="imagene_tutorial_") as work:
            t0 = time.perf_counter()
            client = nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3",
                                             resources={"metadata": {"path": work}})
            client.execute()
            forbidden = [str(ROOT), sys.prefix, work, str(Path.home()), os.environ.get("IMAGENE_DATA_DIR", "")]
            forbidden = [f for f in forbidden if f and f != "/"]
            dropped = _drop_noise(nb, forbidden)
            leaks = _leaks(nb, forbidden)
        if leaks:
            sys.stderr.write(f"{path.name}: not stored:\n  " + "\n  ".join(leaks) + "\n")
            status = 1
            continue
        nbformat.write(nb, path)
        took = time.perf_counter() - t0
        sys.stdout.write(f"{path.name}: executed in {took:.0f} s (fast={args.fast}), stored "
                         f"({dropped} stderr warnings naming local paths dropped)\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
