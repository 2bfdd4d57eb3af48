"""A square window of a slide as a new SpatialData in the window's own pixel frame (``bt.datasets.crop``).

bitro keeps every element in level-0 pixels of the H&E image with an identity transformation
(see ``docs/concepts.md``). spatialdata's ``bounding_box_query`` keeps the global frame and adds
a translation instead, so the window is cut here directly: pixel ``(0, 0)`` of the result is the
window's top-left corner and every coordinate is shifted by the same offset.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

CROP_ATTRS_KEY = "bitro_crop"
"""Key of ``sdata.attrs`` recording where a cropped object was cut from."""

Window = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` in level-0 pixels, ``x1``/``y1`` exclusive."""


def crop(
    sdata: sd.SpatialData,
    *,
    size_um: float,
    center: Sequence[float] | None = None,
    image_key: str = K.IMAGE,
    keep: Literal["centre", "whole"] = "centre",
) -> sd.SpatialData:
    """A square window of ``size_um`` µm around ``center``, as a new SpatialData in the window's frame.

    The window is ``round(size_um / mpp)`` level-0 pixels wide (``mpp`` from
    ``sdata.attrs["bitro_scale"]``); where it passes the image border it is cut at the border.
    Pixel ``(0, 0)`` of the result is the window's top-left corner; every coordinate is
    translated accordingly and keeps the identity transformation. ``sdata`` is not modified and
    the result does not refer to it: the window's pixels are loaded into memory (a window is
    meant to be small; for whole-slide work use the lazy images of ``sdata`` directly).

    Kept in the result:

    - images and labels with the level-0 size of ``image_key`` and an identity transformation,
      cut to the window (others, e.g. a low-resolution tissue mask, are left out: recompute them);
    - rows of every table with ``obsm["spatial"]`` whose centre lies in the window (with
      ``keep="whole"``: whose whole shape does), ``obsp`` graphs subset with them, and the
      shapes they annotate (the same instances);
    - the shapes of other shapes elements whose centroid (whole shape) lies in the window;
    - ``sdata.attrs`` (the scale, ``"bitro_scale"``, among them), plus ``attrs["bitro_crop"]``.

    Shapes are translated, not clipped: a polygon or circle cut by the border is kept whole.
    Tables without ``obsm["spatial"]`` (e.g. ``"bulk"``, which describes the whole section) and
    points elements are left out.

    Parameters
    ----------
    sdata
        SpatialData in bitro's convention (level-0 pixels of ``image_key``).
    size_um
        Side of the window in µm.
    center
        Centre ``(x, y)`` of the window in level-0 pixels; default: the spot (table
        ``"spots"``) nearest the median spot position, or the image centre without spots.
    image_key
        Image whose pixels define the window.
    keep
        ``"centre"``: keep the spots, cells and shapes whose centre lies in the window;
        ``"whole"``: only those whose whole shape (a spot's disc, a nucleus polygon) lies in it,
        e.g. to train only on spots whose tissue is all in the image.

    Returns
    -------
    A new SpatialData; ``attrs["bitro_crop"]`` holds ``window_px`` (``x0, y0, x1, y1`` in the
    frame of ``sdata``), ``offset_px`` (the corner in the frame of the uncropped slide, when
    ``sdata`` was itself a crop), ``center`` and ``size_um``.

    Examples
    --------
    >>> sdata = bt.datasets.synthetic_tissue(size=1200, seed=0)
    >>> window = bt.datasets.crop(sdata, size_um=300)
    """
    import spatialdata as sd

    from bitro.io._build import get_image, get_mpp

    height, width = (int(n) for n in get_image(sdata, image_key).shape[1:])
    mpp = get_mpp(sdata)
    if not np.isfinite(size_um) or size_um <= 0:
        msg = f"size_um must be a positive window side in µm, got {size_um!r}."
        raise ValueError(msg)
    size_px = round(float(size_um) / mpp)
    if size_px < 1:
        msg = f"size_um={size_um!r} is less than one pixel ({mpp:g} µm per pixel); pass a larger window."
        raise ValueError(msg)
    if keep not in ("centre", "whole"):
        msg = f"keep must be 'centre' or 'whole', got {keep!r}."
        raise ValueError(msg)
    center_xy = _default_center(sdata, width, height) if center is None else _check_center(center)
    window = _window(center_xy, size_px, width, height, image_key)
    x0, y0, x1, y1 = window

    images = _cut_rasters(sdata.images, window, (height, width), "image")
    labels = _cut_rasters(sdata.labels, window, (height, width), "labels")
    tables, kept_ids = {}, {}
    for key, table in sdata.tables.items():
        if K.SPATIAL not in table.obsm:
            logger.info("crop: table %r has no obsm[%r] (not per location); left out.", key, K.SPATIAL)
            continue
        bounds = _table_bounds(sdata, table) if keep == "whole" else None
        tables[key] = cut = _cut_table(table, window, bounds)
        for region, ids in _instances(cut).items():
            kept_ids.setdefault(region, []).extend(ids)
    shapes = {key: _cut_shapes(gdf, window, kept_ids.get(key), keep) for key, gdf in sdata.shapes.items()}
    if len(sdata.points):
        logger.info("crop: points elements %s are left out.", sorted(sdata.points))

    out = sd.SpatialData(images=images, labels=labels, shapes=shapes, tables=tables)
    out.attrs.update(copy.deepcopy(dict(sdata.attrs)))
    previous = sdata.attrs.get(CROP_ATTRS_KEY, {}).get("offset_px", [0, 0])
    out.attrs[CROP_ATTRS_KEY] = {
        "window_px": [x0, y0, x1, y1],
        "offset_px": [int(previous[0]) + x0, int(previous[1]) + y0],
        "center": [float(c) for c in center_xy],
        "size_um": float(size_um),
        "image_key": image_key,
        "keep": keep,
    }
    logger.info("crop: window x %d–%d, y %d–%d px of %r.", x0, x1, y0, y1, image_key)
    return out


