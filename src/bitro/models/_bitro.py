"""The BiTro network: GAT → position encoding → bag Transformer → gene-query MIL head (paper §3.3–3.4).

Inputs (many bags as one disjoint graph; no Python loop over bags)
-----------------------------------------------------------------
- ``x``: ``(N, in_dim)`` float cell features.
- ``batch``: ``(N,)`` long, sorted bag index ``0..B-1``; every bag has at least one cell.
- ``edge_index``: ``(2, E)`` long within-bag kNN edges (self-loops are added by ``GATConv``, so
  single-cell bags need no edges).
- ``pos``: ``(N, 2)`` long quantised bag-relative positions in ``[0, pos_bins)``.
- optional context cells ``ctx_x`` ``(M, in_dim)``, ``ctx_batch`` ``(M,)`` sorted, ``ctx_pos`` ``(M, 2)``:
  cells in a ring around each bag (spec ``context_um``). They go through the input projection and the
  position encoding only (they skip the GAT, whose graph covers the bag cells), then join their bag's
  Transformer sequence as extra tokens that the bag's cells attend to; the head never pools them.
  Quantise bag and context positions on the same grid.

Outputs: ``dict(y=(B, G), attn=(N, G), h=(N, D))`` — bag predictions, per-gene weights of each cell in
its bag (columns sum to 1 per bag) and final cell features. With ``head="attention"`` ``y`` is in the
target space of the config's ``output`` and ``attn`` the gene-query attention; with
``head="cell_counts"`` ``y`` is the log of the bag's expected counts (the sum of its cells'), ``attn``
each cell's share of them, and ``cell_log_counts`` ``(N, G)`` every cell's log expected counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from bitro.models._config import BiTroConfig
from bitro.models._gat import GATBlock
from bitro.models._heads import HEADS
from bitro.models._position import PositionEncoding
from bitro.models._transformer import BagTransformer


class BiTroNet(nn.Module):
    """Pure-torch BiTro network for bag-level (spot or patch) expression prediction.

    Parameters
    ----------
    config
        A :class:`~bitro.models.BiTroConfig` (or a dict of its fields).

    Notes
    -----
    Submodules: ``gat`` (:class:`~bitro.models.GATBlock`; with ``use_gat=False`` only its input
    projection), ``position`` (:class:`~bitro.models.PositionEncoding` or ``None``), ``transformer``
    (:class:`~bitro.models.BagTransformer` or ``None``) and ``head``
    (:class:`~bitro.models.GeneQueryHead`). Construction after ``torch.manual_seed(s)`` is
    reproducible and gives the same weights as ``torch.manual_seed(s); net.reset_parameters()``.
    """

    def __init__(self, config: BiTroConfig | dict) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = BiTroConfig.from_dict(config)
        if not isinstance(config, BiTroConfig):
            msg = f"config must be a BiTroConfig or a dict of its fields, got {type(config).__name__}."
            raise TypeError(msg)
        self.config = config
        c = config
        rng_state = torch.get_rng_state()
        self.gat = GATBlock(
            c.in_dim,
            c.hidden_dim,
            num_layers=c.gat_layers if c.use_gat else 0,
            heads=c.gat_heads,
            dropout=c.dropout,
        )
        self.position = PositionEncoding(c.hidden_dim, c.pos_bins) if c.use_position else None
        self.transformer = (
            BagTransformer(
                c.hidden_dim,
                num_layers=c.transformer_layers,
                heads=c.transformer_heads,
                ffn_dim=c.ffn_dim,
                dropout=c.dropout,
            )
            if c.use_transformer
            else None
        )
        self.head = HEADS[c.head](c)
        # initialise once, in a fixed order, from the RNG state at entry: constructing after
        # ``torch.manual_seed(s)`` equals ``torch.manual_seed(s); net.reset_parameters()``.
        torch.set_rng_state(rng_state)
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Re-initialise every weight (uses the global torch RNG)."""
        for mod in (self.gat, self.position, self.transformer, self.head):
            if mod is not None:
                mod.reset_parameters()

    def gene_parameter_names(self) -> list[str]:
        """Names of the parameters with one row per gene (queries, or the per-gene output layer)."""
        if self.config.head == "cell_counts":
            return ["head.mlp.out.weight", "head.mlp.out.bias"]
        if self.config.pooling == "gene_query":
            extra = ["head.gene_weight", "head.gene_bias"] if self.config.readout == "gene" else []
            return ["head.queries", *extra]
        return ["head.readout.out.weight", "head.readout.out.bias"]

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x: torch.Tensor, batch: torch.Tensor, edge_index: torch.Tensor, pos) -> int:
        c = self.config
        if x.dim() != 2 or x.shape[1] != c.in_dim:
            msg = f"x must have shape (N, {c.in_dim}) (config.in_dim), got {tuple(x.shape)}."
            raise ValueError(msg)
        if batch.dim() != 1 or batch.shape[0] != x.shape[0]:
            msg = f"batch must have shape ({x.shape[0]},) to match x, got {tuple(batch.shape)}."
            raise ValueError(msg)
        if x.shape[0] == 0:
            msg = "The batch holds no cells; every bag needs at least one cell."
            raise ValueError(msg)
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            msg = f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}."
            raise ValueError(msg)
        if c.use_position and pos is None:
            msg = "pos is required when config.use_position=True."
            raise ValueError(msg)
        if bool((batch[1:] < batch[:-1]).any()) or int(batch.min()) < 0:
            msg = "batch must be sorted and non-negative (cells grouped bag by bag)."
            raise ValueError(msg)
        num_bags = int(batch.max()) + 1
        counts = torch.bincount(batch, minlength=num_bags)
        if bool((counts == 0).any()):
            empty = torch.nonzero(counts == 0).flatten()[:5].tolist()
            msg = f"Bags {empty} have no cells; drop empty bags and renumber batch as 0..B-1."
            raise ValueError(msg)
        return num_bags

    def forward(
        self,
        x: torch.Tensor,
        batch: torch.Tensor,
        edge_index: torch.Tensor,
        pos: torch.Tensor | None,
        *,
        ctx_x: torch.Tensor | None = None,
        ctx_batch: torch.Tensor | None = None,
        ctx_pos: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict bag expression from cell features.

        Parameters
        ----------
        x
            ``(N, in_dim)`` cell features.
        batch
            ``(N,)`` sorted bag index ``0..B-1``.
        edge_index
            ``(2, E)`` within-bag edges.
        pos
            ``(N, 2)`` quantised positions (ignored when ``use_position=False``).
        ctx_x, ctx_batch, ctx_pos
            Optional context cells (see module docstring); need ``use_transformer=True``.

        Returns
        -------
        ``{"y": (B, G), "attn": (N, G), "h": (N, D)}``.
        """
        num_bags = self._check_inputs(x, batch, edge_index, pos)
        h = self.gat(x, edge_index)
        if self.position is not None:
            h = self.position(h, pos)
        ctx = None
        if ctx_x is not None or ctx_batch is not None:
            if ctx_x is None or ctx_batch is None:
                msg = "Pass both ctx_x and ctx_batch (and ctx_pos when use_position=True), or none of them."
                raise ValueError(msg)
            if self.transformer is None:
                msg = (
                    "Context cells are only used by the Transformer; set use_transformer=True or drop ctx_x."
                )
                raise ValueError(msg)
            if ctx_batch.numel() and int(ctx_batch.max()) >= num_bags:
                msg = (
                    f"ctx_batch refers to bag {int(ctx_batch.max())} but the batch has only {num_bags} bags."
                )
                raise ValueError(msg)
            ctx = self.gat.project(ctx_x)
            if self.position is not None:
                if ctx_pos is None:
                    msg = "ctx_pos is required with ctx_x when config.use_position=True."
                    raise ValueError(msg)
                ctx = self.position(ctx, ctx_pos)
        if self.transformer is not None:
            h = self.transformer(
                h, batch, ctx=ctx, ctx_batch=ctx_batch if ctx is not None else None, num_bags=num_bags
            )
        if getattr(self.head, "predicts_cells", False):  # a count head: it reads the cells' own features too
            y, attn, log_rate = self.head(h, x, batch, num_bags=num_bags)
            return {"y": y, "attn": attn, "h": h, "cell_log_counts": log_rate}
        y, attn = self.head(h, batch, num_bags=num_bags)
        return {"y": y, "attn": attn, "h": h}

    # ------------------------------------------------------------------ transfer
    def with_genes(
        self, new_genes: Sequence[str], old_genes: Sequence[str], *, seed: int | None = None
    ) -> BiTroNet:
        """Return a copy of this network for another gene list.

        Every gene-independent weight (encoders and the shared readout) is copied; the per-gene rows
        (queries, or the output layer for ``pooling="mean"``) are copied for genes in ``old_genes`` and
        freshly initialised for new genes. Call this before :func:`~bitro.models.apply_lora`.

        Parameters
        ----------
        new_genes
            Target gene list (its order defines the output columns).
        old_genes
            The gene list this network was trained on (length ``config.n_genes``).
        seed
            Seed for the fresh rows (default: the global torch RNG).

        Returns
        -------
        A new :class:`BiTroNet` on the same device; ``self`` is unchanged.
        """
        new_genes, old_genes = [str(g) for g in new_genes], [str(g) for g in old_genes]
        if len(old_genes) != self.config.n_genes:
            msg = (
                f"old_genes has {len(old_genes)} names but the network predicts {self.config.n_genes} genes."
            )
            raise ValueError(msg)
        for name, genes in (("new_genes", new_genes), ("old_genes", old_genes)):
            if not genes or len(set(genes)) != len(genes):
                msg = f"{name} must be a non-empty list of unique gene names."
                raise ValueError(msg)
        if any("lora_" in name for name, _ in self.named_parameters()):
            msg = "with_genes needs a network without LoRA adapters; call it before apply_lora."
            raise ValueError(msg)
        rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            new = BiTroNet(self.config.replace(n_genes=len(new_genes)))
        ref = next(self.parameters())
        new = new.to(device=ref.device, dtype=ref.dtype)
        old_state, new_state = self.state_dict(), new.state_dict()
        gene_keys = set(self.gene_parameter_names())
        old_index = {g: i for i, g in enumerate(old_genes)}
        pairs = [(j, old_index[g]) for j, g in enumerate(new_genes) if g in old_index]
        with torch.no_grad():
            for key, value in new_state.items():
                if key not in gene_keys:
                    value.copy_(old_state[key])
                elif pairs:
                    dst = torch.tensor([j for j, _ in pairs], device=value.device)
                    src = torch.tensor([i for _, i in pairs], device=value.device)
                    value[dst] = old_state[key][src]
        new.train(self.training)
        return new

    # ------------------------------------------------------------------ repr
    def __repr__(self) -> str:
        c = self.config
        parts = [
            f"n_genes={c.n_genes}",
            f"in_dim={c.in_dim}",
            f"hidden_dim={c.hidden_dim}",
            f"gat={c.gat_layers}x{c.gat_heads}h" if c.use_gat else "gat=off",
            f"position={c.pos_bins}bins" if c.use_position else "position=off",
            f"transformer={c.transformer_layers}x{c.transformer_heads}h"
            if c.use_transformer
            else "transformer=off",
            f"pooling={c.pooling!r}",
            f"output={c.output!r}",
            *(["cell_count=on"] if c.use_cell_count else []),
            *(["readout='gene'"] if c.readout == "gene" and c.head == "attention" else []),
            *([f"head='cell_counts'{', skip' if c.skip else ''}"] if c.head == "cell_counts" else []),
            f"params={sum(p.numel() for p in self.parameters()):,}",
        ]
        return f"{type(self).__name__}({', '.join(parts)})"
