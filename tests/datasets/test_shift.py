"""bt.datasets.thin_counts / restain / rescale: simulated shifts that return a new slide and record themselves."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from scipy import sparse

import bitro as bt
from bitro.io._build import circles_element, image_element, set_scale, table_element


def _count_slide(counts: np.ndarray, *, sparse_x: bool = True, image: np.ndarray | None = None):
    """A slide with one spots table holding ``counts`` (spots on a line, 20 px apart)."""
    n = counts.shape[0]
    matrix = sparse.csr_matrix(counts.astype(np.float32)) if sparse_x else counts.astype(np.float32)
    spots = ad.AnnData(
        X=matrix,
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"G{j}" for j in range(counts.shape[1])]),
    )
    spots.layers["counts"] = matrix.copy()
    spots.obs["total_counts"] = counts.sum(axis=1).astype(np.float32)
    xy = np.column_stack([np.arange(n) * 20.0 + 10, np.full(n, 10.0)])
    spots.obsm["spatial"] = xy
    images = {} if image is None else {"he": image_element(image, dims=("y", "x", "c"))}
    out = sd.SpatialData(
        images=images,
        shapes={"spots_shapes": circles_element(xy, 5.0, spots.obs_names)},
        tables={"spots": table_element(spots, region="spots_shapes")},
    )
    set_scale(out, mpp=1.0, spot_diameter_um=10.0, spot_spacing_um=20.0)
    return out


# --------------------------------------------------------------------------- thin_counts
def test_thin_counts_is_binomial_with_the_expected_mean_and_variance():
    counts = np.full((50, 40), 1000)
    slide = _count_slide(counts)
    out = bt.datasets.thin_counts(slide, fraction=0.3, seed=1)
    thinned = out["spots"].layers["counts"]
    assert sparse.issparse(thinned) and thinned.dtype == np.float32
    values = thinned.toarray()
    assert np.array_equal(values, np.rint(values)) and (values >= 0).all() and (values <= counts).all()
    n, p = counts.size, 0.3
    # the total of 2,000 independent Binomial(1000, 0.3) draws: mean 0.3 × 2e6, sd √(2000 × 1000 × 0.21)
    assert abs(values.sum() - p * counts.sum()) < 5 * np.sqrt(n * 1000 * p * (1 - p))
    # the per-entry variance is binomial (210), not Poisson (300) nor a deterministic rounding (0)
    assert 180 < values.var() < 240
    np.testing.assert_array_equal(out["spots"].X.toarray(), values)
    np.testing.assert_allclose(out["spots"].obs["total_counts"], values.sum(axis=1))


def test_thin_counts_to_a_median_uses_the_exact_fraction():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.uniform(5, 60, size=(301, 1)) * np.ones((1, 200)))
    counts[:3] = 0  # empty spots do not count towards the median
    totals = counts.sum(axis=1)
    before = float(np.median(totals[totals > 0]))
    out = bt.datasets.thin_counts(_count_slide(counts, sparse_x=False), median_umi=650)
    record = out.attrs["bitro_shift"][-1]
    assert record["kind"] == "thin_counts"
    assert record["fraction"] == 650 / before
    assert record["median_umi_before"] == before
    after = out["spots"].layers["counts"].sum(axis=1)
    assert abs(np.median(after[after > 0]) - 650) < 0.05 * 650
    assert record["median_umi_after"] == float(np.median(after[after > 0]))
    assert isinstance(out["spots"].X, np.ndarray)


def test_thin_counts_leaves_the_input_untouched_and_is_seeded():
    counts = np.random.default_rng(1).poisson(20, size=(30, 10))
    slide = _count_slide(counts)
    before_layer = slide["spots"].layers["counts"].copy()
    a = bt.datasets.thin_counts(slide, fraction=0.5, seed=3)
    b = bt.datasets.thin_counts(slide, fraction=0.5, seed=3)
    c = bt.datasets.thin_counts(slide, fraction=0.5, seed=4)
    assert (slide["spots"].layers["counts"] != before_layer).nnz == 0
    assert (before_layer != slide["spots"].X).nnz == 0
    assert "bitro_shift" not in slide.attrs
    assert a["spots"] is not slide["spots"]
    assert (a["spots"].X != b["spots"].X).nnz == 0
    assert (a["spots"].X != c["spots"].X).nnz > 0
    # fraction 1 keeps every molecule
    same = bt.datasets.thin_counts(slide, fraction=1.0)
    assert (before_layer != same["spots"].X).nnz == 0


def test_thin_counts_records_compose():
    slide = _count_slide(np.full((10, 5), 100))
    twice = bt.datasets.thin_counts(bt.datasets.thin_counts(slide, fraction=0.5), fraction=0.5, seed=2)
    assert [r["kind"] for r in twice.attrs["bitro_shift"]] == ["thin_counts", "thin_counts"]
    assert twice.attrs["bitro_shift"][1]["median_umi_before"] < 500


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"fraction": 0.5, "median_umi": 10}, "exactly one"),
        ({"fraction": 0.0}, r"\(0, 1\]"),
        ({"fraction": 1.5}, r"\(0, 1\]"),
        ({"median_umi": 1e6}, "only removes molecules"),
        ({"median_umi": -1}, "positive"),
    ],
)
def test_thin_counts_refuses_bad_targets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bt.datasets.thin_counts(_count_slide(np.full((4, 3), 10)), **kwargs)


def test_thin_counts_refuses_non_counts_and_missing_tables():
    slide = _count_slide(np.full((4, 3), 10))
    slide["spots"].layers["counts"] = slide["spots"].layers["counts"] * 0.55  # normalised, not counts
    with pytest.raises(ValueError, match="non-negative integers"):
        bt.datasets.thin_counts(slide, fraction=0.5)
    with pytest.raises(KeyError, match="available tables"):
        bt.datasets.thin_counts(slide, fraction=0.5, table_key="cells")


# --------------------------------------------------------------------------- rescale
def _square_image(size=(120, 160), box=(40, 60, 30, 50)):
    """White image with a dark square rows y0:y1, columns x0:x1 (``box = (y0, y1, x0, x1)``)."""
    image = np.full((*size, 3), 240, dtype=np.uint8)
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = 40
    return image


def _dark_centroid(image_cyx: np.ndarray) -> np.ndarray:
    dark = np.asarray(image_cyx)[0] < 140
    ys, xs = np.nonzero(dark)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_rescale_keeps_spots_on_the_same_tissue(factor):
    image = _square_image()
    slide = _count_slide(np.full((3, 2), 5), image=image)
    # move spot 1 onto the centre of the dark square (x 30–49, y 40–59 → centre 39.5, 49.5)
    spots = slide["spots"]
    spots.obsm["spatial"][1] = [39.5, 49.5]
    out = bt.datasets.rescale(slide, factor)
    he = out.images["he"]
    assert he.shape == (3, round(120 * factor), round(160 * factor))
    centre = _dark_centroid(he.data.compute())
    new_spot = out["spots"].obsm["spatial"][1]
    np.testing.assert_allclose(new_spot, (np.array([39.5, 49.5]) + 0.5) * factor - 0.5)
    np.testing.assert_allclose(centre, new_spot, atol=0.5)
    shapes = out.shapes["spots_shapes"]
    np.testing.assert_allclose(
        shapes.geometry.x.to_numpy()[[0, 2]], (np.array([10.0, 50.0]) + 0.5) * factor - 0.5
    )
    np.testing.assert_allclose(shapes["radius"], 5.0 * factor)
    # the recorded scale is kept: the same spot diameter in µm now spans 1/factor of the tissue
    assert out.attrs["bitro_scale"] == slide.attrs["bitro_scale"]
    assert (out["spots"].X != slide["spots"].X).nnz == 0
    assert out.attrs["bitro_shift"][-1]["factor"] == factor
    assert out.attrs["bitro_shift"][-1]["shape_after"] == list(he.shape[1:])
    # the input is untouched
    assert slide.images["he"].shape == (3, 120, 160)
    assert slide["spots"].obsm["spatial"][1].tolist() == [39.5, 49.5]


def test_rescale_is_lazy_and_drops_what_describes_the_old_image():
    slide = bt.datasets.synthetic_tissue(size=400, technology="visium", seed=2)
    out = bt.datasets.rescale(slide, 1.2)
    import dask.array as da

    assert isinstance(out.images["he"].data, da.Array)
    assert "cells_truth" not in out.tables and "cells_truth_shapes" not in out.shapes
    assert "nuclei_truth" not in out.labels
    assert set(out.tables) == {"spots", "bulk"}
    dropped = out.attrs["bitro_shift"][-1]["dropped"]
    assert dropped["tables"] == ["cells_truth"] and dropped["labels"] == ["nuclei_truth"]
    assert "cells_truth" in slide.tables and "nuclei_truth" in slide.labels


@pytest.mark.parametrize("factor", [0, -1.0, float("nan"), "big"])
def test_rescale_refuses_bad_factors(factor):
    slide = _count_slide(np.full((2, 2), 1), image=_square_image())
    with pytest.raises(ValueError, match="positive number"):
        bt.datasets.rescale(slide, factor)


# --------------------------------------------------------------------------- restain
@pytest.fixture(scope="module")
def he_slide():
    return bt.datasets.synthetic_tissue(size=500, seed=4)


def _angle_deg(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def _reference(matrix, max_concentrations) -> bt.pp.StainReference:
    matrix = np.asarray(matrix, dtype=float)
    matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return bt.pp.StainReference("macenko", stain_matrix=matrix, max_concentrations=max_concentrations)


def test_restain_paints_the_reference_stains(he_slide):
    source = bt.pp.fit_stain_reference(he_slide, method="macenko", seed=0)
    # a reference whose hematoxylin is bluer and eosin more orange than the slide's
    reference = _reference([[0.45, 0.75, 0.49], [0.30, 0.80, 0.52]], [1.2, 0.6])
    matrix = reference.stain_matrix
    out = bt.datasets.restain(he_slide, reference=reference)
    import dask.array as da

    assert isinstance(out.images["he"].data, da.Array)  # lazy until read
    assert out.images["he"].shape == he_slide.images["he"].shape
    fitted = bt.pp.fit_stain_reference(out, method="macenko", seed=0)
    for k in range(2):
        assert _angle_deg(fitted.stain_matrix[k], matrix[k]) < 4.0
        assert _angle_deg(source.stain_matrix[k], matrix[k]) > 6.0
    np.testing.assert_allclose(fitted.max_concentrations, [1.2, 0.6], rtol=0.15)
    record = out.attrs["bitro_shift"][-1]
    assert record["kind"] == "restain" and record["key_added"] == "he"
    np.testing.assert_allclose(record["reference"]["stain_matrix"], matrix)
    np.testing.assert_allclose(record["source"]["stain_matrix"], source.stain_matrix, atol=1e-6)
    # the input image is untouched and no stain record was added to it
    assert "bitro_stain" not in he_slide.attrs and "bitro_shift" not in he_slide.attrs
    assert (
        bt.pp.fit_stain_reference(he_slide, method="macenko", seed=0).stain_matrix.tolist()
        == source.stain_matrix.tolist()
    )


def test_restain_keeps_both_images_with_another_key_and_drops_stale_normalisations(he_slide):
    from bitro.pp._pipeline import _fresh

    slide = _fresh(he_slide)
    bt.pp.normalize_stains(slide, method="macenko")
    reference = _reference([[0.6, 0.7, 0.39], [0.1, 0.85, 0.52]], [1.0, 0.8])
    out = bt.datasets.restain(slide, reference=reference, key_added="he_other_lab")
    assert {"he", "he_other_lab"} <= set(out.images)
    assert "he_normalized" not in out.images  # it showed the old stains
    assert "he_normalized" not in out.attrs.get("bitro_stain", {})
    assert out.attrs["bitro_shift"][-1]["dropped_images"] == ["he_normalized"]
    assert "he_normalized" in slide.images


def test_restain_refuses_reinhard_and_unknown_images(he_slide):
    with pytest.raises(ValueError, match="macenko"):
        bt.datasets.restain(he_slide, reference=np.zeros((4, 4, 3), np.uint8), method="reinhard")
    with pytest.raises(KeyError, match="available images"):
        bt.datasets.restain(he_slide, reference=np.zeros((4, 4, 3), np.uint8), image_key="nope")


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["TCGA-HE-7130-01Z-00-DX1.png", "target_image.png"])
def test_restain_to_the_kit_references(he_slide, data_dir, name):
    path = data_dir / "stain" / name
    from bitro.io._image import read_image_file

    expected = bt.pp.fit_stain_reference(read_image_file(path), method="macenko", seed=0)
    out = bt.datasets.restain(he_slide, reference=path)
    record = out.attrs["bitro_shift"][-1]
    np.testing.assert_allclose(record["reference"]["stain_matrix"], expected.stain_matrix, atol=1e-6)
    assert name in record["reference"]["description"]
    fitted = bt.pp.fit_stain_reference(out, method="macenko", seed=0)
    for k in range(2):
        assert _angle_deg(fitted.stain_matrix[k], expected.stain_matrix[k]) < 5.0
