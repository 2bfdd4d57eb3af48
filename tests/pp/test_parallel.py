"""Tests of tiled execution on dask (bitro.pp._parallel) through bt.pp.segment_cells / bt.pp.embed_cells."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch

import bitro as bt
from bitro.pp._parallel import map_tiles
from bitro.pp._tiles import tile_grid

TILE = 200  # 3 x 3 tiles on a 600 px slide
THRESHOLD = 0.0144  # ≈ the estimated one; fixed so that the corrupt-image tests never read the image outside the tiles


class _Pool4(torch.nn.Module):
    """A tiny torch encoder with a feature map (stride 4)."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 4)


def _slide():
    bt.settings.progress = False
    return bt.datasets.synthetic_tissue(size=600, seed=0)


def _cells(sdata, key="cells"):
    t = sdata[key]
    polys = [g.wkt for g in sdata[f"{key}_shapes"].geometry]
    return t.obsm["spatial"], t.obs["area_um2"].to_numpy(), polys


def _embed_all(sdata, **kwargs):
    bt.pp.embed_cells(sdata, encoder="morphology", key_added="X_morph", tile_size=TILE, **kwargs)
    bt.pp.embed_cells(
        sdata, encoder=_Pool4(), mode="tile", crop_um=4.0, key_added="X_tile", tile_size=TILE, **kwargs
    )
    bt.pp.embed_cells(
        sdata, encoder=_Pool4(), mode="crop", batch_size=16, key_added="X_crop", tile_size=TILE, **kwargs
    )


@pytest.fixture(scope="module")
def reference():
    """The local sequential run: cells and the three embeddings."""
    sdata = _slide()
    bt.pp.segment_cells(sdata, tile_size=TILE, seed=0)
    _embed_all(sdata)
    return sdata


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cl:
        yield cl


def _assert_same(sdata, reference):
    xy, area, polys = _cells(sdata)
    xy0, area0, polys0 = _cells(reference)
    assert len(xy0) > 50  # the slide has enough cells for the comparison to mean something
    np.testing.assert_array_equal(xy, xy0)
    np.testing.assert_array_equal(area, area0)
    assert polys == polys0
    for key in ("X_morph", "X_tile", "X_crop"):
        np.testing.assert_allclose(sdata["cells"].obsm[key], reference["cells"].obsm[key], rtol=0, atol=1e-6)


def test_reference_is_local(reference):
    assert reference["cells"].uns["cells"]["execution"] == {"backend": "local"}
    assert reference["cells"].uns["cells"]["skipped_tiles"] == []
    assert reference["cells"].uns["X_morph"]["execution"] == {"backend": "local"}


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_plain_dask_equals_sequential(reference, scheduler):
    sdata = _slide()
    bt.pp.segment_cells(sdata, tile_size=TILE, seed=0, scheduler=scheduler)
    _embed_all(sdata, scheduler=scheduler)
    _assert_same(sdata, reference)
    assert sdata["cells"].uns["cells"]["execution"] == {"backend": "dask", "scheduler": scheduler}


def test_distributed_equals_sequential(reference, cluster):
    from distributed import Client

    with Client(cluster, set_as_default=False) as client:
        sdata = _slide()
        bt.pp.segment_cells(sdata, tile_size=TILE, seed=0, client=client)
        _embed_all(sdata, client=client)
    _assert_same(sdata, reference)
    assert sdata["cells"].uns["cells"]["execution"] == {"backend": "distributed", "n_workers": 2}
    assert sdata["cells"].uns["X_crop"]["execution"]["backend"] == "distributed"


def test_active_client_is_used_by_default(reference, cluster):
    from distributed import Client

    with Client(cluster):  # becomes the default client
        sdata = _slide()
        bt.pp.segment_cells(sdata, tile_size=TILE, seed=0)
    assert sdata["cells"].uns["cells"]["execution"]["backend"] == "distributed"
    np.testing.assert_array_equal(sdata["cells"].obsm["spatial"], reference["cells"].obsm["spatial"])
    # once closed, the local loop is back
    sdata = _slide()
    bt.pp.segment_cells(sdata, tile_size=TILE, seed=0)
    assert sdata["cells"].uns["cells"]["execution"] == {"backend": "local"}


