"""The alignment towers and their contrastive losses (pure torch)."""

from __future__ import annotations

import math

import pytest
import torch

from bitro.models import (
    AlignmentNet,
    CellPoolTower,
    ClipLoss,
    GeneTower,
    SigLipLoss,
    contrastive_loss,
    segment_mean,
)


def _value(t: torch.Tensor) -> float:
    return t.detach().item()


def test_segment_mean_known_answer():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    out = segment_mean(values, torch.tensor([0, 0, 2]), 3)
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]]))


def test_cell_pool_tower_is_the_mean_of_its_cell_embeddings():
    torch.manual_seed(0)
    tower = CellPoolTower(5, 8, 3).eval()
    x = torch.randn(7, 5)
    segment = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    spots = tower(x, segment, 3)
    cells = tower.cells(x)
    assert spots.shape == (3, 3)
    torch.testing.assert_close(spots[2], cells[3:6].mean(dim=0))
    torch.testing.assert_close(spots[0], cells[[0, 6]].mean(dim=0))


def test_clip_loss_rewards_matching_pairs():
    n = 6
    eye = torch.eye(n)
    loss = ClipLoss(temperature=0.01)
    assert _value(loss(eye, eye)) < 1e-3  # each spot is its own nearest partner
    assert _value(loss(eye, eye.flip(0))) > 10  # every partner wrong
    random_a, random_b = torch.randn(64, 16), torch.randn(64, 16)
    chance = _value(ClipLoss(temperature=1e6)(random_a, random_b))  # uniform softmax
    assert chance == pytest.approx(math.log(64), rel=1e-3)
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    assert _value(loss(a, b)) == pytest.approx(_value(loss(b, a)), rel=1e-5)  # symmetric


def test_siglip_loss_rewards_matching_pairs():
    eye = torch.eye(5)
    loss = SigLipLoss(temperature=0.1, bias=-5.0)
    assert _value(loss(eye, eye)) < _value(loss(eye, eye.flip(0)))
    assert {n for n, _ in loss.named_parameters()} == {"logit_scale", "bias"}


def test_unknown_loss_refused():
    with pytest.raises(ValueError, match="clip"):
        contrastive_loss("triplet", 0.07)


def test_training_the_towers_lowers_the_loss():
    torch.manual_seed(0)
    n_spots, per_spot = 32, 4
    latent = torch.randn(n_spots, 3)
    cells = latent.repeat_interleave(per_spot, 0) @ torch.randn(3, 6) + 0.1 * torch.randn(
        n_spots * per_spot, 6
    )
    expression = latent @ torch.randn(3, 10)
    segment = torch.arange(n_spots).repeat_interleave(per_spot)
    net = AlignmentNet(CellPoolTower(6, 32, 8), GeneTower(10, 32, 8), ClipLoss())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = _value(net(cells, segment, expression))
    for _ in range(60):
        loss = net(cells, segment, expression)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _value(loss) < 0.5 * first
