"""Shared plotting helpers: figures and axes, tables and layers, image crops and shapes.

Colours live in :mod:`bitro.pl._colors` and the scale bar in :mod:`bitro.pl._scalebar`; both are
re-exported here, so the plots reach every helper as ``U.<name>``.

Coordinates are level-0 pixels of the H&E image (``x`` = column, ``y`` = row), so every panel
is drawn in that frame with the y axis pointing down, and images read at a coarser pyramid
level (or strided) get an ``extent`` in level-0 pixels so overlays line up.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro.pl._colors import (  # noqa: F401  (re-exported: the plots use U.<name>)
    CELLVIT_COLORS,
    NAN_COLOR,
    UNKNOWN_COLOR,
    add_missing_legend,
    category_colors,
    cellvit_colors,
    colormap,
    default_palette,
    missing_label,
    resolve_limit,
)
from bitro.pl._scalebar import SCALE_BAR_HEIGHT_PT, add_scale_bar, nice_length  # noqa: F401

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

BBox = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in level-0 pixels."""

MAX_DISPLAY_PX = 1500
"""Longest side (pixels) of an image array handed to ``imshow``."""
PANEL_SIZE = (4.0, 3.6)
"""Default size (inches) of one panel."""


# ---------------------------------------------------------------------------- data objects
def is_spatialdata(obj: Any) -> bool:
    """Whether ``obj`` is a SpatialData object (duck-typed: it has ``tables`` and ``images``)."""
    return hasattr(obj, "tables") and hasattr(obj, "images")


def resolve_table(
    data: sd.SpatialData | ad.AnnData, table_key: str
) -> tuple[ad.AnnData, sd.SpatialData | None]:
    """Return the table to plot and the SpatialData it came from (``None`` for an AnnData)."""
    if is_spatialdata(data):
        from bitro.io._build import get_table

        return get_table(
            data, table_key, hint="Tables are written by bt.io.read_* and bt.pp functions."
        ), data
    if hasattr(data, "obs") and hasattr(data, "var"):
        return data, None
    msg = f"Expected a SpatialData or AnnData object, got {type(data).__name__}."
    raise TypeError(msg)


def resolve_mpp(data: sd.SpatialData | ad.AnnData, adata: ad.AnnData | None = None, mpp: float | None = None):
    """µm per level-0 pixel: ``mpp`` if given, else the scale recorded on ``data`` or its table; ``None`` if unknown."""
    if mpp is not None:
        return float(mpp)
    from bitro.io._build import get_mpp

    for obj in (data, adata):
        if obj is None:
            continue
        try:
            return get_mpp(obj)
        except ValueError:
            continue
    logger.info("No µm-per-pixel scale recorded; drawing without a scale bar (pass mpp= or bt.io.set_scale).")
    return None


def slide_name(data: sd.SpatialData | ad.AnnData, adata: ad.AnnData | None = None) -> str | None:
    """The slide's name: ``sample_id`` of its recorded scale, else the only value of ``obs["sample_id"]``."""
    from bitro.io._build import get_scale

    for obj in (data, adata):
        if obj is None:
            continue
        try:
            name = get_scale(obj).get("sample_id")
        except ValueError:
            continue
        if name:
            return str(name)
    if adata is not None and "sample_id" in adata.obs:
        values = adata.obs["sample_id"].dropna().unique()
        if len(values) == 1:
            return str(values[0])
    return None


def titled(title: str, slide: str | None) -> str:
    """``title`` prefixed with the slide name (``"C2 · ERBB2 · observed"``)."""
    return title if not slide else f"{slide} · {title}"


def close_matches_error(name: str, options: Sequence[str], *, what: str, hint: str = "") -> KeyError:
    """A :class:`KeyError` naming ``name`` and the closest valid ``options``."""
    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(name), options, n=5, cutoff=0.5)
    msg = f"{what} {name!r} not found"
    if close:
        msg += f"; did you mean one of {close}?"
    elif len(options) <= 20:
        msg += f"; available: {sorted(options)}."
    else:
        msg += f" (there are {len(options)}; e.g. {sorted(options)[:10]})."
    if hint:
        msg += f" {hint}"
    return KeyError(msg)


def dense_column(adata: ad.AnnData, gene: str, layer: str | None) -> np.ndarray:
    """Values of ``gene`` in ``adata.layers[layer]`` (``X`` when ``layer`` is ``None``) as float64."""
    if gene not in adata.var_names:
        raise close_matches_error(gene, adata.var_names, what="Gene")
    if layer is not None and layer not in adata.layers:
        raise missing_layer_error(adata, layer)
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        msg = "adata.X is empty; pass layer= naming a layer with values."
        raise ValueError(msg)
    column = matrix[:, adata.var_names.get_loc(gene)]
    if hasattr(column, "toarray"):
        column = column.toarray()
    return np.asarray(column, dtype=np.float64).ravel()


