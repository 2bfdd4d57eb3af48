"""Tests of bt.pp.embed_cells (bitro.pp._embed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bitro as bt

PINK = (235, 190, 215)


def make_cells_sdata(
    image: np.ndarray,
    centres_xy: np.ndarray,
    radii_px: np.ndarray | float,
    *,
    mpp: float = 0.5,
    scale_factors: list[int] | None = None,
):
    """SpatialData as bt.pp.segment_cells writes it: image "he", table "cells" linked to "cells_shapes"."""
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    from shapely.geometry import Point

    from bitro.io._build import image_element, polygons_element, set_scale, table_element

    centres_xy = np.asarray(centres_xy, dtype=float)
    radii = np.broadcast_to(np.asarray(radii_px, dtype=float), (len(centres_xy),))
    names = [f"cell_{i}" for i in range(len(centres_xy))]
    polygons = [Point(x, y).buffer(r, 32) for (x, y), r in zip(centres_xy, radii)]
    adata = ad.AnnData(obs=pd.DataFrame(index=names), obsm={"spatial": centres_xy.copy()})
    sdata = sd.SpatialData(
        images={"he": image_element(image, dims=("y", "x", "c"), scale_factors=scale_factors, chunks=256)},
        shapes={"cells_shapes": polygons_element(polygons, names)},
        tables={"cells": table_element(adata, region="cells_shapes")},
    )
    set_scale(sdata, mpp=mpp)
    return sdata


def draw_discs(shape, centres_xy, radii_px, colours, *, background=PINK, noise=6.0, seed=0) -> np.ndarray:
    """Pink background with coloured discs (nuclei) and a little noise; (h, w, 3) uint8."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    img = np.empty((*shape, 3), dtype=np.float64)
    img[:] = background
    for (x, y), r, c in zip(centres_xy, np.broadcast_to(radii_px, (len(centres_xy),)), colours):
        rr, cc = disk((y, x), r, shape=shape)
        img[rr, cc] = c
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def mean_rgb(crops: np.ndarray) -> np.ndarray:
    return crops.reshape(len(crops), -1, 3).mean(1)


@pytest.fixture
def small_sdata():
    rng = np.random.default_rng(0)
    xy = rng.uniform(20, 236, (12, 2))
    img = draw_discs((256, 256), xy, 6, [(90, 50, 140)] * 12)
    return make_cells_sdata(img, xy, 6)


