"""Cell (nucleus) segmentations as SpatialData elements, and importers of precomputed ones.

:func:`write_cells` is the one place that turns polygons + per-cell features into the shapes
element ``"<key>_shapes"`` and the linked table ``"<key>"``; both :func:`bitro.pp.segment_cells`
and :func:`read_cell_segmentation` use it. Supported files:

- GeoJSON ``FeatureCollection`` (or a bare list of features) of ``Polygon`` / ``MultiPolygon``
  features — CellViT and QuPath exports. Every polygon is one cell; a ``MultiPolygon`` feature
  (CellViT groups all cells of one class in one feature) yields one cell per part. The class is
  read from ``properties.classification`` (a string or ``{"name": ...}``), else
  ``properties.class`` / ``type`` / ``cell_type``.
- HoVer-Net JSON ``{"nuc": {id: {"contour": [[x, y], ...], "type": int, ...}}}``.
- GeoParquet (HEST's CellViT segmentations): a geometry column of polygons and an optional class
  column (``class``, ``classification``, ``cell_type``, ``type`` or ``label``).

Coordinates in the files must be level-0 pixels of the image (x = column, y = row).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._validate import check_not_exists
from bitro.io._build import get_mpp, polygons_element, table_element

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

#: Per-cell morphology columns written to ``obs`` (areas in µm², lengths in µm).
CELL_FEATURES = ("area_um2", "perimeter_um", "eccentricity", "solidity", "mean_hematoxylin")
#: ``obs`` column holding imported class labels.
CLASS_COLUMN = "classification"
FORMATS = ("auto", "geojson", "hovernet", "geoparquet")
_CLASS_CANDIDATES = ("class", "classification", "cell_type", "type", "label", "class_name")


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------
def cell_names(n: int) -> list[str]:
    """``["cell_0", ..., "cell_{n-1}"]``."""
    return [f"cell_{i}" for i in range(n)]


def write_cells(
    sdata: sd.SpatialData,
    polygons: Sequence[Any],
    centroids_xy: np.ndarray,
    obs: pd.DataFrame,
    *,
    key_added: str = K.CELLS,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Write cells as shapes ``"<key_added>_shapes"`` and the table ``key_added`` into ``sdata``.

    Parameters
    ----------
    sdata
        Target object (modified in place).
    polygons
        One shapely polygon per cell, level-0 pixel coordinates.
    centroids_xy
        ``(n, 2)`` centroids, x (column) then y (row), level-0 pixels.
    obs
        Per-cell columns (e.g. :data:`CELL_FEATURES`), ``n`` rows in the same order; its index is replaced
        by ``cell_0 …``.
    key_added
        Table name; the shapes are ``f"{key_added}_shapes"``.
    overwrite
        Replace existing elements of those names.
    provenance
        Stored in ``table.uns[key_added]`` (parameters, source, …); the bitro version is added.

    Returns
    -------
    The table written. With zero cells the table has no rows and no shapes element is written
    (spatialdata cannot store an empty shapes element), and a warning is logged.
    """
    import anndata as ad
    from spatialdata.models import TableModel

    import bitro

    shapes_key = K.shapes_key(key_added)
    check_not_exists(key_added, sdata.tables, what="table", overwrite=overwrite)
    check_not_exists(shapes_key, sdata.shapes, what="shapes element", overwrite=overwrite)
    n = len(polygons)
    centroids_xy = np.asarray(centroids_xy, dtype=np.float32).reshape(n, 2)
    if len(obs) != n:
        msg = f"obs has {len(obs)} rows but {n} polygons were given; they must match one to one."
        raise ValueError(msg)
    names = cell_names(n)
    obs = obs.copy()
    obs.index = pd.Index(names, dtype=str)
    for col in obs.columns:
        if pd.api.types.is_float_dtype(obs[col]):
            obs[col] = obs[col].astype(np.float32)
    adata = ad.AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=obs)
    adata.obsm[K.SPATIAL] = centroids_xy
    uns = dict(provenance or {})
    uns["n_cells"] = n
    uns["bitro_version"] = bitro.__version__
    adata.uns[key_added] = uns
    if K.SCALE in sdata.attrs:
        adata.uns[K.SCALE] = dict(sdata.attrs[K.SCALE])

    if shapes_key in sdata.shapes:
        del sdata.shapes[shapes_key]
    if key_added in sdata.tables:
        del sdata.tables[key_added]
    if n == 0:
        logger.warning(
            "No cells were found; wrote an empty table %r and no shapes element. Check the image "
            "(is it H&E at the recorded µm per pixel?) or the segmentation parameters.",
            key_added,
        )
        table = TableModel.parse(adata)
    else:
        sdata.shapes[shapes_key] = polygons_element(polygons, names)
        table = table_element(adata, region=shapes_key)
    sdata.tables[key_added] = table
    return table


