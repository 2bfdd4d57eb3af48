"""``as_rgb``: the one RGB validator of image files and of tissue detection."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bitro.io._image import as_rgb


def test_as_rgb_conversions():
    unit = np.array([[[0.0, 0.5, 1.0]]])
    assert as_rgb(unit).tolist() == [[[0, 128, 255]]]
    assert as_rgb(np.array([[[12.7, 300.0, -4.0]]])).tolist() == [[[13, 255, 0]]]  # rounded and clipped
    assert as_rgb(np.array([[[0, 1, 1]]], np.int64)).tolist() == [[[0, 1, 1]]]  # integers are not rescaled
    assert as_rgb(np.array([[[np.nan, 0.2, 0.4]]])).tolist() == [[[0, 51, 102]]]
    assert as_rgb([[[1, 2, 3]]]).dtype == np.uint8  # array-likes are accepted
    rgb = np.zeros((2, 2, 3), np.uint8)
    assert as_rgb(rgb) is rgb  # no copy when already uint8 RGB


def test_as_rgb_drops_alpha_with_a_warning(caplog):
    rgba = np.full((2, 2, 4), 7, np.uint8)
    with caplog.at_level(logging.WARNING, logger="bitro"):
        out = as_rgb(rgba, source="Tile 'x.png'")
    assert out.shape == (2, 2, 3) and (out == 7).all()
    assert "Tile 'x.png' is RGBA" in caplog.text


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((4, 4)), r"Input is grey-scale \(shape \(4, 4\)\).*Convert it to RGB"),
        (np.zeros((4, 4, 1)), "Input is grey-scale"),
        (np.zeros((3, 5, 5)), r"Input has shape \(3, 5, 5\); expected \(height, width, 3\).*np.moveaxis"),
        (np.zeros((4, 4, 4, 3)), "expected \\(height, width, 3\\)"),
        (np.zeros((0, 4, 3)), r"Input is empty .*at least one pixel"),
    ],
)
def test_as_rgb_errors(array, match):
    with pytest.raises(ValueError, match=match):
        as_rgb(array, source="Input")
