"""Resampling a slide's H&E image by a factor, with its spots moved to match (shared by shifts and augmentation).

The image is resampled while the recorded µm per pixel is kept, so nuclei look larger or smaller
and more or fewer of them fall in a spot, as on a slide scanned at another magnification.
:func:`rescaled_copy` makes that copy; :func:`bitro.datasets.rescale` (a simulated test-time shift)
and :func:`bitro.pp.augment_slide` (training-time augmentation) both build on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro.io._build import get_image, image_levels

if TYPE_CHECKING:
    import spatialdata as sd


def check_factor(factor: float, *, name: str = "factor") -> float:
    """``factor`` as a float, or a ``ValueError`` when it is not a positive finite number."""
    try:
        value = float(factor)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        msg = f"{name} must be a positive number (e.g. 0.8 or 1.2), got {factor!r}."
        raise ValueError(msg)
    return value


def rescaled_copy(
    sdata: sd.SpatialData, factor: float, *, image_key: str = K.IMAGE
) -> tuple[sd.SpatialData, dict[str, Any]]:
    """A new SpatialData with image ``image_key`` resampled by ``factor`` and the spots moved to match.

    What is kept and what is dropped is described in :func:`bitro.datasets.rescale`: the image is
    resampled lazily, circles (spots) and their tables are scaled, tables annotating polygons (cells)
    with their polygons, other images, labels and points are left out. ``attrs`` are deep-copied
    (the stain records of left-out images removed).

    Returns
    -------
    The copy and ``{"shape_before", "shape_after", "dropped"}`` (``dropped``: element names left out,
    by kind; kinds with none left out are omitted).
    """
    import copy

    import spatialdata as sd

    from bitro.io._build import image_element
    from bitro.pp._stain import STAIN_ATTRS_KEY

    factor = check_factor(factor)
    level0 = get_image(sdata, image_key)
    c, height, width = (int(n) for n in level0.shape)
    out_h, out_w = round(height * factor), round(width * factor)
    if min(out_h, out_w) < 1:
        msg = f"factor={factor:g} leaves no pixel of the {width} × {height} image; pass a larger factor."
        raise ValueError(msg)
    check_rgb(c, image_key)
    data = level0.data[:3]
    chunk = int(data.chunksize[1]) if hasattr(data, "chunksize") else 1024
    resampled = data if factor == 1.0 else resample_image(data, factor, chunk=chunk)
    shapes_yx = image_levels(sdata, image_key)
    scale_factors = [max(1, round(shapes_yx[i - 1][0] / shapes_yx[i][0])) for i in range(1, len(shapes_yx))]
    images = {image_key: image_element(resampled, scale_factors=scale_factors or None, chunks=chunk)}

    tables, shapes, dropped = _scale_tables_and_shapes(sdata, factor)
    dropped["images"] = sorted(k for k in sdata.images if k != image_key)
    dropped["labels"] = sorted(sdata.labels)
    dropped["points"] = sorted(sdata.points)
    out = sd.SpatialData(images=images, shapes=shapes, tables=tables)
    out.attrs.update(copy.deepcopy(dict(sdata.attrs)))
    if STAIN_ATTRS_KEY in out.attrs:
        out.attrs[STAIN_ATTRS_KEY] = {k: v for k, v in out.attrs[STAIN_ATTRS_KEY].items() if k in images}
    dropped = {k: v for k, v in dropped.items() if v}
    return out, {"shape_before": [height, width], "shape_after": [out_h, out_w], "dropped": dropped}


def check_rgb(n_channels: int, image_key: str) -> None:
    """A ``ValueError`` unless the image has 3 (RGB) or 4 (RGBA) channels."""
    if n_channels not in (3, 4):
        msg = f"Image {image_key!r} has {n_channels} channels; an RGB H&E image (3 channels) is expected."
        raise ValueError(msg)


def resample_image(data: Any, factor: float, *, chunk: int = 1024) -> Any:
    """Resample a ``(c, y, x)`` uint8 array (numpy or dask) by ``factor``, lazily, block by block.

    Output pixel ``(i, j)`` samples the source at ``((i + ½)/factor − ½, (j + ½)/factor − ½)``
    bilinearly (edges repeat the border pixel). When shrinking, the source is first smoothed with
    a Gaussian of ``σ = (1/factor − 1)/2`` px against aliasing. Each output block reads only the
    source window it needs, with a margin that makes the result identical to resampling the whole
    image at once.
    """
    import dask
    import dask.array as da

    source = (
        data
        if isinstance(data, da.Array)
        else da.from_array(np.asarray(data), chunks=(data.shape[0], chunk, chunk))
    )
    c, height, width = (int(n) for n in source.shape)
    out_h, out_w = max(1, round(height * factor)), max(1, round(width * factor))
    sigma = max(0.0, (1.0 / factor - 1.0) / 2.0)
    margin = int(np.ceil(4.0 * sigma)) + 2
    rows = []
    for y0 in range(0, out_h, chunk):
        sy = _source_coords(y0, min(y0 + chunk, out_h), factor)
        ya, yb = _window(sy, margin, height)
        row = []
        for x0 in range(0, out_w, chunk):
            sx = _source_coords(x0, min(x0 + chunk, out_w), factor)
            xa, xb = _window(sx, margin, width)
            block = dask.delayed(_resample_block, pure=True)(source[:, ya:yb, xa:xb], sy - ya, sx - xa, sigma)
            row.append(da.from_delayed(block, shape=(c, len(sy), len(sx)), dtype=np.uint8))
        rows.append(row)
    return da.block([rows])


def _source_coords(start: int, stop: int, factor: float) -> np.ndarray:
    return (np.arange(start, stop, dtype=np.float64) + 0.5) / factor - 0.5


def _window(coords: np.ndarray, margin: int, size: int) -> tuple[int, int]:
    lo = int(np.clip(np.floor(coords[0]) - margin, 0, size - 1))
    hi = int(np.clip(np.ceil(coords[-1]) + margin + 1, lo + 1, size))
    return lo, hi


def _resample_block(window: np.ndarray, sy: np.ndarray, sx: np.ndarray, sigma: float) -> np.ndarray:
    """Bilinear samples of ``window`` (``c, h, w``) at rows ``sy`` × columns ``sx`` (window coordinates)."""
    from scipy import ndimage

    window = np.asarray(window)
    out = np.empty((window.shape[0], len(sy), len(sx)), dtype=np.uint8)
    grid = np.meshgrid(sy, sx, indexing="ij")
    for ch in range(window.shape[0]):
        plane = window[ch].astype(np.float32)
        if sigma > 0:
            plane = ndimage.gaussian_filter(plane, sigma, mode="nearest")
        values = ndimage.map_coordinates(plane, grid, order=1, mode="nearest")
        out[ch] = np.clip(np.rint(values), 0, 255)
    return out


def scale_xy(xy: np.ndarray, factor: float) -> np.ndarray:
    """Pixel coordinates mapped like the image: ``(p + ½)·factor − ½`` (pixel centres at integers)."""
    return (np.asarray(xy, dtype=np.float64) + 0.5) * factor - 0.5


def _scale_tables_and_shapes(sdata: sd.SpatialData, factor: float) -> tuple[dict, dict, dict[str, list[str]]]:
    """Tables and shapes of the rescaled slide: circles scaled, polygon-annotating tables dropped."""
    from spatialdata.models import TableModel

    dropped: dict[str, list[str]] = {"tables": [], "shapes": []}
    polygon_shapes = {k for k, gdf in sdata.shapes.items() if "radius" not in gdf.columns}
    tables = {}
    for key, table in sdata.tables.items():
        attrs = table.uns.get(TableModel.ATTRS_KEY) or {}
        regions = {str(r) for r in np.atleast_1d(attrs.get(TableModel.REGION_KEY, []))}
        if regions & polygon_shapes:
            dropped["tables"].append(key)
            continue
        new = table.copy()
        if K.SPATIAL in new.obsm:
            xy = np.asarray(new.obsm[K.SPATIAL], dtype=np.float64).copy()
            xy[:, :2] = scale_xy(xy[:, :2], factor)
            new.obsm[K.SPATIAL] = xy
        if K.N_CELLS in new.obs:
            del new.obs[K.N_CELLS]
        if K.DISTANCES in new.obsp:
            new.obsp[K.DISTANCES] = new.obsp[K.DISTANCES] * factor
        tables[key] = new
    annotated_by_dropped = set()
    for key in dropped["tables"]:
        attrs = sdata.tables[key].uns.get(TableModel.ATTRS_KEY) or {}
        annotated_by_dropped |= {str(r) for r in np.atleast_1d(attrs.get(TableModel.REGION_KEY, []))}
    shapes = {}
    for key, gdf in sdata.shapes.items():
        if key in annotated_by_dropped:
            dropped["shapes"].append(key)
            continue
        shapes[key] = _scale_shapes(gdf, factor)
    return tables, shapes, dropped


def _scale_shapes(gdf: Any, factor: float) -> Any:
    """Shapes mapped like the image: ``(p + ½)·factor − ½``; circle radii × ``factor``."""
    import shapely
    from spatialdata.models import ShapesModel

    out = gdf.copy()
    offset = 0.5 * factor - 0.5
    out.geometry = shapely.transform(np.asarray(gdf.geometry.values), lambda pts: pts * factor + offset)
    if "radius" in out.columns:
        out["radius"] = out["radius"].to_numpy(dtype=np.float64) * factor
    return ShapesModel.parse(out)