# ----------------------------------------------------------------------------------------------------------
# polygon morphology
# ----------------------------------------------------------------------------------------------------------
def _ring_moments(coords: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """Signed area, first and second moments of a closed ring (Green's theorem)."""
    x, y = coords[:, 0], coords[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    a = x * y1 - x1 * y
    area = a.sum() / 2
    sx = ((x + x1) * a).sum() / 6
    sy = ((y + y1) * a).sum() / 6
    sxx = ((x * x + x * x1 + x1 * x1) * a).sum() / 12
    syy = ((y * y + y * y1 + y1 * y1) * a).sum() / 12
    sxy = ((x * y1 + 2 * x * y + 2 * x1 * y1 + x1 * y) * a).sum() / 24
    return area, sx, sy, sxx, syy, sxy


def polygon_eccentricity(polygon: Any) -> float:
    """Eccentricity of the ellipse with the same second moments as ``polygon`` (0 = circle)."""
    from shapely.geometry.polygon import orient

    origin = np.array([polygon.centroid.x, polygon.centroid.y])  # centred coordinates: no cancellation
    total = np.zeros(6)
    for part in getattr(polygon, "geoms", [polygon]):
        part = orient(part, sign=1.0)  # exterior counter-clockwise, holes clockwise (negative moments)
        for ring in (part.exterior, *part.interiors):
            total += np.asarray(_ring_moments(np.asarray(ring.coords)[:, :2] - origin))
    area, sx, sy, sxx, syy, sxy = total
    if area <= 0:
        return float("nan")
    cx, cy = sx / area, sy / area
    cov = np.array(
        [[sxx / area - cx * cx, sxy / area - cx * cy], [sxy / area - cx * cy, syy / area - cy * cy]]
    )
    lam = np.sort(np.linalg.eigvalsh(cov))[::-1]
    if lam[0] <= 0:
        return 0.0
    return float(np.sqrt(max(0.0, 1.0 - max(lam[1], 0.0) / lam[0])))


def polygon_features(polygons: Sequence[Any], mpp: float) -> pd.DataFrame:
    """:data:`CELL_FEATURES` computed from polygons (``mean_hematoxylin`` is NaN: no image is read)."""
    area = np.array([p.area for p in polygons], dtype=np.float64)
    hull = np.array([p.convex_hull.area for p in polygons], dtype=np.float64)
    return pd.DataFrame(
        {
            "area_um2": area * mpp**2,
            "perimeter_um": np.array([p.length for p in polygons], dtype=np.float64) * mpp,
            "eccentricity": np.array([polygon_eccentricity(p) for p in polygons], dtype=np.float64),
            "solidity": np.divide(area, hull, out=np.full_like(area, np.nan), where=hull > 0),
            "mean_hematoxylin": np.full(len(polygons), np.nan),
        }
    )


# ----------------------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------------------
def _corrupt(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"Could not read a cell segmentation from {str(path)!r}: {detail}. Expected a GeoJSON FeatureCollection "
        "of polygons (CellViT/QuPath), a HoVer-Net JSON with a 'nuc' dict, or a GeoParquet file with a "
        "geometry column (HEST CellViT)."
    )


def _class_name(props: dict[str, Any] | None) -> str | None:
    if not props:
        return None
    for key in ("classification", *_CLASS_CANDIDATES):
        value = props.get(key)
        if value is None:
            continue
        if isinstance(value, dict):
            value = value.get("name", value.get("label"))
        if value is not None:
            return str(value)
    return None


def _valid(polygon: Any) -> Any:
    """Repair an invalid polygon; keep the largest part when repair splits it."""
    if not polygon.is_valid:
        polygon = polygon.buffer(0)
    if polygon.geom_type == "MultiPolygon":
        polygon = max(polygon.geoms, key=lambda g: g.area)
    return polygon


def _read_geojson_obj(obj: Any, path: Path) -> tuple[list[Any], list[str | None]]:
    from shapely.geometry import shape

    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features")
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, list):
        features = obj
    else:
        raise _corrupt(path, "no 'features' list, FeatureCollection or 'nuc' dict found")
    if not isinstance(features, list):
        raise _corrupt(path, "'features' is not a list")
    polygons, classes = [], []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or "geometry" not in feat:
            raise _corrupt(path, f"feature {i} has no 'geometry'")
        try:
            geom = shape(feat["geometry"])
        except Exception as err:  # shapely raises several types on malformed geometries
            raise _corrupt(path, f"feature {i} has an invalid geometry ({err})") from err
        label = _class_name(feat.get("properties"))
        parts = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
        for part in parts:
            if part.geom_type != "Polygon":
                raise _corrupt(path, f"feature {i} is a {part.geom_type}, not a Polygon/MultiPolygon")
            polygons.append(part)
            classes.append(label)
    return polygons, classes


def _read_hovernet_obj(obj: dict[str, Any], path: Path) -> tuple[list[Any], list[str | None]]:
    from shapely.geometry import Polygon

    nuc = obj["nuc"]
    if not isinstance(nuc, dict):
        raise _corrupt(path, "'nuc' is not a dict of nuclei")
    polygons, classes = [], []
    for key, inst in nuc.items():
        try:
            contour = np.asarray(inst["contour"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise _corrupt(path, f"nucleus {key!r} has no valid 'contour'") from err
        if contour.ndim != 2 or contour.shape[1] != 2 or len(contour) < 3:
            raise _corrupt(
                path, f"nucleus {key!r} has a contour of shape {contour.shape}, expected (n ≥ 3, 2)"
            )
        polygons.append(Polygon(contour))
        label = inst.get("type")
        classes.append(None if label is None else str(label))
    return polygons, classes


def _read_json(path: Path) -> tuple[list[Any], list[str | None]]:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(path, f"not valid JSON ({err})") from err
    if isinstance(obj, dict) and "nuc" in obj:
        return _read_hovernet_obj(obj, path)
    return _read_geojson_obj(obj, path)


def _read_geoparquet(path: Path) -> tuple[list[Any], list[str | None]]:
    import geopandas as gpd

    try:
        gdf = gpd.read_parquet(path)
    except Exception as err:  # pyarrow/geopandas raise many types for a bad file
        raise _corrupt(path, f"not a GeoParquet file ({type(err).__name__}: {err})") from err
    polygons, classes = [], []
    col = next((c for c in _CLASS_CANDIDATES if c in gdf.columns), None)
    labels = [None] * len(gdf) if col is None else [None if pd.isna(v) else str(v) for v in gdf[col]]
    for i, (geom, label) in enumerate(zip(gdf.geometry, labels, strict=True)):
        if geom is None or geom.is_empty:
            continue
        parts = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
        for part in parts:
            if part.geom_type != "Polygon":
                raise _corrupt(path, f"row {i} is a {part.geom_type}, not a Polygon/MultiPolygon")
            polygons.append(part)
            classes.append(label)
    return polygons, classes


def _detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".parquet", ".geoparquet", ".pq")):
        return "geoparquet"
    if name.endswith((".geojson", ".json")):
        return "geojson"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PAR1":
        return "geoparquet"
    return "geojson"


def read_cell_segmentation(
    sdata: sd.SpatialData,
    path: str | Path,
    *,
    format: str = "auto",
    key_added: str = K.CELLS,
    mpp: float | None = None,
    overwrite: bool = False,
) -> ad.AnnData:
    """Import a precomputed nucleus segmentation (CellViT, HoVer-Net, HEST) into ``sdata``.

    Parameters
    ----------
    sdata
        Target object; the polygons must be in level-0 pixels of its image.
    path
        GeoJSON / HoVer-Net JSON / GeoParquet file.
    format
        ``"auto"`` (by suffix: ``.parquet`` → GeoParquet, ``.json``/``.geojson`` → JSON, whose content
        tells GeoJSON from HoVer-Net), ``"geojson"``, ``"hovernet"`` or ``"geoparquet"``.
    key_added
        Table name; shapes go to ``f"{key_added}_shapes"``.
    mpp
        µm per level-0 pixel used for the µm features; default the scale recorded on ``sdata``.
    overwrite
        Replace existing elements.

    Returns
    -------
    The table ``sdata.tables[key_added]``: ``obsm["spatial"]`` polygon centroids (x, y; level-0 px),
    ``obs`` columns ``area_um2``, ``perimeter_um``, ``eccentricity``, ``solidity`` (from the
    polygons), ``mean_hematoxylin`` (NaN: the image is not read), ``classification`` (the file's
    class label, categorical; missing labels are ``"unknown"``) when the file has labels, and
    ``uns[key_added]`` with the source file and format. Shapes ``"<key_added>_shapes"``: one
    polygon per cell, same order.
    """
    path = Path(path)
    if format not in FORMATS:
        msg = f"format must be one of {FORMATS}, got {format!r}."
        raise ValueError(msg)
    if not path.is_file():
        msg = f"Cell segmentation file {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    um_per_px = get_mpp(sdata) if mpp is None else float(mpp)
    if not np.isfinite(um_per_px) or um_per_px <= 0:
        msg = f"mpp must be a positive number of µm per pixel, got {mpp!r}."
        raise ValueError(msg)
    check_not_exists(key_added, sdata.tables, what="table", overwrite=overwrite)
    fmt = _detect_format(path) if format == "auto" else format
    if fmt == "geoparquet":
        polygons, classes = _read_geoparquet(path)
    else:
        polygons, classes = _read_json(path)
    polygons = [_valid(p) for p in polygons]
    keep = [i for i, p in enumerate(polygons) if not p.is_empty and p.area > 0]
    if len(keep) < len(polygons):
        logger.warning("Dropped %d empty or zero-area polygons from %s.", len(polygons) - len(keep), path)
    polygons = [polygons[i] for i in keep]
    classes = [classes[i] for i in keep]
    obs = polygon_features(polygons, um_per_px)
    if any(c is not None for c in classes):
        obs[CLASS_COLUMN] = pd.Categorical(["unknown" if c is None else c for c in classes])
    centroids = np.array([[p.centroid.x, p.centroid.y] for p in polygons], dtype=np.float64).reshape(-1, 2)
    provenance = {"source": str(path), "format": fmt, "mpp": um_per_px, "method": "import"}
    table = write_cells(
        sdata, polygons, centroids, obs, key_added=key_added, overwrite=overwrite, provenance=provenance
    )
    logger.info("Imported %d cells from %s (%s).", len(polygons), path, fmt)
    return table
