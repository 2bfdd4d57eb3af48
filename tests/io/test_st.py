from __future__ import annotations

import gzip
import shutil

import numpy as np
import pandas as pd
import pytest

import bitro as bt
from bitro.io._st import estimate_mpp


def _write_st(tmp_path, rng, *, n=6, genes=("A", "B", "C"), spacing_px=100.0, img_size=900):
    xs, ys = np.meshgrid(np.arange(2, 2 + n), np.arange(3, 3 + n))
    xs, ys = xs.ravel(), ys.ravel()
    spots = pd.DataFrame(
        {
            "x": xs,
            "y": ys,
            "new_x": xs + 0.01,
            "new_y": ys,
            "pixel_x": xs * spacing_px,
            "pixel_y": ys * spacing_px,
            "selected": 1,
        }
    )
    spots.loc[0, "selected"] = 0
    counts = pd.DataFrame(
        rng.poisson(3, size=(len(xs), len(genes))),
        index=[f"{x}x{y}" for x, y in zip(xs, ys)],
        columns=list(genes),
    )
    counts = counts.drop(index=counts.index[-1])  # one selected spot without counts
    spots_path, counts_path = tmp_path / "S_selection.tsv", tmp_path / "S.tsv.gz"
    spots.to_csv(spots_path, sep="\t", index=False)
    counts.to_csv(counts_path, sep="\t")
    img = rng.integers(0, 255, size=(img_size, img_size, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "S.png")
    return counts_path, spots_path, tmp_path / "S.png", counts, spots


def test_read_st_joins_and_scales(tmp_path, rng):
    counts_path, spots_path, img_path, counts, spots = _write_st(tmp_path, rng)
    sdata = bt.io.read_st(counts_path, spots_path, img_path)
    table = sdata["spots"]
    # 36 spots, one not selected, one without counts -> 34
    assert table.n_obs == 34
    assert "2x3" not in table.obs_names  # the unselected spot
    np.testing.assert_array_equal(table.layers["counts"].toarray(), counts.loc[table.obs_names].to_numpy())
    sel = spots.set_index(spots.x.astype(str) + "x" + spots.y.astype(str)).loc[table.obs_names]
    np.testing.assert_allclose(table.obsm["spatial"], sel[["pixel_x", "pixel_y"]].to_numpy())
    # 100 px per 200 µm pitch -> 2 µm/px
    assert sdata.attrs["bitro_scale"]["mpp"] == pytest.approx(2.0, rel=1e-2)
    radius = sdata.shapes["spots_shapes"]["radius"].to_numpy()
    np.testing.assert_allclose(radius, 50.0 / sdata.attrs["bitro_scale"]["mpp"])
    assert table.uns["spatialdata_attrs"]["region"] == "spots_shapes"
    assert list(table.obs["instance_id"]) == list(sdata.shapes["spots_shapes"].index)
    assert sdata.images["he"].shape == (3, 900, 900)


def test_read_st_explicit_mpp_and_files_untouched(tmp_path, rng):
    counts_path, spots_path, img_path, *_ = _write_st(tmp_path, rng)
    before = {p: p.read_bytes() for p in (counts_path, spots_path, img_path)}
    sdata = bt.io.read_st(counts_path, spots_path, img_path, mpp=1.5)
    assert sdata.attrs["bitro_scale"]["mpp"] == 1.5
    assert all(p.read_bytes() == b for p, b in before.items())


def test_estimate_mpp_rotated_grid():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 30, size=(50, 2)).astype(float)
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    px = arr @ rot.T * 250.0 + 40
    assert estimate_mpp(arr, px, spacing_um=200) == pytest.approx(0.8)


