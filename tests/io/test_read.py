"""The reader registry: one place that bt.io, run_pipeline and the CLI take their readers from."""

from __future__ import annotations

import logging

import pytest

import bitro as bt
from bitro.io import _read


@pytest.fixture
def custom_reader():
    seen = {}

    def read(path, *, sample_id=None, mpp=None):
        seen.update(path=path, sample_id=sample_id, mpp=mpp)
        return bt.datasets.synthetic_tissue(1, size=400, technology="visium", seed=0)

    reader = bt.io.register_reader(
        "dotslide", read, detect=lambda p: p.suffix == ".slide", options=("sample_id", "mpp"), needs=("mpp",)
    )
    yield reader, seen
    _read._READERS.pop("dotslide")


def test_a_registered_reader_is_guessed_and_gets_its_options(custom_reader, tmp_path, caplog):
    _, seen = custom_reader
    path = tmp_path / "a.slide"
    path.write_text("x")
    assert "dotslide" in bt.io.list_readers() and _read.guess_reader(path) == "dotslide"
    with caplog.at_level(logging.WARNING, logger="bitro"):
        sdata = bt.io.read_path(path, sample_id="A", mpp=0.5, image="ignored.png")
    assert seen == {"path": path, "sample_id": "A", "mpp": 0.5} and "he" in sdata.images
    assert "image is ignored by reader 'dotslide'" in caplog.text
    with pytest.raises(ValueError, match=r"needs mpp= \(--mpp\)"):
        bt.io.read_path(path)
    with pytest.raises(ValueError, match="registered already"):
        bt.io.register_reader("dotslide", print)


def test_the_cli_offers_every_registered_reader(custom_reader, capsys):
    from bitro.cli import main

    assert main(["preprocess", "--help"]) == 0
    text = capsys.readouterr().out
    for name in ("zarr", "visium", "xenium", "hest", "wsi", "st", "dotslide"):
        assert name in text


def test_built_in_detection_and_errors(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "experiment.xenium").write_text("{}")
    assert _read.guess_reader(tmp_path / "run") == "xenium"
    (tmp_path / "s.zarr").mkdir()
    assert _read.guess_reader(tmp_path / "s.zarr") == "zarr"
    assert _read.guess_reader(tmp_path / "slide.svs") == "wsi"
    with pytest.raises(
        ValueError, match=r"cannot tell which reader.*pass reader=\{zarr,visium,xenium,hest,wsi,st"
    ):
        _read.guess_reader(tmp_path / "slide.mrxs")
    with pytest.raises(ValueError, match="unknown reader 'nope'; registered readers"):
        bt.io.read_path(tmp_path / "s.zarr", reader="nope")
    with pytest.raises(ValueError, match="reader 'hest' needs sample_id="):
        bt.io.read_path(tmp_path, reader="hest")
    with pytest.raises(TypeError, match="unknown reader option"):
        bt.io.read_path(tmp_path / "s.zarr", colour="red")
