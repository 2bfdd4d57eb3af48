"""ExemplarIndex: cross-slide cosine kNN against brute force, both search paths, exclusions, storage."""

from __future__ import annotations

import numpy as np
import pytest

import bitro as bt
from bitro.tl._exemplars import ExemplarIndex


def _bank(n_per_slide=(40, 25, 30), d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(sum(n_per_slide), d))
    slides = np.repeat([f"S{i}" for i in range(len(n_per_slide))], n_per_slide)
    spots = np.concatenate([[f"spot{j}" for j in range(n)] for n in n_per_slide])
    return x, slides, spots


def _brute(x, q, k, allowed):
    """Cosine similarities by hand; the k best allowed references of each query row."""
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    qu = q / np.linalg.norm(q, axis=1, keepdims=True)
    out_idx, out_sim = [], []
    for i in range(len(q)):
        s = np.array([qu[i] @ xu[j] if allowed[i][j] else -np.inf for j in range(len(x))])
        order = np.argsort(-s, kind="stable")[:k]
        out_idx.append(order)
        out_sim.append(s[order])
    return np.array(out_idx), np.array(out_sim)


@pytest.mark.parametrize("method", ["exact", "ball_tree"])
def test_query_matches_brute_force_and_never_returns_the_own_slide(method, monkeypatch):
    import bitro.tl._exemplars as ex

    monkeypatch.setattr(ex, "CHUNK_ELEMENTS", 50)  # several query chunks
    x, slides, spots = _bank()
    index = ExemplarIndex.build(x, slides, spots, method=method)
    q = x[::7] + np.random.default_rng(1).normal(scale=0.3, size=x[::7].shape)
    q_slides = slides[::7]
    res = index.query(q, 5, query_slides=q_slides)
    allowed = [slides != s for s in q_slides]
    want_idx, want_sim = _brute(x, q, 5, allowed)
    np.testing.assert_array_equal(res.index, want_idx)
    np.testing.assert_allclose(res.similarity, want_sim, atol=1e-5)
    assert not (res.slide == q_slides[:, None]).any()
    np.testing.assert_array_equal(res.spot, spots[want_idx])
    assert (np.diff(res.similarity, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("method", ["exact", "ball_tree"])
def test_excluded_references_are_never_returned(method):
    x, slides, spots = _bank()
    exclude = np.zeros(len(x), dtype=bool)
    exclude[::3] = True
    index = ExemplarIndex.build(x, slides, spots, method=method)
    res = index.query(x[:10], 4, query_slides="S2", exclude=exclude)
    allowed = [(slides != "S2") & ~exclude for _ in range(10)]
    want_idx, _ = _brute(x, x[:10], 4, allowed)
    np.testing.assert_array_equal(res.index, want_idx)
    assert not exclude[res.index].any()


def test_a_query_slide_outside_the_index_may_use_every_reference():
    x, slides, spots = _bank()
    index = ExemplarIndex.build(x, slides, spots)
    res = index.query(x[:3], 1, query_slides="new")
    np.testing.assert_array_equal(res.index[:, 0], [0, 1, 2])  # itself: identical vectors
    np.testing.assert_allclose(res.similarity[:, 0], 1.0, atol=1e-6)
    frame = res.to_frame(["a", "b", "c"])
    assert list(frame.columns) == ["query", "rank", "slide", "spot", "similarity"]
    assert frame["slide"].tolist() == ["S0"] * 3 and frame["spot"].tolist() == ["spot0", "spot1", "spot2"]


def test_too_few_cross_slide_references_is_a_clear_error():
    x, slides, spots = _bank((5, 3))
    index = ExemplarIndex.build(x, slides, spots)
    with pytest.raises(ValueError, match="Only 3 reference spots are available outside slide 'S0'"):
        index.query(x[:2], 4, query_slides="S0")
    with pytest.raises(ValueError, match="k must be an integer"):
        index.query(x[:2], 0)
    with pytest.raises(ValueError, match="Queries must be"):
        index.query(x[:2, :3], 1)


def test_build_refuses_bad_input():
    x, slides, spots = _bank((4, 4))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ExemplarIndex.build(bad, slides, spots)
    with pytest.raises(ValueError, match="repeat within a slide"):
        ExemplarIndex.build(x, slides, np.repeat("a", 8))
    with pytest.raises(ValueError, match="Unknown exemplar search method"):
        ExemplarIndex.build(x, slides, spots, method="faiss")
    with pytest.raises(ValueError, match="one slide and spot id per row"):
        ExemplarIndex.build(x, slides[:3], spots)


def test_storage_round_trip_and_values():
    x, slides, spots = _bank()
    values = np.random.default_rng(2).normal(size=(len(x), 3))
    index = bt.tl.ExemplarIndex.build(x, slides, spots, values=values, method="ball_tree")
    again = ExemplarIndex.from_arrays(index.arrays(), index.meta())
    q = x[:4] * 2
    a, b = index.query(q, 3, query_slides="S1"), again.query(q, 3, query_slides="S1")
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_allclose(again.values_of(a.index), values[a.index].astype(np.float32))
    assert "95 spots" in repr(again) and again.method == "ball_tree"


def test_zero_vectors_do_not_break_the_search():
    x, slides, spots = _bank((4, 4))
    x[0] = 0.0
    index = ExemplarIndex.build(x, slides, spots)
    res = index.query(np.zeros((1, x.shape[1])), 2)
    np.testing.assert_allclose(res.similarity, 0.0)
