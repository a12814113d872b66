"""Regenerate the her2st demo sample shipped inside the package (``src/imagene/datasets/_data/her2st``).

Usage (from the repository root, with the project's environment active)::

    python scripts/make_demo_data.py                      # defaults below
    python scripts/make_demo_data.py --src ../shared/data/her2st --scale 0.5 --quality 85
    python scripts/make_demo_data.py --restrict-genes     # keep only genes present in all sections

What it does, per section (B4 of patient B; C2, C3, C4 of patient C):

- copies the counts ``<S>.tsv.gz`` byte for byte (or, with ``--restrict-genes``, rewrites it in the
  same tab-separated, gzip-compressed format keeping only the genes measured in every section;
  every spot is kept);
- copies the spot table ``<S>_selection.tsv`` byte for byte (``pixel_x`` / ``pixel_y`` stay in
  full-resolution pixels);
- writes ``<S>_HE.jpg``: the full-size H&E image resized by ``--scale`` with Lanczos resampling and
  saved as JPEG with ``--quality``; the exact scale ``new_width / original_width`` is recorded;
- writes ``manifest.json`` (files, image scale, patient, original image name and size per section)
  and ``README.md`` (source, citation, licence situation, changes made).

Data: Andersson et al., "Spatial deconvolution of HER2-positive breast cancer delineates
tumor-associated cell type interactions", Nature Communications 12, 6012 (2021),
https://doi.org/10.1038/s41467-021-26271-2. The authors state no licence; cite the paper.
The script prints nothing; it logs a summary (total size) at INFO level.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image

logger = logging.getLogger("imagene.scripts.make_demo_data")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "her2st"
DEFAULT_OUT = ROOT / "src" / "imagene" / "datasets" / "_data" / "her2st"

#: section -> patient
SECTIONS = {"B4": "B", "C2": "C", "C3": "C", "C4": "C"}

CITATION = (
    'Andersson, A., Larsson, L., Stenbeck, L. et al. "Spatial deconvolution of HER2-positive breast cancer '
    'delineates tumor-associated cell type interactions." Nature Communications 12, 6012 (2021). '
    "https://doi.org/10.1038/s41467-021-26271-2"
)


def _find_image(folder: Path) -> Path:
    jpgs = sorted(folder.glob("*.jpg"))
    if len(jpgs) != 1:
        raise FileNotFoundError(f"Expected exactly one full-size .jpg H&E image in {folder}; found {jpgs}.")
    return jpgs[0]


def _common_genes(src: Path) -> list[str]:
    common: list[str] | None = None
    for s in SECTIONS:
        cols = pd.read_csv(src / s / f"{s}.tsv.gz", sep="\t", index_col=0, nrows=0).columns.astype(str).tolist()
        common = cols if common is None else [g for g in common if g in set(cols)]
    return common or []


def _write_counts(src_file: Path, dst_file: Path, genes: list[str] | None) -> None:
    if genes is None:
        shutil.copyfile(src_file, dst_file)
        return
    df = pd.read_csv(src_file, sep="\t", index_col=0)
    df = df.loc[:, [g for g in df.columns if g in set(genes)]]
    df.index.name = None
    with gzip.open(dst_file, "wt", compresslevel=9) as fh:
        df.to_csv(fh, sep="\t")


def _write_image(src_file: Path, dst_file: Path, scale: float, quality: int) -> dict:
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(src_file) as im:
        im = im.convert("RGB")
        w, h = im.size
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = im.resize(size, Image.Resampling.LANCZOS)
    small.save(dst_file, "JPEG", quality=quality, optimize=True)
    return {
        "original_image": src_file.name,
        "original_size": [w, h],
        "image_size": list(size),
        "image_scale": size[0] / w,
    }


def _readme(manifest: dict, scale: float, quality: int, restrict: bool) -> str:
    rows = "\n".join(
        f"| {s} | {m['patient']} | `{m['original_image']}` | {m['original_size'][0]} x {m['original_size'][1]} "
        f"| {m['image_size'][0]} x {m['image_size'][1]} | {m['image_scale']:.6f} |"
        for s, m in manifest["sections"].items()
    )
    counts_note = (
        "rewritten in the same format (tab-separated, gzip) keeping only the genes measured in all four "
        "sections; every spot is kept"
        if restrict
        else "copied unchanged"
    )
    return f"""# her2st demo sample (legacy Spatial Transcriptomics, human HER2+ breast cancer)

