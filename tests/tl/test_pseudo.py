"""bt.tl.pseudo_spots on tiny cell-resolved data with known answers, and pseudo-cell scoring."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from scipy import sparse

import bitro as bt
from bitro.io._build import circles_element, set_scale, table_element
from bitro.tl._metrics import score_cells

MPP = 0.5  # µm per px: 100 µm spots have a 100 px radius, 200 µm spacing = 400 px
# cell centroids (px) and where they belong (disc of radius 100 px around 200 + 400 k)
CELL_XY = np.array(
    [
        [100, 100],  # defines the origin (200, 200); 141 px from it -> outside
        [200, 250],  # 0x0
        [260, 200],  # 0x0
        [600, 200],  # 1x0, at the centre
        [400, 200],  # half-way between two spots -> outside
        [620, 640],  # 1x1
        [1000, 1000],  # 2x2
        [270, 270],  # 0x0, 99 px from the centre
        [285, 285],  # 120 px from the centre: outside the disc, inside the square
    ],
    dtype=float,
)
DISC = ["", "0x0", "0x0", "1x0", "", "1x1", "2x2", "0x0", ""]
SQUARE = ["0x0", "0x0", "0x0", "1x0", "", "1x1", "2x2", "0x0", "0x0"]
GENES = ["A", "B", "C", "D"]


def _cells(rng, xy=CELL_XY) -> ad.AnnData:
    counts = rng.integers(0, 20, size=(len(xy), len(GENES))).astype(np.float32)
    ids = [f"c{i}" for i in range(len(xy))]
    cells = ad.AnnData(
        X=sparse.csr_matrix(counts), obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=GENES)
    )
    cells.layers["counts"] = cells.X.copy()
    cells.obsm["spatial"] = np.asarray(xy, dtype=float)
    return cells


def _sdata(cells: ad.AnnData) -> sd.SpatialData:
    sdata = sd.SpatialData(
        shapes={"cells_truth_shapes": circles_element(cells.obsm["spatial"], 3.0, cells.obs_names)},
        tables={"cells_truth": table_element(cells, region="cells_truth_shapes")},
    )
    set_scale(sdata, mpp=MPP)
    return sdata


def _expected_counts(cells: ad.AnnData, membership: list[str], spot: str) -> np.ndarray:
    members = np.array([m == spot for m in membership])
    return np.asarray(cells.layers["counts"][members].sum(axis=0)).ravel()


def test_pseudo_spots_known_answer_spatialdata(rng):
    sdata = _sdata(_cells(rng))
    table = bt.tl.pseudo_spots(sdata)
    cells = sdata["cells_truth"]
    # spot ids, centres on the 400 px grid starting at (200, 200), only spots with cells kept
    assert list(table.obs_names) == ["0x0", "1x0", "1x1", "2x2"]
    np.testing.assert_allclose(table.obsm["spatial"], [[200, 200], [600, 200], [600, 600], [1000, 1000]])
    assert list(table.obs["n_cells"]) == [3, 1, 1, 1]
    # membership: NA outside every spot
    got = cells.obs["spot_id"].astype("object").fillna("").tolist()
    assert got == DISC
    assert cells.obs["spot_id"].isna().sum() == 3
    # counts = sum of the member cells' counts, in X and layers["counts"]
    for spot in table.obs_names:
        expected = _expected_counts(cells, DISC, spot)
        np.testing.assert_array_equal(
            table.layers["counts"][table.obs_names.get_loc(spot)].toarray().ravel(), expected
        )
        np.testing.assert_array_equal(table.X[table.obs_names.get_loc(spot)].toarray().ravel(), expected)
    assert table.X.dtype == np.float32 and sparse.issparse(table.X)
    # written like a real ST spots table, with shapes and the scale the rest of bitro reads
    assert sdata.tables["spots"].obs_names.tolist() == table.obs_names.tolist()
    shapes = sdata.shapes["spots_shapes"]
    np.testing.assert_allclose(shapes["radius"], 100.0)
    assert list(shapes.index) == list(table.obs_names)
    assert sdata.attrs["bitro_scale"]["spot_diameter_um"] == 100.0
    assert sdata.attrs["bitro_scale"]["spot_spacing_um"] == 200.0
    assert table.uns["spots"]["n_cells_outside"] == 3
    assert (table.obs["region"] == "spots_shapes").all()


def test_pseudo_spots_agree_with_assign_cells(rng):
    sdata = _sdata(_cells(rng))
    bt.tl.pseudo_spots(sdata)
    bt.pp.assign_cells(
        sdata, spots_key="spots", cells_key="cells_truth", key_added="spot_check", overwrite=True
    )
    cells = sdata["cells_truth"]
    pd.testing.assert_series_equal(
        cells.obs["spot_id"].astype("object"), cells.obs["spot_check"].astype("object"), check_names=False
    )


def test_pseudo_spots_square_and_anndata(rng):
    cells = _cells(rng)
    cells.uns["bitro_scale"] = {"mpp": MPP}
    table = bt.tl.pseudo_spots(cells, shape="square")
    assert cells.obs["spot_id"].astype("object").fillna("").tolist() == SQUARE
    np.testing.assert_array_equal(
        table.layers["counts"][0].toarray().ravel(), _expected_counts(cells, SQUARE, "0x0")
    )
    assert table.obs.loc["0x0", "n_cells"] == 5  # the corner cell lies on the square's edge


def test_pseudo_spots_hex_grid_geometry(rng):
    xy = rng.uniform(0, 3000, size=(3000, 2))
    cells = _cells(rng, xy)
    cells.uns["bitro_scale"] = {"mpp": 1.0}
    table = bt.tl.pseudo_spots(cells, spot_diameter_um=55.0, spacing_um=100.0, grid="hex")
    centres = table.obsm["spatial"]
    origin = xy.min(axis=0) + 27.5
    row, col = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    np.testing.assert_allclose(centres[:, 1], origin[1] + row * 100 * np.sqrt(3) / 2)
    np.testing.assert_allclose(centres[:, 0], origin[0] + col * 100 + (row % 2) * 50)
    # every member lies inside its disc; every non-member is outside every disc
    codes = cells.obs["spot_id"].cat.codes.to_numpy()
    inside = codes >= 0
    d_in = np.hypot(*(xy[inside] - centres[codes[inside]]).T)
    assert (d_in <= 27.5).all()
    from scipy.spatial import cKDTree

    d_out, _ = cKDTree(centres).query(xy[~inside])
    assert (d_out > 27.5 - 1e-9).all()
    # cells cover the area uniformly: fraction inside ≈ disc area / hex cell area
    expected_frac = np.pi * 27.5**2 / (100 * 100 * np.sqrt(3) / 2)
    assert abs(inside.mean() - expected_frac) < 0.05
    assert table.obs["n_cells"].sum() == inside.sum()


def test_pseudo_spots_errors(rng):
    sdata = _sdata(_cells(rng))
    with pytest.raises(KeyError, match="cells_truth"):
        bt.tl.pseudo_spots(sdata, table_key="nope")
    with pytest.raises(ValueError, match="overlap"):
        bt.tl.pseudo_spots(sdata, spot_diameter_um=100, spacing_um=50)
    with pytest.raises(KeyError, match="layer"):
        bt.tl.pseudo_spots(sdata, layer="raw")
    with pytest.raises(ValueError, match="shape"):
        bt.tl.pseudo_spots(sdata, shape="hexagon")
    bt.tl.pseudo_spots(sdata)
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.tl.pseudo_spots(sdata)
    bt.tl.pseudo_spots(sdata, overwrite=True, spot_diameter_um=100.0)
    with pytest.raises(ValueError, match="No pseudo-spot"):
        bt.tl.pseudo_spots(sdata, key_added="big", cells_key_added="x", min_cells=50)


def test_score_cells_on_pseudo_cells(rng):
    """Pseudo-cells that split each spot's counts by the true cell shares recover the cells exactly."""
    xy = rng.uniform(0, 2000, size=(400, 2))
    cells = _cells(rng, xy)
    sdata = _sdata(cells)
    table = bt.tl.pseudo_spots(sdata, spot_diameter_um=200.0)
    counts = cells.layers["counts"].toarray().astype(np.float64)
    codes = cells.obs["spot_id"].cat.codes.to_numpy()
    inside = codes >= 0
    spot_counts = table.layers["counts"].toarray()
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(spot_counts[codes[inside]] > 0, counts[inside] / spot_counts[codes[inside]], 0)
    pred = np.full(counts.shape, np.nan, dtype=np.float32)
    pred[inside] = np.log1p(share * spot_counts[codes[inside]])
    cells.layers["bitro"] = pred
    res = score_cells(sdata, table_key="cells_truth").set_index(["metric", "scale"])
    assert res.loc[("pcc_gene", "raw"), "n_units"] == inside.sum()
    assert res.loc[("pcc_gene", "raw"), "value"] == pytest.approx(1.0, abs=1e-5)
    # an equal split of the spot over its cells is a worse pseudo-cell prediction
    n_in = np.bincount(codes[inside])
    cells.layers["bitro"][inside] = np.log1p(spot_counts[codes[inside]] / n_in[codes[inside], None])
    worse = score_cells(sdata, table_key="cells_truth", key_added="eq", inplace=True).set_index(
        ["metric", "scale"]
    )
    assert worse.loc[("pcc_gene", "library_size"), "value"] < 0.9
    assert "eq_pcc_raw" in cells.var and "eq_eval" in cells.uns


def test_pseudo_spots_and_evaluation_round_trip_zarr(tmp_path, rng):
    sdata = _sdata(_cells(rng))
    table = bt.tl.pseudo_spots(sdata)
    table.layers["bitro"] = np.log1p(table.layers["counts"].toarray()).astype(np.float32)
    bt.tl.evaluate(sdata)
    sdata.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(back["spots"].layers["counts"].toarray(), table.layers["counts"].toarray())
    assert back["cells_truth"].obs["spot_id"].astype("object").fillna("").tolist() == DISC
    assert back["spots"].uns["spots"]["params"]["spot_diameter_um"] == 100.0
    assert list(back["spots"].uns["bitro_eval"]["results"]["metric"])[:2] == ["pcc_gene", "pcc_overall"]
    np.testing.assert_allclose(back["spots"].var["bitro_pcc_raw"], 1.0, rtol=1e-6)
