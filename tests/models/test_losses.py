"""Pseudo-cell expression, cluster loss (Eq. 12) against brute force, bulk TPM aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitro.models import aggregate_bulk, cluster_loss, pseudo_cell_expression


def _brute_cluster_loss(expr: np.ndarray, labels: np.ndarray, gene_reduction: str) -> float:
    per_cluster = []
    for k in np.unique(labels[labels >= 0]):
        members = expr[labels == k]
        sq = (members - members.mean(axis=0)) ** 2
        dist = sq.mean(axis=1) if gene_reduction == "mean" else sq.sum(axis=1)
        per_cluster.append(dist.mean())
    return float(np.mean(per_cluster))


def test_pseudo_cells_sum_to_bag_and_follow_attention():
    rng = np.random.default_rng(0)
    batch = torch.tensor([0, 0, 0, 1, 1])
    raw = torch.as_tensor(rng.random((5, 4)), dtype=torch.float32)
    attn = raw / torch.zeros(2, 4).index_add_(0, batch, raw)[batch]
    bag = torch.as_tensor(rng.random((2, 4)) * 100, dtype=torch.float32)
    cells = pseudo_cell_expression(attn, bag, batch)
    torch.testing.assert_close(torch.zeros(2, 4).index_add_(0, batch, cells), bag)
    torch.testing.assert_close(cells[4], attn[4] * bag[1])


def test_pseudo_cells_shape_errors():
    with pytest.raises(ValueError, match="share G"):
        pseudo_cell_expression(torch.ones(3, 2), torch.ones(1, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        pseudo_cell_expression(torch.ones(3, 2), torch.ones(1, 2), torch.zeros(2, dtype=torch.long))


def test_cluster_loss_zero_when_clusters_are_tight():
    expr = torch.tensor([[1.0, 2.0], [1.0, 2.0], [5.0, -1.0], [5.0, -1.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 3, 3, 7])
    assert cluster_loss(expr, labels).item() == 0.0
    expr[1, 0] = 2.0
    assert cluster_loss(expr, labels).item() > 0


@pytest.mark.parametrize("gene_reduction", ["mean", "sum"])
def test_cluster_loss_matches_brute_force(gene_reduction):
    rng = np.random.default_rng(0)
    expr = rng.normal(size=(40, 6))
    labels = rng.integers(-1, 5, size=40)  # -1 = unlabelled, ignored
    labels[0] = 9  # a singleton cluster contributes 0 but counts in the mean
    got = cluster_loss(torch.as_tensor(expr), torch.as_tensor(labels), gene_reduction=gene_reduction)
    assert got.item() == pytest.approx(_brute_cluster_loss(expr, labels, gene_reduction), rel=1e-10)


def test_cluster_loss_gradient_and_empty():
    expr = torch.randn(6, 3, requires_grad=True)
    loss = cluster_loss(expr, torch.tensor([0, 0, 1, 1, 1, 2]))
    loss.backward()
    assert torch.isfinite(expr.grad).all() and expr.grad[5].abs().sum() == 0  # singleton: no gradient
    empty = cluster_loss(expr, torch.full((6,), -1))
    assert empty.item() == 0.0 and empty.requires_grad


def test_cluster_loss_errors():
    with pytest.raises(ValueError, match="integer"):
        cluster_loss(torch.ones(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="gene_reduction"):
        cluster_loss(torch.ones(2, 2), torch.tensor([0, 1]), gene_reduction="max")


def test_aggregate_bulk_sums_patches_and_renormalises_to_tpm():
    rng = np.random.default_rng(0)
    counts = torch.as_tensor(rng.random((7, 5)) * 50, dtype=torch.float64)
    slide = torch.tensor([0, 0, 2, 2, 2, 0, 2])
    tpm = aggregate_bulk(counts, slide, 3)
    assert tpm.shape == (3, 5)
    torch.testing.assert_close(tpm[[0, 2]].sum(1), torch.full((2,), 1e6, dtype=torch.float64))
    expected = counts[[0, 1, 5]].sum(0)
    torch.testing.assert_close(tpm[0], expected / expected.sum() * 1e6)
    assert (tpm[1] == 0).all()  # a slide without patches stays zero, no NaN


def test_aggregate_bulk_gradient_finite_and_errors():
    counts = torch.rand(4, 3, requires_grad=True)
    aggregate_bulk(counts, torch.tensor([0, 0, 1, 1]), 3).sum().backward()
    assert torch.isfinite(counts.grad).all()
    with pytest.raises(ValueError, match="n_slides"):
        aggregate_bulk(counts, torch.tensor([0, 0, 1, 3]), 3)
