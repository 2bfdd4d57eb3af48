"""The benchmark harness: results page from result dicts (no benchmark is run here), section cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import benchmarks.__main__ as main  # noqa: E402
from benchmarks import _common as common  # noqa: E402
from benchmarks import accuracy  # noqa: E402

META = {
    "quick": False,
    "wall_seconds": 12.0,
    "date_utc": "2025-01-01T00:00:00Z",
    "machine": {"cpu": "Fake CPU", "cores": 2, "ram_gb": 8.0, "platform": "linux", "load_average": [1, 1, 1]},
    "versions": {"python": "3.11", "numpy": "2"},
    "git": {"commit": "0123456789abcdef", "dirty": False},
}


def fake_accuracy() -> dict:
    """Two folds; ridge beats bitro on the normalised scale, bitro wins on raw (known answer)."""
    rows = []
    values = {  # (run, target) -> (norm pcc_gene, raw pcc_gene)
        ("bitro", "raw"): (0.10, 0.30),
        ("ridge", "library_size"): (0.15, 0.20),
        ("depth", "raw"): (0.02, 0.25),
    }
    for fold, test in enumerate(("C2", "C3")):
        for (run, target), (norm, raw) in values.items():
            for metric in accuracy.METRICS:
                for scale, v in (("library_size", norm), ("raw", raw)):
                    rows.append(
                        {
                            "fold": fold,
                            "test": test,
                            "run": run,
                            "target": target,
                            "group": "main",
                            "metric": metric,
                            "scale": scale,
                            "value": v + 0.01 * fold,
                        }
                    )
    rows.append(
        {
            "fold": 0,
            "test": "C2",
            "run": "bitro no GAT",
            "target": "library_size",
            "group": "ablation",
            "metric": "pcc_gene",
            "scale": "library_size",
            "value": 0.05,
        }
    )
    speed = [
        {
            "fold": 0,
            "test": "C2",
            "run": "bitro",
            "target": "raw",
            "fit_seconds": 10.0,
            "predict_seconds": 1.0,
            "n_train_spots": 100,
            "n_test_spots": 30,
            "epochs": 5,
            "train_spots_per_s": 50.0,
        },
        {
            "fold": 0,
            "test": "C2",
            "run": "depth",
            "target": "raw",
            "fit_seconds": 0.1,
            "predict_seconds": 0.1,
            "n_train_spots": 100,
            "n_test_spots": 30,
            "epochs": None,
            "train_spots_per_s": None,
        },
    ]
    res = {
        "name": "accuracy",
        "meta": META,
        "protocol": {
            "sections": ["C2", "C3"],
            "folds_main": ["C2", "C3"],
            "folds_ablation": ["C2"],
            "n_genes": 785,
            "bitro_fit_kwargs": accuracy.BITRO_KW,
            "bitro_config": "defaults",
            "encoders": ["x"],
            "window_half_px": None,
            "cells": {},
            "spots": {},
        },
        "rows": rows,
        "speed": speed,
    }
    res["markdown"] = accuracy.markdown(res)
    return res


def test_accuracy_markdown_reports_means_and_losses():
    md = fake_accuracy()["markdown"]
    # bitro raw, norm pcc_gene mean over the two folds: (0.10 + 0.11) / 2
    assert "0.105 ± 0.007" in md
    assert "### Ablations" in md and "bitro no GAT" in md
    # ridge wins on the normalised scale -> the page must say that bitro loses there
    norm_line = next(ln for ln in md.splitlines() if "On the normalised scale" in ln)
    assert "ridge" in norm_line and "bitro loses" in norm_line
    raw_line = next(ln for ln in md.splitlines() if "On the raw-count scale" in ln)
    assert "bitro wins" in raw_line


def test_build_page_from_results(tmp_path):
    acc = fake_accuracy()
    other = {
        "name": "cells",
        "meta": {**META, "quick": True},
        "markdown": "## Cells\n\nthey do **not** beat x\n",
    }
    for res in (acc, other):
        common.write_result(res["name"], res, results_dir=tmp_path)
    (tmp_path / "legacy.json").write_text(json.dumps({"n_cells": 3}))  # old format: ignored
    loaded = main.load_results(tmp_path)
    assert set(loaded) == {"accuracy", "cells"}
    page = main.build_page(loaded)
    assert page.startswith("# Benchmarks")
    assert "## Headline" in page and "## Provenance" in page
    assert "Fake CPU" in page and "0123456789" in page
    assert "### Where bitro loses" in page
    # headline row of ridge: norm 0.155 (mean of 0.15, 0.16)
    ridge = next(ln for ln in page.splitlines() if ln.startswith("| ridge |"))
    assert "0.155" in ridge
    # sections follow the harness order: accuracy before cells
    assert page.index("## Spot-level accuracy") < page.index("## Cells")


def test_empty_page_and_table_formatting():
    assert "No results yet" in main.build_page({})
    table = common.md_table(["a", "b"], [[1.23456, None], [float("nan"), "x"]], digits=2)
    assert table.splitlines()[2] == "| 1.23 | – |"
    assert table.splitlines()[3] == "| nan | x |"


def test_cache_key_depends_on_parameters():
    a = common.cache_key("C2", ("efficientnet_lite0",), "tile", None)
    assert a == common.cache_key("C2", ("efficientnet_lite0",), "tile", None)
    assert a != common.cache_key("C2", ("efficientnet_lite0",), "crop", None)
    assert a != common.cache_key("C3", ("efficientnet_lite0",), "tile", None)
    assert a != common.cache_key("C2", ("efficientnet_lite0",), "tile", 800)


def test_standard_set_leaves_the_slow_benchmarks_to_full(tmp_path, monkeypatch):
    assert set(main.FULL) == set(main.BENCHMARKS)
    assert not set(main.FULL_ONLY) & set(main.STANDARD)
    assert "accuracy" in main.STANDARD and "scaling" in main.FULL_ONLY
    with pytest.raises(SystemExit):
        main.main(["--quick", "--full", "--page-only", "--out", str(tmp_path / "p.md")])
    # --page-only with --full records the setting without running anything
    for key in common.SETTINGS:
        monkeypatch.setitem(common.SETTINGS, key, common.SETTINGS[key])  # restored after the test
    monkeypatch.setattr(main, "load_results", dict)
    main.main(["--full", "--page-only", "--out", str(tmp_path / "p.md")])
    assert common.SETTINGS["full"] is True
    assert "No results yet" in (tmp_path / "p.md").read_text()


def test_full_run_ablations_are_not_merged_twice(tmp_path):
    acc = fake_accuracy()  # holds one ablation row, as a --full run does
    old = {**fake_accuracy(), "name": "accuracy_ablations"}
    old["rows"] = [{**r, "value": 0.99} for r in old["rows"] if r["group"] == "ablation"]
    for res in (acc, old):
        common.write_result(res["name"], res, results_dir=tmp_path)
    merged = main.load_results(tmp_path)["accuracy"]
    ab = [r for r in merged["rows"] if r["group"] == "ablation"]
    assert [r["value"] for r in ab] == [0.05]
    # a standard run (main rows only) picks up the separate ablation file
    main_only = {**acc, "rows": [r for r in acc["rows"] if r["group"] == "main"]}
    common.write_result("accuracy", main_only, results_dir=tmp_path)
    merged = main.load_results(tmp_path)["accuracy"]
    assert [r["value"] for r in merged["rows"] if r["group"] == "ablation"] == [0.99]
    assert "bitro no GAT" in merged["markdown"]


def test_jobs_start_the_longest_first_and_forward_the_options(tmp_path, monkeypatch):
    from benchmarks import _jobs

    for name, secs in (("cells", 50.0), ("bulk", 900.0)):
        common.write_result(
            name, {"name": name, "meta": {**META, "wall_seconds": secs}}, results_dir=tmp_path
        )
    (tmp_path / "stain.json").write_text("{broken")  # unreadable: falls back to the default
    assert _jobs.schedule(["cells", "stain", "bulk", "accuracy"], tmp_path) == [
        "bulk",  # 900 s on disk beats accuracy's default
        "accuracy",
        "stain",  # default 60 s
        "cells",  # 50 s on disk
    ]
    args = main.argparse.Namespace(
        quick=False, full=True, window=800, epochs=None, ablation_folds=[0, 2], groups=None
    )
    assert main._child_args(args) == ["--full", "--window", "800", "--ablation-folds", "0", "2"]

    started, live, peak = [], set(), [0]

    class FakeProc:
        def __init__(self, cmd, **kw):
            self.name = cmd[cmd.index("--only") + 1]
            self.polls = 0
            started.append(cmd)
            live.add(self.name)
            peak[0] = max(peak[0], len(live))

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            live.discard(self.name)
            self.returncode = 3 if self.name == "cells" else 0
            return self.returncode

    monkeypatch.setattr(_jobs.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(_jobs.time, "sleep", lambda s: None)
    monkeypatch.setattr(_jobs, "RESULTS_DIR", tmp_path)
    codes = _jobs.run_parallel(["cells", "stain", "bulk"], ["--full"], jobs=2)
    assert codes == {"bulk": 0, "cells": 3, "stain": 0}  # a failing child does not stop the others
    assert peak[0] == 2
    assert started[0][started[0].index("--only") + 1] == "bulk"
    assert all(c[-2:] == ["--no-page", "--full"] for c in started)


def test_results_written_by_a_run_do_not_mark_the_tree_dirty(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "a.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    assert common.git_commit()["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "a.json").write_text('{"new": 1}')
    (tmp_path / "benchmarks" / "results" / "b.json").write_text("{}")
    assert common.git_commit()["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.git_commit()["dirty"] is True


def test_page_rerenders_stored_results_with_current_wording(tmp_path):
    acc = fake_accuracy()
    acc["markdown"] = "## Spot-level accuracy\n\nstale wording\n"
    cells = {"name": "cells", "meta": META, "markdown": "## Cells\n\nold format, kept\n"}  # cannot re-render
    for res in (acc, cells):
        common.write_result(res["name"], res, results_dir=tmp_path)
    loaded = main.load_results(tmp_path)
    assert "stale wording" not in loaded["accuracy"]["markdown"]
    assert loaded["accuracy"]["markdown"] == accuracy.markdown(fake_accuracy())
    assert loaded["cells"]["markdown"] == cells["markdown"]


@pytest.mark.realdata
def test_cached_section_is_bitros_prepared_store_in_the_benchmark_cache(tmp_path, monkeypatch, data_dir):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(common, "DATA_DIR", data_dir)
    assert common.cache_info("C3", encoders=("morphology",), window=250) == {}
    first = common.cached_section("C3", encoders=("morphology",), window=250)
    [store] = (tmp_path / "her2st").glob("C3_*.zarr")  # bt.datasets.her2st(..., prepared=True)'s store
    assert set(first.tables) == {"spots", "cells"} and not first.images  # tables only, as before
    assert first["cells"].obsm["X_bitro"].shape[1] == 28  # the morphology encoder's features
    info = common.cache_info("C3", encoders=("morphology",), window=250)
    assert {"load", "segmentation", "embed_morphology_tile"} <= set(info["steps"])
    assert "peak_rss_mb" in info["steps"]["segmentation"]  # the benchmark's own step records
    again = common.cached_section("C3", encoders=("morphology",), window=250)
    assert store.stat().st_mtime_ns == next((tmp_path / "her2st").glob("C3_*.zarr")).stat().st_mtime_ns
    assert again["cells"].n_obs == first["cells"].n_obs
