"""bt.pp.embed_cells(scratch_dir=...): per-tile features on disk, resume, and bad folders."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch

import bitro as bt
from bitro.pp import _embed_tasks, _scratch

TILE = 128  # the 400 x 400 px slide has 4 x 4 = 16 tile cores


class _CountingPool(torch.nn.Module):
    """A 4-px average pool (stride 4 feature map) that counts its forward passes (= tiles in tile mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.nn.functional.avg_pool2d(x, 4)


def _mean_rgb(crops: np.ndarray) -> np.ndarray:
    return crops.reshape(len(crops), -1, 3).mean(1)


@pytest.fixture(scope="module")
def segmented():
    """A small synthetic slide with its nuclei segmented (cells table + shapes)."""
    sdata = bt.datasets.synthetic_tissue(1, size=400, technology="visium", seed=0)
    bt.pp.segment_cells(sdata, tile_size=200, seed=0)
    assert sdata.tables["cells"].n_obs > 50
    return sdata


def _copy(sdata):
    """The slide with a fresh copy of its cells table (each test writes its own obsm)."""
    from bitro.pp._pipeline import _fresh

    return _fresh(sdata)


# every way of embedding: tile mode (torch module), crop mode (a plain function), morphology
CASES = {
    "tile": {"mode": "tile", "crop_um": 4.0},
    "crop": {"encoder": _mean_rgb, "mode": "crop", "batch_size": 16},
    "morphology": {"encoder": "morphology"},
}


def _kwargs(case):
    kw = {"tile_size": TILE, "device": "cpu", "seed": 0, **CASES[case]}
    if case == "tile":
        kw["encoder"] = _CountingPool()
    return kw


def _files(folder):
    return sorted(folder.glob("tile_*.npz"))


@pytest.mark.parametrize("case", list(CASES))
def test_scratch_gives_the_in_memory_features(segmented, tmp_path, case):
    ref = _copy(segmented)
    bt.pp.embed_cells(ref, **_kwargs(case))
    out = _copy(segmented)
    scratch = tmp_path / "embed"
    bt.pp.embed_cells(out, scratch_dir=scratch, keep_scratch=True, **_kwargs(case))
    a, b = ref.tables["cells"].obsm["X_bitro"], out.tables["cells"].obsm["X_bitro"]
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape and a.shape[0] == out.tables["cells"].n_obs
    assert np.abs(a).sum() > 0
    np.testing.assert_array_equal(a, b)
    files = _files(scratch)
    assert len(files) >= 2 and not list(scratch.glob("*.tmp"))
    # the tile files hold every cell exactly once, with the final feature rows
    with np.load(files[0]) as part:
        idx, feats = part["idx"], part["features"]
    assert feats.dtype == np.float32 and len(idx) == len(feats) > 0
    if case != "morphology":  # morphology's density columns are added after the tiles
        np.testing.assert_array_equal(b[idx], feats)
    seen = np.concatenate([np.load(f)["idx"] for f in files])
    assert sorted(seen) == list(range(len(b)))
    manifest = json.loads((scratch / "manifest.json").read_text())
    assert manifest["step"] == "embed_cells" and manifest["tile_size"] == TILE
    assert manifest["n_cells"] == len(b) and manifest["mode"] == {"morphology": "mask"}.get(case, case)
    assert manifest["image_key"] == "he" and len(manifest["centroids_sha256"]) == 64


def test_keep_scratch_false_removes_only_its_files(segmented, tmp_path):
    scratch = tmp_path / "embed"
    bt.pp.embed_cells(_copy(segmented), scratch_dir=scratch, **_kwargs("morphology"))
    assert not scratch.exists()  # the default deletes the files and the folder it created
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    bt.pp.embed_cells(_copy(segmented), scratch_dir=mine, **_kwargs("morphology"))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_resume_computes_only_the_missing_tiles(segmented, tmp_path):
    ref = _copy(segmented)
    bt.pp.embed_cells(ref, **_kwargs("tile"))
    scratch = tmp_path / "embed"
    kw = _kwargs("tile")
    encoder = kw["encoder"]
    bt.pp.embed_cells(_copy(segmented), scratch_dir=scratch, keep_scratch=True, **kw)
    files = _files(scratch)
    assert encoder.calls == len(files) >= 4
    for f in files[::2]:  # a run killed half-way
        f.unlink()
    encoder.calls = 0
    again = _copy(segmented)
    bt.pp.embed_cells(again, scratch_dir=scratch, keep_scratch=True, **kw)
    assert encoder.calls == len(files[::2])
    np.testing.assert_array_equal(again.tables["cells"].obsm["X_bitro"], ref.tables["cells"].obsm["X_bitro"])
    encoder.calls = 0
    last = _copy(segmented)
    bt.pp.embed_cells(last, scratch_dir=scratch, **kw)  # all done: assembled only, then removed
    assert encoder.calls == 0 and not scratch.exists()
    np.testing.assert_array_equal(last.tables["cells"].obsm["X_bitro"], ref.tables["cells"].obsm["X_bitro"])


def test_resume_after_a_crash_in_a_tile(segmented, tmp_path, monkeypatch):
    """A tile that raises stops the run; the tiles written before it are reused by the rerun."""
    ref = _copy(segmented)
    bt.pp.embed_cells(ref, **_kwargs("morphology"))
    real = _embed_tasks.morphology_features
    calls = []

    def crashes_on_the_fourth(tile, item, enc):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real(tile, item, enc)

    monkeypatch.setattr(_embed_tasks, "morphology_features", crashes_on_the_fourth)
    scratch = tmp_path / "embed"
    crashed = _copy(segmented)
    with pytest.raises(RuntimeError, match="killed"):
        bt.pp.embed_cells(crashed, scratch_dir=scratch, **_kwargs("morphology"))
    assert "X_bitro" not in crashed.tables["cells"].obsm and len(_files(scratch)) == 3
    counted = []
    monkeypatch.setattr(_embed_tasks, "morphology_features", lambda *a: counted.append(1) or real(*a))
    out = _copy(segmented)
    bt.pp.embed_cells(out, scratch_dir=scratch, keep_scratch=True, **_kwargs("morphology"))
    assert len(counted) == len(_files(scratch)) - 3 > 0  # only the tiles not written before the crash
    np.testing.assert_array_equal(out.tables["cells"].obsm["X_bitro"], ref.tables["cells"].obsm["X_bitro"])


def test_different_parameters_raise_before_any_tile(segmented, tmp_path):
    scratch = tmp_path / "embed"
    kw = _kwargs("tile")
    encoder = kw["encoder"]
    bt.pp.embed_cells(_copy(segmented), scratch_dir=scratch, keep_scratch=True, **kw)
    encoder.calls = 0
    sdata = _copy(segmented)
    with pytest.raises(ValueError, match=r"different parameters.*tile_size.*another scratch_dir"):
        bt.pp.embed_cells(sdata, scratch_dir=scratch, **(kw | {"tile_size": 2 * TILE}))
    with pytest.raises(ValueError, match=r"different parameters.*crop_um"):
        bt.pp.embed_cells(sdata, scratch_dir=scratch, **(kw | {"crop_um": 8.0}))
    other = _CountingPool()
    other.register_buffer("offset", torch.ones(1))  # other weights under the same name
    with pytest.raises(ValueError, match=r"different parameters.*weights_sha256"):
        bt.pp.embed_cells(sdata, scratch_dir=scratch, **(kw | {"encoder": other}))
    with pytest.raises(ValueError, match=r"different parameters.*mode"):
        bt.pp.embed_cells(sdata, scratch_dir=scratch, **_kwargs("morphology"))
    assert encoder.calls == 0 and other.calls == 0 and "X_bitro" not in sdata.tables["cells"].obsm
    (scratch / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        bt.pp.embed_cells(sdata, scratch_dir=scratch, **kw)


def test_a_segmentation_folder_is_refused(segmented, tmp_path):
    scratch = tmp_path / "segment"
    bt.pp.segment_cells(
        _copy(segmented), tile_size=200, seed=0, overwrite=True, scratch_dir=scratch, keep_scratch=True
    )
    with pytest.raises(ValueError, match=r"holds the tiles of segment_cells, not of embed_cells"):
        bt.pp.embed_cells(_copy(segmented), scratch_dir=scratch, **_kwargs("morphology"))


def test_bad_folders_raise_before_work(segmented, tmp_path, monkeypatch):
    kw = _kwargs("tile")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    sdata = _copy(segmented)
    with pytest.raises(NotADirectoryError, match=r"file\.txt.*is a file"):
        bt.pp.embed_cells(sdata, scratch_dir=a_file, **kw)

    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(_scratch, "_write_bytes", denied)
    locked = tmp_path / "locked"
    with pytest.raises(PermissionError, match=r"Cannot write to scratch_dir .*locked.*permissions"):
        bt.pp.embed_cells(sdata, scratch_dir=locked, **kw)
    assert kw["encoder"].calls == 0 and "X_bitro" not in sdata.tables["cells"].obsm


def test_disk_full_names_the_fix(segmented, tmp_path, monkeypatch):
    real = _scratch._write_features
    writes = []

    def fills_up(path, idx, features):
        writes.append(path)
        if len(writes) <= 2:
            return real(path, idx, features)
        path.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_scratch, "_write_features", fills_up)
    scratch = tmp_path / "embed"
    with pytest.raises(OSError, match=r"disk is full.*rerun the same call.*2 tile\(s\)"):
        bt.pp.embed_cells(_copy(segmented), scratch_dir=scratch, **_kwargs("morphology"))
    assert len(_files(scratch)) == 2 and not list(scratch.glob("*.tmp"))


def test_skipped_tiles_are_retried_by_the_rerun(segmented, tmp_path, monkeypatch):
    ref = _copy(segmented)
    bt.pp.embed_cells(ref, **_kwargs("morphology"))
    real = _embed_tasks.morphology_features
    calls = []

    def second_fails(tile, item, enc):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("bad tile")
        return real(tile, item, enc)

    monkeypatch.setattr(_embed_tasks, "morphology_features", second_fails)
    scratch = tmp_path / "embed"
    first = _copy(segmented)
    bt.pp.embed_cells(first, scratch_dir=scratch, keep_scratch=True, on_error="skip", **_kwargs("morphology"))
    assert len(first.tables["cells"].uns["X_bitro"]["skipped_tiles"]) == 1
    n_tasks = len(calls)
    assert len(_files(scratch)) == n_tasks - 1
    calls.clear()
    out = _copy(segmented)
    bt.pp.embed_cells(out, scratch_dir=scratch, on_error="skip", **_kwargs("morphology"))
    assert len(calls) == 1 and out.tables["cells"].uns["X_bitro"]["skipped_tiles"] == []
    np.testing.assert_array_equal(out.tables["cells"].obsm["X_bitro"], ref.tables["cells"].obsm["X_bitro"])


def test_plain_dask_writes_the_same_scratch(segmented, tmp_path):
    ref = _copy(segmented)
    bt.pp.embed_cells(ref, **_kwargs("morphology"))
    out = _copy(segmented)
    scratch = tmp_path / "threads"
    bt.pp.embed_cells(
        out, scratch_dir=scratch, keep_scratch=True, scheduler="threads", **_kwargs("morphology")
    )
    assert out.tables["cells"].uns["X_bitro"]["execution"]["backend"] == "dask" and len(_files(scratch)) >= 4
    np.testing.assert_array_equal(out.tables["cells"].obsm["X_bitro"], ref.tables["cells"].obsm["X_bitro"])


def test_skipped_first_tile_same_with_and_without_scratch(segmented, tmp_path, monkeypatch):
    """The output is allocated at the first result that arrives; a skipped first tile keeps zeros."""
    real = _embed_tasks.tile_features
    calls = []

    def first_fails(tile, item, enc):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bad tile")
        return real(tile, item, enc)

    monkeypatch.setattr(_embed_tasks, "tile_features", first_fails)
    plain = _copy(segmented)
    bt.pp.embed_cells(plain, on_error="skip", **_kwargs("tile"))
    calls.clear()
    scratched = _copy(segmented)
    bt.pp.embed_cells(scratched, scratch_dir=tmp_path / "embed", on_error="skip", **_kwargs("tile"))
    a, b = plain.tables["cells"].obsm["X_bitro"], scratched.tables["cells"].obsm["X_bitro"]
    assert a.dtype == np.float32 and a.shape == (
        plain.tables["cells"].n_obs,
        6,
    )  # RGB of nucleus + neighbourhood
    np.testing.assert_array_equal(a, b)
    zero = (a == 0).all(axis=1)
    assert 0 < zero.sum() < len(a)  # the first tile's cells only
    assert len(plain.tables["cells"].uns["X_bitro"]["skipped_tiles"]) == 1
