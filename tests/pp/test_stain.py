"""Tests of bt.pp stain normalisation: known-answer synthetic stains, API contract, real outputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import spatialdata as sd

import bitro as bt
from bitro.io._build import get_image, image_element, image_levels, set_scale
from bitro.pp import _stain
from bitro.pp import _stain_methods as M

H_TRUE = np.array([0.65, 0.70, 0.29])
E_TRUE = np.array([0.07, 0.99, 0.11])
H_OTHER = np.array([0.55, 0.75, 0.37])
E_OTHER = np.array([0.20, 0.85, 0.48])


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _cos(a, b):
    return np.sum(_unit(a) * _unit(b), axis=-1)


def beer_lambert(h, e, *, size=96, seed=0, glass=0.2):
    """RGB image from two stain vectors and random non-negative concentrations (with glass)."""
    rng = np.random.default_rng(seed)
    n = size * size
    conc = np.zeros((n, 2))
    kind = rng.choice(4, n, p=[glass, 0.25, 0.25, 0.5 - glass])  # glass, H only, E only, mixed
    conc[kind == 1, 0] = rng.gamma(4.0, 0.25, (kind == 1).sum())
    conc[kind == 2, 1] = rng.gamma(4.0, 0.15, (kind == 2).sum())
    mixed = kind == 3
    conc[mixed] = rng.gamma(4.0, [0.2, 0.12], (mixed.sum(), 2))
    od = conc @ np.stack([_unit(h), _unit(e)])
    return M.od_to_rgb(od).reshape(size, size, 3)


def sdata_of(rgb, *, chunks=48, scale_factors=None):
    sdata = sd.SpatialData(
        images={"he": image_element(rgb, dims=("y", "x", "c"), chunks=chunks, scale_factors=scale_factors)}
    )
    set_scale(sdata, mpp=0.5)
    return sdata


def to_hwc(sdata, key):
    return np.moveaxis(np.asarray(get_image(sdata, key).data.compute()), 0, -1)


@pytest.fixture
def bitro_caplog(caplog):
    logger = logging.getLogger("bitro")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


# --------------------------------------------------------------------------- known-answer math


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_fit_recovers_true_stain_vectors(method):
    img = beer_lambert(H_TRUE, E_TRUE)
    ref = bt.pp.fit_stain_reference(img, method=method, seed=0)
    cos = _cos(ref.stain_matrix, np.stack([H_TRUE, E_TRUE]))
    assert np.all(cos > 0.99), cos
    np.testing.assert_allclose(np.linalg.norm(ref.stain_matrix, axis=1), 1.0, atol=1e-6)


def test_concentrations_are_exact_nnls():
    rng = np.random.default_rng(0)
    m = np.stack([_unit(H_TRUE), _unit(E_TRUE)])
    od = rng.uniform(0, 2, (500, 3))
    from scipy.optimize import nnls

    expected = np.array([nnls(m.T, x)[0] for x in od])
    np.testing.assert_allclose(M.concentrations(od, m), expected, atol=1e-4)
    assert np.all(M.concentrations(od, m, alpha=0.1) >= 0)


@pytest.mark.parametrize("method", ["macenko", "vahadane", "reinhard"])
def test_normalising_to_own_reference_is_identity(method):
    img = beer_lambert(H_TRUE, E_TRUE, seed=1)
    sdata = sdata_of(img)
    ref = bt.pp.fit_stain_reference(img, method=method, seed=0)
    bt.pp.normalize_stains(sdata, reference=ref, method=method, seed=0)
    out = to_hwc(sdata, "he_normalized")
    assert np.abs(out.astype(float) - img).mean() < 1.5


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_normalising_a_to_b_gives_b_stains(method):
    img_a = beer_lambert(H_TRUE, E_TRUE, seed=2)
    img_b = beer_lambert(H_OTHER, E_OTHER, seed=3)
    ref_b = bt.pp.fit_stain_reference(img_b, method=method, seed=0)
    sdata = sdata_of(img_a)
    bt.pp.normalize_stains(sdata, reference=img_b, method=method, seed=0)
    refit = bt.pp.fit_stain_reference(to_hwc(sdata, "he_normalized"), method=method, seed=0)
    assert np.all(_cos(refit.stain_matrix, ref_b.stain_matrix) > 0.99)
    # and the source's own stains are gone: H_a vs E_b-based matrix differs more than that
    assert np.all(
        _cos(refit.stain_matrix, np.stack([H_TRUE, E_TRUE])) < _cos(refit.stain_matrix, ref_b.stain_matrix)
    )
    np.testing.assert_allclose(refit.max_concentrations, ref_b.max_concentrations, rtol=0.1)


def test_reinhard_matches_target_lab_statistics():
    img_a = beer_lambert(H_TRUE, E_TRUE, seed=4)
    img_b = beer_lambert(H_OTHER, E_OTHER, seed=5)
    ref_b = bt.pp.fit_stain_reference(img_b, method="reinhard", seed=0)
    sdata = sdata_of(img_a)
    bt.pp.normalize_stains(sdata, reference=ref_b, method="reinhard", seed=0)
    refit = bt.pp.fit_stain_reference(to_hwc(sdata, "he_normalized"), method="reinhard", seed=0)
    np.testing.assert_allclose(refit.lab_mean, ref_b.lab_mean, atol=2.0)
    np.testing.assert_allclose(refit.lab_std, ref_b.lab_std, rtol=0.15)


def test_large_slide_is_sampled_by_windows(monkeypatch):
    img = beer_lambert(H_TRUE, E_TRUE, size=600, seed=6)
    sdata = sdata_of(img, chunks=128, scale_factors=[2, 2])
    monkeypatch.setattr(_stain, "_WHOLE_IMAGE_PIXELS", 100 * 100)
    monkeypatch.setattr(_stain, "_THUMBNAIL_SIDE", 100)
    ref = bt.pp.fit_stain_reference(sdata, method="macenko", n_pixels=20_000, seed=0)
    assert ref.n_pixels == 20_000
    assert np.all(_cos(ref.stain_matrix, np.stack([H_TRUE, E_TRUE])) > 0.99)


# --------------------------------------------------------------------------- element placement


def test_normalize_writes_lazy_multiscale_element_with_provenance():
    img = beer_lambert(H_TRUE, E_TRUE, size=200, seed=7)
    sdata = sdata_of(img, chunks=64, scale_factors=[2])
    before = to_hwc(sdata, "he").copy()
    bt.pp.normalize_stains(sdata, seed=3)  # default method (macenko) and reference
    assert image_levels(sdata, "he_normalized") == image_levels(sdata, "he")
    level0 = get_image(sdata, "he_normalized")
    assert level0.dtype == np.uint8
    assert level0.data.chunks == get_image(sdata, "he").data.chunks  # tile by tile, same chunks
    from spatialdata.transformations import get_transformation

    assert (
        get_transformation(level0, get_all=True).keys()
        == get_transformation(get_image(sdata, "he"), get_all=True).keys()
    )
    np.testing.assert_array_equal(to_hwc(sdata, "he"), before)
    record = sdata.attrs["bitro_stain"]["he_normalized"]
    assert record["method"] == "macenko" and record["seed"] == 3
    default = _stain.default_reference("macenko")
    np.testing.assert_allclose(record["reference"]["stain_matrix"], default.stain_matrix)
    assert np.all(_cos(record["source"]["stain_matrix"], np.stack([H_TRUE, E_TRUE])) > 0.99)
    # the output carries the default reference's stains
    refit = bt.pp.fit_stain_reference(to_hwc(sdata, "he_normalized"), method="macenko")
    assert np.all(_cos(refit.stain_matrix, default.stain_matrix) > 0.99)


def test_overwrite_and_inplace():
    img = beer_lambert(H_TRUE, E_TRUE, seed=8)
    sdata = sdata_of(img)
    bt.pp.normalize_stains(sdata, method="macenko")
    with pytest.raises(ValueError, match="already exists"):
        bt.pp.normalize_stains(sdata, method="macenko")
    bt.pp.normalize_stains(sdata, method="reinhard", overwrite=True)
    assert sdata.attrs["bitro_stain"]["he_normalized"]["method"] == "reinhard"
    element = bt.pp.normalize_stains(sdata, method="macenko", key_added="other", inplace=False)
    assert "other" not in sdata.images and element is not None


def test_reference_roundtrip(tmp_path):
    ref = bt.pp.fit_stain_reference(beer_lambert(H_TRUE, E_TRUE), method="vahadane", seed=0)
    again = bt.pp.StainReference.from_dict(ref.to_dict())
    np.testing.assert_array_equal(again.stain_matrix, ref.stain_matrix)
    ref.save(tmp_path / "ref.json")
    loaded = bt.pp.StainReference.load(tmp_path / "ref.json")
    np.testing.assert_array_equal(loaded.max_concentrations, ref.max_concentrations)
    assert loaded.method == "vahadane"
    for method in _stain.METHODS:
        assert _stain.default_reference(method).method == method
    with pytest.raises(ValueError, match="unit vectors"):
        bt.pp.StainReference("macenko", stain_matrix=np.ones((2, 3)), max_concentrations=[1, 1])
    with pytest.raises(ValueError, match="lab_mean"):
        bt.pp.StainReference("reinhard")


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(bitro_caplog):
    img = beer_lambert(H_TRUE, E_TRUE)
    with pytest.raises(ValueError, match="grey-scale"):
        bt.pp.fit_stain_reference(img[..., 0])
    with pytest.raises(ValueError, match="grey-scale"):
        bt.pp.fit_stain_reference(img[..., :1])
    with pytest.raises(ValueError, match=r"(?i)no tissue pixels found.*reference="):
        bt.pp.fit_stain_reference(np.full((64, 64, 3), 250, np.uint8))
    with pytest.raises(ValueError, match=r"'vahadane', 'macenko', 'reinhard'"):
        bt.pp.fit_stain_reference(img, method="bogus")
    rgba = np.concatenate([img, np.full((*img.shape[:2], 1), 255, np.uint8)], axis=-1)
    ref = bt.pp.fit_stain_reference(rgba, method="macenko")
    assert "alpha" in bitro_caplog.text
    np.testing.assert_allclose(
        ref.stain_matrix, bt.pp.fit_stain_reference(img, method="macenko").stain_matrix
    )
    white = sdata_of(np.full((64, 64, 3), 252, np.uint8))
    with pytest.raises(ValueError, match=r"(?i)no tissue pixels found"):
        bt.pp.normalize_stains(white)
    with pytest.raises(ValueError, match="method="):
        bt.pp.normalize_stains(
            sdata_of(img), reference=_stain.default_reference("reinhard"), method="macenko"
        )


def test_grey_slide_error():
    from spatialdata.models import Image2DModel

    grey = Image2DModel.parse(np.zeros((1, 32, 32), np.uint8), dims=("c", "y", "x"))
    sdata = sd.SpatialData(images={"he": grey})
    with pytest.raises(ValueError, match="RGB"):
        bt.pp.normalize_stains(sdata)


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("method", "max_mae"),
    # measured (benchmarks/stain.py): MAE vahadane 0.85, macenko 0.73, reinhard 3.42 (our reinhard fits
    # on tissue pixels only, tiatoolbox on all pixels; with all pixels it is 0.95). Unnormalised source:
    # 11.9–17.5. Tolerances ≈ 2–3× the measured values; vahadane is looser (different optimiser).
    [("vahadane", 2.5), ("macenko", 1.5), ("reinhard", 5.0)],
)
def test_matches_tiatoolbox_outputs(data_dir, method, max_mae):
    from skimage.io import imread

    stain_dir = data_dir / "stain"
    source = imread(stain_dir / "source_image.png")[..., :3]
    target = imread(stain_dir / "target_image.png")[..., :3]
    expected = imread(stain_dir / f"norm_{method}.png")[..., :3].astype(float)
    sdata = sdata_of(source, chunks=128)
    bt.pp.normalize_stains(sdata, reference=target, method=method, seed=0)
    ours = to_hwc(sdata, "he_normalized").astype(float)
    mae = np.abs(ours - expected).mean()
    unnormalised = np.abs(source - expected).mean()
    assert mae < max_mae
    assert mae < unnormalised / 3
