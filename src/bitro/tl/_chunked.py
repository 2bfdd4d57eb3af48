"""Bulk-level loss of one slide in bounded memory: chunked, checkpointed forward passes.

At bulk level a slide's loss compares log1p(TPM) of the *sum* of all its patch predictions with the
bulk profile, so every patch of the slide enters one loss. Running the network on all patches at once
holds the activations of every cell of the slide (10^5–10^6 cells on a whole slide). Here the slide's
bags are split into chunks of at most ``max_cells`` cells; each chunk runs under
:func:`torch.utils.checkpoint.checkpoint` (non-reentrant, RNG state preserved so dropout masks are
the same when the chunk is recomputed in the backward pass) and keeps only

- the per-bag count-space predictions ``(bags, genes)`` (summed over the slide for the bulk loss), and
- for the cluster loss (Eq. 12), per phenotype cluster the sum of the cells' log1p pseudo-expression
  ``(clusters, genes)`` and the sum of their mean-over-genes squares ``(clusters,)``.

The cluster loss of the whole slide is recovered *exactly* from these additive statistics:
``mean_i mean_g (e_ig - mu_kg)^2 = S2_k / n_k - mean_g (S1_kg / n_k)^2`` for every cluster ``k``, then
the mean over clusters present on the slide — the same value as :func:`bitro.models.cluster_loss` on
all cells at once (accumulated in float64 to keep the subtraction accurate), not a per-chunk
approximation. Peak activation memory therefore scales with the chunk, not the slide; the backward
pass recomputes each chunk's forward once (about 1.3–1.5× the compute of an unchunked step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bitro.tl._data import BagSet, collate, net_inputs

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch


def check_max_cells(value: Any) -> int | None:
    """Validate ``max_cells_per_step``: ``None`` or an integer ≥ 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        msg = (
            f"max_cells_per_step must be a positive integer (cells per forward chunk) or None (whole slide "
            f"at once), got {value!r}."
        )
        raise ValueError(msg)
    return int(value)


def bag_tokens(bags: BagSet, idx: np.ndarray) -> np.ndarray:
    """Tokens the network sees per bag of ``idx``: its cells plus its context cells (``context_um``)."""
    n = bags.n_cells[idx].astype(np.int64)
    if bags.ctx_ptr is not None:
        n = n + np.diff(bags.ctx_ptr)[idx]
    return n


def chunk_bags(sizes: np.ndarray, max_cells: int | None) -> list[np.ndarray]:
    """Split consecutive bags into chunks of at most ``max_cells`` tokens.

    Bags are never split: a bag larger than ``max_cells`` gets a chunk of its own (its activations
    are then the peak). ``None`` gives one chunk.

    Returns
    -------
    Positions into ``sizes``, one array per chunk, in order.
    """
    n = len(sizes)
    if max_cells is None or n == 0:
        return [np.arange(n)]
    chunks, start, total = [], 0, 0
    for i, size in enumerate(np.asarray(sizes, dtype=np.int64)):
        if i > start and total + size > max_cells:
            chunks.append(np.arange(start, i))
            start, total = i, 0
        total += int(size)
    chunks.append(np.arange(start, n))
    return chunks


def _chunk_forward(
    net: Any,
    to_counts: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    n_clusters: int,
    x: torch.Tensor,
    batch: torch.Tensor,
    edge_index: torch.Tensor,
    pos: torch.Tensor,
    phenotype: torch.Tensor,
    **ctx: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Network on one chunk → per-bag counts and (when ``n_clusters``) the cluster statistics."""
    import torch

    from bitro.models import pseudo_cell_expression

    out = net(x, batch, edge_index, pos, **ctx)
    counts = to_counts(out)
    if not n_clusters:
        return (counts,)
    cells = torch.log1p(pseudo_cell_expression(out["attn"], counts, batch)).double()
    keep = phenotype >= 0
    expr, lab = cells[keep], phenotype[keep]
    s1 = expr.new_zeros(n_clusters, expr.shape[1]).index_add_(0, lab, expr)
    s2 = expr.new_zeros(n_clusters).index_add_(0, lab, expr.pow(2).mean(dim=1))
    return counts, s1, s2


def chunked_bulk_loss(
    net: Any,
    bags: BagSet,
    idx: np.ndarray,
    *,
    to_counts: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    target: torch.Tensor,
    cluster_weight: float,
    max_cells: int,
    device: Any,
    checkpointing: bool = True,
) -> torch.Tensor:
    """Bulk loss of the bags ``idx`` (one slide) with chunked, checkpointed forward passes.

    Parameters
    ----------
    net
        The :class:`bitro.models.BiTroNet`.
    bags
        The training BagSet.
    idx
        Bags of the slide.
    to_counts
        Maps the network's output dict to the bags' counts ``(B, G)`` (differentiable; see
        :func:`bitro.tl._levels.bag_outputs`).
    target
        ``(1, G)`` log1p(TPM) bulk target.
    cluster_weight
        λ of the cluster loss (0 skips it).
    max_cells
        Tokens (cells plus context cells) per chunk.
    device
        Torch device.
    checkpointing
        Recompute each chunk in the backward pass instead of keeping its activations (the point of
        chunking; ``False`` only to check that both give the same gradients).

    Returns
    -------
    The scalar loss ``mse(log1p(TPM(sum of patch counts)), target) + λ · cluster loss``; call
    ``backward()`` on it once.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from bitro.models import aggregate_bulk

    idx = np.asarray(idx, dtype=np.int64)
    labels = np.concatenate([bags.phenotype[bags.bag_ptr[b] : bags.bag_ptr[b + 1]] for b in idx])
    labels = labels[labels >= 0]
    n_clusters = int(labels.max()) + 1 if cluster_weight > 0 and len(labels) else 0
    grad = torch.is_grad_enabled() and checkpointing
    parts: list[tuple[torch.Tensor, ...]] = []
    for chunk in chunk_bags(bag_tokens(bags, idx), max_cells):
        batch = collate(bags, idx[chunk], device=device)
        (x, bt, ei, pos), ctx = net_inputs(batch)
        args = (net, to_counts, n_clusters, x, bt, ei, pos, batch["phenotype"])
        if grad:
            parts.append(
                checkpoint(_chunk_forward, *args, use_reentrant=False, preserve_rng_state=True, **ctx)
            )
        else:
            parts.append(_chunk_forward(*args, **ctx))
    counts = torch.cat([p[0] for p in parts])
    tpm = aggregate_bulk(counts, torch.zeros(len(counts), dtype=torch.long, device=counts.device), 1)
    loss = torch.nn.functional.mse_loss(torch.log1p(tpm), target)
    if n_clusters:
        n = torch.as_tensor(
            np.bincount(labels, minlength=n_clusters), dtype=torch.float64, device=counts.device
        )
        s1 = torch.stack([p[1] for p in parts]).sum(dim=0)
        s2 = torch.stack([p[2] for p in parts]).sum(dim=0)
        present = n > 0
        n, s1, s2 = n[present], s1[present], s2[present]
        per_cluster = s2 / n - (s1 / n[:, None]).pow(2).mean(dim=1)
        loss = loss + cluster_weight * per_cluster.mean().to(loss.dtype)
    return loss
