"""Everything a BiTro model is besides its network weights, as one declared state; saved and loaded by iteration.

:class:`ModelState` lists its parts once. Each field carries a *codec* in its metadata that says how it
is stored: ``"json"`` (a JSON value in ``config.json``), ``"options"`` (a config dataclass stored as its
dict) or ``"arrays"`` (an object with ``arrays()`` / ``meta()`` / ``from_arrays()``: its arrays go into
``model.safetensors`` under ``<field>.``, its metadata into ``config.json``). :func:`save_model` and
:func:`load_model` walk the fields, so a new part of the state is one new field.

The model folder is ``config.json`` + ``model.safetensors`` and nothing else (no pickle is ever
written or read). ``config.json`` records a content hash of every array (weights included) and of the
state itself, verified at load: weights replaced by other tensors of the same shapes, or an edited
``k``/target statistic, are refused with the name of the file that changed. Models saved by bitro
0.x before this format (``bitro-model/1``) still load, without a hash to verify (a warning says so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bitro._files import ENSEMBLE_FILE
from bitro._hashing import arrays_sha256, json_sha256
from bitro._logging import logger
from bitro.tl._configs import SetupConfig, TrainConfig

FORMAT = "bitro-model/2"
LEGACY_FORMATS = ("bitro-model/1",)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NET_PREFIX = "net."
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib")


_JSON = {"codec": "json"}


def _parts(codec: str, kind: str) -> dict[str, str]:
    return {"codec": codec, "kind": kind}


@dataclass
class ModelState:
    """The fitted, non-network parts of a BiTro model.

    Attributes
    ----------
    level
        ``"spot"`` or ``"bulk"`` (the level it was trained on).
    genes
        Predicted genes, in output order.
    setup
        The :class:`~bitro.tl.SetupConfig` (target scale, keys, ``k``, ``context_um``, seed, ...), with
        ``seed`` and ``cluster_weight`` resolved.
    net_config
        The :class:`~bitro.models.BiTroConfig` of the network.
    projection
        :class:`~bitro.pp.FeatureProjection` of the cell embeddings (fitted on the training cells).
    phenotypes
        :class:`~bitro.pp.PhenotypeModel` (k-means centroids in the projected space).
    transform
        :class:`~bitro.tl.TargetTransform` (per-gene target statistics).
    encoder
        Provenance of the cell embedding the model was trained on (encoder, mode, dim, checkpoint hash).
    domain
        :func:`~bitro.tl.domain_stats` of each training slide (depth, nuclei per spot, nucleus size,
        stain, embedding): what :meth:`~bitro.tl.BiTroModel.domain_report` compares a new slide with.
    bag_size_um
        Diameter (or side) of the training bags in µm; cells outside every unit of a slide are
        predicted in square bins of this size when the slide records none.
    train_slides
        Names of the training slides.
    train
        The :class:`~bitro.tl.TrainConfig` of the last training run and its outcome (``best_loss``,
        ``epochs_run``, unit counts).
    history
        Per-epoch ``epoch``, ``train_loss``, ``val_loss``.
    is_trained
        Whether :meth:`~bitro.tl.BiTroModel.train` has run.
    lora
        LoRA settings (``rank``, ``alpha``, ``dropout``) when the network carries adapters.
    transferred_from
        ``level``, ``weights_sha256`` and ``method`` of the model this one was transferred from.
    """

    level: str = field(default="spot", metadata=_JSON)
    genes: list[str] = field(default_factory=list, metadata=_JSON)
    setup: SetupConfig = field(default=None, metadata=_parts("options", "setup"))
    net_config: Any = field(default=None, metadata=_parts("options", "net"))
    projection: Any = field(default=None, metadata=_parts("arrays", "projection"))
    phenotypes: Any = field(default=None, metadata=_parts("arrays", "phenotypes"))
    transform: Any = field(default=None, metadata=_parts("arrays", "target"))
    encoder: dict[str, Any] = field(default_factory=dict, metadata=_JSON)
    bag_size_um: float | None = field(default=None, metadata=_JSON)
    domain: list[dict[str, Any]] = field(default_factory=list, metadata=_JSON)
    train_slides: list[str] = field(default_factory=list, metadata=_JSON)
    train: dict[str, Any] = field(default_factory=dict, metadata=_JSON)
    history: dict[str, list[float]] = field(
        default_factory=lambda: {"epoch": [], "train_loss": [], "val_loss": []}, metadata=_JSON
    )
    is_trained: bool = field(default=False, metadata=_JSON)
    lora: dict[str, Any] | None = field(default=None, metadata=_JSON)
    transferred_from: dict[str, Any] | None = field(default=None, metadata=_JSON)

    # ------------------------------------------------------------------ encoding
    def encode(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: every array under ``<field>.<name>`` and the JSON description."""
        return encode_fields(self)

    @classmethod
    def decode(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> ModelState:
        """Inverse of :meth:`encode`."""
        return decode_fields(cls, arrays, meta, {**_OPTION_TYPES, **_ARRAY_TYPES})


def encode_fields(state: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` of a state dataclass whose fields declare ``metadata["codec"]``.

    ``"json"`` fields go to ``meta`` as they are; ``"options"`` fields as ``to_dict()``; ``"arrays"``
    fields as ``meta()`` with their ``arrays()`` stored under ``<field>.<name>``. ``None`` stays ``None``.
    Shared by :class:`ModelState` and the cross-slice models' state.
    """
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for f in fields(state):
        value, codec = getattr(state, f.name), f.metadata["codec"]
        if codec == "json":
            meta[f.name] = value
        elif value is None:
            meta[f.name] = None
        elif codec == "options":
            meta[f.name] = value.to_dict()
        else:
            arrays.update({f"{f.name}.{k}": np.asarray(v) for k, v in value.arrays().items()})
            meta[f.name] = value.meta()
    return arrays, json.loads(json.dumps(meta, default=_json_default))


def decode_fields(
    cls: Any, arrays: dict[str, np.ndarray], meta: dict[str, Any], types: dict[str, Any]
) -> Any:
    """Inverse of :func:`encode_fields`; ``types[kind]()`` gives the class of a field's ``metadata["kind"]``."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in meta:
            continue
        raw, codec = meta[f.name], f.metadata["codec"]
        if codec == "json" or raw is None:
            values[f.name] = raw
        elif codec == "options":
            values[f.name] = types[f.metadata["kind"]]().from_dict(raw)
        else:
            prefix = f"{f.name}."
            part = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            values[f.name] = types[f.metadata["kind"]]().from_arrays(part, raw)
    return cls(**values)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer | np.floating | np.bool_):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    msg = f"not JSON serialisable: {type(obj).__name__}"
    raise TypeError(msg)


def _net_config_type() -> Any:
    from bitro.models import BiTroConfig

    return BiTroConfig


_OPTION_TYPES = {"setup": lambda: SetupConfig, "net": _net_config_type, "train": lambda: TrainConfig}


def _projection_type() -> Any:
    from bitro.pp._projection import FeatureProjection

    return FeatureProjection


def _phenotype_type() -> Any:
    from bitro.pp._phenotypes import PhenotypeModel

    return PhenotypeModel


def _target_type() -> Any:
    from bitro.tl._targets import TargetTransform

    return TargetTransform


_ARRAY_TYPES = {"projection": _projection_type, "phenotypes": _phenotype_type, "target": _target_type}


# ---------------------------------------------------------------------------------------- files
def save_model(path: Path, state: ModelState, weights: dict[str, np.ndarray], *, bitro_version: str) -> None:
    """Write ``config.json`` and ``model.safetensors`` into the (new, empty) folder ``path``."""
    from safetensors.numpy import save_file

    arrays, meta = state.encode()
    arrays.update({f"{NET_PREFIX}{k}": v for k, v in weights.items()})
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    config = {"format": FORMAT, "bitro_version": bitro_version, "state": meta}
    config["integrity"] = {"arrays_sha256": arrays_sha256(arrays), "state_sha256": json_sha256(config)}
    save_file(arrays, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def read_model_files(path: str | Path) -> tuple[ModelState, dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify a model folder; return ``(state, network weights, config)``.

    Raises
    ------
    FileNotFoundError
        ``path`` is not a folder with ``config.json`` and ``model.safetensors``.
    ValueError
        A pickle-based file in the folder, a truncated or edited file (named in the message), or a
        format this version cannot read.
    """
    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        what = "a file" if path.is_file() else ("missing" if not path.exists() else "a folder without them")
        if (path / ENSEMBLE_FILE).is_file():
            what = "an ensemble of models: load it with bt.tl.BiTroEnsemble.load"
        msg = (
            f"{str(path)!r} is not a bitro model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}; it is "
            f"{what}). Save one with model.save(path) or `bitro fit --out`."
        )
        raise FileNotFoundError(msg)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        msg = f"{str(path)!r} contains pickle-based files {pickles}; bitro never loads pickles. Remove them."
        raise ValueError(msg)
    config = _read_config(cfg_file)
    arrays = _read_weights(w_file)
    fmt = config.get("format")
    if fmt in LEGACY_FORMATS:
        logger.warning(
            "%s was saved by bitro %s (format %s), which records no content hash: its integrity cannot be "
            "checked. Load and save it again to add one.",
            path,
            config.get("bitro_version", "?"),
            fmt,
        )
        meta = _legacy_meta(config)
        arrays = {(f"transform.{k[7:]}" if k.startswith("target.") else k): v for k, v in arrays.items()}
    elif fmt == FORMAT:
        _verify(config, arrays, cfg_file, w_file)
        meta = config["state"]
    else:
        msg = (
            f"{cfg_file} has format {fmt!r}; this bitro reads {FORMAT!r} (and {list(LEGACY_FORMATS)}). "
            "Load it with the bitro version that saved it."
        )
        raise ValueError(msg)
    weights = {k[len(NET_PREFIX) :]: v for k, v in arrays.items() if k.startswith(NET_PREFIX)}
    try:
        state = ModelState.decode(arrays, meta)
    except (KeyError, TypeError, ValueError) as err:
        msg = f"{cfg_file} does not describe a valid model state ({type(err).__name__}: {err})."
        raise ValueError(msg) from err
    return state, weights, config


def _read_config(cfg_file: Path) -> dict[str, Any]:
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        msg = f"{cfg_file} is not valid JSON (truncated or edited?): {err}. Re-save the model."
        raise ValueError(msg) from err
    if not isinstance(config, dict) or not str(config.get("format", "")).startswith("bitro-model/"):
        msg = f"{cfg_file} is not a bitro model config (a JSON object with format 'bitro-model/...')."
        raise ValueError(msg)
    return config


def _read_weights(w_file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(w_file))
    except Exception as err:  # safetensors raises its own error types for truncated / garbled files
        msg = (
            f"{w_file} is not a readable safetensors file (truncated or corrupt?): {err}. Re-save the model."
        )
        raise ValueError(msg) from err


def _verify(config: dict[str, Any], arrays: dict[str, np.ndarray], cfg_file: Path, w_file: Path) -> None:
    integrity = config.get("integrity")
    if not isinstance(integrity, dict) or not {"arrays_sha256", "state_sha256"} <= set(integrity):
        msg = f"{cfg_file} has no content hash (integrity record); it was edited or is incomplete."
        raise ValueError(msg)
    body = {k: v for k, v in config.items() if k != "integrity"}
    if json_sha256(body) != integrity["state_sha256"]:
        msg = (
            f"{cfg_file} was changed after the model was saved (its content hash does not match): an edited "
            "setting such as k, the genes or a target statistic would shift every prediction. Restore the "
            "file or re-train."
        )
        raise ValueError(msg)
    if arrays_sha256(arrays) != integrity["arrays_sha256"]:
        msg = (
            f"{w_file} does not hold the arrays this model was saved with (content hash mismatch: weights or "
            "statistics replaced or corrupted). Restore the file or re-train."
        )
        raise ValueError(msg)


def _legacy_meta(config: dict[str, Any]) -> dict[str, Any]:
    """The state description of a ``bitro-model/1`` config (fields were listed one by one)."""
    target = config.get("target", {})
    setup = {
        "target": target.get("scale", "raw"),
        "zscore": bool(target.get("zscore", True)),
        "use_rep": config["use_rep"],
        "n_components": int(config["projection"]["n_components"]),
        "n_phenotypes": int(config["phenotypes"]["n_clusters"]),
        "cluster_weight": config.get("cluster_weight"),
        "k": int(config["k"]),
        "context_um": config.get("context_um"),
        "seed": config.get("seed"),
        **{f"{role}_key": key for role, key in config.get("keys", {}).items()},
    }
    return {
        "level": config["level"],
        "genes": config["genes"],
        "setup": setup,
        "net_config": config["net_config"],
        "projection": config["projection"],
        "phenotypes": config["phenotypes"],
        "transform": target,
        "encoder": config.get("encoder", {}),
        "train_slides": config.get("train_slides", []),
        "train": config.get("train_params", {}),
        "history": config.get("history", {"epoch": [], "train_loss": [], "val_loss": []}),
        "is_trained": config.get("is_trained", True),
        "lora": config.get("lora"),
        "transferred_from": config.get("transferred_from"),
    }
