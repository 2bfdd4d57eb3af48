"""bt.tl.domain_stats / domain_report / format_domain_report, and training on slide-standardised features."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _toy import make_toy_slide

import bitro as bt
from bitro.pp._pipeline import _fresh


# --------------------------------------------------------------------------- report, known answers
def _stats(**values) -> dict:
    return {"format_version": 1, "stats": values, "context": {}}


def test_report_flags_values_beyond_the_range_by_more_than_the_tolerance():
    train = [_stats(a=10.0, b=1.0, embedding_pc1_mean=-0.2), _stats(a=20.0, b=1.0, embedding_pc1_mean=0.1)]
    train.append(_stats(a=30.0, b=1.0, embedding_pc1_mean=0.0, only_train=5.0))
    cases = {  # a: median 20, margin 2 → outside below 8 or above 32
        7.9: "below",
        8.1: "",
        31.9: "",
        32.1: "above",
    }
    for value, direction in cases.items():
        df = bt.tl.domain_report(train, _stats(a=value, b=1.0, embedding_pc1_mean=0.0))
        row = df.loc["a"]
        assert (row["train_min"], row["train_median"], row["train_max"], row["n_train"]) == (10, 20, 30, 3)
        assert row["direction"] == direction and row["outside"] == bool(direction)
        assert row["ratio"] == pytest.approx(value / 20)
    # centred statistics: margins in training SDs, no ratio
    df = bt.tl.domain_report(train, _stats(a=20.0, b=1.0, embedding_pc1_mean=0.25))
    assert df.loc["embedding_pc1_mean", "outside"] and np.isnan(df.loc["embedding_pc1_mean", "ratio"])
    df = bt.tl.domain_report(train, _stats(a=20.0, b=1.0, embedding_pc1_mean=0.15))
    assert not df.loc["embedding_pc1_mean", "outside"]
    # a statistic on one side only is reported but never flagged
    assert np.isnan(df.loc["only_train", "value"]) and not df.loc["only_train", "outside"]
    assert df.attrs["tolerance"] == 0.1
    assert not bt.tl.domain_report(train, _stats(a=7.9), tolerance=0.25).loc["a", "outside"]


def test_format_domain_report_names_the_flagged_statistics():
    train = [_stats(median_umi_per_spot=9000.0, median_nuclei_per_spot=18.0)]
    train.append(_stats(median_umi_per_spot=11000.0, median_nuclei_per_spot=20.0))
    text = bt.tl.format_domain_report(
        bt.tl.domain_report(train, _stats(median_umi_per_spot=650.0, median_nuclei_per_spot=19.0))
    )
    assert text.startswith("Domain report: 1 of 2 statistics outside")
    assert (
        "median_umi_per_spot = 650 (below the training range 9,000–11,000, 0.065× the training median)"
        in text
    )
    assert "median_nuclei_per_spot" not in text
    calm = bt.tl.format_domain_report(bt.tl.domain_report(train, _stats(median_umi_per_spot=10000.0)))
    assert "0 of 1" in calm and "looks like the training slides" in calm


def _stain_stats(**vectors) -> dict:
    """domain_stats-like dict of stain vectors given as ``hematoxylin=[r, g, b]``, ``eosin=[r, g, b]``."""
    return _stats(
        **{
            f"stain_{s}_od_{c}": float(v)
            for s, vec in vectors.items()
            for c, v in zip("rgb", vec, strict=True)
        }
    )


def _tilted(degrees: float) -> np.ndarray:
    """A unit eosin-like vector tilted by ``degrees`` from ``[0.3, 0.8, 0.5]`` in a fixed plane."""
    base = np.array([0.3, 0.8, 0.5]) / np.linalg.norm([0.3, 0.8, 0.5])
    other = np.cross(base, [1.0, 0.0, 0.0])
    other /= np.linalg.norm(other)
    t = np.radians(degrees)
    return np.cos(t) * base + np.sin(t) * other


def test_stain_vectors_are_compared_by_angle_beyond_the_training_cone():
    train = [_stain_stats(eosin=_tilted(d)) for d in (-2.0, 0.0, 2.0)]  # a cone of 2° around the base
    for degrees, outside in ((7.9, False), (-7.9, False), (8.1, True), (30.0, True)):
        df = bt.tl.domain_report(train, _stain_stats(eosin=_tilted(degrees) * 1.7))  # the norm is ignored
        row = df.loc["stain_eosin_angle_deg"]
        assert row["value"] == pytest.approx(abs(degrees), abs=1e-6)
        assert (row["train_min"], row["train_max"], row["n_train"]) == (pytest.approx(0), pytest.approx(2), 3)
        assert bool(row["outside"]) is outside and row["direction"] == ("above" if outside else "")
        assert np.isnan(row["ratio"])
        # the RGB components are folded into the angle row, not judged one by one
        assert not any("_od_" in name for name in df.index)
    assert df.attrs["stain_tolerance_deg"] == 6.0
    narrow = bt.tl.domain_report(train, _stain_stats(eosin=_tilted(5.0)), stain_tolerance_deg=2.0)
    assert narrow.loc["stain_eosin_angle_deg", "outside"]
    text = bt.tl.format_domain_report(df)
    assert "6° beyond" in text and "stain_eosin_angle_deg = 30" in text


#: Macenko stain vectors of the HER2ST patient C sections (3000 px central windows), and of C4
#: re-stained to the kit's TCGA tile (``bt.datasets.restain``), rounded to three decimals.
HER2ST_C = {
    "C2": {"hematoxylin": [0.753, 0.583, 0.306], "eosin": [0.408, 0.806, 0.429]},
    "C3": {"hematoxylin": [0.731, 0.601, 0.325], "eosin": [0.408, 0.776, 0.481]},
    "C4": {"hematoxylin": [0.732, 0.600, 0.324], "eosin": [0.347, 0.768, 0.538]},
    "C5": {"hematoxylin": [0.729, 0.606, 0.319], "eosin": [0.413, 0.788, 0.456]},
    "C6": {"hematoxylin": [0.756, 0.580, 0.304], "eosin": [0.444, 0.773, 0.453]},
    "C4_tcga": {"hematoxylin": [0.479, 0.779, 0.404], "eosin": [0.093, 0.819, 0.567]},
}


def test_an_unshifted_section_of_the_same_patient_is_not_a_stain_alarm_but_a_restained_one_is():
    train = [_stain_stats(**HER2ST_C[s]) for s in ("C2", "C3", "C5", "C6")]
    # the false alarm of a per-component rule: C4's eosin R component lies more than 10 % of the
    # training median below the narrow range of the four other sections
    r = [HER2ST_C[s]["eosin"][0] for s in ("C2", "C3", "C5", "C6")]
    assert HER2ST_C["C4"]["eosin"][0] < min(r) - 0.1 * np.median(r)
    same = bt.tl.domain_report(train, _stain_stats(**HER2ST_C["C4"]))
    assert not same["outside"].any(), same[same["outside"]]
    restained = bt.tl.domain_report(train, _stain_stats(**HER2ST_C["C4_tcga"]))
    assert set(restained.index[restained["outside"]]) == {
        "stain_hematoxylin_angle_deg",
        "stain_eosin_angle_deg",
    }
    assert (restained.loc[["stain_hematoxylin_angle_deg", "stain_eosin_angle_deg"], "value"] > 15).all()


def test_a_noisy_copy_of_a_slide_is_not_flagged_for_stain_and_a_restained_one_is():
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    raw = bt.datasets.synthetic_tissue(1, size=600, technology="visium", seed=3)  # one slide, not a list
    image = np.asarray(raw["he"].values)
    noise = np.random.default_rng(0).integers(-3, 4, size=image.shape)
    noisy = sd.SpatialData(
        images={
            "he": Image2DModel.parse(np.clip(image + noise, 0, 255).astype(np.uint8), dims=("c", "y", "x"))
        }
    )
    noisy.attrs.update(dict(raw.attrs))
    matrix = np.array([[0.45, 0.75, 0.49], [0.30, 0.80, 0.52]])
    other_lab = bt.datasets.restain(
        raw,
        reference=bt.pp.StainReference(
            "macenko",
            stain_matrix=matrix / np.linalg.norm(matrix, axis=1, keepdims=True),
            max_concentrations=[1.2, 0.6],
        ),
    )

    stats = []
    for s in (raw, noisy, other_lab):
        bt.pp.normalize_stains(s, method="macenko", seed=0)
        stats.append(bt.tl.domain_stats(s))

    def stain_flags(slide_stats):
        df = bt.tl.domain_report([stats[0]], slide_stats)  # one training slide: the narrowest range
        return {n for n in df.index[df["outside"]] if n.startswith("stain_")}

    assert stain_flags(stats[1]) == set()
    assert stain_flags(stats[2]) >= {"stain_hematoxylin_angle_deg", "stain_eosin_angle_deg"}


@pytest.mark.parametrize(
    ("train", "slide", "kwargs", "match"),
    [
        ([], _stats(a=1.0), {}, "at least one training slide"),
        ([{"a": 1.0}], _stats(a=1.0), {}, "not a domain_stats dict"),
        ([_stats(a=1.0)], _stats(a=1.0), {"tolerance": -0.1}, "non-negative"),
        ([_stats(a=1.0)], _stats(a=1.0), {"stain_tolerance_deg": 200.0}, "from 0 to 180"),
        ([{"format_version": 99, "stats": {}}], _stats(a=1.0), {}, "upgrade bitro"),
    ],
)
def test_report_refuses_bad_input(train, slide, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bt.tl.domain_report(train, slide, **kwargs)


# --------------------------------------------------------------------------- statistics of real slides
def _preprocess(sdata):
    """Stain-normalise, segment and assign, as the benchmarks do (on a copy)."""
    sdata = _fresh(sdata)
    bt.pp.normalize_stains(sdata, method="macenko", seed=0)
    bt.pp.segment_cells(sdata, image_key="he_normalized", tile_size=512, seed=0)
    bt.pp.assign_cells(sdata)
    return sdata


@pytest.fixture(scope="module")
def synthetic():
    """Three training slides and one test slide of the same tissue, preprocessed, with their raw versions."""
    raw = bt.datasets.synthetic_tissue(4, size=900, technology="visium", seed=5)
    return raw, [_preprocess(s) for s in raw]


#: The synthetic slides are small (20 Visium spots): their medians vary by about ±15 % from slide to
#: slide, so the tests use a wider margin than the default.
TOLERANCE = 0.25


def _flags(train, slide) -> set[str]:
    train_stats = [bt.tl.domain_stats(s) for s in train]
    df = bt.tl.domain_report(train_stats, bt.tl.domain_stats(slide), tolerance=TOLERANCE)
    return set(df.index[df["outside"]])


def test_domain_stats_of_a_slide(synthetic):
    _, slides = synthetic
    stats = bt.tl.domain_stats(slides[0])
    assert json.loads(json.dumps(stats)) == stats
    s = stats["stats"]
    spots, cells = slides[0]["spots"], slides[0]["cells"]
    totals = np.asarray(spots.layers["counts"].sum(axis=1)).ravel()
    assert s["median_umi_per_spot"] == float(np.median(totals[totals > 0]))
    assert s["median_nuclei_per_spot"] == float(np.median(spots.obs["n_cells"]))
    assert s["median_nucleus_area_um2"] == pytest.approx(float(np.median(cells.obs["area_um2"])))
    assert s["median_nucleus_hematoxylin"] == pytest.approx(float(np.median(cells.obs["mean_hematoxylin"])))
    source = slides[0].attrs["bitro_stain"]["he_normalized"]["source"]
    assert s["stain_hematoxylin_od_r"] == source["stain_matrix"][0][0]
    assert s["stain_eosin_max_concentration"] == source["max_concentrations"][1]
    assert stats["context"]["n_cells"] == cells.n_obs and stats["context"]["stain_key"] == "he_normalized"
    # the truth the synthetic slide was made with: the segmented nuclei are about its nuclei
    truth = slides[0]["cells_truth"]
    assert 0.6 < s["median_nucleus_area_um2"] / float(np.median(truth.obs["area_um2"])) < 1.6


def test_an_unshifted_slide_is_not_flagged(synthetic):
    _, slides = synthetic
    assert _flags(slides[:3], slides[3]) == set()


def test_thinned_counts_flag_the_depth_only(synthetic):
    _, slides = synthetic
    shallow = bt.datasets.thin_counts(slides[3], fraction=0.1)
    assert _flags(slides[:3], shallow) == {"median_umi_per_spot"}


def test_a_rescaled_slide_flags_nucleus_size_and_count_not_depth(synthetic):
    raw, slides = synthetic
    bigger = _preprocess(bt.datasets.rescale(raw[3], 1.25))
    flags = _flags(slides[:3], bigger)
    assert {"median_nucleus_area_um2", "median_nuclei_per_spot"} <= flags
    assert not flags & {"median_umi_per_spot", "median_nucleus_hematoxylin"}
    before, after = bt.tl.domain_stats(slides[3])["stats"], bt.tl.domain_stats(bigger)["stats"]
    assert 1.25 < after["median_nucleus_area_um2"] / before["median_nucleus_area_um2"] < 1.9  # ≈ 1.25²
    assert after["median_nuclei_per_spot"] < before["median_nuclei_per_spot"]


def test_a_restained_slide_flags_the_stain_not_depth_or_density(synthetic):
    raw, slides = synthetic
    matrix = np.array([[0.45, 0.75, 0.49], [0.30, 0.80, 0.52]])
    reference = bt.pp.StainReference(
        "macenko",
        stain_matrix=matrix / np.linalg.norm(matrix, axis=1, keepdims=True),
        max_concentrations=[1.2, 0.6],
    )
    other_lab = _preprocess(bt.datasets.restain(raw[3], reference=reference))
    flags = _flags(slides[:3], other_lab)
    assert {"stain_hematoxylin_angle_deg", "stain_eosin_angle_deg"} & flags
    assert not flags & {"median_umi_per_spot", "median_nuclei_per_spot"}


def test_embedding_statistics_are_in_training_sd_units():
    slide = make_toy_slide(0)
    x = np.asarray(slide["cells"].obsm["X_bitro"])
    projection = bt.pp.FeatureProjection.fit([x], n_components=4, seed=0, use_rep="X_bitro")
    stats = bt.tl.domain_stats(slide, projection=projection, n_components=2)["stats"]
    assert set(stats) >= {
        "embedding_pc1_mean",
        "embedding_pc1_std",
        "embedding_pc2_mean",
        "embedding_pc2_std",
    }
    assert "embedding_pc3_mean" not in stats
    assert abs(stats["embedding_pc1_mean"]) < 1e-3 and stats["embedding_pc1_std"] == pytest.approx(
        1.0, abs=0.01
    )
    shifted = make_toy_slide(0)
    shifted["cells"].obsm["X_bitro"] = shifted["cells"].obsm["X_bitro"] + 3.0
    moved = bt.tl.domain_stats(shifted, projection=projection)["stats"]
    assert abs(moved["embedding_pc1_mean"]) > 0.5 or abs(moved["embedding_pc2_mean"]) > 0.5
    with pytest.raises(ValueError, match="use_rep"):
        bt.tl.domain_stats(slide, projection=projection, use_rep="X_other")


# --------------------------------------------------------------------------- per-slide standardisation
def test_a_model_on_slide_standardised_features_ignores_a_stain_like_offset():
    train = [make_toy_slide(s) for s in range(3)]
    test, shifted = make_toy_slide(7), make_toy_slide(7)
    shifted["cells"].obsm["X_bitro"] = shifted["cells"].obsm["X_bitro"] * 1.5 + 2.0
    bt.pp.standardize_features([*train, test, shifted])
    genes = list(train[0]["spots"].var_names)
    for use_rep, same in (("X_bitro_slide", True), ("X_bitro", False)):
        model = bt.tl.fit(train, model="ridge", genes=genes, target="raw", use_rep=use_rep, seed=0)
        a, b = model.predict_log1p(test)[1], model.predict_log1p(shifted)[1]
        keep = np.isfinite(a).all(axis=1)
        assert np.allclose(a[keep], b[keep], atol=1e-4) is same


def test_a_feature_nearly_constant_in_training_does_not_make_a_baseline_explode():
    # one feature channel is silent in the training cells except one; a held-out spot where it fires
    # at an ordinary level must get an ordinary prediction, not one far outside every training spot
    train = [make_toy_slide(s) for s in range(3)]
    for i, sdata in enumerate(train):
        x = np.asarray(sdata["cells"].obsm["X_bitro"], dtype=np.float32).copy()
        x[:, 0] = 0.0
        if i == 0:
            x[0, 0] = 0.01
        sdata["cells"].obsm["X_bitro"] = x
    test = make_toy_slide(7)
    x = np.asarray(test["cells"].obsm["X_bitro"], dtype=np.float32).copy()
    x[:, 0] = 0.0
    inside = np.flatnonzero(test["cells"].obs["spot_id"].astype(str).to_numpy() == "s0")
    x[inside, 0] = 1.0  # the cells of one spot fire at an ordinary feature level
    test["cells"].obsm["X_bitro"] = x
    genes = list(train[0]["spots"].var_names)
    for kind in ("ridge", "depth"):
        model = bt.tl.fit(train, model=kind, genes=genes, target="raw", seed=0)
        fitted = np.concatenate([model.predict_log1p(s)[1] for s in train])
        pred = model.predict_log1p(test)[1]
        spread = np.nanmax(fitted) - np.nanmin(fitted)
        assert np.nanmax(pred) < np.nanmax(fitted) + spread, kind
        assert np.nanmin(pred) > np.nanmin(fitted) - spread, kind
