from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests
os.environ.setdefault("MPLBACKEND", "Agg")

#: real published data: ``$IMAGENE_DATA_DIR``, else a ``shared/data`` folder beside the checkout
_BESIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = Path(os.environ["IMAGENE_DATA_DIR"]) if os.environ.get("IMAGENE_DATA_DIR") else _BESIDE
#: set by CI: a test that needs the real data fails instead of being skipped when the data is missing
REQUIRE_DATA = os.environ.get("IMAGENE_REQUIRE_DATA") == "1"
#: tutorials and ``imagene.datasets`` read ``$IMAGENE_DATA_DIR/<dataset>`` instead of downloading
if DATA.is_dir():
    os.environ.setdefault("IMAGENE_DATA_DIR", str(DATA))


def require_data() -> Path:
    """The folder of real data, or skip the calling test (fail it when ``IMAGENE_REQUIRE_DATA=1``, as in CI)."""
    if not DATA.is_dir():
        msg = (
            f"real data not found at {DATA}: set IMAGENE_DATA_DIR to a folder with her2st/, mouse_olfactory_bulb/, "
            "... (the project's shared/data)"
        )
        if REQUIRE_DATA:
            pytest.fail(msg + " (IMAGENE_REQUIRE_DATA=1: CI must run every real-data test)")
        pytest.skip(msg)
    return DATA


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the real published sections (see ``require_data``)."""
    return require_data()


@pytest.fixture(autouse=True)
def _synchronous_dask():
    """DataLoader workers forked after dask ran can deadlock: keep dask synchronous in tests."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


#: sections of the checks' path (every section of ../shared/data/her2st with a full-size H&E)
CHECK_PATH_SECTIONS = ("B4", "C2", "C3", "C4")


def _build_check_path(data_dir: Path):
    """The path the issues' checks call, with the foundation's defaults, on real her2st sections.

    Each section is read by ``read_legacy_st``, tiled and embedded with the defaults
    (112 µm tiles at 224 px, EfficientNet-Lite0), the sections are joined with ``obs['section']``
    and given niches by ``pp.niches(n_neighs=6, library_key='section')``.
    Set ``IMAGENE_TEST_CACHE`` to a folder to keep the result between runs while developing.
    """
    import anndata as ad

    import imagene as ig

    cache_dir = os.environ.get("IMAGENE_TEST_CACHE")
    cache = Path(cache_dir) / "check_path.h5ad" if cache_dir else None
    if cache is not None and cache.exists():
        return ad.read_h5ad(cache)
    parts = {}
    for s in CHECK_PATH_SECTIONS:
        folder = data_dir / "her2st" / s
        image = next(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png", ".tif"))
        a = ig.io.read_legacy_st(folder / f"{s}.tsv.gz", folder / f"{s}_selection.tsv", image, library_id=s)
        ig.pp.extract_tiles(a, show_progress_bar=False)
        ig.pp.embed_tiles(a, show_progress_bar=False)
        del a.obsm["imagene_tiles"]
        parts[s] = a
    adata = ig.io.concat(parts, library_key="section")
    ig.pp.niches(adata, n_neighs=6, library_key="section")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(cache)
    return adata


@pytest.fixture(scope="session")
def _check_path_adata(data_dir):
    return _build_check_path(data_dir)


@pytest.fixture
def check_path_adata(_check_path_adata):
    """A fresh copy of the checks' path AnnData (B4, C2, C3, C4; see ``_build_check_path``)."""
    return _check_path_adata.copy()


@pytest.fixture(scope="session")
def tiny_he_st():
    """Factory of synthetic H&E + ST sections with features of the ``tiny`` encoder in ``obsm['X_he_tiny']``.

    ``make(tile_px=32, tile_size_um=24, **synthetic_he_st_kwargs)``; the tiles themselves are dropped.
    """
    import imagene as ig

    def make(*, tile_px: int = 32, tile_size_um: float = 24, **kwargs):
        a = ig.datasets.synthetic_he_st(**kwargs)
        ig.pp.extract_tiles(a, tile_size_um=tile_size_um, tile_px=tile_px, show_progress_bar=False)
        ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False)
        del a.obsm["imagene_tiles"]
        return a

    return make
