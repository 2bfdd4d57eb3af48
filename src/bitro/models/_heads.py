"""The heads the network can end in, by name (``BiTroConfig.head``): one line per head.

Each entry builds the head from the network config. A head returns, per bag, ``y`` and each cell's
``attn`` (its share of the bag; see :class:`~bitro.models.BiTroNet`); a count head also returns the
cells' log counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def _attention(c: Any) -> nn.Module:
    from bitro.models._mil import GeneQueryHead

    return GeneQueryHead(
        c.hidden_dim,
        c.n_genes,
        readout_hidden=c.readout_hidden,
        output=c.output,
        pooling=c.pooling,
        use_cell_count=c.use_cell_count,
        readout=c.readout,
    )


def _cell_counts(c: Any) -> nn.Module:
    from bitro.models._count_head import CellCountHead

    return CellCountHead(c.hidden_dim, c.in_dim if c.skip else 0, c.n_genes, readout_hidden=c.readout_hidden)


#: Head name → constructor from a :class:`~bitro.models.BiTroConfig`.
HEADS: dict[str, Callable[[Any], nn.Module]] = {
    "attention": _attention,
    "cell_counts": _cell_counts,
}
