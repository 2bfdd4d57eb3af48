"""Training checkpoints: safetensors + JSON (no pickle), written atomically, for exact resumption."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

STATE_FILE = "train_state.safetensors"
META_FILE = "train_state.json"


def save_training_state(
    directory: str | Path,
    *,
    net_state: dict[str, Any],
    best_state: dict[str, Any] | None,
    optimizer: Any,
    rng: np.random.Generator,
    meta: dict[str, Any],
) -> None:
    """Write the state after an epoch; the previous checkpoint stays valid until the new one is complete."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net_state.items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"opt.{idx}.{name}"] = t.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        **meta,
        "param_groups": opt["param_groups"],
        "numpy_rng": rng.bit_generator.state,
        "has_best": best_state is not None,
    }
    tmp_state, tmp_meta = directory / f".{STATE_FILE}.tmp", directory / f".{META_FILE}.tmp"
    save_file(tensors, str(tmp_state))
    tmp_meta.write_text(json.dumps(meta, default=_json_default))
    os.replace(tmp_state, directory / STATE_FILE)
    os.replace(tmp_meta, directory / META_FILE)


def load_training_state(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Return ``(tensors, meta)`` of the last checkpoint in ``directory``, or ``None`` if there is none."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / STATE_FILE).is_file() or not (directory / META_FILE).is_file():
        return None
    return load_file(str(directory / STATE_FILE)), json.loads((directory / META_FILE).read_text())


def restore_optimizer(optimizer: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Load the Adam state saved by :func:`save_training_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer | np.floating):
        return obj.item()
    msg = f"not JSON serialisable: {type(obj).__name__}"
    raise TypeError(msg)
