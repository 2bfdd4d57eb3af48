"""Tiling with overlap and reading boxes of a (c, y, x) image."""

from __future__ import annotations

import numpy as np
import pytest

from bitro.pp._tiles import read_box, tile_grid


def test_cores_partition_the_image():
    tiles = tile_grid((100, 250), tile_size=64, overlap=10)
    assert len(tiles) == 2 * 4
    cover = np.zeros((100, 250), dtype=int)
    for t in tiles:
        cover[t.core_y0 : t.core_y1, t.core_x0 : t.core_x1] += 1
        # read box = core + overlap, clipped to the image
        assert t.y0 == max(t.core_y0 - 10, 0) and t.x1 == min(t.core_x1 + 10, 250)
        assert t.shape == (t.y1 - t.y0, t.x1 - t.x0)
    assert (cover == 1).all()
    assert tiles[1].core == (0, 64, 64, 128)  # row-major order, (y0, x0, y1, x1)
    assert tiles[-1].box == (54, 182, 100, 250)


def test_in_core_assigns_each_point_once(rng):
    tiles = tile_grid((90, 130), tile_size=32, overlap=5)
    pts = rng.uniform(-0.49, [129.49, 89.49], size=(500, 2))  # (x, y)
    pts[:5] = [[32, 10], [31.5, 10], [63.99, 64], [0, 0], [129.4, 89.4]]
    owners = np.stack([t.in_core(pts[:, 1], pts[:, 0]) for t in tiles])
    assert (owners.sum(axis=0) == 1).all()
    assert owners[1, 0] and owners[1, 1]  # x = 31.5 rounds to 32: second column of cores


def test_bad_grid_arguments():
    with pytest.raises(ValueError, match="tile_size"):
        tile_grid((10, 10), tile_size=0)
    with pytest.raises(ValueError, match="overlap"):
        tile_grid((10, 10), tile_size=4, overlap=-1)


def test_read_box_dask_and_padding(rng):
    import dask.array as da

    from bitro.io._build import image_element

    arr = rng.integers(0, 255, size=(3, 40, 60), dtype=np.uint8)
    elem = image_element(arr, chunks=16)
    out = read_box(elem, (5, 10, 25, 50))
    assert out.shape == (20, 40, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.moveaxis(arr[:, 5:25, 10:50], 0, -1))
    # outside the image is white
    out = read_box(da.from_array(arr, chunks=16), (-3, 55, 2, 65))
    assert (out[:3] == 255).all() and (out[:, 5:] == 255).all()
    np.testing.assert_array_equal(out[3:, :5], np.moveaxis(arr[:, 0:2, 55:60], 0, -1))
    with pytest.raises(ValueError, match="box"):
        read_box(arr, (5, 5, 5, 10))
    with pytest.raises(ValueError, match="RGB"):
        read_box(arr[:1], (0, 0, 5, 5))


def test_group_points_partitions_by_core_and_keeps_outside_points(rng):
    from bitro.pp._tiles import group_points

    shape = (90, 130)
    tiles = tile_grid(shape, tile_size=32)  # a 3 x 5 grid
    pts = rng.uniform(0, [130, 90], size=(400, 2))
    pts[:4] = [[32.0, 10], [31.99, 10], [-7.0, 95.0], [140.0, -3.0]]  # two at a core edge, two outside
    groups = group_points(pts, shape, tile_size=32)
    owner = np.full(len(pts), -1)
    for t, idx in groups:
        assert len(idx) and np.all(np.diff(idx) > 0)
        assert (owner[idx] == -1).all()  # no point in two groups
        owner[idx] = t
    assert (owner >= 0).all()
    assert [t for t, _ in groups] == sorted(t for t, _ in groups)
    for i in range(4, len(pts)):  # the core containing the point
        t = tiles[owner[i]]
        assert t.core_x0 <= pts[i, 0] < t.core_x1 and t.core_y0 <= pts[i, 1] < t.core_y1
    assert owner[0] == 1 and owner[1] == 0  # the lower edge is inclusive, the upper exclusive
    assert owner[2] == 10 and owner[3] == 4  # nearest cores of the 3 x 5 grid: bottom-left, top-right
    assert group_points(np.zeros((0, 2)), shape, tile_size=32) == []
