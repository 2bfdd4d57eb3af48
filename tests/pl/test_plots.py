"""Behaviour of the plot functions: return values, axes, inputs, colour limits, errors."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _plot_data import GENES, MPP, PHENOTYPES, SPOT_RADIUS, make_slide
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

import bitro as bt
from bitro.pl import _utils as U


@pytest.fixture
def slide():
    return make_slide(0)


@pytest.fixture(autouse=True)
def _mpl_defaults():
    plt.rcdefaults()
    yield
    plt.close("all")


def _disc_collection(ax):
    return next(c for c in ax.collections if c.get_array() is not None)


def _scale_bars(ax):
    return [a for a in ax.artists if isinstance(a, AnchoredSizeBar)]


# ---------------------------------------------------------------------------- return conventions
@pytest.mark.parametrize(
    "call",
    [
        lambda s, **kw: bt.pl.spatial(s, genes="ERBB2", layers="bitro", **kw),
        lambda s, **kw: bt.pl.cells(s, color="phenotype", **kw),
        lambda s, **kw: bt.pl.segmentation(s, **kw),
        lambda s, **kw: bt.pl.attention(s, spot="spot0", gene="GNAS", **kw),
        lambda s, **kw: bt.pl.scatter_pred(s, gene="GNAS", **kw),
        lambda s, **kw: bt.pl.gene_correlations(pd.Series([0.1, 0.5], index=["a", "b"]), **kw),
        lambda s, **kw: bt.pl.history({"epoch": [1], "train_loss": [1.0], "val_loss": [np.nan]}, **kw),
    ],
)
def test_return_conventions(call, slide):
    assert isinstance(call(slide, return_fig=True), Figure)
    assert isinstance(call(slide, show=False), Axes)
    assert isinstance(call(slide), Axes)  # show=None with the non-interactive Agg backend: no show
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "FigureCanvasAgg is non-interactive"
        assert call(slide, show=True) is None
    _, ax = plt.subplots()
    assert call(slide, ax=ax, show=False) is ax
    assert ax.has_data()


def test_several_panels_return_a_list_and_use_the_axes_given(slide):
    axes = bt.pl.spatial(slide, genes=["ERBB2", "GNAS"], show=False)
    assert isinstance(axes, list) and len(axes) == 4
    _, given = plt.subplots(1, 2)
    out = bt.pl.spatial(slide, genes="ERBB2", ax=list(given), show=False)
    assert out == list(given)
    with pytest.raises(ValueError, match="2 panels but 1 axes"):
        bt.pl.spatial(slide, genes="ERBB2", ax=given[0])


# ---------------------------------------------------------------------------- spatial
def test_spatial_shared_colour_limits_and_log1p_values(slide):
    axes = bt.pl.spatial(slide, genes=["ERBB2", "GNAS"], show=False)
    spots = slide.tables["spots"]
    for row, gene in enumerate(["ERBB2", "GNAS"]):
        obs_ax, pred_ax = axes[2 * row], axes[2 * row + 1]
        obs_c, pred_c = _disc_collection(obs_ax), _disc_collection(pred_ax)
        assert obs_c.get_clim() == pred_c.get_clim()
        j = spots.var_names.get_loc(gene)
        observed = np.log1p(spots.layers["counts"][:, j])
        predicted = spots.layers["bitro"][:, j]
        np.testing.assert_allclose(obs_c.get_array(), observed, rtol=1e-6)
        np.testing.assert_allclose(pred_c.get_array(), predicted, rtol=1e-6)
        pooled = np.concatenate([observed, predicted])
        np.testing.assert_allclose(obs_c.get_clim(), (pooled.min(), np.percentile(pooled, 99)), rtol=1e-6)
    # the two genes get their own limits
    assert _disc_collection(axes[0]).get_clim() != _disc_collection(axes[2]).get_clim()


def test_spatial_percentile_limits(slide):
    ax = bt.pl.spatial(slide, genes="ERBB2", layers="bitro", vmin=0.5, vmax="p50", show=False)
    vals = slide.tables["spots"][:, "ERBB2"].layers["bitro"].ravel()
    np.testing.assert_allclose(_disc_collection(ax).get_clim(), (0.5, np.percentile(vals, 50)), rtol=1e-6)
    with pytest.raises(ValueError, match="percentiles"):
        bt.pl.spatial(slide, genes="ERBB2", vmax="q99")


def test_spatial_discs_have_the_true_radius_over_the_image(slide):
    ax = bt.pl.spatial(slide, genes="ERBB2", layers="counts", show=False)
    discs = _disc_collection(ax)
    centres = slide.tables["spots"].obsm["spatial"]
    for path, centre in zip(discs.get_paths(), centres):
        ext = path.get_extents()
        assert ext.width == pytest.approx(2 * SPOT_RADIUS, rel=1e-3)
        np.testing.assert_allclose([(ext.x0 + ext.x1) / 2, (ext.y0 + ext.y1) / 2], centre, atol=1e-6)
    (image,) = [a for a in ax.get_images() if isinstance(a, AxesImage)]
    left, right, bottom, top = image.get_extent()
    assert left <= centres[:, 0].min() - SPOT_RADIUS and right >= centres[:, 0].max() + SPOT_RADIUS
    assert top <= centres[:, 1].min() - SPOT_RADIUS and bottom >= centres[:, 1].max() + SPOT_RADIUS
    (bar,) = _scale_bars(ax)
    assert bar.txt_label.get_text() == "500 µm"
    rect = bar.size_bar.get_children()[0]
    assert rect.get_width() == pytest.approx(500 / MPP)


def test_spatial_on_anndata(slide):
    spots = slide.tables["spots"].copy()
    spots.uns["bitro_scale"] = {"mpp": MPP, "spot_diameter_um": 2 * SPOT_RADIUS * MPP}
    axes = bt.pl.spatial(spots, genes="GNAS", show=False, scale_bar_um=100)
    assert len(axes) == 2
    assert not axes[0].get_images()
    assert _disc_collection(axes[0]).get_paths()[0].get_extents().width == pytest.approx(
        2 * SPOT_RADIUS, rel=1e-3
    )
    assert _scale_bars(axes[0])[0].txt_label.get_text() == "100 µm"
    # no scale recorded: mpp= draws the bar, otherwise none
    del spots.uns["bitro_scale"]
    assert not _scale_bars(bt.pl.spatial(spots, genes="GNAS", layers="bitro", show=False))
    ax = bt.pl.spatial(spots, genes="GNAS", layers="bitro", mpp=1.0, scale_bar_um=50, show=False)
    assert _scale_bars(ax)[0].size_bar.get_children()[0].get_width() == pytest.approx(50.0)


def test_spatial_errors(slide):
    with pytest.raises(KeyError, match=r"'ERBB2'"):
        bt.pl.spatial(slide, genes="ERBB")
    with pytest.raises(KeyError, match=r"bt\.tl\.predict"):
        bt.pl.spatial(slide, genes="ERBB2", layers=("counts", "bitro_v2"))
    with pytest.raises(KeyError, match="table"):
        bt.pl.spatial(slide, genes="ERBB2", table_key="spot")
    with pytest.raises(KeyError, match="image_key=None"):
        bt.pl.spatial(slide, genes="ERBB2", image_key="he_normalized")
    with pytest.raises(TypeError, match="SpatialData or AnnData"):
        bt.pl.spatial(np.zeros(3), genes="ERBB2")


def test_library_size_predictions_compare_with_rescaled_counts(slide):
    spots = slide.tables["spots"]
    spots.uns["bitro"] = {**spots.uns["bitro"], "target_scale": "library_size", "target_sum": 100.0}
    ax = bt.pl.spatial(slide, genes="KRT19", layers="counts", show=False)
    counts = spots.layers["counts"]
    expected = np.log1p(counts[:, 2] / counts.sum(axis=1) * 100.0)
    np.testing.assert_allclose(_disc_collection(ax).get_array(), np.log1p(counts[:, 2]), rtol=1e-6)
    axes = bt.pl.spatial(slide, genes="KRT19", show=False)  # with the prediction layer as reference
    np.testing.assert_allclose(_disc_collection(axes[0]).get_array(), expected, rtol=1e-5)


# ---------------------------------------------------------------------------- image reading
def test_read_image_downsamples_and_maps_to_level0():
    import anndata as ad
    import spatialdata as sd

    from bitro.io._build import image_element

    img = np.full((3, 600, 800), 230, dtype=np.uint8)
    img[:, 300:360, 500:580] = 20  # a dark block at x 500-580, y 300-360
    sdata = sd.SpatialData(images={"he": image_element(img, scale_factors=[2, 2])})
    del ad
    for max_px in (1000, 150, 60):
        rgb, (left, right, bottom, top) = U.read_image(sdata, "he", max_px=max_px)
        assert max(rgb.shape[:2]) <= max_px
        assert (left, top) == (0.0, 0.0)

        def at(x, y, rgb=rgb, right=right, bottom=bottom):
            return rgb[int(y / bottom * rgb.shape[0]), int(x / right * rgb.shape[1]), 0]

        assert at(540, 330) == 20 and at(460, 330) == 230 and at(540, 400) == 230
    rgb, extent = U.read_image(sdata, "he", (480, 280, 600, 380), max_px=1000)
    assert rgb.shape[:2] == (100, 120)  # level 0, no stride: the crop is small
    assert extent == (480.0, 600.0, 380.0, 280.0)
    with pytest.raises(ValueError, match="does not overlap"):
        U.read_image(sdata, "he", (900, 900, 950, 950))


def test_spatial_with_multiscale_image_lines_up():
    sdata = make_slide(0, scale_factors=[2])
    ax = bt.pl.spatial(sdata, genes="GNAS", layers="bitro", show=False)
    (image,) = ax.get_images()
    left, right, bottom, top = image.get_extent()
    assert left >= 0 and top >= 0 and right <= 422 and bottom <= 332


# ---------------------------------------------------------------------------- cells
def test_cells_categorical_palette_and_legend(slide):
    ax = bt.pl.cells(slide, color="phenotype", show=False)
    (polys,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    cells = slide.tables["cells"]
    assert len(polys.get_paths()) == cells.n_obs
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == PHENOTYPES
    tab10 = [to_hex(plt.get_cmap("tab10")(i)) for i in range(3)]
    expected = [tab10[PHENOTYPES.index(p)] for p in cells.obs["phenotype"]]
    assert [to_hex(c) for c in polys.get_facecolors()] == expected
    # scanpy's stored colours and an explicit dict are honoured
    cells.uns["phenotype_colors"] = ["#ff0000", "#00ff00", "#0000ff"]
    ax = bt.pl.cells(slide, color="phenotype", show=False)
    assert (
        to_hex(ax.collections[0].get_facecolors()[0])
        == cells.uns["phenotype_colors"][PHENOTYPES.index(cells.obs["phenotype"].iloc[0])]
    )
    lut = dict(zip(PHENOTYPES, ["black", "white", "red"]))
    ax = bt.pl.cells(slide, color="phenotype", palette=lut, show=False)
    assert to_hex(ax.collections[0].get_facecolors()[0]) == to_hex(lut[cells.obs["phenotype"].iloc[0]])


def test_cells_gene_obs_and_obsm_colours(slide):
    cells = slide.tables["cells"]
    axes = bt.pl.cells(slide, color=["KRT19", "area", ("X_bitro_expr", 1)], show=False)
    np.testing.assert_allclose(axes[0].collections[0].get_array(), cells[:, "KRT19"].layers["bitro"].ravel())
    np.testing.assert_allclose(axes[1].collections[0].get_array(), cells.obs["area"].to_numpy())
    np.testing.assert_allclose(axes[2].collections[0].get_array(), cells.obsm["X_bitro_expr"][:, 1])
    assert [a.get_title() for a in axes] == ["KRT19 (bitro)", "area", "X_bitro_expr[1]"]


def test_cells_crop_polygons_and_centroids(slide, monkeypatch):
    cells = slide.tables["cells"]
    crop = (30.0, 30.0, 120.0, 120.0)
    xy = cells.obsm["spatial"]
    ax = bt.pl.cells(slide, color="phenotype", crop=crop, show=False)
    assert ax.get_xlim() == (30.0, 120.0) and ax.get_ylim() == (120.0, 30.0)
    n_in = int(U.in_bbox(xy, U.grown_bbox(crop, 0.05)).sum())
    assert 0 < n_in < cells.n_obs
    assert isinstance(ax.collections[0], PolyCollection) and len(ax.collections[0].get_paths()) == n_in
    # too many cells in view for polygons: centroids (circles of 4 µm)
    monkeypatch.setattr("bitro.pl._cells.MAX_POLYGONS", 5)
    ax = bt.pl.cells(slide, color="phenotype", crop=crop, show=False)
    coll = ax.collections[0]
    assert not isinstance(coll, PolyCollection) and len(coll.get_offsets()) == n_in
    np.testing.assert_allclose(np.asarray(coll.get_offsets()), xy[U.in_bbox(xy, U.grown_bbox(crop, 0.05))])


def test_cells_on_anndata(slide):
    cells = slide.tables["cells"].copy()
    ax = bt.pl.cells(cells, color="phenotype", mpp=MPP, show=False)
    assert not ax.get_images()
    assert len(ax.collections[0].get_paths()) == cells.n_obs
    assert _scale_bars(ax)


def test_cells_errors(slide):
    with pytest.raises(KeyError, match="phenotype"):
        bt.pl.cells(slide, color="phenotyp")
    with pytest.raises(KeyError, match="obsm"):
        bt.pl.cells(slide, color=("X_nope", 0))
    with pytest.raises(IndexError, match="columns"):
        bt.pl.cells(slide, color=("X_bitro_expr", 99))
    with pytest.raises(KeyError, match=r"bt\.tl\.predict"):
        bt.pl.cells(slide, color="GNAS", layer="pred")
    with pytest.raises(ValueError, match="crop"):
        bt.pl.cells(slide, color="GNAS", crop=(10, 10, 5, 20))
    with pytest.raises(ValueError, match="palette has 2 colours"):
        bt.pl.cells(slide, color="phenotype", palette=["red", "blue"])


def test_segmentation_outlines_in_crop(slide):
    crop = (30.0, 30.0, 130.0, 110.0)
    ax = bt.pl.segmentation(slide, crop=crop, show=False)
    shapes = slide.shapes["cells_shapes"]
    expected = len(shapes.cx[30:130, 30:110])
    (outlines,) = ax.collections
    assert len(outlines.get_paths()) == expected > 0
    assert outlines.get_facecolor().size == 0 or outlines.get_facecolor()[0][3] == 0
    assert ax.get_images()
    with pytest.raises(KeyError, match="shapes"):
        bt.pl.segmentation(slide, shapes_key="nuclei")
    with pytest.raises(TypeError, match="SpatialData"):
        bt.pl.segmentation(slide.tables["cells"])


# ---------------------------------------------------------------------------- attention
def test_attention_shares_recover_the_attention_weights(slide):
    from bitro.pl._model import attention_shares

    cells = slide.tables["cells"]
    true = cells.uns["_true_attention"]
    for spot in ["spot0", "spot5", "spot11"]:
        for g, gene in enumerate(GENES):
            shares = attention_shares(cells, spot=spot, gene=gene)
            assert shares.sum() == pytest.approx(1.0, abs=1e-6)
            members = (cells.obs["spot_id"] == spot).to_numpy()
            np.testing.assert_allclose(shares.to_numpy(), true[members, g], atol=1e-4)


def test_attention_plot_colours_the_spot_cells_by_share(slide):
    ax = bt.pl.attention(slide, spot="spot5", gene="ERBB2", show=False)
    (coll,) = [c for c in ax.collections if c.get_gid() == "attention_cells"]
    assert float(np.sum(coll.get_array())) == pytest.approx(1.0, abs=1e-6)
    assert len(coll.get_paths()) == int((slide.tables["cells"].obs["spot_id"] == "spot5").sum())
    centre = slide.tables["spots"].obsm["spatial"][5]
    x0, x1 = ax.get_xlim()
    assert (x0 + x1) / 2 == pytest.approx(centre[0]) and x1 - x0 > 2 * SPOT_RADIUS
    with pytest.raises(KeyError, match="Spot"):
        bt.pl.attention(slide, spot="spot99", gene="ERBB2")
    with pytest.raises(KeyError, match="Gene"):
        bt.pl.attention(slide, spot="spot5", gene="ERBB3X")
    with pytest.raises(KeyError, match=r"bt\.tl\.predict"):
        bt.pl.attention(slide, spot="spot5", gene="ERBB2", layer="missing")


# ---------------------------------------------------------------------------- model figures
def test_gene_correlations_names_top_and_bottom(slide):
    rng = np.random.default_rng(0)
    spots = slide.tables["spots"]
    values = rng.uniform(-0.5, 0.9, spots.n_vars)
    spots.var["bitro_pcc_raw"] = values
    ax = bt.pl.gene_correlations(slide, n_top=2, show=False)
    order = spots.var_names[np.argsort(-values)]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [*order[:2], *order[-2:]]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, np.sort(values)[::-1][[0, 1, -2, -1]])
    # all genes when few; Series and DataFrame input
    ax = bt.pl.gene_correlations(pd.Series(values, index=spots.var_names), n_top=10, show=False)
    assert len(ax.get_xticklabels()) == spots.n_vars
    frame = pd.DataFrame({"pcc": values, "other": 1.0}, index=spots.var_names)
    ax = bt.pl.gene_correlations(frame, key="pcc", show=False)
    assert len(ax.patches) == spots.n_vars
    spots.var["cv_pcc_raw"] = values
    spots.var["fold2_pcc_raw"] = values
    with pytest.raises(ValueError, match="key="):
        bt.pl.gene_correlations(spots.var.drop(columns="bitro_pcc_raw"), show=False)
    assert len(bt.pl.gene_correlations(spots, show=False).patches) == spots.n_vars  # bitro_pcc_raw preferred
    with pytest.raises(KeyError, match="PCC column"):
        bt.pl.gene_correlations(spots, key="bitro_pcc_norm")


def test_scatter_pred_reports_pearson(slide):
    spots = slide.tables["spots"]
    ax = bt.pl.scatter_pred(spots, gene="CD74", show=False)
    j = spots.var_names.get_loc("CD74")
    r = np.corrcoef(np.log1p(spots.layers["counts"][:, j]), spots.layers["bitro"][:, j])[0, 1]
    assert ax.get_title() == f"CD74: r = {r:.3f} (n = {spots.n_obs})"
    xy = ax.collections[0].get_offsets()
    np.testing.assert_allclose(xy[:, 0], np.log1p(spots.layers["counts"][:, j]), rtol=1e-6)
    with pytest.raises(KeyError, match=r"bt\.tl\.predict"):
        bt.pl.scatter_pred(spots, gene="CD74", layers=("counts", "pred"))
    with pytest.raises(ValueError, match="observed, predicted"):
        bt.pl.scatter_pred(spots, gene="CD74", layers=("counts",))


def test_history_skips_missing_validation():
    model = SimpleNamespace(
        history={
            "epoch": [1, 2, 3, 4],
            "train_loss": [4.0, 3.0, 2.0, 1.5],
            "val_loss": [5.0, np.nan, 2.5, 2.8],
        }
    )
    ax = bt.pl.history(model, show=False)
    train, val = ax.get_lines()[:2]
    np.testing.assert_array_equal(train.get_ydata(), [4.0, 3.0, 2.0, 1.5])
    np.testing.assert_array_equal(val.get_xdata(), [1, 3, 4])
    assert ax.get_lines()[2].get_xdata()[0] == 3  # best validation epoch
    ax = bt.pl.history({"epoch": [1, 2], "train_loss": [2.0, 1.0], "val_loss": [np.nan, np.nan]}, show=False)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train"]
    with pytest.raises(ValueError, match="train the model"):
        bt.pl.history({"epoch": [], "train_loss": [], "val_loss": []})
    with pytest.raises(TypeError, match="history"):
        bt.pl.history([1.0, 2.0])


def test_nice_scale_bar_lengths():
    assert [U.nice_length(s) for s in (1000, 120, 37, 9)] == [200, 20, 5, 1]


# ---------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_spatial_on_a_whole_her2st_section(data_dir):
    from bitro.io._build import image_levels

    if not (data_dir / "her2st").is_dir():
        pytest.skip("her2st not in the data kit")
    sdata = bt.datasets.her2st("C2", data_dir=data_dir)
    spots = sdata.tables["spots"]
    counts = spots[:, "ERBB2"].layers["counts"]
    counts = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float32)
    h, w = image_levels(sdata, "he")[0]
    axes = bt.pl.spatial(sdata, genes="ERBB2", layers="counts", show=False)
    (image,) = axes.get_images()
    assert max(image.get_array().shape[:2]) <= U.MAX_DISPLAY_PX  # never the full-resolution array
    left, right, bottom, top = image.get_extent()
    xy = spots.obsm["spatial"]
    assert (
        left <= xy[:, 0].min()
        and right >= xy[:, 0].max()
        and top <= xy[:, 1].min()
        and bottom >= xy[:, 1].max()
    )
    assert right <= w + 64 and bottom <= h + 64
    np.testing.assert_allclose(_disc_collection(axes).get_array(), np.log1p(counts.ravel()), rtol=1e-6)
    radius = _disc_collection(axes).get_paths()[0].get_extents().width / 2
    assert radius * bt.io.get_mpp(sdata) == pytest.approx(50.0, rel=0.02)  # 100 µm ST spots
