"""Tiling of a large image with overlap, and reading of one box as an RGB array.

The one tiling system of ``bt.pp`` (segmentation and embedding both use it, through
:mod:`bitro.pp._runner`). A grid of non-overlapping *core* squares of ``tile_size`` pixels covers the
image; each tile is read with ``overlap`` extra pixels on every side (clipped to the image). Work
done on the read box keeps only what belongs to the core (e.g. objects whose centroid lies in it),
so every object is kept exactly once provided ``overlap`` exceeds the largest object's diameter.
Segmentation keeps an object in the core that holds its centroid's nearest pixel
(:meth:`Tile.in_core`); embedding groups cells with :func:`group_points`.

All boxes are level-0 pixel index ranges ``[y0, y1) × [x0, x1)``; a pixel's centre sits at its
integer index (x = column, y = row), the convention of ``obsm["spatial"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One tile: the box to read and the core it owns (half-open level-0 pixel ranges).

    Attributes
    ----------
    y0, x0, y1, x1
        Read box (core plus overlap, clipped to the image).
    core_y0, core_x0, core_y1, core_x1
        Core region; the cores of a grid partition the image.
    """

    y0: int
    x0: int
    y1: int
    x1: int
    core_y0: int
    core_x0: int
    core_y1: int
    core_x1: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Read box ``(y0, x0, y1, x1)``."""
        return self.y0, self.x0, self.y1, self.x1

    @property
    def core(self) -> tuple[int, int, int, int]:
        """Core box ``(y0, x0, y1, x1)``."""
        return self.core_y0, self.core_x0, self.core_y1, self.core_x1

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the read box."""
        return self.y1 - self.y0, self.x1 - self.x0

    def in_core(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Whether level-0 points ``(y, x)`` lie in the core (lower edges inclusive, upper exclusive).

        A point is tested after rounding to the nearest pixel index, so that a point owned by
        one core is owned by no other core of the same grid.
        """
        yi = np.floor(np.asarray(y, dtype=np.float64) + 0.5)
        xi = np.floor(np.asarray(x, dtype=np.float64) + 0.5)
        return (yi >= self.core_y0) & (yi < self.core_y1) & (xi >= self.core_x0) & (xi < self.core_x1)


def tile_grid(shape_yx: tuple[int, int], *, tile_size: int, overlap: int = 0) -> list[Tile]:
    """Tiles covering an image of ``shape_yx = (height, width)`` level-0 pixels, row-major order.

    Parameters
    ----------
    shape_yx
        Image height and width in pixels.
    tile_size
        Side of each core square in pixels (the last row/column of cores may be smaller).
    overlap
        Pixels added on every side of a core to form the read box (clipped to the image).

    Returns
    -------
    list of :class:`Tile`; their cores partition the image.
    """
    height, width = (int(v) for v in shape_yx)
    tile_size, overlap = int(tile_size), int(overlap)
    if tile_size < 1:
        msg = f"tile_size must be a positive number of pixels, got {tile_size}."
        raise ValueError(msg)
    if overlap < 0:
        msg = f"overlap must be ≥ 0 pixels, got {overlap}."
        raise ValueError(msg)
    if height < 1 or width < 1:
        msg = f"Cannot tile an empty image of shape {shape_yx}."
        raise ValueError(msg)
    tiles = []
    for i in range(math.ceil(height / tile_size)):
        cy0, cy1 = i * tile_size, min((i + 1) * tile_size, height)
        for j in range(math.ceil(width / tile_size)):
            cx0, cx1 = j * tile_size, min((j + 1) * tile_size, width)
            tiles.append(
                Tile(
                    y0=max(cy0 - overlap, 0),
                    x0=max(cx0 - overlap, 0),
                    y1=min(cy1 + overlap, height),
                    x1=min(cx1 + overlap, width),
                    core_y0=cy0,
                    core_x0=cx0,
                    core_y1=cy1,
                    core_x1=cx1,
                )
            )
    return tiles


def group_points(
    xy: np.ndarray, shape_yx: tuple[int, int], *, tile_size: int
) -> list[tuple[int, np.ndarray]]:
    """Points grouped by the core of :func:`tile_grid` that contains them.

    A point ``(x, y)`` belongs to the core ``[x0, x1) × [y0, y1)`` containing it as a continuous
    coordinate (``floor(x / tile_size)``); points outside the image go to the nearest core, so every
    point is in exactly one group. (This differs from :meth:`Tile.in_core`'s nearest-pixel rule only
    within half a pixel of a core edge; cell embeddings have always been grouped this way, and
    changing it would move the tile-mode features of every cell of a tile whose read box moved.)

    Parameters
    ----------
    xy
        ``(n, 2)`` points, x (column) then y (row), in pixels of the tiled image.
    shape_yx
        Image height and width in pixels.
    tile_size
        Side of the core squares (as in :func:`tile_grid`).

    Returns
    -------
    ``(tile index, point indices)`` for every core holding at least one point, in the row-major
    order of :func:`tile_grid`; the indices of each group are increasing.
    """
    height, width = (int(v) for v in shape_yx)
    tile_size = int(tile_size)
    n_ty, n_tx = max(1, math.ceil(height / tile_size)), max(1, math.ceil(width / tile_size))
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    tx = np.clip(np.floor(xy[:, 0] / tile_size), 0, n_tx - 1).astype(np.int64)
    ty = np.clip(np.floor(xy[:, 1] / tile_size), 0, n_ty - 1).astype(np.int64)
    key = ty * n_tx + tx
    order = np.argsort(key, kind="stable")
    tiles, starts = np.unique(key[order], return_index=True)
    if not len(order):
        return []
    return list(zip((int(t) for t in tiles), np.split(order, starts[1:]), strict=True))


def read_box(image: Any, box: tuple[int, int, int, int], *, fill: int = 255) -> np.ndarray:
    """Read ``image[:, y0:y1, x0:x1]`` of a ``(c, y, x)`` image as an ``(h, w, 3)`` uint8 array.

    Only that box is materialised (``.compute()`` of the dask slice). Parts of the box outside the
    image are filled with ``fill`` (white, like glass).

    Parameters
    ----------
    image
        ``(c, y, x)`` xarray ``DataArray``, dask or numpy array with at least 3 channels (RGB first).
    box
        ``(y0, x0, y1, x1)`` level-0 pixel ranges, half-open.
    fill
        Value of pixels outside the image.
    """
    y0, x0, y1, x1 = (int(v) for v in box)
    if y1 <= y0 or x1 <= x0:
        msg = f"box must be (y0, x0, y1, x1) with y1 > y0 and x1 > x0, got {box}."
        raise ValueError(msg)
    if image.ndim != 3 or image.shape[0] < 3:
        msg = f"Expected a (c, y, x) RGB image with ≥ 3 channels, got shape {tuple(image.shape)}."
        raise ValueError(msg)
    data = image.data if hasattr(image, "dims") else image
    height, width = int(data.shape[1]), int(data.shape[2])
    out = np.full((y1 - y0, x1 - x0, 3), fill, dtype=np.uint8)
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
    if cy1 > cy0 and cx1 > cx0:
        part = data[:3, cy0:cy1, cx0:cx1]
        part = np.asarray(part.compute() if hasattr(part, "compute") else part)
        if part.dtype != np.uint8:
            if np.issubdtype(part.dtype, np.floating) and part.size and np.nanmax(part) <= 1.0:
                part = part * 255.0
            part = np.clip(np.rint(part), 0, 255).astype(np.uint8)
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = np.moveaxis(part, 0, -1)
    return out
