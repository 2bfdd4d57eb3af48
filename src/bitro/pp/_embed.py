"""Cell embedding (``bt.pp.embed_cells``): one feature vector per segmented cell.

The image is processed tile by tile (only one tile, or one batch of crops, in memory per worker; the
tiles run in this process or on dask, see :mod:`bitro.pp._parallel`): cells are
assigned to exactly one tile by the tile *core* that contains their centroid, and each tile is read
with a margin of context (white outside the image) so that cells near borders see their
surroundings.

- ``mode="crop"`` (the paper's): a ``crop_um`` window around each centroid, read at the chosen
  pyramid ``level`` in that level's coordinates, resized to the encoder input and mean-pooled.
- ``mode="tile"`` (fast): one forward pass per tile at the level's native resolution (resampled to
  the encoder's ``mpp`` when it declares one). Each cell's feature is the tile's feature map averaged
  over the cells covered by its ``crop_um`` window (weighted by overlap), so tile mode approximates
  crop mode with the same crop definition; when the window is smaller than one feature cell
  (stride 32 px for EfficientNet, ~16 µm at 0.5 µm/px, larger than a nucleus) this is bilinear
  interpolation at the centroid. The network's receptive field brings in the surrounding tissue.
- ``encoder="morphology"`` measures each nucleus from its rasterised polygon (``mode`` is ignored).

Each tile's features are copied into one float32 output matrix as soon as they arrive and then
dropped, so the features are held once (plus one tile), never as a list of all tiles. With
``scratch_dir`` each finished tile's features are written to disk at once
(:class:`bitro.pp._scratch.FeatureStore`), a rerun resumes from those files, and the output matrix
is assembled from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._hashing import arrays_sha256, state_sha256
from bitro._logging import logger
from bitro._settings import resolve_device, resolve_seed
from bitro._validate import check_not_exists
from bitro.io._build import get_image, get_mpp, get_shapes, get_table, image_levels
from bitro.pp._encoders import Encoder, get_encoder
from bitro.pp._parallel import check_parallel_args, execution_info, map_tiles
from bitro.pp._scratch import FeatureStore, check_scratch_dir

if TYPE_CHECKING:
    import spatialdata as sd

__all__ = ["embed_cells"]

#: ``run(per_tile_func, items, boxes, shared, desc, sink)``: map_tiles with the call's options bound; each
#: tile's ``(idx, features)`` goes to ``sink`` (a :class:`_Scatter`) as it arrives, or, with a scratch
#: folder, is written there and read back into ``sink`` one tile at a time once all tiles are done.
RunTiles = Callable[[Callable[..., Any], list[Any], list[Any], Any, str, "_Scatter"], None]

_SEGMENT_HINT = "Cells are created by bt.pp.segment_cells(sdata); run it first (or import a segmentation)."


def embed_cells(
    sdata: sd.SpatialData,
    *,
    image_key: str = K.IMAGE,
    cells_key: str = K.CELLS,
    encoder: Any = "efficientnet_lite0",
    mode: Literal["tile", "crop"] = "tile",
    crop_um: float = 33.0,
    level: int = 0,
    tile_size: int = 1024,
    batch_size: int = 64,
    device: str = "auto",
    key_added: str = K.EMBEDDING,
    overwrite: bool = False,
    seed: int | None = None,
    client: Any = None,
    scheduler: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    scratch_dir: str | Path | None = None,
    keep_scratch: bool = False,
) -> None:
    """Embed every cell of table ``cells_key`` with an image encoder.

    Parameters
    ----------
    sdata
        SpatialData with image ``image_key`` and the cells table written by
        :func:`bitro.pp.segment_cells` (centroids in ``obsm["spatial"]``, level-0 pixels, ``x, y``;
        nucleus polygons in shapes ``"<cells_key>_shapes"``, needed by ``"morphology"``).
    image_key
        Image to read.
    cells_key
        Table of cells.
    encoder
        A registered name (:func:`bitro.pp.list_encoders`: ``"efficientnet_lite0"``, ``"morphology"``, …),
        ``"vit:/path"`` / ``"dinov2:/path"`` / a path to a local ``transformers`` checkpoint, an
        :class:`~bitro.pp._encoders.Encoder`, a function ``crops (n, h, w, 3) uint8 -> (n, d)`` or a
        ``torch.nn.Module`` taking ``(n, 3, h, w)`` floats in ``[0, 1]``.
    mode
        ``"crop"``: a window of ``crop_um`` around each centroid, resized to the encoder input,
        mean-pooled (the paper). ``"tile"``: one forward pass per tile, feature map sampled at each
        centroid (much faster).
    crop_um
        Side of the crop window in µm. The default 33 µm is the paper's 48-px crop at its
        ~0.69 µm/px. In tile mode it sets the context margin around each tile.
    level
        Pyramid level to read; centroids are converted to that level's pixels.
    tile_size
        Side of a tile core in pixels of ``level``.
    batch_size
        Crops per forward pass (crop mode).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    key_added
        Key in ``obsm`` and ``uns`` of the cells table.
    overwrite
        Replace an existing ``obsm[key_added]``.
    seed
        Seed for torch (recorded; inference itself is deterministic).
    client
        A ``distributed.Client`` to run the tiles on a dask cluster (local or remote), one task per
        tile (crop mode: per group of tiles holding ``batch_size`` cells, as in the local loop, so the
        forward passes and features are the same). ``None``: the client active in this process if
        there is one, else the local loop. The encoder is scattered to each worker once (a torch
        model is pickled once per worker, not per tile) after being moved to ``device``, so use
        ``device="cpu"`` unless every worker has that device; set torch threads on the workers to
        avoid oversubscription. Custom encoders must be picklable (cloudpickle).
    scheduler
        ``"threads"``, ``"processes"`` or ``"synchronous"``: run the tiles with plain dask (no
        cluster). ``"threads"`` shares one encoder; ``"processes"`` pickles it with every task.
    on_error
        ``"raise"``: a tile that cannot be read (e.g. a corrupt chunk) stops the run with an error
        naming the image and tile box. ``"skip"``: its cells keep zero features, a warning is
        logged and its boxes are listed in ``uns[key_added]["skipped_tiles"]``.
    scratch_dir
        Folder (created if missing) where the features of each finished tile (crop mode: group of
        tiles) are written as soon as it is done (``tile_<i>.npz``: the cells' row indices and
        float32 feature rows; written by this process as results arrive, also with a cluster), with
        a ``manifest.json`` of the parameters that determine the features (encoder name and weights
        fingerprint, mode, crop and tile sizes, level, device, image key and shape, cells key,
        number of cells and a fingerprint of their centroids). Rerunning the same call with the same
        folder after a crash only computes the missing tiles (tiles skipped with
        ``on_error="skip"`` are retried) and gives identical features; different parameters raise
        an error before any tile runs. The pixels themselves are not fingerprinted: use a new folder
        if the image changed under the same key. The output matrix is filled from the files into one
        preallocated array, so the features are not held twice in memory. ``None``: no files; each
        tile's features are copied into the output as they arrive (also not held twice).
    keep_scratch
        Leave the tile files and manifest in ``scratch_dir`` after the run (a later identical call
        then only re-assembles). ``False`` (default): delete them (and the folder, if nothing else is
        in it) once ``obsm[key_added]`` is written; they duplicate the output.

    Returns
    -------
    Nothing; writes to table ``cells_key``:

    - ``obsm[key_added]``: ``(n_cells, dim)`` float32 features;
    - ``uns[key_added]``: encoder name, dimension, checkpoint path and sha256, feature names (morphology),
      parameters, the bitro version, ``execution`` (where the tiles ran) and ``skipped_tiles``.
    """
    from bitro import __version__

    table = get_table(sdata, cells_key, hint=_SEGMENT_HINT)
    if table.n_obs == 0:
        raise ValueError(_no_cells_message(table, cells_key, image_key))
    if mode not in ("tile", "crop"):
        msg = f"mode must be 'tile' or 'crop', got {mode!r}."
        raise ValueError(msg)
    check_not_exists(key_added, table.obsm, what="obsm key", overwrite=overwrite)
    if K.SPATIAL not in table.obsm:
        msg = f"Table {cells_key!r} has no obsm[{K.SPATIAL!r}] centroids. {_SEGMENT_HINT}"
        raise KeyError(msg)
    if crop_um <= 0 or tile_size < 16 or batch_size < 1:
        msg = f"Need crop_um > 0, tile_size >= 16 and batch_size >= 1; got {crop_um}, {tile_size}, {batch_size}."
        raise ValueError(msg)

    xy0 = np.asarray(table.obsm[K.SPATIAL], dtype=np.float64)[:, :2]
    mpp0 = get_mpp(sdata)
    image = get_image(sdata, image_key, level=level)
    (h0, w0), (hl, wl) = image_levels(sdata, image_key)[0], image_levels(sdata, image_key)[level]
    downsample = np.array([w0 / wl, h0 / hl])
    xy = xy0 / downsample  # centroids in pixels of the level being read
    um_per_px = mpp0 * float(downsample.mean())
    crop_px = crop_um / um_per_px
    seed = resolve_seed(seed)

    check_parallel_args(client, scheduler, on_error)
    scratch = check_scratch_dir(scratch_dir) if scratch_dir is not None else None

    enc = get_encoder(encoder)
    dev = None
    if hasattr(enc, "module"):
        import torch

        torch.manual_seed(seed)
        dev = resolve_device(device)
        enc.to(dev)
    if enc.kind == "mask":
        used_mode = "mask"
        shapes = get_shapes(sdata, K.shapes_key(cells_key), hint=_SEGMENT_HINT)
        polygons = _polygons_for(table, shapes, downsample)
    elif mode == "crop":
        used_mode = "crop"
    else:
        if not enc.supports_tiles:
            msg = f"Encoder {enc.name!r} has no feature map, so it cannot run in tile mode; use mode='crop'."
            raise ValueError(msg)
        used_mode = "tile"
    data = image.data
    store = None
    if scratch is not None:
        manifest = {
            "step": "embed_cells",
            "encoder": _encoder_fingerprint(enc),
            "mode": used_mode,
            "image_key": image_key,
            "image_shape": [int(v) for v in data.shape],
            "level": int(level),
            "cells_key": cells_key,
            "n_cells": len(xy0),
            "centroids_sha256": arrays_sha256([xy0]),
            "um_per_px": float(um_per_px),
            "crop_um": float(crop_um),
            "crop_px": float(crop_px),
            "tile_size": int(tile_size),
            "device": str(dev) if dev is not None else "cpu",
        }
        if used_mode == "crop":  # the grouping of tiles into tasks (and the forward batches)
            manifest["batch_size"] = int(batch_size)
        if used_mode == "mask":
            manifest["polygons_sha256"] = arrays_sha256(polygons)
        store = FeatureStore(scratch, manifest)
    run_info = execution_info(client, scheduler)
    skipped: list[list[int]] = []
    n_tasks = 0

    def run(
        func: Callable[..., Any], items: list[Any], boxes: list[Any], shared: Any, desc: str, sink: _Scatter
    ) -> None:
        nonlocal n_tasks
        n_tasks = len(items)
        todo = [i for i in range(len(items)) if store is None or not store.has(i)]
        if store is not None and len(todo) < len(items):
            done = len(items) - len(todo)
            logger.info("Resuming from %r: %d of %d tiles already done.", str(scratch), done, len(items))
        if store is None:  # straight into the output, nothing gathered

            def on_result(j: int, res: Any) -> None:
                sink.add(res)
        else:

            def on_result(j: int, res: Any) -> int:
                return store.write(todo[j], res)

        _, skip = map_tiles(
            func,
            [items[i] for i in todo],
            data,
            boxes=[boxes[i] for i in todo],
            shared=shared,
            client=client,
            scheduler=scheduler,
            on_error=on_error,
            image_name=image_key,
            desc=desc,
            on_result=on_result,
        )
        skipped.extend(skip)
        if store is not None:
            for i in range(len(items)):  # one tile in memory at a time
                sink.add(store.read(i))

    if used_mode == "mask":
        feats = _embed_morphology(enc, data, xy, polygons, um_per_px, tile_size, run)
        feats[:, feats.shape[1] - len(enc.density_radii_um) :] = enc.density_features(xy0 * mpp0)
    elif used_mode == "crop":
        feats = _embed_crops(enc, data, xy, crop_px, tile_size, batch_size, run)
    else:
        feats = _embed_tiles(enc, data, xy, crop_px, tile_size, um_per_px, run)

    feats = np.asarray(feats, dtype=np.float32)
    n_bad = _zero_non_finite(feats)
    if n_bad:
        logger.warning("embed_cells: %d non-finite feature values set to 0 (encoder %r).", n_bad, enc.name)
    table.obsm[key_added] = feats
    prov = {k: v for k, v in enc.provenance().items() if v is not None}
    prov["dim"] = int(feats.shape[1])
    prov["bitro_version"] = __version__
    prov["execution"] = run_info
    prov["skipped_tiles"] = skipped
    prov["params"] = {
        "image_key": image_key,
        "mode": used_mode,
        "crop_um": float(crop_um),
        "crop_px": float(crop_px),
        "level": int(level),
        "um_per_px": float(um_per_px),
        "tile_size": int(tile_size),
        "batch_size": int(batch_size),
        "device": str(dev) if dev is not None else "cpu",
        "seed": int(seed),
        "pooling": {
            "crop": "mean of the final feature map / patch tokens",
            "tile": "tile feature map averaged over the crop window (bilinear at the centroid if smaller than a stride)",
            "mask": "per-nucleus mask statistics",
        }[used_mode],
    }
    table.uns[key_added] = prov
    if store is not None and not keep_scratch:
        store.remove(n_tasks)
    logger.info("embed_cells: %d cells x %d features in obsm[%r]", feats.shape[0], feats.shape[1], key_added)


def _no_cells_message(table: Any, cells_key: str, image_key: str) -> str:
    """Why table ``cells_key`` is empty (segmentation found nothing, or an empty import) and what to check."""
    record = table.uns.get(cells_key, {})
    record = record if isinstance(record, dict) else {}
    if "source" in record:
        origin = f"the segmentation imported from {record['source']!r} holds no cells"
        check = "Check that file (and that it belongs to this image)."
    else:
        method, tissue = record.get("method"), record.get("tissue_key")
        origin = "bt.pp.segment_cells" + (f" (method {method!r})" if isinstance(method, str) else "")
        origin += " found no cells"
        mask = f"that the tissue mask {tissue!r} covers the tissue, " if isinstance(tissue, str) else ""
        check = (
            f"Check that image {record.get('image_key', image_key)!r} shows H&E-stained tissue at the recorded "
            f"µm per pixel (bt.io.get_mpp), {mask}and the segmentation parameters (threshold, min_area_um2, "
            "max_area_um2)."
        )
    return f"Table {cells_key!r} has 0 cells: {origin}, so there is nothing to embed. {check}"


def _zero_non_finite(feats: np.ndarray, mask_bytes: int = 1 << 20) -> int:
    """Set NaN/inf entries to 0 in place, a ~``mask_bytes`` mask at a time (no full-size mask); return their count."""
    n_bad = 0
    chunk = max(1, mask_bytes // max(1, feats.shape[1]))
    for start in range(0, len(feats), chunk):
        block = feats[start : start + chunk]
        bad = np.isfinite(block)
        np.logical_not(bad, out=bad)
        if bad.any():
            n_bad += int(bad.sum())
            block[bad] = 0.0
    return n_bad


def _encoder_fingerprint(enc: Encoder) -> dict[str, Any]:
    """What identifies the encoder's features for the scratch manifest.

    Its provenance (name, input size, checkpoint path and sha256, morphology parameters) without
    ``dim`` (unknown before the first call for plain functions); a torch module without a checkpoint
    file gets the sha256 of its weights, a plain function its qualified name.
    """
    out = {k: v for k, v in enc.provenance().items() if k != "dim" and v is not None}
    if not out.get("checkpoint_sha256") and hasattr(enc, "module"):
        out["weights_sha256"] = state_sha256(enc.module.state_dict())
    func = getattr(enc, "func", None)
    if func is not None:
        qualname = getattr(func, "__qualname__", type(func).__name__)
        out["function"] = f"{getattr(func, '__module__', '')}.{qualname}"
    return out


# ----------------------------------------------------------------------------------------------------------
# tiling and reading (private; the lead may swap in bitro.pp._tiles later)
# ----------------------------------------------------------------------------------------------------------
def _group_by_tile(xy: np.ndarray, shape_yx: tuple[int, int], tile_size: int) -> list[np.ndarray]:
    """Indices of the cells whose centroid falls in each (non-empty) tile core, row-major order."""
    n_ty, n_tx = max(1, math.ceil(shape_yx[0] / tile_size)), max(1, math.ceil(shape_yx[1] / tile_size))
    tx = np.clip(np.floor(xy[:, 0] / tile_size), 0, n_tx - 1).astype(np.int64)
    ty = np.clip(np.floor(xy[:, 1] / tile_size), 0, n_ty - 1).astype(np.int64)
    key = ty * n_tx + tx
    order = np.argsort(key, kind="stable")
    _, starts = np.unique(key[order], return_index=True)
    return np.split(order, starts[1:]) if len(order) else []


def _box_around(points: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """Integer ``(y0, x0, y1, x1)`` box around ``points`` (x, y) with ``margin`` pixels each side."""
    x0, y0 = np.floor(points.min(axis=0) - margin).astype(int)
    x1, y1 = np.ceil(points.max(axis=0) + margin).astype(int) + 1
    return int(y0), int(x0), int(y1), int(x1)


def _crop_starts(xy: np.ndarray, size: int) -> np.ndarray:
    """Top-left corners (x, y) of ``size``-px windows centred on ``xy``."""
    return np.floor(xy - (size - 1) / 2 + 0.5).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# the three ways of embedding
# ----------------------------------------------------------------------------------------------------------
class _Scatter:
    """Copies each tile's ``(idx, features)`` into one ``(n, d)`` float32 array as it arrives.

    The array is ``out`` when given, else allocated at the first result (a plain function encoder's
    dimension is unknown before its first call). Cells of skipped tiles keep zeros. Nothing else is
    kept, so besides the output only the tile being copied is in memory.
    """

    def __init__(self, n: int, out: np.ndarray | None = None) -> None:
        self.n, self.out = n, out

    def add(self, result: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Copy one tile's features (``None``: a skipped tile) into the output."""
        if result is None:
            return
        idx, features = result
        if self.out is None:
            self.out = np.zeros((self.n, features.shape[1]), dtype=np.float32)
        self.out[idx] = features

    def array(self, dim: int | None) -> np.ndarray:
        """The output; zeros of width ``dim`` (0 if unknown) when no tile gave a result."""
        return self.out if self.out is not None else np.zeros((self.n, dim or 0), dtype=np.float32)


