"""Figures about the model and its predictions: per-gene PCC, observed vs predicted, attention, history."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro.pl import _utils as U
from bitro.pl._docs import doc_params

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd
    from matplotlib.axes import Axes

PCC_SUFFIX = "_pcc_raw"
"""``var`` column suffix of per-gene PCC written by ``bt.tl.evaluate`` (``f"{key_added}_pcc_{scale}"``)."""


# ---------------------------------------------------------------------------- gene correlations
@doc_params
def gene_correlations(
    result: pd.Series | pd.DataFrame | ad.AnnData | sd.SpatialData,
    *,
    key: str | None = None,
    table_key: str = K.SPOTS,
    n_top: int = 10,
    colors: tuple[Any, Any] = ("#c0392b", "#2c7fb8"),
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
):
    """Ranked per-gene Pearson correlations: the ``n_top`` best and worst genes by name.

    Parameters
    ----------
    result
        Per-gene PCC: a Series gene → PCC, a DataFrame with column ``key``, or a table (AnnData,
        or SpatialData with ``table_key``) whose ``var[key]`` holds them (``bt.tl.evaluate``).
    key
        Column of the PCC; default: ``"bitro_pcc_raw"`` or the only column ending in ``"_pcc_raw"``
        (``"_pcc_"`` as a fallback).
    table_key
        Table of a SpatialData ``result``.
    n_top
        Number of best and of worst genes named (all genes when there are at most ``2 * n_top``).
    colors
        Colours of positive and of negative correlations.
    {doc_ax}
    {doc_show_return_fig}
    {doc_save}

    Returns
    -------
    {doc_returns}
    """
    import matplotlib as mpl

    pcc = _pcc_series(result, key, table_key).dropna().sort_values(ascending=False)
    if pcc.empty:
        msg = "No finite per-gene PCC to plot; run bt.tl.evaluate first."
        raise ValueError(msg)
    if n_top < 1:
        msg = f"n_top must be at least 1, got {n_top}."
        raise ValueError(msg)
    n = len(pcc)
    if n <= 2 * n_top:
        shown, positions, gap = pcc, np.arange(n, dtype=float), None
    else:
        shown = pd.concat([pcc.iloc[:n_top], pcc.iloc[-n_top:]])
        positions = np.concatenate([np.arange(n_top), np.arange(n_top) + n_top + 1.0])
        gap = float(n_top)
    fig, axes = U.make_axes(1, ax=ax, ncols=1, panel_size=(max(4.0, 0.22 * len(shown) + 1.5), 3.6))
    axis = axes[0]
    bar_colors = np.where(shown.to_numpy() >= 0, mpl.colors.to_hex(colors[0]), mpl.colors.to_hex(colors[1]))
    axis.bar(positions, shown.to_numpy(), color=bar_colors, width=0.8, edgecolor="none")
    axis.set_xticks(positions, [str(g) for g in shown.index], rotation=90, fontsize="small")
    axis.axhline(0.0, color="black", linewidth=0.6)
    mean = float(pcc.mean())
    axis.axhline(mean, color="grey", linestyle="--", linewidth=0.8, label=f"mean over {n} genes = {mean:.3f}")
    if gap is not None:
        axis.text(
            gap,
            0.5,
            f"… {n - 2 * n_top} genes …",
            rotation=90,
            ha="center",
            va="center",
            fontsize="x-small",
            transform=axis.get_xaxis_transform(),
        )
    axis.set_xlim(-0.7, positions[-1] + 0.7)
    axis.set_ylabel("Pearson r (observed vs predicted)")
    title = (
        f"Per-gene correlation: top and bottom {min(n_top, n)}" if gap is not None else "Per-gene correlation"
    )
    axis.set_title(U.titled(title, _result_slide(result, table_key)))
    axis.legend(loc="upper right", fontsize="small", frameon=False)
    return U.finish(fig, axes, show=show, return_fig=return_fig, save=save)


def _result_slide(result: Any, table_key: str) -> str | None:
    """Slide name of a table or SpatialData ``result`` (``None`` for a Series or DataFrame)."""
    if U.is_spatialdata(result):
        return U.slide_name(result, result.tables.get(table_key))
    if hasattr(result, "var") and hasattr(result, "obs"):
        return U.slide_name(result, result)
    return None


def _pcc_series(result: Any, key: str | None, table_key: str) -> pd.Series:
    """Per-gene PCC from a Series, DataFrame, AnnData or SpatialData."""
    if isinstance(result, pd.Series):
        return result.astype(np.float64)
    if isinstance(result, pd.DataFrame):
        frame = result
    elif U.is_spatialdata(result) or hasattr(result, "var"):
        frame = U.resolve_table(result, table_key)[0].var
    else:
        msg = f"Expected a pd.Series, pd.DataFrame, AnnData or SpatialData, got {type(result).__name__}."
        raise TypeError(msg)
    if key is None:
        key = _default_pcc_key(frame)
    if key not in frame.columns:
        raise U.close_matches_error(key, frame.columns, what="PCC column", hint="bt.tl.evaluate writes them.")
    return frame[key].astype(np.float64)


def _default_pcc_key(frame: pd.DataFrame) -> str:
    if f"{K.PRED}{PCC_SUFFIX}" in frame.columns:
        return f"{K.PRED}{PCC_SUFFIX}"
    for suffix in (PCC_SUFFIX, "_pcc_"):
        found = [
            c for c in frame.columns if str(c).endswith(suffix) or (suffix == "_pcc_" and suffix in str(c))
        ]
        if len(found) == 1:
            return str(found[0])
        if len(found) > 1:
            msg = f"Several PCC columns {found}; choose one with key=."
            raise ValueError(msg)
    numeric = frame.select_dtypes("number").columns
    if len(numeric) == 1:
        return str(numeric[0])
    msg = f"No per-gene PCC column found among {list(map(str, frame.columns))}; run bt.tl.evaluate or pass key=."
    raise KeyError(msg)


# ---------------------------------------------------------------------------- observed vs predicted
@doc_params
def scatter_pred(
    data: sd.SpatialData | ad.AnnData,
    *,
    gene: str,
    layers: Sequence[str | None] = (K.COUNTS_LAYER, K.PRED),
    table_key: str = K.SPOTS,
    color: Any = "#3b6ea8",
    size: float = 12.0,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
):
    """Observed (log1p) against predicted expression of one gene over the spots, with Pearson r.

    Parameters
    ----------
    data
        SpatialData with table ``table_key``, or the table (AnnData).
    gene
        The gene.
    layers
        ``(observed, predicted)`` layers; observed counts are log1p-transformed, predictions
        (layers with bitro provenance in ``.uns``) are used as they are.
    table_key
        The spots table.
    color, size
        Marker colour and size.
    {doc_ax}
    {doc_show_return_fig}
    {doc_save}

    Returns
    -------
    {doc_returns}
    """
    adata, _ = U.resolve_table(data, table_key)
    slide = U.slide_name(data, adata)
    if len(layers) != 2:
        msg = f"layers must be (observed, predicted), got {layers!r}."
        raise ValueError(msg)
    obs_layer, pred_layer = layers
    for layer in layers:
        if layer is not None and layer not in adata.layers:
            raise U.missing_layer_error(adata, layer)
    observed = U.log1p_values(adata, gene, obs_layer, reference=pred_layer)
    predicted = U.log1p_values(adata, gene, pred_layer, reference=pred_layer)
    ok = np.isfinite(observed) & np.isfinite(predicted)
    r = pearson(observed[ok], predicted[ok])
    fig, axes = U.make_axes(1, ax=ax, ncols=1, panel_size=(3.6, 3.6))
    axis = axes[0]
    axis.scatter(observed[ok], predicted[ok], s=size, color=color, alpha=0.7, linewidths=0)
    lo = float(min(observed[ok].min(initial=0.0), predicted[ok].min(initial=0.0)))
    hi = float(max(observed[ok].max(initial=1.0), predicted[ok].max(initial=1.0)))
    axis.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel(f"observed log1p ({obs_layer or 'X'})")
    axis.set_ylabel(f"predicted ({pred_layer or 'X'})")
    axis.set_title(U.titled(f"{gene}: r = {r:.3f} (n = {int(ok.sum())})", slide))
    return U.finish(fig, axes, show=show, return_fig=return_fig, save=save)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation (NaN when either side is constant or has fewer than 2 values)."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# ---------------------------------------------------------------------------- attention
def attention_shares(
    cells_table: ad.AnnData, *, spot: str, gene: str, layer: str | None = K.PRED
) -> pd.Series:
    """Each cell's share of ``spot``'s predicted ``gene`` expression: its attention weight ``A[g, i]``.

    Pseudo-cells are ``A[g, i] · ŷ_spot`` stored as log1p in ``layers[layer]``, so the share
    ``expm1(value) / Σ_spot expm1(value)`` recovers ``A[g, i]``; the shares of a spot sum to 1.
    """
    if K.SPOT_ID not in cells_table.obs:
        msg = f"The cells table has no obs[{K.SPOT_ID!r}]; assign cells to spots with bt.pp first."
        raise KeyError(msg)
    spot_of = cells_table.obs[K.SPOT_ID].astype(str)
    members = np.flatnonzero((spot_of == str(spot)).to_numpy())
    if not len(members):
        raise U.close_matches_error(
            str(spot), spot_of.dropna().unique(), what="Spot", hint="(no cells are assigned to it)"
        )
    values = U.dense_column(cells_table, gene, layer)[members]
    pseudo = np.expm1(values)
    total = float(np.nansum(pseudo))
    if not np.isfinite(total) or total <= 0:
        msg = (
            f"The cells of spot {spot!r} have no positive predicted {gene!r} in layers[{layer!r}], so their "
            "shares are undefined; choose another spot or gene (predictions are written by bt.tl.predict)."
        )
        raise ValueError(msg)
    return pd.Series(pseudo / total, index=cells_table.obs_names[members], name=f"{gene}_share")


@doc_params
def attention(
    sdata: sd.SpatialData,
    *,
    spot: str,
    gene: str,
    layer: str | None = K.PRED,
    table_key: str = K.CELLS,
    spots_key: str = K.SPOTS,
    image_key: str | None = K.IMAGE,
    cmap: Any = "magma",
    margin: float = 0.4,
    scale_bar_um: float | str | None = "auto",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
):
    """The gene-query attention over one spot's cells, drawn over the H&E around the spot.

    Cells of ``spot`` (``obs["spot_id"]``) are coloured by their share of the spot's predicted
    ``gene`` (see :func:`attention_shares`, equal to the attention weight ``A[g, i]``); other
    cells in view are outlined in grey and the spot is a dashed circle.

    Parameters
    ----------
    sdata
        SpatialData with the cells table (pseudo-cells in ``layers[layer]``) and the spots.
    spot
        Spot id (a row of the spots table, as in ``cells.obs["spot_id"]``).
    gene
        The gene.
    layer
        Layer of log1p pseudo-expression in the cells table.
    table_key
        The cells table (polygons from ``"<table_key>_shapes"``, else centroids).
    spots_key
        The spots table (the spot circle from ``"<spots_key>_shapes"``).
    image_key
        Image under the cells; ``None`` for none.
    cmap
        Colour map of the shares.
    margin
        Space around the spot, as a fraction of its diameter.
    {doc_scale_bar_um}
    {doc_ax}
    {doc_show_return_fig}
    {doc_save}

    Returns
    -------
    {doc_returns}
    """
    if not U.is_spatialdata(sdata):
        msg = "attention() draws a spot and its cells and needs a SpatialData object."
        raise TypeError(msg)
    cells_table, _ = U.resolve_table(sdata, table_key)
    if layer is not None and layer not in cells_table.layers:
        raise U.missing_layer_error(cells_table, layer)
    shares = attention_shares(cells_table, spot=spot, gene=gene, layer=layer)
    centre, radius = _spot_circle(sdata, spots_key, spot, cells_table, shares.index)
    half = radius * (1.0 + 2.0 * margin)
    bbox = (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half)

    xy = U.spatial_coords(cells_table)
    shapes = U.linked_shapes(sdata, K.shapes_key(table_key), cells_table)
    members = cells_table.obs_names.get_indexer(shares.index)
    others = np.setdiff1d(np.flatnonzero(U.in_bbox(xy, U.grown_bbox(bbox, 0.05))), members)
    mpp = U.resolve_mpp(sdata, cells_table)

    image = U.load_image(sdata, image_key, bbox)
    fig, axes = U.make_axes(1, ax=ax, ncols=1)
    axis = axes[0]
    U.draw_image(axis, image)
    title = f"{gene} attention over {spot} ({len(shares)} cells)"
    U.style_spatial_axes(axis, bbox, U.titled(title, U.slide_name(sdata, cells_table)))
    fallback_r = (3.0 / mpp) if mpp else radius / 15
    if len(others):
        rest = (
            U.shape_collection(shapes.iloc[others])
            if shapes is not None
            else U.circle_collection(xy[others], fallback_r)
        )
        rest.set_facecolor("none")
        rest.set_edgecolor("grey")
        rest.set_linewidth(0.5)
        rest.set_zorder(2)
        axis.add_collection(rest)
    cells_coll = (
        U.shape_collection(shapes.iloc[members])
        if shapes is not None
        else U.circle_collection(xy[members], fallback_r)
    )
    cells_coll.set_cmap(U.colormap(cmap))
    cells_coll.set_array(shares.to_numpy())
    cells_coll.set_clim(0.0, float(shares.max()))
    cells_coll.set_edgecolor("white")
    cells_coll.set_linewidth(0.4)
    cells_coll.set_zorder(3)
    cells_coll.set_gid("attention_cells")
    axis.add_collection(cells_coll)
    disc = U.circle_collection(np.asarray([centre]), radius)
    disc.set_facecolor("none")
    disc.set_edgecolor("black")
    disc.set_linestyle("--")
    disc.set_linewidth(1.0)
    disc.set_zorder(4)
    axis.add_collection(disc)
    fig.colorbar(cells_coll, ax=axis, shrink=0.8, label=f"share of predicted {gene}")
    U.add_scale_bar(axis, mpp, scale_bar_um)
    return U.finish(fig, axes, show=show, return_fig=return_fig, save=save)


def _spot_circle(sdata, spots_key: str, spot: str, cells_table, member_ids) -> tuple[np.ndarray, float]:
    """Centre and radius (level-0 px) of ``spot``; from its cells when the spots are unknown."""
    if spots_key in sdata.tables:
        spots = sdata.tables[spots_key]
        if str(spot) in spots.obs_names:
            row = spots.obs_names.get_loc(str(spot))
            centre = U.spatial_coords(spots)[row]
            shapes = U.linked_shapes(sdata, K.shapes_key(spots_key), spots)
            if shapes is not None and "radius" in shapes.columns:
                return centre, float(shapes["radius"].iloc[row])
            scale = sdata.attrs.get(K.SCALE, {})
            if scale.get(K.SPOT_DIAMETER_UM) and scale.get(K.MPP):
                return centre, float(scale[K.SPOT_DIAMETER_UM] / scale[K.MPP] / 2)
    xy = U.spatial_coords(cells_table)[cells_table.obs_names.get_indexer(member_ids)]
    centre = xy.mean(axis=0)
    return centre, float(np.max(np.linalg.norm(xy - centre, axis=1))) + 5.0


# ---------------------------------------------------------------------------- training history
@doc_params
def history(
    model_or_history: Any,
    *,
    log_scale: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
):
    """Training and validation loss per epoch, with the best validation epoch marked.

    Parameters
    ----------
    model_or_history
        A model with ``.history`` (``bt.tl.BiTroModel``) or the dict itself, with lists
        ``"epoch"``, ``"train_loss"`` and ``"val_loss"`` (NaN where no validation ran).
    log_scale
        Logarithmic loss axis.
    {doc_ax}
    {doc_show_return_fig}
    {doc_save}

    Returns
    -------
    {doc_returns}
    """
    hist = getattr(model_or_history, "history", model_or_history)
    if not isinstance(hist, Mapping) or "train_loss" not in hist:
        msg = "Expected a model with .history or a dict with 'epoch', 'train_loss' and 'val_loss' lists."
        raise TypeError(msg)
    train = np.asarray(hist["train_loss"], dtype=np.float64)
    if not len(train):
        msg = "The history is empty; train the model first (model.train() or bt.tl.fit)."
        raise ValueError(msg)
    epochs = np.asarray(hist.get("epoch") or np.arange(1, len(train) + 1), dtype=np.float64)
    val = np.asarray(hist.get("val_loss", [np.nan] * len(train)), dtype=np.float64)
    fig, axes = U.make_axes(1, ax=ax, ncols=1)
    axis = axes[0]
    axis.plot(epochs, train, marker="o", markersize=3, label="train", color="#1f77b4")
    has_val = np.isfinite(val)
    if has_val.any():
        axis.plot(
            epochs[has_val], val[has_val], marker="o", markersize=3, label="validation", color="#ff7f0e"
        )
        best = np.flatnonzero(has_val)[int(np.argmin(val[has_val]))]
        axis.axvline(epochs[best], color="grey", linestyle=":", linewidth=0.8)
        axis.scatter([epochs[best]], [val[best]], s=40, facecolor="none", edgecolor="black", zorder=3)
    if log_scale:
        axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.set_title("Training history")
    axis.legend(frameon=False)
    return U.finish(fig, axes, show=show, return_fig=return_fig, save=save)
