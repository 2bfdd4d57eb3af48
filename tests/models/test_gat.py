"""GATBlock: shapes, sparse message passing along edge_index only, ablation and init."""

from __future__ import annotations

import numpy as np
import torch

from bitro.models import GATBlock


def _chain(n: int) -> torch.Tensor:
    src = np.arange(n - 1)
    edges = np.concatenate([np.stack([src, src + 1]), np.stack([src + 1, src])], axis=1)
    return torch.as_tensor(edges, dtype=torch.long)


def _features(n: int, d: int = 6) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(0).normal(size=(n, d)), dtype=torch.float32)


def test_shapes_and_repr():
    torch.manual_seed(0)
    block = GATBlock(6, 8, num_layers=2, heads=4, dropout=0.0)
    out = block(_features(5), _chain(5))
    assert out.shape == (5, 8) and out.dtype == torch.float32
    assert block.layers[0].gat.heads == 4 and block.layers[0].proj.in_features == 32
    assert "num_layers=2" in repr(block)


def test_messages_travel_only_along_edges():
    # chain 0-1-2-3-4 and two GAT layers: cell 0 sees cells 1 and 2 (two hops) but never 3 or 4.
    torch.manual_seed(0)
    block = GATBlock(6, 8, num_layers=2, dropout=0.0).eval()
    x, edges = _features(5), _chain(5)
    base = block(x, edges)
    far = x.clone()
    far[3:] += 5.0
    near = x.clone()
    near[2] += 5.0
    torch.testing.assert_close(block(far, edges)[0], base[0])
    assert not torch.allclose(block(near, edges)[0], base[0], atol=1e-4)
    # without edges every cell only sees itself (self-loops): a single-cell bag works
    alone = block(x[:1], torch.empty(2, 0, dtype=torch.long))
    torch.testing.assert_close(block(x, torch.empty(2, 0, dtype=torch.long))[:1], alone)


def test_zero_layers_is_input_projection_only():
    torch.manual_seed(0)
    block = GATBlock(6, 8, num_layers=0)
    x = _features(4)
    torch.testing.assert_close(block(x, _chain(4)), block.input_proj(x))
    assert len(block.layers) == 0


def test_seeded_init_and_reset():
    torch.manual_seed(3)
    a = GATBlock(6, 8)
    torch.manual_seed(3)
    b = GATBlock(6, 8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    before = a.layers[0].proj.weight.detach().clone()
    a.reset_parameters()
    assert not torch.equal(before, a.layers[0].proj.weight)
