"""Pseudo single-cell expression, the phenotype cluster loss and bulk aggregation (paper Eqs. 10–13).

All three work in **count space**. The network predicts z-scored log1p targets; the trainer first
de-normalises them (``z * std + mean`` → log1p), then applies ``expm1`` (clamped at 0) to get counts,
and only then calls these functions — so pseudo-cells sum to their bag and patches sum to their slide.

Shapes
------
- ``attn``: ``(N, G)`` attention of each cell for each gene (columns sum to 1 within each bag).
- ``y_bag_counts``: ``(B, G)``; ``batch``: ``(N,)`` bag index of each cell.
- ``cell_expr``: ``(N, G)``; ``labels``: ``(N,)`` phenotype cluster of each cell (negative = ignore).
- ``patch_counts``: ``(P, G)``; ``slide_index``: ``(P,)`` in ``[0, S)``; result ``(S, G)`` in TPM.
"""

from __future__ import annotations

from typing import Literal

import torch

TPM_TOTAL = 1e6


def pseudo_cell_expression(
    attn: torch.Tensor, y_bag_counts: torch.Tensor, batch: torch.Tensor
) -> torch.Tensor:
    """Distribute each bag's predicted counts over its cells by the gene attention (Eq. 10).

    Parameters
    ----------
    attn
        ``(N, G)`` attention weights from :class:`~bitro.models.BiTroNet` (``out["attn"]``).
    y_bag_counts
        ``(B, G)`` predicted bag expression in count space (de-normalised, ``expm1``).
    batch
        ``(N,)`` bag index of each cell.

    Returns
    -------
    ``(N, G)`` with ``out[i, g] = attn[i, g] * y_bag_counts[batch[i], g]``; the cells of a bag sum to
    the bag's prediction.
    """
    if attn.dim() != 2 or y_bag_counts.dim() != 2 or attn.shape[1] != y_bag_counts.shape[1]:
        msg = (
            f"attn (N, G) and y_bag_counts (B, G) must share G, got {tuple(attn.shape)} and "
            f"{tuple(y_bag_counts.shape)}."
        )
        raise ValueError(msg)
    if batch.shape != (attn.shape[0],):
        msg = f"batch must have shape ({attn.shape[0]},), got {tuple(batch.shape)}."
        raise ValueError(msg)
    return attn * y_bag_counts[batch]


def cluster_loss(
    cell_expr: torch.Tensor, labels: torch.Tensor, *, gene_reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Phenotype cluster loss on predicted cell expression (Eq. 12), averaged over clusters.

    For each cluster ``k`` present in ``labels``: the mean over its cells of the squared distance between
    a cell's expression and the cluster mean; the result is the mean over present clusters. A cluster
    with a single cell contributes 0. Cells with a negative label are ignored. No loop over clusters.

    Parameters
    ----------
    cell_expr
        ``(N, G)`` predicted pseudo-cell expression (the trainer passes ``log1p`` of
        :func:`pseudo_cell_expression`).
    labels
        ``(N,)`` integer phenotype labels.
    gene_reduction
        How the squared distance combines genes: ``"mean"`` (default; matches ``mse_loss`` averaging
        over genes in the gene loss, so λ keeps the paper's relative weight, where Eqs. 11 and 12 both
        sum over genes) or ``"sum"`` (the squared Euclidean norm of Eq. 12).

    Returns
    -------
    Scalar tensor (0 with gradient if no cell has a label).
    """
    if gene_reduction not in ("mean", "sum"):
        msg = f"gene_reduction must be 'mean' or 'sum', got {gene_reduction!r}."
        raise ValueError(msg)
    if cell_expr.dim() != 2 or labels.shape != (cell_expr.shape[0],):
        msg = f"cell_expr must be (N, G) and labels (N,), got {tuple(cell_expr.shape)} and {tuple(labels.shape)}."
        raise ValueError(msg)
    if labels.dtype.is_floating_point:
        msg = "labels must be an integer tensor of phenotype clusters."
        raise ValueError(msg)
    keep = labels >= 0
    expr, lab = cell_expr[keep], labels[keep]
    if expr.shape[0] == 0:
        return cell_expr.sum() * 0.0
    _, inverse = torch.unique(lab, return_inverse=True)
    n_clusters = int(inverse.max()) + 1
    counts = torch.bincount(inverse, minlength=n_clusters).to(expr.dtype)
    sums = expr.new_zeros(n_clusters, expr.shape[1]).index_add_(0, inverse, expr)
    means = sums / counts[:, None]
    sq = (expr - means[inverse]).pow(2)
    dist = sq.mean(dim=1) if gene_reduction == "mean" else sq.sum(dim=1)
    per_cluster = expr.new_zeros(n_clusters).index_add_(0, inverse, dist) / counts
    return per_cluster.mean()


def aggregate_bulk(patch_counts: torch.Tensor, slide_index: torch.Tensor, n_slides: int) -> torch.Tensor:
    """Sum per-patch count predictions per slide and renormalise each slide to TPM.

    Parameters
    ----------
    patch_counts
        ``(P, G)`` non-negative per-patch predictions in count space.
    slide_index
        ``(P,)`` slide of each patch in ``[0, n_slides)``.
    n_slides
        Number of slides ``S``.

    Returns
    -------
    ``(S, G)``: each row sums to 1e6 over the genes (a slide without patches or with all-zero
    predictions stays all zero).
    """
    if patch_counts.dim() != 2 or slide_index.shape != (patch_counts.shape[0],):
        msg = (
            f"patch_counts must be (P, G) and slide_index (P,), got {tuple(patch_counts.shape)} and "
            f"{tuple(slide_index.shape)}."
        )
        raise ValueError(msg)
    if slide_index.numel() and (int(slide_index.min()) < 0 or int(slide_index.max()) >= n_slides):
        msg = f"slide_index values must lie in [0, {n_slides}); pass the right n_slides."
        raise ValueError(msg)
    sums = patch_counts.new_zeros(n_slides, patch_counts.shape[1]).index_add_(
        0, slide_index.long(), patch_counts
    )
    total = sums.sum(dim=1, keepdim=True)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    return sums / safe_total * TPM_TOTAL
