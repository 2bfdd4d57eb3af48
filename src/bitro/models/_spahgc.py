"""SpaHGC: a heterogeneous graph of a slide's spots and their cross-slide exemplars → gene expression.

Graph (built outside, e.g. by :func:`bitro.tl.build_hetero_graph`)
--------------------------------------------------------------------
Node types:

- ``"target"``: the spots being predicted, ``x`` ``(T, in_dim)`` image features.
- ``"reference"``: for each target, its retrieved exemplars (spots of *other*, measured slides), one
  node per (target, exemplar) pair, ``x`` ``(R, in_dim + G)`` = ``[image features ‖ expression]``.

Edge types (``edge_index`` ``(2, E)`` long, source row first):

- :data:`SPATIAL_EDGE` ``("target", "near", "target")``: spatial neighbours on the slide (both directions).
- :data:`EXEMPLAR_EDGE` ``("reference", "exemplar_of", "target")``: each target from its exemplars,
  with ``similarity`` ``(E,)`` (cosine of the image features).
- :data:`REFERENCE_EDGE` ``("reference", "similar", "reference")``: kNN among a target's exemplars.

Layers: ``num_layers`` × ``HeteroConv`` with GraphSAGE on the two same-type edge sets and a
:class:`CrossNodeAttention` on reference → target edges (keys and values from the exemplars'
representation, which starts from embedding ‖ expression); then :class:`ExemplarPooling` pools each
target's exemplars by attention and a gene head reads ``[target ‖ pooled exemplars]``, plus a per-gene
scale of the pooled exemplar expression (starts at ``config.exemplar_residual_init``: 0 by default,
so the network learns how much of the exemplar mean to add; 1 starts it at the similarity-weighted
exemplar mean).

Output of :meth:`SpaHGCNet.forward`: ``dict(y=(T, G), target=(T, D), reference=(R, D),
weights=(E,))`` — predictions in the target space, final node representations and the pooling
weights of the exemplar edges (they sum to 1 per target).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch_geometric.nn import HeteroConv, MessagePassing, SAGEConv
from torch_geometric.utils import scatter, softmax

from bitro.models._spahgc_config import SpaHGCConfig

TARGET = "target"
REFERENCE = "reference"
SPATIAL_EDGE = (TARGET, "near", TARGET)
EXEMPLAR_EDGE = (REFERENCE, "exemplar_of", TARGET)
REFERENCE_EDGE = (REFERENCE, "similar", REFERENCE)
EDGE_TYPES = (SPATIAL_EDGE, EXEMPLAR_EDGE, REFERENCE_EDGE)


class CrossNodeAttention(MessagePassing):
    """Multi-head attention from source nodes (keys, values) to destination nodes (queries) along edges.

    ``forward((x_src (S, D), x_dst (T, D)), edge_index (2, E), similarity (E,) | None) -> (T, D)``.
    The softmax runs over each destination's incoming edges; a learned per-head weight of the edge's
    ``similarity`` is added to the logits. Destinations without edges get zeros.

    Parameters
    ----------
    hidden_dim
        Width ``D`` of both node types; divisible by ``heads``.
    heads
        Attention heads (each of width ``D / heads``), concatenated and projected back to ``D``.
    dropout
        Dropout on the attention coefficients.
    """

    def __init__(self, hidden_dim: int, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__(aggr="sum", node_dim=0)
        if hidden_dim % heads:
            msg = f"hidden_dim ({hidden_dim}) must be divisible by heads ({heads})."
            raise ValueError(msg)
        self.hidden_dim, self.heads, self.dropout = hidden_dim, heads, dropout
        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.key = nn.Linear(hidden_dim, hidden_dim)
        self.value = nn.Linear(hidden_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, hidden_dim)
        self.similarity_weight = nn.Parameter(torch.empty(heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise all weights (similarity weights start at 0)."""
        super().reset_parameters()
        for lin in (self.query, self.key, self.value, self.out):
            lin.reset_parameters()
        nn.init.zeros_(self.similarity_weight)

    def forward(
        self,
        x: tuple[torch.Tensor, torch.Tensor],
        edge_index: torch.Tensor,
        similarity: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from every destination to its sources; returns ``(T, D)``."""
        x_src, x_dst = x
        h, d = self.heads, self.hidden_dim // self.heads
        q = self.query(x_dst).view(-1, h, d)
        k = self.key(x_src).view(-1, h, d)
        v = self.value(x_src).view(-1, h, d)
        out = self.propagate(
            edge_index, q=q, k=k, v=v, similarity=similarity, size=(x_src.size(0), x_dst.size(0))
        )
        return self.out(out.reshape(-1, self.hidden_dim))

    def message(self, q_i, k_j, v_j, similarity, index, ptr, size_i):  # PyG hook
        logits = (q_i * k_j).sum(-1) / math.sqrt(q_i.size(-1))
        if similarity is not None:
            logits = logits + similarity.view(-1, 1) * self.similarity_weight.view(1, -1)
        alpha = softmax(logits, index, ptr, size_i)
        alpha = nn.functional.dropout(alpha, p=self.dropout, training=self.training)
        return v_j * alpha.unsqueeze(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hidden_dim}, heads={self.heads})"


class ExemplarPooling(nn.Module):
    """Attention pooling of each target's exemplars: their representations and their expression.

    ``forward(h_target (T, D), h_reference (R, D), expression (R, G), edge_index (2, E), similarity (E,))``
    returns ``(pooled (T, D), pooled_expression (T, G), weights (E,))``; the weights of a target's
    incoming edges sum to 1 (a target without exemplars gets zeros). The score of an edge is
    ``w · tanh(W [h_target ‖ h_reference]) + β · similarity`` with ``β`` learned, starting at 1.

    Parameters
    ----------
    hidden_dim
        Width ``D``.
    """

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.proj = nn.Linear(2 * hidden_dim, hidden_dim)
        self.score = nn.Linear(hidden_dim, 1)
        self.similarity_weight = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise all weights (the score layer at 0, so pooling starts as a softmax of similarities)."""
        self.proj.reset_parameters()
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        nn.init.ones_(self.similarity_weight)

    def forward(
        self,
        h_target: torch.Tensor,
        h_reference: torch.Tensor,
        expression: torch.Tensor,
        edge_index: torch.Tensor,
        similarity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pool exemplars into their targets (see the class docstring)."""
        src, dst = edge_index
        n = h_target.size(0)
        logits = self.score(torch.tanh(self.proj(torch.cat([h_target[dst], h_reference[src]], -1)))).squeeze(
            -1
        )
        if similarity is not None:
            logits = logits + self.similarity_weight * similarity
        weights = softmax(logits, dst, num_nodes=n)
        pooled = scatter(h_reference[src] * weights[:, None], dst, dim=0, dim_size=n, reduce="sum")
        pooled_expr = scatter(expression[src] * weights[:, None], dst, dim=0, dim_size=n, reduce="sum")
        return pooled, pooled_expr, weights


class SpaHGCEncoder(nn.Module):
    """Input projections and ``num_layers`` residual ``HeteroConv`` layers over the three edge types.

    ``forward(x_dict, edge_index_dict, similarity=None) -> {"target": (T, D), "reference": (R, D)}``
    (``reference`` only with ``use_exemplars``). Each layer updates a node type as
    ``h + dropout(relu(norm(sum of its convolutions)))``; a node type that receives no edges of any
    type in a layer keeps its representation.

    Parameters
    ----------
    config
        :class:`~bitro.models.SpaHGCConfig`.
    """

    def __init__(self, config: SpaHGCConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.node_types = (TARGET, REFERENCE) if config.use_exemplars else (TARGET,)
        self.inputs = nn.ModuleDict({TARGET: nn.Linear(config.in_dim, d)})
        if config.use_exemplars:
            self.inputs[REFERENCE] = nn.Linear(config.in_dim + config.n_genes, d)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for _ in range(config.num_layers):
            convs: dict[tuple[str, str, str], nn.Module] = {}
            if config.use_spatial:
                convs[SPATIAL_EDGE] = SAGEConv(d, d)
            if config.use_exemplars:
                convs[EXEMPLAR_EDGE] = CrossNodeAttention(d, config.heads, config.dropout)
                convs[REFERENCE_EDGE] = SAGEConv(d, d)
            self.convs.append(HeteroConv(convs, aggr="sum") if convs else None)
            self.norms.append(nn.ModuleDict({t: nn.LayerNorm(d) for t in self.node_types}))
        self.dropout = nn.Dropout(config.dropout)

    def reset_parameters(self) -> None:
        """Re-initialise all weights."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(
        self,
        x_dict: dict[str, torch.Tensor],
        edge_index_dict: dict[tuple[str, str, str], torch.Tensor],
        similarity: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode the nodes (see the class docstring)."""
        h = {t: self.inputs[t](x_dict[t]) for t in self.node_types if t in x_dict}
        edges = {e: ei for e, ei in edge_index_dict.items() if e in EDGE_TYPES and _uses(e, self.config)}
        kwargs = {}
        if similarity is not None and EXEMPLAR_EDGE in edges:
            kwargs["similarity_dict"] = {EXEMPLAR_EDGE: similarity}
        for conv, norms in zip(self.convs, self.norms, strict=True):
            if conv is None or not edges:
                continue
            out = conv(h, edges, **kwargs)
            h = {t: (v + self.dropout(torch.relu(norms[t](out[t]))) if t in out else v) for t, v in h.items()}
        return h


def _uses(edge_type: tuple[str, str, str], config: SpaHGCConfig) -> bool:
    if edge_type == SPATIAL_EDGE:
        return config.use_spatial
    return config.use_exemplars


class SpaHGCNet(nn.Module):
    """The SpaHGC network: :class:`SpaHGCEncoder` → :class:`ExemplarPooling` → gene head.

    Parameters
    ----------
    config
        A :class:`~bitro.models.SpaHGCConfig` (or a dict of its fields).

    Notes
    -----
    ``forward(x_dict, edge_index_dict, similarity=None)``: see the module docstring for the graph and
    the outputs. With ``use_exemplars=False`` the head reads the target representation alone and
    ``reference``/``weights`` are empty. Construction after ``torch.manual_seed(s)`` is reproducible.
    """

    def __init__(self, config: SpaHGCConfig | dict) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = SpaHGCConfig.from_dict(config)
        if not isinstance(config, SpaHGCConfig):
            msg = f"config must be a SpaHGCConfig or a dict of its fields, got {type(config).__name__}."
            raise TypeError(msg)
        self.config = config
        d, g = config.hidden_dim, config.n_genes
        self.encoder = SpaHGCEncoder(config)
        self.pooling = ExemplarPooling(d) if config.use_exemplars else None
        width = 2 * d if config.use_exemplars else d
        self.head = nn.Sequential(nn.Linear(width, d), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(d, g))
        self.exemplar_scale = (
            nn.Parameter(torch.full((g,), float(config.exemplar_residual_init))) if config.use_exemplars else None
        )

    def reset_parameters(self) -> None:
        """Re-initialise all weights (the exemplar scale at ``config.exemplar_residual_init``)."""
        self.encoder.reset_parameters()
        if self.pooling is not None:
            self.pooling.reset_parameters()
            nn.init.constant_(self.exemplar_scale, float(self.config.exemplar_residual_init))
        for layer in self.head:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()

    def forward(
        self,
        x_dict: dict[str, torch.Tensor],
        edge_index_dict: dict[tuple[str, str, str], torch.Tensor],
        similarity: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict every target node (see the module docstring)."""
        h = self.encoder(x_dict, edge_index_dict, similarity)
        h_t = h[TARGET]
        if self.pooling is None:
            empty = h_t.new_zeros((0,))
            return {
                "y": self.head(h_t),
                "target": h_t,
                "reference": h_t.new_zeros((0, h_t.size(1))),
                "weights": empty,
            }
        h_r = h[REFERENCE]
        expression = x_dict[REFERENCE][:, self.config.in_dim :]
        edges = edge_index_dict.get(EXEMPLAR_EDGE, torch.empty(2, 0, dtype=torch.long, device=h_t.device))
        pooled, pooled_expr, weights = self.pooling(h_t, h_r, expression, edges, similarity)
        y = self.head(torch.cat([h_t, pooled], -1)) + self.exemplar_scale * pooled_expr
        return {"y": y, "target": h_t, "reference": h_r, "weights": weights}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"genes={c.n_genes}, in_dim={c.in_dim}, hidden_dim={c.hidden_dim}, layers={c.num_layers}, "
            f"exemplars={c.use_exemplars}"
        )
