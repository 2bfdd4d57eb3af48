"""Gene-query attention MIL head (paper §3.4, Eqs. 7–9) and the mean-pooling ablation.

Shapes
------
- ``h``: ``(N, D)`` cell features of ``B`` bags; ``batch``: ``(N,)`` sorted bag index.
- queries ``Q``: ``(G, D)``; per bag ``A = softmax_cells(Q Hᵀ / √D)`` (masked, computed padded as
  ``(B, G, L)``), ``Z = A H``: ``(B, G, D)``.
- readout (shared across genes): ``LN → Linear(D, readout_hidden) → ReLU → Linear(readout_hidden, 1)``.
- returns ``y``: ``(B, G)`` and ``attn``: ``(N, G)`` aligned with the input cells; each column sums to 1
  over the cells of each bag.

``pooling="mean"`` (ablation) averages the cells of each bag into ``(B, D)`` and reads out all genes at
once with ``Linear(readout_hidden, G)``; its attention is uniform (``1 / n_cells``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.utils import scatter, to_dense_batch

_OUTPUTS = ("linear", "softplus")
_POOLINGS = ("gene_query", "mean")


class GeneQueryHead(nn.Module):
    """Pool cells into one vector per gene with learnable gene queries, then read out one scalar per gene.

    Parameters
    ----------
    hidden_dim
        Cell feature width ``D``.
    n_genes
        Number of genes ``G``.
    readout_hidden
        Hidden width of the readout MLP.
    output
        ``"linear"`` (identity) or ``"softplus"``.
    pooling
        ``"gene_query"`` or ``"mean"`` (ablation).
    use_cell_count
        Add ``count_proj(log1p(n_cells))`` (``Linear(1, D)``) to each pooled vector before the readout.
        Softmax pooling is invariant to the number of cells, but raw counts scale with it; this
        optional extension (not in the paper) lets the head see it.
    """

    def __init__(
        self,
        hidden_dim: int,
        n_genes: int,
        *,
        readout_hidden: int = 64,
        output: str = "linear",
        pooling: str = "gene_query",
        use_cell_count: bool = False,
        readout: str = "shared",
    ) -> None:
        super().__init__()
        if output not in _OUTPUTS:
            msg = f"output must be one of {_OUTPUTS}, got {output!r}."
            raise ValueError(msg)
        if pooling not in _POOLINGS:
            msg = f"pooling must be one of {_POOLINGS}, got {pooling!r}."
            raise ValueError(msg)
        self.hidden_dim, self.n_genes, self.readout_hidden = hidden_dim, n_genes, readout_hidden
        if readout not in ("shared", "gene"):
            msg = f"readout must be 'shared' or 'gene', got {readout!r}."
            raise ValueError(msg)
        self.output, self.pooling, self.use_cell_count = output, pooling, use_cell_count
        self.readout_kind = readout if pooling == "gene_query" else "shared"
        self.count_proj = nn.Linear(1, hidden_dim) if use_cell_count else None
        n_out = 1 if pooling == "gene_query" else n_genes
        if pooling == "gene_query":
            self.queries = nn.Parameter(torch.empty(n_genes, hidden_dim))
        if self.readout_kind == "gene":
            self.gene_weight = nn.Parameter(torch.empty(n_genes, readout_hidden))
            self.gene_bias = nn.Parameter(torch.zeros(n_genes))
        self.readout = nn.Sequential(
            OrderedDict(
                norm=nn.LayerNorm(hidden_dim),
                hidden=nn.Linear(hidden_dim, readout_hidden),
                act=nn.ReLU(),
                out=nn.Linear(readout_hidden, n_out),
            )
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise queries and the readout.

        Queries are drawn from N(0, 1): with layer-normalised cell features the initial scores
        ``Q Hᵀ / √D`` have unit scale, so genes attend to different cells from the start (a
        near-uniform start, N(0, 0.02), made all genes predict the same value and fitted far slower).
        """
        if self.pooling == "gene_query":
            nn.init.normal_(self.queries, std=1.0)
        if self.count_proj is not None:
            self.count_proj.reset_parameters()
        for mod in self.readout:
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        if self.readout_kind == "gene":
            bound = 1.0 / math.sqrt(self.readout_hidden)
            nn.init.uniform_(self.gene_weight, -bound, bound)
            nn.init.zeros_(self.gene_bias)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return F.softplus(y) if self.output == "softplus" else y

    def forward(
        self, h: torch.Tensor, batch: torch.Tensor, *, num_bags: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict per-bag expression.

        Parameters
        ----------
        h
            ``(N, D)`` cell features.
        batch
            ``(N,)`` sorted bag index.
        num_bags
            ``B`` (default ``batch.max() + 1``); every bag must have at least one cell.

        Returns
        -------
        ``(y, attn)``: predictions ``(B, G)`` and attention weights ``(N, G)``.
        """
        if num_bags is None:
            num_bags = int(batch.max()) + 1 if batch.numel() else 0
        counts = torch.bincount(batch, minlength=num_bags).to(h.dtype)
        shift = (
            self.count_proj(torch.log1p(counts)[:, None]) if self.count_proj is not None else None
        )  # (B, D)
        if self.pooling == "mean":
            pooled = scatter(h, batch, dim=0, dim_size=num_bags, reduce="mean")
            if shift is not None:
                pooled = pooled + shift
            y = self._activate(self.readout(pooled))
            attn = (1.0 / counts[batch]).unsqueeze(1).expand(-1, self.n_genes)
            return y, attn
        dense, mask = to_dense_batch(h, batch, batch_size=num_bags)  # (B, L, D), (B, L)
        scores = torch.einsum("gd,bld->bgl", self.queries, dense) / math.sqrt(self.hidden_dim)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, G, L)
        z = torch.bmm(weights, dense)  # (B, G, D)
        if shift is not None:
            z = z + shift[:, None, :]
        if self.readout_kind == "gene":
            r = self.readout[:-1](z)  # (B, G, readout_hidden): LN → Linear → ReLU
            y = self._activate((r * self.gene_weight).sum(-1) + self.gene_bias)  # (B, G)
        else:
            y = self._activate(self.readout(z).squeeze(-1))  # (B, G)
        attn = weights.transpose(1, 2)[mask]  # (N, G)
        return y, attn

    def extra_repr(self) -> str:
        return (
            f"hidden_dim={self.hidden_dim}, n_genes={self.n_genes}, readout_hidden={self.readout_hidden}, "
            f"output={self.output!r}, pooling={self.pooling!r}, use_cell_count={self.use_cell_count}, "
            f"readout={self.readout_kind!r}"
        )
