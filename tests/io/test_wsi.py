from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

import bitro as bt
from bitro.io._build import get_image, image_levels


def _pyramid(path, rng, *, mpp=0.5):
    img = rng.integers(0, 255, size=(1024, 768, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:
        res = (1e4 / mpp, 1e4 / mpp)
        tw.write(img, subifds=2, tile=(256, 256), resolution=res, resolutionunit="CENTIMETER")
        tw.write(img[::2, ::2], subfiletype=1, tile=(256, 256))
        tw.write(img[::4, ::4], subfiletype=1, tile=(256, 256))
    return img


def test_read_wsi_pyramid_lazy(tmp_path, rng):
    img = _pyramid(tmp_path / "s.tif", rng, mpp=0.25)
    sdata = bt.io.read_wsi(tmp_path / "s.tif")
    assert image_levels(sdata, "he") == [(1024, 768), (512, 384), (256, 192)]
    assert sdata.attrs["bitro_scale"]["mpp"] == pytest.approx(0.25)
    lvl1 = get_image(sdata, "he", level=1)
    assert hasattr(lvl1.data, "dask")  # lazy
    np.testing.assert_array_equal(lvl1.values.transpose(1, 2, 0), img[::2, ::2])


def test_read_wsi_bulk_table(tmp_path, rng):
    _pyramid(tmp_path / "s.tif", rng)
    bulk = pd.Series({"ERBB2": 10.0, "GNAS": 5.0})
    sdata = bt.io.read_wsi(tmp_path / "s.tif", bulk=bulk, sample_id="slide1")
    assert sdata["bulk"].obs_names.tolist() == ["slide1"]
    np.testing.assert_allclose(sdata["bulk"].X, [[10.0, 5.0]])
    with pytest.raises(ValueError, match="missing or non-numeric"):
        bt.io.read_wsi(tmp_path / "s.tif", bulk=pd.Series({"A": np.nan}))
    with pytest.raises(TypeError, match="Series"):
        bt.io.read_wsi(tmp_path / "s.tif", bulk=[1, 2])


def test_read_wsi_mpp_missing(tmp_path, rng):
    tifffile.imwrite(tmp_path / "plain.tif", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="mpp="):
        bt.io.read_wsi(tmp_path / "plain.tif")
    assert bt.io.read_wsi(tmp_path / "plain.tif", mpp=0.5).attrs["bitro_scale"]["mpp"] == 0.5


def test_read_wsi_truncated(tmp_path, rng):
    _pyramid(tmp_path / "s.tif", rng)
    data = (tmp_path / "s.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[:200])
    with pytest.raises(ValueError, match="corrupt"):
        bt.io.read_wsi(tmp_path / "t.tif")


@pytest.mark.realdata
def test_read_wsi_cmu(data_dir):
    sdata = bt.io.read_wsi(data_dir / "wsi" / "cmu-1-small-region.svs")
    assert sdata.attrs["bitro_scale"]["mpp"] == pytest.approx(0.499)
    assert image_levels(sdata, "he")[0] == (2967, 2220)
    tile = get_image(sdata, "he").data[:, 1000:1064, 1000:1064].compute()
    assert tile.dtype == np.uint8 and tile.std() > 5  # real tissue, not blank


@pytest.mark.realdata
def test_read_wsi_broken(data_dir):
    with pytest.raises(ValueError, match=r"broken\.svs.*corrupt"):
        bt.io.read_wsi(data_dir / "wsi" / "broken.svs")
