"""Nucleus segmentation of a whole image, tile by tile with overlap (method.md §2.3).

The image is cut into a grid of core squares (:func:`bitro.pp._tiles.tile_grid`); each tile is
read with an overlap larger than the largest nucleus, segmented on its own by the chosen backend
(:mod:`bitro.pp._segmenters`), and a nucleus is kept only by the tile whose core contains its
centroid — so each nucleus is kept exactly once and never cut by a tile edge. The tiles run through
the tiled-step runner (:mod:`bitro.pp._runner`: one tile in memory per worker, plain dask or
``dask.distributed``, ``scratch_dir`` resume, ``on_error``). Backends of kind ``"import"`` read a
finished segmentation file instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro._validate import check_key, check_not_exists
from bitro.io._build import get_image, get_mpp
from bitro.io._cells import CELL_FEATURES, write_cells
from bitro.pp._image_key import resolve_image_key
from bitro.pp._runner import Task, TiledStep, TileRunner
from bitro.pp._scratch import TileStore
from bitro.pp._segmenters import Segmenter, get_segmenter
from bitro.pp._tiles import Tile, tile_grid
from bitro.pp._watershed import WatershedParams, hematoxylin

if TYPE_CHECKING:
    import anndata as ad
    import geopandas as gpd
    import spatialdata as sd

#: Default nucleus area range (µm²) of every method: the watershed's tuned bounds.
MIN_AREA_UM2 = WatershedParams.min_area_um2
MAX_AREA_UM2 = WatershedParams.max_area_um2
#: Polygon simplification tolerance in pixels (removes the pixel staircase, keeps the shape).
_SIMPLIFY_PX = 0.5
#: Margin (µm) added to the largest nucleus diameter for the default overlap.
_OVERLAP_MARGIN_UM = 2.0


def _has_tissue(mask: Any, tile: Tile) -> bool:
    if mask is None:
        return True
    from bitro.pp._tissue import tissue_fraction

    return tissue_fraction(mask, (tile.x0, tile.y0, tile.x1, tile.y1)) > 0


def _mask_polygon(mask: np.ndarray, y_off: float, x_off: float) -> Any:
    """Polygon (level-0 x, y) of a binary object mask whose top-left pixel is at ``(y_off, x_off)``."""
    from shapely.geometry import Polygon, box
    from skimage.measure import find_contours

    contours = find_contours(np.pad(mask, 1).astype(np.uint8), 0.5)
    if contours:
        ring = max(contours, key=len)
        coords = np.column_stack([ring[:, 1] - 1 + x_off, ring[:, 0] - 1 + y_off])
        if len(coords) >= 4:
            poly = Polygon(coords).simplify(_SIMPLIFY_PX, preserve_topology=True)
            if not poly.is_valid:
                poly = poly.buffer(0)
            if poly.geom_type == "MultiPolygon":
                poly = max(poly.geoms, key=lambda g: g.area)
            if not poly.is_empty and poly.area > 0:
                return poly
    rows, cols = np.nonzero(mask)
    return box(
        cols.min() + x_off - 0.5, rows.min() + y_off - 0.5, cols.max() + x_off + 0.5, rows.max() + y_off + 0.5
    )


def _check_labels(labels: Any, shape: tuple[int, int]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != shape:
        msg = (
            f"The segmentation method returned an array of shape {labels.shape} for a tile of shape {shape}; "
            "it must return one integer label per pixel (0 = background)."
        )
        raise ValueError(msg)
    if labels.dtype == bool:
        from scipy import ndimage as ndi

        labels = ndi.label(labels)[0]
    if not np.issubdtype(labels.dtype, np.integer):
        msg = f"The segmentation method must return an integer label mask, got dtype {labels.dtype}."
        raise ValueError(msg)
    return labels.astype(np.int32, copy=False)


def _cells_of_tile(
    rgb: np.ndarray, labels: np.ndarray, tile: Tile, mpp: float, area_range: tuple[float, float]
) -> tuple[list[Any], list[tuple[float, float]], list[dict[str, float]]]:
    """Polygons, centroids (x, y) and features of the objects whose centroid lies in the tile core."""
    from skimage.measure import regionprops

    polygons, centroids, rows = [], [], []
    if labels.max() == 0:
        return polygons, centroids, rows
    h = hematoxylin(rgb)
    for region in regionprops(labels, intensity_image=h):
        r, c = region.centroid
        y, x = r + tile.y0, c + tile.x0
        if not bool(tile.in_core(y, x)):
            continue
        area = region.area * mpp**2
        if area < area_range[0] or area > area_range[1]:
            continue
        r0, c0, _, _ = region.bbox
        polygons.append(_mask_polygon(region.image, r0 + tile.y0, c0 + tile.x0))
        centroids.append((x, y))
        rows.append(
            {
                "area_um2": area,
                "perimeter_um": region.perimeter * mpp,
                "eccentricity": region.eccentricity,
                "solidity": region.solidity,
                "mean_hematoxylin": region.intensity_mean,
            }
        )
    return polygons, centroids, rows


def _segment_task(
    rgb: np.ndarray, item: tuple[Tile, float, tuple[float, float]], segmenter: Segmenter
) -> tuple[list[Any], np.ndarray, pd.DataFrame]:
    """Segment one read box and keep the nuclei of its core (runs on a dask worker when parallel)."""
    tile, mpp, area_range = item
    labels = _check_labels(segmenter.segment_tile(rgb, mpp), rgb.shape[:2])
    polygons, centroids, rows = _cells_of_tile(rgb, labels, tile, mpp, area_range)
    xy = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    return polygons, xy, pd.DataFrame(rows, columns=list(CELL_FEATURES))


class _Stitch:
    """Merges the per-tile nuclei in tile order (results may arrive in any order)."""

    def __init__(self, n_tasks: int) -> None:
        self.parts: list[Any] = [None] * n_tasks

    def add(self, index: int, result: Any) -> None:
        self.parts[index] = result

    def result(self) -> tuple[list[Any], np.ndarray, pd.DataFrame]:
        """Polygons, ``(n, 2)`` centroids (x, y) and features of all tiles, in tile order."""
        parts = [p for p in self.parts if p is not None and len(p[0])]
        self.parts = []
        if not parts:
            return [], np.zeros((0, 2)), pd.DataFrame(columns=list(CELL_FEATURES))
        polygons = [poly for p in parts for poly in p[0]]
        centroids = np.concatenate([np.asarray(p[1], dtype=np.float64).reshape(-1, 2) for p in parts])
        obs = pd.concat([pd.DataFrame(p[2], columns=list(CELL_FEATURES)) for p in parts], ignore_index=True)
        return polygons, centroids, obs


def _everything_warning(image_key: str, why: str) -> None:
    logger.warning(
        "segment_cells: %s, so every tile of %r is segmented, glass included (slower, and nuclei are "
        "found in debris).",
        why,
        image_key,
    )


def _tissue(sdata: sd.SpatialData, tissue_key: str | None, image_key: str, *, inplace: bool) -> Any:
    """The tissue mask to skip glass with: the existing one, else one built by detect_tissue (logged).

    ``None`` (segment everything, with a warning) for ``tissue_key=None`` and when the mask built here
    holds no tissue (e.g. an image smaller than detect_tissue's smallest tissue piece).
    """
    if tissue_key is None:
        _everything_warning(image_key, f"tissue_key=None (the default {K.TISSUE!r} uses or builds a mask)")
        return None
    if tissue_key in sdata.labels:
        return sdata.labels[tissue_key]
    from bitro.pp._tissue import detect_tissue

    logger.info(
        "segment_cells: no tissue mask %r yet; building it with bt.pp.detect_tissue(image_key=%r)%s.",
        tissue_key,
        image_key,
        f" into labels[{tissue_key!r}]" if inplace else "",
    )
    if inplace:
        detect_tissue(sdata, image_key=image_key, key_added=tissue_key)
        mask = sdata.labels[tissue_key]
    else:
        mask = detect_tissue(sdata, image_key=image_key, key_added=tissue_key, inplace=False)
    if not np.asarray(mask.data).any():  # not kept: a later call would take it for the user's own mask
        if inplace:
            from bitro.pp._tissue import TISSUE_ATTRS_KEY

            del sdata.labels[tissue_key]
            sdata.attrs.get(TISSUE_ATTRS_KEY, {}).pop(tissue_key, None)
        _everything_warning(image_key, f"the tissue mask built by detect_tissue on {image_key!r} is empty")
        return None
    return mask


def _detached(sdata: sd.SpatialData) -> sd.SpatialData:
    """An empty SpatialData with ``sdata``'s attrs (scale), to build elements without touching ``sdata``."""
    import spatialdata as sd

    out = sd.SpatialData()
    out.attrs.update(sdata.attrs)
    return out


def segment_cells(
    sdata: sd.SpatialData,
    *,
    image_key: str | None = None,
    method: str | Segmenter | Any = "watershed",
    method_kwargs: dict[str, Any] | None = None,
    tile_size: int = 1024,
    overlap_um: float | None = None,
    min_area_um2: float = MIN_AREA_UM2,
    max_area_um2: float = MAX_AREA_UM2,
    tissue_key: str | None = K.TISSUE,
    key_added: str = K.CELLS,
    overwrite: bool = False,
    inplace: bool = True,
    seed: int | None = None,
    client: Any = None,
    scheduler: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    scratch_dir: str | Path | None = None,
    keep_scratch: bool = False,
) -> tuple[ad.AnnData, gpd.GeoDataFrame | None] | None:
    """Segment nuclei tile by tile (or import a segmentation) and write them as polygons and a cell table.

    Parameters
    ----------
    sdata
        SpatialData with an RGB H&E image and a recorded µm per pixel.
    image_key
        Image to segment. ``None``: ``"he_normalized"`` when :func:`bitro.pp.normalize_stains` wrote
        it, else ``"he"`` (logged; see :mod:`bitro.pp._image_key`).
    method
        A registered backend (:func:`bitro.pp.list_segmenters`):

        - ``"watershed"`` (default): the built-in classical method (hematoxylin by colour
          deconvolution, smoothing, Li threshold fixed once per slide, distance-transform h-maxima
          watershed, size filters; :class:`~bitro.pp._segmenters.WatershedSegmenter`), no weights;
        - ``"cellvit"``, ``"hovernet"``, ``"hest"``, ``"import"``: read a finished segmentation,
          e.g. ``method="cellvit:/path/cells.geojson"`` (:func:`bitro.io.read_cell_segmentation`;
          tiling, tissue and area options do not apply);
        - ``"stardist"``, ``"cellpose"``: their optional packages with your local weights or loaded
          model (:mod:`bitro.pp._segmenters_external`; bitro never downloads weights).

        Or a :class:`~bitro.pp._segmenters.Segmenter`, or a callable ``(rgb_tile, mpp) -> labels``
        taking an ``(h, w, 3)`` uint8 tile and its µm per pixel and returning an ``(h, w)`` integer
        instance mask (0 = background), e.g.::

            model = StarDist2D(None, name="my_model", basedir="models/")  # your local weights
            method = lambda rgb, mpp: model.predict_instances(normalize(rgb))[0]

        New backends are added with :func:`bitro.pp.register_segmenter`.
    method_kwargs
        Options of the backend, e.g. ``{"threshold": 0.05, "h_um": 0.8}`` for the watershed (its
        ``threshold`` and :class:`~bitro.pp._watershed.WatershedParams` fields),
        ``{"path": ...}`` for an importer, ``{"model": ...}`` for StarDist/Cellpose.
    tile_size
        Side of each tile core in level-0 pixels.
    overlap_um
        Overlap (µm) read around each core; must exceed the largest nucleus diameter. Default: the
        diameter of a disc of ``max_area_um2`` plus 2 µm.
    min_area_um2, max_area_um2
        Nuclei outside this area range (µm²) are dropped (every tile backend).
    tissue_key
        Labels element of the tissue mask; tiles without tissue are skipped. When it does not exist it
        is built with :func:`bitro.pp.detect_tissue` on ``image_key`` and written to
        ``labels[tissue_key]`` (logged; with ``inplace=False`` it is used but not written).
        ``None``: every tile is segmented, glass included, and a warning says so.
    key_added
        Table name; polygons go to shapes ``f"{key_added}_shapes"``.
    overwrite
        Replace an existing table/shapes of that name.
    inplace
        Write into ``sdata`` and return ``None``; ``False``: write nothing and return the table and
        shapes (see :doc:`/contributing`, "Return values and inplace").
    seed
        Seed for choosing the watershed's threshold sample boxes (when there are more than 16).
    client
        A ``distributed.Client`` to run the tiles on a dask cluster (local or remote), one task per
        tile. ``None``: the client active in this process if there is one, else the tiles run one
        after the other in this process. Slide-wide settings (the watershed threshold) are fixed
        beforehand, so the result is the same however the tiles run. The backend is sent to each
        worker once and must be picklable (cloudpickle) for process-based workers.
    scheduler
        ``"threads"``, ``"processes"`` or ``"synchronous"``: run the tiles with plain dask instead
        (no cluster). Not together with ``client``.
    on_error
        ``"raise"``: a tile that cannot be read (e.g. a corrupt chunk) stops the run with an error
        naming the image and tile box. ``"skip"``: such tiles (and tiles whose segmentation fails)
        are skipped with a warning and listed in ``uns[key_added]["skipped_tiles"]``.
    scratch_dir
        Folder (created if missing) where each tile's nuclei are written as soon as the tile is done
        (``tile_<core_y0>_<core_x0>.parquet``, GeoParquet, written by this process as results
        arrive, also with a cluster), with a ``manifest.json`` of the parameters that determine
        the result. Rerunning the same call with the same folder after a crash reads the finished
        tiles instead of recomputing them (tiles skipped with ``on_error="skip"`` are retried);
        different parameters raise an error. The output is identical to a run without it. ``None``:
        results are kept in memory only.
    keep_scratch
        Leave the tile files and manifest in ``scratch_dir`` after the run (a later identical call
        then only re-assembles). ``False`` (default, as in :func:`~bitro.pp.embed_cells`): delete
        them (and the folder, if nothing else is in it) once the table and shapes are written; they
        duplicate the output. Other files in the folder are never touched.

    Returns
    -------
    ``None`` when ``inplace``; else ``(table, shapes)`` as they would have been written (``shapes``
    is ``None`` when no nucleus was found). When ``inplace``, writes to ``sdata``:

    - ``shapes[f"{key_added}_shapes"]``: one polygon per nucleus (level-0 pixels);
    - ``tables[key_added]``: ``obsm["spatial"]`` centroids (x = column, y = row, level-0 pixels,
      float32); ``obs`` ``area_um2``, ``perimeter_um``, ``eccentricity``, ``solidity``,
      ``mean_hematoxylin`` (mean hematoxylin optical density; NaN for imports) and, for imports with
      classes, ``classification``; ``obs_names`` ``cell_0 …``; ``uns[key_added]`` method, image key,
      ``params`` (the backend's, e.g. the watershed's threshold, and the area range), tiling, seed,
      ``execution`` (where the tiles ran) and ``skipped_tiles`` (read boxes ``[y0, x0, y1, x1]``
      skipped with ``on_error="skip"``);
    - ``labels[tissue_key]`` when the tissue mask was built here.

    With no nucleus found the table is empty, no shapes are written and a warning is logged.
    """
    image_key = resolve_image_key(sdata, image_key, step="segment_cells")
    check_key(
        image_key, sdata.images.keys(), what="image", hint="Images are created by bt.io.read_* readers."
    )
    data = get_image(sdata, image_key)
    if data.shape[0] < 3:
        msg = (
            f"Image {image_key!r} has {data.shape[0]} channel(s); nucleus segmentation needs an RGB H&E image. "
            "Convert grey-scale images to RGB first (or segment them with your own method on an RGB copy)."
        )
        raise ValueError(msg)
    mpp = get_mpp(sdata)
    if inplace:
        check_not_exists(key_added, sdata.tables, what="table", overwrite=overwrite)
        check_not_exists(K.shapes_key(key_added), sdata.shapes, what="shapes element", overwrite=overwrite)
    segmenter = get_segmenter(method, method_kwargs)
    target = sdata if inplace else _detached(sdata)
    if segmenter.kind == "import":
        table = segmenter.import_cells(target, key_added=key_added, mpp=mpp, overwrite=overwrite)
        table.uns[key_added].update(method=segmenter.name, image_key=image_key, params=segmenter.params())
        return None if inplace else (table, target.shapes.get(K.shapes_key(key_added)))

    runner = TileRunner(
        client=client,
        scheduler=scheduler,
        on_error=on_error,
        scratch_dir=scratch_dir,
        keep_scratch=keep_scratch,
    )
    if not 0 <= min_area_um2 < max_area_um2:
        msg = f"Need 0 <= min_area_um2 < max_area_um2, got {min_area_um2} and {max_area_um2}."
        raise ValueError(msg)
    if int(tile_size) < 16:
        msg = f"tile_size must be at least 16 pixels, got {tile_size}."
        raise ValueError(msg)
    max_diameter = float(2 * np.sqrt(max_area_um2 / np.pi))
    overlap_um = max_diameter + _OVERLAP_MARGIN_UM if overlap_um is None else float(overlap_um)
    if overlap_um <= max_diameter:
        msg = (
            f"overlap_um={overlap_um} must exceed the largest nucleus diameter ({max_diameter:.1f} µm for "
            f"max_area_um2={max_area_um2}) so that every nucleus lies whole in the tile that keeps it; "
            "increase overlap_um or lower max_area_um2."
        )
        raise ValueError(msg)
    seed = resolve_seed(seed)
    overlap_px = int(np.ceil(overlap_um / mpp))
    shape_yx = (int(data.shape[1]), int(data.shape[2]))
    mask = _tissue(sdata, tissue_key, image_key, inplace=inplace)
    tiles = tile_grid(shape_yx, tile_size=int(tile_size), overlap=overlap_px)
    todo = [t for t in tiles if _has_tissue(mask, t)]
    area_range = (float(min_area_um2), float(max_area_um2))
    segmenter.prepare(data, mpp=mpp, tissue=mask, seed=seed, area_um2=area_range)
    params = {**segmenter.params(), "min_area_um2": area_range[0], "max_area_um2": area_range[1]}
    step = TiledStep(
        name="segment_cells",
        tasks=[Task(f"{t.core_y0}_{t.core_x0}", (t, mpp, area_range), t.box) for t in todo],
        process=_segment_task,
        merge=_Stitch(len(todo)),
        store=TileStore,
        fingerprint={
            "image_key": image_key,
            "image_shape": [int(v) for v in data.shape],
            "mpp": mpp,
            "method": segmenter.name,
            "params": params,
            "tile_size": int(tile_size),
            "overlap_px": overlap_px,
        },
        shared=segmenter,
        desc=f"segmenting nuclei ({segmenter.name})",
    )
    polygons, centroids, obs = runner.run(step, data, image_name=image_key)
    provenance = {
        "method": segmenter.name,
        "image_key": image_key,
        "params": params,
        "tile_size": int(tile_size),
        "overlap_um": float(overlap_um),
        "overlap_px": overlap_px,
        "n_tiles": len(tiles),
        "n_tiles_processed": len(todo),
        "tissue_key": tissue_key if mask is not None else None,
        "mpp": mpp,
        "seed": seed,
        **runner.provenance(),
    }
    table = write_cells(
        target, polygons, centroids, obs, key_added=key_added, overwrite=overwrite, provenance=provenance
    )
    runner.finish()
    logger.info(
        "Segmented %d nuclei in %d of %d tiles of %r.", len(polygons), len(todo), len(tiles), image_key
    )
    return None if inplace else (table, target.shapes.get(K.shapes_key(key_added)))
