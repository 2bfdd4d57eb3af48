"""Metrics with known answers, and bt.tl.evaluate on small tables."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from scipy import sparse
from scipy.stats import pearsonr

import bitro as bt
from bitro.io._build import circles_element, table_element
from bitro.tl._metric_fns import mae, mse, original_reference, pcc_gene_top, top_genes

LN2 = np.log(2.0)


# ------------------------------------------------------------------------------------------ pure metrics
def test_pcc_perfect_and_anticorrelated(rng):
    obs = rng.gamma(2.0, 1.0, size=(20, 8))
    assert bt.tl.pcc_gene(obs, obs).value == pytest.approx(1.0)
    assert bt.tl.pcc_overall(obs, 3 * obs + 1).value == pytest.approx(1.0)
    # mirrored around the gene mean: every gene anti-correlated
    res = bt.tl.pcc_gene(obs, 2 * obs.mean(axis=0) - obs)
    assert res.value == pytest.approx(-1.0) and res.n_constant == 0
    np.testing.assert_allclose(res.values, -1.0)
    assert bt.tl.pcc_overall(obs, -obs).value == pytest.approx(-1.0)


def test_pcc_matches_scipy_on_hand_example():
    obs = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 5.0], [0.0, 4.0, 4.0], [3.0, 3.0, 1.0]])
    pred = np.array([[1.5, 1.0, 2.0], [1.0, 2.0, 6.0], [0.5, 3.0, 3.0], [2.0, 5.0, 2.0]])
    g = bt.tl.pcc_gene(obs, pred)
    expected_g = [pearsonr(obs[:, j], pred[:, j])[0] for j in range(3)]
    np.testing.assert_allclose(g.values, expected_g, rtol=1e-12)
    assert g.value == pytest.approx(np.mean(expected_g))
    o = bt.tl.pcc_overall(obs, pred)
    expected_o = [pearsonr(obs[i], pred[i])[0] for i in range(4)]
    np.testing.assert_allclose(o.values, expected_o, rtol=1e-12)
    assert o.value == pytest.approx(np.mean(expected_o))
    assert len(o.values) == 4 and len(g.values) == 3


def test_constant_prediction_counts_as_zero_and_is_reported(rng):
    obs = rng.normal(size=(10, 4))
    pred = obs.copy()
    pred[:, 1] = 2.5  # constant prediction for gene 1
    pred[:, 3] = 0.0
    res = bt.tl.pcc_gene(obs, pred)
    assert res.n_constant == 2
    np.testing.assert_allclose(res.values, [1.0, 0.0, 1.0, 0.0])
    assert res.value == pytest.approx(0.5)
    # a unit with a constant observed profile counts as 0 in PCC_overall
    obs2 = obs.copy()
    obs2[0] = 7.0
    res2 = bt.tl.pcc_overall(obs2, obs)
    assert res2.n_constant == 1 and res2.values[0] == 0.0
    assert res2.value == pytest.approx(9 / 10)


def test_js_known_values_and_symmetry(rng):
    p = rng.gamma(1.0, size=(5, 6))
    js = bt.tl.js_divergence(p, p)
    np.testing.assert_allclose(js.values, 0.0, atol=1e-12)
    # scale-invariant: counts and their rescaling give the same distribution
    assert bt.tl.js_divergence(p, 10 * p).value == pytest.approx(0.0, abs=1e-12)
    disjoint = bt.tl.js_divergence(np.array([[1.0, 2.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 3.0, 1.0]]))
    assert disjoint.value == pytest.approx(LN2)
    q = rng.gamma(1.0, size=(5, 6))
    np.testing.assert_allclose(bt.tl.js_divergence(p, q).values, bt.tl.js_divergence(q, p).values)
    # hand-computed: P = (1/2, 1/2), Q = (1, 0) -> M = (3/4, 1/4)
    hand = 0.5 * (0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)) + 0.5 * np.log(1 / 0.75)
    assert bt.tl.js_divergence(np.array([1.0, 1.0]), np.array([1.0, 0.0])).value == pytest.approx(hand)
    assert ((bt.tl.js_divergence(p, q).values >= 0) & (bt.tl.js_divergence(p, q).values <= LN2)).all()


def test_js_rejects_negative_and_flags_empty_rows():
    with pytest.raises(ValueError, match="non-negative"):
        bt.tl.js_divergence(np.array([[1.0, -1.0]]), np.array([[1.0, 1.0]]))
    res = bt.tl.js_divergence(np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[1.0, 1.0], [1.0, 1.0]]))
    assert np.isnan(res.values[0]) and res.n_constant == 1 and res.value == pytest.approx(0.0)


def test_errors_mse_mae_and_top_genes(rng):
    obs = np.array([[0.0, 1.0], [2.0, 3.0]])
    pred = np.array([[1.0, 1.0], [2.0, 1.0]])
    assert mse(obs, pred).value == pytest.approx((1 + 0 + 0 + 4) / 4)
    assert mae(obs, pred).value == pytest.approx((1 + 0 + 0 + 2) / 4)
    z = rng.normal(size=(30, 60))
    z = (z - z.mean(0)) / z.std(0)
    x = z * np.arange(1, 61)  # variance exactly grows with the column index
    np.testing.assert_array_equal(top_genes(x, 50, by="variance"), np.arange(10, 60))
    means = np.tile(np.arange(60.0)[::-1], (5, 1))
    np.testing.assert_array_equal(top_genes(means, 3, by="mean"), [0, 1, 2])
    res = pcc_gene_top(x, x + rng.normal(size=x.shape), n=50)
    assert len(res.values) == 50 and res.index is not None
    assert len(top_genes(x[:, :5], 50)) == 5


def test_shape_and_unit_errors(rng):
    with pytest.raises(ValueError, match="same shape"):
        bt.tl.pcc_gene(rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    with pytest.raises(ValueError, match="at least 2 units"):
        bt.tl.pcc_gene(rng.normal(size=(1, 3)), rng.normal(size=(1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        bt.tl.pcc_overall(np.array([[1.0, np.nan]]), np.array([[1.0, 2.0]]))


def test_original_reference_pairs(rng):
    base = rng.gamma(2.0, 50.0, size=40)
    bulk = np.vstack([base, base, base * 2])  # identical compositions
    ref = original_reference(bulk)
    assert ref["n_pairs"] == 3 and ref["js"] == pytest.approx(0.0, abs=1e-12)
    assert ref["pcc_overall"] > 0.99
    many = rng.gamma(2.0, 50.0, size=(60, 40))
    ref2 = original_reference(many, max_pairs=100, seed=1)
    assert ref2["n_pairs"] == 100 and 0 < ref2["js"] < LN2
    assert ref2 == original_reference(many, max_pairs=100, seed=1)


# ------------------------------------------------------------------------------------------ evaluate
def _spots_table(rng, n_spots=30, n_genes=6):
    depth = rng.uniform(0.5, 3.0, size=(n_spots, 1))
    profile = rng.gamma(2.0, 5.0, size=(n_spots, n_genes))
    counts = rng.poisson(depth * profile).astype(np.float32)
    genes = [f"G{i}" for i in range(n_genes)]
    ids = [f"s{i}" for i in range(n_spots)]
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts), obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=genes)
    )
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["spatial"] = rng.uniform(0, 1000, size=(n_spots, 2))
    return adata, counts


def _sdata(adata):
    xy = adata.obsm["spatial"]
    return sd.SpatialData(
        shapes={"spots_shapes": circles_element(xy, 10.0, adata.obs_names)},
        tables={"spots": table_element(adata, region="spots_shapes")},
    )


def test_evaluate_perfect_prediction_and_key_placement(rng):
    adata, counts = _spots_table(rng)
    adata.layers["bitro"] = np.log1p(counts)
    sdata = _sdata(adata)
    res = bt.tl.evaluate(sdata)
    assert list(res.columns) == ["metric", "scale", "value", "n_units", "n_genes", "n_constant"]
    assert set(res.scale) == {"raw", "library_size"}
    assert set(res.metric) == {
        "pcc_gene",
        "pcc_overall",
        "pcc_gene_top50_var",
        "pcc_gene_top50_mean",
        "mse",
        "mae",
        "js",
    }
    pcc = res[res.metric.str.startswith("pcc")]
    np.testing.assert_allclose(pcc.value, 1.0, rtol=1e-9)
    np.testing.assert_allclose(res[res.metric.isin(["mse", "mae", "js"])].value, 0.0, atol=1e-6)
    assert (res.n_units == 30).all() and (res.n_genes == 6).all()
    table = sdata["spots"]
    for scale in ("raw", "library_size"):
        np.testing.assert_allclose(table.var[f"bitro_pcc_{scale}"], 1.0, rtol=1e-6)
        assert table.var[f"bitro_pcc_{scale}"].dtype == np.float32
        assert f"bitro_pcc_overall_{scale}" in table.obs
    ev = table.uns["bitro_eval"]
    assert ev["params"]["target_sum"] == pytest.approx(np.median(counts.sum(axis=1)))
    assert pd.DataFrame(ev["results"]).shape == res.shape
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.tl.evaluate(sdata)
    bt.tl.evaluate(sdata, overwrite=True)


def test_evaluate_depth_only_prediction_separates_scales(rng):
    """A prediction that only knows each spot's depth scores on raw log1p but not after normalisation."""
    adata, counts = _spots_table(rng, n_spots=60)
    depth = counts.sum(axis=1, keepdims=True)
    gene_frac = counts.sum(axis=0) / counts.sum()
    adata.layers["bitro"] = np.log1p(depth * gene_frac).astype(np.float32)
    res = bt.tl.evaluate(adata, inplace=False).set_index(["metric", "scale"])["value"]
    assert res["pcc_gene", "raw"] > 0.4
    # every unit gets the same composition -> after library-size normalisation each gene is constant
    assert res["pcc_gene", "library_size"] == pytest.approx(0.0, abs=1e-9)
    n_const = bt.tl.evaluate(adata, inplace=False).set_index(["metric", "scale"])["n_constant"]
    assert n_const["pcc_gene", "library_size"] == 6
    assert "bitro_eval" not in adata.uns  # inplace=False writes nothing