# ------------------------------------------------------------------------------------------ bad input
def test_bad_scheduler_and_options():
    sdata = _slide()
    with pytest.raises(ValueError, match=r"Unknown dask scheduler 'thread'.*'threads'"):
        bt.pp.segment_cells(sdata, scheduler="thread")
    with pytest.raises(ValueError, match="not both"):
        bt.pp.segment_cells(sdata, scheduler="threads", client=object())
    with pytest.raises(ValueError, match="on_error"):
        bt.pp.segment_cells(sdata, on_error="ignore")
    assert "cells" not in sdata.tables
    bt.pp.segment_cells(sdata, tile_size=TILE)
    with pytest.raises(ValueError, match="Unknown dask scheduler"):
        bt.pp.embed_cells(sdata, encoder="morphology", scheduler="gpu")
    assert "X_bitro" not in sdata["cells"].obsm


BAD_BLOCK = (0, 5, 5)  # (channel, row, column) block of 100 px chunks: pixels [500, 600)² of the slide


def _corrupt(image: da.Array) -> da.Array:
    """The image in 100 px chunks whose bottom-right chunk raises when read (a corrupt chunk)."""

    def read(block, block_info=None):
        if tuple(block_info[0]["chunk-location"]) == BAD_BLOCK:
            msg = "corrupt chunk"
            raise OSError(msg)
        return block

    return image.rechunk((image.shape[0], 100, 100)).map_blocks(read, dtype=image.dtype)


@pytest.fixture
def corrupt_slide(monkeypatch):
    """A slide whose image raises when its centre chunk is read (via bitro.io get_image)."""
    import bitro.pp._segment as seg

    real = seg.get_image
    monkeypatch.setattr(seg, "get_image", lambda sdata, key, **kw: _corrupt(real(sdata, key, **kw).data))
    return _slide()


def test_corrupt_chunk_raises_naming_image_and_tile(corrupt_slide):
    # the last tile (core [400, 600)²) is read with overlap: its box is in the message
    match = (
        r"tile 8 \(box \(y0, x0, y1, x1\) = \(3\d\d, 3\d\d, 600, 600\)\) of image 'he'.*corrupt chunk.*'skip'"
    )
    with pytest.raises(RuntimeError, match=match):
        bt.pp.segment_cells(corrupt_slide, tile_size=TILE, method_kwargs={"threshold": THRESHOLD})
    assert "cells" not in corrupt_slide.tables


@pytest.fixture(scope="module")
def clean():
    """The uncorrupted slide segmented with the fixed threshold (module scope: set up before the patch)."""
    sdata = _slide()
    bt.pp.segment_cells(sdata, tile_size=TILE, method_kwargs={"threshold": THRESHOLD})
    return sdata


@pytest.mark.parametrize("scheduler", [None, "threads"])
def test_corrupt_chunk_skip_records_tiles(clean, corrupt_slide, scheduler):
    bt.pp.segment_cells(
        corrupt_slide,
        tile_size=TILE,
        method_kwargs={"threshold": THRESHOLD},
        on_error="skip",
        scheduler=scheduler,
    )
    skipped = corrupt_slide["cells"].uns["cells"]["skipped_tiles"]
    ov = corrupt_slide["cells"].uns["cells"]["overlap_px"]
    assert 0 < ov < 100
    assert skipped == [[400 - ov, 400 - ov, 600, 600]]  # only the last tile's read box reaches [500, 600)²
    kept = clean["cells"].obsm["spatial"]
    owners = [t for t in tile_grid((600, 600), tile_size=TILE, overlap=ov) if list(t.box) not in skipped]
    in_kept = np.zeros(len(kept), dtype=bool)
    for t in owners:
        in_kept |= t.in_core(kept[:, 1], kept[:, 0])
    assert len(kept) > 50 and 0 < (~in_kept).sum() < len(kept) / 4  # the last tile's cells are missing
    np.testing.assert_array_equal(corrupt_slide["cells"].obsm["spatial"], kept[in_kept])


