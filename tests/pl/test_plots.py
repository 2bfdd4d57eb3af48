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


# ---------------------------------------------------------------------------- figure fixes (issue #17)
def _shape_extents(ax):
    """Display-space extents of every drawn shape, clipped to the axes (what the reader sees)."""
    from matplotlib.transforms import Bbox

    extents = []
    for coll in ax.collections:
        transform = coll.get_transform()
        for path in coll.get_paths():
            ext = path.get_extents(transform)
            clipped = Bbox.intersection(ext, ax.bbox)
            if clipped is not None and clipped.width > 0 and clipped.height > 0:
                extents.append(clipped)
    return extents


def _overlaps(box, extents) -> list:
    return [e for e in extents if box.overlaps(e)]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: bt.pl.spatial(s, genes=["ERBB2", "GNAS"], show=False),
        lambda s: bt.pl.cells(s, color=["phenotype", "ERBB2"], show=False),
        lambda s: bt.pl.cells(s, color="ERBB2", crop=(30, 30, 210, 165), show=False),
        lambda s: bt.pl.segmentation(s, show=False),
        lambda s: bt.pl.attention(s, spot="spot9", gene="ERBB2", show=False),
    ],
)
def test_scale_bar_and_missing_legend_cover_no_shape(call, slide):
    slide.tables["spots"].layers["bitro"][[8, 9], :] = np.nan  # bottom-row spots without prediction
    slide.tables["cells"].layers["bitro"][:10] = np.nan
    out = call(slide)
    axes = out if isinstance(out, list) else [out]
    fig = axes[0].figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        extents = _shape_extents(ax)
        assert extents, "the panel draws shapes"
        # the bottom row of shapes reaches the lower edge region of the data
        (bar,) = _scale_bars(ax)
        box = bar.get_window_extent(renderer)
        assert not _overlaps(box, extents), "the scale bar covers shapes"
        assert box.y1 <= ax.bbox.y0 + 1.0, "the scale bar hangs under the panel"
        assert bar.patch is None or not bar.patch.get_visible() or bar.patch.get_alpha() in (None, 0)
        for legend in [a for a in ax.artists if a.get_gid() == "missing_legend"]:
            assert not _overlaps(legend.get_window_extent(renderer), extents)
            assert not legend.get_window_extent(renderer).overlaps(box), "the legend and the bar collide"


def _missing_legend_texts(ax) -> list[str]:
    return [t.get_text() for a in ax.artists if a.get_gid() == "missing_legend" for t in a.get_texts()]


def test_grey_spots_and_cells_are_explained(slide):
    spots, cells = slide.tables["spots"], slide.tables["cells"]
    axes = bt.pl.spatial(slide, genes="ERBB2", show=False)
    assert _missing_legend_texts(axes[0]) == [] and _missing_legend_texts(axes[1]) == []  # nothing grey
    spots.layers["bitro"][[0, 5], spots.var_names.get_loc("ERBB2")] = np.nan
    spots.layers["bitro"][:, spots.var_names.get_loc("GNAS")] = np.nan
    axes = bt.pl.spatial(slide, genes=["ERBB2", "GNAS"], show=False)
    assert _missing_legend_texts(axes[0]) == []  # observed counts are complete
    assert _missing_legend_texts(axes[1]) == ["no prediction (no cells)"]
    assert _missing_legend_texts(axes[3]) == ["no prediction (gene not predicted)"]
    colours = _disc_collection(axes[1]).to_rgba(_disc_collection(axes[1]).get_array())
    assert to_hex(colours[0]) == to_hex(U.NAN_COLOR)  # the explained spots are the grey ones
    # cells outside every spot, and a categorical column with missing labels
    cells.layers["bitro"][:4] = np.nan
    labels = cells.obs["phenotype"].astype(object).to_numpy()
    labels[:3] = None
    cells.obs["phenotype"] = pd.Categorical(labels, categories=PHENOTYPES)
    gene_ax, pheno_ax = bt.pl.cells(slide, color=["KRT19", "phenotype"], show=False)
    assert _missing_legend_texts(gene_ax) == ["no prediction (outside spots)"]
    legend = [t.get_text() for t in pheno_ax.get_legend().get_texts()]
    assert legend[-1] == "no value (NaN)" and legend[:-1] == PHENOTYPES
    cells.obs["area"] = cells.obs["area"].where(np.arange(cells.n_obs) > 2)
    assert _missing_legend_texts(bt.pl.cells(slide, color="area", show=False)) == ["no value (NaN)"]