Four sections shipped with imagene as the default data of `imagene.datasets.her2st_demo()` and the
offline demo: `B4` (patient B) and `C2`, `C3`, `C4` (patient C).

## Source and citation

{CITATION}

Data published with the paper (deposited on Zenodo, see the paper's data availability statement).
**Licence:** the authors state no licence of their own for these data. They are redistributed here
for demonstration and testing only; cite the paper above wherever you use them.

## Files per section `<S>/` (original legacy ST formats)

- `<S>.tsv.gz`: raw integer counts, rows are spots `"{{x}}x{{y}}"`, columns are gene symbols ({counts_note}).
- `<S>_selection.tsv`: spot table (`x y new_x new_y pixel_x pixel_y selected`), copied unchanged;
  `pixel_x` / `pixel_y` are in **full-resolution** pixels of the original image.
- `<S>_HE.jpg`: the H&E image **downscaled** from the original full-size JPEG by a factor of {scale}
  (Lanczos resampling), saved as JPEG quality {quality}. Its scale (pixels of this file per
  full-resolution pixel, `new_width / original_width`) is in the table below and in
  `manifest.json` (`image_scale`); pass it to `imagene.io.read_legacy_st(..., image_scale=...)`.

| section | patient | original image | original size (w x h) | shipped size (w x h) | image_scale |
|---|---|---|---|---|---|
{rows}

Regenerate with `python scripts/make_demo_data.py` from the repository root.
"""


def main(argv: list[str] | None = None) -> dict:
    """Build the demo folder; returns the manifest."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="her2st folder with B4, C2, C3, C4")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (replaced)")
    p.add_argument("--scale", type=float, default=0.5, help="image downscale factor")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    p.add_argument("--restrict-genes", action="store_true", help="keep only genes present in all sections")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        raise ValueError(f"--scale must be in (0, 1]; got {args.scale}.")
    for s in SECTIONS:
        if not (args.src / s).is_dir():
            raise FileNotFoundError(f"Section folder {args.src / s} not found; pass the her2st folder with --src.")

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    genes = _common_genes(args.src) if args.restrict_genes else None

    manifest: dict = {
        "dataset": "her2st",
        "citation": CITATION,
        "licence": "none stated by the authors; cite the paper",
        "image_downscale": args.scale,
        "jpeg_quality": args.quality,
        "genes_restricted_to_common": bool(args.restrict_genes),
        "sections": {},
    }
    for s, patient in SECTIONS.items():
        src, dst = args.src / s, args.out / s
        dst.mkdir()
        _write_counts(src / f"{s}.tsv.gz", dst / f"{s}.tsv.gz", genes)
        shutil.copyfile(src / f"{s}_selection.tsv", dst / f"{s}_selection.tsv")
        info = _write_image(_find_image(src), dst / f"{s}_HE.jpg", args.scale, args.quality)
        manifest["sections"][s] = {
            "patient": patient,
            "files": {"counts": f"{s}/{s}.tsv.gz", "spots": f"{s}/{s}_selection.tsv", "image": f"{s}/{s}_HE.jpg"},
            **info,
        }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (args.out / "README.md").write_text(_readme(manifest, args.scale, args.quality, args.restrict_genes))
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    logger.info("Wrote %s (%.2f MB); image scales %s", args.out, total / 1e6,
                {s: round(m["image_scale"], 6) for s, m in manifest["sections"].items()})
    if total > 12e6:
        logger.warning("The demo folder is %.2f MB (> 12 MB): lower --scale or --quality.", total / 1e6)
    return manifest


if __name__ == "__main__":
    logger.addHandler(logging.StreamHandler())
    logger.setLevel(logging.INFO)
    main()
