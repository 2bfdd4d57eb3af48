"""LoRA through peft: zero-initialised adapters, frozen base, trainable head, state round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from bitro.models import BiTroConfig, BiTroNet, apply_lora, lora_trainable_summary

SMALL = {
    "in_dim": 6,
    "hidden_dim": 8,
    "gat_heads": 2,
    "transformer_heads": 2,
    "ffn_dim": 16,
    "pos_bins": 8,
    "head": "attention",
    "use_gat": True,  # the paper's trunk: LoRA wraps its layers too
    "use_transformer": True,
}


def _inputs():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(9, 6)), dtype=torch.float32)
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    ei = torch.tensor([[0, 1, 2, 4, 6, 7], [1, 2, 3, 5, 7, 8]])
    ei = torch.cat([ei, ei.flip(0)], dim=1)
    pos = torch.as_tensor(rng.integers(0, 8, size=(9, 2)), dtype=torch.long)
    y = torch.as_tensor(rng.normal(size=(3, 4)), dtype=torch.float32)
    return x, batch, ei, pos, y


def _net():
    torch.manual_seed(0)
    return BiTroNet(BiTroConfig(n_genes=4, dropout=0.0, **SMALL))


def _head_count(net):
    return sum(p.numel() for n, p in net.named_parameters() if n.startswith("head."))


def test_fresh_adapter_changes_nothing():
    x, batch, ei, pos, _ = _inputs()
    net = _net().eval()
    before = net(x, batch, ei, pos)["y"]
    out = apply_lora(net, rank=2, alpha=4).eval()
    assert out is net and isinstance(net, BiTroNet)
    torch.testing.assert_close(net(x, batch, ei, pos)["y"], before)


def test_targets_and_parameter_counts():
    base = _net()
    n_base, n_head = sum(p.numel() for p in base.parameters()), _head_count(base)
    net = apply_lora(base, rank=2)
    for mod in (net.gat.input_proj, net.gat.layers[1].proj, net.position.proj):
        assert isinstance(mod, LoraLayer)
    layer = net.transformer.layers[0]
    for mod in (layer.attn.q_proj, layer.attn.v_proj, layer.attn.out_proj, layer.fc1, layer.fc2):
        assert isinstance(mod, LoraLayer)
    assert not isinstance(layer.attn.k_proj, LoraLayer)
    assert not isinstance(net.head.readout.hidden, LoraLayer)
    summary = lora_trainable_summary(net)
    assert summary["frozen"] == n_base - n_head
    assert summary["trainable"] == summary["lora"] + n_head
    assert summary["lora"] > 0
    frozen_head = lora_trainable_summary(apply_lora(_net(), rank=2, train_head=False))
    assert frozen_head["trainable"] == frozen_head["lora"] and frozen_head["frozen"] == n_base


def test_one_step_updates_only_lora_and_head():
    x, batch, ei, pos, y = _inputs()
    net = apply_lora(_net(), rank=2)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    torch.nn.functional.mse_loss(net(x, batch, ei, pos)["y"], y).backward()
    opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or n.startswith("head.") for n in changed)
    assert any("lora_B" in n for n in changed) and "head.queries" in changed
    base = [n for n in before if "lora_" not in n and not n.startswith("head.")]
    assert base and not (set(base) & changed)


def test_state_dict_round_trip():
    x, batch, ei, pos, y = _inputs()
    net = apply_lora(_net(), rank=2)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x, batch, ei, pos)["y"], y).backward()
        opt.step()
    torch.manual_seed(5)
    other = apply_lora(BiTroNet(net.config), rank=2)
    other.load_state_dict(net.state_dict(), strict=True)
    torch.testing.assert_close(other.eval()(x, batch, ei, pos)["y"], net.eval()(x, batch, ei, pos)["y"])


def test_errors():
    net = apply_lora(_net(), rank=2)
    with pytest.raises(ValueError, match="already"):
        apply_lora(net)
    with pytest.raises(ValueError, match="before apply_lora"):
        net.with_genes(["a"], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="k_projection"):
        apply_lora(_net(), target_modules=["k_projection"])
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_net(), rank=0)