def test_cells_colour_bar_is_labelled(slide):
    axes = bt.pl.cells(slide, color=["ERBB2", "area", ("X_bitro_expr", 1)], show=False)
    fig = axes[0].figure
    labels = [a.get_ylabel() for a in fig.axes if a not in axes]  # the colour-bar axes
    assert labels == ["log1p predicted ERBB2 (bitro)", "area", "X_bitro_expr[1]"]
    ax = bt.pl.cells(slide, color="ERBB2", layer=None, show=False)
    assert [a.get_ylabel() for a in ax.figure.axes if a is not ax] == ["ERBB2 (X)"]


def test_titles_name_the_slide(slide):
    assert bt.pl.spatial(slide, genes="ERBB2", show=False)[0].get_title() == "ERBB2 · observed (counts)"
    bt.io.set_scale(slide, mpp=MPP, sample_id="C2")
    titles = [ax.get_title() for ax in bt.pl.spatial(slide, genes="ERBB2", show=False)]
    assert titles == ["C2 · ERBB2 · observed (counts)", "C2 · ERBB2 · predicted (bitro)"]
    assert bt.pl.cells(slide, color="phenotype", show=False).get_title() == "C2 · phenotype"
    assert bt.pl.segmentation(slide, show=False).get_title().startswith("C2 · cells_shapes")
    assert bt.pl.attention(slide, spot="spot1", gene="GNAS", show=False).get_title().startswith("C2 · GNAS")
    assert bt.pl.scatter_pred(slide, gene="GNAS", show=False).get_title().startswith("C2 · GNAS: r = ")
    slide.tables["spots"].var["bitro_pcc_raw"] = np.linspace(-0.2, 0.8, len(GENES))
    assert bt.pl.gene_correlations(slide, show=False).get_title().startswith("C2 · Per-gene")
    # an AnnData names its slide from obs["sample_id"] when it holds one value
    spots = slide.tables["spots"].copy()
    spots.obs["sample_id"] = pd.Categorical(["B1"] * spots.n_obs)
    assert bt.pl.spatial(spots, genes="ERBB2", layers="counts", show=False).get_title().startswith("B1 · ")


def _face_colours(ax) -> list[str]:
    return [to_hex(c) for c in ax.collections[0].get_facecolors()]


def test_default_palettes_differ_by_key(slide):
    cells = slide.tables["cells"]
    cells.obs["cell_type"] = cells.obs["phenotype"].cat.rename_categories(["tumour", "T cell", "fibroblast"])
    cells.obs["cluster"] = cells.obs["phenotype"].cat.rename_categories(["0", "1", "2"])
    # the same labels under two keys: side by side, the colours differ
    cluster_ax, type_ax = bt.pl.cells(slide, color=["cluster", "cell_type"], show=False)
    assert set(_face_colours(cluster_ax)).isdisjoint(_face_colours(type_ax))
    # and in two separate calls (e.g. two ax=), because the key picks the palette
    alone = bt.pl.cells(slide, color="cell_type", show=False)
    assert _face_colours(alone) == _face_colours(type_ax)
    assert set(_face_colours(bt.pl.cells(slide, color="cluster", show=False))).isdisjoint(
        _face_colours(alone)
    )
    tab10 = [to_hex(plt.get_cmap("tab10")(i)) for i in range(3)]
    assert set(_face_colours(cluster_ax)) == set(tab10)  # clusterings keep scanpy's tab10
    # two non-cluster keys in one call never share a palette, even when their keys pick the same one
    cells.obs["type"] = cells.obs["cell_type"]
    assert U.default_palette("type", 3) == U.default_palette("cell_type", 3)  # the checksum collides
    first, second = bt.pl.cells(slide, color=["cell_type", "type"], show=False)
    assert _face_colours(first) == _face_colours(type_ax)  # the first keeps its key's palette
    assert set(_face_colours(first)).isdisjoint(_face_colours(second))
    # an explicit palette wins
    red = bt.pl.cells(slide, color="cell_type", palette=["#ff0000"] * 3, show=False)
    assert set(_face_colours(red)) == {"#ff0000"}
    # many categories: neighbouring categories of the interleaved tab20b differ in hue
    lut = U.category_colors([str(i) for i in range(15)], key="region")
    assert len(set(lut.values())) == 15
    assert lut["1"] == to_hex(plt.get_cmap("tab20b")(4))


