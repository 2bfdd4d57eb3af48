"""bt.pp.augment_slide / augment_slides: augmented copies of training slides (scale and HED stain jitter)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import bitro as bt
from bitro.io._build import circles_element, get_image, image_element, set_scale, table_element


@pytest.fixture(scope="module")
def tissue():
    """A small synthetic Visium slide: H&E image, truth cells and masks, spots with counts."""
    return bt.datasets.synthetic_tissue(size=500, technology="visium", seed=3)


def _pixels(sdata, key="he") -> np.ndarray:
    return np.asarray(get_image(sdata, key).data.compute())


def _square_slide():
    """White 120 × 160 image with a dark square (rows 40–59, columns 30–49) and three spots, one on the square."""
    image = np.full((120, 160, 3), 240, dtype=np.uint8)
    image[40:60, 30:50] = (60, 30, 120)
    xy = np.array([[10.0, 10.0], [39.5, 49.5], [50.0, 10.0]])
    spots = ad.AnnData(
        X=np.arange(6, dtype=np.float32).reshape(3, 2),
        obs=pd.DataFrame(index=["s0", "s1", "s2"]),
        var=pd.DataFrame(index=["G0", "G1"]),
    )
    spots.obsm["spatial"] = xy
    out = sd.SpatialData(
        images={"he": image_element(image, dims=("y", "x", "c"))},
        shapes={"spots_shapes": circles_element(xy, 5.0, spots.obs_names)},
        tables={"spots": table_element(spots, region="spots_shapes")},
    )
    set_scale(out, mpp=1.0, spot_diameter_um=10.0, spot_spacing_um=20.0, sample_id="square")
    return out


# --------------------------------------------------------------------------- scale
@pytest.mark.parametrize("scale", [0.8, 1.2])
def test_scale_moves_spots_with_the_tissue_and_keeps_counts_and_mpp(scale):
    slide = _square_slide()
    out = bt.pp.augment_slide(slide, scale=scale)
    image = _pixels(out)
    assert image.shape == (3, round(120 * scale), round(160 * scale))
    # the spot that sat on the square's centre still does
    ys, xs = np.nonzero(image[0] < 150)
    centre = np.array([xs.mean(), ys.mean()])
    moved = out["spots"].obsm["spatial"][1]
    np.testing.assert_allclose(moved, (np.array([39.5, 49.5]) + 0.5) * scale - 0.5)
    np.testing.assert_allclose(centre, moved, atol=0.5)
    circles = out.shapes["spots_shapes"]
    np.testing.assert_allclose(circles.geometry.x, out["spots"].obsm["spatial"][:, 0])
    np.testing.assert_allclose(circles["radius"], 5.0 * scale)
    np.testing.assert_array_equal(out["spots"].X, slide["spots"].X)
    assert out.attrs["bitro_scale"]["mpp"] == slide.attrs["bitro_scale"]["mpp"] == 1.0
    record = out.attrs["bitro_augment"][-1]
    assert record["scale"] == scale and record["shape_after"] == list(image.shape[1:])
    assert record["source_sample_id"] == "square"


def test_copy_drops_what_describes_the_old_image_and_records_itself(tissue):
    out = bt.pp.augment_slide(tissue, scale=1.2, hed_jitter=0.1, seed=4)
    assert set(out.tables) == {"spots", "bulk"} and set(out.shapes) == {"spots_shapes"}
    assert not out.labels and set(out.images) == {"he"}
    record = out.attrs["bitro_augment"][-1]
    assert record["dropped"] == {
        "tables": ["cells_truth"],
        "shapes": ["cells_truth_shapes"],
        "labels": ["nuclei_truth"],
    }
    assert record["hed_jitter"] == 0.1 and record["seed"] == 4
    # a distinct sample id (training sees another slide) that names the augmentation
    assert out.attrs["bitro_scale"]["sample_id"] == "synthetic_0_aug_x1.2_hed0.1_seed4"
    for table in out.tables.values():  # the tables alone say they come from an augmented copy
        assert table.uns["bitro_augment"] == out.attrs["bitro_augment"]
    # augmenting the copy again appends a record
    again = bt.pp.augment_slide(out, scale=0.9)
    assert [r["scale"] for r in again.attrs["bitro_augment"]] == [1.2, 0.9]


def test_input_is_untouched(tissue):
    before_image = _pixels(tissue)
    before_xy = tissue["spots"].obsm["spatial"].copy()
    before_attrs = {k: dict(v) for k, v in tissue.attrs.items()}
    elements = (set(tissue.images), set(tissue.labels), set(tissue.shapes), set(tissue.tables))
    out = bt.pp.augment_slide(tissue, scale=0.8, hed_jitter=0.2, hed_shift=0.01, seed=1)
    out["spots"].obsm["spatial"][:] = 0  # writing into the copy does not reach the input
    _pixels(out)
    np.testing.assert_array_equal(_pixels(tissue), before_image)
    np.testing.assert_array_equal(tissue["spots"].obsm["spatial"], before_xy)
    assert {k: dict(v) for k, v in tissue.attrs.items()} == before_attrs
    assert (set(tissue.images), set(tissue.labels), set(tissue.shapes), set(tissue.tables)) == elements
    assert "bitro_augment" not in tissue.attrs and "bitro_augment" not in tissue["spots"].uns


# --------------------------------------------------------------------------- stain
def test_hed_jitter_changes_colours_reproducibly(tissue):
    original = _pixels(tissue)
    a = bt.pp.augment_slide(tissue, hed_jitter=0.2, seed=7)
    b = bt.pp.augment_slide(tissue, hed_jitter=0.2, seed=7)
    c = bt.pp.augment_slide(tissue, hed_jitter=0.2, seed=8)
    pa, pb, pc = _pixels(a), _pixels(b), _pixels(c)
    assert pa.shape == original.shape  # scale 1: no resampling
    np.testing.assert_array_equal(pa, pb)
    assert np.abs(pa.astype(int) - original).mean() > 1.0
    assert np.abs(pa.astype(int) - pc).mean() > 1.0
    np.testing.assert_array_equal(a["spots"].obsm["spatial"], tissue["spots"].obsm["spatial"])


def test_hed_jitter_scales_each_stain_by_its_recorded_factor(tissue):
    from skimage.color import rgb2hed

    out = bt.pp.augment_slide(tissue, hed_jitter=0.3, seed=2)
    factors = np.array(out.attrs["bitro_augment"][-1]["hed_factors"])
    assert ((factors >= 0.7) & (factors <= 1.3)).all() and np.ptp(factors) > 0.01
    before = rgb2hed(np.moveaxis(_pixels(tissue), 0, -1))
    after = rgb2hed(np.moveaxis(_pixels(out), 0, -1))
    for k in range(2):  # hematoxylin and eosin: the median ratio over clearly stained pixels
        stained = before[..., k] > np.percentile(before[..., k], 75)
        ratio = np.median(after[..., k][stained] / before[..., k][stained])
        assert ratio == pytest.approx(factors[k], rel=0.05)


def test_no_augmentation_gives_the_same_pixels(tissue):
    out = bt.pp.augment_slide(tissue)
    np.testing.assert_array_equal(_pixels(out), _pixels(tissue))
    assert "cells_truth" not in out.tables  # still a copy to preprocess again


# --------------------------------------------------------------------------- the recipe
def test_augmented_copies_train_beside_the_originals(tissue, tmp_path):
    """The documented recipe: augment_slides → run_pipeline → bt.tl.fit on originals and copies together."""
    bt.settings.progress = False
    copies = bt.pp.augment_slides({"a": tissue}, scales=(0.8, 1.2), hed_jitter=0.1, seed=5)
    assert list(copies) == ["a_aug0_x0.8", "a_aug1_x1.2"]
    seeds = [c.attrs["bitro_augment"][-1]["seed"] for c in copies.values()]
    assert seeds == [5, 6]
    assert [c.attrs["bitro_scale"]["sample_id"] for c in copies.values()] == list(copies)
    manifest = bt.pp.run_pipeline({"a": tissue, **copies}, out=tmp_path / "prepared", encoder="morphology")
    assert (manifest["status"] == "done").all()
    slides = [bt.io.read_zarr(tmp_path / "prepared" / f"{name}.zarr") for name in ["a", *copies]]
    n_cells = [s["spots"].obs["n_cells"].mean() for s in slides]
    assert n_cells[1] > n_cells[0] > n_cells[2]  # ×0.8 packs more nuclei into a spot, ×1.2 fewer
    assert slides[1].attrs["bitro_augment"][-1]["scale"] == 0.8
    model = bt.tl.fit(slides, model="ridge")
    model.predict(slides[0], key_added="pred")
    pred = slides[0]["spots"].layers["pred"]
    assert np.isfinite(pred.toarray() if hasattr(pred, "toarray") else np.asarray(pred)).all()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), "big", None])
def test_refuses_bad_scales(scale):
    with pytest.raises(ValueError, match="scale must be a positive number"):
        bt.pp.augment_slide(_square_slide(), scale=scale)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hed_jitter": -0.1}, r"hed_jitter must be a number in \[0, 1\)"),
        ({"hed_jitter": 1.0}, "hed_jitter"),
        ({"hed_jitter": "a"}, "hed_jitter"),
        ({"hed_shift": 0.5}, r"hed_shift must be a number in \[0, 0.1\]"),
        ({"hed_shift": -0.01}, "hed_shift"),
        ({"scale": 0.001}, "leaves no pixel"),
    ],
)
def test_refuses_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bt.pp.augment_slide(_square_slide(), **kwargs)


def test_refuses_missing_and_non_rgb_images():
    slide = _square_slide()
    with pytest.raises(KeyError, match="available images"):
        bt.pp.augment_slide(slide, image_key="he_normalized")
    from spatialdata.models import Image2DModel

    slide.images["grey"] = Image2DModel.parse(np.zeros((1, 20, 20), dtype=np.uint8), dims=("c", "y", "x"))
    with pytest.raises(ValueError, match="has 1 channels"):
        bt.pp.augment_slide(slide, image_key="grey")


def test_augment_slides_refuses_empty_inputs_and_name_clashes():
    slide = _square_slide()
    with pytest.raises(ValueError, match="at least one"):
        bt.pp.augment_slides({})
    with pytest.raises(ValueError, match="scales is empty"):
        bt.pp.augment_slides({"a": slide}, scales=())
    with pytest.raises(ValueError, match="scales must be a positive number"):
        bt.pp.augment_slides({"a": slide}, scales=(0.8, 0))
    with pytest.raises(ValueError, match="clashes"):
        bt.pp.augment_slides({"a": slide, "a_aug0_x0.8": slide}, scales=(0.8,))
