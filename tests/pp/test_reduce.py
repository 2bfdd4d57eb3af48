from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import bitro as bt
from bitro.io._build import polygons_element, table_element
from bitro.pp._reduce import FeatureProjection, PhenotypeModel


def _slide(rng, n=300, d=40, centres=None, shift=0.0) -> sd.SpatialData:
    """Cells whose embedding is a mixture of well separated Gaussian blobs in a low-dimensional subspace."""
    import shapely

    if centres is None:  # blob centres spread over all dimensions (so features are correlated)
        centres = np.random.default_rng(42).normal(size=(3, d)) * 5.0
    labels = rng.integers(0, len(centres), size=n)
    x = centres[labels] + rng.normal(size=(n, d)) + shift
    xy = rng.uniform(0, 1000, size=(n, 2))
    names = [f"c{i}" for i in range(n)]
    adata = ad.AnnData(X=np.zeros((n, 0), np.float32), obs=pd.DataFrame({"truth": labels}, index=names))
    adata.obsm["spatial"] = xy
    adata.obsm["X_bitro"] = x.astype(np.float32)
    shapes = polygons_element([shapely.Point(p).buffer(4) for p in xy], names)
    return sd.SpatialData(
        shapes={"cells_shapes": shapes}, tables={"cells": table_element(adata, region="cells_shapes")}
    )


def test_pca_shared_fit_and_reuse(rng):
    a, b = _slide(rng), _slide(rng, n=200)
    state = bt.pp.reduce_features([a, b], n_components=5, seed=0)
    assert isinstance(state, FeatureProjection)
    za = a["cells"].obsm["X_bitro_pca"]
    assert za.shape == (300, 5) and za.dtype == np.float32
    # the first components carry the 3 blob directions: >> noise variance
    assert state.explained_variance_ratio[:2].sum() > 0.5
    # known answer: transform equals sklearn-free standardise + projection
    x = a["cells"].obsm["X_bitro"].astype(np.float64)
    expected = ((x - state.mean) / state.scale) @ state.components.T
    np.testing.assert_allclose(za, expected, rtol=1e-4, atol=1e-4)
    # re-applying the fitted state to a new slide with the same data gives the same projection
    c = sd.SpatialData(shapes={"cells_shapes": a["cells_shapes"]}, tables={"cells": a["cells"].copy()})
    del c["cells"].obsm["X_bitro_pca"]
    out = bt.pp.reduce_features(c, pca=state)
    assert out is state
    np.testing.assert_array_equal(c["cells"].obsm["X_bitro_pca"], za)
    assert c["cells"].uns["X_bitro_pca"]["params"]["fitted_here"] is False


def test_pca_roundtrip_arrays_meta_and_dict(rng):
    a = _slide(rng)
    state = bt.pp.reduce_features(a, n_components=4, seed=1)
    back = FeatureProjection.from_arrays(state.arrays(), json.loads(json.dumps(state.meta())))
    x = a["cells"].obsm["X_bitro"]
    np.testing.assert_allclose(back.transform(x), state.transform(x), atol=1e-3)
    back2 = FeatureProjection.from_dict(json.loads(json.dumps(state.to_dict())))
    assert back2.n_components == 4 and back2.n_features == 40 and back2.use_rep == "X_bitro"
    assert all(v.dtype == np.float32 for v in state.arrays().values())


def test_pca_caps_components_and_per_sample(rng, caplog):
    a, b = _slide(rng, n=20, d=10), _slide(rng, n=30, d=10, shift=5.0)
    with caplog.at_level("WARNING", logger="bitro"):
        states = bt.pp.reduce_features([a, b], n_components=128, per_sample=True)
    assert [s.n_components for s in states] == [10, 10]
    assert "using 10 components" in caplog.text
    assert a["cells"].obsm["X_bitro_pca"].shape == (20, 10)
    # separate fits: each slide is centred on its own mean
    np.testing.assert_allclose(states[1].mean, b["cells"].obsm["X_bitro"].mean(0), atol=1e-4)
    assert not np.allclose(states[0].mean, states[1].mean)


def test_pca_sampled_fit_is_used(rng):
    a = _slide(rng, n=500)
    state = bt.pp.reduce_features(a, n_components=3, max_cells_fit=100, seed=0)
    assert state.n_cells_fit == 100
    assert a["cells"].obsm["X_bitro_pca"].shape == (500, 3)  # all cells transformed


