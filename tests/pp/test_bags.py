from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from scipy import sparse

import bitro as bt
from bitro.io._build import circles_element, polygons_element, set_scale, table_element

MPP = 0.5  # µm per px: a 100 µm spot has a radius of 100 px


def _cells_table(xy: np.ndarray, names=None) -> tuple[ad.AnnData, object]:
    import shapely

    names = names or [f"cell{i}" for i in range(len(xy))]
    adata = ad.AnnData(X=np.zeros((len(xy), 0), np.float32), obs=pd.DataFrame(index=names))
    adata.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    shapes = polygons_element([shapely.Point(p).buffer(3) for p in xy], names)
    return table_element(adata, region="cells_shapes"), shapes


def _slide(cell_xy, spot_xy=None, *, mpp=MPP, diameter=100.0, labels=None) -> sd.SpatialData:
    cells, cell_shapes = _cells_table(np.asarray(cell_xy, float))
    shapes, tables = {"cells_shapes": cell_shapes}, {"cells": cells}
    if spot_xy is not None:
        spot_xy = np.asarray(spot_xy, float)
        ids = [f"s{i}" for i in range(len(spot_xy))]
        spots = ad.AnnData(X=np.zeros((len(ids), 3), np.float32), obs=pd.DataFrame(index=ids))
        spots.layers["counts"] = spots.X.copy()
        spots.obsm["spatial"] = spot_xy
        shapes["spots_shapes"] = circles_element(spot_xy, diameter / 2 / mpp, ids)
        tables["spots"] = table_element(spots, region="spots_shapes")
    sdata = sd.SpatialData(shapes=shapes, tables=tables, labels=labels or {})
    set_scale(sdata, mpp=mpp, spot_diameter_um=diameter, spot_spacing_um=200.0)
    return sdata


SPOTS = [(200, 200), (600, 200), (200, 600)]


def test_assign_cells_known_positions(caplog):
    cells = [
        (210, 200),  # s0 (10 px from centre)
        (200, 101),  # s0 (99 px: just inside)
        (200, 350),  # outside (150 px from s0)
        (650, 230),  # s1
        (400, 400),  # outside every disc
    ]
    sdata = _slide(cells, SPOTS)
    with caplog.at_level("WARNING", logger="bitro"):
        bt.pp.assign_cells(sdata)
    sid = sdata["cells"].obs["spot_id"]
    assert isinstance(sid.dtype, pd.CategoricalDtype)
    assert list(sid.cat.categories) == ["s0", "s1", "s2"]
    assert sid.astype(object).where(sid.notna(), None).tolist() == ["s0", "s0", None, "s1", None]
    assert sdata["spots"].obs["n_cells"].tolist() == [2, 1, 0]
    assert "1 of 3 spots contain no cell" in caplog.text  # empty spot kept and flagged
    prov = sdata["cells"].uns["spot_id"]
    assert prov["n_unassigned"] == 2 and prov["params"]["radius_px"] == pytest.approx(100.0)


def test_assign_cells_overlap_nearest_and_radius_override():
    # discs of radius 150 µm = 300 px overlap; a cell between two centres goes to the nearer
    sdata = _slide([(390, 200), (410, 200), (200, 380)], SPOTS)
    bt.pp.assign_cells(sdata, radius_um=150.0)
    assert sdata["cells"].obs["spot_id"].astype(str).tolist() == ["s0", "s1", "s0"]
    # with a 10 µm radius (20 px) nobody is inside: mismatch error names the coordinates problem
    sdata2 = _slide([(390, 200), (410, 200)], SPOTS)
    with pytest.raises(ValueError, match="do not match"):
        bt.pp.assign_cells(sdata2, radius_um=10.0)


def test_assign_cells_mismatched_frames():
    rng = np.random.default_rng(0)
    cells = rng.uniform(0, 1000, size=(200, 2))
    spots = np.array(SPOTS) * 20.0  # spots in another pixel frame
    with pytest.raises(ValueError, match=r"another pixel frame"):
        bt.pp.assign_cells(_slide(cells, spots))


def test_assign_cells_errors_and_overwrite():
    sdata = _slide([(200, 200)])
    with pytest.raises(KeyError, match=r"table 'spots' not found.*make_patches"):
        bt.pp.assign_cells(sdata)
    sdata = _slide([(200, 200)], SPOTS)
    with pytest.raises(KeyError, match="table 'nope' not found"):
        bt.pp.assign_cells(sdata, cells_key="nope")
    bt.pp.assign_cells(sdata)
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.pp.assign_cells(sdata)
    bt.pp.assign_cells(sdata, overwrite=True, radius_um=1.0)
    assert sdata["cells"].obs["spot_id"].astype(str).tolist() == ["s0"]


def _tissue_labels(mask: np.ndarray, factor: float):
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale

    return Labels2DModel.parse(
        mask.astype(np.uint8),
        dims=("y", "x"),
        transformations={"global": Scale([factor, factor], axes=("y", "x"))},
    )


