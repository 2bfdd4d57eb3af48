"""Construction of SpatialData elements and access to the physical scale.

Every element is built through its spatialdata model's ``parse()`` so that the
objects validate and round-trip through zarr. Coordinates are level-0 pixels of
the H&E image in the ``"global"`` coordinate system; the physical scale (µm per
level-0 pixel) is stored once, in ``sdata.attrs["bitro_scale"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._validate import check_key

if TYPE_CHECKING:
    import anndata as ad
    import geopandas as gpd
    import spatialdata as sd


def image_element(
    image: np.ndarray | Any,
    *,
    dims: tuple[str, ...] = ("c", "y", "x"),
    scale_factors: Sequence[int] | None = None,
    chunks: int | tuple[int, ...] | None = 1024,
):
    """Build an RGB ``Image2DModel`` element (``c, y, x`` uint8, lazy dask).

    Parameters
    ----------
    image
        Array (numpy or dask) with the axes given by ``dims``.
    dims
        Axis names of ``image``; ``("y", "x", "c")`` is transposed.
    scale_factors
        Downscale factors for a multiscale pyramid (e.g. ``[2, 4]``); ``None`` for one level.
    chunks
        Chunk size of the spatial axes.
    """
    from spatialdata.models import Image2DModel

    if image.ndim != 3:
        msg = (
            f"Expected an RGB image with 3 axes {dims}, got shape {tuple(image.shape)}. "
            "Grey-scale images must be converted to RGB first."
        )
        raise ValueError(msg)
    if tuple(dims) != ("c", "y", "x"):
        order = [dims.index(a) for a in ("c", "y", "x")]
        image = image.transpose(order)
    n_c = image.shape[0]
    if n_c == 4:
        image = image[:3]
    elif n_c != 3:
        msg = f"Expected 3 (RGB) or 4 (RGBA) channels, got {n_c}; convert the image to RGB first."
        raise ValueError(msg)
    chunk_arg = None if chunks is None else (3, chunks, chunks) if isinstance(chunks, int) else chunks
    return Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=list(scale_factors) if scale_factors else None,
        chunks=chunk_arg,
    )


def circles_element(centres_xy: np.ndarray, radius_px: float | np.ndarray, index: Sequence[str]):
    """Build circle shapes (``ShapesModel``) centred at ``centres_xy`` (n × 2, x then y)."""
    from spatialdata.models import ShapesModel

    centres_xy = np.asarray(centres_xy, dtype=np.float64)
    radius = np.broadcast_to(np.asarray(radius_px, dtype=np.float64), (len(centres_xy),)).copy()
    return ShapesModel.parse(centres_xy, geometry=0, radius=radius, index=pd.Index(list(index), dtype=str))


def polygons_element(polygons: Sequence[Any], index: Sequence[str]):
    """Build polygon shapes from shapely polygons."""
    import geopandas as gpd
    from spatialdata.models import ShapesModel

    gdf = gpd.GeoDataFrame(geometry=list(polygons), index=pd.Index(list(index), dtype=str))
    return ShapesModel.parse(gdf)


def table_element(adata: ad.AnnData, *, region: str, instance_key: str = K.INSTANCE_KEY) -> ad.AnnData:
    """Link ``adata`` to the shapes element ``region`` (one row per instance, same order)."""
    from spatialdata.models import TableModel

    adata.obs[K.REGION_KEY] = pd.Categorical([region] * adata.n_obs)
    if instance_key not in adata.obs:
        adata.obs[instance_key] = adata.obs_names.astype(str)
    return TableModel.parse(adata, region=region, region_key=K.REGION_KEY, instance_key=instance_key)


def set_scale(sdata: sd.SpatialData, *, mpp: float, **extra: Any) -> None:
    """Record the physical scale (µm per level-0 pixel, plus e.g. spot size in µm) on ``sdata``."""
    if not np.isfinite(mpp) or mpp <= 0:
        msg = f"µm per pixel must be a positive number, got {mpp!r}."
        raise ValueError(msg)
    scale = dict(sdata.attrs.get(K.SCALE, {}))
    scale[K.MPP] = float(mpp)
    scale.update({k: (float(v) if isinstance(v, int | float | np.floating) else v) for k, v in extra.items()})
    sdata.attrs[K.SCALE] = scale


def get_scale(obj: sd.SpatialData | ad.AnnData) -> dict[str, Any]:
    """Return the scale dict of a SpatialData (``attrs``) or AnnData (``uns``)."""
    store = obj.attrs if hasattr(obj, "tables") else obj.uns
    scale = store.get(K.SCALE)
    if not scale or K.MPP not in scale:
        msg = (
            "No physical scale (µm per pixel) is recorded on this object. Read the data with a bitro reader "
            "(bt.io.read_*), pass mpp= to it, or call bt.io.set_scale(sdata, mpp=...)."
        )
        raise ValueError(msg)
    return dict(scale)


def get_mpp(obj: sd.SpatialData | ad.AnnData) -> float:
    """µm per level-0 pixel recorded on ``obj``."""
    return float(get_scale(obj)[K.MPP])


def get_table(sdata: sd.SpatialData, table_key: str, *, hint: str | None = None) -> ad.AnnData:
    """Return table ``table_key`` or raise listing the tables that exist."""
    check_key(table_key, sdata.tables.keys(), what="table", hint=hint)
    return sdata.tables[table_key]


def get_shapes(sdata: sd.SpatialData, shapes_key: str, *, hint: str | None = None) -> gpd.GeoDataFrame:
    """Return shapes ``shapes_key`` or raise listing the shapes that exist."""
    check_key(shapes_key, sdata.shapes.keys(), what="shapes element", hint=hint)
    return sdata.shapes[shapes_key]


def get_image(sdata: sd.SpatialData, image_key: str, *, level: int = 0):
    """Return the ``(c, y, x)`` DataArray of image ``image_key`` at pyramid ``level``."""
    check_key(
        image_key, sdata.images.keys(), what="image", hint="Images are created by bt.io.read_* readers."
    )
    element = sdata.images[image_key]
    if hasattr(element, "children") and len(element.children) > 0:  # DataTree (multiscale)
        names = sorted(element.children, key=lambda s: int(s.replace("scale", "")))
        if level >= len(names):
            msg = f"Image {image_key!r} has {len(names)} levels; level={level} does not exist."
            raise ValueError(msg)
        return element[names[level]]["image"]
    if level != 0:
        msg = f"Image {image_key!r} is single-scale; only level=0 exists."
        raise ValueError(msg)
    return element


def image_levels(sdata: sd.SpatialData, image_key: str) -> list[tuple[int, int]]:
    """Return ``(height, width)`` of each pyramid level of ``image_key``."""
    out, level = [], 0
    while True:
        try:
            arr = get_image(sdata, image_key, level=level)
        except ValueError:
            return out
        out.append((int(arr.sizes["y"]), int(arr.sizes["x"])))
        level += 1
