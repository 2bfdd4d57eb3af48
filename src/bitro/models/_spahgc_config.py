"""Hyperparameters of :class:`~bitro.models.SpaHGCNet` and its training objective, as one frozen dataclass.

Defaults follow the SpaHGC description (``shared/spec/cross-slice.md``): a few heterogeneous layers,
a low feature-mask ratio on target nodes and a high one on reference nodes, edge dropping, an EMA
target encoder, and a regression loss ``MSE + 0.5 · (1 − gene PCC)`` plus small weights on the two
contrastive terms. Round-trips through JSON with :meth:`SpaHGCConfig.to_dict` / :meth:`from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

_INTS = ("n_genes", "in_dim", "hidden_dim", "num_layers", "heads")
_BOOLS = ("use_exemplars", "use_spatial")
#: (name, low, high, high_open): closed low bound, upper bound open or closed.
_FLOATS = (
    ("dropout", 0.0, 1.0, True),
    ("target_mask_ratio", 0.0, 0.5, False),
    ("reference_mask_ratio", 0.0, 0.5, False),
    ("edge_drop", 0.0, 1.0, True),
    ("ema_decay", 0.0, 1.0, False),
    ("pcc_weight", 0.0, None, True),
    ("target_contrast_weight", 0.0, None, True),
    ("reference_contrast_weight", 0.0, None, True),
    ("exemplar_residual_init", 0.0, None, True),
)


@dataclass(frozen=True)
class SpaHGCConfig:
    """Network and objective of the cross-slice exemplar graph model (SpaHGC).

    Parameters
    ----------
    n_genes
        Number of predicted genes ``G``; reference nodes carry ``G`` expression values.
    in_dim
        Width of a spot's image features (target nodes: ``in_dim``; reference nodes: ``in_dim + G``).
    hidden_dim
        Width ``D`` of every node representation; divisible by ``heads``.
    num_layers
        Heterogeneous message-passing layers (``HeteroConv``).
    heads
        Heads of the cross-node attention on reference → target edges.
    dropout
        Dropout on layer outputs and attention coefficients, in ``[0, 1)``.
    use_exemplars
        ``False`` is the ablation without reference nodes: only the spatial target–target graph.
    use_spatial
        ``False`` drops the target–target (spatial neighbour) convolution.
    target_mask_ratio, reference_mask_ratio
        Share of feature columns hidden in each contrastive view, per node type, in ``[0, 0.5]``: the
        two views hide disjoint columns (complementary masks), so every column is seen by one view.
    edge_drop
        Share of each edge type's edges dropped in each view, in ``[0, 1)``.
    ema_decay
        Momentum of the target encoder (an exponential moving average of the online encoder).
    pcc_weight
        Weight of ``1 − mean gene PCC`` (over the spots of a step) in the regression loss.
    target_contrast_weight, reference_contrast_weight
        Weights of the BGRL cosine loss on target and reference nodes; both 0 turns the masked graph
        contrastive learning off (the ablation; no views are built then).
    exemplar_residual_init
        Starting value of the per-gene scale of the pooled exemplar expression added to the prediction.
        0 (default): an untrained network predicts from its own representation and learns how much of
        the exemplars' expression to add; 1: it starts at the similarity-weighted exemplar mean (the
        retrieval baseline). Leave one HER2ST section out (whole sections, 3 seeds), starting at 1 held
        the model near retrieval: normalised PCC_gene 0.120 against 0.157 from 0 (5 of 5 sections).
    """

    n_genes: int
    in_dim: int
    hidden_dim: int = 128
    num_layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    use_exemplars: bool = True
    use_spatial: bool = True
    target_mask_ratio: float = 0.1
    reference_mask_ratio: float = 0.5
    edge_drop: float = 0.2
    ema_decay: float = 0.99
    pcc_weight: float = 0.5
    target_contrast_weight: float = 0.1
    reference_contrast_weight: float = 0.1
    exemplar_residual_init: float = 0.0

    def __post_init__(self) -> None:
        for name in _INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"SpaHGCConfig.{name} must be an integer ≥ 1, got {value!r}."
                raise ValueError(msg)
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                msg = f"SpaHGCConfig.{name} must be True or False, got {getattr(self, name)!r}."
                raise ValueError(msg)
        for name, low, high, high_open in _FLOATS:
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= low
            if ok and high is not None:
                ok = value < high if high_open else value <= high
            if not ok:
                span = f"[{low:g}, ∞)" if high is None else f"[{low:g}, {high:g}{')' if high_open else ']'}"
                msg = f"SpaHGCConfig.{name} must be a number in {span}, got {value!r}."
                raise ValueError(msg)
        if self.hidden_dim % self.heads:
            msg = f"SpaHGCConfig.hidden_dim ({self.hidden_dim}) must be divisible by heads ({self.heads})."
            raise ValueError(msg)

    @property
    def contrastive(self) -> bool:
        """Whether the masked graph contrastive loss is on (a positive weight on either node type)."""
        weights = (self.target_contrast_weight, self.reference_contrast_weight if self.use_exemplars else 0)
        return any(w > 0 for w in weights)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpaHGCConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError`` listing the valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            msg = f"Unknown SpaHGCConfig field(s) {unknown}; valid fields are {sorted(known)}."
            raise ValueError(msg)
        return cls(**data)

    def replace(self, **changes: Any) -> SpaHGCConfig:
        """A copy with ``changes`` applied (validated again)."""
        return type(self).from_dict({**self.to_dict(), **changes})