def test_make_patches_with_tissue_mask():
    # mask at 1/20 resolution: tissue covers level-0 x in [0, 800), y in [0, 400) plus a half-filled square
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[0:20, 0:40] = 1
    mask[20:30, 0:5] = (
        1  # 100 × 200 px sliver below the first patch row: fraction 0.5 of patch (row 2, col 0)
    )
    cells = [(10, 10), (199.9, 199.9), (200, 200), (790, 390), (50, 450), (1100, 700)]
    sdata = _slide(cells, labels={"tissue": _tissue_labels(mask, 20.0)})
    bt.pp.make_patches(sdata)  # 100 µm = 200 px patches
    table = sdata["patches"]
    shapes = sdata["patches_shapes"]
    assert table.uns["patches"]["params"]["size_px"] == pytest.approx(200.0)
    # 4 × 2 full patches + the half-tissue patch at row 2, col 0 (fraction 0.5 >= 0.5)
    assert table.n_obs == 9
    full = table.obs[table.obs["row"] < 2]
    assert np.allclose(full["tissue_fraction"], 1.0)
    assert table.obs.loc["patch_2_0", "tissue_fraction"] == pytest.approx(0.5)
    np.testing.assert_allclose(table.obsm["spatial"][table.obs_names.get_loc("patch_0_0")], [100, 100])
    assert shapes.geometry.iloc[0].area == pytest.approx(200.0 * 200.0)
    assert list(shapes.index) == list(table.obs_names)
    pid = sdata["cells"].obs["patch_id"].astype(object).where(sdata["cells"].obs["patch_id"].notna(), None)
    assert pid.tolist() == ["patch_0_0", "patch_0_0", "patch_1_1", "patch_1_3", "patch_2_0", None]
    assert table.obs.loc["patch_0_0", "n_cells"] == 2
    # stricter threshold drops the half patch
    bt.pp.make_patches(sdata, min_tissue_fraction=0.6, overwrite=True)
    assert sdata["patches"].n_obs == 8
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.pp.make_patches(sdata)


def test_make_patches_without_mask_uses_cells(caplog):
    cells = [(0, 0), (150, 10), (450, 10), (30, 250)]
    sdata = _slide(cells, diameter=50.0)  # 50 µm → 100 px patches
    bt.pp.make_patches(sdata, size_um=None)
    obs = sdata["patches"].obs
    assert sorted(obs_names := list(obs.index)) == sorted(
        ["patch_0_0", "patch_0_1", "patch_0_4", "patch_2_0"]
    )
    assert len(obs_names) == 4 and obs["tissue_fraction"].isna().all()
    assert sdata["cells"].obs["patch_id"].notna().all()  # each cell in exactly one patch
    assert obs["n_cells"].sum() == 4


def test_make_patches_errors():
    sdata = sd.SpatialData()
    set_scale(sdata, mpp=0.5)
    with pytest.raises(KeyError, match="detect_tissue"):
        bt.pp.make_patches(sdata)
    sdata = _slide([(10, 10)])
    with pytest.raises(ValueError, match="size_um"):
        bt.pp.make_patches(sdata, size_um=-1)


# ------------------------------------------------------------------------------------------- graph
def _graph_slide():
    rng = np.random.default_rng(0)
    xy, bags = [], []
    # bag A: 3 cells, bag B: 1 cell, bag C: 40 cells, plus 2 cells without bag
    xy += [(0, 0), (3, 4), (6, 0)]
    bags += ["A"] * 3
    xy += [(100, 100)]
    bags += ["B"]
    xy += list(rng.uniform(200, 260, size=(40, 2)))
    bags += ["C"] * 40
    xy += [(1, 1), (230, 230)]
    bags += [None, None]
    sdata = _slide(np.array(xy, float))
    sdata["cells"].obs["spot_id"] = pd.Categorical(bags, categories=["A", "B", "C", "D"])
    return sdata, np.array(xy, float), np.array(bags, dtype=object)


