"""The three ways :func:`bitro.pp.embed_cells` embeds cells, as tiled steps of :mod:`bitro.pp._runner`.

Cells are grouped by the tile core that owns their centroid (:func:`bitro.pp._tiles.group_points`,
the tiling of segmentation); each task reads a box around its cells with a margin of context (white
outside the image), so cells near borders see their surroundings.

- :func:`crop_step` (``mode="crop"``, the paper's): a ``crop_px`` window around each centroid,
  embedded ``batch_size`` crops at a time; tiles are grouped until a group holds ``batch_size``
  cells, so the forward passes are the same however the tasks run.
- :func:`feature_map_step` (``mode="tile"``): one forward pass per tile; each cell's feature is the
  feature map averaged over the cells covered by its crop window (:func:`pool_windows`), optionally
  followed by the same map averaged over larger context windows around the cell.
- :func:`morphology_step` (``encoder="morphology"``): the tile's nuclei are rasterised from their
  polygons (neighbours first) and measured.

Each task returns ``(cell indices, features)``; :class:`Scatter` copies them into one float32
output as they arrive, so the features are held once (plus one task's), never as a list of tasks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bitro.pp._encoders import Encoder
from bitro.pp._runner import Task, TiledStep
from bitro.pp._scratch import FeatureStore
from bitro.pp._tiles import group_points

Box = tuple[int, int, int, int]

__all__ = ["Scatter", "crop_step", "feature_map_step", "morphology_step", "pool_windows"]


class Scatter:
    """Copies each task's ``(idx, features)`` into one ``(n, d)`` float32 array as it arrives.

    The array is ``out`` when given, else allocated at the first result (a plain function encoder's
    dimension is unknown before its first call). Cells of skipped tasks keep zeros. Nothing else is
    kept, so besides the output only the result being copied is in memory.
    """

    def __init__(self, n: int, dim: int | None = None, out: np.ndarray | None = None) -> None:
        self.n, self.dim, self.out = n, dim, out

    def add(self, index: int, result: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Copy one task's features (``None``: a skipped task) into the output."""
        if result is None:
            return
        idx, features = result
        if self.out is None:
            self.out = np.zeros((self.n, features.shape[1]), dtype=np.float32)
        self.out[idx] = features

    def result(self) -> np.ndarray:
        """The output; zeros of width ``dim`` (0 if unknown) when no task gave a result."""
        return self.out if self.out is not None else np.zeros((self.n, self.dim or 0), dtype=np.float32)


def _box_around(points: np.ndarray, margin: float) -> Box:
    """Integer ``(y0, x0, y1, x1)`` box around ``points`` (x, y) with ``margin`` pixels each side."""
    x0, y0 = np.floor(points.min(axis=0) - margin).astype(int)
    x1, y1 = np.ceil(points.max(axis=0) + margin).astype(int) + 1
    return int(y0), int(x0), int(y1), int(x1)


def _crop_starts(xy: np.ndarray, size: int) -> np.ndarray:
    """Top-left corners (x, y) of ``size``-px windows centred on ``xy``."""
    return np.floor(xy - (size - 1) / 2 + 0.5).astype(np.int64)


def _groups(xy: np.ndarray, shape_yx: Any, tile_size: int) -> list[np.ndarray]:
    """Indices of the cells of each non-empty tile core, in grid order."""
    return [idx for _, idx in group_points(xy, (int(shape_yx[0]), int(shape_yx[1])), tile_size=tile_size)]


def _step(
    tasks: list[Task],
    process: Any,
    enc: Encoder,
    merge: Scatter,
    desc: str,
    fingerprint: dict,
    name: str = "embed_cells",
) -> TiledStep:
    return TiledStep(
        name=name,
        tasks=tasks,
        process=process,
        merge=merge,
        store=FeatureStore,
        fingerprint=fingerprint,
        shared=enc,
        desc=desc,
    )


# ----------------------------------------------------------------------------------------------------------
# crops
# ----------------------------------------------------------------------------------------------------------
def crop_step(
    enc: Encoder,
    data: Any,
    xy: np.ndarray,
    *,
    crop_px: float,
    tile_size: int,
    batch_size: int,
    fingerprint: dict,
) -> TiledStep:
    """Crop mode: tasks of tiles grouped until they hold ``batch_size`` cells."""
    size = max(1, round(crop_px))
    margin = size / 2 + 2
    tasks: list[Task] = []
    idx_list: list[np.ndarray] = []
    starts_list: list[np.ndarray] = []
    box_list: list[Box] = []
    for idx in _groups(xy, data.shape[1:], tile_size):
        y0, x0, y1, x1 = _box_around(xy[idx], margin)
        idx_list.append(idx)
        starts_list.append(_crop_starts(xy[idx], size) - np.array([x0, y0]))
        box_list.append((y0, x0, y1, x1))
        if sum(len(i) for i in idx_list) >= batch_size:
            tasks.append(Task(str(len(tasks)), (idx_list, starts_list, size, batch_size), box_list))
            idx_list, starts_list, box_list = [], [], []
    if idx_list:
        tasks.append(Task(str(len(tasks)), (idx_list, starts_list, size, batch_size), box_list))
    merge = Scatter(len(xy), enc.dim)
    return _step(tasks, crop_features, enc, merge, f"embedding cells ({enc.name}, crops)", fingerprint)


