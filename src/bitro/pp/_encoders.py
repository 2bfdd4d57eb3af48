"""Cell-image encoders and their registry (``bt.pp.register_encoder``, ``bt.pp.list_encoders``).

An *encoder* turns RGB pixels into one feature vector per cell. Every encoder is an
:class:`Encoder` with

- ``name``, ``dim`` (feature length; ``None`` until known for user callables),
- ``input_size``: side in pixels of the square input crops are resized to (``None``: crops are passed
  at their native size),
- ``mpp``: µm per pixel the encoder expects in tile mode (``None``: use the level as read),
- ``stride``: pixels of input per cell of the feature map (``None``: no tile mode),
- :meth:`Encoder.embed_crops` ``(n, h, w, 3) uint8 -> (n, dim) float32`` (crop mode),
- :meth:`Encoder.feature_map` ``(h, w, 3) uint8 -> (dim, h', w') float32`` or ``None`` (tile mode).

The ``"morphology"`` encoder is different in kind: it measures nuclei from their masks, so
:func:`bitro.pp.embed_cells` hands it tiles and rasterised masks instead of crops (``kind == "mask"``).

Names map to *factories* (callables returning an encoder). A string ``"name:argument"`` calls the
factory with the argument, e.g. ``"dinov2:/models/dinov2-base"``. Torch is imported only when a
torch encoder is built.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bitro._hashing import file_sha256
from bitro._logging import logger

__all__ = ["Encoder", "get_encoder", "list_encoders", "register_encoder"]

_LAVLAB_INSTALL = "pip install onnxruntime && pip install --no-deps lavlab-shell==0.9.1"


class Encoder:
    """Base class of cell encoders (see the module docstring for the contract)."""

    name: str = "encoder"
    kind: str = "image"  # "image": crops / feature maps; "mask": needs nucleus masks (morphology)
    dim: int | None = None
    input_size: int | None = None
    mpp: float | None = None
    stride: int | None = None
    checkpoint: str | None = None

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Embed a batch of RGB crops ``(n, h, w, 3) uint8`` into ``(n, dim) float32``."""
        msg = f"Encoder {self.name!r} cannot embed crops; use mode='tile'."
        raise NotImplementedError(msg)

    def feature_map(self, tile: np.ndarray) -> np.ndarray | None:
        """Feature map ``(dim, h', w') float32`` of an RGB tile ``(h, w, 3) uint8``, or ``None``."""
        return None

    @property
    def supports_tiles(self) -> bool:
        """Whether :meth:`feature_map` is implemented (tile mode)."""
        return self.stride is not None

    def to(self, device: Any) -> Encoder:
        """Move the encoder's weights to ``device`` (no-op for weightless encoders)."""
        return self

    def provenance(self) -> dict[str, Any]:
        """Description of the encoder for ``.uns`` (name, dim, checkpoint path and sha256)."""
        out: dict[str, Any] = {"encoder": self.name, "dim": int(self.dim or 0)}
        if self.input_size is not None:
            out["input_size"] = int(self.input_size)
        if self.checkpoint is not None:
            out["checkpoint"] = str(self.checkpoint)
            out["checkpoint_sha256"] = file_sha256(self.checkpoint)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, input_size={self.input_size})"


