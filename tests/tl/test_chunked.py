"""Bulk training in bounded memory: chunked, checkpointed forward passes (``max_cells_per_step``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _toy import GENES, SMALL

from bitro.tl import BiTroModel
from bitro.tl._chunked import bag_tokens, check_max_cells, chunk_bags, chunked_bulk_loss
from bitro.tl._levels import get_level

CHUNK = 60  # toy slides hold ~500 cells in bags of 3-25 cells → about 9 chunks


#: the paper's trunk: its GAT, Transformer (context cells) and dropout must survive chunking too
TRUNK = {"use_gat": True, "use_transformer": True}


def _bulk_model(slides, context_um=None, **config) -> BiTroModel:
    return BiTroModel(
        slides,
        level="bulk",
        genes=GENES,
        config={**SMALL, **TRUNK, **config},
        n_components=8,
        n_phenotypes=4,
        seed=0,
        context_um=context_um,
    )


def _slide_loss(model, net, cluster_weight, max_cells):
    """The bulk level's loss of training slide 0 with cluster weight ``cluster_weight``."""
    data = dataclasses.replace(model.training_set, cluster_weight=cluster_weight)
    return get_level("bulk").loss(net, data, 0, device="cpu", max_cells=max_cells)


def _loss_and_grads(model, max_cells, *, cluster_weight=1.0, seed=0, **kwargs):
    net = model.net.train()
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if kwargs:
        idx = np.flatnonzero(model.train_bags.bag_slide == 0)
        loss = chunked_bulk_loss(
            net,
            model.train_bags,
            idx,
            to_counts=lambda out: model.transform.to_counts_torch(out["y"]),
            target=torch.as_tensor(model.training_set.slide_targets[:1]),
            cluster_weight=cluster_weight,
            max_cells=max_cells,
            device="cpu",
            **kwargs,
        )
    else:
        loss = _slide_loss(model, net, cluster_weight, max_cells)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def test_chunk_bags_packs_consecutive_bags():
    sizes = np.array([3, 5, 2, 10, 1])
    assert [c.tolist() for c in chunk_bags(sizes, 8)] == [[0, 1], [2], [3], [4]]
    assert [c.tolist() for c in chunk_bags(sizes, None)] == [[0, 1, 2, 3, 4]]
    # smaller than every bag: one bag per chunk, no bag is split
    assert [c.tolist() for c in chunk_bags(sizes, 1)] == [[0], [1], [2], [3], [4]]
    assert [c.tolist() for c in chunk_bags(sizes, 100)] == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    ("cluster_weight", "context_um", "trunk"),
    [(0.0, None, True), (1.0, None, True), (1.0, 120.0, True), (1.0, None, False)],
)
def test_chunked_loss_and_gradients_equal_one_pass(toy_bulk_slides, cluster_weight, context_um, trunk):
    network = {} if trunk else {"use_gat": False, "use_transformer": False}  # False: the default network
    model = _bulk_model(toy_bulk_slides[:2], context_um=context_um, **network)
    idx = np.flatnonzero(model.train_bags.bag_slide == 0)
    if context_um:  # context cells count towards the chunk
        assert (bag_tokens(model.train_bags, idx) > model.train_bags.n_cells[idx]).any()
    n_chunks = len(chunk_bags(bag_tokens(model.train_bags, idx), CHUNK))
    assert n_chunks >= 5
    full, g_full = _loss_and_grads(model, None, cluster_weight=cluster_weight)
    chunked, g_chunk = _loss_and_grads(model, CHUNK, cluster_weight=cluster_weight)
    assert chunked == pytest.approx(full, rel=1e-5)
    assert g_full.keys() == g_chunk.keys() and len(g_full) > 5
    for name, g in g_full.items():
        torch.testing.assert_close(g_chunk[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_cluster_term_is_the_whole_slide_cluster_loss(toy_bulk_slides):
    """The cluster term rebuilt from per-chunk statistics equals Eq. 12 on all cells of the slide."""
    model = _bulk_model(toy_bulk_slides[:2])
    with torch.no_grad():
        without = _slide_loss(model, model.net.eval(), 0.0, CHUNK)
        with_full = _slide_loss(model, model.net, 1.0, None)
        with_chunks = _slide_loss(model, model.net, 1.0, CHUNK)
    assert float(with_full - without) > 1e-3  # the term is not trivially 0
    assert float(with_chunks - without) == pytest.approx(float(with_full - without), rel=1e-5)


def test_checkpointing_preserves_dropout_masks(toy_bulk_slides):
    """With dropout on, checkpointed chunks give exactly the gradients of plain chunks (same RNG)."""
    model = _bulk_model(toy_bulk_slides[:2], dropout=0.3)
    plain, g_plain = _loss_and_grads(model, CHUNK, checkpointing=False)
    ckpt, g_ckpt = _loss_and_grads(model, CHUNK, checkpointing=True)
    other_seed, _ = _loss_and_grads(model, CHUNK, seed=1, checkpointing=True)
    assert ckpt == plain
    assert other_seed != plain  # dropout is really active
    for name, g in g_plain.items():
        torch.testing.assert_close(g_ckpt[name], g, rtol=1e-6, atol=1e-8, msg=name)


def test_one_bag_per_chunk_when_limit_below_largest_bag(toy_bulk_slides):
    model = _bulk_model(toy_bulk_slides[:2])
    idx = np.flatnonzero(model.train_bags.bag_slide == 0)
    assert model.train_bags.n_cells[idx].max() > 5
    full, g_full = _loss_and_grads(model, None)
    tiny, g_tiny = _loss_and_grads(model, 5)
    assert tiny == pytest.approx(full, rel=1e-5)
    for name, g in g_full.items():
        torch.testing.assert_close(g_tiny[name], g, rtol=1e-4, atol=1e-6, msg=name)


def _train(slides, max_cells):
    model = _bulk_model(slides)
    model.train(max_epochs=3, lr=1e-3, validation_fraction=0.0, device="cpu", max_cells_per_step=max_cells)
    return model


def test_chunked_training_is_reproducible_and_matches_one_pass(toy_bulk_slides):
    slides = toy_bulk_slides[:3]
    a, b = _train(slides, CHUNK), _train(slides, CHUNK)
    assert a.weights_hash() == b.weights_hash()
    assert a.history == b.history
    full = _train(slides, None)
    # float32 rounding differs between one pass and chunks; after 9 Adam steps the losses agree to 1e-4
    np.testing.assert_allclose(a.history["train_loss"], full.history["train_loss"], rtol=1e-4)
    for name, w in full.net.state_dict().items():
        torch.testing.assert_close(a.net.state_dict()[name], w, rtol=1e-3, atol=1e-4, msg=name)
    assert full.weights_hash() != _bulk_model(slides).weights_hash()  # training moved the weights


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100"])
def test_bad_max_cells_per_step(toy_bulk_slides, bad):
    with pytest.raises(ValueError, match="max_cells_per_step"):
        check_max_cells(bad)
    model = _bulk_model(toy_bulk_slides[:1])
    with pytest.raises(ValueError, match="max_cells_per_step"):
        model.train(max_epochs=1, device="cpu", max_cells_per_step=bad)


def test_chunked_bulk_training_resumes_exactly(toy_bulk_slides, tmp_path):
    """Interrupted after 2 of 4 epochs and resumed from its checkpoint = an uninterrupted seeded run."""
    slides = toy_bulk_slides[:3]
    kw = {
        "lr": 1e-3,
        "validation_fraction": 0.0,
        "device": "cpu",
        "max_cells_per_step": CHUNK,
        "patience": 50,
    }
    full = _bulk_model(slides, dropout=0.2)
    full.train(max_epochs=4, checkpoint_dir=tmp_path / "full", **kw)
    cut = _bulk_model(slides, dropout=0.2)
    cut.train(max_epochs=2, checkpoint_dir=tmp_path / "cut", **kw)
    assert len(cut.history["epoch"]) == 2 and cut.weights_hash() != full.weights_hash()
    resumed = _bulk_model(slides, dropout=0.2)
    resumed.train(max_epochs=4, checkpoint_dir=tmp_path / "cut", **kw)
    assert resumed.history["epoch"] == [1, 2, 3, 4]
    np.testing.assert_array_equal(resumed.history["train_loss"], full.history["train_loss"])
    assert resumed.weights_hash() == full.weights_hash()
    assert not list((tmp_path / "cut").glob("*.pkl")) and not list((tmp_path / "cut").glob("*.pt"))
