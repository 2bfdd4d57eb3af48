"""SpaHGCNet, its layers and the masked graph contrastive loss: shapes, message routes, masks, loss."""

from __future__ import annotations

import pytest
import torch

from bitro.models import (
    CrossNodeAttention,
    ExemplarPooling,
    MaskedGraphContrast,
    SpaHGCConfig,
    SpaHGCNet,
    complementary_masks,
    drop_edges,
)
from bitro.models._spahgc import EXEMPLAR_EDGE, REFERENCE_EDGE, SPATIAL_EDGE

T, K, D_IN, G = 5, 3, 7, 4


def _graph(seed: int = 0):
    """A chain of 5 targets (0-1-2-3-4), 3 exemplars each, exemplar 0 of a target linked to its 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    x = {"target": torch.randn(T, D_IN, generator=g), "reference": torch.randn(T * K, D_IN + G, generator=g)}
    chain = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4], [1, 0, 2, 1, 3, 2, 4, 3]])
    ref_src = torch.tensor([t * K + r for t in range(T) for r in (1, 2)])
    ref_dst = torch.tensor([t * K for t in range(T) for _ in (1, 2)])
    edges = {
        SPATIAL_EDGE: chain,
        EXEMPLAR_EDGE: torch.stack([torch.arange(T * K), torch.arange(T).repeat_interleave(K)]),
        REFERENCE_EDGE: torch.stack([ref_src, ref_dst]),
    }
    sim = torch.rand(T * K, generator=g)
    return x, edges, sim


def _config(**kw):
    return SpaHGCConfig(n_genes=G, in_dim=D_IN, hidden_dim=8, heads=2, dropout=0.0, **kw)


def test_shapes_and_pooling_weights_sum_to_one_per_target():
    torch.manual_seed(0)
    net = SpaHGCNet(_config())
    x, edges, sim = _graph()
    out = net(x, edges, sim)
    assert out["y"].shape == (T, G) and out["target"].shape == (T, 8) and out["reference"].shape == (T * K, 8)
    per_target = torch.zeros(T).index_add_(0, edges[EXEMPLAR_EDGE][1], out["weights"])
    torch.testing.assert_close(per_target, torch.ones(T))
    assert "exemplars=True" in repr(net)


def test_without_exemplars_only_the_targets_are_read():
    torch.manual_seed(0)
    net = SpaHGCNet(_config(use_exemplars=False))
    x, edges, _ = _graph()
    out = net({"target": x["target"]}, {SPATIAL_EDGE: edges[SPATIAL_EDGE]})
    assert out["y"].shape == (T, G) and out["reference"].shape == (0, 8)
    assert not any("reference" in name for name, _ in net.named_parameters())


@pytest.mark.parametrize("init", [0.0, 1.0, 0.5])
def test_the_exemplar_residual_starts_at_its_configured_scale(init):
    # zero the head: y is then init × the pooled exemplar expression, pooled by softmax(similarity) at start
    torch.manual_seed(0)
    net = SpaHGCNet(_config(exemplar_residual_init=init))
    torch.nn.init.zeros_(net.head[-1].weight)
    torch.nn.init.zeros_(net.head[-1].bias)
    x, edges, sim = _graph()
    y = net(x, edges, sim)["y"]
    w = torch.softmax(sim.view(T, K), dim=1)
    expr = x["reference"][:, D_IN:].view(T, K, G)
    torch.testing.assert_close(y, init * (w[:, :, None] * expr).sum(1))
    net.exemplar_scale.data.fill_(3.0)
    net.reset_parameters()
    torch.testing.assert_close(net.exemplar_scale.data, torch.full((G,), init))


def test_messages_travel_only_along_the_graph():
    # two layers: target 0 sees targets 1, 2 (two hops) and the exemplars of target 1 (exemplar → 1 → 0),
    # never targets 3, 4 nor the exemplars of targets 2, 3, 4
    torch.manual_seed(0)
    net = SpaHGCNet(_config()).eval()
    x, edges, sim = _graph()
    base = net(x, edges, sim)["y"][0]
    far = {k: v.clone() for k, v in x.items()}
    far["target"][3:] += 5.0
    far["reference"][2 * K :] += 5.0
    torch.testing.assert_close(net(far, edges, sim)["y"][0], base)
    near = {k: v.clone() for k, v in x.items()}
    near["reference"][K + 1] += 5.0  # an exemplar of target 1
    assert not torch.allclose(net(near, edges, sim)["y"][0], base, atol=1e-4)


def test_cross_node_attention_softmax_per_destination():
    torch.manual_seed(0)
    att = CrossNodeAttention(8, heads=2)
    src, dst = torch.randn(4, 8), torch.randn(3, 8)
    edges = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1]])
    out = att((src, dst), edges, torch.rand(4))
    assert out.shape == (3, 8)
    # destination 2 has no edges: its message is zero, so the output is the bias of the last projection
    torch.testing.assert_close(out[2], att.out.bias)
    with pytest.raises(ValueError, match="divisible"):
        CrossNodeAttention(7, heads=2)


def test_exemplar_pooling_of_a_single_exemplar_is_that_exemplar():
    pool = ExemplarPooling(4)
    h_t, h_r, expr = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3)
    pooled, pooled_expr, w = pool(h_t, h_r, expr, torch.tensor([[0, 1], [0, 1]]))
    torch.testing.assert_close(w, torch.ones(2))
    torch.testing.assert_close(pooled_expr, expr)
    torch.testing.assert_close(pooled, h_r)


def test_complementary_masks_hide_disjoint_columns():
    torch.manual_seed(0)
    a, b = complementary_masks(20, 0.2)
    assert (~a).sum() == 4 and (~b).sum() == 4
    assert not ((~a) & (~b)).any()  # no column hidden in both views
    a, b = complementary_masks(20, 0.5)
    assert torch.equal(a, ~b)  # exact complements
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        complementary_masks(20, 0.6)


def test_drop_edges_keeps_a_subset():
    torch.manual_seed(0)
    edges = torch.arange(2000).view(2, 1000)
    kept, mask = drop_edges(edges, 0.3)
    assert torch.equal(kept, edges[:, mask]) and 600 < mask.sum() < 800
    assert drop_edges(edges, 0.0)[1].all()
    with pytest.raises(ValueError, match="edge drop"):
        drop_edges(edges, 1.0)


def test_views_hide_different_columns_per_node_type():
    torch.manual_seed(0)
    cfg = _config(target_mask_ratio=0.25, reference_mask_ratio=0.5, edge_drop=0.0)
    contrast = MaskedGraphContrast(SpaHGCNet(cfg).encoder, cfg)
    x = {"target": torch.ones(T, 8), "reference": torch.ones(T * K, 10)}
    _, edges, sim = _graph()
    (xa, ea, sa), (xb, _, _) = contrast.views(x, edges, sim)
    hidden_a, hidden_b = xa["target"][0] == 0, xb["target"][0] == 0
    assert hidden_a.sum() == 2 and hidden_b.sum() == 2 and not (hidden_a & hidden_b).any()
    assert torch.equal(xa["reference"][0] == 0, xb["reference"][0] != 0)  # 0.5: complements
    assert torch.equal(ea[EXEMPLAR_EDGE], edges[EXEMPLAR_EDGE]) and torch.equal(sa, sim)


def test_contrastive_loss_decreases_and_the_target_encoder_follows_by_ema():
    torch.manual_seed(0)
    cfg = _config(ema_decay=0.9)
    net = SpaHGCNet(cfg)
    contrast = MaskedGraphContrast(net.encoder, cfg)
    assert not any(p.requires_grad for p in contrast.target_encoder.parameters())
    x, edges, sim = _graph()
    opt = torch.optim.Adam([*net.encoder.parameters(), *contrast.predictors.parameters()], lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss, parts = contrast.loss(net.encoder, x, edges, sim)
        loss.backward()
        opt.step()
        before = [p.clone() for p in contrast.target_encoder.parameters()]
        contrast.update(net.encoder)
        losses.append(float(loss.detach()))
    assert set(parts) == {"target", "reference"}
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    online = list(net.encoder.parameters())
    for old, new, theta in zip(before, contrast.target_encoder.parameters(), online, strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * theta.detach())


def test_config_validation_and_round_trip():
    cfg = _config()
    assert SpaHGCConfig.from_dict(cfg.to_dict()) == cfg
    assert (
        cfg.contrastive and not cfg.replace(target_contrast_weight=0, reference_contrast_weight=0).contrastive
    )
    with pytest.raises(ValueError, match="hidden_dim"):
        SpaHGCConfig(n_genes=2, in_dim=3, hidden_dim=10, heads=4)
    with pytest.raises(ValueError, match="reference_mask_ratio"):
        SpaHGCConfig(n_genes=2, in_dim=3, reference_mask_ratio=0.8)
    with pytest.raises(ValueError, match=r"exemplar_residual_init must be a number in \[0, ∞\)"):
        SpaHGCConfig(n_genes=2, in_dim=3, exemplar_residual_init=-1.0)
    assert SpaHGCConfig(n_genes=2, in_dim=3).exemplar_residual_init == 0.0
    with pytest.raises(ValueError, match="Unknown SpaHGCConfig"):
        SpaHGCConfig.from_dict({"n_genes": 2, "in_dim": 3, "k": 5})
    with pytest.raises(TypeError, match="SpaHGCConfig"):
        SpaHGCNet(3)
