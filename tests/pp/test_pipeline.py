"""``bt.pp.run_pipeline``: cohort runs that resume after a crash, in process and on dask.distributed."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import bitro as bt

FAST = {"encoder": "morphology", "stain_method": "macenko"}
NAMES = ("s0", "s1", "s2")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Three small synthetic Visium-like slides saved as zarr stores."""
    root = tmp_path_factory.mktemp("slides")
    paths = {}
    for name, sdata in zip(NAMES, bt.datasets.synthetic_tissue(3, size=500, technology="visium", seed=0)):
        paths[name] = root / f"{name}.zarr"
        sdata.write(paths[name])
    return paths


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """An uninterrupted sequential run of the three slides."""
    out = tmp_path_factory.mktemp("reference") / "out"
    report = bt.pp.run_pipeline(list(slides.values()), out=out, client=False, **FAST)
    return out, report


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["slides"]


def _same_cells(a: Path, b: Path) -> None:
    ca, cb = sd.read_zarr(a).tables["cells"], sd.read_zarr(b).tables["cells"]
    assert ca.n_obs == cb.n_obs > 0
    pd.testing.assert_frame_equal(ca.obs, cb.obs)
    np.testing.assert_allclose(ca.obsm["X_bitro"], cb.obsm["X_bitro"])
    np.testing.assert_allclose(ca.obsm["spatial"], cb.obsm["spatial"])


def test_run_pipeline_writes_every_slide_and_records_it(reference):
    out, report = reference
    assert list(report.columns) == ["name", "status", "seconds", "n_cells", "error"]
    assert list(report["name"]) == list(NAMES) and (report["status"] == "done").all()
    assert report["error"].isna().all() and (report["seconds"] > 0).all()
    manifest = _manifest(out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "s0.zarr", "s1.zarr", "s2.zarr"]
    for row in report.itertuples():
        sdata = sd.read_zarr(out / f"{row.name}.zarr")
        cells = sdata.tables["cells"]
        assert row.n_cells == cells.n_obs == manifest[row.name]["n_cells"] > 0
        assert manifest[row.name]["status"] == "done" and manifest[row.name]["error"] is None
        assert {"he", "he_normalized"} <= set(sdata.images) and "tissue" in sdata.labels
        assert cells.obsm["X_bitro"].shape[0] == cells.n_obs
        assert cells.obs["spot_id"].notna().sum() > 0  # assign_cells ran: the slides have spots


def test_second_run_skips_finished_slides(reference, slides):
    out, first = reference
    stamps = {n: (out / f"{n}.zarr" / "zarr.json").stat().st_mtime_ns for n in NAMES}
    report = bt.pp.run_pipeline(list(slides.values()), out=out, client=False, **FAST)
    assert (report["status"] == "skipped").all()
    assert list(report["n_cells"]) == list(first["n_cells"])  # taken from the manifest
    assert stamps == {n: (out / f"{n}.zarr" / "zarr.json").stat().st_mtime_ns for n in NAMES}


def test_a_failing_slide_is_recorded_and_the_others_finish(slides, tmp_path):
    bad = tmp_path / "broken.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("corrupt")
    out = tmp_path / "out"
    steps = ["detect_tissue", "segment_cells", "embed_cells"]
    report = bt.pp.run_pipeline([slides["s0"], bad], out=out, steps=steps, client=False, **FAST)
    status = dict(zip(report["name"], report["status"]))
    assert status == {"s0": "done", "broken": "failed"}
    error = report.set_index("name").loc["broken", "error"]
    assert "broken" in error and "not a readable SpatialData zarr store" in error
    manifest = _manifest(out)
    assert manifest["broken"]["status"] == "failed" and manifest["broken"]["error"] == error
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "s0.zarr"]  # nothing half-written


def test_retries_and_in_memory_inputs_are_left_unchanged(tmp_path):
    sdata = bt.datasets.synthetic_tissue(1, size=400, technology="visium", seed=1)
    calls = []

    def flaky(s):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("transient trouble")

    steps = ["detect_tissue", flaky]
    report = bt.pp.run_pipeline({"a": sdata}, out=tmp_path / "o1", steps=steps, retries=1, client=False)
    assert report.loc[0, "status"] == "done" and len(calls) == 2
    assert "tissue" in sd.read_zarr(tmp_path / "o1" / "a.zarr").labels
    assert "tissue" not in sdata.labels  # the caller's object is not modified

    calls.clear()
    report = bt.pp.run_pipeline({"a": sdata}, out=tmp_path / "o2", steps=steps, retries=0, client=False)
    assert report.loc[0, "status"] == "failed" and report.loc[0, "error"] == "transient trouble"
    assert not (tmp_path / "o2" / "a.zarr").exists()