# ------------------------------------------------------------------ the level test
def _gradient_image(h: int, w: int) -> np.ndarray:
    """Red encodes x, green encodes y, blue is a constant 60 (white padding would raise it)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return (
        np.stack([xx / (w - 1) * 250, yy / (h - 1) * 250, np.full((h, w), 60.0)], -1).round().astype(np.uint8)
    )


def test_crop_at_level_1_reads_level_coordinates():
    h, w = 600, 800
    img = _gradient_image(h, w)
    xy = np.array([[20, 20], [400, 300], [780, 20], [20, 580], [700, 500], [785, 585], [790, 590]], float)
    sdata = make_cells_sdata(img, xy, 4, mpp=0.5, scale_factors=[2])
    # level 1: 1 µm/px, so a 4 µm crop is 4 x 4 level-1 px around centroid / 2
    bt.pp.embed_cells(sdata, encoder=mean_rgb, mode="crop", crop_um=4.0, level=1, key_added="rgb")
    got = sdata["cells"].obsm["rgb"]
    expected = img[xy[:, 1].astype(int), xy[:, 0].astype(int)].astype(float)
    assert np.abs(got[:, :2] - expected[:, :2]).max() < 6  # colour at the cell's own location
    np.testing.assert_allclose(got[:, 2], 60, atol=1)  # no padding, no black
    assert sdata["cells"].uns["rgb"]["params"]["level"] == 1
    assert sdata["cells"].uns["rgb"]["params"]["crop_px"] == pytest.approx(4.0)


def test_crop_outside_image_is_padded_white():
    img = _gradient_image(200, 200)
    sdata = make_cells_sdata(img, np.array([[0.0, 0.0], [100.0, 100.0]]), 3)
    bt.pp.embed_cells(sdata, encoder=mean_rgb, mode="crop", crop_um=10.0, key_added="rgb")  # 20 px crops
    blue = sdata["cells"].obsm["rgb"][:, 2]
    inside = (11 / 20) ** 2  # pixels -9..10 around the centre pixel 0: 11 of 20 rows and columns inside
    assert blue[0] == pytest.approx(inside * 60 + (1 - inside) * 255, abs=2)
    assert blue[1] == pytest.approx(60, abs=0.5)


# ------------------------------------------------------------------ placement, determinism, errors
def test_key_placement_shape_and_provenance(small_sdata):
    bt.pp.embed_cells(small_sdata, encoder=mean_rgb, mode="crop", key_added="X_test")
    table = small_sdata["cells"]
    assert table.obsm["X_test"].shape == (12, 3)
    assert table.obsm["X_test"].dtype == np.float32
    prov = table.uns["X_test"]
    assert prov["encoder"] == "mean_rgb" and prov["dim"] == 3 and prov["bitro_version"] == bt.__version__
    assert prov["params"]["mode"] == "crop" and prov["params"]["crop_um"] == 33.0
    assert "X_bitro" not in table.obsm


def test_existing_key_needs_overwrite(small_sdata):
    bt.pp.embed_cells(small_sdata, encoder=mean_rgb, mode="crop")
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.pp.embed_cells(small_sdata, encoder=mean_rgb, mode="crop")
    bt.pp.embed_cells(small_sdata, encoder=lambda c: mean_rgb(c)[:, :1], mode="crop", overwrite=True)
    assert small_sdata["cells"].obsm["X_bitro"].shape == (12, 1)


def test_missing_cells_table_says_run_segment_cells(small_sdata):
    del small_sdata.tables["cells"]
    with pytest.raises(KeyError, match=r"bt\.pp\.segment_cells"):
        bt.pp.embed_cells(small_sdata, encoder=mean_rgb)


def test_an_empty_cells_table_says_segmentation_found_nothing():
    """After segment_cells found no nuclei, embed_cells explains that instead of asking to run it."""
    import spatialdata as sd

    from bitro.io._build import image_element, set_scale

    blank = sd.SpatialData(
        images={"he": image_element(np.full((200, 200, 3), 240, np.uint8), dims=("y", "x", "c"))}
    )
    set_scale(blank, mpp=0.5)
    bt.pp.segment_cells(blank)
    assert blank["cells"].n_obs == 0
    for encoder in ("morphology", mean_rgb):
        with pytest.raises(
            ValueError,
            match=r"'cells' has 0 cells: bt.pp.segment_cells \(method 'watershed'\) found no cells",
        ) as err:
            bt.pp.embed_cells(blank, encoder=encoder, mode="crop")
        assert "run it first" not in str(err.value) and "µm per pixel" in str(err.value)


def test_unknown_encoder_lists_registered(small_sdata):
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        bt.pp.embed_cells(small_sdata, encoder="resnet9000")


def test_callable_cannot_run_in_tile_mode(small_sdata):
    with pytest.raises(ValueError, match="mode='crop'"):
        bt.pp.embed_cells(small_sdata, encoder=mean_rgb, mode="tile")


def test_checkpoint_mismatch_is_a_clear_error(small_sdata, tmp_path, monkeypatch):
    from transformers import Dinov2Config, Dinov2Model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = dict(num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    torch.save(
        Dinov2Model(Dinov2Config(hidden_size=16, intermediate_size=32, **small)).state_dict(),
        tmp_path / "w.pt",
    )
    Dinov2Config(hidden_size=24, intermediate_size=48, **small).to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="does not match the architecture"):
        bt.pp.embed_cells(small_sdata, encoder=f"vit:{tmp_path / 'w.pt'}")
    assert "X_bitro" not in small_sdata["cells"].obsm


class _Pool4(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 4)


def test_module_tile_mode_is_deterministic_and_local(small_sdata):
    kwargs = {
        "encoder": _Pool4(),
        "mode": "tile",
        "tile_size": 128,
        "crop_um": 2.0,
        "seed": 0,
        "context_um": None,
    }
    bt.pp.embed_cells(small_sdata, key_added="a", **kwargs)
    bt.pp.embed_cells(small_sdata, key_added="b", **kwargs)
    a, b = small_sdata["cells"].obsm["a"], small_sdata["cells"].obsm["b"]
    np.testing.assert_array_equal(a, b)
    # a 4-px window (one stride) inside each purple (90, 50, 140) nucleus of radius 6 px sees only the nucleus colour
    np.testing.assert_allclose(a * 255, np.tile([90, 50, 140], (12, 1)), atol=8)


def test_context_windows_append_the_neighbourhood_after_the_cell(small_sdata):
    kwargs = {"encoder": _Pool4(), "mode": "tile", "tile_size": 128, "crop_um": 2.0, "seed": 0}
    bt.pp.embed_cells(small_sdata, key_added="cell", context_um=None, **kwargs)
    bt.pp.embed_cells(small_sdata, key_added="ctx", context_um=[20.0, 40.0], **kwargs)
    cells = small_sdata["cells"]
    cell, ctx = cells.obsm["cell"], cells.obsm["ctx"]
    assert ctx.shape == (12, 9)
    assert [b["name"] for b in cells.uns["ctx"]["blocks"]] == ["cell_2um", "context_20um", "context_40um"]
    assert cells.uns["ctx"]["params"]["context_um"] == [20.0, 40.0]
    # the cell block still sees the purple (90, 50, 140) nucleus; the context blocks mostly the pink (235, 190, 215)
    np.testing.assert_allclose(ctx[:, :3], cell, atol=8 / 255)
    green_cell, green_20, green_40 = ctx[:, 1] * 255, ctx[:, 4] * 255, ctx[:, 7] * 255
    assert np.all(green_20 > green_cell + 60) and np.all(green_20 < 200)
    assert np.all(green_40 > green_20)  # less of the nucleus in the larger window


def test_crop_mode_appends_context_from_a_tile_pass(small_sdata, tmp_path):
    tile = {"encoder": _Pool4(), "tile_size": 128, "context_um": [20.0], "seed": 0}
    bt.pp.embed_cells(small_sdata, key_added="tile", mode="tile", crop_um=2.0, **tile)
    scratch = tmp_path / "scratch"
    bt.pp.embed_cells(small_sdata, key_added="crop", mode="crop", crop_um=4.0, scratch_dir=scratch, **tile)
    cells = small_sdata["cells"]
    crop, ctx = cells.obsm["crop"], cells.obsm["tile"]
    assert crop.shape == (12, 6) and [b["name"] for b in cells.uns["crop"]["blocks"]] == [
        "cell_4um",
        "context_20um",
    ]
    np.testing.assert_allclose(
        crop[:, :3] * 255, np.tile([90, 50, 140], (12, 1)), atol=8
    )  # the crop: the nucleus
    np.testing.assert_allclose(crop[:, 3:], ctx[:, 3:], atol=2 / 255)  # the same neighbourhood as tile mode
    assert not scratch.exists()  # both steps' scratch files (and the context subfolder) cleaned up


def test_tile_mpp_runs_the_tile_pass_at_another_magnification(small_sdata):
    mpp = bt.io.get_mpp(small_sdata)
    kwargs = {
        "encoder": _Pool4(),
        "mode": "tile",
        "tile_size": 128,
        "crop_um": 2.0,
        "context_um": [20.0],
        "seed": 0,
    }
    bt.pp.embed_cells(small_sdata, key_added="native", **kwargs)
    bt.pp.embed_cells(small_sdata, key_added="same", tile_mpp=mpp, **kwargs)
    bt.pp.embed_cells(small_sdata, key_added="fine", tile_mpp=mpp / 2, **kwargs)
    cells = small_sdata["cells"]
    native, same, fine = (cells.obsm[k] for k in ("native", "same", "fine"))
    np.testing.assert_array_equal(native, same)  # the slide's own scale: nothing resampled
    assert not np.array_equal(native, fine)
    # twice the magnification: the 2 µm cell window still sees the purple (90, 50, 140) nucleus, and the
    # 20 µm neighbourhood covers the same tissue, so its mean colour stays close
    np.testing.assert_allclose(fine[:, :3] * 255, np.tile([90, 50, 140], (12, 1)), atol=8)
    np.testing.assert_allclose(fine[:, 3:], native[:, 3:], atol=6 / 255)
    assert cells.uns["fine"]["tile_mpp"] == cells.uns["fine"]["params"]["tile_mpp"] == mpp / 2
    assert "tile_mpp" not in cells.uns["native"]
    for bad in (0, -0.25, "fine", True):
        with pytest.raises(ValueError, match="tile_mpp"):
            bt.pp.embed_cells(small_sdata, key_added="bad", tile_mpp=bad, **kwargs)
    # no tile pass to set: crop mode without context
    with pytest.raises(ValueError, match="tile_mpp sets the magnification of a tile pass"):
        bt.pp.embed_cells(
            small_sdata, key_added="bad", tile_mpp=mpp, **{**kwargs, "mode": "crop", "context_um": None}
        )
    assert "bad" not in cells.obsm


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "crop", "encoder": mean_rgb, "context_um": 50.0}, "feature map"),
        ({"mode": "tile", "encoder": "morphology", "context_um": 50.0}, "feature map"),
        ({"mode": "tile", "encoder": _Pool4(), "crop_um": 33.0, "context_um": 20.0}, "larger than crop_um"),
        ({"mode": "tile", "encoder": _Pool4(), "context_um": "wide"}, "list of numbers"),
    ],
)
def test_bad_context_windows_are_refused(small_sdata, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bt.pp.embed_cells(small_sdata, key_added="bad", **kwargs)
    assert "bad" not in small_sdata["cells"].obsm


def test_window_pooling_interpolates_a_linear_map():
    from bitro.pp._embed_tasks import pool_windows as _pool_windows

    stride, gw = 8, 10
    fmap = np.broadcast_to(np.arange(gw, dtype=float), (2, 6, gw)).copy()  # value = cell column
    fmap[1] *= -1
    pos = np.array([[15.5, 20.0], [20.0, 20.0], [44.25, 20.0]])  # pixel x = 15.5 is the centre of cell 1
    expected = (pos[:, 0] - (stride - 1) / 2) / stride
    for window in (1.0, 8.0, 24.0):  # bilinear, one stride, three strides: all exact on a ramp
        got = _pool_windows(fmap, pos, stride=stride, window=window)
        np.testing.assert_allclose(got[:, 0], expected, atol=1e-6)
        np.testing.assert_allclose(got[:, 1], -expected, atol=1e-6)


# ------------------------------------------------------------------ morphology (known answers)
def test_morphology_separates_big_pale_from_small_dark():
    mpp, spacing_um = 0.5, 20.0
    gx, gy = np.meshgrid(np.arange(6), np.arange(6))
    xy = np.stack([gx.ravel(), gy.ravel()], 1) * spacing_um / mpp + 40.0
    big = ((gx + gy).ravel() % 2) == 0
    radii_um = np.where(big, 6.0, 3.0)
    colours = [(175, 130, 195) if b else (60, 30, 105) for b in big]
    img = draw_discs((300, 300), xy, radii_um / mpp, colours, noise=3.0)
    sdata = make_cells_sdata(img, xy, radii_um / mpp, mpp=mpp)
    bt.pp.embed_cells(sdata, encoder="morphology", tile_size=128)
    table = sdata["cells"]
    feats = table.obsm["X_bitro"]
    names = table.uns["X_bitro"]["feature_names"]
    col = {n: feats[:, i] for i, n in enumerate(names)}
    assert feats.shape == (36, len(names)) and np.isfinite(feats).all()
    np.testing.assert_allclose(col["area_um2"], np.pi * radii_um**2, rtol=0.12)
    np.testing.assert_allclose(col["major_axis_um"], 2 * radii_um, rtol=0.12)
    assert np.all(col["eccentricity"] < 0.4) and np.all(col["solidity"] > 0.9)
    assert col["h_mean"][~big].min() > col["h_mean"][big].max()  # small dark nuclei carry more hematoxylin
    assert (
        np.abs(col["h_ring_mean"] - col["h_ring_mean"].mean()).max() < 0.02
    )  # rings are all pink background
    # density within 25 µm on a 20 µm grid: 4 neighbours inside, 3 on an edge, 2 in a corner
    inner = (gx.ravel() % 5 != 0) & (gy.ravel() % 5 != 0)
    corner = (gx.ravel() % 5 == 0) & (gy.ravel() % 5 == 0)
    assert np.all(col["density_25um"][inner] == 4) and np.all(col["density_25um"][corner] == 2)


# ------------------------------------------------------------------ efficientnet crop vs tile
@pytest.fixture(scope="module")
def effnet_runs():
    rng = np.random.default_rng(0)
    n, mpp = 20, 33.0 / 224  # a 33 µm crop is then 224 px: crop and tile mode see the same scale
    xy = rng.uniform(40, 472, (n, 2))
    radii = rng.uniform(12, 40, n)
    colours = [tuple(rng.integers(30, 200, 3)) for _ in range(n)]
    sdata = make_cells_sdata(draw_discs((512, 512), xy, radii, colours), xy, radii, mpp=mpp)
    for mode in ("crop", "tile"):  # the nucleus windows alone
        bt.pp.embed_cells(sdata, mode=mode, key_added=mode, batch_size=32, device="cpu", context_um=None)
    bt.pp.embed_cells(sdata, mode="tile", key_added="tile_again", device="cpu", context_um=None)
    bt.pp.embed_cells(sdata, key_added="default", device="cpu")  # tile mode with the neighbourhood
    return sdata["cells"]


def test_efficientnet_shapes_and_provenance(effnet_runs):
    for key in ("crop", "tile"):
        x = effnet_runs.obsm[key]
        assert x.shape == (20, 1280) and x.dtype == np.float32 and np.isfinite(x).all()
        prov = effnet_runs.uns[key]
        assert prov["encoder"] == "efficientnet_lite0" and prov["params"]["mode"] == key
        assert len(prov["checkpoint_sha256"]) == 64
    np.testing.assert_array_equal(effnet_runs.obsm["tile"], effnet_runs.obsm["tile_again"])
    from bitro.pp._embed import DEFAULT_CONTEXT_UM

    default = effnet_runs.obsm["default"]
    assert default.shape == (20, 1280 * (1 + len(DEFAULT_CONTEXT_UM)))
    assert effnet_runs.uns["default"]["context_um"] == list(DEFAULT_CONTEXT_UM)
    assert [b["stop"] for b in effnet_runs.uns["default"]["blocks"]][-1] == default.shape[1]
    # the nucleus block is the tile block read with a wider margin: the same features up to border effects
    cos = np.sum(default[:, :1280] * effnet_runs.obsm["tile"], 1) / (
        np.linalg.norm(default[:, :1280], axis=1) * np.linalg.norm(effnet_runs.obsm["tile"], axis=1)
    )
    assert cos.min() > 0.9


def test_efficientnet_tile_and_crop_features_agree(effnet_runs):
    crop, tile = effnet_runs.obsm["crop"], effnet_runs.obsm["tile"]
    c = crop - crop.mean(0)
    t = tile - tile.mean(0)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    sim = t @ c.T  # cell × cell cosine similarity of centred features
    own, other = np.diag(sim), sim[~np.eye(len(sim), dtype=bool)]
    assert own.mean() > 0.4  # measured 0.56 (other cells: -0.03)
    assert own.mean() > other.mean() + 0.4
    assert (sim.argmax(1) == np.arange(len(sim))).mean() >= 0.5  # own crop is the best match (chance 0.05)


# ------------------------------------------------------------------ bounded memory
def test_features_are_not_held_twice():
    """Without scratch_dir each tile's features go straight into the output (no list of all tiles).

    4,000 cells x 2,048 float32 features = 33 MB of output in 16 tiles of about 2 MB: gathering the
    tiles before copying them would peak at about twice the output, scattering them as they arrive at
    the output plus about one tile.
    """
    import tracemalloc

    rng = np.random.default_rng(0)
    n, dim = 4000, 2048
    xy = rng.uniform(4, 508, (n, 2))
    sdata = make_cells_sdata(np.full((512, 512, 3), 200, dtype=np.uint8), xy, 1.0)

    def wide(crops):  # a plain function: its dimension is only known after its first call
        return crops.reshape(len(crops), -1, 3).mean(1, dtype=np.float32)[:, np.arange(dim) % 3]

    kwargs = {"encoder": wide, "mode": "crop", "crop_um": 2.0, "tile_size": 128, "batch_size": 256}
    bt.pp.embed_cells(sdata, key_added="warm_up", **kwargs)  # imports are not counted below
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        bt.pp.embed_cells(sdata, **kwargs)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    feats = sdata["cells"].obsm["X_bitro"]
    assert feats.shape == (n, dim) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, sdata["cells"].obsm["warm_up"])
    assert np.all(feats[:, 0] > 150)  # every cell got its features
    assert peak < 1.6 * feats.nbytes, f"peak {peak / 1e6:.1f} MB for a {feats.nbytes / 1e6:.1f} MB output"


def test_polygons_are_matched_by_instance_id_and_missing_ones_named():
    """Rows are matched to shapes by id whatever the order; a cell without a polygon is an error naming it."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    from shapely.geometry import box

    from bitro.pp._embed import _polygons_for

    shapes = gpd.GeoDataFrame(
        geometry=[box(i, 0, i + 2, 3) for i in range(5)], index=pd.Index([f"c{i}" for i in range(5)])
    )
    table = ad.AnnData(obs=pd.DataFrame({"instance_id": ["c3", "c0", "c4"]}, index=["a", "b", "c"]))
    rings = _polygons_for(table, shapes, np.array([1.0, 1.0]))
    assert [r[:, 0].min() for r in rings] == [3.0, 0.0, 4.0]
    np.testing.assert_allclose(_polygons_for(table, shapes, np.array([2.0, 2.0]))[0].max(axis=0), [2.5, 1.5])
    table.obs["instance_id"] = ["c3", "gone", "c9"]
    with pytest.raises(ValueError, match=r"2 cells of the table have no polygon.*'gone', 'c9'.*out of sync"):
        _polygons_for(table, shapes, np.array([1.0, 1.0]))