def test_cell_graph_known_structure():
    sdata, xy, bags = _graph_slide()
    bt.pp.cell_graph(sdata, k=8)
    cells = sdata["cells"]
    conn = cells.obsp["spatial_connectivities"]
    dist = cells.obsp["spatial_distances"]
    assert sparse.isspmatrix_csr(conn) and conn.dtype == np.float32 and dist.dtype == np.float32
    assert (conn != conn.T).nnz == 0 and (dist != dist.T).nnz == 0  # symmetric
    assert conn.diagonal().sum() == 0  # no self-edges
    assert set(np.unique(conn.data)) == {1.0}
    # bag of 3 → complete graph (triangle)
    assert conn[:3, :3].toarray().tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    np.testing.assert_allclose(dist[0, 1], 5.0 * MPP)  # 3-4-5 triangle, in µm
    # bag of one cell and cells without bag: no edges
    deg = np.asarray(conn.sum(axis=1)).ravel()
    assert deg[3] == 0 and deg[-2] == 0 and deg[-1] == 0
    # no edge crosses bags
    r, c = conn.nonzero()
    assert (bags[r] == bags[c]).all()
    # degree ≥ min(k, bag size − 1), and each cell's 8 nearest bag-mates are neighbours
    c_idx = np.arange(4, 44)
    assert (deg[c_idx] >= 8).all()
    from scipy.spatial.distance import cdist

    d = cdist(xy[c_idx], xy[c_idx])
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :8]
    sub = conn[c_idx][:, c_idx].toarray()
    assert all(sub[i, nn[i]].all() for i in range(40))
    # distances are Euclidean × mpp on every edge
    r, c = dist.nonzero()
    np.testing.assert_allclose(dist[r, c].A1, np.linalg.norm(xy[r] - xy[c], axis=1) * MPP, rtol=1e-5)
    assert (conn != 0).sum() == (dist != 0).sum()
    nb = cells.uns["spatial_neighbors"]
    assert nb["connectivities_key"] == "spatial_connectivities" and nb["distances_key"] == "spatial_distances"
    assert nb["params"]["n_neighbors"] == 8 and nb["params"]["bag_key"] == "spot_id"


def test_cell_graph_many_bags_matches_per_bag_trees():
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(1)
    n_bags, per = 300, rng.integers(1, 30, size=300)
    centres = rng.uniform(0, 5000, size=(n_bags, 2))
    xy = np.concatenate([c + rng.normal(scale=20, size=(m, 2)) for c, m in zip(centres, per)])
    bag = np.repeat(np.arange(n_bags), per)
    perm = rng.permutation(len(xy))  # cells not grouped by bag
    xy, bag = xy[perm], bag[perm]
    sdata = _slide(xy)
    sdata["cells"].obs["patch_id"] = pd.Categorical(bag.astype(str))
    bt.pp.cell_graph(sdata, bag_key="patch_id", k=5)
    conn = sdata["cells"].obsp["spatial_connectivities"].tocsr()
    expected = sparse.lil_matrix(conn.shape)
    for b in range(n_bags):
        idx = np.flatnonzero(bag == b)
        if len(idx) < 2:
            continue
        kk = min(5, len(idx) - 1)
        _, nb = cKDTree(xy[idx]).query(xy[idx], k=kk + 1)
        for i, row in zip(idx, nb[:, 1:]):
            expected[i, idx[row]] = 1
            expected[idx[row], i] = 1
    assert (conn != expected.tocsr()).nnz == 0


def test_cell_graph_squidpy_compatible():
    sq = pytest.importorskip("squidpy")
    sdata, _, _ = _graph_slide()
    cells = sdata["cells"]
    cells.obs["phenotype"] = pd.Categorical(np.where(np.arange(cells.n_obs) % 2 == 0, "a", "b"))
    bt.pp.cell_graph(sdata)
    mat = sq.gr.interaction_matrix(cells, cluster_key="phenotype", copy=True)
    assert mat.sum() == cells.obsp["spatial_connectivities"].sum()
    sq.gr.centrality_scores(cells, cluster_key="phenotype")
    assert "phenotype_centrality_scores" in cells.uns


def test_cell_graph_errors_and_overwrite():
    sdata, _, _ = _graph_slide()
    with pytest.raises(KeyError, match="assign_cells"):
        bt.pp.cell_graph(sdata, bag_key="patch_id")
    with pytest.raises(ValueError, match="positive integer"):
        bt.pp.cell_graph(sdata, k=0)
    bt.pp.cell_graph(sdata)
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.pp.cell_graph(sdata)
    bt.pp.cell_graph(sdata, k=1, overwrite=True)
    assert sdata["cells"].uns["spatial_neighbors"]["params"]["n_neighbors"] == 1
    bt.pp.cell_graph(sdata, k=2, key_added="bag")  # another prefix coexists
    assert "bag_connectivities" in sdata["cells"].obsp


def test_outputs_round_trip_through_zarr(tmp_path):
    sdata, _, _ = _graph_slide()
    sdata["cells"].obs["spot_id"] = sdata["cells"].obs["spot_id"].cat.remove_unused_categories()
    bt.pp.cell_graph(sdata)
    bt.pp.make_patches(sdata, size_um=20.0)
    sdata.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    assert (
        back["cells"].obsp["spatial_connectivities"] != sdata["cells"].obsp["spatial_connectivities"]
    ).nnz == 0
    assert back["cells"].uns["spatial_neighbors"]["params"]["distance_unit"] == "um"
    assert list(back["patches"].obs_names) == list(back["patches_shapes"].index)
    assert back["cells"].obs["patch_id"].notna().sum() == sdata["cells"].obs["patch_id"].notna().sum()