def missing_layer_error(adata: ad.AnnData, layer: str) -> KeyError:
    """The error raised for a missing layer, pointing at the function that writes it."""
    hint = (
        "Predictions are written by bt.tl.predict (layer 'bitro')."
        if layer != K.COUNTS_LAYER
        else "Raw counts are stored by the bt.io readers."
    )
    return KeyError(f"Layer {layer!r} not found; available layers: {sorted(adata.layers)}. {hint}")


def is_prediction_layer(adata: ad.AnnData, layer: str | None) -> bool:
    """Whether ``layer`` holds bitro predictions (already log1p): it has provenance in ``.uns[layer]``."""
    return layer is not None and isinstance(adata.uns.get(layer), dict) and layer != K.COUNTS_LAYER


def log1p_values(
    adata: ad.AnnData, gene: str, layer: str | None, *, reference: str | None = None
) -> np.ndarray:
    """``gene`` on the log1p scale: predictions as they are, counts as ``log1p(counts)``.

    When ``reference`` names a prediction layer made on the ``library_size`` scale
    (``.uns[reference]["target_scale"]``), counts are first rescaled to its ``target_sum``
    so that observed and predicted values share one scale.
    """
    values = dense_column(adata, gene, layer)
    if is_prediction_layer(adata, layer):
        return values
    meta = adata.uns.get(reference) if reference is not None else None
    if isinstance(meta, dict) and meta.get("target_scale") == "library_size" and meta.get("target_sum"):
        matrix = adata.X if layer is None else adata.layers[layer]
        total = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(total > 0, values / total * float(meta["target_sum"]), 0.0)
    return np.log1p(np.clip(values, 0.0, None))


def spatial_coords(adata: ad.AnnData) -> np.ndarray:
    """``obsm["spatial"]`` (level-0 pixels, x then y) as an ``n × 2`` float array."""
    if K.SPATIAL not in adata.obsm:
        msg = f"The table has no obsm[{K.SPATIAL!r}] (centres in level-0 pixels); the bt.io readers store it."
        raise KeyError(msg)
    return np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[:, :2]


def linked_shapes(sdata: sd.SpatialData | None, shapes_key: str, adata: ad.AnnData):
    """Shapes ``shapes_key`` re-ordered to the rows of ``adata`` (``None`` if absent)."""
    if sdata is None or shapes_key not in sdata.shapes:
        return None
    shapes = sdata.shapes[shapes_key]
    ids = adata.obs[K.INSTANCE_KEY].astype(str) if K.INSTANCE_KEY in adata.obs else adata.obs_names
    index = shapes.index.astype(str)
    pos = index.get_indexer(np.asarray(ids))
    if (pos < 0).any():
        logger.warning(
            "%d rows of the table have no shape in %r; using centroids.", int((pos < 0).sum()), shapes_key
        )
        return None
    return shapes.iloc[pos]


