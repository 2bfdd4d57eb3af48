"""Learnable bag-relative position encoding (paper Eq. 6).

Shapes
------
- ``h``: ``(N, D)`` cell features.
- ``pos``: ``(N, 2)`` long quantised positions ``(x_bin, y_bin)``, each in ``[0, num_bins)``.
- output: ``(N, D)`` = ``proj([h ⊕ Emb_x(x) ⊕ Emb_y(y)])``.
"""

from __future__ import annotations

import torch
from torch import nn


class PositionEncoding(nn.Module):
    """Concatenate x/y lookup-table embeddings to the features and project back to ``D``.

    Parameters
    ----------
    hidden_dim
        Feature width ``D``.
    num_bins
        Bins per axis of the lookup tables ``Emb_x``, ``Emb_y``.
    pos_dim
        Width of each lookup table (default ``D``, as in the paper).
    """

    def __init__(self, hidden_dim: int, num_bins: int = 64, *, pos_dim: int | None = None) -> None:
        super().__init__()
        self.hidden_dim, self.num_bins = hidden_dim, num_bins
        self.pos_dim = hidden_dim if pos_dim is None else pos_dim
        self.emb_x = nn.Embedding(num_bins, self.pos_dim)
        self.emb_y = nn.Embedding(num_bins, self.pos_dim)
        self.proj = nn.Linear(hidden_dim + 2 * self.pos_dim, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the tables (N(0, 0.02)) and the projection."""
        nn.init.normal_(self.emb_x.weight, std=0.02)
        nn.init.normal_(self.emb_y.weight, std=0.02)
        self.proj.reset_parameters()

    def forward(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Add position information to ``(N, D)`` features given ``(N, 2)`` long bins."""
        if pos.dim() != 2 or pos.shape[1] != 2 or pos.shape[0] != h.shape[0]:
            msg = f"pos must have shape (N, 2) = ({h.shape[0]}, 2), got {tuple(pos.shape)}."
            raise ValueError(msg)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.num_bins):
            msg = (
                f"pos values must lie in [0, {self.num_bins}), got [{int(pos.min())}, {int(pos.max())}]; "
                "quantise positions with the same number of bins as the config's pos_bins."
            )
            raise ValueError(msg)
        pos = pos.long()
        return self.proj(torch.cat([h, self.emb_x(pos[:, 0]), self.emb_y(pos[:, 1])], dim=-1))

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, num_bins={self.num_bins}, pos_dim={self.pos_dim}"
