"""Spot and niche inputs (ST-Align): small spot tiles, features of niche tiles, the niche graph and mean counts."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import get_counts, save_key, warn
from imagene.pp._features import encode_tiles, resolve_device
from imagene.pp._library import resolve_libraries
from imagene.pp._niches import niche_mean_operator, niches
from imagene.pp._tiles import _source_for, extract_tiles

logger = logging.getLogger("imagene")


class SectionCache:
    """Bounded cache of per-section spot tiles and niche-tile features (and of one frozen encoder).

    Benchmark folds, ablations and query AnnDatas prepare the same sections again and again;
    :func:`spot_niche_inputs` looks each section up here before cutting and encoding its tiles.
    An entry is keyed by the image (its description), the section, the tile geometry, the encoder
    and a hash of the spot centres, so a different image, geometry or set of spots is computed
    anew. The least recently used entries are dropped beyond ``max_items``.

    Parameters
    ----------
    max_items
        Sections (spot tiles and niche features counted separately) kept at most.

    Examples
    --------
    >>> cache = imagene.pp.SectionCache(max_items=8)
    >>> imagene.pp.spot_niche_inputs(adata, cache=cache)
    >>> imagene.pp.SectionCache.default().clear()  # free what the shared cache holds
    """

    _default: ClassVar[SectionCache | None] = None

    def __init__(self, max_items: int = 64) -> None:
        self.max_items = int(max_items)
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._encoders: dict[str, Any] = {}

    @classmethod
    def default(cls) -> SectionCache:
        """The process-wide cache that :func:`spot_niche_inputs` uses with ``cache=True`` (64 entries)."""
        if cls._default is None:
            cls._default = cls(64)
        return cls._default

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The value stored under ``key``, computed by ``compute()`` (and stored) when absent."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = compute()
        self._items[key] = value
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return value

    def encoder(self, name: str) -> Any:
        """The frozen image encoder ``name`` (:func:`imagene.nn.get_image_encoder`); only the last one is kept."""
        if name not in self._encoders:
            from imagene.nn import get_image_encoder

            self._encoders.clear()
            self._encoders[name] = get_image_encoder(name)
        return self._encoders[name]

    def clear(self) -> None:
        """Drop every entry and the encoder."""
        self._items.clear()
        self._encoders.clear()


def _light_copy(adata: AnnData, obs_cols: Sequence[str]) -> AnnData:
    """An AnnData with only what tiling and niche graphs read (spots, sections, uns['spatial'])."""
    obs = adata.obs[[c for c in obs_cols if c in adata.obs]].copy()
    light = AnnData(obs=obs, obsm={KEYS.SPATIAL: np.asarray(adata.obsm[KEYS.SPATIAL])})
    light.uns["spatial"] = adata.uns.get("spatial", {})
    return light


def _niche_graph(adata: AnnData, niche_key: str, library_key: str | None, n_neighs: int) -> tuple[sp.csr_matrix, dict]:
    """The niche connectivities of ``adata`` (from obsp, or built by :func:`niches`) and the obsp/uns values built."""
    key = f"{niche_key}_connectivities"
    if key in adata.obsp:
        return sp.csr_matrix(adata.obsp[key]), {}
    if KEYS.SPATIAL not in adata.obsm:
        raise KeyError(
            f"adata.obsp[{key!r}] and adata.obsm['spatial'] not found: the niche graph cannot be built. "
            "Run `imagene.pp.niches(adata)` or store the spot centres in obsm['spatial']."
        )
    lib_key, _ = resolve_libraries(adata, library_key)
    light = _light_copy(adata, [lib_key] if lib_key else [])
    niches(light, n_neighs=n_neighs, library_key=lib_key, niche_expression=False, key_added=niche_key)
    built = {("obsp", k): light.obsp[k] for k in (key, f"{niche_key}_distances")}
    built["uns", f"{niche_key}_neighbors"] = light.uns[f"{niche_key}_neighbors"]
    return sp.csr_matrix(light.obsp[key]), built


def _section_image(adata: AnnData, lib: str, image: Any):
    """(image array, image px per full-resolution px, microns per full-resolution px, description)."""
    img, scale, desc = _source_for(adata, lib, image)
    mpp = adata.uns.get("spatial", {}).get(lib, {}).get("scalefactors", {}).get("microns_per_pixel")
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(
            f"Microns per pixel unknown for section {lib!r}: set "
            f"adata.uns['spatial'][{lib!r}]['scalefactors']['microns_per_pixel'] (imagene.io readers do)."
        )
    return img, float(scale), float(mpp), desc


def _neighbour_distance_um(xy: np.ndarray, mpp: float, k: int = 3) -> float:
    """Median distance (µm) of the spots to their ``k``-th nearest spot."""
    from scipy.spatial import cKDTree

    if len(xy) <= k:
        return 0.0
    dist, _ = cKDTree(xy).query(xy, k=k + 1)
    return float(np.median(dist[:, k]) * mpp)


def _tiles(img: Any, xy: np.ndarray, scale: float, mpp: float, size_um: float, px: int) -> np.ndarray:
    """Tiles of ``size_um`` µm at ``px`` px around ``xy`` (full-resolution px), cut by :func:`extract_tiles`."""
    light = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(xy))]), obsm={KEYS.SPATIAL: xy * scale})
    extract_tiles(
        light, tile_size_um=size_um, tile_px=int(px), image=img, microns_per_pixel=mpp / scale, check_scale=False,
        library_key=None, key_added="tiles", show_progress_bar=False,
    )
    return np.asarray(light.obsm["tiles"])


def spot_niche_inputs(
    adata: AnnData,
    *,
    image_key: str = "X_he_efficientnet_lite0",
    layer: str | None = KEYS.COUNTS,
    library_key: str | None = None,
    niche_key: str = KEYS.NICHE,
    spot_tiles_key: str = KEYS.SPOT_TILES,
    key_added: str | None = None,
    niche_encoder: str = "efficientnet_lite0",
    niche_graph: bool = True,
    spot_tiles: bool = True,
    niche_features: bool = True,
    niche_expression: bool = True,
    counts: Any = None,
    spot_tile_size_um: float = 112.0,
    spot_tile_px: int = 28,
    niche_tile_size_um: float | None = None,
    niche_tile_px: int = 128,
    n_niche_neighs: int = 3,
    image: Any = None,
    inplace: bool = True,
    cache: bool | SectionCache = True,
) -> dict[str, Any]:
    """Build the spot- and niche-level inputs of :class:`imagene.model.STAlign` that ``adata`` lacks.

    What is already stored is used as it is; what is missing is computed, everything before
    anything is written (an error leaves ``adata`` unchanged):

    - the niche graph (:func:`imagene.pp.niches` with ``n_niche_neighs`` neighbours, the paper's 3);
    - the niche-averaged counts of ``layer`` (``niche_expression``);
    - small uint8 spot tiles of ``spot_tile_size_um`` µm at ``spot_tile_px`` px (``spot_tiles``,
      cut by :func:`imagene.pp.extract_tiles`);
    - frozen features (encoder ``niche_encoder``) of a niche tile of ``niche_tile_size_um`` µm around
      each spot at ``niche_tile_px`` px (``niche_features``). The default size is twice the median
      distance to the 3rd nearest spot plus ``spot_tile_size_um``, so that the tile covers the spot
      and its 3 nearest neighbours (512 µm on legacy ST).

    Images come from ``image`` or from each section's ``uns['spatial']`` entry, as for
    :func:`imagene.pp.extract_tiles`. When no image can be reached, a warning is issued, no spot
    tiles are cut and the niche features are the niche mean of ``obsm[image_key]``.

    Parameters
    ----------
    adata
        Spots with centres in ``obsm['spatial']`` (full-resolution pixels) and, for the fallback,
        frozen spot features in ``obsm[image_key]``.
    image_key
        ``obsm`` key of frozen spot-tile features (used only when no image can be reached).
    layer
        Layer with raw counts averaged over each niche (``None`` for ``X``).
    library_key
        ``obs`` column of sections (:func:`imagene.pp.resolve_libraries`; ``None`` infers it).
        Niches never cross sections.
    niche_key
        Prefix of the niche graph keys (``key_added`` of :func:`imagene.pp.niches`).
    spot_tiles_key
        ``obsm`` / ``uns`` key of the spot tiles.
    key_added
        ``obsm`` / ``uns`` key of the niche-tile features (default ``'X_he_niche_<niche_encoder>'``).
    niche_encoder
        Frozen image encoder of the niche tiles (:func:`imagene.nn.get_image_encoder` name).
    niche_graph, spot_tiles, niche_features, niche_expression
        Which inputs to look up, or build when missing (the niche graph is also built when an
        input needs it).
    counts
        ``(n_obs, n_genes)`` counts to average over each niche instead of ``layer`` (e.g. counts
        matched to a model's genes); their niche mean is returned as ``'niche_mean'``, never written.
    spot_tile_size_um, spot_tile_px
        Geometry of the spot tiles.
    niche_tile_size_um, niche_tile_px
        Geometry of the niche tiles (``None``: the default size above).
    n_niche_neighs
        Neighbours of a niche when the graph is built here.
    image
        Full-resolution image(s) to cut tiles from (an array / path, or a dict by section).
    inplace
        Write what was built into ``adata``. ``False`` leaves ``adata`` unchanged and only returns it.
    cache
        ``True``: look sections up in :meth:`SectionCache.default`; ``False``: compute everything;
        or a :class:`SectionCache` of your own.

    Returns
    -------
    A dict with ``'connectivities'`` (the niche graph, CSR; ``None`` when not needed),
    ``'n_niche_neighs'`` (its neighbours per spot), ``'niche_tile_size_um'`` (the niche tile size
    used, or the stored one), ``'spot_tiles'`` and ``'niche_features'`` (stored or built; ``None``
    when not asked for or when no tiles could be cut), ``'niche_mean'`` (of ``counts``) and
    ``'added'``: ``{(slot, key): value}`` of what was built. With ``inplace``, those are written:

    - ``obsp[f"{niche_key}_connectivities"]``, ``obsp[f"{niche_key}_distances"]``,
      ``uns[f"{niche_key}_neighbors"]`` — the niche graph;
    - ``layers[f"{niche_key}_mean"]`` — sparse niche-mean counts;
    - ``obsm[spot_tiles_key]`` — uint8 ``(n_obs, spot_tile_px, spot_tile_px, 3)``, and
      ``uns[spot_tiles_key]`` — their geometry;
    - ``obsm[key_added]`` — float32 niche-tile features, and ``uns[key_added]`` — their geometry
      and encoder.

    Examples
    --------
    >>> imagene.pp.spot_niche_inputs(adata, library_key="section", niche_encoder="efficientnet_lite0")
    """
    key_added = key_added or f"{KEYS.NICHE_FEATURES_PREFIX}{niche_encoder}"
    # with cache=False, a throw-away cache: every section is computed and the encoder is loaded once per call
    store = SectionCache.default() if cache is True else SectionCache(0) if cache is False else cache
    added: dict[tuple[str, str], Any] = {}
    graph: list[sp.csr_matrix] = []

    def connectivities() -> sp.csr_matrix:  # looked up or built once, when first needed
        if not graph:
            conn, built = _niche_graph(adata, niche_key, library_key, n_niche_neighs)
            graph.append(conn)
            added.update(built)
        return graph[0]

    if niche_graph or niche_expression or counts is not None:
        connectivities()
    neighbors = adata.uns.get(f"{niche_key}_neighbors") or dict(added.get(("uns", f"{niche_key}_neighbors"), {}))
    n_neighs = int(neighbors.get("params", {}).get("n_neighbors", n_niche_neighs))
    niche_mean = None
    if counts is not None:
        niche_mean = sp.csr_matrix(niche_mean_operator(connectivities()) @ counts, dtype=np.float32)
    elif niche_expression and f"{niche_key}_mean" not in adata.layers:
        mean = niche_mean_operator(connectivities()) @ sp.csr_matrix(get_counts(adata, layer), dtype=np.float32)
        added["layers", f"{niche_key}_mean"] = sp.csr_matrix(mean, dtype=np.float32)

    want_spot = spot_tiles and spot_tiles_key not in adata.obsm
    want_niche = niche_features and key_added not in adata.obsm
    size_used = niche_tile_size_um
    if want_spot or want_niche:
        _, groups = resolve_libraries(adata, library_key)
        spatial = np.asarray(adata.obsm[KEYS.SPATIAL], dtype=np.float64)[:, :2]
        try:
            sections = {lib: _section_image(adata, lib, image) for lib in groups}
        except (KeyError, ValueError, FileNotFoundError, OSError) as e:
            sections, reason = None, f"{type(e).__name__}: {e}"
        if sections is None:
            warn(
                f"STAlign: no H&E image could be reached ({reason}). No spot tiles are cut (use "
                "adaptive_encoders=False) and the niche image features are the niche mean of "
                f"obsm[{image_key!r}]. Pass `image=` or set uns['spatial'][section]['metadata']['source_image_path'] "
                "to use the image itself."
            )
            if want_niche:
                feats = np.asarray(adata.obsm[image_key], dtype=np.float32)
                added["obsm", key_added] = np.asarray(niche_mean_operator(connectivities()) @ feats, np.float32)
        else:
            if size_used is None:
                d3 = np.median([_neighbour_distance_um(spatial[idx], sections[lib][2]) for lib, idx in groups.items()])
                size_used = float(round(2 * d3 + spot_tile_size_um))
            tiles_out = np.zeros((adata.n_obs, spot_tile_px, spot_tile_px, 3), np.uint8) if want_spot else None
            niche_out = None
            device = resolve_device("auto")
            for lib, idx in groups.items():
                img, scale, mpp, desc = sections[lib]
                xy = spatial[idx]
                digest = hashlib.sha1(np.ascontiguousarray(xy).tobytes()).hexdigest()
                if want_spot:
                    key = ("spot", desc, lib, spot_tile_size_um, spot_tile_px, digest)
                    tiles_out[idx] = store.get(
                        key, lambda: _tiles(img, xy, scale, mpp, spot_tile_size_um, spot_tile_px)
                    )
                if want_niche:
                    key = ("niche", desc, lib, size_used, niche_tile_px, niche_encoder, digest)

                    def _niche(img=img, xy=xy, scale=scale, mpp=mpp):
                        tiles = _tiles(img, xy, scale, mpp, size_used, niche_tile_px)
                        enc = store.encoder(niche_encoder).to(device)
                        return encode_tiles(tiles, enc, device=device, input_px=niche_tile_px)

                    feats = store.get(key, _niche)
                    if niche_out is None:
                        niche_out = np.zeros((adata.n_obs, feats.shape[1]), np.float32)
                    niche_out[idx] = feats
            if want_spot:
                added["obsm", spot_tiles_key] = tiles_out
                added["uns", spot_tiles_key] = {"tile_size_um": float(spot_tile_size_um), "tile_px": int(spot_tile_px),
                                                "coordinate_system": "full-resolution pixels"}
            if want_niche:
                added["obsm", key_added] = niche_out
                added["uns", key_added] = {"tile_size_um": float(size_used), "tile_px": int(niche_tile_px),
                                           "encoder": niche_encoder, "input_px": int(niche_tile_px)}
    elif size_used is None:
        size_used = adata.uns.get(key_added, {}).get("tile_size_um")
    if inplace:
        for (slot, key), value in added.items():
            save_key(adata, slot, key, value)
    elif added:
        logger.info("Built %s (not written)", ", ".join(f"{slot}[{key!r}]" for slot, key in added))
    values = {k: added.get(("obsm", k), adata.obsm[k] if k in adata.obsm else None) for k in (spot_tiles_key, key_added)}
    return {
        "connectivities": graph[0] if graph else None, "n_niche_neighs": n_neighs, "niche_tile_size_um": size_used,
        "spot_tiles": values[spot_tiles_key] if spot_tiles else None,
        "niche_features": values[key_added] if niche_features else None, "niche_mean": niche_mean, "added": added,
    }
