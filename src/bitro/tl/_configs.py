"""The two option sets of a BiTro model, each declared once: :class:`SetupConfig` and :class:`TrainConfig`.

``SetupConfig`` says how training data become bags and targets (feature projection, phenotypes, graph,
target scale, table keys, seed); it is fixed when a model is built and saved with it. ``TrainConfig``
says how the network is optimised. :func:`bitro.tl.fit`, :func:`bitro.tl.transfer`,
:meth:`bitro.tl.BiTroModel.train` and the ``bitro`` command line all take their options from these
dataclasses: the command line builds one option per field (``--max-epochs``, ``--context-um``, ...)
from the field's type and ``help`` metadata, so every option exists once, with one default.

Defaults are the settings the accuracy benchmark found best (``benchmarks/accuracy.py``, leave one
HER2ST section out, docs/benchmarks.md): learning rate 1e-3 (0.141 vs 0.108 normalised PCC_gene for the
paper's 1e-4 on C2), at most 30 epochs with patience 6, and library-size normalised targets (0.134 vs
0.083 normalised PCC_gene for raw-count targets over the five folds).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, TypeVar

from bitro import _keys as K

_C = TypeVar("_C", bound="_Options")
TARGETS = ("raw", "library_size")
LOSSES = ("mse", "poisson")


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


class _Options:
    """Shared behaviour of the option dataclasses: dict round trip, unknown-name errors, replace."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Field names, in declaration order."""
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any] | None) -> _C:
        """Build from a dict of fields; unknown names raise ``ValueError`` listing the valid ones."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.names()))
        if unknown:
            msg = f"Unknown {cls.__name__} option(s) {unknown}; valid options are {sorted(cls.names())}."
            raise ValueError(msg)
        return cls(**data)

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` applied (validated again)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Default value of every field."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}  # type: ignore[arg-type]


def _check_int(cls_name: str, name: str, value: Any, *, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or None" if allow_none else ""
        msg = f"{cls_name}.{name} must be an integer ≥ {low}{extra}, got {value!r}."
        raise ValueError(msg)


def _check_float(cls_name: str, name: str, value: Any, *, low: float, high: float | None = None,
                 low_open: bool = False, high_open: bool = True) -> None:  # fmt: skip
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        span = f"{lo}{low:g}, {high:g}{hi}" if high is not None else f"{lo}{low:g}, ∞)"
        msg = f"{cls_name}.{name} must be a number in {span}, got {value!r}."
        raise ValueError(msg)


@dataclass(frozen=True)
class TrainConfig(_Options):
    """How the network is optimised (Adam, gradient clipping, early stopping on training data).

    Parameters
    ----------
    max_epochs
        Upper bound on epochs (benchmark best: 30; the paper allows 100).
    lr
        Adam learning rate (benchmark best: 1e-3; the paper's 1e-4 scores lower and stops early).
    weight_decay
        Adam weight decay.
    batch_size
        Bags per optimiser step at spot level (bulk level: one slide per step).
    patience
        Epochs without validation improvement before stopping (paper: 6).
    validation_fraction
        Share of the training units held out for early stopping, in ``[0, 1)`` (spots at spot level,
        slides at bulk level when there are at least three). 0 trains for ``max_epochs`` without early
        stopping. The split is drawn from the training data only, never from a held-out slide.
    grad_clip
        Gradient-norm clip (paper: 1.0).
    max_cells_per_step
        Bulk level: run a slide with more cells than this in chunks of at most this many cells (context
        cells included), each under gradient checkpointing, and backpropagate the slide's loss once, so
        peak memory follows the chunk instead of the slide (same loss up to float rounding). ``None``:
        whole slide at once. Ignored at spot level (``batch_size`` bounds the step).
    checkpoint_dir
        Save the training state there after every epoch (safetensors + JSON, no pickle); a rerun with
        the same model, data and seed resumes from it and gives the result of an uninterrupted run.
    device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``; ``None`` means ``bt.settings.device``.
    """

    max_epochs: int = _opt(30, "maximum epochs")
    lr: float = _opt(1e-3, "Adam learning rate")
    weight_decay: float = _opt(0.0, "Adam weight decay")
    batch_size: int = _opt(32, "bags per optimiser step at spot level")
    patience: int = _opt(6, "epochs without validation improvement before stopping")
    validation_fraction: float = _opt(0.1, "share of training units held out for early stopping, in [0, 1)")
    grad_clip: float = _opt(1.0, "gradient-norm clip")
    max_cells_per_step: int | None = _opt(
        10_000, "bulk level: cells per forward chunk; none: whole slide at once"
    )
    checkpoint_dir: str | None = _opt(
        None, "folder for per-epoch training checkpoints (resume after a kill)", shown="none"
    )
    device: str | None = _opt(None, "auto, cpu, cuda or mps", shown="bt.settings.device", cli=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_int(name, "max_epochs", self.max_epochs, low=1)
        _check_int(name, "batch_size", self.batch_size, low=1)
        _check_int(name, "patience", self.patience, low=1)
        _check_int(name, "max_cells_per_step", self.max_cells_per_step, low=1, allow_none=True)
        _check_float(name, "lr", self.lr, low=0.0, low_open=True)
        _check_float(name, "weight_decay", self.weight_decay, low=0.0)
        _check_float(name, "validation_fraction", self.validation_fraction, low=0.0, high=1.0)
        _check_float(name, "grad_clip", self.grad_clip, low=0.0, low_open=True)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            object.__setattr__(self, "checkpoint_dir", str(self.checkpoint_dir))
        if self.device is not None and not isinstance(self.device, str):
            msg = f"TrainConfig.device must be a string such as 'cpu' or None, got {self.device!r}."
            raise ValueError(msg)


@dataclass(frozen=True)
class SetupConfig(_Options):
    """How training slides become bags of cells and targets; fixed when a model is built, saved with it.

    Parameters
    ----------
    target
        ``"library_size"`` (log1p of counts rescaled to the training median library size; benchmark
        best on the gene-specific, normalised scale) or ``"raw"`` (log1p of raw counts, the paper's;
        best on the raw scale, where spot depth dominates). Bulk level always compares log1p(TPM).
    zscore
        Standardise each gene's log1p target with the training mean and standard deviation (paper
        Eq. 21). ``False`` is the ablation (spot level only).
    loss
        Spot-level loss: ``"mse"`` between predicted and observed z-scored log1p expression (every gene
        weighs the same, like PCC_gene), or ``"poisson"``: the likelihood of the observed counts — with
        ``target="library_size"`` the spot's library size is an offset (only the composition is fitted,
        a multinomial), with ``target="raw"`` the depth is predicted too.
    use_rep
        Cell embedding in ``cells.obsm`` (``bt.pp.embed_cells``).
    n_components
        PCA dimension ``D`` of the cell features (paper: 128).
    n_phenotypes
        k-means phenotypes for the phenotype labels and the cluster loss (paper: 8).
    cluster_weight
        λ of the cluster loss; ``None``: the level's default (0 at spot level, 0.1 at bulk level, the
        paper's ablation).
    k
        Neighbours per cell in the within-bag kNN graph (paper: 8).
    context_um
        Let the Transformer also see the cells within this distance around each bag as extra
        keys/values (not pooled by the gene head); ``None``: off. Needs a network with a Transformer
        (``config={"use_transformer": True}``; the default has none).
    seed
        Seed of the PCA, k-means, initialisation, splits and batches; ``None``: ``bt.settings.seed``.
    spots_key, cells_key, patches_key, bulk_key
        Tables of the spots, cells, bulk patches and bulk profile (e.g. ``cells_key="cells_truth"`` for
        pseudo-spots of cell-resolved data).
    """

    target: str = _opt("library_size", "target scale: library_size or raw", choices=TARGETS)
    zscore: bool = _opt(True, "z-score each gene's log1p target with training statistics (paper Eq. 21)")
    loss: str = _opt(
        "mse", "spot loss: mse on z-scored log1p targets, or poisson on the counts", choices=LOSSES
    )
    use_rep: str = _opt(K.EMBEDDING, "cell embedding in cells.obsm")
    n_components: int = _opt(128, "PCA dimension of the cell features")
    n_phenotypes: int = _opt(8, "k-means phenotypes")
    cluster_weight: float | None = _opt(None, "λ of the cluster loss", shown="the level's: 0 spot, 0.1 bulk")
    k: int = _opt(8, "neighbours per cell in the within-bag graph")
    context_um: float | None = _opt(
        None, "cells within this distance (µm) around each bag join as context", shown="off"
    )
    seed: int | None = _opt(None, "random seed", shown="bt.settings.seed")
    spots_key: str = _opt(K.SPOTS, "spots table")
    cells_key: str = _opt(K.CELLS, "cells table")
    patches_key: str = _opt(K.PATCHES, "bulk patches table")
    bulk_key: str = _opt(K.BULK, "bulk profile table")

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.target not in TARGETS:
            msg = f"{name}.target must be one of {TARGETS}, got {self.target!r}."
            raise ValueError(msg)
        if self.loss not in LOSSES:
            msg = f"{name}.loss must be one of {LOSSES}, got {self.loss!r}."
            raise ValueError(msg)
        if not isinstance(self.zscore, bool):
            msg = f"{name}.zscore must be True or False, got {self.zscore!r}."
            raise ValueError(msg)
        _check_int(name, "n_components", self.n_components, low=1)
        _check_int(name, "n_phenotypes", self.n_phenotypes, low=1)
        _check_int(name, "k", self.k, low=1)
        _check_int(name, "seed", self.seed, low=0, allow_none=True)
        if self.cluster_weight is not None:
            _check_float(name, "cluster_weight", self.cluster_weight, low=0.0)
        if self.context_um in (0, 0.0):
            object.__setattr__(self, "context_um", None)
        if self.context_um is not None:
            _check_float(name, "context_um", self.context_um, low=0.0, low_open=True)
        for key in ("use_rep", "spots_key", "cells_key", "patches_key", "bulk_key"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                msg = f"{name}.{key} must be a non-empty string, got {getattr(self, key)!r}."
                raise ValueError(msg)

    @property
    def keys(self) -> dict[str, str]:
        """Table names by role: ``spots``, ``cells``, ``patches``, ``bulk``."""
        return {
            "spots": self.spots_key,
            "cells": self.cells_key,
            "patches": self.patches_key,
            "bulk": self.bulk_key,
        }


def split_options(options: dict[str, Any], *, allowed: tuple[type[_Options], ...]) -> list[dict[str, Any]]:
    """Split flat keyword options by the dataclass that declares each; unknown names raise.

    Returns one dict per class in ``allowed``, in order.
    """
    parts: list[dict[str, Any]] = [{} for _ in allowed]
    owner = {name: i for i, cls in enumerate(allowed) for name in cls.names()}
    unknown = sorted(set(options) - set(owner))
    if unknown:
        valid = sorted(owner)
        msg = f"Unknown option(s) {unknown}; valid options are {valid} (network options go in config=)."
        raise TypeError(msg)
    for name, value in options.items():
        parts[owner[name]][name] = value
    return parts
