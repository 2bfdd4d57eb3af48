"""bt.pp.standardize_features: per-slide z-scores of the cell features."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import bitro as bt


def _cells(x: np.ndarray) -> ad.AnnData:
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"cell_{i}" for i in range(len(x))]))
    adata.obsm["X_bitro"] = np.asarray(x, dtype=np.float32)
    return adata


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6] + [0, 10, -5, 3, 100, 1]
    x[:, 3] = 7.0  # a constant feature
    return x


def test_a_constant_offset_and_scale_give_identical_standardised_features(features):
    clean, stained = _cells(features), _cells(features * 1.7 + 25.0)  # a stain-like shift of every feature
    bt.pp.standardize_features([clean, stained])
    a, b = clean.obsm["X_bitro_slide"], stained.obsm["X_bitro_slide"]
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert not np.allclose(clean.obsm["X_bitro"], stained.obsm["X_bitro"])


def test_each_slide_is_standardised_on_its_own_cells(features):
    other = features[:100] * 3 - 40
    slides = [_cells(features), _cells(other)]
    bt.pp.standardize_features(slides)
    for adata, x in zip(slides, (features, other), strict=True):
        z = adata.obsm["X_bitro_slide"]
        assert z.dtype == np.float32 and z.shape == x.shape
        varying = [0, 1, 2, 4, 5]
        np.testing.assert_allclose(z[:, varying].mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(z[:, varying].std(axis=0), 1, atol=1e-5)
        np.testing.assert_allclose(
            z[:, varying], (x[:, varying] - x[:, varying].mean(0)) / x[:, varying].std(0), atol=1e-5
        )
        assert (z[:, 3] == 0).all()
        assert adata.uns["X_bitro_slide"]["n_constant_features"] == 1
        assert adata.uns["X_bitro_slide"]["params"] == {"use_rep": "X_bitro", "table_key": "cells"}
    # the input features are untouched
    np.testing.assert_array_equal(slides[0].obsm["X_bitro"], features.astype(np.float32))


def test_inplace_false_returns_what_would_be_written_and_writes_nothing(features):
    adata = _cells(features)
    z = bt.pp.standardize_features(adata, inplace=False)
    assert (
        isinstance(z, np.ndarray) and "X_bitro_slide" not in adata.obsm and "X_bitro_slide" not in adata.uns
    )
    assert bt.pp.standardize_features(adata) is None
    np.testing.assert_array_equal(adata.obsm["X_bitro_slide"], z)
    both = bt.pp.standardize_features([adata, _cells(features)], inplace=False)
    assert isinstance(both, list) and len(both) == 2


def test_spatialdata_input_and_custom_keys(features):
    cells = _cells(features)
    cells.obsm["X_other"] = cells.obsm.pop("X_bitro")
    slide = sd.SpatialData(tables={"nuclei": cells})
    bt.pp.standardize_features(slide, use_rep="X_other", key_added="X_other_z", table_key="nuclei")
    assert slide["nuclei"].obsm["X_other_z"].shape == features.shape


def test_existing_keys_and_bad_input_are_refused(features):
    adata = _cells(features)
    bt.pp.standardize_features(adata)
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.pp.standardize_features(adata)
    bt.pp.standardize_features(adata, overwrite=True)
    with pytest.raises(ValueError, match="never overwritten"):
        bt.pp.standardize_features(adata, key_added="X_bitro")
    with pytest.raises(KeyError, match="embed_cells"):
        bt.pp.standardize_features(adata, use_rep="X_missing")
    with pytest.raises(KeyError, match="available tables"):
        bt.pp.standardize_features(sd.SpatialData(tables={"spots": adata}))
    bad = _cells(features)
    bad.obsm["X_bitro"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        bt.pp.standardize_features(bad)
    assert "X_bitro_slide" not in bad.obsm
