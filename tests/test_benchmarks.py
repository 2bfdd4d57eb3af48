"""The benchmark harness: results page from result dicts (no benchmark is run here), section cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
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


# --------------------------------------------------------------------------- cell benchmark helpers
def test_equal_and_type_aware_splits_on_known_spots():
    import numpy as np
    from benchmarks import _cell_refs as C

    spots = np.array([[6.0, 3.0], [4.0, 8.0]])
    index = np.array([0, 0, 0, 1, -1, 1])
    eq = C.equal_split(spots, index)
    assert np.allclose(eq[[0, 1, 2]], [2.0, 1.0]) and np.allclose(eq[[3, 5]], [2.0, 4.0])
    assert np.isnan(eq[4]).all()
    # type 0 expresses gene 0 at 1 and gene 1 at 3; type 1 the reverse; cells of spot 0 are types 0, 1, 1
    profiles = np.array([[1.0, 3.0], [3.0, 1.0]])
    types = np.array([0, 1, 1, 0, 1, 1])
    ta = C.type_aware_split(spots, index, types, profiles)
    assert np.allclose(ta[:3, 0], 6.0 * np.array([1, 3, 3]) / 7) and np.allclose(
        ta[:3, 1], 3.0 * np.array([3, 1, 1]) / 5
    )
    assert np.allclose(ta[3], [4.0 / 4, 8.0 * 3 / 4]) and np.allclose(ta[5], [4.0 * 3 / 4, 8.0 / 4])
    assert np.isnan(ta[4]).all()
    assert np.allclose(C.spot_sums(ta, index, 2), spots) and np.allclose(C.spot_sums(eq, index, 2), spots)
    # a gene no type of the spot expresses is split equally
    flat = C.type_aware_split(spots, index, types, np.array([[1.0, 0.0], [3.0, 0.0]]))
    assert np.allclose(flat[:3, 1], 1.0)
    # type profiles are type means; an absent type gets the overall mean
    prof = C.type_profiles(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]), np.array([0, 0, 1]), 3)
    assert np.allclose(prof, [[2.0, 3.0], [5.0, 0.0], [3.0, 2.0]])


def test_within_spot_entropy_and_share_correlation():
    import numpy as np
    from benchmarks import _cell_refs as C

    index = np.array([0, 0, 0, 0, 1, 1, 1, 1, -1])
    equal = np.ones((9, 2))
    h = C.share_entropy(equal, index, 2)
    assert np.isclose(h["entropy"], 1.0) and np.isclose(h["effective_cells"], 1.0)
    one_takes_all = np.zeros((9, 2))
    one_takes_all[[0, 4]] = 5.0
    h = C.share_entropy(one_takes_all, index, 2)
    assert np.isclose(h["entropy"], 0.0) and np.isclose(h["effective_cells"], 0.25)
    # shares (0.5, 0.5, 0, 0) of 4 cells: entropy log 2 / log 4
    half = np.zeros((9, 2))
    half[[0, 1, 4, 5]] = 1.0
    assert np.isclose(C.share_entropy(half, index, 2)["entropy"], 0.5)
    truth = np.arange(1.0, 19.0).reshape(9, 2) ** 2
    assert np.isclose(C.share_correlation(truth * 3.0, truth, index, 2), 1.0)
    assert np.isclose(C.share_correlation(-truth + 500.0, truth, index, 2), -1.0)
    assert np.isnan(
        C.share_correlation(equal, truth, index, 2)
    )  # an equal split has no within-spot variation


def test_bulk_deviation_correlation_and_mean_sd():
    import numpy as np
    from benchmarks import _cell_refs as C

    rng = np.random.default_rng(0)
    train = rng.uniform(50, 150, (3, 40))
    truth = train.mean(axis=0) * np.exp(rng.normal(0, 0.5, 40))
    assert np.isclose(C.bulk_deviation_correlation(truth, truth, train), 1.0)
    assert np.isclose(C.bulk_deviation_correlation(2 * truth, truth, train), 1.0)  # depth does not matter
    same = np.tile(train[0], (3, 1))  # a prediction at the training mean (at any depth) has no deviation
    assert np.isnan(C.bulk_deviation_correlation(5 * train[0], truth, same))
    # a model with a gene bias on every slide: against its own training mean the bias cancels
    bias = np.exp(rng.normal(0, 1.0, 40))
    plain = C.bulk_deviation_correlation(truth * bias, truth, train)
    own = C.bulk_deviation_correlation(truth * bias, truth, train, pred_train=train * bias)
    assert np.isclose(own, 1.0) and plain < 0.9
    s = C.mean_sd([1.0, 2.0, 3.0, float("nan"), None])
    assert s == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert C.mean_sd([])["n"] == 0


def test_cell_sum_baseline_recovers_per_cell_rates():
    import numpy as np
    from benchmarks._cellsum import fit_cell_sum

    rng = np.random.default_rng(1)
    n_spots = 150
    n_cells = rng.integers(2, 8, n_spots)
    index = np.repeat(np.arange(n_spots), n_cells)
    kind = rng.integers(0, 2, len(index))  # type 0 expresses gene 0, type 1 gene 1
    features = np.column_stack([kind + rng.normal(0, 0.05, len(index)), rng.normal(0, 1, len(index))])
    rates = np.array([[6.0, 1.0], [1.0, 6.0]])
    counts = rng.poisson(rates[kind])
    spots = np.zeros((n_spots, 2))
    np.add.at(spots, index, counts)
    model = fit_cell_sum(np.vstack([features, [[0.0, 0.0]]]), np.r_[index, -1], spots, steps=400, seed=0)
    pred = model.predict_cells(features)
    means = np.stack([pred[kind == t].mean(axis=0) for t in (0, 1)])
    assert np.allclose(means, rates, atol=0.5), means  # each type's rates, learned from spot sums only
    assert means[0, 0] > 4 * means[1, 0] and means[1, 1] > 4 * means[0, 1]
    assert model.losses[-1] < model.losses[0] and 0 < model.best_step <= 400


def _fake_cells_result(ratio_counts: float) -> dict:
    """Two layouts, one fold, two seeds: attention at the equal split, cell_counts at ``ratio_counts`` × it
    and 0.05 lower with the skip."""
    from benchmarks import cells

    layouts, spec = {}, {}
    for name in ("her2st", "visium_mixed"):
        records = [
            {"layout": name, "fold": 0, "seed": None, "method": cells.ORACLE_EQUAL, "kind": "oracle",
             "cells": {"pcc_gene_library_size": 0.4, "pcc_gene_raw": 0.41}, "entropy": 1.0},
            {"layout": name, "fold": 0, "seed": None, "method": cells.ORACLE_TYPE, "kind": "oracle",
             "cells": {"pcc_gene_library_size": 0.5, "pcc_gene_raw": 0.52}, "entropy": 0.9},
        ]  # fmt: skip
        for seed in (0, 1):
            for method, value in (
                ("attention", 0.20),
                ("cell_counts, poisson", 0.20 * ratio_counts),
                ("cell_counts + skip, poisson", 0.20 * ratio_counts - 0.05),
            ):
                records.append(
                    {"layout": name, "fold": 0, "seed": seed, "method": method, "kind": "bitro",
                     "cells": {"pcc_gene_library_size": value + 0.01 * seed, "pcc_gene_raw": value},
                     "equal_split": {"pcc_gene_library_size": 0.20 + 0.01 * seed, "pcc_gene_raw": 0.2},
                     "spots": {"pcc_gene_library_size": 0.3, "pcc_gene_raw": 0.4},
                     "entropy": 0.99 if method == "attention" else 0.7, "effective_cells": 0.97,
                     "share_correlation": 0.01, "bulk_deviation_r": 0.25 if method == "attention" else 0.35,
                     "bulk_deviation_r_self": 0.45,
                     "sum_gap": 1e-7, "fit_s": 3.0, "in_bag_matches_spots": True}
                )  # fmt: skip
        layouts[name] = {
            "records": records, "summary": cells.summarise(records), "unavailable": {}, "cells_per_spot": 20.0,
            "types_per_spot": 3.0, "dominant_type_share": 0.6, "n_spots": [10], "n_cells_truth": [100],
            "seconds": 1.0,
        }  # fmt: skip
        spec[name] = {**cells.LAYOUTS[name], "size": 100}
    protocol = {**cells.QUICK, "layouts": spec, "fit": cells.FIT}
    res = {"name": "cells", "meta": META, "protocol": protocol, "layouts": layouts}
    res["markdown"] = cells.markdown(res)
    return res


def test_cells_markdown_says_whether_the_target_is_met():
    met = _fake_cells_result(1.5)
    s = met["layouts"]["her2st"]["summary"]
    # ratio per fold/seed: 0.30 / 0.20 and 0.31 / 0.21
    assert abs(s["cell_counts, poisson"]["ratio_norm"]["mean"] - (1.5 + 0.31 / 0.21) / 2) < 1e-9
    assert s["attention"]["cells_norm"]["n"] == 2 and s[cells_oracle()]["cells_norm"]["n"] == 1
    md = met["markdown"]
    # 1.5 and 1.25 times the equal split: both count heads meet the target, attention (1.0) does not
    assert "is met by: cell_counts, poisson, cell_counts + skip, poisson." in md
    assert (
        "cell_counts, poisson gives the best pseudo-cells" in md and "0.050 ahead of cell_counts + skip" in md
    )
    assert "the skip changes pseudo-cell normalised PCC_gene by -0.050 ± 0.000" in md
    assert "does **not**" not in md and "do **not**" not in md
    missed = _fake_cells_result(1.1)["markdown"]
    assert "No BiTro head reaches the issue target" in missed and "do **not**" in missed
    # the bulk target is judged against the true training mean, not the model's own
    assert "the issue target (r ≥ 0.3) is met by cell_counts, poisson, cell_counts + skip, poisson." in missed


def cells_oracle() -> str:
    from benchmarks import cells

    return cells.ORACLE_EQUAL


def fake_composition(model_values: list[float]) -> dict:
    """One fold; the equal split has Spearman 0.2 on every type but NaN on the last (a type no spot got)."""
    from benchmarks import composition

    rows = []
    for method, values in (
        ("bitro (attention head) cells", model_values),
        (composition.EQUAL, [0.2] * 7 + [float("nan")]),
    ):
        for t, v in zip(composition.TYPES, values, strict=True):
            rows.append(
                {"test": "C2", "method": method, "type": t, "spearman": v, "pvalue": 0.01, "n_spots": 60,
                 "mixture_share": 0.5 if method.startswith("bitro") else 0.0}
            )  # fmt: skip
    protocol = {
        "sections": ["C2", "C3"], "folds": ["C2"], "heads": ["attention"], "n_genes": 785,
        "bitro_fit_kwargs": {"max_epochs": 3, "n_components": 32}, "window_half_px": 1500, "n_phenotypes": 16,
    }  # fmt: skip
    return {"name": "composition", "meta": {**META, "quick": True}, "protocol": protocol, "rows": rows}


def test_composition_markdown_counts_the_types_above_the_equal_split():
    from benchmarks import composition

    # above 0.2 on four types, below on three, and 0.1 > NaN (counted as 0) on the last: 5 of 8
    res = fake_composition([0.3, 0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1])
    md = composition.markdown(res)
    assert "above the equal split on 5 of 8 types; reaches the issue-13 target" in md
    assert "| bitro (attention head) cells | 0.30 |" in md and "| 5/8 |" in md
    md = composition.markdown(fake_composition([0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1, -0.1]))
    assert "on 3 of 8 types; does **not** reach" in md
    assert "does **not** reach" in main.build_page({"composition": {**res, "markdown": md}})
    fits = [
        {"head": "attention", "within_spot_score_share": 0.25},
        {"head": "attention", "within_spot_score_share": 0.35},
    ]
    assert "30% of its cells' marker-score variance lies within spots" in composition.markdown(
        {**res, "fits": fits}
    )


# --------------------------------------------------------------------------- shift benchmark helpers
def test_shift_scores_one_number_and_the_noise_ceiling_with_known_answers():
    from benchmarks import shift

    x = np.linspace(0.0, 2.0, 40)
    counts = np.column_stack([np.expm1(2 * x + 1), np.expm1(3 - x), np.full(40, 5.0)])
    raw = shift.score_one_number(counts, x)["raw"]
    # gene 0 correlates +1, gene 1 −1, gene 2 is constant (counted 0): mean 0 over three genes
    assert raw["pcc_gene"] == pytest.approx(0.0, abs=1e-9) and raw["n_constant"] == 1 and raw["n_units"] == 40
    one = shift.score_one_number(counts[:, :1], x)["raw"]
    assert one["pcc_gene"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 20.0, size=(60, 30))
    assert shift.noise_ceiling(truth, truth) == pytest.approx({"library_size": 1.0, "raw": 1.0})
    a, b = rng.poisson(truth), rng.poisson(truth)
    ceiling = shift.noise_ceiling(a.astype(float), b.astype(float))
    assert 0.2 < ceiling["raw"] < 0.95 and 0.2 < ceiling["library_size"] < 0.95
    values = np.column_stack([np.ones(5), np.arange(5.0), np.full(5, 3.0)])
    assert shift.constant_columns(values) == 2


def _fake_shift() -> dict:
    from benchmarks import shift

    values = {  # (shift, model) -> (norm, raw)
        ("none", "bitro"): (0.20, 0.30),
        ("none", "ridge"): (0.15, 0.25),
        ("none", shift.NUCLEI): (0.10, 0.20),
        ("stain_tcga", "bitro"): (0.10, 0.28),
        ("stain_tcga", "ridge"): (0.12, 0.20),
        ("stain_tcga", shift.NUCLEI): (0.05, 0.20),
        ("depth_650", "bitro"): (0.10, 0.25),
        ("depth_650", "ridge"): (0.05, 0.20),
        ("depth_650", shift.NUCLEI): (0.04, 0.10),
    }
    rows = [
        {"fold": 0, "test": "C2", "shift": s, "model": m, "scale": scale, "pcc_gene": v, "n_units": 150,
         "n_constant_pred": 3 if m == "ridge" and s == "stain_tcga" and scale == "raw" else 0,
         "n_constant_scored": 0, "predict_seconds": 0.1}
        for (s, m), (norm, raw) in values.items()
        for scale, v in (("library_size", norm), ("raw", raw))
    ]  # fmt: skip
    res = {
        "name": "shift",
        "meta": META,
        "protocol": {
            "sections": ["C2", "C3"], "folds": ["C2"], "n_genes": 785, "window_half_px": None,
            "bitro_fit_kwargs": accuracy.BITRO_KW, "models": [], "shifts": shift.SHIFTS,
            "labels": shift.LABELS, "spots": {},
        },
        "rows": rows,
        "ceilings": [
            {"fold": 0, "test": "C2", "shift": "depth_650", "scale": "library_size", "ceiling": 0.5},
            {"fold": 0, "test": "C2", "shift": "depth_650", "scale": "raw", "ceiling": 0.8},
        ],
        "domains": [
            {"fold": 0, "test": "C2", "shift": "depth_650", "flagged": ["median_umi_per_spot"],
             "values": {"median_umi_per_spot": 650.0}, "train_median": {"median_umi_per_spot": 10000.0}},
        ],
        "speed": [{"fold": 0, "test": "C2", "what": "fit bitro", "seconds": 60.0}],
    }  # fmt: skip
    res["markdown"] = shift.markdown(res)
    return res


def test_shift_markdown_reports_losses_the_ceiling_and_collapses():
    md = _fake_shift()["markdown"]
    assert "## Domain shift" in md
    # ridge beats bitro on the normalised scale under the TCGA stain, and bitro falls by 50 %
    loss = next(ln for ln in md.splitlines() if "stain: TCGA tile, normalised" in ln)
    assert "**bitro loses** to ridge" in loss
    assert any("falls by 50%" in ln and "does **not** hold" in ln for ln in md.splitlines())
    # the raw scale under depth shift: bitro wins, no loss line
    assert not any("depth: median 650 UMI, raw" in ln for ln in md.splitlines())
    # bitro / ceiling on the normalised scale: 0.10 / 0.5
    ceiling_row = next(ln for ln in md.splitlines() if ln.startswith("| depth: median 650 UMI | norm |"))
    assert "| 0.500 | 0.200 |" in ceiling_row
    assert "| stain: TCGA tile | 0 / 0 | 3 / 0 |" in md
    assert "median_umi_per_spot" in md
    # the page collects the loss lines
    page = main.build_page({"shift": _fake_shift()})
    assert "### Where bitro loses" in page and "stain: TCGA tile, normalised" in page


def test_shift_markdown_states_whether_augmentation_meets_the_target():
    from benchmarks import shift

    res = _fake_shift()
    values = {  # normalised / raw of the augmented model: −5 % under TCGA stain, −25 % at ×0.8
        "none": (0.18, 0.28),
        "stain_tcga": (0.171, 0.27),
        "scale_0.8": (0.135, 0.20),
        "depth_650": (0.09, 0.2),
    }
    extra = {"scale_0.8": {"bitro": (0.15, 0.2), "ridge": (0.1, 0.1), shift.NUCLEI: (0.0, 0.0)}}
    for s, augmented in values.items():
        for m, (norm, raw) in {shift.AUGMENTED: augmented, **extra.get(s, {})}.items():
            for scale, v in (("library_size", norm), ("raw", raw)):
                res["rows"].append(
                    {"fold": 0, "test": "C2", "shift": s, "model": m, "scale": scale, "pcc_gene": v,
                     "n_units": 150, "n_constant_pred": 0, "n_constant_scored": 0, "predict_seconds": 0.1}
                )  # fmt: skip
    res["protocol"]["augments"] = {"C2": [shift.augment_spec("C2", i) for i in range(len(shift.AUGMENTS))]}
    md = shift.markdown(res)
    assert "**bitro, augmented** is the default bitro trained on the training windows plus 2" in md
    assert "- In distribution, normalised: bitro, augmented 0.180 against bitro 0.200 (-0.020, -10%)." in md
    verdict = next(ln for ln in md.splitlines() if ln.startswith("- **Target"))
    assert "meets it on stain: TCGA tile; it does **not** on scale ×0.8." in verdict
    assert (
        "- scale ×0.8: bitro, augmented 0.135 (-25% of its own in-distribution value), bitro 0.150 (-25%)."
        in md
    )


def test_shift_training_copies_never_include_the_held_out_section():
    import spatialdata as sd
    from benchmarks import shift

    def copy_of(name):
        out = sd.SpatialData()
        out.attrs["bitro_augment"] = [{"source_sample_id": name}]
        return out

    augmented = {n: [copy_of(n), copy_of(n)] for n in ("C2", "C3", "C4")}
    kept = shift.training_copies(augmented, "C3")
    assert len(kept) == 4
    assert {c.attrs["bitro_augment"][0]["source_sample_id"] for c in kept} == {"C2", "C4"}
    augmented["C2"].append(copy_of("C3"))  # a mislabelled copy of the test section is refused
    with pytest.raises(AssertionError, match="test section C3"):
        shift.training_copies(augmented, "C3")
    seeds = {shift.augment_spec(n, i)["seed"] for n in shift.SECTIONS for i in range(len(shift.AUGMENTS))}
    assert len(seeds) == len(shift.SECTIONS) * len(shift.AUGMENTS)  # every copy draws its own jitter
    names = {
        shift.augmented_name("C2", shift.augment_spec("C2", i), 1500) for i in range(len(shift.AUGMENTS))
    }
    assert len(names) == len(shift.AUGMENTS)
    assert all("_augment_" in n for n in names)
    assert not names & {shift.shifted_name("C2", spec, 1500) for spec in shift.SHIFTS.values()}


def fake_spahgc() -> dict:
    """SpaHGC above ridge and retrieval but below bitro on the normalised scale (known answer)."""
    from benchmarks import spahgc

    values = {
        ("spahgc", 0.12),
        ("retrieval", 0.08),
        ("ridge", 0.07),
        ("bitro", 0.15),
        ("spahgc no exemplars", 0.10),
    }
    rows, speed = [], []
    for fold, test in enumerate(("C2", "C3")):
        for run, v in values:
            group = "ablation" if "no" in run else "main"
            for seed in (0, 1, 2) if run.startswith("spahgc") else (0,):
                for metric in spahgc.METRICS:
                    for scale in ("library_size", "raw"):
                        rows.append(
                            {
                                "fold": fold,
                                "test": test,
                                "run": run,
                                "target": "library_size",
                                "group": group,
                                "seed": seed,
                                "metric": metric,
                                "scale": scale,
                                "value": v + 0.01 * seed + 0.02 * fold,
                                "n_genes": 785,
                                "n_constant": 5,
                            }
                        )
                speed.append(
                    {
                        "fold": fold,
                        "test": test,
                        "run": run,
                        "target": "library_size",
                        "seed": seed,
                        "fit_seconds": 10.0,
                        "fit_cpu_seconds": 9.0,
                        "fit_peak_rss_mb": 900.0,
                        "fit_rss_increase_mb": 100.0,
                        "predict_seconds": 1.0,
                        "epochs": 5,
                    }
                )
    res = {
        "name": "spahgc",
        "meta": META,
        "protocol": {
            "sections": ["C2", "C3"],
            "n_genes": 785,
            "window_half_px": None,
            "spahgc_fit_kwargs": spahgc.SPAHGC_KW,
            "spahgc_config": "defaults",
            "seeds": [0, 1, 2],
            "reused_from_accuracy": None,
            "spots": {"C2": 180, "C3": 180},
            "cells": {},
        },
        "rows": rows,
        "speed": speed,
        "index_scaling": [
            {
                "n_references": 1000,
                "method": "exact",
                "dim": 129,
                "k": 8,
                "n_queries": 10,
                "build_seconds": 0.1,
                "query_seconds": 0.1,
                "queries_per_s": 100.0,
            }
        ],
    }
    res["markdown"] = spahgc.markdown(res)
    return res


def test_spahgc_markdown_reports_seeds_undefined_genes_and_the_honest_reading():
    from benchmarks import spahgc

    md = fake_spahgc()["markdown"]
    assert "spahgc" in main.FULL_ONLY and "spahgc" not in main.STANDARD
    # spahgc: seed means 0.13 and 0.15 on the two folds: 0.140 ± 0.014; sd between seeds 0.010
    assert "| spahgc | norm | 0.140 ± 0.014 |" in md and "| 0.010 |" in md
    assert "5.0 of 785" in md and f"{0.14 * 785 / 780:.3f}" in md  # undefined genes, mean over the defined
    assert "above ridge (0.080)" in md and "above retrieval (0.090)" in md
    assert "below bitro (0.160) — SpaHGC does not beat bitro here" in md
    assert (
        "Without exemplars, normalised PCC_gene is 0.120, below the main SpaHGC row's 0.140; per section "
        "-0.020 ± 0.000, higher on 0 of 2." in md
    )
    assert "### Exemplar index" in md and "Caution" not in md
    assert spahgc.markdown({**fake_spahgc(), "rows": []}).endswith("No results.\n")


def test_a_spahgc_run_of_some_folds_keeps_the_stored_rows_of_the_others(tmp_path, monkeypatch):
    from benchmarks import spahgc

    monkeypatch.setattr(spahgc, "RESULTS_DIR", tmp_path)
    stored = fake_spahgc()  # folds C2 and C3
    common.write_result("spahgc", stored, results_dir=tmp_path)
    monkeypatch.setenv("BITRO_SPAHGC_FOLDS", "C3")
    visit = spahgc._folds_to_run(["C2", "C3"])
    visited = {(t, c["name"], c["target"]) for t in visit for c in spahgc.runs()}
    new = fake_spahgc()
    new["rows"] = [{**r, "value": r["value"] + 1.0} for r in new["rows"] if r["test"] == "C3"]
    new["speed"] = [r for r in new["speed"] if r["test"] == "C3"]
    new["index_scaling"] = []
    merged = spahgc._with_stored_rows(new, visited)
    assert {r["test"] for r in merged["rows"]} == {"C2", "C3"}
    assert len(merged["rows"]) == len(stored["rows"])
    assert all(r["value"] > 1 for r in merged["rows"] if r["test"] == "C3")  # this run's C3, not the stored
    assert all(r["value"] < 1 for r in merged["rows"] if r["test"] == "C2")
    assert merged["index_scaling"] == stored["index_scaling"] and "C2, C3" in merged["markdown"]
    quick = {**fake_spahgc(), "meta": {**META, "quick": True}}  # another protocol is never mixed in
    common.write_result("spahgc", quick, results_dir=tmp_path)
    assert spahgc._with_stored_rows(new, visited)["rows"] == new["rows"]
    monkeypatch.setenv("BITRO_SPAHGC_FOLDS", "C9")
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['C9'\]"):
        spahgc._folds_to_run(["C2", "C3"])


def test_a_spahgc_run_of_one_configuration_keeps_every_other_runs_rows(tmp_path, monkeypatch):
    from benchmarks import spahgc

    monkeypatch.setattr(spahgc, "RESULTS_DIR", tmp_path)
    stored = fake_spahgc()
    common.write_result("spahgc", stored, results_dir=tmp_path)
    monkeypatch.setenv("BITRO_SPAHGC_RUNS", "retrieval")
    selected = spahgc._runs_to_run()
    assert {c["name"] for c in selected} == {"retrieval"} and {c["target"] for c in selected} == {
        "library_size", "raw"}  # fmt: skip
    visited = {(t, c["name"], c["target"]) for t in ("C2", "C3") for c in selected}
    new = {**fake_spahgc(), "index_scaling": []}
    new["rows"] = [{**r, "value": 5.0} for r in new["rows"] if r["run"] == "retrieval"]
    new["speed"] = [r for r in new["speed"] if r["run"] == "retrieval"]
    merged = spahgc._with_stored_rows(new, visited)
    assert len(merged["rows"]) == len(stored["rows"])
    assert all((r["value"] == 5.0) == (r["run"] == "retrieval") for r in merged["rows"])
    monkeypatch.setenv("BITRO_SPAHGC_RUNS", "retrieval,spahgc k = 99")
    with pytest.raises(ValueError, match=r"unknown run\(s\) \['spahgc k = 99'\]"):
        spahgc._runs_to_run()


def test_aligned_bitro_markdown_pairs_the_arms_by_fold_and_says_when_alignment_does_not_help():
    from benchmarks import aligned_bitro

    rows = [
        {"test": t, "seed": seed, "arm": arm, "value": base + off + 0.01 * seed}
        for t, off in (("C2", 0.0), ("C3", 0.02), ("C4", 0.04))
        for seed in (0, 1)
        for arm, base in (("X_bitro", 0.17), ("X_aligned", 0.16 if t != "C4" else 0.18))
    ]
    times = [{"test": "C2", "seed": 0, "arm": a, "seconds": s} for a, s in (("alignment", 40.0), ("X_bitro", 60.0))]
    protocol = {"sections": ["C2", "C3", "C4"], "held_out": ["C2", "C3", "C4"], "seeds": [0, 1], "fit_kwargs": {},
                "align_kwargs": {}, "loss": "clip", "n_genes": 785}  # fmt: skip
    md = aligned_bitro.markdown({"rows": rows, "times": times, "protocol": protocol, "meta": {}})
    assert "aligned_bitro" in main.FULL_ONLY
    # seed means: X_bitro 0.175, 0.195, 0.215 -> 0.195 ± 0.020; aligned 0.165, 0.185, 0.225 -> 0.192 ± 0.031
    assert "| X_bitro (unaligned, the default) | 0.195 ± 0.020 | 128 | 60 |" in md
    assert "| X_aligned (CLIP-aligned image tower) | 0.192 ± 0.031 | 64 | – |" in md
    assert "-0.003 ± 0.012 (aligned higher on 1 of 3)" in md and "does **not** help" in md
    assert aligned_bitro.markdown({"rows": [], "times": [], "protocol": protocol}).endswith("No results.\n")


def test_align_markdown_reports_chance_and_the_honest_reading():
    from benchmarks import align

    rows, speed = [], []
    for test, shift in (("C2", 0.0), ("C3", 0.02)):
        base = {"test": test, "use_rep": "X_bitro", "loss": "clip", "seed": 0}
        for k in align.KS:
            for direction in ("image→expression", "expression→image"):
                rows.append({**base, "metric": "recall", "space": "aligned", "direction": direction, "k": k,
                             "value": 0.1 * k + shift, "chance": k / 100, "n_spots": 100})  # fmt: skip
        for space, v in (("knn_aligned", 0.10), ("knn_unaligned", 0.12), ("ridge", 0.11)):
            rows.append(
                {**base, "metric": "pcc_gene_norm", "space": space, "value": v + shift, "n_constant": 0}
            )
        for space, v in (("unaligned", 0.3), ("aligned", 0.1)):
            rows.append({**base, "metric": "silhouette_slide", "space": space, "value": v})
        speed.append({**base, "align_seconds": 2.0, "align_cpu_seconds": 2.0, "epochs": 20})
    protocol = {"sections": ["C2", "C3"], "n_genes": 785, "window_half_px": 1500, "align_kwargs": align.ALIGN_KW,
                "losses": ["clip"], "seeds": [0], "n_neighbors": 8}  # fmt: skip
    md = align.markdown({"rows": rows, "speed": speed, "protocol": protocol, "meta": {}})
    assert "align" in main.FULL_ONLY and "align" not in main.STANDARD
    assert "| X_bitro | clip | 0.110 (0.010) | 0.510 (0.050) |" in md  # recall (chance), mean of two folds
    assert "0.110 ± 0.014" in md and "0.130 ± 0.014" in md  # kNN aligned, unaligned
    assert "does **not** beat the unaligned baselines" in md
    assert align.markdown({"rows": [], "protocol": protocol}).endswith("No results.\n")


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


def test_features_markdown_compares_each_arm_with_crop_and_states_the_targets():
    from benchmarks import crop_vs_tile

    values = {"tile": 0.12, "tile + context": 0.17, "crop": 0.14, "crop + context": 0.19}
    rows = [
        {"test": t, "model": "bitro", "mode": m, "seed": seed, "metric": metric, "scale": scale,
         "value": v + 0.01 * i}
        for i, t in enumerate(["C2", "C3", "C4"])
        for m, v in values.items()
        for seed in (0, 1)
        for metric, scale in (("pcc_gene", "library_size"), ("pcc_gene_top50_var", "library_size"),
                              ("pcc_gene", "raw"))
    ]  # fmt: skip
    embedding = [
        {"section": t, "n_cells_in_spots": 100, "n_cells_section": 500, "n_spots": 10, "crop_seconds": 5.0,
         "crop_cpu_seconds": 5.0, "context_seconds": 0.25, "tile_seconds_all_cells": 1.0}
        for t in ("C2", "C3", "C4")
    ]  # fmt: skip
    res = {
        "meta": {"seeds": {"bitro": [0, 1]}},
        "protocol": {"sections": ["C2", "C3", "C4"], "cells": "in-spot cells only", "encoder": "e",
                     "context_um": 200.0, "folds": ["C2", "C3", "C4"], "same_cells": {"C2": True}},
        "rows": rows,
        "embedding": embedding,
    }  # fmt: skip
    md = crop_vs_tile.markdown(res)
    assert "| bitro | tile + context | 0.180 ± 0.010 |" in md
    assert "*tile*: 0.130 normalised PCC_gene, 0.87 × crop's 0.150 (higher than crop on 0 of 3" in md
    assert "it does **not** reach the issue's 0.95 × crop" in md
    assert (
        "*tile + context*: 0.180 normalised PCC_gene, 1.20 × crop's 0.150 (higher than crop on 3 of 3" in md
    )
    assert "tile + context embeds 400 cells/s on the in-spot cells against crop's 20 (20.0 ×" in md
    assert "on whole sections (every nucleus, dense tiles) tile (all cells" in md
    assert (
        "Best arm: *crop + context* at 0.200; one bitro model on the default features (*tile + context*) "
        "reaches 0.180: the issue's target of 0.18 normalised PCC_gene with the default features is met by "
        "one model." in md
    )


def test_components_reuse_matches_rows_by_effective_network_after_a_default_change(tmp_path, monkeypatch):
    """Old "neither GAT nor Transformer" rows become today's "default" when the default drops the trunk."""
    import benchmarks.accuracy as acc
    from benchmarks import components as comp

    now = acc.bitro_defaults()
    old_defaults = json.loads(json.dumps(now, default=str))
    old_defaults["network"] |= {"use_gat": True, "use_transformer": True}  # the defaults of the old run
    kw = {"max_epochs": 30}
    old = {
        "meta": {"quick": False, "git": {"commit": "abc"}},
        "protocol": {
            "fit_kwargs": kw,
            "bitro_defaults": old_defaults,
            "context_um": list(comp.PREPROCESS["context_um"]),
            "variants": {
                "default": {"config": {}, "options": {}},
                "neither GAT nor Transformer": {
                    "config": {"use_gat": False, "use_transformer": False},
                    "options": {},
                },
                "no GAT": {"config": {"use_gat": False}, "options": {}},  # = today's "+ Transformer"
            },
        },
        "rows": [
            {"variant": v, "test": "C2", "seed": 0, "metric": "pcc_gene", "scale": "raw", "value": i / 10}
            for i, v in enumerate(("default", "neither GAT nor Transformer", "no GAT"))
        ],
    }
    (tmp_path / "components.json").write_text(json.dumps(old, default=str))
    monkeypatch.setattr(comp, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(acc, "bitro_defaults", lambda: json.loads(json.dumps(now, default=str)))
    got = comp._reusable(kw)
    assert now["network"]["use_gat"] is False  # the premise: today's default has no trunk
    values = {k[0]: rows[0]["value"] for k, rows in got.items()}
    assert values == {"+ GAT and Transformer (paper trunk)": 0.0, "default": 0.1, "+ Transformer": 0.2}
    assert all(rows[0]["reused_from"] == "abc" for rows in got.values())
    assert comp._reusable({"max_epochs": 3}) == {}  # other training settings: nothing reused


def test_cells_reuse_keeps_only_variants_of_the_same_network(tmp_path, monkeypatch):
    from benchmarks import _common, cells

    p, mode = cells.FULL, "full"
    proto = {
        **p,
        "mode": mode,
        "network": cells.NETWORK,
        "fit": cells.FIT,
        "layouts": {k: {**v, "size": v["size"][mode]} for k, v in cells.LAYOUTS.items()},
        "variants": {
            "attention": {"config": {"head": "attention"}, "setup": {"loss": "mse"}},  # trunk implicit then
            "cell_counts + skip, mse": {
                "config": {"head": "cell_counts", "skip": False},
                "setup": {"loss": "mse"},
            },
        },
    }
    recs = [
        {"fold": 0, "seed": 0, "method": m, "kind": "bitro"} for m in ("attention", "cell_counts + skip, mse")
    ] + [{"fold": 0, "seed": None, "method": cells.ORACLE_EQUAL, "kind": "oracle"}]
    old = {"meta": {"git": {"commit": "abc"}}, "protocol": proto, "layouts": {"her2st": {"records": recs}}}
    (tmp_path / "cells.json").write_text(json.dumps(old))
    monkeypatch.setattr(_common, "RESULTS_DIR", tmp_path)
    got = cells._reusable("her2st", p, mode)
    # "attention" had the trunk implicitly and still names it; the second changed its skip: refitted
    assert list(got) == [(0, 0, "attention")] and got[(0, 0, "attention")]["reused_from"] == "abc"
    assert cells._reusable("her2st", {**p, "max_epochs": 1}, mode) == {}
    monkeypatch.setenv(cells.ENV_VARIANTS, "attention; nope")
    with pytest.raises(ValueError, match="unknown variant"):
        cells._to_fit()


def test_an_empty_result_never_replaces_a_stored_one(tmp_path):
    common.write_result("x", {"name": "x", "meta": {"a": 1}}, results_dir=tmp_path)
    with pytest.raises(ValueError, match="nothing measured"):
        common.write_result("x", {}, results_dir=tmp_path)
    assert json.loads((tmp_path / "x.json").read_text())["meta"] == {"a": 1}


def test_components_variant_names_can_be_chosen_by_name(monkeypatch):
    from benchmarks import components as comp

    assert not [v for v in comp.VARIANTS if "," in v]  # the environment list is comma-separated
    monkeypatch.setenv("BITRO_COMPONENTS_VARIANTS", "+ GAT, + skip")
    assert comp._plan(False)[2] == ["default", "+ skip", "+ GAT"]
    monkeypatch.setenv("BITRO_COMPONENTS_VARIANTS", "no such variant")
    with pytest.raises(ValueError, match="unknown variant"):
        comp._plan(False)


def test_cells_slides_are_generated_with_every_knob_of_their_layout(tmp_path, monkeypatch):
    """The layout's knobs key the slide cache, so each must reach the generator (composition_sd once did not)."""
    from benchmarks import cells

    import bitro as bt

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(cells, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(bt.datasets, "synthetic_tissue", fake)
    with pytest.raises(RuntimeError, match="stop after the call"):
        cells.load_slides("her2st", cells.QUICK, cells.LAYOUTS["her2st"]["size"]["quick"])
    knobs = {k: v for k, v in cells.LAYOUTS["her2st"].items() if k not in ("label", "size")}
    assert "composition_sd" in knobs
    assert {k: seen.get(k) for k in knobs} == knobs


def test_a_components_run_of_some_variants_keeps_the_other_rows(monkeypatch):
    """Running a subset (BITRO_COMPONENTS_VARIANTS / _SEEDS) once dropped every other variant's rows."""
    import benchmarks.accuracy as acc
    from benchmarks import components as comp

    def row(variant, test, seed, value):
        return {
            "variant": variant,
            "test": test,
            "seed": seed,
            "metric": "pcc_gene",
            "scale": "raw",
            "value": value,
        }

    stored = {
        ("default", "C2", 0): [{**row("default", "C2", 0, 0.1), "fit_seconds": 3.0}],
        ("default", "C3", 0): [row("default", "C3", 0, 0.2)],
        ("+ GAT", "C2", 0): [row("+ GAT", "C2", 0, 0.3)],  # a variant this run does not plan
        ("+ GAT", "C2", 1): [row("+ GAT", "C2", 1, 0.4)],  # and a seed it does not plan
    }
    monkeypatch.setattr(acc, "load_sections", lambda quick: {"C2": None, "C3": None})
    monkeypatch.setattr(acc, "kit_genes", lambda sections: ["A"])
    monkeypatch.setattr(comp, "_plan", lambda quick: ([0, 1], [0], ["default"]))
    monkeypatch.setattr(comp, "_reusable", lambda kw: stored)
    out = comp.run(False)  # every planned run is stored: nothing is fitted
    got = sorted((r["variant"], r["test"], r["seed"], r["value"]) for r in out["rows"])
    assert got == [
        ("+ GAT", "C2", 0, 0.3),
        ("+ GAT", "C2", 1, 0.4),
        ("default", "C2", 0, 0.1),
        ("default", "C3", 0, 0.2),
    ]
    assert list(out["protocol"]["variants"]) == ["default", "+ GAT"]
    assert out["protocol"]["seeds"] == [0, 1]
    assert out["times"] == [
        {"variant": "default", "test": "C2", "seed": 0, "fit_seconds": 3.0, "reused": True}
    ]


def test_ensemble_summary_pairs_the_ensemble_with_its_folds_seed_mean():
    from benchmarks import ensemble

    rows = []
    for test, singles, ens in (("C2", (0.10, 0.12), 0.13), ("C3", (0.20, 0.22), 0.20)):
        rows += [{"test": test, "model": f"seed {i}", "metric": "pcc_gene", "scale": "library_size", "value": v}
                 for i, v in enumerate(singles)]  # fmt: skip
        rows.append(
            {"test": test, "model": "ensemble", "metric": "pcc_gene", "scale": "library_size", "value": ens}
        )
    s = ensemble.summary(rows, "pcc_gene", "library_size")
    assert s["single"] == pytest.approx(0.16) and s["ensemble"] == pytest.approx(0.165)
    assert s["gain"] == pytest.approx(0.005) and s["wins"] == 1 and s["n"] == 2
    assert s["per_fold"]["C3"] == pytest.approx((0.21, 0.20))
