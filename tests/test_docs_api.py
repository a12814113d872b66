"""The API page (docs/api.md) and the subpackages' ``__all__`` must agree, so the docs cannot drift.

Fast and needs no documentation dependencies: docs/api.md is parsed as text.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import imagene

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"

#: public subpackages whose every ``__all__`` name must be on the API page
SUBPACKAGES = ("io", "pp", "tl", "pl", "model", "metrics", "datasets", "nn", "data", "module", "train", "bench")

_BLOCK = re.compile(r"```\{eval-rst\}\n(.*?)```", re.S)


def _documented() -> list[tuple[str, str]]:
    """``(currentmodule, entry)`` for every autosummary entry of docs/api.md, in page order."""
    entries = []
    for block in _BLOCK.findall(API_MD.read_text(encoding="utf-8")):
        current = "imagene"
        in_summary = False
        for line in block.splitlines():
            stripped = line.strip()
            if stripped.startswith(".. currentmodule::"):
                current = stripped.split("::", 1)[1].strip()
                in_summary = False
            elif stripped.startswith(".. autosummary::"):
                in_summary = True
            elif in_summary and line.startswith((" ", "\t")) and stripped and not stripped.startswith(":"):
                entries.append((current, stripped.lstrip("~")))
            elif stripped.startswith(".. "):
                in_summary = False
    return entries


def _resolve(current: str, entry: str):
    """Import ``current.entry`` the way autosummary does: longest importable module prefix, then attributes."""
    parts = f"{current}.{entry}".split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError names the missing piece
        return obj
    raise ImportError(f"Cannot import any prefix of {current}.{entry}")


def test_api_page_parses_into_entries():
    entries = _documented()
    # one entry per __all__ name plus `settings`: far more than a handful, so the parser found the blocks
    assert len(entries) >= 30, entries
    dotted = [f"{c}.{e}" for c, e in entries]
    duplicates = sorted({d for d in dotted if dotted.count(d) > 1})
    assert not duplicates, f"Listed more than once in docs/api.md: {duplicates}"


def test_every_documented_name_resolves_and_has_a_docstring():
    missing, undocumented = [], []
    for current, entry in _documented():
        try:
            obj = _resolve(current, entry)
        except (ImportError, AttributeError) as e:
            missing.append(f"{current}.{entry} ({e})")
            continue
        if not (inspect.getdoc(obj) or "").strip():
            undocumented.append(f"{current}.{entry}")
    assert not missing, f"docs/api.md lists names that do not exist: {missing}"
    assert not undocumented, f"docs/api.md lists names without a docstring: {undocumented}"


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_every_public_name_is_documented(sub):
    mod = importlib.import_module(f"imagene.{sub}")
    public = getattr(mod, "__all__", None)
    assert public, f"imagene.{sub} has no __all__; list its public names there"
    documented = {f"{c}.{e}" for c, e in _documented()}
    absent = [n for n in public if f"imagene.{sub}.{n}" not in documented]
    assert not absent, f"imagene.{sub}.__all__ names missing from docs/api.md: {absent} (add `{sub}.<name>` there)"


def test_documented_names_are_public():
    # a name listed under a subpackage but dropped from its __all__ is stale
    stale = []
    for current, entry in _documented():
        full = f"{current}.{entry}"
        for sub in SUBPACKAGES:
            prefix = f"imagene.{sub}."
            if full.startswith(prefix) and full[len(prefix) :] not in importlib.import_module(f"imagene.{sub}").__all__:
                stale.append(full)
    assert not stale, f"docs/api.md lists names not in their subpackage's __all__: {stale}"


def test_settings_is_documented():
    assert ("imagene", "settings") in _documented()


def test_every_public_subpackage_has_an_api_section():
    # a new public subpackage (a folder with __init__.py under src/imagene) must get a section on the page
    subs = {m.name for m in pkgutil.iter_modules(imagene.__path__) if m.ispkg and not m.name.startswith("_")}
    documented_subs = {f"{c}.{e}".split(".")[1] for c, e in _documented() if f"{c}.{e}".count(".") >= 2}
    assert subs <= documented_subs, (
        f"Subpackages without an API section in docs/api.md: {sorted(subs - documented_subs)}"
    )
    assert set(SUBPACKAGES) <= subs
