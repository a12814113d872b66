"""Image encoders: the :class:`ImageEncoder` wrapper and small CNN backbones.

An :class:`ImageEncoder` wraps any backbone that maps a normalised (B, 3, H, W) float batch to
pooled (B, d) features and owns the normalisation the backbone was trained with, so callers only
ever pass tiles scaled to [0, 1] (see :meth:`ImageEncoder.prepare`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

#: ImageNet channel statistics (torchvision / timm default), for tiles scaled to [0, 1]
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _as_vector(values: Sequence[float] | torch.Tensor, what: str) -> torch.Tensor:
    vec = torch.as_tensor(values, dtype=torch.float32).flatten()
    if vec.numel() == 1:
        vec = vec.repeat(3)
    if vec.numel() != 3:
        raise ValueError(f"`{what}` must hold 3 values (one per RGB channel); got {vec.numel()}.")
    return vec


class ImageEncoder(nn.Module):
    """A frozen-or-trainable image backbone that maps RGB tiles to pooled feature vectors.

    The wrapper normalises its input with the backbone's own channel statistics, so
    :meth:`forward` takes tiles scaled to [0, 1]. Use :meth:`prepare` to turn channels-last
    uint8 tiles (as stored in ``obsm``) into that form. Build encoders with
    :func:`imagene.nn.get_image_encoder` rather than directly.

    Parameters
    ----------
    backbone
        Module mapping a normalised (B, 3, H, W) float batch to (B, d) features (a (B, d, h, w)
        feature map is average-pooled).
    name
        Registry / timm name of the encoder (used to name ``obsm`` keys).
    n_features
        Width ``d`` of the features.
    input_px
        Native input size (tiles are resized to ``input_px`` x ``input_px`` by default).
    mean
        Per-channel mean subtracted from [0, 1] inputs.
    std
        Per-channel standard deviation dividing [0, 1] inputs.
    weights_source
        Where the weights come from (a checkpoint path, a hub id, ``'random'``, ...), recorded as
        provenance by :func:`imagene.pp.embed_tiles`.

    Attributes
    ----------
    name
        Encoder name.
    n_features
        Feature width.
    input_px
        Native input size.
    weights_source
        Where the weights come from (``'unknown'`` when not given).
    mean, std
        Normalisation buffers, shape (3,).

    Examples
    --------
    >>> import torch
    >>> from imagene.nn import get_image_encoder
    >>> enc = get_image_encoder("tiny")
    >>> tiles = torch.randint(0, 256, (4, 48, 48, 3), dtype=torch.uint8)
    >>> enc(enc.prepare(tiles, enc.input_px)).shape
    torch.Size([4, 32])
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        name: str,
        n_features: int,
        input_px: int = 224,
        mean: Sequence[float] | torch.Tensor = IMAGENET_MEAN,
        std: Sequence[float] | torch.Tensor = IMAGENET_STD,
        weights_source: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"`backbone` must be a torch.nn.Module; got {type(backbone).__name__}.")
        if int(n_features) < 1:
            raise ValueError(f"`n_features` must be a positive integer; got {n_features}.")
        if int(input_px) < 1:
            raise ValueError(f"`input_px` must be a positive integer; got {input_px}.")
        std_vec = _as_vector(std, "std")
        if bool((std_vec <= 0).any()):
            raise ValueError(f"`std` must be positive; got {std_vec.tolist()}.")
        self.backbone = backbone
        self.name = str(name)
        self.n_features = int(n_features)
        self.input_px = int(input_px)
        self.weights_source = "unknown" if weights_source is None else str(weights_source)
        self.register_buffer("mean", _as_vector(mean, "mean").view(1, 3, 1, 1).clone())
        self.register_buffer("std", std_vec.view(1, 3, 1, 1).clone())

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_features={self.n_features}, input_px={self.input_px}"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the encoder's channel normalisation to a [0, 1] (B, 3, H, W) batch.

        Parameters
        ----------
        x
            Float batch with values in [0, 1].

        Returns
        -------
        The normalised batch, same shape as ``x``.

        Examples
        --------
        >>> import torch
        >>> from imagene.nn import get_image_encoder
        >>> enc = get_image_encoder("tiny")
        >>> enc.normalize(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 3, 8, 8])
        """
        mean = self.mean.to(dtype=x.dtype)
        std = self.std.to(dtype=x.dtype)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a batch of tiles.

        Parameters
        ----------
        x
            Float tensor (B, 3, H, W) with values in [0, 1] (see :meth:`prepare`).

        Returns
        -------
        Pooled features, shape (B, n_features).

        Examples
        --------
        >>> import torch
        >>> from imagene.nn import get_image_encoder
        >>> enc = get_image_encoder("tiny")
        >>> enc(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 32])
        """
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(
                f"ImageEncoder expects a float tensor (B, 3, H, W) in [0, 1]; got {shape}. "
                "Convert channels-last uint8 tiles with `encoder.prepare(tiles)`."
            )
        if not torch.is_floating_point(x):
            raise TypeError(
                f"ImageEncoder expects float input in [0, 1]; got dtype {x.dtype}. "
                "Convert uint8 tiles with `encoder.prepare(tiles)` (divides by 255)."
            )
        out = self.backbone(self.normalize(x))
        if out.ndim == 4:  # a feature map: global average pooling
            out = out.mean(dim=(2, 3))
        if out.ndim != 2:
            raise RuntimeError(
                f"The backbone of encoder {self.name!r} returned shape {tuple(out.shape)}; it must return (B, d) "
                "pooled features or a (B, d, h, w) feature map."
            )
        return out

    def prepare(self, tiles: torch.Tensor | np.ndarray, px: int | None = None) -> torch.Tensor:
        """Turn channels-last tiles into the (B, 3, px, px) float batch :meth:`forward` takes.

        uint8 tiles are divided by 255; float tiles are taken to be in [0, 1] already. The batch is
        moved to the encoder's device and resized with antialiased bilinear interpolation.

        Parameters
        ----------
        tiles
            Tiles (B, H, W, 3), uint8 (or float in [0, 1]); a single (H, W, 3) tile is accepted.
        px
            Output size in pixels; ``None`` keeps the tiles' size.

        Returns
        -------
        Float32 tensor (B, 3, px, px) with values in [0, 1].

        Examples
        --------
        >>> import torch
        >>> from imagene.nn import get_image_encoder
        >>> enc = get_image_encoder("tiny")
        >>> tiles = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
        >>> enc.prepare(tiles, 32).shape
        torch.Size([2, 3, 32, 32])
        """
        return prepare_tiles(tiles, px, device=self.mean.device)


