"""GeneQueryHead: Eqs. 7–9 against a manual computation, attention normalisation, mean ablation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_geometric.utils import scatter

from bitro.models import GeneQueryHead

SIZES = [4, 1, 6]


def _inputs(d=8):
    rng = np.random.default_rng(0)
    h = torch.as_tensor(rng.normal(size=(sum(SIZES), d)), dtype=torch.float32)
    batch = torch.as_tensor(np.repeat(np.arange(len(SIZES)), SIZES), dtype=torch.long)
    return h, batch


def _head(**kw):
    torch.manual_seed(0)
    head = GeneQueryHead(8, 5, readout_hidden=6, **kw)
    with torch.no_grad():
        if head.pooling == "gene_query":
            head.queries.normal_(std=1.0)  # make the attention visibly non-uniform
    return head.eval()


def test_matches_equations_7_to_9():
    head = _head()
    h, batch = _inputs()
    y, attn = head(h, batch)
    assert y.shape == (3, 5) and attn.shape == (11, 5)
    start = 0
    for b, size in enumerate(SIZES):
        cells = h[start : start + size]
        a = torch.softmax(head.queries @ cells.T / math.sqrt(8), dim=1)  # (G, n)
        z = a @ cells
        torch.testing.assert_close(attn[start : start + size], a.T)
        torch.testing.assert_close(y[b], head.readout(z).squeeze(-1))
        start += size


def test_attention_columns_sum_to_one_per_bag():
    _, attn = _head()(*_inputs())
    sums = scatter(attn, _inputs()[1], dim=0, reduce="sum")
    torch.testing.assert_close(sums, torch.ones(3, 5))
    assert (attn[4] == 1).all()  # the single-cell bag gets all the attention


def test_softplus_output_is_positive_and_linear_is_not_constrained():
    h, batch = _inputs()
    lin = _head()
    with torch.no_grad():
        lin.readout.out.bias.fill_(-50.0)
    assert (lin(h, batch)[0] < 0).all()
    soft = _head(output="softplus")
    with torch.no_grad():
        soft.readout.out.bias.fill_(-50.0)
    assert (soft(h, batch)[0] > 0).all()


def test_mean_pooling_ablation():
    head = _head(pooling="mean")
    h, batch = _inputs()
    y, attn = head(h, batch)
    assert not hasattr(head, "queries") and head.readout.out.out_features == 5
    torch.testing.assert_close(y, head.readout(scatter(h, batch, dim=0, reduce="mean")))
    torch.testing.assert_close(attn[:4], torch.full((4, 5), 0.25))
    torch.testing.assert_close(scatter(attn, batch, dim=0, reduce="sum"), torch.ones(3, 5))


@pytest.mark.parametrize(("kw", "match"), [({"output": "relu"}, "output"), ({"pooling": "max"}, "pooling")])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        GeneQueryHead(8, 5, **kw)


@pytest.mark.parametrize("pooling", ["gene_query", "mean"])
def test_cell_count_option_breaks_count_invariance(pooling):
    # two bags of identical cells, sizes 2 and 6: softmax/mean pooling cannot tell them apart
    cell = torch.as_tensor(np.random.default_rng(0).normal(size=(1, 8)), dtype=torch.float32)
    h = cell.expand(8, 8)
    batch = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1])
    y_plain, _ = _head(pooling=pooling)(h, batch)
    torch.testing.assert_close(y_plain[0], y_plain[1])
    head = _head(pooling=pooling, use_cell_count=True)
    y_count, attn = head(h, batch)
    assert not torch.allclose(y_count[0], y_count[1], atol=1e-4)
    torch.testing.assert_close(scatter(attn, batch, dim=0, reduce="sum"), torch.ones(2, 5))
    assert "use_cell_count=True" in repr(head)
