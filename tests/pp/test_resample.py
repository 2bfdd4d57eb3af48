"""The block-wise image resampling shared by bt.datasets.rescale and bt.pp.augment_slide."""

from __future__ import annotations

import numpy as np
import pytest

from bitro.pp._resample import resample_image


@pytest.mark.parametrize("factor", [0.8, 1.2, 0.5])
def test_resample_block_by_block_equals_the_whole_image(factor):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(3, 150, 170), dtype=np.uint8)
    whole = np.asarray(resample_image(image, factor, chunk=4096).compute())
    tiled = np.asarray(resample_image(image, factor, chunk=32).compute())
    np.testing.assert_array_equal(tiled, whole)
    # a flat image stays flat (no edge darkening)
    flat = np.full((3, 64, 64), 200, dtype=np.uint8)
    assert (np.asarray(resample_image(flat, factor, chunk=16).compute()) == 200).all()