def test_read_st_bad_inputs(tmp_path, rng):
    counts_path, spots_path, img_path, counts, spots = _write_st(tmp_path, rng)
    # counts that do not join
    bad = counts.copy()
    bad.index = [f"r{i}" for i in range(len(bad))]
    bad.to_csv(tmp_path / "bad.tsv", sep="\t")
    with pytest.raises(ValueError, match="joins"):
        bt.io.read_st(tmp_path / "bad.tsv", spots_path, img_path)
    # duplicate genes
    dup = counts.copy()
    dup.columns = ["A", "A", "C"]
    dup.to_csv(tmp_path / "dup.tsv", sep="\t")
    with pytest.raises(ValueError, match="duplicate gene"):
        bt.io.read_st(tmp_path / "dup.tsv", spots_path, img_path)
    sdata = bt.io.read_st(tmp_path / "dup.tsv", spots_path, img_path, make_unique=True)
    assert sdata["spots"].var_names.is_unique
    # negative / NaN counts
    neg = counts.copy()
    neg.iloc[0, 0] = -1
    neg.to_csv(tmp_path / "neg.tsv", sep="\t")
    with pytest.raises(ValueError, match="negative"):
        bt.io.read_st(tmp_path / "neg.tsv", spots_path, img_path)
    nan = counts.astype(float)
    nan.iloc[1, 1] = np.nan
    nan.to_csv(tmp_path / "nan.tsv", sep="\t")
    with pytest.raises(ValueError, match="NaN"):
        bt.io.read_st(tmp_path / "nan.tsv", spots_path, img_path)
    # spots outside the image
    from PIL import Image

    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="outside the image"):
        bt.io.read_st(counts_path, spots_path, tmp_path / "small.png")
    # corrupt / truncated image
    data = img_path.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt"):
        bt.io.read_st(counts_path, spots_path, tmp_path / "trunc.png")
    # grey-scale image
    Image.fromarray(np.zeros((900, 900), np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="grey-scale"):
        bt.io.read_st(counts_path, spots_path, tmp_path / "grey.png")
    # mpp cannot be estimated from fewer than 3 spots
    spots.iloc[:2].to_csv(tmp_path / "two.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="mpp"):
        bt.io.read_st(counts_path, tmp_path / "two.tsv", img_path)


def test_read_st_gzip_corrupt(tmp_path, rng):
    counts_path, spots_path, img_path, *_ = _write_st(tmp_path, rng)
    raw = gzip.compress(counts_path.read_bytes())
    (tmp_path / "broken.tsv.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        bt.io.read_st(tmp_path / "broken.tsv.gz", spots_path, img_path)
    shutil.rmtree(tmp_path / "nonexistent", ignore_errors=True)
    with pytest.raises(FileNotFoundError):
        bt.io.read_st(tmp_path / "nonexistent.tsv", spots_path, img_path)


@pytest.mark.realdata
@pytest.mark.parametrize("section", ["C2", "C3", "C4", "C5", "C6"])
def test_her2st_sections(section, data_dir):
    sdata = bt.datasets.her2st(section, data_dir=data_dir)
    table = sdata["spots"]
    counts = pd.read_csv(data_dir / "her2st" / "counts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    sel = pd.read_csv(data_dir / "her2st" / "spots" / f"{section}_selection.tsv", sep="\t")
    sel = sel[sel.selected == 1]
    expected = set(sel.x.astype(str) + "x" + sel.y.astype(str)) & set(counts.index)
    assert set(table.obs_names) == expected
    if section == "C2":
        assert table.n_obs == 187
    np.testing.assert_array_equal(
        table.layers["counts"][:5].toarray(), counts.loc[table.obs_names[:5], table.var_names].to_numpy()
    )
    _, h, w = sdata.images["he"].shape
    xy = table.obsm["spatial"]
    assert ((xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)).all()
    assert sdata.attrs["bitro_scale"]["mpp"] == pytest.approx(0.69, abs=0.015)
    # a 100 µm spot is about 145 px across at this scale
    assert 2 * sdata.shapes["spots_shapes"]["radius"].iloc[0] == pytest.approx(145, rel=0.05)


def test_kit_missing_dir_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BITRO_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="BITRO_DATA_DIR"):
        bt.datasets.her2st("C2")


@pytest.fixture
def bitro_log(caplog):
    import logging

    logger = logging.getLogger("bitro")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="bitro")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_read_st_scales_a_16_bit_tiff(tmp_path, rng):
    import tifffile

    counts_path, spots_path, *_ = _write_st(tmp_path, rng)
    img = rng.integers(0, 65536, size=(900, 900, 3), dtype=np.uint16)
    img[0, 0] = 65535
    tifffile.imwrite(tmp_path / "he16.tif", img)
    sdata = bt.io.read_st(counts_path, spots_path, tmp_path / "he16.tif")
    he = np.asarray(sdata.images["he"].data).transpose(1, 2, 0)
    assert he.dtype == np.uint8 and 100 < he.mean() < 155  # was clipped to white (mean 255)
    np.testing.assert_array_equal(he, np.rint(img.astype(np.float64) * 255 / 65535).astype(np.uint8))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="is a folder; pass the path of the image file"):
        bt.io.read_st(counts_path, spots_path, tmp_path / "folder")


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.inf, r"1 infinite counts \(e.g. inf for spot '2x3', gene 'B'\)"),
        (2.5, r"1 fractional counts \(e.g. 2.5 for spot '2x3', gene 'B'\).*non-negative integers.*np.rint"),
        (-1, "1 negative counts"),
        (np.nan, "1 NaN counts"),
    ],
)
def test_counts_must_be_non_negative_integers(tmp_path, rng, value, match):
    _, spots_path, img_path, counts, _spots = _write_st(tmp_path, rng)
    bad = counts.astype(float)
    bad.loc["2x3", "B"] = value
    bad.to_csv(tmp_path / "bad.tsv", sep="\t")
    with pytest.raises(ValueError, match=match):
        bt.io.read_st(tmp_path / "bad.tsv", spots_path, img_path)
    counts.astype(float).to_csv(tmp_path / "float.tsv", sep="\t")  # whole numbers written as 3.0 are fine
    assert bt.io.read_st(tmp_path / "float.tsv", spots_path, img_path)["spots"].n_obs == 34


