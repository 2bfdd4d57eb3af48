"""``bitro demo``: rerunnable output folders, the bitro-vs-ridge headline, option help, one tiny run."""

from __future__ import annotations

import json
import re
from datetime import datetime

import pandas as pd
import pytest

from bitro._demo import DEMO_FILES, REPORT_FORMAT, _headline, default_out, prepare_out, run_demo
from bitro.cli import _build_parser, main


def _earlier_demo(folder, *, report=None):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report or {"format": REPORT_FORMAT, "seed": 0}))
    (folder / "report.md").write_text("# bitro demo report\n")
    (folder / "spatial.png").write_bytes(b"png")
    return folder


# ---------------------------------------------------------------------------- output folders
def test_default_out_is_timestamped_and_never_reused(tmp_path):
    now = datetime(2026, 12, 6, 9, 30, 5)
    first = default_out(tmp_path / "bitro_demo", now=now)
    assert first == tmp_path / "bitro_demo" / "20261206-093005"
    first.mkdir(parents=True)
    second = default_out(tmp_path / "bitro_demo", now=now)
    assert second == tmp_path / "bitro_demo" / "20261206-093005-2"


def test_runs_without_out_get_fresh_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = prepare_out(None)
    (a / "report.md").write_text("first run")
    b = prepare_out(None)
    assert a != b and a.parent.resolve() == b.parent.resolve() == tmp_path.resolve() / "bitro_demo"
    assert b.is_dir() and not any(b.iterdir())
    assert (a / "report.md").read_text() == "first run"  # the earlier run is kept


def test_explicit_out_must_be_empty_unless_overwrite_of_a_demo_output(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_out(empty) == empty
    assert prepare_out(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    earlier = _earlier_demo(tmp_path / "earlier")
    with pytest.raises(FileExistsError, match=r"Leave out --out .* --overwrite"):
        prepare_out(earlier)
    assert (earlier / "report.md").exists()
    assert prepare_out(earlier, overwrite=True) == earlier
    assert not any(earlier.iterdir())  # the earlier demo's files are gone, the folder stays


@pytest.mark.parametrize(
    ("extra", "report", "why"),
    [
        ("notes.txt", None, "files the demo does not write"),
        (None, {"seed": 0}, "not a demo report"),
    ],
)
def test_overwrite_never_touches_foreign_folders(tmp_path, extra, report, why):
    folder = _earlier_demo(tmp_path / "mine", report=report)
    if extra:
        (folder / extra).write_text("keep me")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(FileExistsError, match=why):
        prepare_out(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        prepare_out(a_file, overwrite=True)
    assert a_file.read_text() == "x"


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="at least 2 slides"):
        run_demo(out=tmp_path / "o", n_slides=1)
    with pytest.raises(ValueError, match="epochs"):
        run_demo(out=tmp_path / "o", epochs=0)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- headline
def _metrics(bitro: float, ridge: float) -> pd.DataFrame:
    rows = [
        {"model": m, "metric": "pcc_gene", "scale": s, "value": v + (0.1 if s == "raw" else 0.0)}
        for m, v in (("bitro", bitro), ("ridge", ridge), ("mean", 0.0))
        for s in ("raw", "library_size")
    ]
    return pd.DataFrame(rows)


def test_headline_says_who_wins_and_what_to_try():
    lose = _headline(_metrics(0.259, 0.296), epochs=30, epochs_run=23, n_slides=3, size=1600)
    assert lose.startswith("bitro 0.259 vs ridge 0.296 normalised PCC_gene on the held-out slide: ridge wins")
    assert "(by 0.037)" in lose and "--slides 5 --size 2400" in lose and "--seed" in lose
    assert "--epochs" not in lose  # training stopped early: more epochs would not change it
    assert "--epochs 60" in _headline(_metrics(0.259, 0.296), epochs=30, epochs_run=30, n_slides=3, size=1600)
    win = _headline(_metrics(0.31, 0.296), epochs=30, epochs_run=23, n_slides=3, size=1600)
    assert win == (
        "bitro 0.310 vs ridge 0.296 normalised PCC_gene on the held-out slide: bitro wins on this synthetic "
        "run (by 0.014)."
    )
    tie = _headline(_metrics(0.298, 0.296), epochs=30, epochs_run=23, n_slides=3, size=1600)
    assert ": a tie on this synthetic run. To try:" in tie
    missing = _headline(_metrics(0.3, float("nan")), epochs=30, epochs_run=23, n_slides=3, size=1600)
    assert "no comparison" in missing


# ---------------------------------------------------------------------------- command line
def test_every_demo_option_has_help_and_default():
    parser = _build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["demo"]
    options = {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "verbose")}
    assert set(options) == {"out", "overwrite", "seed", "size", "slides", "epochs"}
    for dest, action in options.items():
        assert action.help, dest
        if dest != "overwrite":  # a switch: off unless given
            assert "default:" in action.help, dest
    assert re.search(r"default: a fresh bitro_demo/<YYYYmmdd-HHMMSS>", options["out"].help)
    args = parser.parse_args(["demo"])
    assert (args.out, args.overwrite, args.seed, args.size, args.slides, args.epochs) == (
        None,
        False,
        0,
        1600,
        3,
        30,
    )


def test_cli_refuses_a_foreign_out_even_with_overwrite(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "my_data.csv").write_text("keep")
    assert main(["demo", "--out", str(out), "--overwrite"]) == 2
    assert "replaces only its own files" in capsys.readouterr().err
    assert (out / "my_data.csv").read_text() == "keep"


# ---------------------------------------------------------------------------- one tiny run
@pytest.mark.slow
def test_tiny_demo_run_writes_the_report_and_can_be_rerun(tmp_path, monkeypatch):
    from PIL import Image

    import bitro as bt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bt.settings, "progress", False)
    report = run_demo(size=700, n_slides=2, epochs=2)
    out = report.parent
    assert out.parent.resolve() == tmp_path.resolve() / "bitro_demo"
    assert {p.name for p in out.iterdir()} <= DEMO_FILES
    text = report.read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["format"] == REPORT_FORMAT
    assert text.splitlines()[2] == f"**{data['headline']}**"
    metrics = pd.read_csv(out / "metrics.csv")
    ours = metrics.query("model == 'bitro' and metric == 'pcc_gene' and scale == 'library_size'").value.iloc[
        0
    ]
    ridge = metrics.query("model == 'ridge' and metric == 'pcc_gene' and scale == 'library_size'").value.iloc[
        0
    ]
    assert data["headline"].startswith(f"bitro {ours:.3f} vs ridge {ridge:.3f} normalised PCC_gene")
    assert (
        metrics.groupby("model").n_genes.max() == data["genes"]
    ).all()  # every model scored the same genes
    assert f"Genes: {data['genes']} of the table's {data['genes_in_table']}" in text
    for name in ("spatial.png", "cells.png", "history.png"):
        with Image.open(out / name) as im:
            assert im.info["dpi"][0] == pytest.approx(200, abs=1)
    # a second run goes to a new folder and leaves the first alone
    again = prepare_out(None)
    assert again != out and report.exists()
    # and --overwrite on the first run's folder replaces it
    assert prepare_out(out, overwrite=True) == out and not any(out.iterdir())
