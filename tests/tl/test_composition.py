"""Marker typing of cells, per-spot composition and its comparison with a reference (known answers)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bitro as bt

MARKERS = {"A": ["a1", "a2"], "B": ["b1", "b2", "b3"], "C": ["c1"]}
OTHER = [f"g{i}" for i in range(6)]


def planted_cells(rng, n_per_type: int = 20, *, depth_spread: bool = True) -> tuple[ad.AnnData, np.ndarray]:
    """Cells whose own type's markers are high; library sizes spread over two orders of magnitude."""
    genes = [g for gs in MARKERS.values() for g in gs] + OTHER
    truth = np.repeat(list(MARKERS), n_per_type)
    counts = rng.poisson(2.0, size=(len(truth), len(genes))).astype(float)
    for t, gs in MARKERS.items():
        cols = [genes.index(g) for g in gs]
        counts[np.ix_(truth == t, cols)] += 30
    if depth_spread:
        counts *= rng.choice([0.1, 1.0, 10.0], size=(len(truth), 1))
    cells = ad.AnnData(
        X=np.log1p(counts),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(len(truth))]),
        var=pd.DataFrame(index=genes),
    )
    return cells, truth


def test_cell_type_markers_restricts_to_the_genes_at_hand():
    assert bt.tl.cell_type_markers(["b2", "zz", "a1"], markers=MARKERS) == {"A": ["a1"], "B": ["b2"], "C": []}
    default = bt.tl.cell_type_markers()
    assert set(default) == {
        "B-cells", "CAFs", "Endothelial", "Epithelial", "Myeloid", "Plasma Cells", "PVL", "T-cells",
    }  # fmt: skip
    assert {"CD3D", "TRAC"} <= set(default["T-cells"]) and "EPCAM" in default["Epithelial"]
    assert bt.tl.cell_type_markers(["CD3D", "KRT8"])["T-cells"] == ["CD3D"]


def test_cell_type_markers_refuses_a_string_as_gene_list():
    with pytest.raises(TypeError, match=r"markers\['A'\] is the string"):
        bt.tl.cell_type_markers(markers={"A": "a1"})
    with pytest.raises(TypeError, match="must map each type"):
        bt.tl.cell_type_markers(markers=["a1"])


def test_type_cells_recovers_planted_types_at_any_depth(rng):
    cells, truth = planted_cells(rng)
    bt.tl.type_cells(cells, layer=None, markers=MARKERS)
    assert list(cells.obs["marker_type"].cat.categories) == ["A", "B", "C"]
    assert (cells.obs["marker_type"].astype(str).to_numpy() == truth).all()
    scores = cells.obsm["marker_type_scores"]
    assert list(scores.columns) == ["A", "B", "C"] and (scores.index == cells.obs_names).all()
    # each cell's own type scores highest, by construction of the mean z-score
    own = scores.to_numpy()[np.arange(len(truth)), pd.Index(["A", "B", "C"]).get_indexer(truth)]
    assert (own == scores.to_numpy().max(axis=1)).all()
    assert cells.uns["marker_type"]["markers"] == MARKERS
    assert cells.uns["marker_type"]["params"]["normalize"] is True


def test_type_cells_gives_types_with_few_markers_no_advantage_by_chance(rng):
    """On pure noise, a type scored from one marker is not the max more often than types with eight."""
    genes = ["a"] + [f"b{i}" for i in range(8)] + [f"c{i}" for i in range(8)]
    cells = ad.AnnData(X=rng.normal(5.0, 1.0, size=(3000, len(genes))), var=pd.DataFrame(index=genes))
    markers = {"A": ["a"], "B": genes[1:9], "C": genes[9:]}
    typed = bt.tl.type_cells(cells, layer=None, normalize=False, markers=markers, inplace=False)
    share = typed["marker_type"].value_counts(normalize=True)
    assert share.between(0.28, 0.39).all(), share  # a fair third each (unstandardised: A wins 43%)
    np.testing.assert_allclose(typed[["A", "B", "C"]].std(axis=0, ddof=0), 1.0)


def test_type_cells_scores_do_not_depend_on_depth(rng):
    """A cell and a copy of it with ten times the counts get the same scores (and differ without normalize)."""
    cells, _ = planted_cells(rng, depth_spread=False)
    deep = cells.copy()
    deep.X = np.log1p(np.expm1(cells.X) * 10)
    both = ad.concat([cells, deep], index_unique="-")
    norm = bt.tl.type_cells(both, layer=None, markers=MARKERS, inplace=False)
    n = cells.n_obs
    np.testing.assert_allclose(norm.iloc[:n, :3].to_numpy(), norm.iloc[n:, :3].to_numpy(), atol=1e-9)
    raw = bt.tl.type_cells(both, layer=None, markers=MARKERS, normalize=False, inplace=False)
    assert not np.allclose(raw.iloc[:n, :3].to_numpy(), raw.iloc[n:, :3].to_numpy(), atol=1e-3)


