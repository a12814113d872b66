"""Command line: ``imagene demo``, ``imagene bench`` and ``imagene predict``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from imagene._demo import run_demo

    res = run_demo(
        args.out,
        test_section=args.test_section,
        encoder=args.encoder,
        tile_px=args.tile_px,
        max_epochs=args.epochs,
        show_progress_bar=not args.quiet,
    )
    def fmt(v: float | None) -> str:
        return "undefined (constant prediction)" if v is None else f"{v:.3f}"

    sys.stdout.write(
        f"Trained on {', '.join(res['train_sections'])}; predicted held-out section {res['test_section']} "
        f"({res['n_test_spots']} spots) from H&E alone.\n"
    )
    for name in ("hvg50", "heg50"):
        block = res[name]
        sys.stdout.write(
            f"  {name.upper()} mean Pearson r: UMPIRE {fmt(block['umpire']['mean_pearson'])} | "
            f"ridge probe {fmt(block['ridge_probe']['mean_pearson'])} | "
            f"mean expression {fmt(block['mean_expression']['mean_pearson'])}\n"
        )
    sys.stdout.write(f"Total time {res['timings']['total_s']:.0f} s. Outputs in {args.out}/:\n")
    for f in ("imagene_demo.h5ad", "metrics.json", "predicted_vs_measured.png"):
        sys.stdout.write(f"  {args.out}/{f}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imagene`` command."""
    parser = argparse.ArgumentParser(prog="imagene", description="Align H&E histology with spatial transcriptomics.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline on the her2st sample shipped with the package")
    demo.add_argument("--out", default="imagene_demo", help="output folder (default: ./imagene_demo)")
    demo.add_argument("--test-section", default="C4", help="section held out for testing (default: C4)")
    demo.add_argument("--encoder", default="efficientnet_lite0", help="image encoder (default: efficientnet_lite0)")
    demo.add_argument("--tile-px", type=int, default=224, help="tile size in pixels (default: 224)")
    demo.add_argument("--epochs", type=int, default=100, help="maximum training epochs (default: 100)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser(
        "bench", help="benchmark UMPIRE against baselines, leaving one section out (expression, retrieval, clustering)"
    )
    from imagene.bench._command import add_arguments, run_command

    add_arguments(bench)
    bench.set_defaults(func=run_command)
    predict = sub.add_parser(
        "predict", help="predict expression over an H&E slide with a saved model (SpatialData zarr, PNG, summary)"
    )
    from imagene import _predict

    _predict.add_arguments(predict)
    predict.set_defaults(func=_predict.run_command)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
