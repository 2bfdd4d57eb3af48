"""PositionEncoding: Eq. 6 lookup tables concatenated and projected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitro.models import PositionEncoding


def test_matches_manual_concatenation():
    torch.manual_seed(0)
    enc = PositionEncoding(8, 16, pos_dim=4)
    h = torch.as_tensor(np.random.default_rng(0).normal(size=(5, 8)), dtype=torch.float32)
    pos = torch.tensor([[0, 1], [15, 0], [3, 3], [3, 3], [7, 9]])
    out = enc(h, pos)
    manual = enc.proj(torch.cat([h, enc.emb_x.weight[pos[:, 0]], enc.emb_y.weight[pos[:, 1]]], dim=1))
    torch.testing.assert_close(out, manual)
    assert out.shape == (5, 8)
    # same features: different positions give different encodings, equal positions equal ones
    same = enc(h[2:3].expand(3, 8), torch.tensor([[3, 3], [3, 3], [4, 3]]))
    torch.testing.assert_close(same[0], same[1])
    assert not torch.allclose(same[0], same[2])


def test_default_pos_dim_is_hidden_dim():
    enc = PositionEncoding(8, 4)
    assert enc.emb_x.weight.shape == (4, 8) and enc.proj.in_features == 24


@pytest.mark.parametrize("bad", [[[0, 16]], [[-1, 0]]])
def test_out_of_range_positions_raise(bad):
    enc = PositionEncoding(8, 16)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        enc(torch.zeros(1, 8), torch.tensor(bad))


def test_bad_shape_raises():
    enc = PositionEncoding(8, 16)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        enc(torch.zeros(2, 8), torch.zeros(2, 3, dtype=torch.long))
