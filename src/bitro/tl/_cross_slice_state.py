"""The declared state of a cross-slice model (SpaHGC or retrieval) and its files.

Same approach and the same safety as :mod:`bitro.tl._state` (BiTro's): :class:`CrossSliceState` lists
its parts once, each with a *codec* (``"json"``, ``"options"`` or ``"arrays"``) in its field metadata;
:meth:`~CrossSliceState.encode` / :meth:`~CrossSliceState.decode` walk the fields. A model folder is
``config.json`` + ``model.safetensors`` (network weights under ``net.``, every other array under
``<field>.``), written to a temporary folder and moved into place; ``config.json`` records a content
hash of every array and of the state, verified at load. No pickle is written or read.

The format is ``bitro-model/cross-slice-1`` and ``config.json`` names the model (``"spahgc"`` or
``"retrieval"``), so one kind of model never loads as another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitro._hashing import arrays_sha256, json_sha256
from bitro.tl._configs import SetupConfig
from bitro.tl._cross_slice_config import CrossSliceConfig
from bitro.tl._state import (
    CONFIG_FILE,
    NET_PREFIX,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    _read_config,
    _read_weights,
    _verify,
    decode_fields,
    encode_fields,
)

FORMAT = "bitro-model/cross-slice-1"
MODELS = ("spahgc", "retrieval")
_JSON = {"codec": "json"}


def _parts(codec: str, kind: str) -> dict[str, str]:
    return {"codec": codec, "kind": kind}


@dataclass
class CrossSliceState:
    """Everything a cross-slice model is besides its network weights.

    Attributes
    ----------
    model
        ``"spahgc"`` or ``"retrieval"``.
    genes
        Predicted genes, in output order.
    setup
        :class:`~bitro.tl.SetupConfig` (target scale, ``use_rep``, ``n_components``, seed, keys).
    cross_slice
        :class:`~bitro.tl.CrossSliceConfig` (exemplars, graph, search method).
    net_config
        :class:`~bitro.models.SpaHGCConfig` (``None`` for retrieval).
    features
        The fitted spot-feature map (projections and training statistics).
    transform
        :class:`~bitro.tl.TargetTransform` (training target statistics).
    index
        :class:`~bitro.tl.ExemplarIndex` of every training spot with its normalised expression.
    encoder
        Provenance of the cell embedding (encoder, mode, dim, checkpoint hash).
    train_slides
        Names of the training slides (exemplars come from these only).
    slide_fingerprints
        Content hash of each training slide's spot features: a slide to predict with the same
        content (under any name) is refused.
    train
        :class:`~bitro.tl.TrainConfig` of the training run and its outcome (SpaHGC).
    history
        Per-epoch ``epoch``, ``train_loss``, ``val_loss``, ``contrastive_loss`` (SpaHGC).
    is_trained
        Whether the model is ready to predict.
    """

    model: str = field(default="spahgc", metadata=_JSON)
    genes: list[str] = field(default_factory=list, metadata=_JSON)
    setup: SetupConfig = field(default=None, metadata=_parts("options", "setup"))
    cross_slice: CrossSliceConfig = field(default=None, metadata=_parts("options", "cross_slice"))
    net_config: Any = field(default=None, metadata=_parts("options", "net"))
    features: Any = field(default=None, metadata=_parts("arrays", "features"))
    transform: Any = field(default=None, metadata=_parts("arrays", "target"))
    index: Any = field(default=None, metadata=_parts("arrays", "index"))
    encoder: dict[str, Any] = field(default_factory=dict, metadata=_JSON)
    train_slides: list[str] = field(default_factory=list, metadata=_JSON)
    slide_fingerprints: list[str] = field(default_factory=list, metadata=_JSON)
    train: dict[str, Any] = field(default_factory=dict, metadata=_JSON)
    history: dict[str, list[float]] = field(default_factory=dict, metadata=_JSON)
    is_trained: bool = field(default=False, metadata=_JSON)

    def encode(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: every array under ``<field>.<name>`` and the JSON description."""
        return encode_fields(self)

    @classmethod
    def decode(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> CrossSliceState:
        """Inverse of :meth:`encode`."""
        return decode_fields(cls, arrays, meta, _TYPES)


def _net_type() -> Any:
    from bitro.models import SpaHGCConfig

    return SpaHGCConfig


def _features_type() -> Any:
    from bitro.tl._spot_features import SpotFeatures

    return SpotFeatures


def _target_type() -> Any:
    from bitro.tl._targets import TargetTransform

    return TargetTransform


def _index_type() -> Any:
    from bitro.tl._exemplars import ExemplarIndex

    return ExemplarIndex


_TYPES = {
    "setup": lambda: SetupConfig,
    "cross_slice": lambda: CrossSliceConfig,
    "net": _net_type,
    "features": _features_type,
    "target": _target_type,
    "index": _index_type,
}


def write_cross_slice(
    path: Path, state: CrossSliceState, weights: dict[str, np.ndarray], *, bitro_version: str
) -> None:
    """Write ``config.json`` and ``model.safetensors`` into the (new, empty) folder ``path``."""
    from safetensors.numpy import save_file

    arrays, meta = state.encode()
    arrays.update({f"{NET_PREFIX}{k}": v for k, v in weights.items()})
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    config = {"format": FORMAT, "model": state.model, "bitro_version": bitro_version, "state": meta}
    config["integrity"] = {"arrays_sha256": arrays_sha256(arrays), "state_sha256": json_sha256(config)}
    save_file(arrays, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def read_cross_slice(path: str | Path, *, model: str) -> tuple[CrossSliceState, dict[str, np.ndarray]]:
    """Read and verify a cross-slice model folder of kind ``model``; return ``(state, network weights)``.

    Raises
    ------
    FileNotFoundError
        ``path`` is not a model folder.
    ValueError
        A pickle in the folder, an edited or truncated file (named), another kind of model, or a
        format this version cannot read.
    """
    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        msg = (
            f"{str(path)!r} is not a bitro model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}). Save one "
            "with model.save(path)."
        )
        raise FileNotFoundError(msg)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        msg = f"{str(path)!r} contains pickle-based files {pickles}; bitro never loads pickles. Remove them."
        raise ValueError(msg)
    config = _read_config(cfg_file)
    if config.get("format") != FORMAT:
        hint = (
            "load it with bt.tl.BiTroModel.load" if config.get("format") == "bitro-model/2" else "re-save it"
        )
        msg = f"{cfg_file} has format {config.get('format')!r}, not a cross-slice model ({FORMAT!r}); {hint}."
        raise ValueError(msg)
    if config.get("model") != model:
        other = {"spahgc": "SpaHGCModel", "retrieval": "RetrievalModel"}.get(config.get("model"), "?")
        msg = f"{path} holds a {config.get('model')!r} model; load it with bt.tl.{other}.load."
        raise ValueError(msg)
    arrays = _read_weights(w_file)
    _verify(config, arrays, cfg_file, w_file)
    weights = {k[len(NET_PREFIX) :]: v for k, v in arrays.items() if k.startswith(NET_PREFIX)}
    try:
        state = CrossSliceState.decode(arrays, config["state"])
    except (KeyError, TypeError, ValueError) as err:
        msg = f"{cfg_file} does not describe a valid model state ({type(err).__name__}: {err})."
        raise ValueError(msg) from err
    return state, weights
