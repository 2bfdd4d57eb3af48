"""Per-cell count head: each cell's non-negative expected counts; a bag's expression is their sum.

Where the gene-query head (:class:`~bitro.models.GeneQueryHead`) predicts a bag and then splits it over
its cells by attention (paper Eq. 10), this head predicts every cell and sums them: the cells of a bag
add up to the bag by construction, each cell's prediction depends on the cell itself, and a cell
outside any spot, or a whole slide (bulk), is predicted the same way.

Shapes
------
- ``h``: ``(N, D)`` contextual cell features from the trunk (GAT → positions → Transformer).
- ``x``: ``(N, in_dim)`` the cells' own projected input features (the *skip*: the trunk tends to make
  the cells of a bag alike, so their own features reach the head directly).
- per cell: ``log_rate = MLP([LN(h) ‖ W x])``: ``(N, G)`` log expected counts.
- per bag: ``y = log Σ_{i ∈ bag} exp(log_rate_i)``: ``(B, G)`` log expected counts of the bag.
- ``attn``: ``(N, G)`` each cell's share of its bag's expected counts (columns sum to 1 per bag), so
  ``attn * exp(y)[batch]`` is the cell's predicted counts, exactly as for the attention head.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch_geometric.utils import scatter


class CellCountHead(nn.Module):
    """Predict per-cell log expected counts and sum them per bag.

    Parameters
    ----------
    hidden_dim
        Width ``D`` of the contextual cell features.
    in_dim
        Width of the cells' own projected features (the skip input); ``0`` disables the skip.
    n_genes
        Number of genes ``G``.
    readout_hidden
        Hidden width of the per-cell MLP.
    """

    #: The network passes the cells' own features and reads per-cell log counts (see ``models/_heads.py``).
    predicts_cells = True

    def __init__(self, hidden_dim: int, in_dim: int, n_genes: int, *, readout_hidden: int = 64) -> None:
        super().__init__()
        self.hidden_dim, self.in_dim, self.n_genes, self.readout_hidden = (
            hidden_dim,
            in_dim,
            n_genes,
            readout_hidden,
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.skip = nn.Linear(in_dim, hidden_dim) if in_dim > 0 else None
        width = hidden_dim * (2 if self.skip is not None else 1)
        self.mlp = nn.Sequential(
            OrderedDict(
                hidden=nn.Linear(width, readout_hidden),
                act=nn.ReLU(),
                out=nn.Linear(readout_hidden, n_genes),
            )
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every layer; the output bias starts at 0 (call :meth:`set_log_scale` after)."""
        self.norm.reset_parameters()
        if self.skip is not None:
            self.skip.reset_parameters()
        for mod in self.mlp:
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        nn.init.zeros_(self.mlp.out.bias)

    @torch.no_grad()
    def set_log_scale(self, log_counts_per_cell: torch.Tensor) -> None:
        """Start each gene at a given per-cell log expected count (e.g. the training mean), ``(G,)``."""
        self.mlp.out.bias.copy_(torch.as_tensor(log_counts_per_cell, dtype=self.mlp.out.bias.dtype))

    def forward(
        self, h: torch.Tensor, x: torch.Tensor | None, batch: torch.Tensor, *, num_bags: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(y, attn, log_rate)``: bag log counts ``(B, G)``, cell shares ``(N, G)``, cell log counts."""
        if num_bags is None:
            num_bags = int(batch.max()) + 1 if batch.numel() else 0
        parts = [self.norm(h)]
        if self.skip is not None:
            if x is None:
                msg = "CellCountHead with a skip needs the cells' own features x."
                raise ValueError(msg)
            parts.append(self.skip(x))
        log_rate = self.mlp(torch.cat(parts, dim=-1))  # (N, G)
        peak = scatter(log_rate.detach(), batch, dim=0, dim_size=num_bags, reduce="max")  # (B, G), stable exp
        shifted = torch.exp(log_rate - peak[batch])
        total = scatter(shifted, batch, dim=0, dim_size=num_bags, reduce="sum")  # (B, G) ≥ 1
        y = torch.log(total) + peak
        attn = shifted / total[batch]
        return y, attn, log_rate

    def extra_repr(self) -> str:
        return (
            f"hidden_dim={self.hidden_dim}, skip_in_dim={self.in_dim}, n_genes={self.n_genes}, "
            f"readout_hidden={self.readout_hidden}"
        )
