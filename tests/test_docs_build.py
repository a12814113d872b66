"""The documentation builds with ``sphinx-build -W`` (no warnings), offline, with the tutorials and the full API.

The ``test`` extra installs the doc packages, so CI runs this; it is skipped only where Sphinx is
missing. Intersphinx is switched off (``IMAGENE_DOCS_OFFLINE=1``) so the result does not depend on
the network; notebooks are rendered from their stored outputs, never executed.
"""

from __future__ import annotations

import html as html_text
import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    for needed in ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx_autodoc_typehints"):
        try:
            importlib.import_module(needed)
        except ImportError:
            pytest.skip(f"{needed} is not installed: `pip install -c requirements/constraints.txt -e '.[doc]'` "
                        "to build the documentation")
    out = tmp_path_factory.mktemp("docs")
    env = {**os.environ, "IMAGENE_DOCS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg",
           "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(ROOT / "docs"),
         str(out / "html"), "-d", str(out / "doctrees")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stderr[-5000:]}"
    return out / "html", seconds, proc


def test_docs_build_without_warnings(built):
    html, seconds, proc = built
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    assert seconds < 300, f"the docs build took {seconds:.0f} s"
    assert not (ROOT / "docs" / "jupyter_execute").exists()  # nothing was executed


def test_docs_include_the_tutorials_with_their_outputs(built):
    html, _, _ = built
    notebooks = sorted(p.stem for p in (ROOT / "tutorials").glob("*.ipynb"))
    assert notebooks, "no tutorials found"
    for name in notebooks:
        page = html / "tutorials" / f"{name}.html"
        assert page.is_file(), f"tutorial {name} is not in the docs"
    # the quickstart is stored executed: its figures are on its page
    assert "<img" in (html / "tutorials" / "01_quickstart.html").read_text(encoding="utf-8")
    assert "tutorials/01_quickstart.html" in (html / "tutorials.html").read_text(encoding="utf-8")


def test_api_pages_cover_every_public_name(built):
    html, _, _ = built
    import imagene

    missing = []
    for sub in ("io", "pp", "tl", "pl", "model", "metrics", "datasets", "nn", "data", "module", "train", "bench"):
        mod = importlib.import_module(f"imagene.{sub}")
        for name in mod.__all__:
            if not (html / "generated" / f"imagene.{sub}.{name}.html").is_file():
                missing.append(f"imagene.{sub}.{name}")
    assert not missing, f"API pages not built: {missing}"
    assert imagene.__version__ in (html / "index.html").read_text(encoding="utf-8")
    api = html_text.unescape(re.sub(r"<[^>]+>", "", (html / "api.html").read_text(encoding="utf-8")))
    # the gene_descriptions summary is whole (it used to stop inside an inline literal, at "<name>.")
    assert "Text description of each gene, for zero-shot models." in api
    assert (html / "encoders.html").is_file()