def test_evaluate_library_size_matches_manual(rng):
    adata, counts = _spots_table(rng)
    pred = np.log1p(counts * rng.uniform(0.5, 1.5, size=counts.shape))
    adata.layers["bitro"] = pred.astype(np.float32)
    res = bt.tl.evaluate(adata, normalize="library_size", target_sum=1000.0, inplace=False)
    assert set(res.scale) == {"library_size"}
    o = np.log1p(counts / counts.sum(1, keepdims=True) * 1000)
    pc = np.expm1(adata.layers["bitro"].astype(np.float64))
    p = np.log1p(pc / pc.sum(1, keepdims=True) * 1000)
    expected = np.mean([pearsonr(o[:, j], p[:, j])[0] for j in range(o.shape[1])])
    assert res.set_index("metric").loc["pcc_gene", "value"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_nan_genes_and_units(rng):
    adata, counts = _spots_table(rng)
    pred = np.log1p(counts).astype(np.float32)
    pred[:, 2] = np.nan  # gene the model does not have
    pred[[0, 5]] = np.nan  # spots without cells
    adata.layers["bitro"] = pred
    res = bt.tl.evaluate(adata)
    assert (res.n_genes == 5).all() and (res.n_units == 28).all()
    assert np.isnan(adata.var["bitro_pcc_raw"].iloc[2])
    assert np.isnan(adata.obs["bitro_pcc_overall_raw"].iloc[0])
    assert adata.uns["bitro_eval"]["genes_without_prediction"] == ["G2"]
    assert adata.uns["bitro_eval"]["n_units_without_prediction"] == 2
    sub = bt.tl.evaluate(adata, genes=["G0", "G1"], inplace=False)
    assert (sub.n_genes == 2).all()


def test_evaluate_says_once_which_genes_were_scored(rng, caplog):
    adata, counts = _spots_table(rng)
    pred = np.log1p(counts).astype(np.float32)
    pred[:, [2, 4]] = np.nan  # genes the model does not have
    adata.layers["bitro"] = pred
    with caplog.at_level(logging.INFO, logger="bitro"):
        bt.tl.evaluate(adata)
    lines = [
        r.getMessage() for r in caplog.records if "genes" in r.getMessage() and "scored" in r.getMessage()
    ]
    n = adata.n_vars
    assert lines == [
        f"evaluate: scored the {n - 2} genes with a prediction in layer 'bitro'; "
        f"2 of the table's {n} genes have no prediction (not in the model)."
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bitro"):
        bt.tl.evaluate(adata, genes=["G0", "G1"], inplace=False)
    assert "evaluate: scored the 2 genes of genes= in layer 'bitro'; 2 of the table's" in caplog.text


def test_evaluate_errors(rng):
    adata, counts = _spots_table(rng)
    sdata = _sdata(adata)
    with pytest.raises(KeyError, match=r"bt\.tl\.predict"):
        bt.tl.evaluate(sdata)
    with pytest.raises(KeyError, match="spots"):
        bt.tl.evaluate(sdata, table_key="nope")
    adata.layers["bitro"] = np.full(counts.shape, np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="No gene"):
        bt.tl.evaluate(adata)
    pred = np.log1p(counts)
    pred[1:] = np.nan
    adata.layers["bitro"] = pred
    # one scored unit (e.g. one bulk sample): gene-wise PCC is NaN, per-unit metrics are kept
    one = bt.tl.evaluate(adata, inplace=False)
    assert np.isnan(one.loc[one.metric == "pcc_gene", "value"]).all()
    assert np.allclose(one.loc[(one.metric == "pcc_overall") & (one.scale == "raw"), "value"], 1.0)
    adata.layers["bitro"] = np.full(counts.shape, np.nan, dtype=np.float32)
    adata.layers["bitro"][0, 0] = 1.0  # gene 0 predicted only in unit 0, gene 1 only in unit 1
    adata.layers["bitro"][1, 1] = 1.0
    with pytest.raises(ValueError, match="No unit"):
        bt.tl.evaluate(adata)
    with pytest.raises(KeyError, match="not in the table"):
        adata.layers["bitro"] = np.log1p(counts)
        bt.tl.evaluate(adata, genes=["NOPE"])
    with pytest.raises(ValueError, match="normalize"):
        bt.tl.evaluate(adata, normalize="tpm")


def test_score_cells_against_truth_table(rng):
    cells, counts = _spots_table(rng, n_spots=40)
    pred_cells = cells.copy()
    del pred_cells.layers["counts"]
    pred = np.log1p(counts).astype(np.float32)
    pred[:3] = np.nan  # cells outside every bag
    pred_cells.layers["bitro"] = pred
    sdata = sd.SpatialData(tables={"cells": pred_cells, "cells_truth": cells})
    from bitro.tl._metrics import score_cells

    res = score_cells(sdata, truth_key="cells_truth", inplace=False)
    assert (res.n_units == 37).all()
    np.testing.assert_allclose(res[res.metric == "pcc_gene"].value, 1.0, rtol=1e-6)
    assert "bitro_cells_eval" not in pred_cells.uns  # inplace=False writes nothing
    again = score_cells(sdata, truth_key="cells_truth")  # the default writes, like evaluate
    pd.testing.assert_frame_equal(again, res)
    assert "bitro_cells_eval" in pred_cells.uns


def test_evaluate_skips_empty_units_on_library_size_and_records_scale(rng):
    adata, counts = _spots_table(rng)
    counts[4] = 0  # a spot that captured nothing
    adata.layers["counts"] = sparse.csr_matrix(counts)
    adata.layers["bitro"] = np.log1p(counts * 1.1).astype(np.float32)
    adata.uns["bitro"] = {"target_scale": "library_size"}
    res = bt.tl.evaluate(adata).set_index(["metric", "scale"])
    assert res.loc[("pcc_gene", "raw"), "n_units"] == 30
    assert res.loc[("pcc_gene", "library_size"), "n_units"] == 29
    assert np.isnan(adata.obs["bitro_pcc_overall_library_size"].iloc[4])
    assert adata.obs["bitro_pcc_overall_raw"].iloc[4] == 0.0  # constant observed profile counts as 0
    assert adata.uns["bitro_eval"]["params"]["prediction_scale"] == "library_size"


@pytest.mark.realdata
def test_evaluate_depth_only_on_her2st(data_dir):
    """On real HER2ST spots, depth alone gives a positive raw PCC_gene and exactly 0 after normalisation."""
    if not (data_dir / "her2st").is_dir():
        pytest.skip("HER2ST not in the data kit")
    genes = bt.datasets.her2st_genes(data_dir)
    train = bt.datasets.her2st("C2", data_dir=data_dir, image=False)["spots"]
    sdata = bt.datasets.her2st("C3", data_dir=data_dir, image=False)
    test = sdata["spots"]
    genes = [g for g in genes if g in test.var_names and g in train.var_names]
    frac = np.asarray(train[:, genes].layers["counts"].sum(axis=0)).ravel()
    depth = np.asarray(test[:, genes].layers["counts"].sum(axis=1)).ravel()
    pred = np.full(test.shape, np.nan, dtype=np.float32)
    pred[:, test.var_names.get_indexer(genes)] = np.log1p(depth[:, None] * frac[None] / frac.sum())
    test.layers["bitro"] = pred
    res = bt.tl.evaluate(sdata).set_index(["metric", "scale"])
    assert (res.n_genes[res.index.get_level_values("metric") == "pcc_gene"] == len(genes)).all()
    assert res.loc[("pcc_gene", "raw"), "value"] > 0.2
    assert res.loc[("pcc_gene", "library_size"), "value"] == 0.0
    assert res.loc[("pcc_gene", "library_size"), "n_constant"] == len(genes)
    assert len(test.uns["bitro_eval"]["genes_without_prediction"]) == test.n_vars - len(genes)