def crop_features(
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


# ----------------------------------------------------------------------------------------------------------
# feature maps of tiles
# ----------------------------------------------------------------------------------------------------------
def feature_map_step(
    enc: Encoder,
    data: Any,
    xy: np.ndarray,
    *,
    windows_px: tuple[float, ...],
    margin_px: float,
    tile_size: int,
    um_per_px: float,
    fingerprint: dict,
    name: str = "embed_cells",
    target_mpp: float | None = None,
) -> TiledStep:
    """Tile mode: one task (one forward pass) per tile with cells.

    Each cell's feature is the map pooled over each window of ``windows_px`` (sides in pixels of
    the level read, same centre), concatenated in that order. Tiles are read with ``margin_px`` of
    context around their cells and resampled to ``target_mpp`` µm per pixel (``None``: the encoder's
    ``mpp``, else as read) before the forward pass.
    """
    mpp = target_mpp or enc.mpp
    factor = um_per_px / mpp if mpp else 1.0
    margin = math.ceil(margin_px)
    windows = tuple(w * factor for w in windows_px)
    tasks = []
    for idx in _groups(xy, data.shape[1:], tile_size):
        y0, x0, y1, x1 = _box_around(xy[idx], margin)
        item = (idx, (xy[idx] - np.array([x0, y0])) * factor, factor, windows)
        tasks.append(Task(str(len(tasks)), item, (y0, x0, y1, x1)))
    merge = Scatter(len(xy), enc.dim * len(windows) if enc.dim else None)
    return _step(tasks, tile_features, enc, merge, f"embedding cells ({enc.name}, tiles)", fingerprint, name)


def tile_features(tile: np.ndarray, item: tuple[Any, ...], enc: Encoder) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass on a tile, pooled at its cells over each window (runs on a dask worker when parallel)."""
    idx, pos, factor, windows = item
    if factor != 1.0:
        from skimage.transform import resize

        shape = (max(1, round(tile.shape[0] * factor)), max(1, round(tile.shape[1] * factor)))
        tile = resize(tile, shape, order=1, preserve_range=True, anti_aliasing=factor < 1).astype(np.uint8)
    fmap = enc.feature_map(tile)
    if fmap is None:
        msg = f"Encoder {enc.name!r} returned no feature map, so it cannot run in tile mode; use mode='crop'."
        raise ValueError(msg)
    pooled = [pool_windows(fmap, pos, stride=float(enc.stride), window=w) for w in windows]
    return idx, pooled[0] if len(pooled) == 1 else np.concatenate(pooled, axis=1)


def pool_windows(fmap: np.ndarray, pos_xy: np.ndarray, *, stride: float, window: float) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------------------
# nucleus morphology
# ----------------------------------------------------------------------------------------------------------
def morphology_step(
    enc: Any,
    data: Any,
    xy: np.ndarray,
    polygons: list[np.ndarray],
    *,
    um_per_px: float,
    tile_size: int,
    out: np.ndarray,
    fingerprint: dict,
) -> TiledStep:
    """Morphology: one task per tile with cells; features go to the first columns of ``out``.

    The last ``len(enc.density_radii_um)`` columns of ``out`` (neighbour densities, computed without
    pixels) are left to the caller.
    """
    bounds = np.array([[*p.min(axis=0), *p.max(axis=0)] for p in polygons]).reshape(-1, 4)  # x0 y0 x1 y1
    ring_px = enc.ring_um / um_per_px
    tasks = []
    for idx in _groups(xy, data.shape[1:], tile_size):
        corners = np.concatenate([bounds[idx, :2], bounds[idx, 2:]])
        y0, x0, y1, x1 = _box_around(corners, ring_px + 2)
        near = np.flatnonzero(
            (bounds[:, 2] >= x0) & (bounds[:, 0] < x1) & (bounds[:, 3] >= y0) & (bounds[:, 1] < y1)
        )
        near = np.setdiff1d(near, idx)
        cells = np.concatenate([near, idx])  # the tile's own cells are drawn last
        rings = [(polygons[c][:, 1] - y0, polygons[c][:, 0] - x0) for c in cells]
        item = (idx, len(near), rings, xy[cells] - np.array([x0, y0]), um_per_px)
        tasks.append(Task(str(len(tasks)), item, (y0, x0, y1, x1)))
    merge = Scatter(len(xy), out=out[:, : enc.dim - len(enc.density_radii_um)])
    return _step(tasks, morphology_features, enc, merge, "embedding cells (morphology)", fingerprint)


def morphology_features(tile: np.ndarray, item: tuple[Any, ...], enc: Any) -> tuple[np.ndarray, np.ndarray]:
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