# ---------------------------------------------------------------------------- the window
def _default_center(sdata: sd.SpatialData, width: int, height: int) -> np.ndarray:
    """The spot nearest the median spot position; the image centre without spots."""
    table = sdata.tables.get(K.SPOTS)
    if table is None or K.SPATIAL not in table.obsm or table.n_obs == 0:
        return np.array([width / 2.0, height / 2.0])
    xy = np.asarray(table.obsm[K.SPATIAL], dtype=np.float64)[:, :2]
    return xy[np.argmin(np.linalg.norm(xy - np.median(xy, axis=0), axis=1))]


def _check_center(center: Sequence[float]) -> np.ndarray:
    xy = np.asarray(center, dtype=np.float64).ravel()
    if xy.shape != (2,) or not np.isfinite(xy).all():
        msg = f"center must be (x, y) in level-0 pixels, got {center!r}."
        raise ValueError(msg)
    return xy


def _window(center_xy: np.ndarray, size_px: int, width: int, height: int, image_key: str) -> Window:
    """The ``size_px`` window around ``center_xy``, cut at the image border."""
    x0, y0 = (int(v) for v in np.floor(center_xy - size_px / 2.0))
    x1, y1 = x0 + size_px, y0 + size_px
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx1 <= cx0 or cy1 <= cy0:
        msg = (
            f"The window x {x0}–{x1}, y {y0}–{y1} px does not overlap image {image_key!r} "
            f"({width} × {height} px); pass a center inside the image."
        )
        raise ValueError(msg)
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        logger.info("crop: the window passes the image border; cut to %d × %d px.", cx1 - cx0, cy1 - cy0)
    return cx0, cy0, cx1, cy1


# ---------------------------------------------------------------------------- elements
def _level0(element: Any) -> Any:
    """The level-0 DataArray of a single- or multiscale raster element."""
    if hasattr(element, "children") and len(element.children) > 0:
        first = sorted(element.children, key=lambda s: int(s.replace("scale", "")))[0]
        node = element[first]
        return next(iter(node.data_vars.values())) if hasattr(node, "data_vars") else node
    return element


def _cut_rasters(elements: Any, window: Window, shape: tuple[int, int], kind: str) -> dict[str, Any]:
    """Rasters in the level-0 frame (identity, same size) cut to ``window``; others left out."""
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import Identity, get_transformation

    x0, y0, x1, y1 = window
    out = {}
    for key, element in elements.items():
        array = _level0(element)
        same_frame = isinstance(get_transformation(element, "global"), Identity)
        if not same_frame or tuple(int(array.sizes[a]) for a in ("y", "x")) != shape:
            logger.info("crop: %s %r is not in the level-0 pixel frame; left out (recompute it).", kind, key)
            continue
        data = np.asarray(array.data[..., y0:y1, x0:x1])  # loaded: the result does not hold the source
        chunks = tuple(min(c, n) for c, n in zip(getattr(array.data, "chunksize", data.shape), data.shape))
        if kind == "labels":
            out[key] = Labels2DModel.parse(data, dims=("y", "x"), chunks=chunks)
        else:
            out[key] = Image2DModel.parse(
                data, dims=("c", "y", "x"), c_coords=list(array.coords["c"].values), chunks=chunks
            )
    return out


def _shape_bounds(gdf: Any) -> np.ndarray:
    """``(minx, miny, maxx, maxy)`` of each shape; circles use their ``radius``."""
    if "radius" in gdf.columns:
        x, y, r = gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy(), gdf["radius"].to_numpy(dtype=np.float64)
        return np.column_stack([x - r, y - r, x + r, y + r])
    return gdf.bounds.to_numpy(dtype=np.float64)


