"""bt.datasets.crop: a window of a slide in its own pixel frame, aligned, with the input untouched."""

from __future__ import annotations

import numpy as np
import pytest

import bitro as bt

MPP = 0.5


@pytest.fixture(scope="module")
def slide():
    return bt.datasets.synthetic_tissue(size=(900, 800), mpp=MPP, seed=3)


def _pixels(sdata, xy):
    """RGB of the ``he`` image at integer pixel positions ``xy`` (x, y)."""
    image = np.asarray(sdata.images["he"].data.compute())
    return image[:, xy[:, 1], xy[:, 0]].T


def test_cells_stay_aligned_with_the_image(slide):
    out = bt.datasets.crop(slide, size_um=200.0, center=(430.0, 470.0))
    x0, y0, x1, y1 = out.attrs["bitro_crop"]["window_px"]
    assert (x0, y0, x1, y1) == (230, 270, 630, 670)
    assert out.images["he"].shape == (3, 400, 400)
    cells = out["cells_truth"]
    assert 0 < cells.n_obs < slide["cells_truth"].n_obs
    local = np.floor(cells.obsm["spatial"]).astype(int)
    original = slide["cells_truth"][cells.obs_names].obsm["spatial"]
    np.testing.assert_allclose(cells.obsm["spatial"], original - [x0, y0])
    global_px = np.floor(original).astype(int)
    np.testing.assert_array_equal(_pixels(out, local), _pixels(slide, global_px))
    # the nucleus labels and the polygons moved with the image
    labels_in = np.asarray(out.labels["nuclei_truth"].data.compute())[local[:, 1], local[:, 0]]
    labels_full = np.asarray(slide.labels["nuclei_truth"].data.compute())[global_px[:, 1], global_px[:, 0]]
    np.testing.assert_array_equal(labels_in, labels_full)
    shapes = out.shapes["cells_truth_shapes"]
    assert list(shapes.index) == list(cells.obs["instance_id"])
    before = slide.shapes["cells_truth_shapes"].loc[shapes.index].geometry.centroid
    np.testing.assert_allclose(shapes.geometry.centroid.x, before.x - x0)
    np.testing.assert_allclose(shapes.geometry.centroid.y, before.y - y0)


def test_spots_are_those_with_a_centre_inside(slide):
    # 600 px around (250, 450): x -50–550 (cut at the border to 0–550), y 150–750
    out = bt.datasets.crop(slide, size_um=300.0, center=(250.0, 450.0))
    assert out.attrs["bitro_crop"]["window_px"] == [0, 150, 550, 750]
    xy = slide["spots"].obsm["spatial"]
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < 550) & (xy[:, 1] >= 150) & (xy[:, 1] < 750)
    assert 0 < inside.sum() < len(xy)
    spots = out["spots"]
    assert spots.n_obs == inside.sum()
    assert list(spots.obs_names) == list(slide["spots"].obs_names[inside])
    np.testing.assert_allclose(spots.obsm["spatial"], xy[inside] - [0, 150])
    circles = out.shapes["spots_shapes"]
    assert list(circles.index) == list(spots.obs["instance_id"])
    np.testing.assert_allclose(np.column_stack([circles.geometry.x, circles.geometry.y]), spots.obsm["spatial"])
    np.testing.assert_allclose(circles["radius"], slide.shapes["spots_shapes"]["radius"].iloc[0])
    np.testing.assert_array_equal(spots.layers["counts"].sum(), slide["spots"][inside].layers["counts"].sum())


def test_keep_whole_shapes_only(slide):
    window = [0, 150, 550, 750]
    centre = bt.datasets.crop(slide, size_um=300.0, center=(250.0, 450.0))
    whole = bt.datasets.crop(slide, size_um=300.0, center=(250.0, 450.0), keep="whole")
    assert whole.attrs["bitro_crop"]["window_px"] == window
    xy = slide["spots"].obsm["spatial"]
    radius = slide.shapes["spots_shapes"]["radius"].to_numpy()
    disc_inside = (
        (xy[:, 0] - radius >= 0) & (xy[:, 1] - radius >= 150) & (xy[:, 0] + radius <= 550) & (xy[:, 1] + radius <= 750)
    )
    assert 0 < disc_inside.sum() < centre["spots"].n_obs  # a spot centred inside but cut by the border is dropped
    assert list(whole["spots"].obs_names) == list(slide["spots"].obs_names[disc_inside])
    assert len(whole.shapes["spots_shapes"]) == disc_inside.sum()
    polygons = whole.shapes["cells_truth_shapes"].bounds.to_numpy()
    assert (polygons[:, :2] >= 0).all() and (polygons[:, 2:] <= [550, 600]).all()
    assert whole["cells_truth"].n_obs < centre["cells_truth"].n_obs
    with pytest.raises(ValueError, match="keep must be 'centre' or 'whole'"):
        bt.datasets.crop(slide, size_um=300.0, keep="all")


