"""``as_rgb``: the one RGB validator of image files and of tissue detection."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import bitro as bt
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


@pytest.fixture
def bitro_log(caplog):
    logger = logging.getLogger("bitro")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="bitro")
    yield caplog
    logger.removeHandler(caplog.handler)


def _full_range_uint16(rng, shape=(64, 48, 3)):
    img = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    img[0, 0] = 65535  # the full 16-bit range is used
    return img


def test_16_bit_is_scaled_by_the_bit_depth_its_values_use(rng, bitro_log):
    img = _full_range_uint16(rng)
    out = as_rgb(img, source="Slide 's.tif'")
    np.testing.assert_array_equal(out, np.rint(img.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert 100 < out.mean() < 155  # not clipped to white (the old behaviour: mean 255)
    assert "16-bit and scaled to 8 bits" in bitro_log.text and "Slide 's.tif'" in bitro_log.text
    twelve = np.array([[[0, 2048, 4095]]], np.uint16)  # a 12-bit camera image stored in 16 bits
    assert as_rgb(twelve).tolist() == [[[0, 128, 255]]]
    assert as_rgb(np.array([[[0, 200, 255]]], np.uint16)).tolist() == [[[0, 200, 255]]]  # 8-bit values
    with pytest.raises(ValueError, match="more than 16 bits"):
        as_rgb(np.array([[[0, 1, 70_000]]], np.int64))
    with pytest.raises(ValueError, match="pixel type bool"):
        as_rgb(np.ones((2, 2, 3), bool))


def test_float_scale_is_decided_by_the_bulk_of_the_values(rng, bitro_log):
    unit = rng.uniform(0, 1, size=(20, 20, 3))
    unit[0, 0, 0] = 1.02  # one value above 1 (e.g. interpolation overshoot)
    out = as_rgb(unit)
    assert out.mean() > 100  # read on the [0, 1] scale, not as 0-255 (which came out black)
    np.testing.assert_array_equal(out.reshape(-1)[1:], np.rint(unit.reshape(-1)[1:] * 255).astype(np.uint8))
    assert out[0, 0, 0] == 255
    assert "[0, 1] scale" in bitro_log.text and "1 values outside [0, 1] are clipped" in bitro_log.text
    bitro_log.clear()
    wide = rng.uniform(0, 255, size=(20, 20, 3))
    np.testing.assert_array_equal(as_rgb(wide), np.rint(wide).astype(np.uint8))
    assert "clipped" not in bitro_log.text  # nothing outside [0, 255]: no warning


def test_read_wsi_scales_a_16_bit_pyramid_lazily(tmp_path, rng):
    import tifffile

    from bitro.io._build import get_image

    img = _full_range_uint16(rng, (512, 384, 3))
    with tifffile.TiffWriter(tmp_path / "s16.tif") as tw:
        tw.write(img, subifds=1, tile=(256, 256), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        tw.write(img[::2, ::2], subfiletype=1, tile=(256, 256))
    sdata = bt.io.read_wsi(tmp_path / "s16.tif")
    for level, sub in ((0, img), (1, img[::2, ::2])):
        arr = get_image(sdata, "he", level=level)
        assert arr.dtype == np.uint8 and hasattr(arr.data, "dask")
        expected = np.rint(sub.astype(np.float64) * 255 / 65535).astype(np.uint8)
        np.testing.assert_array_equal(arr.values.transpose(1, 2, 0), expected)


def test_read_wsi_reads_plain_images_and_explains_folders(tmp_path, rng):
    from PIL import Image

    img = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "he.png")
    with pytest.raises(ValueError, match=r"plain PNG image.*pass mpp="):
        bt.io.read_wsi(tmp_path / "he.png")
    sdata = bt.io.read_wsi(tmp_path / "he.png", mpp=0.5)
    np.testing.assert_array_equal(np.asarray(sdata.images["he"].data).transpose(1, 2, 0), img)
    assert sdata.attrs["bitro_scale"]["mpp"] == 0.5
    (tmp_path / "slides").mkdir()
    with pytest.raises(ValueError, match=r"is a folder, not a whole-slide image file; pass the slide file"):
        bt.io.read_wsi(tmp_path / "slides")
