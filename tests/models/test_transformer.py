"""BagTransformer: per-bag attention with a padding mask, context tokens, LoRA-targetable names."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bitro.models import BagTransformer

SIZES = [3, 7, 1, 5]


def _bags(sizes, d=8, seed=0):
    rng = np.random.default_rng(seed)
    h = torch.as_tensor(rng.normal(size=(sum(sizes), d)), dtype=torch.float32)
    batch = torch.as_tensor(np.repeat(np.arange(len(sizes)), sizes), dtype=torch.long)
    return h, batch


def _model(dropout=0.1):
    torch.manual_seed(0)
    return BagTransformer(8, num_layers=2, heads=2, ffn_dim=16, dropout=dropout).eval()


def test_output_of_a_bag_does_not_depend_on_batch_mates():
    model = _model()
    h, batch = _bags(SIZES)
    together = model(h, batch)
    assert together.shape == h.shape
    start = 0
    for size in SIZES:
        alone = model(h[start : start + size], torch.zeros(size, dtype=torch.long))
        torch.testing.assert_close(together[start : start + size], alone, atol=1e-5, rtol=0)
        start += size


def test_cells_interact_within_a_bag_only():
    model = _model()
    h, batch = _bags(SIZES)
    base = model(h, batch)
    moved = h.clone()
    moved[3] = torch.randn(8)  # first cell of bag 1 (not a constant shift: LayerNorm removes those)
    out = model(moved, batch)
    torch.testing.assert_close(out[:3], base[:3])  # bag 0 untouched
    assert not torch.allclose(out[4:10], base[4:10], atol=1e-4)  # bag-1 mates change


def test_permutation_equivariant_within_bag():
    model = _model()
    h, _ = _bags([6])
    batch = torch.zeros(6, dtype=torch.long)
    perm = torch.tensor([5, 2, 0, 1, 4, 3])
    torch.testing.assert_close(model(h[perm], batch), model(h, batch)[perm], atol=1e-5, rtol=0)


def test_context_tokens_are_attended_but_not_returned():
    model = _model()
    h, batch = _bags([3, 4])
    ctx, _ = _bags([2, 5], seed=1)
    ctx_batch = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    plain = model(h, batch)
    with_ctx = model(h, batch, ctx=ctx, ctx_batch=ctx_batch)
    assert with_ctx.shape == h.shape
    assert not torch.allclose(with_ctx, plain, atol=1e-4)
    # context of bag 1 does not reach bag 0: changing it leaves bag 0 unchanged
    ctx2 = ctx.clone()
    ctx2[2:] = torch.randn(5, 8)
    torch.testing.assert_close(model(h, batch, ctx=ctx2, ctx_batch=ctx_batch)[:3], with_ctx[:3])
    # bag 0 with its context alone == batched
    alone = model(h[:3], batch[:3], ctx=ctx[:2], ctx_batch=ctx_batch[:2])
    torch.testing.assert_close(alone, with_ctx[:3], atol=1e-5, rtol=0)


def test_named_linear_layers_for_lora():
    names = {n.rsplit(".", 1)[-1] for n, m in _model().named_modules() if isinstance(m, nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} <= names