def test_cellvit_class_colours_are_honoured(slide):
    cells = slide.tables["cells"]
    classes = np.array(["Neoplastic", "Inflammatory", "unknown"])[cells.obs["phenotype"].cat.codes.to_numpy()]
    cells.obs["classification"] = pd.Categorical(classes)
    ax = bt.pl.cells(slide, color="classification", show=False)
    expected = {"Neoplastic": "#ff0000", "Inflammatory": "#22dd4d", "unknown": U.UNKNOWN_COLOR}
    assert _face_colours(ax) == [expected[c] for c in classes]
    # colours stored with the table (scanpy's uns[f"{key}_colors"], in category order) come first
    cells.uns["classification_colors"] = ["#000000", "#111111", "#222222"]
    stored = dict(zip(cells.obs["classification"].cat.categories, cells.uns["classification_colors"]))
    assert _face_colours(bt.pl.cells(slide, color="classification", show=False)) == [
        stored[c] for c in classes
    ]
    # categories that are not all CellViT classes get the key's default palette
    assert U.cellvit_colors(["Neoplastic", "stroma"]) is None
    assert U.cellvit_colors(["neoplastic", "Dead"]) == {"neoplastic": "#ff0000", "Dead": "#feff00"}


def test_save_writes_publication_resolution_and_never_replaces_foreign_files(slide, tmp_path):
    from PIL import Image

    path = tmp_path / "figs" / "spatial.png"
    ax = bt.pl.spatial(slide, genes="ERBB2", layers="bitro", save=path, show=False)
    assert isinstance(ax, Axes) and path.is_file()
    assert bt.settings.savefig_dpi == 300
    with Image.open(path) as im:
        assert im.info["dpi"][0] == pytest.approx(300, abs=1)
        width = im.size[0]
    # rerunning replaces its own figure; the setting changes the resolution
    old = bt.settings.savefig_dpi
    try:
        bt.settings.savefig_dpi = 150
        bt.pl.spatial(slide, genes="ERBB2", layers="bitro", save=path, show=False)
    finally:
        bt.settings.savefig_dpi = old
    with Image.open(path) as im:
        assert im.info["dpi"][0] == pytest.approx(150, abs=1) and im.size[0] < width
    pdf = tmp_path / "history.pdf"
    bt.pl.history({"epoch": [1, 2], "train_loss": [2.0, 1.0], "val_loss": [2.0, 1.5]}, save=pdf)
    assert pdf.read_bytes().startswith(b"%PDF")
    bt.pl.history({"epoch": [1, 2], "train_loss": [2.0, 1.0], "val_loss": [2.0, 1.5]}, save=pdf)  # its own
    jpg = tmp_path / "cells.jpg"  # JPEG names no writer: an image of that format counts as a figure
    bt.pl.cells(slide, color="phenotype", save=jpg)
    bt.pl.cells(slide, color="phenotype", save=jpg)
    for name in ("notes.png", "notes.jpg"):
        foreign = tmp_path / name
        foreign.write_text("my notes")
        with pytest.raises(FileExistsError, match="not a figure matplotlib wrote"):
            bt.pl.cells(slide, color="phenotype", save=foreign)
        assert foreign.read_text() == "my notes"
    with pytest.raises(ValueError, match="figure suffix"):
        bt.pl.cells(slide, color="phenotype", save=tmp_path / "cells.txt")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(IsADirectoryError, match="folder"):
        bt.pl.cells(slide, color="phenotype", save=tmp_path / "d.png")


def test_savefig_dpi_setting_validates():
    for bad in (0, -5, "300", True, 10_000):
        with pytest.raises(ValueError, match="savefig_dpi"):
            bt.settings.savefig_dpi = bad
    assert "savefig_dpi=300" in repr(bt.settings)
