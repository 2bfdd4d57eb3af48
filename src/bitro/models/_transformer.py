"""Pre-norm Transformer encoder over the cells of each bag, batched with a key-padding mask (paper §3.3).

Shapes
------
- ``h``: ``(N, D)`` features of all cells of ``B`` bags; ``batch``: ``(N,)`` sorted bag index in ``[0, B)``.
- optional context tokens ``ctx``: ``(M, D)`` with sorted ``ctx_batch``: ``(M,)`` — cells around a bag
  that its cells attend to; they are processed as extra tokens of the bag's sequence but not returned.
- internally: padded ``(B, L, D)`` with ``L = max cells + max context cells per bag`` and a boolean
  mask, so attention never crosses bags and a bag's output does not depend on its batch-mates.
- output: ``(N, D)`` in the order of ``h``.

All projections are named ``nn.Linear`` layers (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``,
``fc1``, ``fc2``) so that LoRA adapters can target them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.utils import to_dense_batch


class BagSelfAttention(nn.Module):
    """Multi-head self-attention on padded bags with a key-padding mask.

    Parameters
    ----------
    hidden_dim
        Width ``D`` (divisible by ``heads``).
    heads
        Number of heads.
    dropout
        Dropout on the attention weights (training only).
    """

    def __init__(self, hidden_dim: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if hidden_dim % heads:
            msg = f"hidden_dim ({hidden_dim}) must be divisible by heads ({heads})."
            raise ValueError(msg)
        self.hidden_dim, self.heads, self.dropout = hidden_dim, heads, dropout
        self.q_proj = nn.Linear(hidden_dim, hidden_dim)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)

    def reset_parameters(self) -> None:
        """Re-initialise all projections."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            lin.reset_parameters()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend within each bag: ``x`` ``(B, L, D)``, ``mask`` ``(B, L)`` (True = real token)."""
        b, length, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, length, d))

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, heads={self.heads}"


class BagEncoderLayer(nn.Module):
    """Pre-norm encoder layer: ``x + attn(norm1(x))``, then ``x + fc2(gelu(fc1(norm2(x))))``.

    Parameters
    ----------
    hidden_dim
        Width ``D``.
    heads
        Attention heads.
    ffn_dim
        Feed-forward hidden width.
    dropout
        Dropout on attention weights, FFN hidden units and both residual branches.
    """

    def __init__(self, hidden_dim: int, heads: int = 4, ffn_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.attn = BagSelfAttention(hidden_dim, heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        """Re-initialise all weights."""
        for mod in (self.norm1, self.attn, self.norm2, self.fc1, self.fc2):
            mod.reset_parameters()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Update padded tokens ``(B, L, D)`` given the ``(B, L)`` token mask."""
        x = x + self.dropout(self.attn(self.norm1(x), mask))
        return x + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.norm2(x))))))


class BagTransformer(nn.Module):
    """Stack of pre-norm encoder layers applied to each bag independently, plus a final LayerNorm.

    Parameters
    ----------
    hidden_dim
        Width ``D``.
    num_layers
        Number of encoder layers.
    heads
        Attention heads.
    ffn_dim
        Feed-forward hidden width.
    dropout
        Dropout rate.

    Notes
    -----
    ``forward(h (N, D), batch (N,), *, ctx=None, ctx_batch=None, num_bags=None) -> (N, D)``.
    """

    def __init__(
        self,
        hidden_dim: int,
        *,
        num_layers: int = 2,
        heads: int = 4,
        ffn_dim: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.hidden_dim, self.num_layers, self.heads, self.ffn_dim = hidden_dim, num_layers, heads, ffn_dim
        self.layers = nn.ModuleList(
            BagEncoderLayer(hidden_dim, heads, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)

    def reset_parameters(self) -> None:
        """Re-initialise all weights."""
        for layer in self.layers:
            layer.reset_parameters()
        self.norm.reset_parameters()

    def forward(
        self,
        h: torch.Tensor,
        batch: torch.Tensor,
        *,
        ctx: torch.Tensor | None = None,
        ctx_batch: torch.Tensor | None = None,
        num_bags: int | None = None,
    ) -> torch.Tensor:
        """Contextualise each cell with the other cells (and context tokens) of its own bag.

        Parameters
        ----------
        h
            ``(N, D)`` cell features.
        batch
            ``(N,)`` sorted bag index.
        ctx, ctx_batch
            Optional ``(M, D)`` context tokens and their sorted ``(M,)`` bag index.
        num_bags
            Number of bags ``B`` (default ``batch.max() + 1``).

        Returns
        -------
        ``(N, D)`` updated features of the bag cells (context tokens are not returned).
        """
        if (ctx is None) != (ctx_batch is None):
            msg = "Pass both ctx and ctx_batch, or neither."
            raise ValueError(msg)
        if num_bags is None:
            num_bags = int(batch.max()) + 1 if batch.numel() else 0
        dense, mask = to_dense_batch(h, batch, batch_size=num_bags)
        n_query = dense.shape[1]
        if ctx is not None and ctx.shape[0] > 0:
            ctx_dense, ctx_mask = to_dense_batch(ctx, ctx_batch, batch_size=num_bags)
            tokens, token_mask = torch.cat([dense, ctx_dense], dim=1), torch.cat([mask, ctx_mask], dim=1)
        else:
            tokens, token_mask = dense, mask
        for layer in self.layers:
            tokens = layer(tokens, token_mask)
        return self.norm(tokens[:, :n_query])[mask]

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, num_layers={self.num_layers}, heads={self.heads}, ffn_dim={self.ffn_dim}"