def _embed_crops(
    enc: Encoder, data: Any, xy: np.ndarray, crop_px: float, tile_size: int, batch_size: int, run: RunTiles
) -> np.ndarray:
    size = max(1, round(crop_px))
    margin = size / 2 + 2
    # tiles are grouped until a group holds >= batch_size cells: one forward pass per batch_size crops
    items: list[tuple[Any, ...]] = []
    boxes: list[list[tuple[int, int, int, int]]] = []
    idx_list: list[np.ndarray] = []
    starts_list: list[np.ndarray] = []
    box_list: list[tuple[int, int, int, int]] = []
    for idx in _group_by_tile(xy, data.shape[1:], tile_size):
        y0, x0, y1, x1 = _box_around(xy[idx], margin)
        idx_list.append(idx)
        starts_list.append(_crop_starts(xy[idx], size) - np.array([x0, y0]))
        box_list.append((y0, x0, y1, x1))
        if sum(len(i) for i in idx_list) >= batch_size:
            items.append((idx_list, starts_list, size, batch_size))
            boxes.append(box_list)
            idx_list, starts_list, box_list = [], [], []
    if idx_list:
        items.append((idx_list, starts_list, size, batch_size))
        boxes.append(box_list)
    sink = _Scatter(len(xy))
    run(_crop_features, items, boxes, enc, f"embedding cells ({enc.name}, crops)", sink)
    return sink.array(enc.dim)


