"""The image the preprocessing steps read by default (image_key=None): he_normalized when it exists."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import bitro as bt


@pytest.fixture(scope="module")
def slide():
    return bt.datasets.synthetic_tissue(size=500, technology="visium", seed=0)


def _copy(sdata):
    from bitro.pp._pipeline import _fresh

    return _fresh(sdata)


def test_normalised_image_is_found_by_every_step(slide, caplog):
    sdata = _copy(slide)
    bt.pp.normalize_stains(sdata, seed=0)
    with caplog.at_level(logging.INFO, logger="bitro"):
        bt.pp.detect_tissue(sdata)
        bt.pp.segment_cells(sdata, tile_size=256)
        bt.pp.embed_cells(sdata, encoder="morphology", tile_size=256)
    assert sdata.attrs["bitro_stain"]["he_normalized"]["method"] == "macenko"
    assert sdata.attrs["bitro_tissue"]["tissue"]["image_key"] == "he_normalized"
    cells = sdata.tables["cells"]
    assert cells.uns["cells"]["image_key"] == "he_normalized" and cells.n_obs > 50
    assert cells.uns["X_bitro"]["params"]["image_key"] == "he_normalized"
    for step in ("detect_tissue", "segment_cells", "embed_cells"):
        assert f"{step}: reading image 'he_normalized'" in caplog.text
    # the same chain naming the image gives the same cells and features
    named = _copy(slide)
    bt.pp.normalize_stains(named, seed=0)
    bt.pp.detect_tissue(named, image_key="he_normalized")
    bt.pp.segment_cells(named, image_key="he_normalized", tile_size=256)
    bt.pp.embed_cells(named, image_key="he_normalized", encoder="morphology", tile_size=256)
    np.testing.assert_array_equal(named.tables["cells"].obsm["spatial"], cells.obsm["spatial"])
    np.testing.assert_array_equal(named.tables["cells"].obsm["X_bitro"], cells.obsm["X_bitro"])


def test_original_image_without_normalisation_or_when_named(slide):
    sdata = _copy(slide)
    bt.pp.segment_cells(sdata, tile_size=256)
    assert sdata.tables["cells"].uns["cells"]["image_key"] == "he"
    bt.pp.normalize_stains(sdata, seed=0)
    feats = bt.pp.embed_cells(sdata, image_key="he", encoder="morphology", tile_size=256, inplace=False)
    assert "X_bitro" not in sdata.tables["cells"].obsm  # inplace=False writes nothing
    bt.pp.embed_cells(sdata, encoder="morphology", tile_size=256)  # reads he_normalized
    assert sdata.tables["cells"].uns["X_bitro"]["params"]["image_key"] == "he_normalized"
    assert feats.shape == sdata.tables["cells"].obsm["X_bitro"].shape and feats.dtype == np.float32
    assert not np.array_equal(feats, sdata.tables["cells"].obsm["X_bitro"])  # the stain columns differ