def test_rerun_after_a_kill_removes_the_partial_and_redoes_the_slide(reference, slides, tmp_path):
    ref, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    # what a kill during the write of s1 leaves behind
    shutil.rmtree(out / "s1.zarr")
    partial = out / ".s1.zarr.partial-4242"
    partial.mkdir()
    (partial / "zarr.json").write_text("{}")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["slides"]["s1"] = {"status": "running", "error": None}
    (out / "manifest.json").write_text(json.dumps(manifest))
    # the user's own files in out are not touched
    (out / ".keep").write_text("mine")
    (out / "notes").mkdir()

    report = bt.pp.run_pipeline(list(slides.values()), out=out, client=False, **FAST)
    assert dict(zip(report["name"], report["status"])) == {"s0": "skipped", "s1": "done", "s2": "skipped"}
    assert not partial.exists() and (out / ".keep").read_text() == "mine" and (out / "notes").is_dir()
    assert _manifest(out)["s1"]["status"] == "done"
    _same_cells(out / "s1.zarr", ref / "s1.zarr")


def test_an_existing_folder_not_written_by_the_pipeline_is_not_touched(slides, tmp_path):
    out = tmp_path / "out"
    (out / "s0.zarr").mkdir(parents=True)
    (out / "s0.zarr" / "mine.txt").write_text("precious")
    report = bt.pp.run_pipeline([slides["s0"]], out=out, steps=["detect_tissue"], client=False)
    assert report.loc[0, "status"] == "skipped"
    assert sorted(p.name for p in (out / "s0.zarr").iterdir()) == ["mine.txt"]
    assert (out / "s0.zarr" / "mine.txt").read_text() == "precious"
    assert not (out / "manifest.json").exists() or "s0" not in _manifest(out)

    # overwrite=True replaces bitro's stores only: a folder of the user's files is refused before any work
    with pytest.raises(FileExistsError, match="not a SpatialData zarr store written by bitro"):
        bt.pp.run_pipeline([slides["s0"]], out=out, steps=["detect_tissue"], client=False, overwrite=True)
    assert (out / "s0.zarr" / "mine.txt").read_text() == "precious"


def test_a_second_run_into_the_same_folder_is_refused(slides, tmp_path, monkeypatch):
    from bitro.pp import _manifest

    out = tmp_path / "out"
    seen = []

    def nested(sdata):  # runs while the first run holds the lock, like a second process would
        with pytest.raises(FileExistsError, match="Another bitro cohort run") as info:
            bt.pp.run_pipeline([slides["s1"]], out=out, steps=["detect_tissue"], client=False)
        seen.append(str(info.value))

    report = bt.pp.run_pipeline([slides["s0"]], out=out, steps=["detect_tissue", nested], client=False)
    assert report.loc[0, "status"] == "done" and len(seen) == 1 and f"pid {os.getpid()}" in seen[0]
    assert not (out / "s1.zarr").exists() and not (out / _manifest.LOCK).exists()  # released

    # a lock left by a killed process on this host is taken over
    (out / _manifest.LOCK).write_text(
        json.dumps({"pid": 2**22 + 12345, "host": _manifest.socket.gethostname()})
    )
    monkeypatch.setattr(_manifest.os, "kill", lambda pid, sig: (_ for _ in ()).throw(ProcessLookupError()))
    report = bt.pp.run_pipeline([slides["s1"]], out=out, steps=["detect_tissue"], client=False)
    assert report.loc[0, "status"] == "done" and not (out / _manifest.LOCK).exists()
    # a live one (another host: cannot be checked) is respected
    (out / _manifest.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "today"}))
    with pytest.raises(FileExistsError, match="pid 1 on elsewhere"):
        bt.pp.run_pipeline([slides["s2"]], out=out, steps=["detect_tissue"], client=False)
    assert not (out / "s2.zarr").exists()