def _crop_features(
    tiles: list[np.ndarray], item: tuple[Any, ...], enc: Encoder
) -> tuple[np.ndarray, np.ndarray]:
    """Crops of a group of tiles, embedded ``batch_size`` at a time (runs on a dask worker when parallel)."""
    idx_list, starts_list, size, batch_size = item
    crops = np.concatenate(
        [
            np.stack([tile[sy : sy + size, sx : sx + size] for sx, sy in starts])
            for tile, starts in zip(tiles, starts_list, strict=True)
        ]
    )
    idx = np.concatenate(idx_list)
    feats = [enc.embed_crops(crops[s : s + batch_size]) for s in range(0, len(idx), batch_size)]
    return idx, np.concatenate(feats)


def _embed_tiles(
    enc: Encoder, data: Any, xy: np.ndarray, crop_px: float, tile_size: int, um_per_px: float, run: RunTiles
) -> np.ndarray:
    factor = um_per_px / enc.mpp if enc.mpp else 1.0
    margin = math.ceil(crop_px)
    items, boxes = [], []
    for idx in _group_by_tile(xy, data.shape[1:], tile_size):
        y0, x0, y1, x1 = _box_around(xy[idx], margin)
        items.append((idx, (xy[idx] - np.array([x0, y0])) * factor, factor, crop_px * factor))
        boxes.append((y0, x0, y1, x1))
    sink = _Scatter(len(xy))
    run(_tile_features, items, boxes, enc, f"embedding cells ({enc.name}, tiles)", sink)
    return sink.array(enc.dim)


