"""Frozen image features of the tiles, written to ``obsm``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import check_adata, check_obsm, progress, save_key
from imagene._version import __version__

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("imagene")


def resolve_device(device: str = "auto") -> str:
    """``'auto'`` → ``'cuda'`` when available, else ``'cpu'``; other values are returned as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def encode_tiles(
    tiles: Any,
    encoder: torch.nn.Module,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    input_px: int | None = None,
    show_progress_bar: bool = False,
    tta: str | None = None,
) -> np.ndarray:
    """Run ``encoder`` over uint8 (n, H, W, 3) tiles (numpy or dask) in batches; float32 (n, d) on CPU.

    ``tta`` averages the features over flipped / rotated copies of each tile (see :data:`TTA`).
    """
    import torch

    views = _tta_views(tta)

    n = tiles.shape[0]
    # preallocated output: keeping one small tensor per batch fragments the heap and made peak
    # memory grow with the number of spots (benchmarks/bench_memory.py)
    out = np.empty((n, encoder.n_features), dtype=np.float32)
    steps = range(0, n, batch_size)
    with torch.inference_mode():
        for start in progress(steps, total=len(steps), desc="embedding", show=show_progress_bar):
            batch = np.asarray(tiles[start : start + batch_size])
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True)
            x = encoder.prepare(x, input_px)
            feats = sum(encoder(view(x)).float() for view in views) / len(views)
            out[start : start + len(batch)] = feats.cpu().numpy()
    return out


#: test-time augmentations of :func:`embed_tiles`: the views whose features are averaged
TTA = {
    None: ("identity",),
    "flips": ("identity", "hflip", "vflip", "hvflip"),
    "dihedral": ("identity", "hflip", "vflip", "hvflip", "transpose", "rot90", "rot270", "antitranspose"),
}


def _tta_views(tta: str | None) -> list:
    """Functions of a (B, 3, H, W) tensor for each view of ``tta`` (the dihedral group of the square)."""
    if tta not in TTA:
        raise ValueError(f"tta must be one of {list(TTA)}; got {tta!r}.")
    ops = {
        "identity": lambda x: x,
        "hflip": lambda x: x.flip(-1),
        "vflip": lambda x: x.flip(-2),
        "hvflip": lambda x: x.flip(-1, -2),
        "transpose": lambda x: x.transpose(-1, -2),
        "rot90": lambda x: x.rot90(1, (-2, -1)),
        "rot270": lambda x: x.rot90(-1, (-2, -1)),
        "antitranspose": lambda x: x.flip(-1, -2).transpose(-1, -2),
    }
    return [ops[name] for name in TTA[tta]]


