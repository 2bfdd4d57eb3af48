"""Local cell-graph encoder: input projection + stacked multi-head GAT layers (paper §3.3, Eqs. 4–5).

Shapes
------
- ``x``: ``(N, in_dim)`` float cell features of all cells of all bags in a batch.
- ``edge_index``: ``(2, E)`` long, within-bag kNN edges of the disjoint batch graph (built outside).
- output: ``(N, D)``.

Messages only travel along ``edge_index`` (plus self-loops added by ``GATConv``), so memory is
``O(N + E)``: no dense ``N × N`` matrix is ever formed, and cells of different bags never mix.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GATConv


class GATLayer(nn.Module):
    """One residual GAT layer: ``h + dropout(relu(norm(proj(gat(h)))))``.

    ``gat`` is a ``GATConv(D, D, heads, concat=True)`` with self-loops, giving ``(N, heads * D)``;
    ``proj`` is an ``nn.Linear(heads * D, D)`` (a LoRA target).

    Parameters
    ----------
    hidden_dim
        Width ``D``.
    heads
        Attention heads, concatenated.
    dropout
        Dropout on the GAT attention coefficients and on the layer output.
    """

    def __init__(self, hidden_dim: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.hidden_dim, self.heads = hidden_dim, heads
        self.gat = GATConv(
            hidden_dim, hidden_dim, heads=heads, concat=True, dropout=dropout, add_self_loops=True
        )
        self.proj = nn.Linear(heads * hidden_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        """Re-initialise all weights."""
        self.gat.reset_parameters()
        self.proj.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Map ``(N, D)`` features and ``(2, E)`` edges to ``(N, D)``."""
        out = self.proj(self.gat(h, edge_index))
        return h + self.dropout(torch.relu(self.norm(out)))


class GATBlock(nn.Module):
    """Input projection to ``D`` followed by ``num_layers`` residual GAT layers.

    Parameters
    ----------
    in_dim
        Input feature dimension.
    hidden_dim
        Output width ``D``.
    num_layers
        Number of GAT layers; ``0`` leaves only the input projection (the ``use_gat=False`` ablation).
    heads
        Heads per GAT layer (concatenated, then projected back to ``D``).
    dropout
        Dropout rate.

    Notes
    -----
    ``forward(x (N, in_dim), edge_index (2, E)) -> (N, D)``. :meth:`project` applies only the input
    projection (used for context cells, which skip the graph).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, *, num_layers: int = 2, heads: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if num_layers < 0:
            msg = f"num_layers must be ≥ 0, got {num_layers}."
            raise ValueError(msg)
        self.in_dim, self.hidden_dim, self.num_layers, self.heads = in_dim, hidden_dim, num_layers, heads
        self.input_proj = nn.Linear(in_dim, hidden_dim)
        self.layers = nn.ModuleList(GATLayer(hidden_dim, heads, dropout) for _ in range(num_layers))

    def reset_parameters(self) -> None:
        """Re-initialise all weights."""
        self.input_proj.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Input projection only: ``(N, in_dim) -> (N, D)``."""
        return self.input_proj(x)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Encode ``(N, in_dim)`` cell features over the ``(2, E)`` graph into ``(N, D)``."""
        h = self.input_proj(x)
        for layer in self.layers:
            h = layer(h, edge_index)
        return h

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, num_layers={self.num_layers}, heads={self.heads}"
