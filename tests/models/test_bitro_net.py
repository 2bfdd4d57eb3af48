"""BiTroNet end to end: shapes, per-bag independence, ablations, fitting, context, gene transfer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.utils import scatter

from bitro.models import BiTroConfig, BiTroNet, pseudo_cell_expression

SMALL = {  # the paper's network: gene-query attention head on the GAT + Transformer trunk
    "head": "attention",
    "use_gat": True,
    "use_transformer": True,
    "in_dim": 6,
    "hidden_dim": 8,
    "gat_heads": 2,
    "transformer_heads": 2,
    "ffn_dim": 16,
    "pos_bins": 8,
    "readout_hidden": 8,
}


@pytest.fixture(autouse=True)
def _single_thread():
    # tiny tensors: one intra-op thread is ~10x faster than two on a busy 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_bags(sizes, *, in_dim=6, pos_bins=8, seed=0):
    """Toy bags: random features, chain kNN edges inside each bag, random quantised positions."""
    rng = np.random.default_rng(seed)
    n = int(sum(sizes))
    x = torch.as_tensor(rng.normal(size=(n, in_dim)), dtype=torch.float32)
    batch = torch.as_tensor(np.repeat(np.arange(len(sizes)), sizes), dtype=torch.long)
    edges, start = [], 0
    for size in sizes:
        idx = np.arange(start, start + size - 1)
        edges += [np.stack([idx, idx + 1]), np.stack([idx + 1, idx])]
        start += size
    edge_index = torch.as_tensor(np.concatenate(edges, axis=1), dtype=torch.long)
    pos = torch.as_tensor(rng.integers(0, pos_bins, size=(n, 2)), dtype=torch.long)
    return x, batch, edge_index, pos


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return BiTroNet(BiTroConfig(n_genes=5, **{**SMALL, **kw}))


def test_shapes_and_attention_normalisation():
    net = _net().eval()
    x, batch, ei, pos = make_bags([4, 1, 6])
    out = net(x, batch, ei, pos)
    assert out["y"].shape == (3, 5) and out["attn"].shape == (11, 5) and out["h"].shape == (11, 8)
    assert all(v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(scatter(out["attn"], batch, dim=0, reduce="sum"), torch.ones(3, 5))


def test_single_cell_bag():
    net = _net().eval()
    x, batch, ei, pos = make_bags([1])
    out = net(x, batch, ei, pos)
    assert ei.shape == (2, 0) and torch.isfinite(out["y"]).all()
    torch.testing.assert_close(out["attn"], torch.ones(1, 5))


@pytest.mark.parametrize("kw", [{}, {"pooling": "mean"}, {"use_transformer": False}])
def test_bag_prediction_independent_of_batch_mates(kw):
    net = _net(**kw).eval()
    sizes = [3, 9, 1, 5]
    x, batch, ei, pos = make_bags(sizes)
    together = net(x, batch, ei, pos)
    start, e_start = 0, 0
    for b, size in enumerate(sizes):
        n_edges = 2 * (size - 1)
        alone = net(
            x[start : start + size],
            torch.zeros(size, dtype=torch.long),
            ei[:, e_start : e_start + n_edges] - start,
            pos[start : start + size],
        )
        torch.testing.assert_close(together["y"][b], alone["y"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together["attn"][start : start + size], alone["attn"], atol=1e-5, rtol=0)
        start, e_start = start + size, e_start + n_edges


def test_seeded_construction_and_reset_are_reproducible():
    a, b = _net(seed=7), _net(seed=7)
    c = _net(seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    torch.manual_seed(7)
    c.reset_parameters()
    assert all(torch.equal(sa[k], c.state_dict()[k]) for k in sa)


def test_ablation_flags_change_the_parameter_set():
    full = {n for n, _ in _net().named_parameters()}
    no_gat = {n for n, _ in _net(use_gat=False).named_parameters()}
    no_pos = {n for n, _ in _net(use_position=False).named_parameters()}
    no_tr = {n for n, _ in _net(use_transformer=False).named_parameters()}
    mean = {n for n, _ in _net(pooling="mean").named_parameters()}
    assert not any(n.startswith("gat.layers") for n in no_gat) and "gat.input_proj.weight" in no_gat
    assert not any(n.startswith("position") for n in no_pos)
    assert not any(n.startswith("transformer") for n in no_tr)
    assert "head.queries" in full and "head.queries" not in mean
    assert len({frozenset(s) for s in (full, no_gat, no_pos, no_tr, mean)}) == 5
    # the ablated nets still run, and the positions are ignored without position encoding
    x, batch, ei, pos = make_bags([3, 2])
    for kw in ({"use_gat": False}, {"use_transformer": False}, {"pooling": "mean"}):
        assert _net(**kw)(x, batch, ei, pos)["y"].shape == (2, 5)
    assert _net(use_position=False)(x, batch, ei, None)["y"].shape == (2, 5)


def test_compact_repr():
    text = repr(_net())
    assert "\n" not in text and "n_genes=5" in text and "params=" in text
    assert "gat=off" in repr(_net(use_gat=False))


def _toy_task(n_bags=24, seed=0):
    """Bag target = z-scored linear function of the mean cell feature (half the values negative)."""
    sizes = list(np.random.default_rng(seed).integers(2, 7, size=n_bags))
    x, batch, ei, pos = make_bags(sizes, seed=seed)
    w = torch.as_tensor(np.random.default_rng(seed + 1).normal(size=(6, 3)), dtype=torch.float32)
    y = scatter(x, batch, dim=0, reduce="mean") @ w
    y = (y - y.mean(0)) / y.std(0)
    return x, batch, ei, pos, y


def _fit(net, data, steps, lr=1e-2):
    x, batch, ei, pos, y = data
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x, batch, ei, pos)["y"], y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        return losses, net(x, batch, ei, pos)["y"]


def test_linear_output_goes_below_the_mean_softplus_cannot():
    data = _toy_task()
    assert (data[-1] < -0.5).any()
    torch.manual_seed(0)
    lin = BiTroNet(BiTroConfig(n_genes=3, dropout=0.0, **SMALL))
    torch.manual_seed(0)
    soft = BiTroNet(BiTroConfig(n_genes=3, dropout=0.0, output="softplus", **SMALL))
    lin_losses, lin_pred = _fit(lin, data, 200)
    soft_losses, soft_pred = _fit(soft, data, 200)
    assert (lin_pred < -0.5).sum() >= 5
    assert (soft_pred > 0).all()
    assert lin_losses[-1] < 0.5 * soft_losses[-1]


def test_overfits_toy_bags():
    torch.manual_seed(0)
    net = BiTroNet(BiTroConfig(n_genes=3, dropout=0.0, **SMALL))
    losses, _ = _fit(net, _toy_task(), 100, lr=5e-3)
    assert losses[-1] < 0.5 * losses[0]


def test_pseudo_cells_sum_to_bag_prediction():
    net = _net().eval()
    x, batch, ei, pos = make_bags([4, 2, 5])
    out = net(x, batch, ei, pos)
    counts = torch.expm1(out["y"].clamp(min=0) + 1.0)
    cells = pseudo_cell_expression(out["attn"], counts, batch)
    torch.testing.assert_close(scatter(cells, batch, dim=0, reduce="sum"), counts)


def test_context_cells_are_used_but_not_pooled():
    net = _net().eval()
    x, batch, ei, pos = make_bags([3, 4])
    cx, _, _, cpos = make_bags([2, 3], seed=1)
    cbatch = torch.tensor([0, 0, 1, 1, 1])
    plain = net(x, batch, ei, pos)
    ctx = net(x, batch, ei, pos, ctx_x=cx, ctx_batch=cbatch, ctx_pos=cpos)
    assert ctx["attn"].shape == (7, 5)
    torch.testing.assert_close(scatter(ctx["attn"], batch, dim=0, reduce="sum"), torch.ones(2, 5))
    assert not torch.allclose(ctx["y"], plain["y"], atol=1e-5)
    with pytest.raises(ValueError, match="ctx_pos"):
        net(x, batch, ei, pos, ctx_x=cx, ctx_batch=cbatch)
    with pytest.raises(ValueError, match="use_transformer"):
        _net(use_transformer=False)(x, batch, ei, pos, ctx_x=cx, ctx_batch=cbatch, ctx_pos=cpos)


@pytest.mark.parametrize("pooling", ["gene_query", "mean"])
def test_with_genes_copies_shared_genes(pooling):
    net = _net(pooling=pooling).eval()
    old = ["A", "B", "C", "D", "E"]
    new = ["C", "X", "A", "Y"]
    moved = net.with_genes(new, old, seed=1).eval()
    assert moved.config.n_genes == 4 and net.config.n_genes == 5
    x, batch, ei, pos = make_bags([3, 5])
    y_old, y_new = net(x, batch, ei, pos)["y"], moved(x, batch, ei, pos)["y"]
    torch.testing.assert_close(y_new[:, [0, 2]], y_old[:, [2, 0]])  # same predictions for shared genes
    assert not torch.allclose(y_new[:, 1], y_old[:, 1], atol=1e-6)
    for key in moved.gene_parameter_names():
        assert moved.state_dict()[key].shape[0] == 4
    # reproducible fresh rows
    again = net.with_genes(new, old, seed=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in moved.state_dict().items())


def test_with_genes_errors():
    net = _net()
    with pytest.raises(ValueError, match="old_genes has 2"):
        net.with_genes(["A"], ["A", "B"])
    with pytest.raises(ValueError, match="unique"):
        net.with_genes(["A", "A"], list("ABCDE"))


def test_input_errors():
    net = _net()
    x, batch, ei, pos = make_bags([2, 2])
    with pytest.raises(ValueError, match="in_dim"):
        net(x[:, :4], batch, ei, pos)
    with pytest.raises(ValueError, match="no cells"):
        net(x, torch.tensor([0, 0, 2, 2]), ei, pos)
    with pytest.raises(ValueError, match="sorted"):
        net(x, torch.tensor([1, 1, 0, 0]), ei, pos)
    with pytest.raises(ValueError, match="pos is required"):
        net(x, batch, ei, None)


def test_state_dict_round_trip_is_bit_exact():
    net = _net().eval()
    x, batch, ei, pos = make_bags([5, 12, 3, 20, 7])
    torch.manual_seed(1)
    other = BiTroNet(net.config.to_dict())
    other.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(other.eval()(x, batch, ei, pos)["y"], net(x, batch, ei, pos)["y"])
