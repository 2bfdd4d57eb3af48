from __future__ import annotations

import numpy as np
import pytest

from bitro.pp._graph import within_bag_knn
from bitro.tl._data import build_bags, collate, quantise_positions
from bitro.tl._targets import TargetTransform


def _bags(sdata, k=8):
    cells = sdata["cells"]
    x = cells.obsm["X_bitro"]
    return build_bags(
        [sdata], features=[x], phenotypes=[np.zeros(len(x), int)], units_key="spots", bag_key="spot_id", k=k
    )


def test_within_bag_knn_never_crosses_and_is_symmetric(rng):
    xy = rng.uniform(0, 50, size=(300, 2))
    g = rng.integers(0, 20, size=300)
    src, dst = within_bag_knn(xy, g, k=4)
    assert (g[src] == g[dst]).all() and (src != dst).all()
    pairs = set(zip(src.tolist(), dst.tolist()))
    assert all((b, a) in pairs for a, b in pairs)
    deg = np.bincount(src, minlength=300)
    sizes = np.bincount(g)[g]
    assert (deg >= np.minimum(4, sizes - 1)).all()


def test_build_bags_groups_cells(toy_slides):
    sdata = toy_slides[0]
    bags, _names = _bags(sdata)
    cells = sdata["cells"]
    assert bags.n_bags == sdata["spots"].n_obs  # every toy spot has cells
    assert bags.n_cells.sum() == cells.obs["spot_id"].notna().sum()
    # each bag's cells are exactly the cells assigned to that spot
    for b in (0, 5, bags.n_bags - 1):
        rows = bags.cell_obs[bags.bag_ptr[b] : bags.bag_ptr[b + 1]]
        assert set(cells.obs_names[rows]) == set(cells.obs_names[cells.obs["spot_id"] == bags.bag_ids[b]])
    # edges are local to their bag
    for b in range(bags.n_bags):
        e = bags.edges[:, bags.edge_ptr[b] : bags.edge_ptr[b + 1]]
        assert (e >= 0).all() and (e < bags.n_cells[b]).all()
    assert bags.pos.min() >= 0 and bags.pos.max() < 64


def test_collate_disjoint_graph(toy_slides):
    bags, _ = _bags(toy_slides[0])
    batch = collate(bags, np.array([3, 1, 7]))
    n = bags.n_cells[[3, 1, 7]]
    assert batch["x"].shape[0] == n.sum()
    b = batch["batch"].numpy()
    ei = batch["edge_index"].numpy()
    assert (b[ei[0]] == b[ei[1]]).all()
    np.testing.assert_array_equal(np.bincount(b), n)


def test_empty_spot_is_skipped(toy_slides):
    sdata = toy_slides[0]
    cells = sdata["cells"]
    cells.obs.loc[cells.obs["spot_id"] == "s0", "spot_id"] = None
    bags, _ = _bags(sdata)
    assert "s0" not in bags.bag_ids and bags.n_bags == sdata["spots"].n_obs - 1


def test_missing_assignment_error(toy_slides):
    sdata = toy_slides[0]
    del sdata["cells"].obs["spot_id"]
    with pytest.raises(KeyError, match="assign_cells"):
        _bags(sdata)


def test_quantise_positions():
    rel = np.array([[-0.1, 0.0], [0.5, 0.999], [1.2, 0.25]])
    np.testing.assert_array_equal(quantise_positions(rel, 4), [[0, 0], [2, 3], [3, 1]])


@pytest.mark.parametrize("scale", ["raw", "library_size"])
def test_target_transform_round_trip(scale, rng):
    counts = rng.poisson(5, size=(40, 6)).astype(float)
    t = TargetTransform.fit(counts, list("ABCDEF"), scale=scale)
    z = t.encode(counts)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-4)
    back = t.to_counts(z)
    if scale == "raw":
        np.testing.assert_allclose(back, counts, atol=1e-3)
    else:
        np.testing.assert_allclose(back.sum(axis=1), t.target_sum, rtol=1e-4)
    with pytest.raises(ValueError, match="scale"):
        TargetTransform.fit(counts, list("ABCDEF"), scale="tpm")


def test_target_transform_without_zscore(rng):
    counts = rng.poisson(5, size=(40, 6)).astype(float)
    t = TargetTransform.fit(counts, list("ABCDEF"), zscore=False)
    assert not t.zscore
    np.testing.assert_allclose(t.encode(counts), np.log1p(counts), atol=1e-5)
    np.testing.assert_allclose(t.to_counts(t.encode(counts)), counts, atol=1e-3)
    again = TargetTransform.from_arrays(t.arrays(), t.meta())
    assert again.zscore is False
    with pytest.raises(ValueError, match="zscore"):
        TargetTransform.fit(counts, list("ABCDEF"), zscore="no")


def test_validation_keeps_the_copies_of_a_validation_spot_out_of_training(toy_slides):
    from types import SimpleNamespace

    from bitro.tl._cv import light_copy
    from bitro.tl._levels import get_level

    original, other = toy_slides[0], toy_slides[1]
    source = original.attrs["bitro_scale"]["sample_id"]
    copies = []
    for i in range(2):  # what bt.pp.augment_slide records on a copy: its own sample id, and its source
        copy = light_copy(original)
        copy.attrs["bitro_scale"] = {**copy.attrs["bitro_scale"], "sample_id": f"{source}_aug{i}"}
        copy.attrs["bitro_augment"] = [{"source_sample_id": source, "sample_id": f"{source}_aug{i}"}]
        copies.append(copy)
    slides = [original, other, *copies]
    feats = [s["cells"].obsm["X_bitro"] for s in slides]
    bags, _ = build_bags(
        slides,
        features=feats,
        phenotypes=[np.zeros(len(x), int) for x in feats],
        units_key="spots",
        bag_key="spot_id",
    )
    n0, n1 = (int((bags.bag_slide == s).sum()) for s in (0, 1))
    # the copies' spots share the original's groups; the other slide's spots have groups of their own
    for s in (2, 3):
        np.testing.assert_array_equal(
            bags.bag_group[bags.bag_slide == s], bags.bag_group[bags.bag_slide == 0]
        )
    assert len(np.unique(bags.bag_group)) == n0 + n1
    train, val = get_level("spot").split(SimpleNamespace(bags=bags), 0.3, np.random.default_rng(0))
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == bags.n_bags
    assert not set(bags.bag_group[train]) & set(bags.bag_group[val])
    assert 0.2 < len(val) / bags.n_bags < 0.4
    # without copies the split is the per-spot draw it always was
    plain, _ = _bags(original)
    t_plain, v_plain = get_level("spot").split(SimpleNamespace(bags=plain), 0.3, np.random.default_rng(0))
    perm = np.random.default_rng(0).permutation(plain.n_bags)
    n_val = round(0.3 * plain.n_bags)
    np.testing.assert_array_equal(v_plain, np.sort(perm[:n_val]))
    np.testing.assert_array_equal(t_plain, np.sort(perm[n_val:]))
