"""Command line: ``imagene demo``, ``imagene bench`` and ``imagene predict``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from imagene._console import HelpFormatter, LazyHelp, encoder_help, print_timings


class _RawDescription(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the top-level description (a small table of commands) as written."""


def _encoder_help() -> str:
    from imagene.nn import list_image_encoders

    return encoder_help(list_image_encoders())


def _demo(args: argparse.Namespace) -> int:
    from imagene._demo import run_demo

    try:
        res = run_demo(
            args.out,
            data=args.data,
            dataset=args.dataset,
            sections=args.sections,
            test_section=args.test_section,
            encoder=args.encoder,
            tile_px=args.tile_px,
            max_epochs=args.epochs,
            show_progress_bar=not args.quiet,
        )
    except (ConnectionError, FileNotFoundError, KeyError, ValueError) as err:
        sys.stderr.write(f"imagene demo: {err}\n")
        if isinstance(err, ConnectionError):
            sys.stderr.write("imagene demo: with a local copy of the data, run `imagene demo --data DIR`.\n")
        return 2

    def fmt(v: float | None) -> str:
        return "undefined (constant prediction)" if v is None else f"{v:.3f}"

    sys.stdout.write(f"Data: {res['data']}.\n")
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
    print_timings(res["timings"])
    sys.stdout.write(f"Total time {res['timings']['total_s']:.0f} s. Outputs in {args.out}/:\n")
    for f in ("imagene_demo.h5ad", "metrics.json", "predicted_vs_measured.png"):
        sys.stdout.write(f"  {args.out}/{f}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imagene`` command."""
    from imagene import __version__

    parser = argparse.ArgumentParser(
        prog="imagene",
        description="Align H&E histology with spatial transcriptomics.\n\n"
        "  imagene demo    read, tile, embed, train UMPIRE, predict a held-out section from H&E\n"
        "  imagene bench   UMPIRE against baselines, leaving one section out\n"
        "  imagene predict a saved model over an H&E slide alone (SpatialData zarr, PNG, summary)\n\n"
        "Run `imagene <command> --help` for a command's options.",
        formatter_class=_RawDescription,
    )
    parser.add_argument("--version", action="version", version=f"imagene {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,predict}")
    demo = sub.add_parser(
        "demo",
        help="run the pipeline end to end (default: on synthetic sections; --data DIR for real ones)",
        description="The main job end to end: read sections, cut one tile per spot, embed the tiles with a frozen "
        "image encoder, train UMPIRE on all sections but one and predict the held-out section's expression from "
        "H&E alone, next to a ridge probe on the same features. The default data are four synthetic sections made "
        "offline (imagene.datasets.synthetic_he_st); --data DIR runs the same flow on a folder of legacy-ST sections "
        "in the her2st layout, --dataset her2st downloads the four her2st sections. Writes imagene_demo.h5ad, "
        "metrics.json and predicted_vs_measured.png to --out and prints the time of each step.",
        formatter_class=HelpFormatter,
    )
    demo.add_argument("--out", default="imagene_demo", help="output folder (default: ./imagene_demo)")
    source = demo.add_mutually_exclusive_group()
    source.add_argument("--data", default=None, metavar="DIR",
                        help="folder of section folders in the her2st layout (<S>/<S>.tsv.gz, <S>_selection.tsv, "
                             "one H&E image), e.g. a copy of the her2st release")
    source.add_argument("--dataset", default=None, choices=["her2st"],
                        help="download a published dataset from its authors' repository")
    demo.add_argument("--sections", nargs="+", default=None, metavar="S",
                      help="sections to use (default: B4 C2 C3 C4 for her2st, else all)")
    demo.add_argument("--test-section", default=None, help="section held out for testing (default: the last one)")
    demo.add_argument("--encoder", default="efficientnet_lite0", help=LazyHelp(_encoder_help))
    demo.add_argument("--tile-px", type=int, default=224, help="tile size in pixels (default: 224)")
    demo.add_argument("--epochs", type=int, default=100, help="maximum training epochs (default: 100)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    from imagene.bench._command import DESCRIPTION

    bench = sub.add_parser(
        "bench",
        help="benchmark UMPIRE against baselines, leaving one section out (expression, retrieval, clustering)",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
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