def _tile_features(tile: np.ndarray, item: tuple[Any, ...], enc: Encoder) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass on a tile, pooled at its cells (runs on a dask worker when parallel)."""
    idx, pos, factor, window = item
    if factor != 1.0:
        from skimage.transform import resize

        shape = (max(1, round(tile.shape[0] * factor)), max(1, round(tile.shape[1] * factor)))
        tile = resize(tile, shape, order=1, preserve_range=True, anti_aliasing=factor < 1).astype(np.uint8)
    fmap = enc.feature_map(tile)
    if fmap is None:
        msg = f"Encoder {enc.name!r} returned no feature map, so it cannot run in tile mode; use mode='crop'."
        raise ValueError(msg)
    return idx, _pool_windows(fmap, pos, stride=float(enc.stride), window=window)


def _pool_windows(fmap: np.ndarray, pos_xy: np.ndarray, *, stride: float, window: float) -> np.ndarray:
    """Average ``fmap`` ``(d, gh, gw)`` over a square window centred at each input-pixel position → ``(n, d)``.

    Feature cell ``j`` covers input pixels ``[j·s, (j+1)·s)``. The window side is ``max(window, s)``
    and cells are weighted by their overlap with it (separable in x and y). For a window of one
    stride this is exactly bilinear interpolation between cell centres; for a crop-sized window it
    averages the feature cells the crop would cover.
    """
    side = max(float(window), float(stride))
    k = int(np.ceil(side / stride)) + 1  # cells a window can touch along one axis
    wy, iy = _axis_weights(pos_xy[:, 1] + 0.5, side, stride, fmap.shape[1], k)
    wx, ix = _axis_weights(pos_xy[:, 0] + 0.5, side, stride, fmap.shape[2], k)
    f = fmap.transpose(1, 2, 0)  # (gh, gw, d)
    out = np.zeros((len(pos_xy), fmap.shape[0]), dtype=np.float64)
    for a in range(k):
        for b in range(k):
            w = wy[:, a] * wx[:, b]
            out += w[:, None] * f[iy[:, a], ix[:, b]]
    return out.astype(np.float32)


def _axis_weights(
    centre: np.ndarray, side: float, stride: float, n_cells: int, k: int
) -> tuple[np.ndarray, ...]:
    """Overlap weights (normalised) and indices of the ``k`` cells a window touches along one axis."""
    lo = np.clip(centre - side / 2, 0, max(n_cells * stride - side, 0.0))  # keep the window on the map
    first = np.floor(lo / stride).astype(np.int64)
    idx = first[:, None] + np.arange(k)[None, :]
    cell_lo, cell_hi = idx * stride, (idx + 1) * stride
    w = np.clip(np.minimum(cell_hi, (lo + side)[:, None]) - np.maximum(cell_lo, lo[:, None]), 0, None)
    w[idx >= n_cells] = 0
    w /= np.maximum(w.sum(1, keepdims=True), 1e-12)
    return w, np.minimum(idx, n_cells - 1)


def _polygons_for(table: Any, shapes: Any, downsample: np.ndarray) -> list[np.ndarray]:
    """Exterior ring (x, y) in level pixels of each table row's nucleus, matched by instance id."""
    ids = (
        table.obs[K.INSTANCE_KEY].astype(str) if K.INSTANCE_KEY in table.obs else table.obs_names.astype(str)
    )
    index = shapes.index.astype(str)
    # a hash lookup: np.isin on object (string) arrays compares every pair, O(n²) — 2 min at 112k cells
    missing = ~pd.Index(np.asarray(ids)).isin(index)
    if missing.any():
        msg = (
            f"{int(missing.sum())} cells of the table have no polygon in the shapes element (e.g. "
            f"{list(np.asarray(ids)[missing][:3])}); the table and its shapes are out of sync. {_SEGMENT_HINT}"
        )
        raise ValueError(msg)
    geoms = shapes.geometry.set_axis(index).loc[np.asarray(ids)]
    radius = shapes["radius"].set_axis(index).loc[np.asarray(ids)] if "radius" in shapes else None
    out = []
    for i, g in enumerate(geoms):
        if g.geom_type == "Point" and radius is not None:
            g = g.buffer(float(radius.iloc[i]))
        elif g.geom_type == "MultiPolygon":
            g = max(g.geoms, key=lambda p: p.area)
        out.append(np.asarray(g.exterior.coords, dtype=np.float64)[:, :2] / downsample)
    return out


