"""One way to fingerprint things: sha256 of files, arrays, torch state dicts and JSON values.

Every fingerprint bitro records (provenance, scratch manifests, model files, stored-data integrity)
comes from here, so the same content always gives the same digest:

- arrays: for each array (with its name when given a mapping, in sorted name order) the name, the
  dtype string and the shape, then the raw C-order bytes;
- torch tensors: hashed as the numpy array of the same dtype and shape (bfloat16 as raw 16-bit words);
- JSON values: the canonical encoding (sorted keys, no spaces, UTF-8);
- files: their bytes, read in 4 MiB blocks (cached by path, size and modification time).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_FILE_CACHE: dict[tuple[str, int, int], str] = {}


def _update_array(digest: Any, a: np.ndarray, name: str | None = None) -> None:
    a = np.ascontiguousarray(a)
    head = f"{name}:" if name is not None else ""
    digest.update(f"{head}{a.dtype.str}{a.shape};".encode())
    digest.update(a.view(np.uint8).reshape(-1).data if a.size else b"")


def arrays_sha256(arrays: Iterable[np.ndarray] | Mapping[str, np.ndarray]) -> str:
    """sha256 of arrays: names (for a mapping, sorted), dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    if isinstance(arrays, Mapping):
        for name in sorted(arrays):
            _update_array(digest, np.asarray(arrays[name]), str(name))
    else:
        for a in arrays:
            _update_array(digest, np.asarray(a))
    return digest.hexdigest()


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A CPU numpy view of a torch tensor, bfloat16 (no numpy dtype) as its raw 16-bit words."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def state_sha256(state: Mapping[str, Any]) -> str:
    """sha256 of a torch ``state_dict`` (or any mapping of tensors / arrays), by name."""
    return arrays_sha256(
        {k: tensor_to_numpy(v) if hasattr(v, "detach") else np.asarray(v) for k, v in state.items()}
    )


def json_sha256(value: Any) -> str:
    """sha256 of the canonical JSON encoding of ``value`` (sorted keys, compact)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike[str], *, cache: bool = True) -> str:
    """sha256 of a file's bytes ("" when it is not a file).

    With ``cache`` (default) the digest is cached by path, size and modification time; integrity
    checks pass ``cache=False`` to read the bytes every time (and not fill the cache with chunk files).
    """
    p = Path(path)
    if not p.is_file():
        return ""
    key = None
    if cache:
        stat = p.stat()
        key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in _FILE_CACHE:
            return _FILE_CACHE[key]
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    if key is not None:
        _FILE_CACHE[key] = digest.hexdigest()
    return digest.hexdigest()