def test_input_untouched_and_attrs(slide):
    spots_before = slide["spots"].obsm["spatial"].copy()
    attrs_before = dict(slide.attrs)
    out = bt.datasets.crop(slide, size_um=250.0)
    assert slide.images["he"].shape == (3, 900, 800)
    np.testing.assert_array_equal(slide["spots"].obsm["spatial"], spots_before)
    assert dict(slide.attrs) == attrs_before and "bitro_crop" not in slide.attrs
    assert out.attrs["bitro_scale"] == slide.attrs["bitro_scale"]
    assert bt.io.get_mpp(out) == MPP
    assert "bulk" not in out.tables  # whole-section profile: not per location
    # default centre: the spot nearest the median spot position
    xy = slide["spots"].obsm["spatial"]
    nearest = xy[np.argmin(np.linalg.norm(xy - np.median(xy, axis=0), axis=1))]
    assert out.attrs["bitro_crop"]["center"] == list(nearest)
    # a crop of a crop records its corner in the frame of the whole slide
    inner = bt.datasets.crop(out, size_um=100.0, center=(250.0, 250.0))
    first = out.attrs["bitro_crop"]["offset_px"]
    assert inner.attrs["bitro_crop"]["offset_px"] == [first[0] + 150, first[1] + 150]


def test_window_cut_at_the_border(slide):
    out = bt.datasets.crop(slide, size_um=200.0, center=(0.0, 100.0))
    assert out.attrs["bitro_crop"]["window_px"] == [0, 0, 200, 300]
    assert out.images["he"].shape == (3, 300, 200)
    assert (out["cells_truth"].obsm["spatial"] < [200, 300]).all()


def test_written_and_read_back(slide, tmp_path):
    import spatialdata as sd

    out = bt.datasets.crop(slide, size_um=150.0)
    out.write(tmp_path / "crop.zarr")
    back = sd.read_zarr(tmp_path / "crop.zarr")
    assert set(back.tables) == {"spots", "cells_truth"}
    np.testing.assert_array_equal(back["cells_truth"].obsm["spatial"], out["cells_truth"].obsm["spatial"])
    np.testing.assert_array_equal(back.images["he"].data.compute(), out.images["he"].data.compute())


def test_errors(slide):
    with pytest.raises(ValueError, match=r"does not overlap image 'he'.*center inside the image"):
        bt.datasets.crop(slide, size_um=100.0, center=(5000.0, 5000.0))
    for bad in (0.0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="size_um must be a positive"):
            bt.datasets.crop(slide, size_um=bad)
    with pytest.raises(ValueError, match="less than one pixel"):
        bt.datasets.crop(slide, size_um=0.1)
    with pytest.raises(ValueError, match=r"center must be \(x, y\)"):
        bt.datasets.crop(slide, size_um=100.0, center=(1.0, 2.0, 3.0))
    with pytest.raises(KeyError, match="image 'he_normalized' not found"):
        bt.datasets.crop(slide, size_um=100.0, image_key="he_normalized")


@pytest.mark.realdata
def test_her2st_crop_um(data_dir):
    out = bt.datasets.her2st("C3", data_dir=data_dir, crop_um=500.0)
    mpp = bt.io.get_mpp(out)
    side = round(500.0 / mpp)
    assert out.images["he"].shape == (3, side, side)
    assert 0 < out["spots"].n_obs < 20
    with pytest.raises(ValueError, match="pass image=True"):
        bt.datasets.her2st("C3", data_dir=data_dir, image=False, crop_um=500.0)
