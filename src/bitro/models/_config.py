"""Hyperparameters of :class:`~bitro.models.BiTroNet` as one frozen, validated dataclass.

The config is the only place where the network's defaults live. It round-trips through JSON with
:meth:`BiTroConfig.to_dict` / :meth:`BiTroConfig.from_dict`, which is how checkpoints store it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

_OUTPUTS = ("linear", "softplus")
_POOLINGS = ("gene_query", "mean")


def automatic_skip(use_gat: Any, use_transformer: Any) -> bool:
    """The skip that ``skip=None`` resolves to: on exactly when the network has a trunk.

    Without the GAT and the Transformer the head already reads each cell's own features, and a second
    copy of them cost accuracy (see the benchmarks page); past a trunk the skip keeps cells of a spot apart.
    """
    return bool(use_gat is True or use_transformer is True)


@dataclass(frozen=True)
class BiTroConfig:
    """Hyperparameters of the BiTro network (paper §3.3–3.4, spec §3).

    Parameters
    ----------
    n_genes
        Number of predicted genes ``G`` (one query per gene).
    in_dim
        Dimension of the input cell features (the PCA projection; paper: 128).
    hidden_dim
        Model width ``D``; must be divisible by ``transformer_heads``.
    gat_layers
        Number of stacked GAT layers ``L`` (paper: 2).
    gat_heads
        Attention heads per GAT layer, concatenated then projected back to ``D`` (paper: 4).
    pos_bins
        Number of quantisation bins per axis of the bag-relative position lookup tables (Eq. 6).
    transformer_layers
        Pre-norm Transformer encoder layers over the cells of a bag.
    transformer_heads
        Self-attention heads.
    ffn_dim
        Hidden width of the Transformer feed-forward block.
    dropout
        Dropout rate in ``[0, 1)`` (GAT attention and outputs, Transformer attention, FFN and residuals);
        the trunk-free default network has no dropout layer, so it applies only with ``use_gat`` or
        ``use_transformer``.
    output
        ``"linear"`` (identity; for z-scored targets, the default) or ``"softplus"`` (non-negative
        raw-scale targets only).
    use_gat, use_transformer
        The paper's local (GAT over the kNN graph) and global (Transformer over the bag) trunk. Both
        **off by default** since 0.2: on the benchmarks they do not carry their weight. Leave one section
        out on HER2ST (5 folds × 3 seeds) the count head without them scores higher (normalised
        PCC_gene 0.169 vs 0.158, paired +0.011 ± 0.006, higher in 14 of 15 runs; raw 0.252 vs 0.241) in
        about 60 % of the fit time, and on synthetic tissue with known cells its pseudo-cells are clearly
        better (0.199 vs 0.164 and 0.207 vs 0.180 on the two layouts: the trunk makes the cells of a spot
        alike; docs/benchmarks.md, "Component ablations" and "Pseudo single cells"). ``use_gat=True, use_transformer=True``
        restores the paper's network. Without GAT the cell features only go through the input projection.
    use_position
        Add the learned x/y position tables (Eq. 6) to the projected cell features.
    pooling
        ``"gene_query"`` (gene-specific attention MIL, Eqs. 7–9) or ``"mean"`` (ablation: mean over the
        bag's cells, then a readout with one output per gene).
    readout_hidden
        Hidden width of the shared readout MLP.
    use_cell_count
        Extension, off by default (paper-faithful): feed ``log1p(cells in the bag)`` to the head.
        Softmax pooling cannot see how many cells a bag holds, while raw counts scale with it.
    head
        ``"cell_counts"`` (default): every cell gets its own non-negative expected counts and a bag is
        their sum (:class:`~bitro.models.CellCountHead`), so cells sum exactly to their spot and any cell
        can be predicted. ``"attention"``: the paper's gene-query head — a bag is predicted from its
        pooled cells and split back over them by attention (Eq. 10; ``pooling`` and ``readout`` apply).
        The cell benchmark (docs/benchmarks.md) chose the default: on synthetic tissue with known cells the
        count head's cells beat the equal split of its own spots by 1.8–1.9× (attention: 0.87–0.95×, its
        attention is nearly uniform) and its spots are at least as accurate.
    skip
        ``head="cell_counts"``: feed each cell's own projected input features to the head beside the
        trunk's contextual features (the trunk makes the cells of a bag alike). ``None`` (default): on
        exactly when the network has a trunk (``use_gat`` or ``use_transformer``). Without a trunk the
        head already reads each cell's own features, and the extra copy costs accuracy: leave one HER2ST
        section out, 5 folds × 3 seeds, normalised PCC_gene 0.169 without it vs 0.162 with it (paired
        +0.007 ± 0.007, higher in 13 of 15 runs; raw +0.014), and the same pseudo-cells on synthetic
        tissue (0.199 / 0.207 vs 0.199 / 0.203).
    readout
        ``"gene"`` (default; extension: the hidden layer is shared, the last linear layer has one weight
        vector and bias per gene) or ``"shared"`` (the paper's Eq. 9: one readout MLP for every gene). With a
        shared readout a gene's value can depend on its pooled vector only, so gene specificity must come
        from attention alone; the per-gene output lets each gene weigh the pooled features itself. On
        held-out synthetic slides the shared readout barely moved off the training mean (library-size
        PCC_gene 0.05) while the per-gene output reached 0.29 (ridge probe: 0.33).
    """

    n_genes: int
    in_dim: int = 128
    hidden_dim: int = 128
    gat_layers: int = 2
    gat_heads: int = 4
    pos_bins: int = 64
    transformer_layers: int = 2
    transformer_heads: int = 4
    ffn_dim: int = 256
    dropout: float = 0.1
    output: Literal["linear", "softplus"] = "linear"
    use_gat: bool = False
    use_transformer: bool = False
    use_position: bool = True
    pooling: Literal["gene_query", "mean"] = "gene_query"
    readout_hidden: int = 64
    use_cell_count: bool = False
    readout: Literal["shared", "gene"] = "gene"
    head: Literal["attention", "cell_counts"] = "cell_counts"
    skip: bool | None = None

    def __post_init__(self) -> None:
        for name in (
            "n_genes",
            "in_dim",
            "hidden_dim",
            "gat_layers",
            "gat_heads",
            "pos_bins",
            "transformer_layers",
            "transformer_heads",
            "ffn_dim",
            "readout_hidden",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"BiTroConfig.{name} must be an integer ≥ 1, got {value!r}."
                raise ValueError(msg)
        if self.skip is None:
            object.__setattr__(self, "skip", automatic_skip(self.use_gat, self.use_transformer))
        for name in ("use_gat", "use_transformer", "use_position", "use_cell_count", "skip"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                msg = f"BiTroConfig.{name} must be True or False, got {value!r}."
                raise ValueError(msg)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0 <= self.dropout < 1
        ):
            msg = f"BiTroConfig.dropout must be a number in [0, 1), got {self.dropout!r}."
            raise ValueError(msg)
        if self.output not in _OUTPUTS:
            msg = (
                f"BiTroConfig.output must be one of {_OUTPUTS}, got {self.output!r}. Use 'linear' for "
                "z-scored targets and 'softplus' only for non-negative raw-scale targets."
            )
            raise ValueError(msg)
        if self.pooling not in _POOLINGS:
            msg = f"BiTroConfig.pooling must be one of {_POOLINGS}, got {self.pooling!r}."
            raise ValueError(msg)
        from bitro.models._heads import HEADS

        if self.head not in HEADS:
            msg = f"BiTroConfig.head must be one of {tuple(HEADS)}, got {self.head!r}."
            raise ValueError(msg)
        if self.head == "cell_counts" and self.output != "linear":
            msg = "BiTroConfig.output applies to the attention head only; keep output='linear' with head='cell_counts'."
            raise ValueError(msg)
        if self.readout not in ("shared", "gene"):
            msg = f"BiTroConfig.readout must be 'shared' or 'gene', got {self.readout!r}."
            raise ValueError(msg)
        if self.hidden_dim % self.transformer_heads:
            msg = (
                f"BiTroConfig.hidden_dim ({self.hidden_dim}) must be divisible by transformer_heads "
                f"({self.transformer_heads}); change one of them."
            )
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BiTroConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            msg = f"Unknown BiTroConfig field(s) {unknown}; valid fields are {sorted(known)}."
            raise ValueError(msg)
        return cls(**data)

    def replace(self, **changes: Any) -> BiTroConfig:
        """Return a copy with ``changes`` applied (validated again).

        A ``skip`` that matches its automatic value follows the trunk of the copy unless ``changes`` set it.
        """
        data = {**self.to_dict(), **changes}
        if "skip" not in changes and self.skip == automatic_skip(self.use_gat, self.use_transformer):
            data["skip"] = None
        return type(self).from_dict(data)