def test_pca_errors(rng):
    a = _slide(rng)
    with pytest.raises(KeyError, match=r"bt.pp.embed_cells"):
        bt.pp.reduce_features(a, use_rep="X_other")
    del a["cells"].obsm["X_bitro"]
    with pytest.raises(KeyError, match=r"bt.pp.embed_cells"):
        bt.pp.reduce_features(a)
    b = _slide(rng)
    bt.pp.reduce_features(b, n_components=3)
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.pp.reduce_features(b, n_components=3)
    bt.pp.reduce_features(b, n_components=2, overwrite=True)
    assert b["cells"].obsm["X_bitro_pca"].shape[1] == 2
    with pytest.raises(KeyError, match="table 'cells' not found"):
        bt.pp.reduce_features(sd.SpatialData())
    small = _slide(rng, d=7)
    with pytest.raises(ValueError, match="40-dimensional"):
        state = bt.pp.reduce_features(_slide(rng), n_components=3)
        bt.pp.reduce_features(small, pca=state)


def test_phenotypes_recover_blobs_and_reapply(rng):
    a, b = _slide(rng), _slide(rng, n=150)
    pca = bt.pp.reduce_features([a], n_components=5, seed=0)
    model = bt.pp.cluster_phenotypes(a, n_clusters=3, seed=0)
    assert isinstance(model, PhenotypeModel)
    lab = a["cells"].obs["phenotype"]
    assert isinstance(lab.dtype, pd.CategoricalDtype) and list(lab.cat.categories) == ["0", "1", "2"]
    # known answer: clusters are the 3 blobs (adjusted Rand index 1)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(a["cells"].obs["truth"], lab) == pytest.approx(1.0)
    # reapplying the stored centroids to the same cells reproduces the labels
    c = sd.SpatialData(shapes={"cells_shapes": a["cells_shapes"]}, tables={"cells": a["cells"].copy()})
    del c["cells"].obs["phenotype"]
    bt.pp.cluster_phenotypes(c, kmeans=model)
    assert (c["cells"].obs["phenotype"] == lab).all()
    # a new slide projected with the same PCA gets labels that follow its true blobs
    bt.pp.reduce_features(b, pca=pca)
    bt.pp.cluster_phenotypes(b, kmeans=model)
    truth_to_label = pd.crosstab(a["cells"].obs["truth"], lab).idxmax(axis=1)
    expected = truth_to_label[b["cells"].obs["truth"]].to_numpy()
    assert (b["cells"].obs["phenotype"].astype(str).to_numpy() == expected).all()
    # serialisation round trip
    back = PhenotypeModel.from_arrays(model.arrays(), json.loads(json.dumps(model.meta())))
    np.testing.assert_array_equal(back.predict(a["cells"].obsm["X_bitro_pca"]), lab.cat.codes.to_numpy())
    assert PhenotypeModel.from_dict(json.loads(json.dumps(model.to_dict()))).n_clusters == 3
    assert a["cells"].uns["phenotype"]["counts"].sum() == 300


def test_phenotypes_errors(rng):
    a = _slide(rng, n=5)
    with pytest.raises(KeyError, match=r"reduce_features"):
        bt.pp.cluster_phenotypes(a)
    with pytest.raises(ValueError, match="n_clusters=8"):
        bt.pp.cluster_phenotypes(a, use_rep="X_bitro")
    bt.pp.cluster_phenotypes(a, use_rep="X_bitro", n_clusters=2)
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.pp.cluster_phenotypes(a, use_rep="X_bitro", n_clusters=2)


def test_a_nearly_constant_training_feature_cannot_blow_up_a_new_slide(rng):
    # feature 0 fires in 2 of 2,000 training cells (std ~ 1e-3); a new cell with an ordinary value
    # there must not land thousands of standard deviations away from every training cell
    train = rng.normal(0.0, 1.0, (2000, 16))
    train[:, 0] = 0.0
    train[:2, 0] = 0.05
    proj = bt.pp.FeatureProjection.fit([train], n_components=8, seed=0)
    assert proj.scale[0] >= 0.1 * np.median(proj.scale[1:]) * 0.99  # floored at a share of the typical scale
    new = rng.normal(0.0, 1.0, (50, 16))
    new[:, 0] = 3.0  # an ordinary value of an ordinary feature on this slide
    z_train, z_new = proj.transform(train), proj.transform(new)
    assert np.abs(z_new).max() < 10 * np.abs(z_train).max()
    # features with ordinary variance are standardised as before
    assert np.allclose(proj.scale[1:], train[:, 1:].std(axis=0), rtol=1e-4)