def _embed_morphology(
    enc: Any,
    data: Any,
    xy: np.ndarray,
    polygons: list[np.ndarray],
    um_per_px: float,
    tile_size: int,
    run: RunTiles,
) -> np.ndarray:
    bounds = np.array([[*p.min(axis=0), *p.max(axis=0)] for p in polygons]).reshape(-1, 4)  # x0 y0 x1 y1
    ring_px = enc.ring_um / um_per_px
    items, boxes = [], []
    for idx in _group_by_tile(xy, data.shape[1:], tile_size):
        corners = np.concatenate([bounds[idx, :2], bounds[idx, 2:]])
        y0, x0, y1, x1 = _box_around(corners, ring_px + 2)
        near = np.flatnonzero(
            (bounds[:, 2] >= x0) & (bounds[:, 0] < x1) & (bounds[:, 3] >= y0) & (bounds[:, 1] < y1)
        )
        near = np.setdiff1d(near, idx)
        cells = np.concatenate([near, idx])  # the tile's own cells are drawn last
        rings = [(polygons[c][:, 1] - y0, polygons[c][:, 0] - x0) for c in cells]
        items.append((idx, len(near), rings, xy[cells] - np.array([x0, y0]), um_per_px))
        boxes.append((y0, x0, y1, x1))
    out = np.zeros((len(xy), enc.dim), dtype=np.float32)  # the density columns are filled by the caller
    sink = _Scatter(len(xy), out[:, : enc.dim - len(enc.density_radii_um)])
    run(_morphology_features, items, boxes, enc, "embedding cells (morphology)", sink)
    return out


def _morphology_features(tile: np.ndarray, item: tuple[Any, ...], enc: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a tile's nuclei (neighbours first) and measure its own (runs on a dask worker when parallel)."""
    from skimage.draw import polygon as draw_polygon

    idx, n_near, rings, xy_local, um_per_px = item
    n_cells = len(rings)
    labels = np.zeros(tile.shape[:2], dtype=np.int32)
    for lab, (rows, cols) in enumerate(rings, start=1):
        rr, cc = draw_polygon(rows, cols, shape=labels.shape)
        labels[rr, cc] = lab
    own = np.arange(n_near + 1, n_cells + 1)
    present = np.bincount(labels.ravel(), minlength=n_cells + 1)[own] > 0
    for lab in own[~present]:  # nuclei too small to rasterise: keep their centroid pixel
        cx, cy = np.round(xy_local[lab - 1]).astype(int)
        labels[np.clip(cy, 0, labels.shape[0] - 1), np.clip(cx, 0, labels.shape[1] - 1)] = lab
    return idx, enc.embed_masks(tile, labels, own, um_per_px=um_per_px)
