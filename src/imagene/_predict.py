"""``imagene predict``: a saved model applied to an H&E slide alone."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("imagene")


def model_class(dir_path: str | os.PathLike) -> type:
    """The imagene model class that saved ``dir_path`` (from the registry stored in ``model.pt``)."""
    import torch

    import imagene as ig

    path = Path(dir_path) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"No saved model at {str(path)!r}. Save one with `model.save(dir_path)`.")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    name = saved["attr_dict"]["registry_"].get("model_name")
    cls = getattr(ig.model, str(name), None)
    if cls is None:
        raise ValueError(f"{str(dir_path)!r} holds a {name!r} model, not one of imagene's models.")
    return cls


def _plot(out: Any, genes: list[str], path: Path, lib: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection

    entry = out.uns["spatial"][lib]
    hires = entry["images"]["hires"]
    s = entry["scalefactors"]["tissue_hires_scalef"]
    xy = np.asarray(out.obsm["spatial"]) * s
    d = float(entry["scalefactors"]["spot_diameter_fullres"]) * s  # spots drawn at their size on the tissue
    fig, axes = plt.subplots(1, len(genes), figsize=(4.2 * len(genes), 4.2), squeeze=False)
    for ax, gene in zip(axes[0], genes, strict=True):
        ax.imshow(hires)
        col = out.var_names.get_loc(gene)
        sc = EllipseCollection(
            np.full(len(xy), d), np.full(len(xy), d), np.zeros(len(xy)), units="xy", offsets=xy,
            offset_transform=ax.transData, cmap="viridis", alpha=0.9,
        )
        sc.set_array(out.layers["imagene_predicted"][:, col])
        ax.add_collection(sc)
        ax.set_title(f"{gene} (predicted, log1p CP10k)", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_predict(
    model_dir: str | os.PathLike,
    slide_path: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    pitch_um: float = 100.0,
    layout: str = "hex",
    spot_diameter_um: float | None = None,
    microns_per_pixel: float | None = None,
    genes: list[str] | None = None,
    n_plot: int = 4,
    method: str | None = None,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Predict expression over an H&E slide with a saved model; write SpatialData, a PNG and a summary.

    Parameters
    ----------
    model_dir
        Folder of a saved imagene model (``model.save(dir)``).
    slide_path
        The slide (SVS, NDPI, MRXS, tiled TIFF, or a plain JPEG / PNG / TIFF).
    out
        SpatialData zarr store written (default ``<slide stem>_imagene.zarr`` beside the slide);
        the PNG (``<out stem>.png``) and the summary (``<out stem>_summary.json``) go beside it.
    pitch_um, layout, spot_diameter_um
        Virtual spots (:func:`imagene.pp.spot_grid`); the spot diameter defaults to half the pitch.
    microns_per_pixel
        Needed when the slide's metadata has none.
    genes
        Genes to plot (default: the ``n_plot`` genes whose predictions vary most over the slide).
    n_plot
        Genes in the PNG.
    method
        Passed to the model's prediction (STAlign: ``'reference'`` or ``'probe'``).
    show_progress_bar
        Progress bars on tiling and embedding.

    Returns
    -------
    The summary (also written as JSON).
    """
    import imagene as ig
    from imagene.tl._model_outputs import ensure_image_features

    t0 = time.perf_counter()
    slide_path = Path(slide_path)
    out = Path(out) if out is not None else slide_path.with_name(f"{slide_path.stem}_imagene.zarr")
    model = model_class(model_dir).load(model_dir)
    slide = ig.io.read_slide(slide_path, microns_per_pixel=microns_per_pixel)
    grid = ig.pp.spot_grid(
        slide, pitch_um=pitch_um, layout=layout, spot_diameter_um=spot_diameter_um or pitch_um / 2
    )
    lib = str(grid.obs["section"].iloc[0])
    ensure_image_features(model, grid, show_progress_bar=show_progress_bar)
    kwargs = {} if method is None else {"method": method}
    pred = ig.tl.predict_expression(model, grid, **kwargs)
    pred = grid if pred is None else pred
    t_pred = time.perf_counter() - t0
    sdata = ig.io.predictions_to_spatialdata(pred)
    sdata.write(out, overwrite=True)
    values = pred.layers["imagene_predicted"]
    if genes is None:
        order = np.argsort(-values.std(0), kind="stable")
        genes = [str(g) for g in pred.var_names[order[: max(1, n_plot)]]]
    unknown = [g for g in genes if g not in pred.var_names]
    if unknown:
        raise KeyError(f"Genes not predicted by the model: {unknown}; choose among `model.gene_names`.")
    png = out.with_suffix(".png")
    _plot(pred, genes, png, lib)
    summary = {
        "model": str(model_dir),
        "model_class": type(model).__name__,
        "slide": str(slide_path),
        "microns_per_pixel": slide.microns_per_pixel,
        "slide_px": list(slide.shape[:2]),
        "n_spots": int(pred.n_obs),
        "pitch_um": float(pitch_um),
        "layout": layout,
        "n_genes": int(pred.n_vars),
        "n_out_of_distribution": int(pred.obs["imagene_ood"].sum()) if "imagene_ood" in pred.obs else None,
        "mean_predicted_sd": float(np.mean(pred.layers["imagene_predicted_sd"]))
        if "imagene_predicted_sd" in pred.layers else None,
        "plotted_genes": genes,
        "outputs": {"spatialdata": str(out), "png": str(png)},
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_to_predictions": round(t_pred, 1),
    }
    summary_path = out.with_name(f"{out.stem}_summary.json")
    summary["outputs"]["summary"] = str(summary_path)
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``imagene predict``."""
    parser.add_argument("--model", required=True, help="folder of a saved model (model.save(dir))")
    parser.add_argument("--slide", required=True, help="H&E slide: SVS, NDPI, MRXS, tiled TIFF, JPEG, PNG")
    parser.add_argument("--out", default=None, help="SpatialData zarr written (default: <slide>_imagene.zarr)")
    parser.add_argument("--pitch-um", type=float, default=100.0, help="spot pitch in microns (default: 100)")
    parser.add_argument("--layout", choices=("hex", "square"), default="hex", help="spot lattice (default: hex)")
    parser.add_argument("--spot-diameter-um", type=float, default=None, help="spot diameter (default: pitch / 2)")
    parser.add_argument("--microns-per-pixel", type=float, default=None, help="when the slide's metadata has none")
    parser.add_argument("--genes", nargs="*", default=None, help="genes to plot (default: the 4 most variable)")
    parser.add_argument("--method", default=None, help="prediction method: reference (default) or head (a model with `fit_expression_head`); STAlign also probe")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_command(args: argparse.Namespace) -> int:
    """Run ``imagene predict`` from parsed arguments."""
    res = run_predict(
        args.model, args.slide, out=args.out, pitch_um=args.pitch_um, layout=args.layout,
        spot_diameter_um=args.spot_diameter_um, microns_per_pixel=args.microns_per_pixel, genes=args.genes,
        method=args.method, show_progress_bar=not args.quiet,
    )
    ood = res["n_out_of_distribution"]
    sys.stdout.write(
        f"{res['model_class']} predicted {res['n_genes']} genes at {res['n_spots']} virtual spots "
        f"({res['layout']}, {res['pitch_um']:g} µm) of {res['slide']} in {res['seconds']:.0f} s"
        f"{'' if ood is None else f'; {ood} spots unlike every training spot (obs imagene_ood)'}.\n"
    )
    for key, path in res["outputs"].items():
        sys.stdout.write(f"  {key}: {path}\n")
    return 0
