"""The package's layering, checked by parsing every import in ``src/imagene`` (function-local ones included).

The layers and what each owns are described in ``docs/architecture.md``; this module is the
executable form of that page: a new import that points upward, reaches into another
subpackage's private module or makes a model file outgrow its budget fails here, with the
file and line to fix.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "imagene"

# bottom to top: a module may import its own layer and the layers below it, never above
LAYERS: list[set[str]] = [
    {"_console", "_constants", "_settings", "_utils", "_validate", "_version"},  # core helpers, no science
    {"metrics", "io", "nn"},  # numbers from arrays; readers; torch blocks (no AnnData)
    {"datasets"},  # published and synthetic data, read through io
    {"pp"},  # every input a model needs, written to documented AnnData keys
    {"data", "train"},  # batching of those inputs; the one training path
    {"module"},  # each model's torch module, built from nn
    {"model"},  # AnnData-facing models: setup_anndata / train / latents / prediction
    {"tl"},  # results written back into AnnData
    {"bench"},  # the harness
    {"pl"},  # plots (of data, models and benchmark tables)
    {"_demo", "_predict", "_cli", "__main__", "__init__"},  # applications and the package root
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
PRIVATE_OWNERS = ("pp", "nn")  # nobody outside these subpackages imports their private modules
MAX_MODEL_LINES = 450


def _unit(path: Path) -> str:
    """The layer unit of a source file: its subpackage, or its module name at the top level."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path):
    """``(line, imported module)`` for every absolute import of imagene in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "imagene":  # from imagene import pp, settings, ...
                for alias in node.names:
                    yield node.lineno, f"imagene.{alias.name}"
            else:
                yield node.lineno, node.module


def _edges():
    for path in sorted(SRC.rglob("*.py")):
        src = _unit(path)
        for line, target in _imports(path):
            parts = target.split(".")
            if parts[0] != "imagene":
                continue
            yield path, line, src, parts


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in SRC.rglob("*.py")}
    missing = sorted(units - set(RANK))
    assert not missing, f"add {missing} to LAYERS here and to docs/architecture.md"


def test_no_upward_import():
    bad = []
    for path, line, src, parts in _edges():
        if len(parts) == 1:
            if src not in LAYERS[-1]:
                bad.append(f"{path.relative_to(SRC)}:{line} imports the package root")
            continue
        target = parts[1]
        if target in ("settings", "__version__"):  # re-exported at the root from core modules
            continue
        if target in RANK and src in RANK and RANK[target] > RANK[src]:
            bad.append(f"{path.relative_to(SRC)}:{line} ({src}) imports imagene.{target}, a layer above")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_import_across_subpackages():
    bad = []
    for path, line, src, parts in _edges():
        if len(parts) >= 3 and parts[1] in PRIVATE_OWNERS and parts[2].startswith("_") and src != parts[1]:
            bad.append(f"{path.relative_to(SRC)}:{line} imports {'.'.join(parts)}")
    assert not bad, "use the public name from imagene.pp / imagene.nn instead:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", sorted((SRC / "model").glob("*.py")), ids=lambda p: p.name)
def test_model_files_stay_small(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n < MAX_MODEL_LINES, f"{path.name} has {n} lines: move inputs to pp / data and training to train"


def test_the_checker_sees_a_violation(tmp_path):
    """The parser itself: an upward, function-local import is found (guards against a checker that sees nothing)."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from imagene.model import UMPIRE\n    import imagene as ig\n")
    found = list(_imports(src))
    assert found == [(2, "imagene.model"), (3, "imagene")]


def _python_blocks(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_the_add_a_model_example_runs():
    """The example of docs/architecture.md, verbatim: a model from the shared parts trains, embeds and predicts."""
    import numpy as np

    import imagene

    model_block, use_block = _python_blocks(SRC.parents[1] / "docs" / "architecture.md")[:2]
    assert len(model_block.strip().splitlines()) <= 6, "the example stays a five-line model"
    adata = imagene.datasets.synthetic_he_st(n_obs=240, n_vars=40, n_sections=3, image_px=256, seed=0)
    imagene.pp.extract_tiles(adata, tile_size_um=24, tile_px=32, show_progress_bar=False)
    imagene.pp.embed_tiles(adata, encoder="tiny", show_progress_bar=False)
    adata.obsm["X_he_efficientnet_lite0"] = adata.obsm.pop("X_he_tiny")  # the example's key, tiny features
    del adata.obsm["imagene_tiles"]
    query = adata[adata.obs["section"] == "S2"].copy()
    adata = adata[adata.obs["section"] != "S2"].copy()
    namespace = {"imagene": imagene, "adata": adata, "query": query}
    imagene.settings.seed = 0
    exec(model_block, namespace)  # noqa: S102 - the documented example itself
    exec(use_block.replace("model.train(max_epochs=5)",  # noqa: S102
                           "model.train(max_epochs=5, accelerator='cpu', enable_progress_bar=False)"), namespace)
    model = namespace["model"]
    assert isinstance(model, imagene.model.AlignmentMixin) and model.is_trained
    assert model.module.image_tower is not None
    z = model.get_latent_representation(query, modality="image")
    assert z.shape == (query.n_obs, 32)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert "imagene_predicted" in query.layers and np.isfinite(query.layers["imagene_predicted"]).all()
