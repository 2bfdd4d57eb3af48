"""Cells over the H&E, coloured by gene, phenotype or embedding (``bt.pl.cells``), and nucleus outlines."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro.pl import _utils as U
from bitro.pl._docs import doc_params

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd
    from matplotlib.axes import Axes

MAX_POLYGONS = 5000
"""With ``polygons="auto"``, polygons are drawn when at most this many cells are in view."""
CENTROID_RADIUS_UM = 4.0
"""Radius of the dot drawn for a cell when only centroids are shown."""

Color = str | tuple[str, int]


class _Colouring(NamedTuple):
    """What colours one panel: resolved from a ``color=`` entry by :func:`_color_values`."""

    key: str
    """obs column, gene or obsm key (picks the default palette and ``uns[f"{key}_colors"]``)."""
    title: str
    label: str
    """Colour-bar label."""
    values: np.ndarray
    """Values, or category codes (-1 = missing) when ``categories`` is not ``None``."""
    categories: list[str] | None
    layer: str | None
    """Layer of gene values (``None`` for obs/obsm colours and ``X``)."""


@doc_params
def cells(
    data: sd.SpatialData | ad.AnnData,
    *,
    color: Color | Sequence[Color],
    layer: str | None = K.PRED,
    table_key: str = K.CELLS,
    image_key: str | None = K.IMAGE,
    crop: Sequence[float] | None = None,
    polygons: bool | Literal["auto"] = "auto",
    cmap: Any = "magma",
    palette: Any = None,
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    alpha: float = 0.9,
    legend: bool = True,
    ncols: int | None = None,
    mpp: float | None = None,
    scale_bar_um: float | str | None = "auto",
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
):
    """Cells drawn as nucleus polygons (or centroids) over the H&E, one panel per ``color``.

    Cells without a value (e.g. cells outside every spot have no prediction) are grey, with a
    legend entry saying so; colour bars are labelled with what they show; titles name the slide
    (``sample_id`` of :func:`bitro.io.get_scale`) when it is recorded.

    Parameters
    ----------
    data
        SpatialData with table ``table_key`` (polygons from ``"<table_key>_shapes"``), or the
        table itself (AnnData: centroids from ``obsm["spatial"]``, no image).
    color
        What colours the cells, or a list of them: an ``obs`` column (categorical columns get
        ``palette`` and a legend, e.g. ``"phenotype"`` or ``"leiden"``), a gene (values of
        ``layers[layer]``), or ``(obsm_key, column)`` such as ``("X_bitro_expr", 0)``.
    layer
        Layer of gene values (``None`` for ``X``); the ``"bitro"`` layer holds log1p pseudo-expression.
    table_key
        The cells table.
    image_key
        Image drawn under the cells; ``None`` for none.
    crop
        ``(x0, y0, x1, y1)`` in level-0 pixels; default: all cells.
    polygons
        Draw nucleus polygons (``True``), centroids (``False``), or polygons only when at most
        :data:`MAX_POLYGONS` cells are in view (``"auto"``).
    cmap
        Colour map of continuous values.
    palette
        Colours of categories: a colour-map name, a list, or a dict category → colour. Default:
        ``uns[f"{color}_colors"]`` when present (scanpy's convention); CellViT's class colours
        when the categories are CellViT classes (``"Neoplastic"``, ``"Inflammatory"``…, e.g.
        ``obs["classification"]`` of :func:`bitro.io.read_cell_segmentation`); else a palette
        chosen by the key: tab10/tab20 for clusterings (``leiden``, ``cluster``, ``phenotype``…),
        another qualitative palette for other keys (``cell_type``…), and different palettes for
        the categorical panels of one call — so clusters and true types never share colours.
    vmin, vmax
        Colour limits of continuous values: numbers or percentiles ``"pN"`` (default ``"p0"``/``"p99"``).
    alpha
        Opacity of the cells.
    legend
        Draw the legend of categorical colours.
    ncols
        Panels per row.
    {doc_mpp}
    {doc_scale_bar_um}
    {doc_ax_panels}
    {doc_show_return_fig}
    {doc_save}

    Returns
    -------
    {doc_returns_panels}
    """
    adata, sdata = U.resolve_table(data, table_key)
    colors = [color] if isinstance(color, str | tuple) else list(color)
    if not colors:
        msg = "Pass at least one color= (gene, obs column or (obsm key, column))."
        raise ValueError(msg)
    resolved = [_color_values(adata, c, layer) for c in colors]  # validate all before drawing

    xy = U.spatial_coords(adata)
    bbox = U.check_crop(crop) or U.padded_bbox(xy, 0.03 * float(np.max(np.ptp(xy, axis=0)) + 20))
    view = U.in_bbox(xy, U.grown_bbox(bbox, 0.05))
    shapes = None
    if polygons is True or (polygons == "auto" and view.sum() <= MAX_POLYGONS):
        shapes = U.linked_shapes(sdata, K.shapes_key(table_key), adata)
        if shapes is None and polygons is True:
            msg = f"No shapes element {K.shapes_key(table_key)!r} to draw polygons from; pass polygons=False."
            raise ValueError(msg)
    elif polygons not in (True, False, "auto"):
        msg = f"polygons must be True, False or 'auto', got {polygons!r}."
        raise ValueError(msg)
    mpp = U.resolve_mpp(data, adata, mpp)
    slide = U.slide_name(data, adata)
    image = U.load_image(sdata, image_key, bbox)
    fig, axes = U.make_axes(len(colors), ax=ax, ncols=ncols)
    used_palettes: list[str] = []
    for axis, (key, title, label, values, categories, value_layer) in zip(axes, resolved):
        U.draw_image(axis, image)
        U.style_spatial_axes(axis, bbox, U.titled(title, slide))
        sub_shapes = None if shapes is None else shapes.iloc[np.flatnonzero(view)]
        collection = _cells_collection(axis, xy[view], sub_shapes, mpp, alpha)
        if categories is None:
            vals = values[view]
            cm = U.colormap(cmap)
            collection.set_cmap(cm)
            collection.set_array(np.ma.masked_invalid(vals))
            lo, hi = U.resolve_limit(vmin, vals, 0.0), U.resolve_limit(vmax, vals, 99.0)
            collection.set_clim(lo, hi if hi > lo else lo + 1e-6)
            axis.add_collection(collection)
            fig.colorbar(collection, ax=axis, shrink=0.8, label=label)
        else:
            codes = values[view]
            stored = adata.uns.get(f"{key}_colors")
            if palette is None and stored is None and U.cellvit_colors(categories) is None:
                chosen: Any = U.default_palette(key, len(categories), used_palettes)
                used_palettes.append(chosen)
            else:
                chosen = palette
            lut = U.category_colors(categories, chosen, stored, key=key)
            face = [lut[str(categories[int(c)])] if c >= 0 else U.NAN_COLOR for c in codes]
            collection.set_facecolor(face)
            axis.add_collection(collection)
            if legend:
                _category_legend(axis, lut, alpha, missing=bool((codes < 0).any()))
        U.add_scale_bar(axis, mpp, scale_bar_um)
        if categories is None and not np.isfinite(values[view]).all():
            why = U.missing_label(adata, value_layer, values[view], unit="outside spots")
            U.add_missing_legend(axis, why, alpha)
    return U.finish(fig, axes, show=show, return_fig=return_fig, save=save)


@doc_params
def segmentation(
    sdata: sd.SpatialData,
    *,
    image_key: str | None = K.IMAGE,
    shapes_key: str = K.shapes_key(K.CELLS),
    crop: Sequence[float] | None = None,
    edgecolor: Any = "#00d4ff",
    linewidth: float = 0.8,
    scale_bar_um: float | str | None = "auto",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
):
    """Nucleus outlines (``shapes_key``) over a crop of the image.

    Parameters
    ----------
    sdata
        SpatialData with the image and the shapes.
    image_key
        Image under the outlines; ``None`` for none.
    shapes_key
        Shapes element of the segmentation (polygons or circles).
    crop
        ``(x0, y0, x1, y1)`` in level-0 pixels; default: the extent of the shapes.
    edgecolor, linewidth
        Outline style.
    {doc_scale_bar_um}
    {doc_ax}
    {doc_show_return_fig}
    {doc_save}

    Returns
    -------
    {doc_returns}
    """
    from bitro.io._build import get_shapes

    if not U.is_spatialdata(sdata):
        msg = "segmentation() draws shapes over an image and needs a SpatialData object."
        raise TypeError(msg)
    shapes = get_shapes(sdata, shapes_key, hint="Nuclei are segmented by bt.pp (cells_shapes).")
    bounds = shapes.total_bounds if len(shapes) else np.zeros(4)
    if "radius" in shapes.columns and len(shapes):
        r = float(shapes["radius"].max())
        bounds = bounds + np.array([-r, -r, r, r])
    bbox = U.check_crop(crop) or (bounds[0] - 10.0, bounds[1] - 10.0, bounds[2] + 10.0, bounds[3] + 10.0)
    if len(shapes):
        x0, y0, x1, y1 = bbox
        pad = 0.0 if "radius" not in shapes.columns else float(shapes["radius"].max())
        shapes = shapes.cx[x0 - pad : x1 + pad, y0 - pad : y1 + pad]
    image = U.load_image(sdata, image_key, bbox)
    fig, axes = U.make_axes(1, ax=ax, ncols=1)
    axis = axes[0]
    U.draw_image(axis, image)
    U.style_spatial_axes(axis, bbox, U.titled(f"{shapes_key} ({len(shapes)} in view)", U.slide_name(sdata)))
    if len(shapes):
        outlines = U.shape_collection(
            shapes, facecolor="none", edgecolor=edgecolor, linewidths=linewidth, zorder=2
        )
        axis.add_collection(outlines)
    U.add_scale_bar(axis, U.resolve_mpp(sdata), scale_bar_um)
    return U.finish(fig, axes, show=show, return_fig=return_fig, save=save)


# ---------------------------------------------------------------------------- helpers
def _color_values(adata: ad.AnnData, color: Color, layer: str | None) -> _Colouring:
    """Resolve one ``color=`` entry: an ``(obsm key, column)``, an obs column or a gene of ``layer``."""
    if isinstance(color, tuple):
        if len(color) != 2 or color[0] not in adata.obsm:
            key = color[0] if color else color
            raise U.close_matches_error(str(key), list(adata.obsm), what="obsm key")
        matrix = np.asarray(adata.obsm[color[0]])
        if not -matrix.shape[1] <= int(color[1]) < matrix.shape[1]:
            msg = f"obsm[{color[0]!r}] has {matrix.shape[1]} columns; column {color[1]} does not exist."
            raise IndexError(msg)
        name = f"{color[0]}[{color[1]}]"
        return _Colouring(str(color[0]), name, name, matrix[:, int(color[1])].astype(np.float64), None, None)
    if color in adata.obs.columns:
        column = adata.obs[color]
        if isinstance(column.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(column):
            cat = column.astype("category") if not isinstance(column.dtype, pd.CategoricalDtype) else column
            categories = [str(c) for c in cat.cat.categories]
            return _Colouring(color, color, color, cat.cat.codes.to_numpy(), categories, None)
        return _Colouring(color, color, color, column.to_numpy(dtype=np.float64), None, None)
    if color in adata.var_names:
        values = U.dense_column(adata, color, layer)
        if U.is_prediction_layer(adata, layer):
            label = f"log1p predicted {color} ({layer})"
        else:
            label = f"{color} ({'X' if layer is None else f'layer {layer!r}'})"
        return _Colouring(color, f"{color} ({layer or 'X'})", label, values, None, layer)
    raise U.close_matches_error(
        color,
        [*map(str, adata.obs.columns), *map(str, adata.var_names)],
        what="color",
        hint="Pass an obs column, a gene, or (obsm_key, column).",
    )


def _cells_collection(axis: Axes, xy: np.ndarray, shapes, mpp: float | None, alpha: float):
    """Polygons of the cells in view, or a circle per centroid sized like a nucleus."""
    if shapes is not None:
        return U.shape_collection(shapes, alpha=alpha, linewidths=0, zorder=2)
    if mpp is not None:
        radius = CENTROID_RADIUS_UM / mpp
    else:  # no scale: a dot of ~2 points
        radius = 2.0 / U.points_per_pixel(axis)
    if len(xy) > MAX_POLYGONS:  # many dots: a scatter is much faster than patches
        from matplotlib.collections import CircleCollection

        # true nucleus size, but at least scanpy's default dot area (120000 / n points²) so an overview stays visible
        size_pt = max((radius * U.points_per_pixel(axis)) ** 2 * np.pi, min(30.0, 120000.0 / len(xy)))
        return CircleCollection(
            np.full(len(xy), size_pt),
            offsets=xy,
            offset_transform=axis.transData,
            alpha=alpha,
            linewidths=0,
            zorder=2,
        )
    return U.circle_collection(xy, radius, alpha=alpha, linewidths=0, zorder=2)


def _category_legend(axis: Axes, lut: dict[str, str], alpha: float, *, missing: bool = False) -> None:
    """Legend of the category colours right of the panel; ``missing`` adds the grey "no value" entry."""
    from matplotlib.lines import Line2D

    entries = [*lut.items(), *([("no value (NaN)", U.NAN_COLOR)] if missing else [])]
    handles = [
        Line2D(
            [], [], marker="o", linestyle="", markerfacecolor=c, markeredgecolor="none", alpha=alpha, label=k
        )
        for k, c in entries
    ]
    axis.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small"
    )
