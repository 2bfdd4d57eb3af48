"""Folders of aligned image towers (``bt.tl.align_encoder``): the file format and the encoder they load as.

An aligned-encoder folder is ``config.json`` + ``model.safetensors`` (no pickle) with format
``"bitro-aligned-encoder/1"``. ``config.json`` records a sha256 of every array and of the JSON itself,
verified at load: an edited setting or replaced weights are refused naming the file.

The folder's ``kind`` says what its image tower consumes:

- ``"features"``: the cells' existing embedding ``cells.obsm[use_rep]`` (projected, then a per-cell
  MLP). It is **not** an image encoder: ``bt.pp.embed_cells(encoder=<folder>)`` refuses it and points
  at :func:`bitro.tl.apply_alignment`, which writes ``cells.obsm`` / ``spots.obsm``.
- ``"efficientnet_lite0"``: cell crops through EfficientNet-Lite0 whose last blocks were fine-tuned,
  then the MLP head. ``bt.pp.embed_cells(sdata, encoder=<folder>, mode="crop")`` loads it like any
  other encoder (:class:`AlignedCNNEncoder`).

This module lives in :mod:`bitro.pp` because encoders do; :mod:`bitro.tl` writes the folders with
:func:`write_aligned_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bitro._hashing import arrays_sha256, json_sha256
from bitro.pp._encoders import Encoder

FORMAT = "bitro-aligned-encoder/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: Prefix of the image tower's head in ``model.safetensors`` (keys ``net.0.*`` and ``net.3.*`` below it).
HEAD_PREFIX = "image.head."
#: Prefix of the fine-tuned EfficientNet parameters (its ``state_dict`` names below it).
TRUNK_PREFIX = "trunk."


def is_aligned_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` has the aligned-encoder format."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_aligned_folder(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write ``config.json`` (``meta`` + format + content hashes) and ``model.safetensors`` into new folder ``path``."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    config = {"format": FORMAT, **meta}
    config["integrity"] = {"arrays_sha256": arrays_sha256(arrays), "state_sha256": json_sha256(config)}
    save_file(arrays, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def read_aligned_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify an aligned-encoder folder; return ``(config, arrays)``.

    Raises
    ------
    FileNotFoundError
        ``path`` lacks ``config.json`` or ``model.safetensors``.
    ValueError
        Another format, unreadable files, or content that no longer matches its recorded hash.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        msg = (
            f"{str(path)!r} is not an aligned-encoder folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); save one "
            "with bt.tl.align_encoder(...).save(path)."
        )
        raise FileNotFoundError(msg)
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        msg = f"{cfg_file} is not valid JSON (truncated or edited?): {err}. Save the alignment again."
        raise ValueError(msg) from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else None
        msg = f"{cfg_file} has format {got!r}; this bitro reads aligned encoders of format {FORMAT!r}."
        raise ValueError(msg)
    try:
        arrays = load_file(str(w_file))
    except Exception as err:  # safetensors raises its own error types for truncated / garbled files
        msg = f"{w_file} is not a readable safetensors file (truncated or corrupt?): {err}. Save the alignment again."
        raise ValueError(msg) from err
    integrity = config.get("integrity")
    body = {k: v for k, v in config.items() if k != "integrity"}
    if not isinstance(integrity, dict) or json_sha256(body) != integrity.get("state_sha256"):
        msg = (
            f"{cfg_file} was changed after the alignment was saved (its content hash does not match); restore "
            "the file or align again."
        )
        raise ValueError(msg)
    if arrays_sha256(arrays) != integrity.get("arrays_sha256"):
        msg = (
            f"{w_file} does not hold the arrays this alignment was saved with (content hash mismatch: weights "
            "replaced or corrupted); restore the file or align again."
        )
        raise ValueError(msg)
    return config, arrays


def _head_module(arrays: dict[str, np.ndarray], path: Path) -> Any:
    """The image head (``Linear → GELU → Dropout → Linear``, :class:`bitro.models.ProjectionHead`'s layout)."""
    import torch
    from torch import nn

    part = {k[len(HEAD_PREFIX) :]: v for k, v in arrays.items() if k.startswith(HEAD_PREFIX)}
    try:
        hidden, in_dim = part["net.0.weight"].shape
        out_dim = part["net.3.weight"].shape[0]
    except KeyError as err:
        msg = f"{path}/{WEIGHTS_FILE} holds no image head ({err}); the folder is incomplete."
        raise ValueError(msg) from err
    net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, out_dim))
    head = nn.Module()
    head.net = net
    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in part.items()}, strict=True)
    return head.eval()


class AlignedCNNEncoder(Encoder):
    """EfficientNet-Lite0 with fine-tuned last blocks and the aligned head (crop mode only).

    ``embed_crops`` gives each cell's aligned embedding: the mean-pooled final feature map of its crop
    through the head; the spot means of these are the spot embeddings the alignment was trained on.
    """

    stride = None  # the head is learnt on pooled crops: no tile mode

    def __init__(self, path: Path, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        import torch

        from bitro.pp._encoders_torch import EfficientNetLite0Encoder

        base = EfficientNetLite0Encoder()
        if config.get("base_checkpoint_sha256") != base.provenance().get("checkpoint_sha256"):
            msg = (
                f"{path} was fine-tuned from another EfficientNet-Lite0 checkpoint than the installed one; "
                "install the package version it was trained with, or align again."
            )
            raise ValueError(msg)
        tuned = {k[len(TRUNK_PREFIX) :]: v for k, v in arrays.items() if k.startswith(TRUNK_PREFIX)}
        prefixes = tuple(config.get("trunk_prefixes", []))
        state = base.module.state_dict()
        expected = {k for k in state if k.startswith(prefixes)} if prefixes else set()
        if set(tuned) != expected:
            msg = f"{path}: the stored fine-tuned layers do not match {list(prefixes)}; the folder is inconsistent."
            raise ValueError(msg)
        state.update({k: torch.from_numpy(np.array(v)) for k, v in tuned.items()})
        base.module.load_state_dict(state, strict=True)
        self._base, self._head = base, _head_module(arrays, path)
        self.name = f"aligned:{config.get('kind')}"
        self.checkpoint = str(path / WEIGHTS_FILE)
        self.input_size = base.input_size
        self.dim = int(self._head.net[3].out_features)

    def to(self, device: Any) -> Encoder:
        self._base.to(device)
        self._head.to(self._base.device)
        return self

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Aligned embeddings ``(n, dim)`` of ``(n, h, w, 3) uint8`` cell crops."""
        import torch

        with torch.inference_mode():
            fmap = self._base._forward_map(self._base._tensor(crops, resize=True))
            return self._head.net(fmap.mean(dim=(2, 3))).float().cpu().numpy()


def load_aligned_encoder(path: str | Path) -> Encoder:
    """The encoder of an aligned-encoder folder (the hook of :func:`bitro.pp.get_encoder` for such folders).

    Raises
    ------
    ValueError
        A ``"features"`` folder (it aligns existing features, not images: use
        :func:`bitro.tl.apply_alignment`), or a folder that fails its integrity checks.
    """
    path = Path(path)
    config, arrays = read_aligned_folder(path)
    if config.get("kind") == "features":
        msg = (
            f"{str(path)!r} aligns the cells' existing features (cells.obsm[{config.get('use_rep')!r}]), not "
            "images, so it is not an image encoder for bt.pp.embed_cells. Use bt.tl.apply_alignment(sdata, "
            "path, key_added=...) on a slide embedded like its training slides."
        )
        raise ValueError(msg)
    if config.get("kind") != "efficientnet_lite0":
        msg = f"{path}: unknown aligned-encoder kind {config.get('kind')!r}; expected 'features' or 'efficientnet_lite0'."
        raise ValueError(msg)
    return AlignedCNNEncoder(path, config, arrays)