def test_embed_skip_leaves_zero_features_and_records_tiles(clean, monkeypatch):
    import xarray as xr

    import bitro.pp._embed as emb

    sdata = _slide()
    bt.pp.segment_cells(sdata, tile_size=TILE, method_kwargs={"threshold": THRESHOLD})
    real = emb.get_image
    monkeypatch.setattr(
        emb,
        "get_image",
        lambda sd, key, **kw: xr.DataArray(_corrupt(real(sd, key, **kw).data), dims=("c", "y", "x")),
    )
    with pytest.raises(RuntimeError, match="of image 'he'"):
        bt.pp.embed_cells(sdata, encoder="morphology", tile_size=TILE)
    bt.pp.embed_cells(sdata, encoder="morphology", tile_size=TILE, on_error="skip", scheduler="threads")
    skipped = sdata["cells"].uns["X_bitro"]["skipped_tiles"]
    assert len(skipped) >= 1 and all(
        b[2] > 500 and b[3] > 500 for b in skipped
    )  # boxes reaching the bad chunk
    feats = sdata["cells"].obsm["X_bitro"]
    n_masks = feats.shape[1] - 3  # the last columns are neighbour densities (computed without pixels)
    zero = (feats[:, :n_masks] == 0).all(axis=1)
    xy = sdata["cells"].obsm["spatial"]
    assert zero.any() and not zero.all()
    assert (xy[zero] >= 400 - 1).all()  # only cells of the last tile (core [400, 600)²) lost their features


def test_distributed_corrupt_chunk(cluster):
    from distributed import Client

    arr = _corrupt(da.from_array(np.full((3, 600, 600), 128, dtype=np.uint8)))
    tiles = tile_grid((600, 600), tile_size=TILE, overlap=0)
    with Client(cluster, set_as_default=False) as client:
        match = r"tile 8 \(box \(y0, x0, y1, x1\) = \(400, 400, 600, 600\)\) of image 'img'.*corrupt chunk"
        with pytest.raises(RuntimeError, match=match):
            map_tiles(_mean, tiles, arr, client=client, image_name="img")
        res, skipped = map_tiles(_mean, tiles, arr, client=client, on_error="skip")
    assert skipped == [[400, 400, 600, 600]]
    assert res == [128.0] * 8 + [None]


def _mean(rgb, tile):
    return float(rgb.mean())


def test_map_tiles_order_padding_and_function_errors():
    img = np.arange(3 * 50 * 70, dtype=np.uint8).reshape(3, 50, 70)
    tiles = tile_grid((50, 70), tile_size=20, overlap=5)
    local, _ = map_tiles(_sum_and_box, tiles, img)
    threads, _ = map_tiles(_sum_and_box, tiles, da.from_array(img, chunks=(3, 16, 16)), scheduler="threads")
    assert local == threads
    assert [r[1] for r in local] == [t.box for t in tiles]  # tile order
    # several boxes per item; boxes outside the image are white
    res, _ = map_tiles(_shapes, ["a"], img, boxes=[[(0, 0, 10, 10), (-5, -5, 0, 0)]], scheduler="threads")
    assert res == [[(10, 10, 3, 0), (5, 5, 3, 255)]]
    with pytest.raises(ZeroDivisionError) as info:
        map_tiles(_fail_on_tile_2, list(range(4)), img, boxes=[(0, 0, 10, 10)] * 4, image_name="x")
    assert "tile 2" in "".join(info.value.__notes__)
    res, skipped = map_tiles(
        _fail_on_tile_2, list(range(4)), img, boxes=[(0, 0, 10, 10)] * 4, on_error="skip"
    )
    assert res == [0, 1, None, 3] and skipped == [[0, 0, 10, 10]]


def _sum_and_box(rgb, tile):
    return int(rgb.astype(np.int64).sum()), tile.box


def _shapes(pixels, item):
    return [(*p.shape[:2], p.shape[2], int(p.min())) for p in pixels]


def _fail_on_tile_2(rgb, i):
    return i if i != 2 else 1 / 0
