"""Nucleus segmentation of a whole image, tile by tile with overlap (method.md §2.3).

The image is cut into a grid of core squares (:func:`bitro.pp._tiles.tile_grid`); each tile is
read with an overlap larger than the largest nucleus, segmented on its own, and a nucleus is kept
only by the tile whose core contains its centroid — so each nucleus is kept exactly once and never
cut by a tile edge. Only one tile is in memory at a time (one per worker thread when the tiles run on
dask, see :mod:`bitro.pp._parallel`).
With ``scratch_dir`` each finished tile is written to disk at once and a rerun resumes from
those files (:mod:`bitro.pp._scratch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
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
from bitro.pp._parallel import check_parallel_args, execution_info, map_tiles
from bitro.pp._scratch import TileStore, check_scratch_dir
from bitro.pp._tiles import Tile, read_box, tile_grid
from bitro.pp._watershed import (
    WatershedParams,
    estimate_threshold,
    hematoxylin,
    segment_tile,
    smoothed_hematoxylin,
)

if TYPE_CHECKING:
    import spatialdata as sd

Method = Callable[[np.ndarray, float], np.ndarray]

#: Built-in method names and the optional backends that need user-supplied weights.
METHODS = ("watershed",)
_BACKENDS = {"stardist": "stardist", "cellpose": "cellpose"}
#: Side (px) and maximum number of the boxes sampled to fix the slide-wide hematoxylin threshold.
_SAMPLE_SIZE = 1024
_MAX_SAMPLES = 16
#: Polygon simplification tolerance in pixels (removes the pixel staircase, keeps the shape).
_SIMPLIFY_PX = 0.5
#: Margin (µm) added to the largest nucleus diameter for the default overlap.
_OVERLAP_MARGIN_UM = 2.0


def _resolve_method(method: str | Method) -> str | Method:
    if callable(method):
        return method
    if method in METHODS:
        return method
    if method in _BACKENDS:
        pkg = _BACKENDS[method]
        try:
            __import__(pkg)
        except ImportError as err:
            msg = (
                f"method={method!r} needs the {pkg!r} package and model weights, which bitro does not "
                f"ship or download. Install it (pip install {pkg}), load your model, and pass it wrapped as "
                "a callable: method=lambda rgb, mpp: <int label mask of rgb> (see bt.pp.segment_cells)."
            )
            raise ImportError(msg) from err
        msg = (
            f"bitro does not load {method} weights itself. Load your model and pass it wrapped as a callable: "
            "method=lambda rgb, mpp: <int label mask of the (h, w, 3) uint8 tile rgb> "
            "(see the example in bt.pp.segment_cells)."
        )
        raise ValueError(msg)
    msg = (
        f"Unknown segmentation method {method!r}; use one of {METHODS}, or a callable "
        "(rgb_tile, mpp) -> int label mask (the hook for StarDist/Cellpose models you load yourself)."
    )
    raise ValueError(msg)


def _tissue_mask(sdata: sd.SpatialData, tissue_key: str | None) -> Any:
    if tissue_key is None or tissue_key not in sdata.labels:
        return None
    return sdata.labels[tissue_key]


def _has_tissue(mask: Any, tile: Tile) -> bool:
    if mask is None:
        return True
    from bitro.pp._tissue import tissue_fraction

    return tissue_fraction(mask, (tile.x0, tile.y0, tile.x1, tile.y1)) > 0


#: Boxes at least this much covered by tissue are preferred for the threshold sample.
_DENSE_FRACTION = 0.5


def _box_tissue(mask: Any, box: tuple[int, int, int, int], step: int) -> np.ndarray | None:
    """Tissue mask of a level-0 box ``(y0, x0, y1, x1)`` sampled every ``step`` pixels (nearest)."""
    if mask is None:
        return None
    from bitro.pp._tissue import _mask_scale

    sy, sx = _mask_scale(mask)
    arr = np.asarray(mask.data)
    y0, x0, y1, x1 = box
    rows = np.clip((np.arange(y0, y1, step) / sy).astype(int), 0, arr.shape[0] - 1)
    cols = np.clip((np.arange(x0, x1, step) / sx).astype(int), 0, arr.shape[1] - 1)
    return arr[np.ix_(rows, cols)] > 0


def _slide_threshold(
    data: Any, shape_yx: tuple[int, int], mpp: float, params: WatershedParams, mask: Any, seed: int
) -> float:
    """One hematoxylin threshold for the whole image, from up to 16 boxes of 1024 px.

    With a tissue mask, boxes mostly covered by tissue are preferred and only their tissue pixels
    enter the histogram: glass and thin tissue at the section's edge would otherwise pull the cut
    down and merge neighbouring nuclei (measured on HER2ST C2: a whole-section estimate from all
    pixels of random tissue boxes gave 0.015 and median nucleus area 78 µm², a central-window
    estimate 0.025 and 50 µm²).
    """
    boxes = tile_grid(shape_yx, tile_size=_SAMPLE_SIZE, overlap=0)
    if mask is not None:
        from bitro.pp._tissue import tissue_fraction

        fractions = np.array([tissue_fraction(mask, (t.x0, t.y0, t.x1, t.y1)) for t in boxes])
        dense = fractions >= _DENSE_FRACTION
        keep = dense if dense.any() else fractions > 0
        boxes = [t for t, k in zip(boxes, keep) if k]
    if not boxes:
        return estimate_threshold(np.zeros(1, dtype=np.float32), params=params)
    if len(boxes) > _MAX_SAMPLES:
        rng = np.random.default_rng(seed)
        boxes = [boxes[i] for i in sorted(rng.choice(len(boxes), _MAX_SAMPLES, replace=False))]
    values = []
    for t in boxes:
        h = smoothed_hematoxylin(read_box(data, t.box), mpp, params.sigma_um)[::2, ::2]
        inside = _box_tissue(mask, t.box, 2)
        if inside is not None and inside.shape == h.shape and inside.any():
            h = h[inside]
        values.append(h.ravel())
    return estimate_threshold(np.concatenate(values), params=params)


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


def _segment_one(
    rgb: np.ndarray,
    tile: Tile,
    *,
    method: str | Method,
    mpp: float,
    threshold: float | None,
    params: WatershedParams,
    area_range: tuple[float, float],
) -> tuple[list[Any], list[tuple[float, float]], list[dict[str, float]]]:
    """Segment one read box and keep the nuclei of its core (runs on a dask worker when parallel)."""
    if method == "watershed":
        labels = segment_tile(rgb, mpp, threshold=threshold, params=params)
    else:
        labels = _check_labels(method(rgb, mpp), rgb.shape[:2])
    return _cells_of_tile(rgb, labels, tile, mpp, area_range)


def _gather(results: list[Any]) -> tuple[list[Any], np.ndarray, pd.DataFrame]:
    """Polygons, ``(n, 2)`` centroids (x, y) and features of the per-tile results, in tile order."""
    polygons: list[Any] = []
    centroids: list[tuple[float, float]] = []
    rows: list[dict[str, float]] = []
    for res in results:
        if res is not None:
            polygons += res[0]
            centroids += res[1]
            rows += res[2]
    obs = pd.DataFrame(rows, columns=list(CELL_FEATURES))
    return polygons, np.asarray(centroids, dtype=np.float64).reshape(-1, 2), obs


def segment_cells(
    sdata: sd.SpatialData,
    *,
    image_key: str = K.IMAGE,
    method: str | Method = "watershed",
    tile_size: int = 1024,
    overlap_um: float | None = None,
    min_area_um2: float = WatershedParams.min_area_um2,
    max_area_um2: float = WatershedParams.max_area_um2,
    params: WatershedParams | None = None,
    threshold: float | None = None,
    tissue_key: str | None = K.TISSUE,
    key_added: str = K.CELLS,
    overwrite: bool = False,
    seed: int | None = None,
    client: Any = None,
    scheduler: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    scratch_dir: str | Path | None = None,
    keep_scratch: bool = False,
) -> None:
    """Segment nuclei tile by tile and write them as polygons and a cell table.

    Parameters
    ----------
    sdata
        SpatialData with an RGB H&E image and a recorded µm per pixel.
    image_key
        Image to segment (e.g. ``"he_normalized"`` after :func:`bitro.pp.normalize_stains`).
    method
        ``"watershed"``: the built-in classical method (hematoxylin by colour deconvolution,
        smoothing, Li threshold fixed once per slide, distance-transform h-maxima watershed, size
        filters; see :mod:`bitro.pp._watershed`), no weights needed. Or a callable
        ``(rgb_tile, mpp) -> labels`` taking an ``(h, w, 3)`` uint8 tile and its µm per pixel and
        returning an ``(h, w)`` integer instance mask (0 = background) — the hook for StarDist,
        Cellpose or any model whose weights you load yourself, e.g.::

            model = StarDist2D(None, name="my_model", basedir="models/")  # your local weights
            method = lambda rgb, mpp: model.predict_instances(normalize(rgb))[0]

        ``"stardist"``/``"cellpose"`` raise an error explaining this.
    tile_size
        Side of each tile core in level-0 pixels.
    overlap_um
        Overlap (µm) read around each core; must exceed the largest nucleus diameter. Default: the
        diameter of a disc of ``max_area_um2`` plus 2 µm.
    min_area_um2, max_area_um2
        Nuclei outside this area range (µm²) are dropped (for every method).
    params
        Parameters of the built-in method (:class:`~bitro.pp._watershed.WatershedParams`); the two
        area bounds above override its own.
    threshold
        Hematoxylin optical-density cut of the built-in method; default estimated once on up to
        16 boxes of 1024 px, so that every tile uses the same cut. With a tissue mask, boxes at least
        half covered by tissue are preferred and only their tissue pixels count, so the cut of a whole
        section matches that of a window cut from its interior.
    tissue_key
        Labels element with a tissue mask (:func:`bitro.pp.detect_tissue`); when it exists, tiles
        without tissue are skipped. ``None`` processes every tile.
    key_added
        Table name; polygons go to shapes ``f"{key_added}_shapes"``.
    overwrite
        Replace an existing table/shapes of that name.
    seed
        Seed for choosing the threshold sample boxes (when there are more than 16).
    client
        A ``distributed.Client`` to run the tiles on a dask cluster (local or remote), one task per
        tile. ``None``: the client active in this process if there is one, else the tiles run one
        after the other in this process. The threshold is fixed once beforehand, so the result is
        the same however the tiles run. A callable ``method`` must be picklable (cloudpickle) for
        process-based workers.
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
    Nothing; writes to ``sdata``:

    - ``shapes[f"{key_added}_shapes"]``: one polygon per nucleus (level-0 pixels);
    - ``tables[key_added]``: ``obsm["spatial"]`` centroids (x = column, y = row, level-0 pixels,
      float32); ``obs`` ``area_um2``, ``perimeter_um``, ``eccentricity``, ``solidity``,
      ``mean_hematoxylin`` (mean hematoxylin optical density); ``obs_names`` ``cell_0 …``;
      ``uns[key_added]`` method, parameters, threshold, tiling, seed, ``execution`` (where the tiles
      ran) and ``skipped_tiles`` (read boxes ``[y0, x0, y1, x1]`` skipped with ``on_error="skip"``).

    With no nucleus found the table is empty, no shapes are written and a warning is logged.
    """
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
    check_not_exists(key_added, sdata.tables, what="table", overwrite=overwrite)
    check_not_exists(K.shapes_key(key_added), sdata.shapes, what="shapes element", overwrite=overwrite)
    method = _resolve_method(method)
    check_parallel_args(client, scheduler, on_error)
    params = replace(params or WatershedParams(), min_area_um2=min_area_um2, max_area_um2=max_area_um2)
    if int(tile_size) < 16:
        msg = f"tile_size must be at least 16 pixels, got {tile_size}."
        raise ValueError(msg)
    max_diameter = params.max_diameter_um()
    overlap_um = max_diameter + _OVERLAP_MARGIN_UM if overlap_um is None else float(overlap_um)
    if overlap_um <= max_diameter:
        msg = (
            f"overlap_um={overlap_um} must exceed the largest nucleus diameter ({max_diameter:.1f} µm for "
            f"max_area_um2={max_area_um2}) so that every nucleus lies whole in the tile that keeps it; "
            "increase overlap_um or lower max_area_um2."
        )
        raise ValueError(msg)
    scratch = check_scratch_dir(scratch_dir) if scratch_dir is not None else None
    seed = resolve_seed(seed)
    overlap_px = int(np.ceil(overlap_um / mpp))
    shape_yx = (int(data.shape[1]), int(data.shape[2]))
    mask = _tissue_mask(sdata, tissue_key)
    tiles = tile_grid(shape_yx, tile_size=int(tile_size), overlap=overlap_px)
    todo = [t for t in tiles if _has_tissue(mask, t)]

    if method == "watershed" and threshold is None:
        threshold = _slide_threshold(data, shape_yx, mpp, params, mask, seed)
    name = method if isinstance(method, str) else getattr(method, "__name__", type(method).__name__)
    run_info = execution_info(client, scheduler)
    per_tile = partial(
        _segment_one,
        method=method,
        mpp=mpp,
        threshold=threshold,
        params=params,
        area_range=(params.min_area_um2, params.max_area_um2),
    )
    store = None
    if scratch is not None:
        store = TileStore(
            scratch,
            {
                "image_key": image_key,
                "image_shape": [int(v) for v in data.shape],
                "mpp": mpp,
                "threshold": None if threshold is None else float(threshold),
                "params": asdict(params),
                "tile_size": int(tile_size),
                "overlap_px": overlap_px,
                "method": name,
            },
        )
    compute = [t for t in todo if store is None or not store.has(t)]
    if store is not None and len(compute) < len(todo):
        done = len(todo) - len(compute)
        logger.info("Resuming from %r: %d of %d tiles already done.", str(scratch), done, len(todo))
    results, skipped = map_tiles(
        per_tile,
        compute,
        data,
        client=client,
        scheduler=scheduler,
        on_error=on_error,
        image_name=image_key,
        desc=f"segmenting nuclei ({name})",
        on_result=None if store is None else lambda i, res: store.write(compute[i], res),
    )
    if store is not None:
        polygons, centroids, obs = store.read(todo)
    else:
        polygons, centroids, obs = _gather(results)
    provenance = {
        "method": name,
        "image_key": image_key,
        "params": {k: v for k, v in asdict(params).items()}
        if method == "watershed"
        else {
            "min_area_um2": params.min_area_um2,
            "max_area_um2": params.max_area_um2,
        },
        "threshold": None if threshold is None else float(threshold),
        "tile_size": int(tile_size),
        "overlap_um": float(overlap_um),
        "overlap_px": overlap_px,
        "n_tiles": len(tiles),
        "n_tiles_processed": len(todo),
        "tissue_key": tissue_key if mask is not None else None,
        "mpp": mpp,
        "seed": seed,
        "execution": run_info,
        "skipped_tiles": skipped,
    }
    write_cells(
        sdata, polygons, centroids, obs, key_added=key_added, overwrite=overwrite, provenance=provenance
    )
    if store is not None and not keep_scratch:
        store.remove(todo)
    logger.info(
        "Segmented %d nuclei in %d of %d tiles of %r.", len(polygons), len(todo), len(tiles), image_key
    )
