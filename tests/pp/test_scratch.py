"""bt.pp.segment_cells(scratch_dir=...): per-tile results on disk, resume, and bad folders."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

import bitro as bt
from bitro.pp import _scratch, _watershed

PINK = np.array([236, 186, 206], dtype=float)
PURPLE = np.array([92, 52, 138], dtype=float)
TILE = 64  # 3 x 4 = 12 tiles on the 160 x 240 image


def _image(seed=0):
    """160 × 240 px RGB (mpp 0.5): purple discs of radius 6 px on a 30-px grid, many across tile edges."""
    rng = np.random.default_rng(seed)
    h, w = 160, 240
    ys, xs = np.arange(12, h - 8, 30), np.arange(12, w - 8, 30)
    centres = np.array([(x, y) for y in ys for x in xs], dtype=float) + rng.uniform(
        -3, 3, (len(xs) * len(ys), 2)
    )
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.zeros((h, w), dtype=bool)
    for x, y in centres:
        inside |= (xx - x) ** 2 + (yy - y) ** 2 <= 36
    img = np.where(inside[..., None], PURPLE, PINK) + rng.normal(0, 4.0, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _sdata(rgb):
    import spatialdata as sd

    from bitro.io._build import image_element, set_scale

    sdata = sd.SpatialData(images={"he": image_element(rgb, dims=("y", "x", "c"), chunks=128)})
    set_scale(sdata, mpp=0.5)
    return sdata


@pytest.fixture(scope="module")
def rgb():
    return _image()


@pytest.fixture(scope="module")
def reference(rgb):
    """The run without scratch_dir."""
    bt.settings.progress = False
    sdata = _sdata(rgb)
    bt.pp.segment_cells(sdata, tile_size=TILE, seed=0)
    return sdata


@pytest.fixture
def counter(monkeypatch):
    """Counts the tiles segmented (calls of the per-tile watershed) in this process."""
    calls = []
    original = _watershed.segment_tile

    def counting(rgb, *args, **kwargs):
        calls.append(rgb.shape)
        return original(rgb, *args, **kwargs)

    monkeypatch.setattr(_watershed, "segment_tile", counting)
    return calls


def _run(rgb, scratch, **kwargs):
    sdata = _sdata(rgb)
    bt.pp.segment_cells(sdata, tile_size=TILE, seed=0, scratch_dir=scratch, **kwargs)
    return sdata


def _assert_same(a, b):
    ta, tb = a.tables["cells"], b.tables["cells"]
    assert ta.n_obs == tb.n_obs > 10
    np.testing.assert_array_equal(ta.obsm["spatial"], tb.obsm["spatial"])
    assert list(ta.obs_names) == list(tb.obs_names)
    for col in ta.obs.columns:
        assert ta.obs[col].dtype == tb.obs[col].dtype, col
        np.testing.assert_array_equal(ta.obs[col].to_numpy(), tb.obs[col].to_numpy(), err_msg=col)
    pa, pb = a.shapes["cells_shapes"].geometry, b.shapes["cells_shapes"].geometry
    assert [g.wkb for g in pa] == [g.wkb for g in pb]
    assert list(a.shapes["cells_shapes"].index) == list(b.shapes["cells_shapes"].index)


def _tiles(scratch):
    return sorted(p.name for p in scratch.glob("tile_*.parquet"))


def test_scratch_equals_memory_and_files(rgb, reference, tmp_path, counter):
    scratch = tmp_path / "scratch"
    out = _run(rgb, scratch, keep_scratch=True)
    _assert_same(out, reference)
    assert len(counter) == 12
    assert len(_tiles(scratch)) == 12  # one file per tile, also for tiles without a kept nucleus
    assert "tile_64_128.parquet" in _tiles(scratch)
    assert not list(scratch.glob("*.tmp"))
    manifest = json.loads((scratch / "manifest.json").read_text())
    assert (
        manifest["tile_size"] == TILE and manifest["image_key"] == "he" and manifest["method"] == "watershed"
    )
    import geopandas as gpd

    part = gpd.read_parquet(scratch / "tile_64_64.parquet")
    assert {"geometry", "x", "y", "area_um2", "mean_hematoxylin"} <= set(part.columns)
    # the tile's nuclei have their centroids in its core
    assert len(part) > 0 and part["x"].between(63.5, 127.5).all() and part["y"].between(63.5, 127.5).all()


def test_resume_recomputes_only_missing_tile(rgb, reference, tmp_path, counter):
    scratch = tmp_path / "scratch"
    _run(rgb, scratch, keep_scratch=True)
    assert len(counter) == 12
    (scratch / "tile_64_128.parquet").unlink()
    counter.clear()
    again = _run(rgb, scratch, keep_scratch=True)
    assert len(counter) == 1
    _assert_same(again, reference)
    counter.clear()
    _assert_same(_run(rgb, scratch), reference)  # everything done: assembled only, then removed
    assert counter == []
    assert not scratch.exists()


def test_default_removes_only_its_files(rgb, reference, tmp_path):
    scratch = tmp_path / "scratch"
    _assert_same(_run(rgb, scratch), reference)
    assert not scratch.exists()  # keep_scratch=False by default, as in embed_cells
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("user data")
    _run(rgb, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]  # the user's file is never removed


def test_mismatched_parameters_raise(rgb, tmp_path, counter):
    scratch = tmp_path / "scratch"
    _run(rgb, scratch, keep_scratch=True)
    counter.clear()
    with pytest.raises(ValueError, match=r"different parameters.*threshold.*another scratch_dir"):
        _run(rgb, scratch, method_kwargs={"threshold": 0.05})
    with pytest.raises(ValueError, match=r"tile_size"):
        bt.pp.segment_cells(_sdata(rgb), tile_size=2 * TILE, seed=0, scratch_dir=scratch)
    assert counter == []
    (scratch / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        _run(rgb, scratch)


def test_bad_folder_raises_before_work(rgb, tmp_path, counter, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    sdata = _sdata(rgb)
    with pytest.raises(NotADirectoryError, match=r"file\.txt.*is a file"):
        bt.pp.segment_cells(sdata, tile_size=TILE, scratch_dir=a_file)

    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(_scratch, "_write_bytes", denied)
    locked = tmp_path / "locked"
    with pytest.raises(PermissionError, match=r"Cannot write to scratch_dir .*locked.*permissions"):
        bt.pp.segment_cells(sdata, tile_size=TILE, scratch_dir=locked)
    assert counter == []
    assert "cells" not in sdata.tables
    assert not list(locked.glob("*"))


def test_disk_full_then_resume(rgb, reference, tmp_path, counter, monkeypatch):
    scratch = tmp_path / "scratch"
    real = _scratch._write_parquet
    writes = []

    def fills_up(frame, path):
        writes.append(path)
        if len(writes) <= 3:
            return real(frame, path)
        path.write_bytes(b"PAR1 half a file")  # the disk fills mid-write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_scratch, "_write_parquet", fills_up)
    sdata = _sdata(rgb)
    with pytest.raises(OSError, match=r"disk is full.*rerun the same call.*3 tile\(s\)") as info:
        bt.pp.segment_cells(sdata, tile_size=TILE, seed=0, scratch_dir=scratch)
    assert info.value.errno == errno.ENOSPC
    assert str(scratch) in str(info.value)
    assert len(_tiles(scratch)) == 3
    assert not list(scratch.glob("*.tmp"))
    assert "cells" not in sdata.tables

    monkeypatch.setattr(_scratch, "_write_parquet", real)  # space freed
    counter.clear()
    _assert_same(_run(rgb, scratch), reference)
    assert len(counter) == 9
    assert not scratch.exists()


def test_plain_dask_and_distributed_write_scratch(rgb, reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    _assert_same(_run(rgb, tmp_path / "threads", scheduler="threads", keep_scratch=True), reference)
    assert len(_tiles(tmp_path / "threads")) == 12
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cl,
        distributed.Client(cl) as client,
    ):
        out = _run(rgb, tmp_path / "cluster", client=client, keep_scratch=True)
    assert out.tables["cells"].uns["cells"]["execution"]["backend"] == "distributed"
    _assert_same(out, reference)
    assert len(_tiles(tmp_path / "cluster")) == 12
