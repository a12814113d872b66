from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests
os.environ.setdefault("MPLBACKEND", "Agg")

#: real published data beside the checkout (../shared/data); see its README
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.fail(f"Real test data not found at {DATA}; the checkout must sit beside shared/.")
    return DATA


@pytest.fixture(autouse=True)
def _synchronous_dask():
    """DataLoader workers forked after dask ran can deadlock: keep dask synchronous in tests."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield
