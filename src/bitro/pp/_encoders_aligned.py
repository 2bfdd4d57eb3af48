"""Folders of aligned image towers (``bt.tl.align_encoder``): the file format and the encoder they load as.

An aligned-encoder folder is ``config.json`` + ``model.safetensors`` (no pickle) with format
``"bitro-aligned-encoder/1"``. ``config.json`` records a sha256 of every array and of the JSON itself,
verified at load: an edited setting or replaced weights are refused naming the file.

The folder's ``kind`` says what its image tower consumes. The only kind so far, ``"features"``, takes
the cells' existing embedding ``cells.obsm[use_rep]`` (projected, then a per-cell MLP): it is **not**
an image encoder, so ``bt.pp.embed_cells(encoder=<folder>)`` recognises the folder and refuses it,
pointing at :func:`bitro.tl.apply_alignment` (which writes ``cells.obsm`` / ``spots.obsm``). An image
tower fine-tuned on crops would load here as an :class:`~bitro.pp._encoders.Encoder`.

This module lives in :mod:`bitro.pp` because encoders do; :mod:`bitro.tl` writes the folders with
:func:`write_aligned_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bitro._hashing import arrays_sha256, json_sha256

FORMAT = "bitro-aligned-encoder/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


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


def load_aligned_encoder(path: str | Path) -> Any:
    """The encoder of an aligned-encoder folder (the hook of :func:`bitro.pp.get_encoder` for such folders).

    Raises
    ------
    ValueError
        A ``"features"`` folder (it aligns existing features, not images: use
        :func:`bitro.tl.apply_alignment`), an unknown kind, or a folder that fails its integrity checks.
    """
    path = Path(path)
    config, _ = read_aligned_folder(path)
    if config.get("kind") == "features":
        msg = (
            f"{str(path)!r} aligns the cells' existing features (cells.obsm[{config.get('use_rep')!r}]), not "
            "images, so it is not an image encoder for bt.pp.embed_cells. Use bt.tl.apply_alignment(sdata, "
            "path, key_added=...) on a slide embedded like its training slides."
        )
        raise ValueError(msg)
    msg = f"{path}: unknown aligned-encoder kind {config.get('kind')!r}; this bitro writes only 'features'."
    raise ValueError(msg)