def test_type_cells_skips_cells_and_genes_without_values(rng):
    cells, _ = planted_cells(rng, depth_spread=False)
    x = cells.X.copy()
    x[:3] = np.nan  # cells outside every spot
    x[:, list(cells.var_names).index("g0")] = np.nan  # a gene the model does not predict
    cells.layers["bitro"] = x
    bt.tl.type_cells(cells, markers={**MARKERS, "D": ["g0", "g1"]})
    typed = cells.obs["marker_type"]
    assert typed.iloc[:3].isna().all() and cells.obsm["marker_type_scores"].iloc[:3].isna().all().all()
    assert typed.iloc[3:].notna().all()
    assert cells.uns["marker_type"]["markers"]["D"] == ["g1"]
    assert cells.uns["marker_type"]["markers_missing"] == {"D": ["g0"]}


def test_type_cells_inplace_false_returns_and_leaves_the_table(rng):
    cells, truth = planted_cells(rng)
    out = bt.tl.type_cells(cells, layer=None, markers=MARKERS, inplace=False, key_added="t")
    assert "t" not in cells.obs and "t_scores" not in cells.obsm and "t" not in cells.uns
    assert list(out.columns) == ["A", "B", "C", "t"] and (out["t"].astype(str).to_numpy() == truth).all()


def test_type_cells_errors(rng):
    cells, _ = planted_cells(rng)
    with pytest.raises(ValueError, match=r"No marker of \['Z'\]"):
        bt.tl.type_cells(cells, layer=None, markers={**MARKERS, "Z": ["nope"]})
    with pytest.raises(KeyError, match="layer 'bitro' not found"):
        bt.tl.type_cells(cells)
    neg = cells.copy()
    neg.X = neg.X - 5
    with pytest.raises(ValueError, match="negative values"):
        bt.tl.type_cells(neg, layer=None, markers=MARKERS)
    bt.tl.type_cells(cells, layer=None, markers=MARKERS)
    before = cells.obs["marker_type"].copy()
    with pytest.raises(ValueError, match="already exists"):
        bt.tl.type_cells(cells, layer=None, markers={"A": ["a1"], "B": ["b1"]})
    assert cells.obs["marker_type"].equals(before)
    bt.tl.type_cells(cells, layer=None, markers={"A": ["a1"], "B": ["b1"]}, overwrite=True)
    assert list(cells.obs["marker_type"].cat.categories) == ["A", "B"]


def slide_with_types() -> object:
    """Spots s0–s3 and 10 typed cells: s0 = A A B B, s1 = C, s2 = A + an untyped cell, s3 empty, 2 outside."""
    import spatialdata as sd

    spots = ad.AnnData(X=np.zeros((4, 1)), obs=pd.DataFrame(index=["s0", "s1", "s2", "s3"]))
    spot_id = ["s0", "s0", "s0", "s0", "s1", "s2", "s2", None, None, "s1"]
    types = ["A", "A", "B", "B", "C", "A", None, "A", "C", "C"]
    cells = ad.AnnData(
        X=np.zeros((10, 1)),
        obs=pd.DataFrame(
            {
                "spot_id": pd.Categorical(spot_id, categories=["s0", "s1", "s2", "s3"]),
                "marker_type": pd.Categorical(types, categories=["A", "B", "C"]),
            },
            index=[f"c{i}" for i in range(10)],
        ),
    )
    return sd.SpatialData(tables={"spots": spots, "cells": cells})


