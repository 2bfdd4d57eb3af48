"""Tests of bt.datasets.synthetic_tissue: truth consistency, predictiveness, reproducibility, I/O, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from bitro.datasets import synthetic_tissue


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


@pytest.fixture(scope="module")
def slide():
    return synthetic_tissue(size=(900, 800), seed=3)


@pytest.fixture(scope="module")
def visium():
    return synthetic_tissue(size=(900, 800), technology="visium", seed=3)


def test_elements_and_scale(slide):
    assert set(slide.images) == {"he"}
    assert set(slide.labels) == {"nuclei_truth"}
    assert set(slide.shapes) == {"cells_truth_shapes", "spots_shapes"}
    assert set(slide.tables) == {"cells_truth", "spots", "bulk"}
    img = np.asarray(slide["he"])
    assert img.shape == (3, 900, 800) and img.dtype == np.uint8
    assert slide.attrs["bitro_scale"] == {
        "mpp": 0.5,
        "spot_diameter_um": 100.0,
        "spot_spacing_um": 200.0,
        "technology": "ST",
        "sample_id": "synthetic_0",
    }
    meta = slide.attrs["bitro_synthetic"]
    assert meta["seed"] == 3 and meta["slide"] == 0 and meta["params"]["size"] == [900, 800]
    for key in ("cells_truth", "spots", "bulk"):
        assert slide[key].uns["bitro_synthetic"]["seed"] == 3
    cells = slide["cells_truth"]
    assert cells.n_obs > 200 and cells.n_vars == 200
    assert list(cells.obs["cell_type"].cat.categories) == meta["cell_types"]
    assert np.array_equal(_dense(cells.X), _dense(cells.layers["counts"]))
    counts = _dense(cells.X)
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0


def test_image_has_glass_stroma_and_dark_nuclei(slide):
    img = np.asarray(slide["he"]).astype(float)
    labels = np.asarray(slide["nuclei_truth"])
    grey = img.mean(axis=0)
    background = grey[labels == 0]
    # nuclei are much darker than their surroundings, and red dominates green in the (pink) stroma
    assert grey[labels > 0].mean() < background.mean() - 40
    assert (img[0][labels == 0] - img[1][labels == 0]).mean() > 20
    # some glass: bright, nearly grey pixels, as much as the recorded glass fraction
    glass = (img.min(axis=0) > 225).mean()
    assert 0.02 < glass < 0.35
    assert abs(glass - slide.attrs["bitro_synthetic"]["glass_fraction"]) < 0.08


def test_labels_match_cells(slide):
    cells = slide["cells_truth"]
    labels = np.asarray(slide["nuclei_truth"])
    assert labels.dtype == np.uint32
    ids = np.unique(labels)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, cells.n_obs + 1))
    assert list(cells.obs_names[:3]) == ["cell_1", "cell_2", "cell_3"]
    xy = cells.obsm["spatial"]
    rows, cols = np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)
    hit = labels[rows, cols] == np.arange(1, cells.n_obs + 1)
    assert hit.mean() > 0.97
    # area recorded in µm² equals the labelled pixels × mpp²
    n_px = np.bincount(labels.ravel(), minlength=cells.n_obs + 1)[1:]
    assert np.allclose(cells.obs["area_um2"].to_numpy(), n_px * 0.25)
    # the polygon outlines enclose their centroids and have about the labelled area
    shapes = slide.shapes["cells_truth_shapes"]
    assert list(shapes.index) == list(cells.obs_names)
    poly_area = shapes.geometry.area.to_numpy()
    assert np.median(np.abs(poly_area - n_px) / n_px) < 0.15


def test_nuclei_are_realistic_size_and_rarely_touch(slide):
    cells = slide["cells_truth"]
    diameter = 2 * np.sqrt(cells.obs["area_um2"].to_numpy() / np.pi)
    assert np.percentile(diameter, 5) > 4.0 and np.percentile(diameter, 95) < 14.0
    from scipy import ndimage

    labels = np.asarray(slide["nuclei_truth"])
    # no two nuclei share a border: a dilated nucleus meets no other label
    grown = ndimage.grey_dilation(labels, size=3)
    touching = (labels > 0) & (grown != labels)
    assert touching.sum() == 0


def test_spot_counts_are_sums_of_their_cells(slide):
    cells, spots = slide["cells_truth"], slide["spots"]
    assert spots.n_obs > 0 and list(spots.var_names) == list(cells.var_names)
    counts = _dense(cells.layers["counts"])
    spot_id = cells.obs["spot_id"]
    expected = np.zeros((spots.n_obs, cells.n_vars))
    n_cells = np.zeros(spots.n_obs, dtype=int)
    pos = spots.obs_names.get_indexer(spot_id.astype(object).dropna())
    assert (pos >= 0).all()
    np.add.at(expected, pos, counts[spot_id.notna().to_numpy()])
    np.add.at(n_cells, pos, 1)
    assert np.array_equal(_dense(spots.layers["counts"]), expected)
    assert np.array_equal(_dense(spots.X), expected)
    assert np.array_equal(spots.obs["n_cells_truth"].to_numpy(), n_cells)
    # membership is geometric: centroid within the spot radius
    radius = 100.0 / 2 / 0.5
    inside = spot_id.notna().to_numpy()
    d = np.hypot(*(cells.obsm["spatial"][inside] - spots.obsm["spatial"][pos]).T)
    assert (d <= radius).all()
    all_d = np.hypot(
        *(cells.obsm["spatial"][~inside, None, :] - spots.obsm["spatial"][None]).transpose(2, 0, 1)
    )
    assert (all_d > radius).all()


def test_spots_inside_image_and_shapes_linked(slide, visium):
    for sdata in (slide, visium):
        spots = sdata["spots"]
        h, w = 900, 800
        r = sdata.attrs["bitro_scale"]["spot_diameter_um"] / 2 / 0.5
        xy = spots.obsm["spatial"]
        assert ((xy[:, 0] - r >= -1e-6) & (xy[:, 0] + r <= w - 1 + 1e-6)).all()
        assert ((xy[:, 1] - r >= -1e-6) & (xy[:, 1] + r <= h - 1 + 1e-6)).all()
        shapes = sdata.shapes["spots_shapes"]
        assert list(shapes.index) == list(spots.obs_names)
        assert np.allclose(shapes["radius"], r)
        assert spots.uns["spatialdata_attrs"]["region"] == "spots_shapes"
        assert list(spots.obs["instance_id"]) == list(spots.obs_names)


def test_visium_has_more_smaller_spots(slide, visium):
    assert visium["spots"].n_obs > 2 * slide["spots"].n_obs
    assert visium.attrs["bitro_scale"]["spot_diameter_um"] == 55.0
    assert visium.attrs["bitro_scale"]["technology"] == "Visium"
    assert visium.shapes["spots_shapes"]["radius"].iloc[0] < slide.shapes["spots_shapes"]["radius"].iloc[0]
    # hexagonal grid: neighbouring centres 100 µm = 200 px apart
    from scipy.spatial import cKDTree

    d, _ = cKDTree(visium["spots"].obsm["spatial"]).query(visium["spots"].obsm["spatial"], k=2)
    assert np.allclose(d[:, 1], 200.0)


def test_bulk_is_sum_of_cells(slide):
    bulk, cells = slide["bulk"], slide["cells_truth"]
    assert bulk.obs_names.tolist() == ["synthetic_0"]
    total = _dense(cells.layers["counts"]).sum(axis=0)
    assert np.allclose(_dense(bulk.layers["counts"])[0], total)
    tpm = _dense(bulk.X)[0]
    assert np.isclose(tpm.sum(), 1e6, rtol=1e-4)
    assert np.allclose(tpm, total / total.sum() * 1e6, rtol=1e-4)


def test_morphology_predicts_type(slide):
    cells = slide["cells_truth"]
    labels = np.asarray(slide["nuclei_truth"])
    grey = np.asarray(slide["he"]).astype(float).mean(axis=0)
    darkness = np.bincount(labels.ravel(), weights=grey.ravel(), minlength=cells.n_obs + 1)[1:]
    darkness /= np.bincount(labels.ravel(), minlength=cells.n_obs + 1)[1:]
    shapes = slide.shapes["cells_truth_shapes"].geometry
    roundness = (4 * np.pi * shapes.area / shapes.length**2).to_numpy()
    df = pd.DataFrame(
        {"type": cells.obs["cell_type"], "area": cells.obs["area_um2"], "grey": darkness, "round": roundness}
    )
    means = df.groupby("type", observed=True).mean()
    # tumour nuclei are large and pale, lymphocytes small and dark, fibroblasts elongated
    assert means.loc["tumour", "area"] > 1.8 * means.loc["lymphocyte", "area"]
    assert means.loc["lymphocyte", "grey"] < means.loc["tumour", "grey"] - 30
    assert means.loc["fibroblast", "round"] < means.loc["lymphocyte", "round"] - 0.2
    # every pair of types differs clearly in mean area, darkness or roundness
    types = means.index.tolist()
    assert len(types) == 5
    for i, a in enumerate(types):
        for b in types[i + 1 :]:
            rel_area = abs(means.loc[a, "area"] - means.loc[b, "area"]) / means.loc[[a, b], "area"].min()
            d_grey = abs(means.loc[a, "grey"] - means.loc[b, "grey"])
            d_round = abs(means.loc[a, "round"] - means.loc[b, "round"])
            assert rel_area > 0.1 or d_grey > 10 or d_round > 0.1, (a, b)


def test_expression_differs_by_type(slide):
    cells = slide["cells_truth"]
    markers = slide.attrs["bitro_synthetic"]["markers"]
    counts = pd.DataFrame(_dense(cells.layers["counts"]), columns=cells.var_names)
    by_type = counts.groupby(cells.obs["cell_type"].to_numpy()).mean()
    for cell_type, genes in markers.items():
        own = by_type.loc[cell_type, genes].mean()
        others = by_type.drop(index=cell_type)[genes].mean(axis=1).max()
        assert own > 4 * others, cell_type
        assert (cells.var.loc[genes, "marker_of"] == cell_type).all()
    assert "EPCAM" in markers["tumour"] and "PTPRC" in markers["lymphocyte"]


def test_expression_scales_with_nucleus_size(slide):
    from scipy.stats import spearmanr

    obs = slide["cells_truth"].obs
    for cell_type in ("tumour", "lymphocyte"):
        sub = obs[obs["cell_type"] == cell_type]
        assert spearmanr(sub["area_um2"], sub["total_counts"])[0] > 0.15, cell_type


def test_reproducible_and_seed_dependent():
    a = synthetic_tissue(size=600, seed=11)
    b = synthetic_tissue(size=600, seed=11)
    c = synthetic_tissue(size=600, seed=12)
    assert np.array_equal(np.asarray(a["he"]), np.asarray(b["he"]))
    assert np.array_equal(_dense(a["spots"].X), _dense(b["spots"].X))
    assert np.array_equal(_dense(a["cells_truth"].X), _dense(b["cells_truth"].X))
    assert not np.array_equal(np.asarray(a["he"]), np.asarray(c["he"]))
    assert a["cells_truth"].n_obs != c["cells_truth"].n_obs or not np.array_equal(
        a["cells_truth"].obsm["spatial"], c["cells_truth"].obsm["spatial"]
    )


def test_several_slides_share_profiles_and_differ_in_layout():
    slides = synthetic_tissue(3, size=600, n_genes=60, n_cell_types=7, seed=5)
    assert isinstance(slides, list) and len(slides) == 3
    assert [s.attrs["bitro_synthetic"]["slide"] for s in slides] == [0, 1, 2]
    assert [s["bulk"].obs_names[0] for s in slides] == ["synthetic_0", "synthetic_1", "synthetic_2"]
    names = [list(s["cells_truth"].var_names) for s in slides]
    assert names[0] == names[1] == names[2] and len(names[0]) == 60
    assert slides[0].attrs["bitro_synthetic"]["markers"] == slides[2].attrs["bitro_synthetic"]["markers"]
    assert slides[0].attrs["bitro_synthetic"]["cell_types"][-1] == "type6"
    assert not np.array_equal(np.asarray(slides[0]["he"]), np.asarray(slides[1]["he"]))
    # slide i depends on the seed and i only, not on how many slides were asked for
    first = synthetic_tissue(1, size=600, n_genes=60, n_cell_types=7, seed=5)
    assert np.array_equal(np.asarray(first["he"]), np.asarray(slides[0]["he"]))


def test_validates_and_round_trips(slide, tmp_path):
    import spatialdata as sd

    path = tmp_path / "x.zarr"
    slide.write(path)
    back = sd.read_zarr(path)
    assert back.attrs["bitro_scale"] == slide.attrs["bitro_scale"]
    assert back.attrs["bitro_synthetic"] == slide.attrs["bitro_synthetic"]
    assert np.array_equal(np.asarray(back["nuclei_truth"]), np.asarray(slide["nuclei_truth"]))
    assert np.array_equal(_dense(back["spots"].layers["counts"]), _dense(slide["spots"].layers["counts"]))
    assert back["cells_truth"].obs["cell_type"].equals(slide["cells_truth"].obs["cell_type"])
    assert back["cells_truth"].obs["spot_id"].isna().sum() == slide["cells_truth"].obs["spot_id"].isna().sum()
    assert back["bulk"].obs_names.tolist() == ["synthetic_0"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_slides": 0}, "n_slides"),
        ({"technology": "xenium"}, "technology"),
        ({"size": 150}, "too small"),
        ({"size": (1000, 100)}, "too small"),
        ({"size": 400, "technology": "visium", "mpp": 2.5}, "mpp"),
        ({"n_genes": 3}, "n_genes"),
        ({"n_cell_types": 0}, "n_cell_types"),
        ({"size": "big"}, "size"),
        ({"mixing": -0.1}, "mixing"),
        ({"mixing": 1.5}, "mixing"),
        ({"mixing": "high"}, "mixing"),
        ({"domain_size_um": 5.0}, "domain_size_um"),
        ({"domain_size_um": True}, "domain_size_um"),
        ({"composition_sd": -0.5}, "composition_sd"),
        ({"composition_sd": 4.0}, "composition_sd"),
        ({"composition_sd": "wide"}, "composition_sd"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_tissue(**kwargs)


def test_small_pixel_size_keeps_physical_sizes():
    sdata = synthetic_tissue(size=500, mpp=0.25, technology="visium", seed=2)
    cells = sdata["cells_truth"]
    diameter = 2 * np.sqrt(cells.obs["area_um2"].to_numpy() / np.pi)
    assert 5.0 < np.median(diameter) < 11.0
    assert np.isclose(sdata.shapes["spots_shapes"]["radius"].iloc[0], 55 / 2 / 0.25)


def test_smallest_image_still_has_cells_and_a_spot():
    for seed in range(8):
        sdata = synthetic_tissue(size=30, technology="visium", mpp=2.0, seed=seed)
        assert sdata["cells_truth"].n_obs >= 1 and sdata["spots"].n_obs == 1
        assert np.asarray(sdata["nuclei_truth"]).max() == sdata["cells_truth"].n_obs


def test_full_size_slide():
    sdata = synthetic_tissue(size=2000, seed=0)
    cells = sdata["cells_truth"]
    assert np.asarray(sdata["he"]).shape == (3, 2000, 2000)
    # about 1 mm² of tissue at 0.5 µm/px: thousands of nuclei, 25 ST spots (5 × 5)
    assert 1500 < cells.n_obs < 20000
    assert sdata["spots"].n_obs == 25
    assert sdata["spots"].obs["n_cells_truth"].sum() == cells.obs["spot_id"].notna().sum()


def _types_per_spot(sdata) -> float:
    """Mean number of distinct true cell types among the cells of a spot."""
    obs = sdata["cells_truth"].obs
    inside = obs[obs["spot_id"].notna()]
    return float(inside.groupby("spot_id", observed=True)["cell_type"].nunique().mean())


def test_mixing_and_domain_size_set_how_many_types_share_a_spot():
    kw = {"size": 1000, "technology": "visium", "n_genes": 10, "seed": 0}
    low, high = synthetic_tissue(mixing=0.0, **kw), synthetic_tissue(mixing=0.9, **kw)
    assert _types_per_spot(high) > _types_per_spot(low) + 1.0
    small, large = (synthetic_tissue(mixing=0.0, domain_size_um=d, **kw) for d in (30.0, 400.0))
    assert _types_per_spot(small) > _types_per_spot(large) + 0.3
    # no mixing and domains far larger than a spot: nearly every spot holds one type
    assert _types_per_spot(large) < 1.5
    assert high.attrs["bitro_synthetic"]["params"]["mixing"] == 0.9
    assert small.attrs["bitro_synthetic"]["params"]["domain_size_um"] == 30.0
    # the knobs change where the types are, not what a type looks like or expresses
    assert high.attrs["bitro_synthetic"]["markers"] == low.attrs["bitro_synthetic"]["markers"]


def test_default_knobs_are_recorded_and_change_nothing():
    default = synthetic_tissue(size=500, technology="visium", n_genes=10, seed=4)
    explicit = synthetic_tissue(
        size=500, technology="visium", n_genes=10, seed=4, mixing=0.06, domain_size_um=110
    )
    assert default.attrs["bitro_synthetic"]["params"]["mixing"] == 0.06
    assert default.attrs["bitro_synthetic"]["params"]["domain_size_um"] == 110.0
    assert np.array_equal(np.asarray(default["he"]), np.asarray(explicit["he"]))
    other = synthetic_tissue(size=500, technology="visium", n_genes=10, seed=4, mixing=0.5)
    assert not np.array_equal(
        default["cells_truth"].obs["cell_type"].to_numpy(), other["cells_truth"].obs["cell_type"].to_numpy()
    )


def _type_shares(sdata) -> pd.Series:
    return sdata["cells_truth"].obs["cell_type"].value_counts(normalize=True).sort_index()


def test_composition_sd_moves_each_slides_type_shares_with_its_weights():
    kw = {"size": 800, "n_genes": 10, "seed": 5}
    same = synthetic_tissue(2, **kw)
    plain = synthetic_tissue(2, composition_sd=0.0, **kw)
    shifted = synthetic_tissue(2, composition_sd=1.5, **kw)
    for a, b in zip(same, plain):  # 0 draws nothing: the slides are the ones without the knob
        assert np.array_equal(np.asarray(a["he"]), np.asarray(b["he"]))
        assert a.attrs["bitro_synthetic"]["type_weights"] == [1.0] * 5
    for base, slide in zip(plain, shifted):
        weights = np.log(slide.attrs["bitro_synthetic"]["type_weights"])
        assert slide.attrs["bitro_synthetic"]["params"]["composition_sd"] == 1.5
        assert weights.std() > 0.3
        # a type weighted up takes a larger share of the slide than it has on the same layout without weights
        change = np.log(_type_shares(slide) + 1e-3) - np.log(_type_shares(base) + 1e-3)
        assert np.corrcoef(weights, change.to_numpy())[0, 1] > 0.7
        # appearance and expression of the types are shared: only the composition moves
        assert slide.attrs["bitro_synthetic"]["markers"] == base.attrs["bitro_synthetic"]["markers"]