# ---------------------------------------------------------------------------- figures
def make_axes(
    n_panels: int,
    *,
    ax: Axes | Sequence[Axes] | None,
    ncols: int | None,
    panel_size: tuple[float, float] = PANEL_SIZE,
) -> tuple[Figure, list[Axes]]:
    """Figure and ``n_panels`` axes: the ``ax`` given (one per panel) or a new grid."""
    import matplotlib.pyplot as plt

    if ax is not None:
        axes = [ax] if not isinstance(ax, Sequence | np.ndarray) else list(np.ravel(ax))
        if len(axes) != n_panels:
            msg = f"This plot has {n_panels} panels but {len(axes)} axes were passed; pass ax=None or {n_panels} axes."
            raise ValueError(msg)
        return axes[0].figure, axes
    ncols = max(1, min(n_panels, ncols or n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    fig, grid = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
        layout="constrained",
    )
    flat = list(grid.ravel())
    for extra in flat[n_panels:]:
        extra.remove()
    return fig, flat[:n_panels]


def finish(
    fig: Figure,
    axes: list[Axes],
    *,
    show: bool | None,
    return_fig: bool,
    save: str | os.PathLike | None = None,
):
    """Save the figure if asked, then return by scanpy's convention: the Figure if ``return_fig``, else the Axes unless shown."""
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        save_figure(fig, save)
    if return_fig:
        return fig
    if show is None:
        show = matplotlib.is_interactive()
    if show:
        plt.show()
        return None
    return axes[0] if len(axes) == 1 else axes


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` at ``dpi`` (default ``bt.settings.savefig_dpi``) with a tight bounding box.

    An existing file is replaced only when it is a figure matplotlib wrote (its header or trailer
    names matplotlib; for JPEG, GIF, TIFF and WebP, which carry no writer name: an image of that
    format); any other file is refused, so a user's notes or data are never overwritten.
    """
    from bitro._settings import settings

    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    formats = set(fig.canvas.get_supported_filetypes())
    if suffix not in formats:
        msg = (
            f"save={str(path)!r}: the file name needs a figure suffix ({', '.join(sorted(formats))}), "
            f"got {path.suffix or 'none'!r}; e.g. save='figure.png'."
        )
        raise ValueError(msg)
    if path.is_dir():
        msg = f"save={str(path)!r} is a folder; pass a file name such as {str(path / 'figure.png')!r}."
        raise IsADirectoryError(msg)
    if path.exists() and not _written_by_matplotlib(path):
        msg = (
            f"save={str(path)!r} exists and is not a figure matplotlib wrote; bitro replaces only figures. "
            "Choose another file name or move the file away."
        )
        raise FileExistsError(msg)
    if path.exists():
        logger.info("Replacing the figure %s.", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=settings.savefig_dpi if dpi is None else dpi, bbox_inches="tight")
    return path


_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "gif": "GIF", "tif": "TIFF", "tiff": "TIFF", "webp": "WEBP"}
"""Raster formats matplotlib writes through Pillow without naming itself, by suffix → Pillow format."""


def _written_by_matplotlib(path: Path, span: int = 65536) -> bool:
    """Whether ``path`` is a figure an earlier ``save=`` may have written.

    Its first or last ``span`` bytes name matplotlib (PNG, SVG, PDF, PS metadata), or — for formats
    that carry no writer name (JPEG, GIF, TIFF, WebP) — it is an image of the format its suffix says.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(span)
            fh.seek(max(0, path.stat().st_size - span))
            tail = fh.read(span)
    except OSError:
        return False
    if b"matplotlib" in head.lower() or b"matplotlib" in tail.lower():
        return True
    expected = _PIL_FORMATS.get(path.suffix.lower().lstrip("."))
    if expected is None:
        return False
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format == expected
    except (OSError, UnidentifiedImageError):
        return False


def style_spatial_axes(ax: Axes, bbox: BBox, title: str | None = None) -> None:
    """Image-like axes over ``bbox`` (y down, equal aspect, no ticks)."""
    x0, y0, x1, y1 = bbox
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)


def padded_bbox(xy: np.ndarray, pad: float) -> BBox:
    """Bounding box of the points ``xy`` grown by ``pad`` pixels on every side."""
    lo, hi = np.nanmin(xy, axis=0) - pad, np.nanmax(xy, axis=0) + pad
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def grown_bbox(bbox: BBox, fraction: float) -> BBox:
    """``bbox`` grown by ``fraction`` of its larger side on every side (to catch shapes cut by the edge)."""
    pad = fraction * max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    return bbox[0] - pad, bbox[1] - pad, bbox[2] + pad, bbox[3] + pad


def check_crop(crop: Sequence[float] | None) -> BBox | None:
    """Validate a ``(x0, y0, x1, y1)`` crop in level-0 pixels."""
    if crop is None:
        return None
    if len(crop) != 4 or not (crop[2] > crop[0] and crop[3] > crop[1]):
        msg = f"crop must be (x0, y0, x1, y1) in level-0 pixels with x1 > x0 and y1 > y0, got {crop!r}."
        raise ValueError(msg)
    return tuple(float(c) for c in crop)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- image
def read_image(
    sdata: sd.SpatialData, image_key: str, bbox: BBox | None = None, *, max_px: int = MAX_DISPLAY_PX
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Read ``bbox`` of image ``image_key`` for display, at most ``max_px`` pixels on a side.

    The coarsest pyramid level that still has at least ``max_px`` pixels across the crop is
    read and then strided, so a whole slide is never loaded at full resolution.

    Returns
    -------
    The ``(y, x, c)`` array and its ``imshow`` extent ``(left, right, bottom, top)`` in level-0 pixels.
    """
    from bitro.io._build import get_image, image_levels

    levels = image_levels(sdata, image_key)
    h0, w0 = levels[0]
    if bbox is None:
        bbox = (0.0, 0.0, float(w0), float(h0))
    x0, y0 = max(0, int(np.floor(bbox[0]))), max(0, int(np.floor(bbox[1])))
    x1, y1 = min(w0, int(np.ceil(bbox[2]))), min(h0, int(np.ceil(bbox[3])))
    if x1 <= x0 or y1 <= y0:
        msg = f"The view {bbox} does not overlap image {image_key!r} ({w0} x {h0} px)."
        raise ValueError(msg)
    span = max(x1 - x0, y1 - y0)
    level = 0
    for i, (_, w) in enumerate(levels):
        if span * w / w0 >= min(max_px, span):
            level = i
    h, w = levels[level]
    fx, fy = w0 / w, h0 / h
    ax0, ay0 = int(np.floor(x0 / fx)), int(np.floor(y0 / fy))
    ax1, ay1 = min(w, int(np.ceil(x1 / fx))), min(h, int(np.ceil(y1 / fy)))
    stride = max(1, int(np.ceil(max(ax1 - ax0, ay1 - ay0) / max_px)))
    array = get_image(sdata, image_key, level=level)
    data = getattr(array, "data", array)[:3, ay0:ay1:stride, ax0:ax1:stride]
    rgb = np.moveaxis(np.asarray(data.compute() if hasattr(data, "compute") else data), 0, -1)
    if rgb.dtype != np.uint8:
        rgb = rgb.astype(np.float32)
        top = float(np.nanmax(rgb)) if rgb.size else 1.0
        rgb = np.clip(rgb / (255.0 if top > 1.0 else 1.0), 0.0, 1.0)
    n_y, n_x = rgb.shape[:2]
    extent = (ax0 * fx, (ax0 + n_x * stride) * fx, (ay0 + n_y * stride) * fy, ay0 * fy)
    logger.debug("read_image %s: level %d, stride %d, %s px", image_key, level, stride, rgb.shape[:2])
    return rgb, extent


def load_image(sdata: sd.SpatialData | None, image_key: str | None, bbox: BBox):
    """The display crop of ``image_key`` over ``bbox`` (see :func:`read_image`); ``None`` without an image."""
    if sdata is None or image_key is None:
        return None
    from bitro._validate import check_key

    check_key(
        image_key, sdata.images.keys(), what="image", hint="Pass image_key=None to plot without an image."
    )
    return read_image(sdata, image_key, bbox)


def draw_image(ax: Axes, image: tuple[np.ndarray, tuple[float, float, float, float]] | None) -> None:
    """Draw a crop returned by :func:`load_image` under the overlays."""
    if image is None:
        return
    rgb, extent = image
    ax.imshow(rgb, extent=extent, origin="upper", interpolation="antialiased", zorder=0)


# ---------------------------------------------------------------------------- shapes
def circle_collection(xy: np.ndarray, radius: np.ndarray | float, **kwargs: Any):
    """A ``PatchCollection`` of circles (radius in data units, i.e. level-0 pixels)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(xy),))
    return PatchCollection([Circle((x, y), r) for (x, y), r in zip(xy, radius)], **kwargs)


def polygon_vertices(shapes) -> list[np.ndarray]:
    """Exterior vertices of each (multi)polygon in ``shapes`` (largest part of a multipolygon)."""
    verts = []
    for geom in shapes.geometry:
        if geom is None or geom.is_empty:
            verts.append(np.zeros((0, 2)))
            continue
        if geom.geom_type == "MultiPolygon":
            geom = max(geom.geoms, key=lambda g: g.area)
        verts.append(np.asarray(geom.exterior.coords)[:, :2])
    return verts


def shape_collection(shapes, **kwargs: Any):
    """Circles (a ``radius`` column) or polygons of a shapes GeoDataFrame as one collection."""
    from matplotlib.collections import PolyCollection

    if "radius" in shapes.columns:
        xy = np.column_stack([shapes.geometry.x, shapes.geometry.y])
        return circle_collection(xy, shapes["radius"].to_numpy(), **kwargs)
    return PolyCollection(polygon_vertices(shapes), **kwargs)


def in_bbox(xy: np.ndarray, bbox: BBox) -> np.ndarray:
    """Boolean mask of the points inside ``bbox``."""
    return (xy[:, 0] >= bbox[0]) & (xy[:, 0] <= bbox[2]) & (xy[:, 1] >= bbox[1]) & (xy[:, 1] <= bbox[3])


def points_per_pixel(ax: Axes) -> float:
    """Typographic points per data unit along x for the current limits and figure size."""
    x0, x1 = ax.get_xlim()
    width_in = ax.get_position().width * ax.figure.get_figwidth()
    return width_in * 72.0 / max(abs(x1 - x0), 1e-9)


# ---------------------------------------------------------------------------- colours
