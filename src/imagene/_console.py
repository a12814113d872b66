"""Console helpers shared by the commands (``imagene demo``, ``imagene bench``, ``imagene predict``).

A core module: argparse help that is computed only when printed, the ``--encoder`` help text and
the per-step timing lines, used by :mod:`imagene._cli` and :mod:`imagene.bench` alike.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence


class LazyHelp(str):
    """A help text computed only when help is printed (the names it lists need heavy imports)."""

    def __new__(cls, make: Callable[[], str]) -> LazyHelp:
        obj = super().__new__(cls, "...")
        obj.make = make
        return obj


class HelpFormatter(argparse.HelpFormatter):
    """Expands :class:`LazyHelp` texts."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help
        return text.make() if isinstance(text, LazyHelp) else super()._get_help_string(action)


def encoder_help(names: Sequence[str]) -> str:
    """Help text of ``--encoder``: the registered names and the other forms accepted.

    Parameters
    ----------
    names
        The registered image encoders (:func:`imagene.nn.list_image_encoders`; passed in, since
        this core module imports nothing above it).

    Returns
    -------
    The help text (``%(default)s`` is filled in by argparse).

    Examples
    --------
    >>> LazyHelp(lambda: encoder_help(imagene.nn.list_image_encoders()))
    """
    return (
        f"image encoder (default: %(default)s): one of {', '.join(names)}; any timm model name; "
        "'local-dir:/path/to/folder' (timm config.json + weights); see docs/encoders.md"
    )


def print_timings(timings: Mapping[str, float], *, stream=None) -> None:
    """Write one line per step, ``name  seconds``, in the order of ``timings``.

    Parameters
    ----------
    timings
        Seconds by step name (a trailing ``'_s'`` is dropped from names).
    stream
        Where to write (default: standard output).

    Returns
    -------
    Nothing.
    """
    stream = sys.stdout if stream is None else stream
    width = max((len(k.removesuffix("_s")) for k in timings), default=0)
    stream.write("Time per step:\n")
    for name, seconds in timings.items():
        stream.write(f"  {name.removesuffix('_s'):<{width}}  {float(seconds):8.1f} s\n")
