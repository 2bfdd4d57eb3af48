"""CellCountHead and BiTroNet(head="cell_counts"): per-cell counts that sum to their bag."""

from __future__ import annotations

import pytest
import torch

from bitro.models import BiTroConfig, BiTroNet, CellCountHead


def _bags():
    torch.manual_seed(0)
    batch = torch.tensor([0, 0, 0, 1, 1, 2])
    return torch.randn(6, 8), torch.randn(6, 5), batch


def test_bag_is_the_log_sum_of_its_cells_and_shares_sum_to_one():
    h, x, batch = _bags()
    head = CellCountHead(8, 5, n_genes=3, readout_hidden=4)
    y, attn, log_rate = head(h, x, batch)
    assert y.shape == (3, 3) and attn.shape == (6, 3) and log_rate.shape == (6, 3)
    expected = torch.stack([torch.logsumexp(log_rate[batch == b], dim=0) for b in range(3)])
    torch.testing.assert_close(y, expected)
    sums = torch.zeros(3, 3).index_add_(0, batch, attn)
    torch.testing.assert_close(sums, torch.ones(3, 3))
    torch.testing.assert_close(attn * torch.exp(y)[batch], torch.exp(log_rate))  # a cell's share = its counts


def test_a_cell_is_predicted_from_itself_not_its_bag_mates():
    h, x, batch = _bags()
    head = CellCountHead(8, 5, n_genes=3)
    _, _, alone = head(h[:1], x[:1], torch.zeros(1, dtype=torch.long))
    _, _, in_bag = head(h, x, batch)
    torch.testing.assert_close(alone[0], in_bag[0])


def test_set_log_scale_starts_every_gene_there_and_large_values_stay_finite():
    h, _, batch = _bags()
    head = CellCountHead(8, 0, n_genes=2)
    with torch.no_grad():
        head.mlp.out.weight.zero_()
    head.set_log_scale(torch.tensor([1.0, 50.0]))
    y, attn, log_rate = head(h, None, batch)
    torch.testing.assert_close(log_rate, torch.tensor([[1.0, 50.0]]).expand(6, 2))
    assert torch.isfinite(y).all() and torch.isfinite(attn).all()
    torch.testing.assert_close(y[0], torch.tensor([1.0, 50.0]) + torch.log(torch.tensor(3.0)))
    with pytest.raises(ValueError, match="needs the cells' own features"):
        CellCountHead(8, 5, n_genes=2)(h, None, batch)


def test_network_with_the_count_head_and_gene_transfer():
    torch.manual_seed(0)
    cfg = BiTroConfig(
        n_genes=4, in_dim=6, hidden_dim=8, ffn_dim=16, readout_hidden=8, pos_bins=4, head="cell_counts", skip=True
    )
    net = BiTroNet(cfg)
    x = torch.randn(7, 6)
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    edges = torch.tensor([[0, 1, 3, 4], [1, 0, 4, 3]])
    pos = torch.randint(0, 4, (7, 2))
    out = net(x, batch, edges, pos)
    assert set(out) == {"y", "attn", "h", "cell_log_counts"} and out["y"].shape == (2, 4)
    out["y"].sum().backward()
    assert net.head.skip.weight.grad is not None  # the skip reaches the loss
    moved = net.with_genes(["g0", "g2", "new"], ["g0", "g1", "g2", "g3"])
    torch.testing.assert_close(moved.head.mlp.out.weight[:2], net.head.mlp.out.weight[[0, 2]])
    assert "head='cell_counts', skip" in repr(net)
    with pytest.raises(ValueError, match="head must be one of"):
        BiTroConfig(n_genes=2, head="sum")


def test_the_skip_follows_the_trunk_unless_set():
    small = {"n_genes": 2, "in_dim": 6, "hidden_dim": 8, "ffn_dim": 16, "pos_bins": 4}
    assert BiTroConfig(**small).skip is False  # no trunk: the head already reads each cell's own features
    assert BiTroConfig(**small, use_gat=True).skip is True
    assert BiTroConfig(**small, use_transformer=True, skip=False).skip is False
    assert BiTroNet(BiTroConfig(**small)).head.skip is None
    cfg = BiTroConfig(**small)
    assert cfg.replace(use_transformer=True).skip is True  # an automatic skip follows the new trunk
    assert BiTroConfig(**small, skip=True).replace(hidden_dim=16).skip is True  # an explicit one stays
    assert BiTroConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="skip must be True or False"):
        BiTroConfig(**small, skip="yes")