def _table_bounds(sdata: sd.SpatialData, table: ad.AnnData) -> np.ndarray | None:
    """Bounds of the shape of each row (NaN where it has none); ``None`` for a table without shapes."""
    from spatialdata.models import TableModel

    attrs = table.uns.get(TableModel.ATTRS_KEY) or {}
    regions = [str(r) for r in np.atleast_1d(attrs.get(TableModel.REGION_KEY, []))]
    if not regions or not any(r in sdata.shapes for r in regions):
        return None
    out = np.full((table.n_obs, 4), np.nan)
    row_regions = table.obs[attrs[TableModel.REGION_KEY_KEY]].astype(str).to_numpy()
    ids = table.obs[attrs[TableModel.INSTANCE_KEY]].astype(str).to_numpy()
    for region in regions:
        if region not in sdata.shapes:
            continue
        gdf = sdata.shapes[region]
        rows = np.flatnonzero(row_regions == region)
        position = gdf.index.astype(str).get_indexer(ids[rows])
        found = position >= 0
        out[rows[found]] = _shape_bounds(gdf)[position[found]]
    return out


def _cut_table(table: ad.AnnData, window: Window, bounds: np.ndarray | None = None) -> ad.AnnData:
    """Rows whose ``obsm["spatial"]`` (or whole ``bounds``, where known) lies in ``window``, translated."""
    from spatialdata.models import TableModel

    x0, y0, x1, y1 = window
    xy = np.asarray(table.obsm[K.SPATIAL], dtype=np.float64)
    local = xy.copy()
    local[:, :2] -= [x0, y0]
    keep = _inside(local[:, :2], x1 - x0, y1 - y0)
    if bounds is not None:
        known = np.isfinite(bounds).all(axis=1)
        keep &= ~known | _bounds_inside(bounds, window)
    cut = table[keep].copy()
    cut.obsm[K.SPATIAL] = local[keep]
    attrs = cut.uns.pop(TableModel.ATTRS_KEY, None)
    if not attrs:
        return TableModel.parse(cut)
    return TableModel.parse(
        cut,
        region=attrs[TableModel.REGION_KEY],
        region_key=attrs[TableModel.REGION_KEY_KEY],
        instance_key=attrs[TableModel.INSTANCE_KEY],
    )


def _instances(table: ad.AnnData) -> dict[str, list[str]]:
    """Instance ids of each shapes region a (cut) table annotates, in table order."""
    from spatialdata.models import TableModel

    attrs = table.uns.get(TableModel.ATTRS_KEY)
    if not attrs:
        return {}
    region_key, instance_key = attrs[TableModel.REGION_KEY_KEY], attrs[TableModel.INSTANCE_KEY]
    regions = table.obs[region_key].astype(str).to_numpy()
    ids = table.obs[instance_key].astype(str).to_numpy()
    return {str(region): list(ids[regions == str(region)]) for region in np.atleast_1d(attrs[TableModel.REGION_KEY])}


def _cut_shapes(gdf: Any, window: Window, ids: list[str] | None, keep: str = "centre") -> Any:
    """Shapes of a kept table (its instances ``ids``), else with a centroid (whole shape) in ``window``, translated."""
    import geopandas as gpd
    from spatialdata.models import ShapesModel

    x0, y0, x1, y1 = window
    if ids is not None:
        index = gdf.index.astype(str)
        position = index.get_indexer(ids)
        if (position < 0).any():
            logger.warning("crop: %d table rows have no shape; their shapes are missing.", (position < 0).sum())
        subset = gdf.iloc[position[position >= 0]]
    else:
        centre = gdf.geometry.centroid
        inside = _inside(np.column_stack([centre.x - x0, centre.y - y0]), x1 - x0, y1 - y0)
        if keep == "whole":
            inside &= _bounds_inside(_shape_bounds(gdf), window)
        subset = gdf[inside]
    frame = pd.DataFrame(subset.drop(columns=subset.geometry.name))
    frame.index = subset.index.astype(str)
    moved = gpd.GeoDataFrame(frame, geometry=subset.geometry.translate(-x0, -y0).to_numpy())
    moved.attrs = {}
    return ShapesModel.parse(moved)


def _inside(local_xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Points with ``0 ≤ x < width`` and ``0 ≤ y < height``."""
    return (local_xy[:, 0] >= 0) & (local_xy[:, 1] >= 0) & (local_xy[:, 0] < width) & (local_xy[:, 1] < height)


def _bounds_inside(bounds: np.ndarray, window: Window) -> np.ndarray:
    """Shapes whose bounds ``(minx, miny, maxx, maxy)`` lie in ``window``."""
    x0, y0, x1, y1 = window
    return (bounds[:, 0] >= x0) & (bounds[:, 1] >= y0) & (bounds[:, 2] <= x1) & (bounds[:, 3] <= y1)
