"""Observed vs predicted gene maps over the H&E (``bt.pl.spatial``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro.pl import _utils as U
from bitro.pl._docs import doc_params

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd
    from matplotlib.axes import Axes

_LAYER_TITLES = {K.COUNTS_LAYER: "observed", K.PRED: "predicted"}


@doc_params
def spatial(
    data: sd.SpatialData | ad.AnnData,
    *,
    genes: str | Sequence[str],
    layers: str | Sequence[str] = (K.COUNTS_LAYER, K.PRED),
    table_key: str = K.SPOTS,
    image_key: str | None = K.IMAGE,
    size: float | None = None,
    cmap: Any = "viridis",
    ncols: int | None = None,
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    alpha: float = 1.0,
    mpp: float | None = None,
    scale_bar_um: float | str | None = 500.0,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
):
    """Gene maps of spots, one panel per gene × layer (observed next to predicted), over the H&E.

    Spots are drawn as discs with their true radius (``radius`` of the ``"<table_key>_shapes"``
    circles). All values are shown on the log1p scale: layers with bitro provenance in
    ``.uns[layer]`` (predictions, e.g. ``"bitro"``) are already log1p; any other layer (e.g.
    ``"counts"``) is treated as raw counts and log1p-transformed. When the prediction layer was
    made on the ``library_size`` scale, observed counts are rescaled to the same library size.

    Spots without a value are grey, and a legend entry under the panel says why ("no
    prediction (no cells)": the spot holds no segmented cell; "gene not predicted": the model
    does not predict the gene). Titles name the slide (``sample_id`` of
    :func:`bitro.io.get_scale`) when it is recorded; the scale bar hangs under the panel.

    Parameters
    ----------
    data
        SpatialData with table ``table_key``, or the table itself (AnnData: spot centres from
        ``obsm["spatial"]``, no image).
    genes
        One gene or a list of genes (rows of the figure).
    layers
        Layers to compare (columns of the figure); ``None`` in the list means ``X``.
    table_key
        The spots table.
    image_key
        Image drawn under the spots; ``None`` for none.
    size
        Factor on the spot radius (``1`` = true size).
    cmap
        Colour map of expression.
    ncols
        Panels per row (default: one column per layer).
    vmin, vmax
        Colour limits per gene, shared by its panels: numbers or percentiles ``"pN"`` of the
        pooled values of all layers (default ``"p0"`` and ``"p99"``).
    alpha
        Opacity of the spots.
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
    genes = [genes] if isinstance(genes, str) else list(genes)
    layers = [layers] if isinstance(layers, str) or layers is None else list(layers)
    if not genes or not layers:
        msg = "Pass at least one gene and one layer."
        raise ValueError(msg)
    for gene in genes:
        if gene not in adata.var_names:
            raise U.close_matches_error(gene, adata.var_names, what="Gene")
    for layer in layers:
        if layer is not None and layer not in adata.layers:
            raise U.missing_layer_error(adata, layer)
    reference = next((lay for lay in layers if U.is_prediction_layer(adata, lay)), None)

    xy = U.spatial_coords(adata)
    radius = _spot_radius(sdata, table_key, adata, xy) * (1.0 if size is None else float(size))
    bbox = U.padded_bbox(xy, float(np.max(radius)) * 1.5)
    mpp = U.resolve_mpp(data, adata, mpp)
    slide = U.slide_name(data, adata)
    image = U.load_image(sdata, image_key, bbox)
    fig, axes = U.make_axes(len(genes) * len(layers), ax=ax, ncols=ncols or len(layers))
    cm = U.colormap(cmap)
    panel = 0
    for gene in genes:
        values = [U.log1p_values(adata, gene, layer, reference=reference) for layer in layers]
        pooled = np.concatenate(values)
        lo, hi = U.resolve_limit(vmin, pooled, 0.0), U.resolve_limit(vmax, pooled, 99.0)
        if hi <= lo:
            hi = lo + 1e-6
        for layer, vals in zip(layers, values):
            axis = axes[panel]
            panel += 1
            U.draw_image(axis, image)
            discs = U.circle_collection(xy, radius, cmap=cm, alpha=alpha, linewidths=0, zorder=2)
            discs.set_array(np.ma.masked_invalid(vals))
            discs.set_clim(lo, hi)
            axis.add_collection(discs)
            name = _LAYER_TITLES.get(layer, layer or "X")
            title = f"{gene} · {name}" + (f" ({layer})" if layer else "")
            U.style_spatial_axes(axis, bbox, U.titled(title, slide))
            fig.colorbar(discs, ax=axis, shrink=0.8, label="log1p expression")
            U.add_scale_bar(axis, mpp, scale_bar_um)
            if not np.isfinite(vals).all():
                U.add_missing_legend(axis, U.missing_label(adata, layer, vals, unit="no cells"), alpha)
    return U.finish(fig, axes, show=show, return_fig=return_fig, save=save)


def _spot_radius(sdata, table_key: str, adata, xy: np.ndarray) -> np.ndarray:
    """Radius (level-0 px) of each spot: the shapes' ``radius``, the recorded diameter, or 0.4 × spacing."""
    shapes = U.linked_shapes(sdata, K.shapes_key(table_key), adata)
    if shapes is not None and "radius" in shapes.columns:
        return shapes["radius"].to_numpy(dtype=np.float64)
    scale = dict(adata.uns.get(K.SCALE, {}))
    if sdata is not None:
        scale.update(sdata.attrs.get(K.SCALE, {}))
    if scale.get(K.SPOT_DIAMETER_UM) and scale.get(K.MPP):
        return np.full(len(xy), scale[K.SPOT_DIAMETER_UM] / scale[K.MPP] / 2.0)
    if len(xy) > 1:
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(xy).query(xy, k=2)
        spacing = float(np.median(dist[:, 1]))
        if spacing > 0:
            return np.full(len(xy), 0.4 * spacing)
    return np.full(len(xy), 10.0)