def test_a_rerun_with_other_parameters_refuses_stale_slides(slides, tmp_path):
    out = tmp_path / "out"
    steps = ["normalize_stains", "detect_tissue"]
    bt.pp.run_pipeline([slides["s0"]], out=out, steps=steps, stain_method="macenko", client=False)
    params = _manifest(out)["s0"]["params"]
    assert params["stain_method"] == "macenko" and params["steps"] == steps
    stamp = (out / "s0.zarr" / "zarr.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"other parameters: s0 \(stain_method: 'macenko' → 'reinhard'\)"):
        bt.pp.run_pipeline([slides["s0"]], out=out, steps=steps, stain_method="reinhard", client=False)
    assert (out / "s0.zarr" / "zarr.json").stat().st_mtime_ns == stamp
    # the same parameters still skip
    report = bt.pp.run_pipeline([slides["s0"]], out=out, steps=steps, stain_method="macenko", client=False)
    assert report.loc[0, "status"] == "skipped"
    # overwrite=True redoes them with the new parameters and records those
    report = bt.pp.run_pipeline(
        [slides["s0"]], out=out, steps=steps, stain_method="reinhard", client=False, overwrite=True
    )
    assert report.loc[0, "status"] == "done" and _manifest(out)["s0"]["params"]["stain_method"] == "reinhard"


def test_scratch_dir_resumes_a_slide_mid_way_with_the_same_outputs(reference, slides, tmp_path, monkeypatch):
    from bitro.pp import _embed_tasks, _watershed

    ref, _ = reference
    scratch = tmp_path / "scratch"
    out = tmp_path / "out"

    def killed(sdata):
        raise RuntimeError("killed after embedding")

    steps = [*bt.pp._pipeline.STEPS[:4], killed]  # normalize, tissue, segment, embed, then the failure
    report = bt.pp.run_pipeline([slides["s0"]], out=out, steps=steps, retries=0, scratch_dir=scratch, **FAST)
    assert report.loc[0, "status"] == "failed"
    for sub in ("segment", "embed"):  # the finished tiles are kept for the rerun
        assert (scratch / "s0" / sub / "manifest.json").is_file()
    assert len(list((scratch / "s0" / "segment").glob("tile_*.parquet"))) > 0
    assert len(list((scratch / "s0" / "embed").glob("tile_*.npz"))) > 0

    calls = []
    segment_tile, features = _watershed.segment_tile, _embed_tasks.morphology_features
    monkeypatch.setattr(
        _watershed, "segment_tile", lambda *a, **k: calls.append("segment") or segment_tile(*a, **k)
    )
    monkeypatch.setattr(_embed_tasks, "morphology_features", lambda *a: calls.append("embed") or features(*a))
    report = bt.pp.run_pipeline([slides["s0"]], out=out, scratch_dir=scratch, **FAST)
    assert report.loc[0, "status"] == "done"
    assert calls == []  # segmentation and embedding were read back, not recomputed
    _same_cells(out / "s0.zarr", ref / "s0.zarr")
    np.testing.assert_array_equal(
        sd.read_zarr(out / "s0.zarr").tables["cells"].obsm["X_bitro"],
        sd.read_zarr(ref / "s0.zarr").tables["cells"].obsm["X_bitro"],
    )
    assert list(scratch.iterdir()) == []  # the slide's tile files are removed once it is written

    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        bt.pp.run_pipeline([slides["s0"]], out=tmp_path / "o", scratch_dir=tmp_path / "a_file")


def test_run_pipeline_errors(slides, tmp_path):
    with pytest.raises(ValueError, match="unknown step 'segment'"):
        bt.pp.run_pipeline([slides["s0"]], out=tmp_path / "o", steps=["segment"])
    with pytest.raises(ValueError, match="retries must be"):
        bt.pp.run_pipeline([slides["s0"]], out=tmp_path / "o", retries=-1)
    with pytest.raises(TypeError, match="without a name"):
        bt.pp.run_pipeline([sd.read_zarr(slides["s0"])], out=tmp_path / "o")
    with pytest.raises(ValueError, match="distinct names"):
        bt.pp.run_pipeline([slides["s0"], tmp_path / "s0.zarr"], out=tmp_path / "o")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"out '.*file' is a file, not a folder\. Pass the path"):
        bt.pp.run_pipeline([slides["s0"]], out=tmp_path / "file")
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / "o" / "manifest.json").write_text("not json")
    with pytest.raises(ValueError, match="not a bitro pipeline manifest"):
        bt.pp.run_pipeline([slides["s0"]], out=tmp_path / "o")


def test_unwritable_out_fails_before_any_slide(slides, tmp_path, monkeypatch):
    from bitro.pp import _scratch

    ran = []
    steps = [lambda sdata: ran.append(1)]
    locked = tmp_path / "locked"
    locked.mkdir()

    def denied(path, data):  # tests may run as root, where chmod does not deny
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(_scratch, "_write_bytes", denied)
    with pytest.raises(PermissionError, match=r"Cannot write to out '.*locked'.*fix its permissions") as info:
        bt.pp.run_pipeline([slides["s0"]], out=locked, steps=steps, client=False)
    assert info.value.errno == errno.EACCES
    assert ran == [] and list(locked.iterdir()) == []  # no slide ran, no manifest


