"""Tiles/s of ``imagene.pp.embed_tiles`` vs the bare encoder forward on the same uint8 batches.

Tiles are real her2st B4 tiles (``extract_tiles`` at the encoder's native size, repeated to the
requested count). The bare side builds the same module once with
``imagene.nn.get_image_encoder(name)`` and runs, under ``torch.inference_mode``, for each batch
of the same size: ``torch.from_numpy`` → (device) → ``permute(0, 3, 1, 2).float().div_(255)``
→ ``.contiguous()`` → ``encoder(x)`` → ``.cpu()``. The imagene side is one ``embed_tiles`` call
(which also builds the encoder, i.e. loads its weights, every call: counted, and reported
separately as ``build_s``). Same thread count, same batch size, interleaved after a warm-up.

Encoders: ``efficientnet_lite0`` (the default, 224 px) and ``tiny`` (32 px). A GPU variant runs
whenever ``torch.cuda.is_available()`` (skipped otherwise, and said so).
Run: ``python benchmarks/bench_embed.py``.
"""

from __future__ import annotations

import time

import numpy as np

import _common as C


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    info = C.start(args)
    import torch

    import imagene as ig

    reps = {
        "efficientnet_lite0": args.repeats or (1 if args.quick else 2),
        "tiny": args.repeats or (2 if args.quick else 5),
    }
    counts, spots, jpg = C.B4_FILES
    section = ig.io.read_legacy_st(counts, spots, jpg, library_id="B4")
    devices = ["cpu"]
    if torch.cuda.is_available() and not args.no_gpu:
        devices.append("cuda")
    else:
        print("GPU variant skipped: " + ("--no-gpu" if args.no_gpu else "torch.cuda.is_available() is False"))

    # (encoder, device) -> number of tiles; CPU sizes keep one run at ~5-10 s on 2 cores
    sizes = {
        ("efficientnet_lite0", "cpu"): 64 if args.quick else 256,
        ("tiny", "cpu"): 2048 if args.quick else 8192,
        ("efficientnet_lite0", "cuda"): 8192,
        ("tiny", "cuda"): 65536,
    }
    batch_size = 64
    rows, cases = [], {}
    for name in ("efficientnet_lite0", "tiny"):
        enc0 = ig.nn.get_image_encoder(name)
        px = enc0.input_px
        ig.pp.extract_tiles(section, tile_size_um=112.0, tile_px=px, show_progress_bar=False)
        real = np.asarray(section.obsm["imagene_tiles"])
        for dev in devices:
            n = sizes[(name, dev)]
            tiles = real[np.arange(n) % len(real)]
            adata = C.lazy_adata(np.zeros((n, 2)), jpg, 1.0)  # an AnnData of n spots; only obsm matters here
            adata.obsm["imagene_tiles"] = tiles
            enc = ig.nn.get_image_encoder(name).to(dev).eval()

            def imagene_side(adata=adata, dev=dev, name=name):
                ig.pp.embed_tiles(adata, encoder=name, batch_size=batch_size, device=dev, show_progress_bar=False)

            def bare_side(tiles=tiles, enc=enc, dev=dev):
                out = []
                with torch.inference_mode():
                    for s in range(0, len(tiles), batch_size):
                        x = torch.from_numpy(tiles[s : s + batch_size]).to(dev, non_blocking=True)
                        x = x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
                        out.append(enc(x).float().cpu())
                return torch.cat(out).numpy()

            build = C.side_by_side({"build": lambda name=name, dev=dev: ig.nn.get_image_encoder(name).to(dev)},
                                   repeats=3, device=dev)["build"]
            imagene_side()
            feats = bare_side()
            max_diff = float(np.abs(adata.obsm[f"X_he_{name}"] - feats).max())
            # the calls above were the warm-up of each side
            times = C.side_by_side({"imagene": imagene_side, "bare": bare_side}, repeats=reps[name], warmup=0,
                                   device=dev)
            key = f"{name}/{dev}"
            cases[key] = {
                "encoder": name, "device": dev, "n_tiles": n, "tile_px": px, "batch_size": batch_size,
                "torch_threads": torch.get_num_threads(), **C.compare(times, n),
                "build_s": round(float(np.median(build)), 4), "max_abs_feature_diff": max_diff,
            }
            c = cases[key]
            rows.append({"encoder": name, "device": dev, "tiles": n, "px": px,
                         "imagene tiles/s": c["imagene"]["items_per_s"], "bare tiles/s": c["bare"]["items_per_s"],
                         "ratio": c["ratio"], "ratio best": c["ratio_best"], "build s": c["build_s"]})
            print(C.table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(C.table(rows, list(rows[0])))
    C.write("embed", {"benchmark": "embed_tiles vs bare encoder forward", "machine": info,
                      "gpu_variant": "cuda" in devices, "cases": cases, "table": rows}, args.out)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
