"""Context baselines: the HEST ridge probe against the same ridge on context features (LOSO).

Leave-one-section-out with :func:`imagene.bench.run` on her2st B4, C2, C3, C4 (and, with
``--mob``, the mouse olfactory bulb MOB1 <-> MOB2): ``ridge_probe`` (StandardScaler -> PCA(256)
-> ridge on the frozen EfficientNet-Lite0 features of the 112 µm spot tile) against
``context_ridge`` (the same pipeline on the context matrix: the spot tile averaged over 4 flips,
tiles of 224 and 448 µm around the spot, and the mean spot feature of its 6 nearest spots), and
ablations of the context (each block alone or in part). Every pipeline is fitted per fold on the
training sections only; the context features are per-spot image features, or means over
neighbours in the same section, so a held-out section's context uses its own image only.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/context_baselines.py --cache /tmp/context_cache --mob

The multi-scale features are cached per section under ``--cache`` (about 10k tile forward passes
for the four her2st sections on CPU, once). Writes ``benchmarks/results/context_baselines.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _common import DATA, RESULTS, machine_info, quiet

import imagene as ig

HER2ST = ("B4", "C2", "C3", "C4")
MOB = ("MOB1", "MOB2")
ENCODER = "efficientnet_lite0"
SPOT = f"X_he_{ENCODER}"


def _ablations(adata) -> dict[str, str]:
    """Context matrices of parts of the context (the full one is built by read_sections / _read_mob)."""
    s112, s224, s448 = (f"{SPOT}_{s}um" for s in (112, 224, 448))
    parts = {
        "tta_spot": ([s112], ()),
        "spot+nbr": ([SPOT], None),
        "tta_spot+nbr": ([s112], None),
        "tta_spot+scales": ([s112, s224, s448], ()),
    }
    keys = {}
    for name, (blocks, nbr) in parts.items():
        key = f"{SPOT}_ctx_{name.replace('+', '_')}"
        ig.pp.context_matrix(adata, blocks, neighbor_keys=nbr, key_added=key)
        keys[name] = key
    return keys


def _read_mob(cache: Path):
    """MOB1 and MOB2 (legacy ST, low-resolution images) with spot and context features, cached."""
    from imagene.bench._data import _context_section, _embed_section

    folder = DATA / "mouse_olfactory_bulb"
    parts = {}
    for s in MOB:
        image = folder / s / f"{s}.jpg"
        a = ig.io.read_legacy_st(folder / s / f"{s}.tsv", folder / s / f"alignment_table_{s}.tsv", image, library_id=s)
        _embed_section(a, s, image, encoder=ENCODER, tile_px=224, tile_size_um=112.0, cache=cache,
                       show_progress_bar=False)
        keys = _context_section(a, s, image, encoder=ENCODER, tile_px=224, sizes_um=(112.0, 224.0, 448.0),
                                tta="flips", cache=cache, show_progress_bar=False)
        parts[s] = a
    adata = ig.io.concat(parts, library_key="section")
    ig.pp.niches(adata, n_neighs=6, library_key="section", niche_expression=False)
    ig.pp.context_matrix(adata, keys)
    return adata


#: Macenko et al. (ISBI 2009) reference H&E stain vectors (columns: haematoxylin, eosin; optical density
#: of R, G, B) and 99th-percentile concentrations, as in the reference implementation and torchstain
HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAX_C_REF = np.array([1.9705, 1.0308])


def _macenko(tiles: np.ndarray, *, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15) -> np.ndarray:
    """Macenko stain normalisation of one section's tiles to :data:`HE_REF`.

    The stain vectors and the 99th-percentile concentrations are estimated once per section, from
    the tissue pixels (optical density above ``beta``) of all its tiles, then every pixel is
    re-expressed with the reference stains.
    """
    od = -np.log((tiles.reshape(-1, 3).astype(np.float64) + 1) / io)
    tissue = od[(od > beta).all(1)]
    rng = np.random.default_rng(0)
    if len(tissue) > 2_000_000:
        tissue = tissue[rng.choice(len(tissue), 2_000_000, replace=False)]
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v1, v2], 1) if v1[0] > v2[0] else np.stack([v2, v1], 1)  # haematoxylin first
    he *= np.sign(he.sum(0, keepdims=True))
    conc_tissue = np.linalg.lstsq(he, tissue.T, rcond=None)[0]
    max_c = np.percentile(conc_tissue, 99, axis=1)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0] * (MAX_C_REF / max_c)[:, None]
    out = io * np.exp(-(HE_REF @ conc))
    return np.clip(out.T, 0, 255).astype(np.uint8).reshape(tiles.shape)


def _stain_features(adata, cache: Path) -> str:
    """Spot features (112 µm, 224 px) of Macenko-normalised tiles, cached per section; returns the key."""
    key = f"{SPOT}_macenko"
    feats = np.empty((adata.n_obs, 1280), np.float32)
    for s in adata.obs["section"].cat.categories:
        rows = np.flatnonzero(adata.obs["section"].to_numpy() == s)
        path = cache / f"{s}__{ENCODER}__224px__112um__macenko.npz"
        if path.exists():
            with np.load(path) as z:
                if list(z["obs_names"]) == list(adata.obs_names[rows]):
                    feats[rows] = z["features"]
                    continue
        part = adata[rows].copy()
        ig.pp.extract_tiles(part, tile_size_um=112.0, tile_px=224, show_progress_bar=False)
        part.obsm["imagene_tiles"] = _macenko(np.asarray(part.obsm["imagene_tiles"]))
        ig.pp.embed_tiles(part, encoder=ENCODER, key_added=key, show_progress_bar=False)
        feats[rows] = part.obsm[key]
        np.savez(path, features=feats[rows], obs_names=np.asarray(adata.obs_names[rows], dtype=str))
    adata.obsm[key] = feats
    return key


def _evaluate_stain(adata, label: str, cache: Path) -> tuple[list[dict], list[dict]]:
    key = _stain_features(adata, cache)
    plain = ig.bench.RidgeProbe()
    stained = ig.bench.ContextRidge(context_key=key)
    stained.name = "ridge_probe[macenko]"
    df = ig.bench.run(adata, library_key="section", task="expression", methods=[plain, stained], image_key=SPOT)
    summary = ig.bench.summarize(df)
    summary.insert(0, "data", label)
    return df.assign(data=label).to_dict("records"), summary.to_dict("records")


def _evaluate(adata, label: str) -> tuple[list[dict], list[dict]]:
    ablations = _ablations(adata)
    methods = [ig.bench.RidgeProbe(), ig.bench.ContextRidge()]
    for name, key in ablations.items():
        m = ig.bench.ContextRidge(context_key=key)
        m.name = f"context_ridge[{name}]"
        methods.append(m)
    t0 = time.perf_counter()
    df = ig.bench.run(adata, library_key="section", task="expression", methods=methods, image_key=SPOT)
    seconds = time.perf_counter() - t0
    summary = ig.bench.summarize(df)
    summary.insert(0, "data", label)
    records = df.assign(data=label).to_dict("records")
    print(f"{label}: {adata.n_obs} spots, {seconds:.0f} s")
    return records, summary.to_dict("records")


def _markdown(summary: list[dict], records: list[dict]) -> str:
    import pandas as pd

    s = pd.DataFrame(summary)
    r = pd.DataFrame(records)
    lines = []
    for label, sub in s.groupby("data", sort=False):
        base = sub.query("method == 'ridge_probe' and metric == 'pcc_hvg50'")["mean"].item()
        lines += [f"### {label}", "", "| method | PCC HVG50 | PCC HEG50 | HVG50 / ridge_probe | per fold HVG50 |",
                  "|---|---|---|---|---|"]
        for method in dict.fromkeys(sub["method"]):
            row = sub[sub["method"] == method].set_index("metric")
            hvg, heg = row.loc["pcc_hvg50"], row.loc["pcc_heg50"]
            folds = r.query("data == @label and method == @method and metric == 'pcc_hvg50'")
            per_fold = ", ".join(f"{f} {v:.3f}" for f, v in zip(folds["fold"], folds["value"], strict=True))
            lines.append(
                f"| {method} | {hvg['mean']:.3f} ± {hvg['std']:.3f} | {heg['mean']:.3f} ± {heg['std']:.3f} "
                f"| {hvg['mean'] / base:.2f}x | {per_fold} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("/tmp/imagene_context_cache"),
                   help="folder of cached tile features (default: /tmp/imagene_context_cache)")
    p.add_argument("--mob", action="store_true", help="also run MOB1 <-> MOB2")
    p.add_argument("--stain", action="store_true",
                   help="also the ridge probe on Macenko-normalised spot tiles (her2st; measured, not shipped)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    quiet()
    t0 = time.perf_counter()
    adata = ig.bench.read_sections(DATA / "her2st", HER2ST, encoder=ENCODER, cache=args.cache, context=True)
    records, summary = _evaluate(adata, "her2st B4 C2 C3 C4 (LOSO)")
    if args.stain:
        r, s = _evaluate_stain(adata, "her2st stain normalisation (LOSO)", args.cache)
        records, summary = records + r, summary + s
    if args.mob:
        mob = _read_mob(args.cache)
        r, s = _evaluate(mob, "mouse olfactory bulb MOB1 MOB2 (LOSO)")
        records, summary = records + r, summary + s
    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        "command": "OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/context_baselines.py"
        + (" --mob" if args.mob else "") + (" --stain" if args.stain else ""),
        "encoder": ENCODER,
        "spot": "112 µm tile at 224 px",
        "context": "112 µm tile averaged over 4 flips, 224 and 448 µm tiles (4 flips each), mean of the 112 µm "
        "feature over the 6 nearest spots of the same section",
        "split": "leave one section out",
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(),
    }
    (args.out / "context_baselines.json").write_text(
        json.dumps({"config": config, "summary": summary, "records": records}, indent=1, default=str)
    )
    md = _markdown(summary, records)
    (args.out / "context_baselines.md").write_text(
        "# Context baselines (ridge on frozen features, leave one section out)\n\n"
        f"`{config['command']}` ({config['seconds']:.0f} s, features cached). Mean ± sd over folds.\n\n" + md
    )
    print(md)


if __name__ == "__main__":
    main()