class CallableEncoder(Encoder):
    """Wrap a function ``crops (n, h, w, 3) uint8 -> (n, d)`` as a crop-mode encoder.

    Parameters
    ----------
    func
        The function. Crops are passed at their native size unless ``input_size`` is given.
    name
        Name recorded in the provenance.
    input_size
        Resize crops to ``input_size`` × ``input_size`` pixels first.
    """

    def __init__(
        self, func: Callable[[np.ndarray], Any], *, name: str | None = None, input_size: int | None = None
    ):
        self.func = func
        self.name = name or getattr(func, "__name__", type(func).__name__)
        self.input_size = input_size

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Call the wrapped function and check its output shape."""
        if self.input_size is not None:
            crops = resize_crops(crops, self.input_size)
        out = np.asarray(self.func(crops), dtype=np.float32)
        if out.ndim == 1:
            out = out[:, None]
        if out.ndim != 2 or out.shape[0] != len(crops):
            msg = (
                f"Encoder {self.name!r} returned shape {out.shape} for {len(crops)} crops; "
                "it must return an (n_crops, n_features) array."
            )
            raise ValueError(msg)
        self.dim = int(out.shape[1])
        return out


def resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(n, h, w, 3) uint8`` crops to ``(n, size, size, 3) uint8`` (anti-aliased, bilinear)."""
    from skimage.transform import resize

    if crops.shape[1:3] == (size, size):
        return crops
    out = np.empty((len(crops), size, size, crops.shape[3]), dtype=np.uint8)
    for i, crop in enumerate(crops):
        out[i] = (
            resize(crop, (size, size), order=1, preserve_range=True, anti_aliasing=True)
            .round()
            .astype(np.uint8)
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_encoder(name: str, factory: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Register an encoder factory under ``name``.

    Parameters
    ----------
    name
        Name used as ``bt.pp.embed_cells(sdata, encoder=name)``; must not contain ``":"``.
    factory
        Callable returning an :class:`~bitro.pp._encoders.Encoder`, a function
        ``crops (n, h, w, 3) uint8 -> (n, d)`` or a ``torch.nn.Module`` (wrapped automatically).
        ``encoder="name:argument"`` calls ``factory("argument")`` (e.g. a checkpoint path), plain
        ``"name"`` calls ``factory()``.
    overwrite
        Replace an existing registration of ``name``.

    Examples
    --------
    >>> import bitro as bt
    >>> bt.pp.register_encoder("mean_rgb", lambda: (lambda crops: crops.mean(axis=(1, 2))))
    """
    if not isinstance(name, str) or not name or ":" in name:
        msg = f"Encoder names must be non-empty strings without ':', got {name!r}."
        raise ValueError(msg)
    if not callable(factory):
        msg = f"factory for encoder {name!r} must be callable, got {type(factory).__name__}."
        raise TypeError(msg)
    if name in _REGISTRY and not overwrite:
        msg = f"Encoder {name!r} is already registered; pass overwrite=True to replace it or choose another name."
        raise ValueError(msg)
    _REGISTRY[name] = factory


def list_encoders() -> list[str]:
    """Names of the registered encoders (sorted).

    ``"vit"``, ``"dinov2"``, ``"dinov3"`` and ``"uni"`` need a local checkpoint:
    ``encoder="dinov2:/path/to/folder"`` (a path to a folder also works on its own).
    """
    return sorted(_REGISTRY)


def get_encoder(encoder: Any, *, device: Any = None) -> Encoder:
    """Resolve ``encoder`` (name, ``"name:arg"``, local folder, Encoder, callable or nn.Module) to an Encoder."""
    enc = _resolve(encoder)
    if device is not None:
        enc = enc.to(device)
    return enc


#: Built-in encoders whose ``"name:argument"`` is the path of a local checkpoint.
_PATH_ARGUMENT = ("vit", "dinov2", "dinov3", "uni", "lavlab")
#: File endings of encoder checkpoints (a string ending so is meant as a path, not a name).
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".onnx", ".ckpt")


def _looks_like_path(spec: str) -> bool:
    return (
        os.sep in spec
        or (os.altsep is not None and os.altsep in spec)
        or spec.startswith(("~", "."))
        or spec.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def check_encoder_name(encoder: Any) -> None:
    """Check a string/path ``encoder`` without loading it: a registered name, or a checkpoint that exists.

    Raises the error :func:`get_encoder` would raise for a misspelt name or a missing checkpoint
    (objects and callables are accepted as they are), so callers can fail before any other work.
    """
    if not isinstance(encoder, str | os.PathLike):
        return
    spec = os.fspath(encoder)
    if spec in _REGISTRY:
        return
    prefix, sep, arg = spec.partition(":")
    if sep and prefix in _REGISTRY and arg:
        if prefix in _PATH_ARGUMENT and not os.path.exists(os.path.expanduser(arg)):
            msg = (
                f"Encoder checkpoint {arg!r} (from encoder={spec!r}) does not exist; give the path of a local "
                f"checkpoint folder or file for {prefix!r} (bitro never downloads weights)."
            )
            raise FileNotFoundError(msg)
        return
    if os.path.exists(os.path.expanduser(spec)):
        return
    if _looks_like_path(spec):
        msg = (
            f"Encoder checkpoint {spec!r} does not exist. Give the path of a local checkpoint (a transformers "
            "folder with config.json, or a .safetensors/.pt state dict next to its config.json), or a "
            f"registered encoder name: {list_encoders()}."
        )
        raise FileNotFoundError(msg)
    msg = (
        f"Unknown encoder {spec!r}. Registered encoders: {list_encoders()}. Pass one of these names, "
        "'vit:/path/to/local/checkpoint' (also dinov2:/dinov3:/uni:), a path to a local checkpoint folder, "
        "a function crops -> features, a torch.nn.Module, or register your own with bt.pp.register_encoder."
    )
    raise ValueError(msg)


def _resolve(encoder: Any) -> Encoder:
    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, str | os.PathLike):
        check_encoder_name(encoder)
        spec = os.fspath(encoder)
        if spec in _REGISTRY:
            return _wrap(_REGISTRY[spec](), name=spec)
        prefix, sep, arg = spec.partition(":")
        if sep and prefix in _REGISTRY and arg:
            return _wrap(_REGISTRY[prefix](arg), name=prefix)
        from bitro.pp._encoders_aligned import is_aligned_folder, load_aligned_encoder

        if is_aligned_folder(os.path.expanduser(spec)):  # written by bt.tl.align_encoder(...).save
            return load_aligned_encoder(os.path.expanduser(spec))
        from bitro.pp._encoders_torch import load_vit_encoder

        return load_vit_encoder(os.path.expanduser(spec))
    return _wrap(encoder, name=None)


def _wrap(obj: Any, *, name: str | None) -> Encoder:
    if isinstance(obj, Encoder):
        return obj
    if importlib.util.find_spec("torch") is not None:
        import torch

        if isinstance(obj, torch.nn.Module):
            from bitro.pp._encoders_torch import TorchModuleEncoder

            return TorchModuleEncoder(obj, name=name)
    if callable(obj):
        return CallableEncoder(obj, name=name)
    msg = (
        f"Cannot use {type(obj).__name__} as an encoder; expected an Encoder, a function crops -> features "
        f"or a torch.nn.Module. Registered encoders: {list_encoders()}."
    )
    raise TypeError(msg)


# ----------------------------------------------------------------------------------------------------------
# built-in factories
# ----------------------------------------------------------------------------------------------------------
def _morphology(**kwargs: Any) -> Encoder:
    from bitro.pp._encoders_morphology import MorphologyEncoder

    return MorphologyEncoder(**kwargs)


def _efficientnet_lite0() -> Encoder:
    from bitro.pp._encoders_torch import EfficientNetLite0Encoder

    return EfficientNetLite0Encoder()


def _vit_factory(kind: str) -> Callable[..., Encoder]:
    def factory(path: str | None = None) -> Encoder:
        if path is None:
            msg = (
                f"Encoder {kind!r} needs a local checkpoint (bitro never downloads weights): "
                f"use encoder='{kind}:/path/to/folder' with a Hugging Face folder (config.json + weights) "
                "or a state dict file next to its config.json."
            )
            raise ValueError(msg)
        from bitro.pp._encoders_torch import load_vit_encoder

        return load_vit_encoder(path, kind=kind)

    return factory


def _lavlab(path: str | None = None) -> Encoder:
    missing = [m for m in ("onnxruntime", "lavlab") if importlib.util.find_spec(m) is None]
    if missing:
        msg = (
            f"The 'lavlab' encoder needs {missing}, which are not installed. Install with: {_LAVLAB_INSTALL}"
        )
        raise ImportError(msg)
    from bitro.pp._encoders_torch import OnnxEncoder

    if path is None:  # the first ONNX file shipped inside the lavlab package
        spec = importlib.util.find_spec("lavlab")
        root = Path(next(iter(spec.submodule_search_locations or [])))
        found = sorted(root.rglob("*.onnx"))
        if not found:
            msg = "No .onnx model found inside the lavlab package; pass encoder='lavlab:/path/to/model.onnx'."
            raise FileNotFoundError(msg)
        path = str(found[0])
    logger.info("lavlab encoder: using %s", path)
    return OnnxEncoder(path, name="lavlab")


register_encoder("morphology", _morphology)
register_encoder("efficientnet_lite0", _efficientnet_lite0)
for _kind in ("vit", "dinov2", "dinov3", "uni"):
    register_encoder(_kind, _vit_factory(_kind))
register_encoder("lavlab", _lavlab)
