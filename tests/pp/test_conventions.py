"""The bt.pp rule for inplace and return values (docs/contributing.md), checked on every public function."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import bitro as bt

#: Functions that write into the data object they are given (they take key_added).
WRITERS = (
    "normalize_stains",
    "detect_tissue",
    "segment_cells",
    "embed_cells",
    "assign_cells",
    "make_patches",
    "cell_graph",
    "reduce_features",
    "cluster_phenotypes",
    "standardize_features",
)


def test_every_writer_follows_the_signature_rule():
    writers = []
    for name in bt.pp.__all__:
        obj = getattr(bt.pp, name)
        if not inspect.isfunction(obj):
            continue
        params = inspect.signature(obj).parameters
        assert "copy" not in params, f"bt.pp.{name} has copy=; the rule is inplace= (docs/contributing.md)"
        if "key_added" not in params:
            continue
        writers.append(name)
        first, *rest = params.values()
        assert first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name  # the data object first
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest), name
        assert params["inplace"].default is True, name
        assert params["overwrite"].default is False, name
        assert "inplace" in (obj.__doc__ or ""), name
    assert sorted(writers) == sorted(WRITERS)


@pytest.fixture(scope="module")
def slide():
    sdata = bt.datasets.synthetic_tissue(size=500, technology="visium", seed=1)
    bt.pp.segment_cells(sdata, tile_size=256)
    bt.pp.embed_cells(sdata, encoder="morphology", tile_size=256)
    return sdata


def _copy(sdata):
    from bitro.pp._pipeline import _fresh

    return _fresh(sdata)


def test_inplace_false_returns_what_would_be_written(slide):
    sdata = _copy(slide)
    cells, spots = sdata.tables["cells"], sdata.tables["spots"]
    before = (set(cells.obs), set(cells.obsm), set(cells.obsp), set(cells.uns), set(spots.obs))
    elements = (set(sdata.tables), set(sdata.shapes), set(sdata.labels))

    spot_id = bt.pp.assign_cells(sdata, inplace=False)
    table, shapes, patch_id = bt.pp.make_patches(sdata, inplace=False)
    projection = bt.pp.reduce_features(sdata, n_components=8, inplace=False)
    assert (set(cells.obs), set(cells.obsm), set(cells.obsp), set(cells.uns), set(spots.obs)) == before
    assert (set(sdata.tables), set(sdata.shapes), set(sdata.labels)) == elements

    bt.pp.assign_cells(sdata)
    assert spot_id.equals(cells.obs["spot_id"]) and spot_id.notna().sum() > 10
    graph = bt.pp.cell_graph(sdata, inplace=False)
    assert "spatial_connectivities" not in cells.obsp
    bt.pp.cell_graph(sdata)
    assert (graph[0] != cells.obsp["spatial_connectivities"]).nnz == 0 and graph[0].nnz > 0
    np.testing.assert_array_equal(graph[1].toarray(), cells.obsp["spatial_distances"].toarray())

    bt.pp.make_patches(sdata)
    assert list(table.obs_names) == list(sdata.tables["patches"].obs_names) and len(shapes) == len(table)
    assert patch_id.equals(cells.obs["patch_id"])

    again = bt.pp.reduce_features(sdata, n_components=8)
    np.testing.assert_allclose(
        projection.transform(cells.obsm["X_bitro"]), cells.obsm["X_bitro_pca"], rtol=1e-5, atol=1e-5
    )
    assert again.n_components == projection.n_components == 8
    model = bt.pp.cluster_phenotypes(sdata, n_clusters=3, inplace=False)
    assert "phenotype" not in cells.obs
    bt.pp.cluster_phenotypes(sdata, n_clusters=3)
    assert list(model.labels(cells.obsm["X_bitro_pca"])) == list(cells.obs["phenotype"])
    # inplace=False never refuses for an existing key: it replaces nothing
    assert bt.pp.assign_cells(sdata, inplace=False).equals(spot_id)
