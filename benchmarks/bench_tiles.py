"""Tiles/s of ``imagene.pp.extract_tiles`` vs a bare decode-and-crop loop over the same pixels.

Three cases, each imagene vs bare, interleaved in one process after a warm-up of each:

- ``jpeg``: the real her2st B4 section (full-size 9272 x 9923 JPEG) read by
  ``imagene.io.read_legacy_st``; ``extract_tiles`` decodes the JPEG and cuts one 112 µm tile per
  spot resampled to 224 px. Bare: ``PIL.Image.open(...)`` + ``np.asarray`` (the same decode),
  numpy crops of the same windows, ``PIL`` resize with the same filter. Decode is counted on
  both sides.
- ``in_memory``: the same, with the decoded image passed as ``image=`` (crop + resize only).
- ``lazy_tiff``: a 20480 x 20480 JPEG-compressed tiled TIFF (real H&E) read lazily by
  ``extract_tiles`` (tifffile → zarr → dask); bare: ``tifffile.imread(aszarr=True)`` +
  ``zarr.open`` and one zarr slice per window, then the same resize.

Both sides must produce identical tiles (checked). Run: ``python benchmarks/bench_tiles.py``.
"""

from __future__ import annotations

import time

import numpy as np

import _common as C


def windows(xy: np.ndarray, size: float) -> np.ndarray:
    """(x0, y0, s) integer windows of side ``s`` centred on ``xy`` (rounded like any tiler must)."""
    s = max(1, int(round(size)))
    x0 = np.floor(xy[:, 0] - s / 2 + 0.5).astype(np.int64)
    y0 = np.floor(xy[:, 1] - s / 2 + 0.5).astype(np.int64)
    return np.stack([x0, y0, np.full_like(x0, s)], axis=1)


def bare_cut(read_window, wins: np.ndarray, h: int, w: int, px: int) -> np.ndarray:
    """Crop each window with ``read_window(ya, yb, xa, xb)``, pad with white, resize with PIL."""
    from PIL import Image

    out = np.empty((len(wins), px, px, 3), np.uint8)
    for j, (x0, y0, s) in enumerate(wins):
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + s, w), min(y0 + s, h)
        arr = read_window(ya, yb, xa, xb)
        if arr.shape[:2] != (s, s):
            full = np.full((s, s, 3), 255, np.uint8)
            full[ya - y0 : ya - y0 + arr.shape[0], xa - x0 : xa - x0 + arr.shape[1]] = arr
            arr = full
        if s != px:
            method = Image.Resampling.BILINEAR if s < px else Image.Resampling.BOX
            arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((px, px), method))
        out[j] = arr
    return out


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    info = C.start(args)
    import imagene as ig
    from PIL import Image

    repeats = args.repeats or (2 if args.quick else 5)
    tile_um, px = 112.0, 224
    rows, cases = [], {}

    # --- real her2st JPEG ---------------------------------------------------------------------
    counts, spots, jpg = C.B4_FILES
    adata = ig.io.read_legacy_st(counts, spots, jpg, library_id="B4")
    mpp = adata.uns["spatial"]["B4"]["scalefactors"]["microns_per_pixel"]
    xy = adata.obsm["spatial"]
    wins = windows(xy, tile_um / mpp)
    Image.MAX_IMAGE_PIXELS = None

    def decode() -> np.ndarray:
        with Image.open(jpg) as im:
            return np.asarray(im.convert("RGB") if im.mode != "RGB" else im)

    def ig_jpeg():
        ig.pp.extract_tiles(adata, tile_size_um=tile_um, tile_px=px, show_progress_bar=False)

    def bare_jpeg():
        img = decode()
        return bare_cut(lambda ya, yb, xa, xb: img[ya:yb, xa:xb], wins, *img.shape[:2], px)

    img = decode()
    ig_jpeg()
    same = bool(np.array_equal(adata.obsm["imagene_tiles"], bare_jpeg()))
    t_dec = C.side_by_side({"decode": decode}, repeats=repeats, warmup=0)["decode"]
    times = C.side_by_side({"imagene": ig_jpeg, "bare": bare_jpeg}, repeats=repeats, warmup=0)
    cases["jpeg"] = case(times, len(xy), same, {"image": f"{jpg.name} {img.shape[1]}x{img.shape[0]}",
                                                "decode_median_s": round(float(np.median(t_dec)), 4)})

    # --- same pixels, image already in memory ------------------------------------------------
    def ig_mem():
        ig.pp.extract_tiles(adata, image=img, tile_size_um=tile_um, tile_px=px, show_progress_bar=False)

    def bare_mem():
        return bare_cut(lambda ya, yb, xa, xb: img[ya:yb, xa:xb], wins, *img.shape[:2], px)

    ig_mem()
    same = bool(np.array_equal(adata.obsm["imagene_tiles"], bare_mem()))
    times = C.side_by_side({"imagene": ig_mem, "bare": bare_mem}, repeats=repeats, warmup=0)
    cases["in_memory"] = case(times, len(xy), same, {"image": "decoded B4 array passed as image="})

    # --- large lazily read tiled TIFF -------------------------------------------------------
    import tifffile
    import zarr

    side = 4096 if args.quick else 20480
    path = C.large_tiff(side)
    n_lazy = 300 if args.quick else 1000
    lxy = C.grid_spots(n_lazy, side)
    ladata = C.lazy_adata(lxy, path, mpp)
    lwins = windows(lxy, tile_um / mpp)

    def ig_lazy():
        ig.pp.extract_tiles(ladata, tile_size_um=tile_um, tile_px=px, show_progress_bar=False)

    def bare_lazy():
        with tifffile.imread(path, aszarr=True) as store:
            z = zarr.open(store, mode="r")
            return bare_cut(lambda ya, yb, xa, xb: z[ya:yb, xa:xb], lwins, *z.shape[:2], px)

    ig_lazy()
    same = bool(np.array_equal(ladata.obsm["imagene_tiles"], bare_lazy()))
    times = C.side_by_side({"imagene": ig_lazy, "bare": bare_lazy}, repeats=max(2, repeats - 2), warmup=0)
    cases["lazy_tiff"] = case(times, n_lazy, same, {"image": f"{path.name} {side}x{side} JPEG-tiled 512"})

    for name, c in cases.items():
        rows.append({"case": name, "tiles": c["n_tiles"], "imagene tiles/s": c["imagene"]["items_per_s"],
                     "bare tiles/s": c["bare"]["items_per_s"], "ratio": c["ratio"], "ratio best": c["ratio_best"],
                     "identical": c["identical"]})
    print(C.table(rows, ["case", "tiles", "imagene tiles/s", "bare tiles/s", "ratio", "ratio best", "identical"]))
    C.write("tiles", {"benchmark": "extract_tiles vs bare decode-and-crop", "tile_size_um": tile_um,
                      "tile_px": px, "machine": info, "cases": cases, "table": rows}, args.out)


def case(times: dict, n: int, identical: bool, extra: dict) -> dict:
    return {"n_tiles": n, **C.compare(times, n), "identical": identical, **extra}


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