def test_disk_full_while_writing_a_slide_leaves_nothing_and_rerun_completes(slides, tmp_path, monkeypatch):
    from zarr.storage import _local

    real = _local._put
    writes = []

    def fills_up(path, value, exclusive=False):
        writes.append(path)
        if len(writes) <= 3:
            return real(path, value, exclusive)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a chunk")  # the disk fills mid-store
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_local, "_put", fills_up)
    out = tmp_path / "out"
    report = bt.pp.run_pipeline([slides["s0"], slides["s1"]], out=out, steps=["detect_tissue"], client=False)
    assert len(writes) > 3  # the store was being written when the disk filled
    assert list(report["status"]) == ["failed", "failed"]
    error = report.loc[0, "error"]
    assert "s0" in error and "the disk is full" in error and "Free space" in error and "rerun" in error
    manifest = _manifest(out)
    assert manifest["s0"]["status"] == "failed" and manifest["s0"]["error"] == error
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no partial store, no temp folder

    monkeypatch.setattr(_local, "_put", real)  # space freed
    report = bt.pp.run_pipeline([slides["s0"], slides["s1"]], out=out, steps=["detect_tissue"], client=False)
    assert list(report["status"]) == ["done", "done"]
    assert {m["status"] for m in _manifest(out).values()} == {"done"}
    assert "tissue" in sd.read_zarr(out / "s0.zarr").labels
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "s0.zarr", "s1.zarr"]


# ------------------------------------------------------------------------------- dask.distributed
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.mark.slow
def test_distributed_run_gives_the_sequential_outputs(client, reference, slides, tmp_path):
    ref, _ = reference
    out = tmp_path / "out"
    report = bt.pp.run_pipeline(list(slides.values()), out=out, client=client, **FAST)
    assert (report["status"] == "done").all() and list(report["name"]) == list(NAMES)
    for name in NAMES:
        _same_cells(out / f"{name}.zarr", ref / f"{name}.zarr")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "s0.zarr", "s1.zarr", "s2.zarr"]


@pytest.mark.slow
def test_a_worker_killed_mid_slide_is_retried(client, slides, tmp_path):
    marker = tmp_path / "killed"

    def die_once(sdata):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)  # the worker process dies without cleanup, as if killed

    out = tmp_path / "out"
    steps = ["detect_tissue", die_once]
    report = bt.pp.run_pipeline([slides["s0"], slides["s1"]], out=out, steps=steps, client=client, retries=1)
    assert marker.exists()  # a worker did die
    assert (report["status"] == "done").all()
    assert all("tissue" in sd.read_zarr(out / f"{n}.zarr").labels for n in ("s0", "s1"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "s0.zarr", "s1.zarr"]


@pytest.mark.slow
def test_one_busy_worker_does_not_deadlock(slides, reference, tmp_path):
    """A slide task must not submit its tiles to its own cluster and wait: with one worker thread that
    would wait forever. The run is given a deadline so a regression fails instead of hanging."""
    from concurrent.futures import ThreadPoolExecutor

    distributed = pytest.importorskip("distributed")
    ref, _ = reference
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        future = pool.submit(
            bt.pp.run_pipeline, [slides["s0"], slides["s1"]], out=tmp_path / "out", client=client, **FAST
        )
        report = future.result(timeout=300)
    assert (report["status"] == "done").all()
    _same_cells(tmp_path / "out" / "s0.zarr", ref / "s0.zarr")


def test_outputs_carry_an_integrity_record_that_reading_checks(reference, tmp_path):
    """A chunk of ``cells.obsm["X_bitro"]`` deleted after the run is an error, not zeros."""
    out, _ = reference
    store = tmp_path / "s0.zarr"
    shutil.copytree(out / "s0.zarr", store)
    assert (store / "bitro_integrity.json").is_file()
    assert bt.io.read_zarr(store)["cells"].obsm["X_bitro"].any()
    chunk = next(
        p
        for p in sorted((store / "tables/cells/obsm/X_bitro").rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    )
    chunk.unlink()
    with pytest.raises(ValueError, match=r"of array 'tables/cells/obsm/X_bitro' is missing"):
        bt.io.read_zarr(store)
    # a cohort run that reads the damaged store as its input refuses it too
    report = bt.pp.run_pipeline([store], out=tmp_path / "again", steps=[lambda sdata: None], client=False)
    assert report["status"].tolist() == ["failed"] and "X_bitro" in report["error"][0]
