"""The ``imagene bench`` command (also ``python -m imagene.bench``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from imagene._console import HelpFormatter, LazyHelp, encoder_help, print_timings
from imagene.bench._methods import TASKS

DEFAULT_SECTIONS = ("B4", "C2", "C3", "C4")
DEFAULT_CLUSTER_SECTIONS = ("A1",)

DESCRIPTION = (
    "Leave-one-section-out benchmark of imagene's models against baselines. Each fold fits every method on the "
    "training sections only and scores the held-out one: expression (Pearson r and MSE over the 50 most variable "
    "and most expressed training genes), retrieval (recall@5/10/15 % image <-> gene) and clustering (ARI / NMI "
    "against pathologist labels). Writes results.json, results.md, <task>.csv and <task>.png to --out, caches "
    "tile features in --cache, and prints the time of each step."
)


def method_names(tasks: Sequence[str]) -> dict[str, list[str]]:
    """The names ``--methods`` accepts, by task (those of :func:`imagene.bench.default_methods`).

    Parameters
    ----------
    tasks
        Task names.

    Returns
    -------
    ``{task: [method names]}``.

    Examples
    --------
    >>> method_names(["clustering"])
    {'clustering': ['umpire', 'expression_pca', 'image_features']}
    """
    from imagene.bench._runner import default_methods

    return {t: [m.name for m in default_methods(t)] for t in tasks}


def _methods_help() -> str:
    names = method_names(TASKS)
    listed = "; ".join(f"{task}: {' '.join(n)}" for task, n in names.items())
    return f"run only these methods (default: all of the task's). Names by task: {listed}"


def check_methods(names: Sequence[str] | None, tasks: Sequence[str]) -> None:
    """Refuse ``--methods`` names that run in none of ``tasks``, listing the valid ones (before any data is read).

    Parameters
    ----------
    names
        Names given to ``--methods`` (``None``: all).
    tasks
        Tasks requested.

    Returns
    -------
    Nothing; raises :class:`SystemExit` with the valid names.
    """
    if not names:
        return
    valid = method_names(tasks)
    known = sorted({n for v in valid.values() for n in v})
    unknown = [n for n in names if n not in known]
    if unknown:
        by_task = "; ".join(f"{t}: {', '.join(v)}" for t, v in valid.items())
        raise SystemExit(
            f"imagene bench: unknown --methods {unknown} for task {'+'.join(tasks)}. Valid names: {by_task}."
        )


def _encoder_help() -> str:
    from imagene.nn import list_image_encoders

    return encoder_help(list_image_encoders())


def _scale(text: str) -> tuple[str, float]:
    section, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return section, float(value)
    except ValueError:
        msg = f"--image-scale expects SECTION=VALUE (e.g. A1=0.2876); got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``imagene bench`` to ``parser``.

    Parameters
    ----------
    parser
        The (sub)parser.

    Returns
    -------
    Nothing.
    """
    parser.add_argument(
        "--task", default="expression", choices=[*TASKS, "all"], help="task to run (default: expression)"
    )
    parser.add_argument(
        "--data", default=None,
        help="folder of legacy-ST section folders (<S>/<S>.tsv.gz, <S>_selection.tsv, one H&E image); default: "
        "$IMAGENE_DATA_DIR/her2st when set, else the her2st sections downloaded from the authors' repository",
    )
    parser.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS),
                        help="sections for the expression and retrieval tasks (default: B4 C2 C3 C4)")
    parser.add_argument("--cluster-sections", nargs="+", default=list(DEFAULT_CLUSTER_SECTIONS),
                        help="sections with <S>_labeled_coordinates.tsv for the clustering task (default: A1)")
    parser.add_argument("--image-scale", type=_scale, action="append", default=[], metavar="SECTION=VALUE",
                        help="pixels of a section's image file per full-resolution pixel (repeatable)")
    parser.add_argument("--split", default="section", choices=["section", "patient"],
                        help="leave one section or one patient out (patients: obs 'patient' or the letter of a "
                        "her2st id, e.g. C for C2)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help=LazyHelp(_methods_help))
    parser.add_argument("--test-sections", nargs="+", default=None,
                        help="a fixed test set: fit once on the other --sections, score each of these (expression "
                        "and retrieval; default: leave each section out in turn)")
    parser.add_argument("--context", action="store_true",
                        help="also build the context features of context_ridge and umpire_context (tiles of 1, 2 "
                        "and 4 x --tile-um averaged over 4 flips, mean of the 6 nearest spots; cached like the tile "
                        "features)")
    parser.add_argument("--encoder", default="efficientnet_lite0", help=LazyHelp(_encoder_help))
    parser.add_argument("--tile-px", type=int, default=224, help="tile size in pixels (default: 224)")
    parser.add_argument("--tile-um", type=float, default=112.0, help="tile side in microns (default: 112)")
    parser.add_argument("--epochs", type=int, default=100, help="maximum training epochs (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--n-seeds", type=int, default=3, help="seeds of the clustering task (default: 3)")
    parser.add_argument("--out", default="imagene_bench", help="output folder (default: ./imagene_bench)")
    parser.add_argument("--cache", default=None, help="folder of cached tile features (default: <out>/cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _select(methods, names: Sequence[str] | None, task: str):
    if not names:
        return methods
    known = [m.name for m in methods]
    unknown = [n for n in names if n not in known]
    chosen = [m for m in methods if m.name in names]
    if not chosen:
        raise SystemExit(f"imagene bench: none of --methods {list(names)} runs in task {task!r}; choose from {known}.")
    if unknown:
        sys.stderr.write(f"imagene bench: skipping {unknown} in task {task!r} (methods there: {known})\n")
    return chosen


def run_command(args: argparse.Namespace) -> int:
    """Run ``imagene bench`` with parsed arguments; writes results and prints the tables.

    Parameters
    ----------
    args
        Parsed arguments (see :func:`add_arguments`).

    Returns
    -------
    The exit status.
    """
    from imagene._settings import settings

    previous = settings.progress_bar
    settings.progress_bar = not args.quiet
    try:
        return _run_command(args)
    finally:
        settings.progress_bar = previous  # the command leaves the global settings as it found them


def _run_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from imagene._version import __version__
    from imagene.bench._data import read_sections
    from imagene.bench._report import _markdown, per_fold_table, summarize, write_results
    from imagene.bench._runner import default_methods, run

    t_start = time.perf_counter()
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "cache"
    tasks = list(TASKS) if args.task == "all" else [args.task]
    scales = dict(args.image_scale)
    if args.data is not None and not Path(args.data).is_dir():
        raise SystemExit(f"imagene bench: --data {args.data} is not a folder.")
    check_methods(args.methods, tasks)  # a typo fails here, before any section is read or tiled
    common = {"encoder": args.encoder, "tile_px": args.tile_px, "tile_size_um": args.tile_um, "cache": cache,
              "show_progress_bar": not args.quiet}
    results, timings = {}, {}
    # expression and retrieval share folds: each method is fitted once per fold for both
    shared = tuple(t for t in tasks if t != "clustering")
    groups = [g for g in (shared, ("clustering",) if "clustering" in tasks else ()) if g]
    for group in groups:
        t0 = time.perf_counter()
        secs = tuple(args.cluster_sections if group == ("clustering",) else args.sections)
        own = {s: v for s, v in scales.items() if s in secs}
        context = args.context and group != ("clustering",)
        adata = read_sections(args.data, secs, image_scale=own, context=context, **common)
        timings[f"{'+'.join(group)}: read, tile, embed"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        methods = list({m.name: m for t in group for m in default_methods(t)}.values())
        methods = _select(methods, args.methods, "+".join(group))
        lacking = [m.name for m in methods if any(k not in adata.obsm for k in m.input_keys(f"X_he_{args.encoder}"))]
        if lacking:
            sys.stderr.write(f"imagene bench: skipping {lacking} (their context features are built with --context)\n")
            methods = [m for m in methods if m.name not in lacking] or methods
        seeds = [args.seed + i for i in range(args.n_seeds)] if group == ("clustering",) else [args.seed]
        dfs = run(
            adata, task=list(group), library_key="section", methods=methods, split=args.split, patient_key="patient",
            image_key=f"X_he_{args.encoder}", layer="counts", label_key="label", ignore_labels=("undetermined",),
            n_genes=50, min_detected=0.1, max_epochs=args.epochs, seeds=seeds, n_spot_folds=5, clustering_kwargs=None,
            test_sections=args.test_sections if group != ("clustering",) else None,
        )
        timings[f"{'+'.join(group)}: fit and score"] = round(time.perf_counter() - t1, 1)
        timings["+".join(group)] = round(time.perf_counter() - t0, 1)
        for task, df in dfs.items():
            results[task] = df
            sys.stdout.write(f"\n== {task}: per fold ==\n{_markdown(per_fold_table(df, task))}\n")
            sys.stdout.write(f"\n== {task}: mean ± std over folds ==\n{_markdown(summarize(df, task))}\n")
        sys.stdout.write(f"({' and '.join(group)}: {timings['+'.join(group)]:.0f} s)\n")
    config = {
        "data": str(Path(args.data).resolve()) if args.data else "her2st (ig.datasets.her2st: $IMAGENE_DATA_DIR or "
        "downloaded)",
        "sections": list(args.sections),
        "cluster_sections": list(args.cluster_sections),
        "split": args.split,
        "test_sections": list(args.test_sections) if args.test_sections else None,
        "context": bool(args.context),
        "encoder": args.encoder,
        "tile_px": args.tile_px,
        "tile_size_um": args.tile_um,
        "max_epochs": args.epochs,
        "seed": args.seed,
        "imagene_version": __version__,
        "seconds": {**timings, "total": round(time.perf_counter() - t_start, 1)},
    }
    written = write_results(results, out, config=config)
    sys.stdout.write("\n")
    print_timings({k: v for k, v in timings.items() if ":" in k})
    sys.stdout.write(f"Total {config['seconds']['total']:.0f} s. Outputs in {out}/:\n")
    for p in written.values():
        sys.stdout.write(f"  {p}\n")
    sys.stdout.write(f"Cached tile features in {cache}/\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m imagene.bench`` (the same options as ``imagene bench``).

    Parameters
    ----------
    argv
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    The exit status.

    Examples
    --------
    >>> imagene.bench.main(["--task", "expression", "--data", "../shared/data/her2st"])
    """
    parser = argparse.ArgumentParser(prog="python -m imagene.bench", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
