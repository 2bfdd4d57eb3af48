"""``bitro._files.check_replaceable``: overwrite replaces bitro's own outputs and nothing else."""

from __future__ import annotations

import json

import pytest

from bitro._files import check_replaceable


def _model_folder(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"format": "bitro-model/1"}))
    (path / "model.safetensors").write_bytes(b"\0")
    return path


def test_absent_paths_are_always_writable(tmp_path):
    for kind in ("model", "zarr", "csv"):
        assert check_replaceable(tmp_path / "new", kind=kind, overwrite=False) == tmp_path / "new"


def test_existing_output_needs_overwrite(tmp_path):
    model = _model_folder(tmp_path / "m")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        check_replaceable(model, kind="model", overwrite=False)
    assert check_replaceable(model, kind="model", overwrite=True) == model


@pytest.mark.parametrize(
    ("setup", "kind", "reason"),
    [
        (lambda p: (p.mkdir(), (p / "mine.txt").write_text("x")), "model", "holds files"),
        (
            lambda p: (p.mkdir(), (p / "config.json").write_text('{"format": "other"}')),
            "model",
            "not a bitro model",
        ),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("[1]")), "model", "not a bitro model"),
        (lambda p: p.write_text("x"), "model", "is a file, not a folder"),
        (lambda p: (p.mkdir(), (p / "notes.md").write_text("x")), "zarr", "not a zarr store"),
        (
            lambda p: (p.mkdir(), (p / "zarr.json").write_text("{}"), (p / "x.csv").write_text("")),
            "zarr",
            "holds entries",
        ),
        (lambda p: p.mkdir(), "csv", "is a folder, not a file"),
        (lambda p: p.write_text("name,age\n"), "csv", "header"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00binary"), "csv", "not a text file"),
    ],
)
def test_foreign_paths_are_refused_even_with_overwrite(tmp_path, setup, kind, reason):
    path = tmp_path / "out"
    setup(path)
    before = sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_bytes()
    with pytest.raises(FileExistsError, match=reason) as info:
        check_replaceable(path, kind=kind, overwrite=True, header="metric,scale")
    assert "bitro replaces only its own outputs" in str(info.value)
    assert before == (sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_bytes())


def test_a_symlink_is_never_replaced(tmp_path):
    target = _model_folder(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="symbolic link"):
        check_replaceable(link, kind="model", overwrite=True)


def test_own_outputs_are_replaceable(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    for name in ("zarr.json", "images", "tables"):
        (store / name).mkdir() if name != "zarr.json" else (store / name).write_text("{}")
    assert check_replaceable(store, kind="zarr", overwrite=True) == store
    csv = tmp_path / "m.csv"
    csv.write_text("metric,scale\npcc,raw\n")
    assert check_replaceable(csv, kind="csv", overwrite=True, header="metric,scale") == csv