def prepare_tiles(
    tiles: torch.Tensor | np.ndarray, px: int | None = None, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Convert channels-last tiles to a (B, 3, px, px) float batch in [0, 1].

    Parameters
    ----------
    tiles
        Tiles (B, H, W, 3), uint8 (or float in [0, 1]); a single (H, W, 3) tile is accepted.
    px
        Output size in pixels (antialiased bilinear resize); ``None`` keeps the tiles' size.
    device
        Device to move the tiles to before converting; ``None`` keeps their device.

    Returns
    -------
    Float32 tensor (B, 3, px, px) with values in [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> from imagene.nn._image import prepare_tiles
    >>> prepare_tiles(np.zeros((2, 50, 50, 3), np.uint8), 32).shape
    torch.Size([2, 3, 32, 32])
    """
    if isinstance(tiles, np.ndarray):
        tiles = torch.from_numpy(np.ascontiguousarray(tiles))
    if not torch.is_tensor(tiles):
        raise TypeError(f"`tiles` must be a torch.Tensor or numpy array; got {type(tiles).__name__}.")
    if tiles.ndim == 3:
        tiles = tiles.unsqueeze(0)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(
            f"`tiles` must be channels-last RGB, shape (B, H, W, 3); got {tuple(tiles.shape)}. "
            "Drop an alpha channel with `tiles[..., :3]`."
        )
    if device is not None:
        tiles = tiles.to(device, non_blocking=True)
    if tiles.dtype == torch.uint8:
        x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
    elif torch.is_floating_point(tiles):
        x = tiles.permute(0, 3, 1, 2).float()
    else:
        raise TypeError(f"`tiles` must be uint8 (0-255) or float in [0, 1]; got dtype {tiles.dtype}.")
    if px is not None:
        px = int(px)
        if px < 1:
            raise ValueError(f"`px` must be a positive integer; got {px}.")
        if x.shape[-2:] != (px, px):
            x = F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def _conv_bn_act(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class TinyCNN(nn.Module):
    """Three 3x3 convolutions and global average pooling, deterministically initialised.

    A test / smoke-run backbone: no weights needed and identical outputs on every construction
    with the same ``seed``.

    Parameters
    ----------
    n_features
        Output width.
    seed
        Seed of the :class:`torch.Generator` used for initialisation (the global RNG is untouched).

    Examples
    --------
    >>> import torch
    >>> from imagene.nn._image import TinyCNN
    >>> TinyCNN()(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 32])
    """

    def __init__(self, n_features: int = 32, *, seed: int = 0) -> None:
        super().__init__()
        if int(n_features) < 1:
            raise ValueError(f"`n_features` must be a positive integer; got {n_features}.")
        n_features = int(n_features)
        with torch.random.fork_rng(devices=[]):  # torch's default init would consume the global RNG
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, n_features, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(n_features, n_features, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(1),
            )
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    bound = math.sqrt(6.0 / fan_in)  # Kaiming-uniform for ReLU
                    module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 2 * bound - bound)
                    module.bias.copy_((torch.rand(module.bias.shape, generator=gen) - 0.5) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 3, H, W) to (B, n_features)."""
        return self.features(x)


class SmallCNN(nn.Module):
    """A small VGG-style CNN for low-resolution spot tiles, trained from scratch.

    Three stages of (conv-BN-ReLU) x 2 + max-pool with ``width``, ``2 width`` and ``4 width``
    channels, global average pooling and a linear map to ``n_features`` (in the spirit of the
    spot-image encoder of ST-Align for ~28-32 px spot images).

    Parameters
    ----------
    n_features
        Output width.
    width
        Channels of the first stage.
    dropout
        Dropout before the final linear map.

    Examples
    --------
    >>> import torch
    >>> from imagene.nn._image import SmallCNN
    >>> SmallCNN(n_features=64)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 64])
    """

    def __init__(self, n_features: int = 128, *, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        if int(n_features) < 1 or int(width) < 1:
            raise ValueError(f"`n_features` and `width` must be positive integers; got {n_features}, {width}.")
        w = int(width)
        self.features = nn.Sequential(
            *_conv_bn_act(3, w),
            *_conv_bn_act(w, w),
            nn.MaxPool2d(2),
            *_conv_bn_act(w, 2 * w),
            *_conv_bn_act(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn_act(2 * w, 4 * w),
            *_conv_bn_act(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, int(n_features)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 3, H, W) to (B, n_features)."""
        return self.head(self.features(x))