def embed_tiles(
    adata: AnnData,
    *,
    encoder: str | torch.nn.Module = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    tiles_key: str = KEYS.TILES,
    batch_size: int = 64,
    device: str = "auto",
    input_px: int | None = None,
    key_added: str | None = None,
    show_progress_bar: bool = True,
    tta: str | None = None,
) -> None:
    """Embed each spot's tile with a frozen image encoder and store the features in ``obsm``.

    Parameters
    ----------
    adata
        AnnData with tiles from :func:`imagene.pp.extract_tiles`.
    encoder
        Name in the encoder registry (:func:`imagene.nn.list_image_encoders`; the offline default
        ``'efficientnet_lite0'`` uses ImageNet weights shipped with the package index), any timm
        model name, ``'local-dir:/path/to/folder'`` (a folder with a timm ``config.json`` and its
        weights), an encoder from :func:`imagene.nn.get_image_encoder`, or a torch module mapping
        (B, 3, H, W) to (B, d). See :doc:`/encoders` for pathology foundation models (UNI,
        CONCH's vision tower, H-optimus, Phikon) from a local checkpoint.
    weights
        Local checkpoint path (``.pth``/``.pt``/``.bin``/``.safetensors`` state dict; or a hub id
        ``'hf-hub:owner/name'`` when online) loaded into ``encoder``.
    model_kwargs
        Keyword arguments for building the encoder, passed to :func:`imagene.nn.get_image_encoder`
        and from there to ``timm.create_model`` for timm models, e.g.
        ``{"init_values": 1e-5, "dynamic_img_size": True}`` for UNI; also ``mean`` / ``std``
        (normalisation) and ``input_px``. Only for an encoder given by name.
    tiles_key
        ``obsm`` key of the uint8 tiles.
    batch_size
        Tiles per forward pass.
    device
        ``'auto'`` (CUDA when available), ``'cpu'``, ``'cuda'``, ...
    input_px
        Resize tiles to this size before the encoder; ``None`` uses the encoder's native size.
    key_added
        ``obsm`` key; defaults to ``'X_he_<encoder>'``.
    show_progress_bar
        Show a progress bar.
    tta
        Test-time augmentation: ``None`` (the tile as it is), ``'flips'`` (features averaged over the
        tile, its horizontal, vertical and double flip: 4 forward passes) or ``'dihedral'`` (the 8
        flips and 90° rotations of the square). Tissue has no orientation, so the average is a
        feature of the tile that does not depend on how the slide was scanned.

    Returns
    -------
    Nothing; adds to ``adata``:

    - ``obsm[key_added]`` — (n_obs, n_features) float32 frozen features.
    - ``uns[key_added]`` — provenance: ``encoder``, ``weights`` (the absolute path of the
      checkpoint, ``'hf-hub:<id>'`` of timm's default weights, ``'random'``, ...),
      ``model_kwargs`` (JSON text), ``input_px``, ``n_features``, ``tiles_key``, ``tta``
      (``'none'``, ``'flips'`` or ``'dihedral'``), ``imagene_version``.

    Examples
    --------
    >>> imagene.pp.embed_tiles(adata, encoder="efficientnet_lite0")
    >>> adata.obsm["X_he_efficientnet_lite0"].shape
    (1184, 1280)

    UNI (ViT-L/16) from a checkpoint downloaded beforehand:

    >>> imagene.pp.embed_tiles(
    ...     adata,
    ...     encoder="vit_large_patch16_224",
    ...     weights="/models/uni/pytorch_model.bin",
    ...     model_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
    ...     key_added="X_he_uni",
    ... )
    """
    from imagene.nn import get_image_encoder

    check_adata(adata)
    tiles = check_obsm(adata, tiles_key, "Run `imagene.pp.extract_tiles(adata)` first.")
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"adata.obsm[{tiles_key!r}] must hold (n_obs, px, px, 3) uint8 tiles; got {tiles.shape}.")
    kwargs = dict(model_kwargs or {})
    if not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"`model_kwargs` must map keyword names to values; got keys {list(kwargs)}.")
    if "weights" in kwargs or "pretrained" in kwargs:
        raise ValueError("Pass `weights=` to embed_tiles itself, not inside `model_kwargs`.")
    if kwargs and not isinstance(encoder, str):
        raise ValueError(
            f"`model_kwargs` {sorted(kwargs)} only apply to an encoder given by name; {type(encoder).__name__} is "
            "already built. Build it with those settings, or pass its name (e.g. encoder='vit_large_patch16_224')."
        )
    _tta_views(tta)  # validate before loading the encoder
    dev = resolve_device(device)
    enc = get_image_encoder(encoder, weights=weights, **kwargs).to(dev).eval()
    px = input_px or enc.input_px
    logger.info("Embedding %s tiles with %r at %d px on %s", f"{tiles.shape[0]:,}", enc.name, px, dev)
    feats = encode_tiles(
        tiles, enc, batch_size=batch_size, device=dev, input_px=px, show_progress_bar=show_progress_bar, tta=tta
    )
    key = key_added or f"{KEYS.FEATURES_PREFIX}{enc.name}"
    save_key(adata, "obsm", key, feats.astype(np.float32, copy=False))
    save_key(
        adata,
        "uns",
        key,
        {
            "encoder": enc.name,
            "weights": getattr(enc, "weights_source", None) or "unknown",
            "model_kwargs": json.dumps(kwargs, sort_keys=True, default=repr),
            "input_px": int(px),
            "n_features": int(feats.shape[1]),
            "tiles_key": tiles_key,
            "tta": tta or "none",
            "imagene_version": __version__,
        },
    )
