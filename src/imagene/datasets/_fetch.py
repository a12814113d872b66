"""Download published data from its original source into a local cache (pooch, checked by SHA-256)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger("imagene")

#: environment variable naming the download cache (default: the user cache folder of ``imagene``)
CACHE_ENV = "IMAGENE_CACHE_DIR"
#: environment variable naming a local folder of datasets (``<dir>/her2st``, ``<dir>/mouse_olfactory_bulb``)
DATA_ENV = "IMAGENE_DATA_DIR"


class RemoteFile(NamedTuple):
    """One file of a published dataset: where it lies in the source repository, its name, its hash."""

    remote: str  # path relative to the source's base URL
    name: str  # file name in the local section folder
    sha256: str


def default_cache_dir() -> Path:
    """Cache folder of downloaded datasets: ``$IMAGENE_CACHE_DIR``, else the user cache of ``imagene``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("imagene"))


def local_dataset_dir(dataset: str) -> Path | None:
    """``$IMAGENE_DATA_DIR/<dataset>`` when that variable is set and the folder exists, else ``None``."""
    env = os.environ.get(DATA_ENV)
    if not env:
        return None
    folder = Path(env).expanduser() / dataset
    if not folder.is_dir():
        raise FileNotFoundError(
            f"${DATA_ENV} is set to {env!r} but {folder} does not exist. Point ${DATA_ENV} to a folder holding "
            f"'{dataset}/', pass `path=` explicitly, or unset ${DATA_ENV} to download the data."
        )
    return folder


def fetch(
    files: Mapping[str, RemoteFile],
    *,
    base_url: str,
    folder: Path,
    homepage: str,
    layout_hint: str,
    show_progress_bar: bool = True,
) -> dict[str, Path]:
    """Download ``files`` (role → :class:`RemoteFile`) from ``base_url`` into ``folder``; reuse cached copies.

    Each file is verified against its SHA-256 hash (pooch); a cached file with the right hash is not
    downloaded again. Network failures raise :class:`ConnectionError` naming the URL, the page to get
    the data by hand and the ``path=`` argument; a hash mismatch raises :class:`ValueError`.
    """
    import pooch
    import requests

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for role, f in files.items():
        url = base_url.rstrip("/") + "/" + f.remote.lstrip("/")
        try:
            path = pooch.retrieve(
                url, known_hash=f"sha256:{f.sha256}", fname=f.name, path=folder, progressbar=show_progress_bar
            )
        except requests.exceptions.RequestException as err:
            raise ConnectionError(
                f"Could not download {url} ({type(err).__name__}: {err}). Without a network connection, get the "
                f"files from {homepage} yourself and pass `path=` to a local copy ({layout_hint})."
            ) from err
        except ValueError as err:
            if "hash" not in str(err).lower():
                raise
            raise ValueError(
                f"The file downloaded from {url} is not the published one (SHA-256 mismatch: {err}). The source "
                f"may have changed or the download was corrupted; nothing was kept. Retry, or get the files from "
                f"{homepage} and pass `path=`."
            ) from err
        out[role] = Path(path)
    logger.debug("Dataset files in %s: %s", folder, sorted(p.name for p in out.values()))
    return out
