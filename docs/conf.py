"""Sphinx configuration of the imagene documentation (scverse cookiecutter layout).

Build with ``pip install -e ".[doc]"`` then ``sphinx-build -W -b html docs docs/_build/html``
(``tests/test_docs_build.py`` runs the same build). Notebooks under ``docs/tutorials`` (a symlink
to ``../tutorials``) are rendered with their stored outputs; they are not executed during the build
(``nb_execution_mode = "off"``). Without a network connection the intersphinx inventories that
cannot be reached are left out (links to those projects' pages become plain text) instead of
failing a ``-W`` build; set ``IMAGENE_DOCS_OFFLINE=1`` to skip them all.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from datetime import datetime
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path

HERE = Path(__file__).parent
# a source checkout documents itself even when the package is not installed
sys.path.insert(0, str(HERE.parent / "src"))

# -- Project information -----------------------------------------------------

project = "imagene"
try:
    info = metadata(project)
    author = info.get("Author") or "imagene developers"
    release = info["Version"]
except PackageNotFoundError:  # running from a source checkout without installing
    author = "imagene developers"
    release = "0.1.0"
copyright = f"{datetime.now():%Y}, {author}"
version = release

templates_path = ["_templates"]
html_static_path = ["_static"]
master_doc = "index"
default_role = "literal"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "tutorials/README.md"]
pygments_style = "default"

# -- General configuration ---------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",  # after napoleon, as its documentation asks
]

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": False}

# numpydoc-style docstrings (the house style) parsed by napoleon
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # "Attributes" sections as field lists (settings documents its attributes this way)
napoleon_custom_sections = [("Params", "Parameters")]
typehints_defaults = "braces"
always_document_param_types = True

myst_heading_anchors = 6
myst_enable_extensions = [
    "amsmath",
    "colon_fence",
    "deflist",
    "dollarmath",
    "html_image",
    "html_admonition",
]
myst_url_schemes = ("http", "https", "mailto")

# notebooks are committed with their outputs and rendered as they are
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "remove"
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "scvi-tools": ("https://docs.scvi-tools.org/en/stable/", None),
}
intersphinx_timeout = 10


def _fetch_inventories(mapping: dict, timeout: float = 5.0) -> dict:
    """Download every project's ``objects.inv`` at once; the mapping of those that came, read from local copies.

    A project whose inventory cannot be fetched (no network, a proxy, the site down) is left out,
    so its links become plain text instead of a warning that fails a ``-W`` build.
    """
    import tempfile
    import urllib.request

    folder = Path(tempfile.mkdtemp(prefix="imagene_intersphinx_"))
    fetched: dict = {}

    def fetch(name: str, url: str) -> None:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/objects.inv", timeout=timeout) as r:
                data = r.read()
        except Exception:  # noqa: BLE001 - any failure means: leave this inventory out
            return
        if data.startswith(b"# Sphinx inventory version"):
            path = folder / f"{name}.inv"
            path.write_bytes(data)
            fetched[name] = (url, str(path))

    threads = [threading.Thread(target=fetch, args=(n, u), daemon=True) for n, (u, _) in mapping.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 1.0)
    missing = sorted(set(mapping) - set(fetched))
    if missing:
        print(f"imagene docs: intersphinx inventories not reachable, left out: {', '.join(missing)}")
    return dict(fetched)


if os.environ.get("IMAGENE_DOCS_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
    intersphinx_mapping = {}
else:
    intersphinx_mapping = _fetch_inventories(intersphinx_mapping)

# -- Options for HTML output -------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "imagene"
html_theme_options = {"navigation_with_keys": False}

nitpicky = False  # external types in signatures (torch, scvi) are linked where intersphinx knows them

# -- Class pages list the members imagene defines ----------------------------
# Members inherited from torch, Lightning or scvi-tools are documented on those projects' pages
# (their docstrings use roles this build does not know); the few scvi-tools model methods users
# call directly are kept.

_KEEP_INHERITED = {"save", "history", "is_trained", "view_anndata_setup"}


def _own_members() -> dict[str, list[str]]:
    import importlib
    import inspect
    import pkgutil

    import imagene

    subpackages = [m.name for m in pkgutil.iter_modules(imagene.__path__) if m.ispkg and not m.name.startswith("_")]
    own: dict[str, list[str]] = {}
    for sub in subpackages:
        mod = importlib.import_module(f"imagene.{sub}")
        for name in getattr(mod, "__all__", []):
            cls = getattr(mod, name)
            if not inspect.isclass(cls):
                continue
            keep = []
            for member in dir(cls):
                owner = next((c for c in cls.__mro__ if member in vars(c)), None)
                if owner is None:
                    continue
                if member in _KEEP_INHERITED and owner is not object:
                    keep.append(member)
                elif owner.__module__.startswith("imagene"):
                    # an override without its own docstring (a Lightning hook) would show the
                    # parent's, written in roles this build does not know
                    attr = vars(owner)[member]
                    if callable(attr) and not getattr(attr, "__doc__", None):
                        continue
                    keep.append(member)
            own[f"imagene.{sub}.{name}"] = keep
    return own


autosummary_context = {"imagene_members": _own_members()}


# -- Autosummary: a one-line summary never cuts an inline literal in two ------
# autosummary ends a summary at the first ". ", even inside ``...`` (the check it makes parses
# the whole paragraph, not the cut sentence): "``"<SYMBOL>: <name>. Aliases ...``" became an
# unclosed literal. Extend such a summary to the end of its sentence after the literal closes.


def _patch_autosummary() -> None:
    import re

    from sphinx.ext import autosummary

    original = autosummary.extract_summary

    def extract_summary(doc, settings):
        summary = original(doc, settings)
        if summary.count("``") % 2 == 0:
            return summary
        text = " ".join(line.strip() for line in doc if line.strip())
        closed = text.find("``", text.find(summary.rstrip(".")) + len(summary.rstrip(".")))
        if closed < 0:
            return summary
        end = re.search(r"\.(\s|$)", text[closed + 2 :])
        return text[: closed + 2 + (end.start() + 1 if end else len(text))].strip()

    autosummary.extract_summary = extract_summary


_patch_autosummary()

# sphinx-autodoc-typehints calls a Sphinx API that Sphinx 10 removes: a Python warning per page,
# not a documentation problem
warnings.filterwarnings("ignore", message=".*set_application' is deprecated", module="sphinx_autodoc_typehints")