def test_a_repeated_spot_row_is_an_error_naming_its_lines(tmp_path, rng):
    counts_path, _, img_path, _, spots = _write_st(tmp_path, rng)
    twice = pd.concat([spots, spots.iloc[[5]].assign(pixel_x=999.0)], ignore_index=True)
    twice.to_csv(tmp_path / "twice.tsv", sep="\t", index=False)
    with pytest.raises(
        ValueError, match=r"1 array positions appear on several rows \('7x3' on lines \[7, 38\]\)"
    ):
        bt.io.read_st(counts_path, tmp_path / "twice.tsv", img_path)
    frac = spots.astype({"x": float})
    frac.loc[4, "x"] = 2.5
    frac.to_csv(tmp_path / "frac.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"not integers .*lines 6"):
        bt.io.read_st(counts_path, tmp_path / "frac.tsv", img_path)


@pytest.mark.parametrize("mpp", [None, 1.5])
def test_nan_spot_coordinates_are_an_error_also_with_mpp(tmp_path, rng, mpp):
    counts_path, _, img_path, _, spots = _write_st(tmp_path, rng)
    spots.loc[3, "pixel_y"] = np.nan  # spot '5x3'
    spots.to_csv(tmp_path / "nan.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"1 of 34 spots have no valid pixel position.*'5x3'"):
        bt.io.read_st(counts_path, tmp_path / "nan.tsv", img_path, mpp=mpp)
    with pytest.raises(ValueError, match=r"'5x3'"):  # also without an image
        bt.io.read_st(counts_path, tmp_path / "nan.tsv", mpp=mpp)
    with pytest.raises(ValueError, match="mpp must be a positive number, got 0"):
        bt.io.read_st(counts_path, tmp_path / "nan.tsv", mpp=0)


def test_spots_that_do_not_join_are_dropped_with_a_warning(tmp_path, rng, bitro_log):
    counts_path, spots_path, img_path, *_ = _write_st(tmp_path, rng)
    sdata = bt.io.read_st(counts_path, spots_path, img_path, sample_id="S")
    assert sdata["spots"].n_obs == 34
    warnings = [r for r in bitro_log.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "S: 1 selected spots without a count row were dropped ('7x8')" in text
    assert "1 count rows without a selected spot were dropped ('2x3')" in text