def test_spot_composition_counts_typed_cells_per_spot():
    sdata = slide_with_types()
    bt.tl.spot_composition(sdata)
    comp = sdata["spots"].obsm["marker_composition"]
    assert list(comp.columns) == ["A", "B", "C"] and (comp.index == sdata["spots"].obs_names).all()
    np.testing.assert_allclose(comp.loc["s0"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(comp.loc["s1"], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(comp.loc["s2"], [1.0, 0.0, 0.0])  # the untyped cell is not counted
    assert comp.loc["s3"].isna().all()
    assert sdata["spots"].obs["marker_composition_n_cells"].tolist() == [4, 2, 1, 0]
    with pytest.raises(ValueError, match="already exists"):
        bt.tl.spot_composition(sdata)


def test_spot_composition_of_a_cells_table_alone_returns_the_fractions():
    cells = slide_with_types()["cells"]
    with pytest.raises(ValueError, match="inplace=False"):
        bt.tl.spot_composition(cells)
    comp = bt.tl.spot_composition(cells, inplace=False)
    assert comp.index.tolist() == ["s0", "s1", "s2", "s3"] and comp.index.name == "spot"
    np.testing.assert_allclose(comp.loc["s0"], [0.5, 0.5, 0.0])


def test_spot_composition_errors():
    sdata = slide_with_types()
    with pytest.raises(KeyError, match=r"Run bt\.tl\.type_cells first"):
        bt.tl.spot_composition(sdata, type_key="cell_type")
    with pytest.raises(KeyError, match=r"Run bt\.pp\.assign_cells first"):
        bt.tl.spot_composition(sdata, spot_key="bag")
    sdata["cells"].obs["spot_id"] = sdata["cells"].obs["spot_id"].cat.add_categories(["s9"])
    sdata["cells"].obs.loc["c9", "spot_id"] = "s9"
    with pytest.raises(ValueError, match=r"not in the 'spots' table \(e.g. \['s9'\]\)"):
        bt.tl.spot_composition(sdata)


def test_compare_composition_aligns_by_spot_id():
    ids = [f"{i}x{i + 1}" for i in range(12)]
    ref = pd.DataFrame({"A": np.linspace(0, 1, 12), "B": np.linspace(1, 0, 12) ** 2, "R": 1.0}, index=ids)
    rng = np.random.default_rng(0)
    order = rng.permutation(12)[:10]  # two reference spots are missing from pred, and pred is shuffled
    pred = pd.DataFrame(
        {"B": np.exp(ref["B"].to_numpy()[order]), "A": -ref["A"].to_numpy()[order], "P": 0.0},
        index=[ids[i] for i in order],
    )
    pred.loc["99x99"] = [0.5, 0.5, 0.0]  # a spot the reference lacks
    pred.iloc[0, pred.columns.get_loc("A")] = np.nan
    res = bt.tl.compare_composition(pred, ref)
    assert res.index.tolist() == ["B", "A"] and res.index.name == "type"
    assert res.loc["B", "spearman"] == pytest.approx(1.0) and res.loc["A", "spearman"] == pytest.approx(-1.0)
    assert res.loc["B", "n_spots"] == 10 and res.loc["A", "n_spots"] == 9
    assert res.loc["B", "pvalue"] < 1e-6
    # a misaligned comparison (positions instead of ids) would not give a perfect correlation
    assert bt.tl.compare_composition(pred.set_axis(ids[:11]), ref).loc["B", "spearman"] < 0.99


def test_compare_composition_constant_types_and_errors():
    ids = [f"{i}x0" for i in range(5)]
    ref = pd.DataFrame({"A": [0.1, 0.2, 0.3, 0.4, 0.5], "B": [0.9, 0.8, 0.7, 0.6, 0.5]}, index=ids)
    one_hot = pd.DataFrame({"A": [0.0] * 5, "B": [1.0] * 5}, index=ids)  # an equal split: one type everywhere
    res = bt.tl.compare_composition(one_hot, ref)
    assert res["spearman"].isna().all() and res["n_spots"].tolist() == [5, 5]
    assert bt.tl.compare_composition(ref.iloc[:2], ref).loc["A", "n_spots"] == 2  # too few spots: NaN
    assert np.isnan(bt.tl.compare_composition(ref.iloc[:2], ref).loc["A", "spearman"])
    with pytest.raises(ValueError, match="share no type"):
        bt.tl.compare_composition(ref.rename(columns={"A": "X", "B": "Y"}), ref)
    with pytest.raises(ValueError, match="share no spot id"):
        bt.tl.compare_composition(ref.set_axis([f"s{i}" for i in range(5)]), ref)
    with pytest.raises(KeyError, match=r"Types \['T-cells'\] are not columns of reference"):
        bt.tl.compare_composition(ref.assign(**{"T-cells": 0.0}), ref, types=["A", "T-cells"])
    with pytest.raises(ValueError, match="repeated spot ids"):
        bt.tl.compare_composition(pd.concat([ref, ref.iloc[:1]]), ref)
    with pytest.raises(TypeError, match="DataFrame of spots"):
        bt.tl.compare_composition(ref.to_numpy(), ref)


def test_equal_split_gives_one_type_per_spot(rng):
    """Cells that share their spot's profile all get one type: the composition is one-hot per spot."""
    import spatialdata as sd

    spot_cells, _ = planted_cells(rng, n_per_type=2, depth_spread=False)
    n_spots = spot_cells.n_obs
    spot_ids = np.repeat(spot_cells.obs_names.to_numpy(), 5)
    cells = ad.AnnData(
        X=np.repeat(spot_cells.X, 5, axis=0),
        obs=pd.DataFrame({"spot_id": pd.Categorical(spot_ids)}, index=[f"c{i}" for i in range(5 * n_spots)]),
        var=spot_cells.var.copy(),
    )
    sdata = sd.SpatialData(tables={"spots": spot_cells, "cells": cells})
    bt.tl.type_cells(sdata, layer=None, markers=MARKERS)
    bt.tl.spot_composition(sdata)
    comp = sdata["spots"].obsm["marker_composition"].to_numpy()
    assert set(np.unique(comp)) == {0.0, 1.0} and (comp.sum(axis=1) == 1).all()
