"""The ``bitro`` command line, run in-process through ``bitro.cli.main`` on tiny zarr stores."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import bitro
from bitro import _cli_commands as C
from bitro.cli import main


def _load_toy_module():
    """``tests/tl/_toy.py`` (toy slides with a known answer), imported under its own name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bitro_tl_toy", Path(__file__).parent / "tl" / "_toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_toy = _load_toy_module()
SMALL, make_toy_slide = _toy.SMALL, _toy.make_toy_slide

TINY = ["--epochs", "1", "--n-components", "8", "--n-phenotypes", "3", "--device", "cpu", "--seed", "0"]
TINY += ["--config", json.dumps({k: v for k, v in SMALL.items() if k != "dropout"})]
GENES = [f"G{i}" for i in range(8)]


def _write(sdata, path: Path) -> Path:
    sdata.write(path)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    """Three toy slides as zarr stores and a bitro model trained on two of them by ``bitro fit``."""
    root = tmp_path_factory.mktemp("cli")
    paths = {f"s{i}": _write(make_toy_slide(i), root / f"s{i}.zarr") for i in range(3)}
    genes = root / "genes.txt"
    genes.write_text("# genes to predict\n" + "\n".join(GENES) + "\n\n")
    model = root / "model"
    code = main(
        ["fit", str(paths["s0"]), str(paths["s1"]), "--out", str(model), "--genes", str(genes), *TINY]
    )
    assert code == 0
    return {**paths, "model": model, "root": root}


def test_fit_saves_a_loadable_model_with_the_requested_genes(toy):
    config = json.loads((toy["model"] / "config.json").read_text())
    assert config["state"]["genes"] == GENES
    assert config["state"]["net_config"]["hidden_dim"] == 16
    from bitro.tl import BiTroModel

    model = BiTroModel.load(toy["model"])
    assert model.phenotypes.n_clusters == 3
    assert model.projection.n_components == 8


def test_predict_writes_a_new_store_and_leaves_the_input_alone(toy, capsys):
    out = toy["root"] / "pred.zarr"
    assert main(["predict", str(toy["model"]), str(toy["s2"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    pred = sd.read_zarr(out)
    spots, cells = pred.tables["spots"], pred.tables["cells"]
    layer = spots.layers["bitro"]
    cols = spots.var_names.get_indexer(GENES)
    assert np.isfinite(layer[:, cols]).all()  # every toy spot holds cells
    assert np.isnan(np.delete(layer, cols, axis=1)).all()  # genes the model lacks
    assert "bitro" in cells.layers and "X_bitro_expr" in cells.obsm
    assert "bitro" not in sd.read_zarr(toy["s2"]).tables["spots"].layers

    # an existing output is never replaced without --overwrite
    marker = out / "keep.txt"
    marker.write_text("x")
    assert main(["predict", str(toy["model"]), str(toy["s2"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "--overwrite" in err
    assert marker.exists()
    # nor with --overwrite while it holds a file bitro did not write
    assert main(["predict", str(toy["model"]), str(toy["s2"]), "--out", str(out), "--overwrite"]) == 2
    assert "keep.txt" in capsys.readouterr().err and marker.exists()
    marker.unlink()
    assert main(["predict", str(toy["model"]), str(toy["s2"]), "--out", str(out), "--overwrite"]) == 0
    assert "bitro" in sd.read_zarr(out).tables["spots"].layers
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_predict_inplace_updates_only_the_tables(toy, tmp_path, capsys):
    data = _write(make_toy_slide(5), tmp_path / "slide.zarr")
    assert main(["predict", str(toy["model"]), str(data), "--inplace", "--key-added", "pred"]) == 0
    first = sd.read_zarr(data)
    assert "pred" in first.tables["spots"].layers and "pred" in first.tables["cells"].layers
    assert "counts" in first.tables["spots"].layers and "spots_shapes" in first.shapes
    values = first.tables["spots"].layers["pred"].copy()
    capsys.readouterr()
    assert main(["predict", str(toy["model"]), str(data), "--inplace", "--key-added", "pred"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["predict", str(toy["model"]), str(data), "--inplace", "--key-added", "pred", "--overwrite"])
        == 0
    )
    again = sd.read_zarr(data).tables["spots"].layers["pred"]
    np.testing.assert_allclose(again, values, rtol=1e-5)  # same model, same input, same answer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.zarr"]  # no backups left behind


def test_evaluate_perfect_prediction_scores_one(tmp_path, capsys):
    sdata = make_toy_slide(1)
    spots = sdata.tables["spots"]
    spots.layers["perfect"] = np.log1p(spots.layers["counts"].toarray()).astype(np.float32)
    data = _write(sdata, tmp_path / "s.zarr")
    csv = tmp_path / "metrics.csv"
    assert main(["evaluate", str(data), "--layer", "perfect", "--out", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "pcc_gene" in printed and "library_size" in printed
    metrics = pd.read_csv(csv)
    pcc = metrics[metrics.metric == "pcc_gene"].set_index("scale")["value"]
    assert set(pcc.index) == {"raw", "library_size"}
    assert pcc["raw"] == pytest.approx(1.0, abs=1e-6)
    assert metrics[(metrics.metric == "mse") & (metrics.scale == "raw")]["value"].item() == pytest.approx(0.0)
    assert main(["evaluate", str(data), "--layer", "perfect", "--out", str(csv)]) == 2  # no silent overwrite
    assert "bitro_pcc_raw" not in sd.read_zarr(data).tables["spots"].var  # inplace=False


def test_evaluate_of_a_trained_model(toy, tmp_path, capsys):
    out = tmp_path / "p.zarr"
    assert main(["predict", str(toy["model"]), str(toy["s2"]), "--out", str(out)]) == 0
    csv = tmp_path / "m.csv"
    assert main(["evaluate", str(out), "--normalize", "raw", "--out", str(csv)]) == 0
    metrics = pd.read_csv(csv)
    row = metrics[metrics.metric == "pcc_gene"]
    assert list(row.scale) == ["raw"] and row.n_genes.item() == len(GENES)
    assert -1.0 <= row.value.item() <= 1.0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--layer", "nope"]) == 2
    err = capsys.readouterr().err
    assert "layer 'nope' not found" in err and "Traceback" not in err


def test_transfer_spot_model_to_bulk_with_lora(toy, tmp_path):
    bulk = [_write(make_toy_slide(s, with_bulk=True), tmp_path / f"b{s}.zarr") for s in range(3)]
    out = tmp_path / "bulk_model"
    args = ["transfer", str(toy["model"]), *map(str, bulk), "--level", "bulk", "--method", "lora"]
    assert main([*args, "--out", str(out), "--epochs", "1", "--device", "cpu", "--rank", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["state"]["level"] == "bulk" and config["state"]["genes"] == GENES
    assert config["state"]["lora"]["rank"] == 2


def test_fit_errors_are_clear(toy, tmp_path, capsys):
    s0 = str(toy["s0"])
    out = tmp_path / "m"
    assert main(["fit", s0, "--out", str(out), "--model", "ridge"]) == 2
    assert "only --model bitro can be saved" in capsys.readouterr().err
    assert not out.exists()
    assert main(["fit", s0, "--out", str(out), "--model", "resnet"]) == 2
    assert "invalid choice: 'resnet'" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "missing.zarr"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ") and "missing.zarr" in err and "not found" in err and "Traceback" not in err
    )
    assert main(["fit", s0, "--out", str(toy["model"])]) == 2  # existing model folder
    assert "already exists" in capsys.readouterr().err
    assert main(["fit", s0, "--out", str(out), "--config", "{not json"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), s0, "--out", str(tmp_path / "x.zarr")]) == 2
    assert "is not a bitro model folder" in capsys.readouterr().err
    assert main(["predict", str(toy["model"]), s0]) == 2  # --out or --inplace is required
    assert "one of the arguments --out --inplace is required" in capsys.readouterr().err


def test_read_genes_txt_npy_and_duplicates(tmp_path):
    txt = tmp_path / "g.txt"
    txt.write_text("A  # first\n\nB\n# comment\nC\n")
    assert C.read_genes(txt) == ["A", "B", "C"]
    npy = tmp_path / "g.npy"
    np.save(npy, np.array(["X", "Y"]))
    assert C.read_genes(npy) == ["X", "Y"]
    txt.write_text("A\nB\nA\n")
    with pytest.raises(ValueError, match="repeats genes"):
        C.read_genes(txt)
    np.save(npy, np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="object arrays are not read"):
        C.read_genes(npy)
    with pytest.raises(FileNotFoundError):
        C.read_genes(tmp_path / "none.txt")


def test_parse_config_inline_and_file(tmp_path):
    assert C.parse_config('{"hidden_dim": 8}') == {"hidden_dim": 8}
    f = tmp_path / "c.json"
    f.write_text('{"ffn_dim": 4}')
    assert C.parse_config(str(f)) == {"ffn_dim": 4}
    with pytest.raises(ValueError, match="must be a JSON object"):
        f.write_text("[1, 2]")
        C.parse_config(str(f))


def test_replace_path_keeps_the_old_output_when_writing_fails(tmp_path):
    target = tmp_path / "out.zarr"
    target.mkdir()
    (target / "zarr.json").write_text("old")

    def broken(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        C.replace_path(broken, target, overwrite=True, kind="zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    assert (target / "zarr.json").read_text() == "old"
    C.replace_path(lambda tmp: tmp.mkdir(), target, overwrite=True, kind="zarr")
    assert target.is_dir() and not any(target.iterdir())


def test_fit_n_models_saves_an_ensemble_that_predict_and_transfer_read(toy, tmp_path, capsys):
    ens = tmp_path / "ens"
    assert main(["fit", str(toy["s0"]), str(toy["s1"]), "--out", str(ens), "--n-models", "2", *TINY]) == 0
    manifest = json.loads((ens / "ensemble.json").read_text())
    assert [m["seed"] for m in manifest["members"]] == [0, 1]
    out = tmp_path / "pred.zarr"
    assert main(["predict", str(ens), str(toy["s2"]), "--out", str(out)]) == 0
    spots = sd.read_zarr(out).tables["spots"]
    assert spots.uns["bitro"]["ensemble"]["n_models"] == 2
    assert np.isfinite(spots.layers["bitro"][:, spots.var_names.get_indexer(GENES)]).all()
    # --overwrite replaces the ensemble bitro wrote (an ensemble folder is not a single model's)
    assert (
        main(
            [
                "fit",
                str(toy["s0"]),
                str(toy["s1"]),
                "--out",
                str(ens),
                "--n-models",
                "2",
                "--overwrite",
                *TINY,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["fit", str(toy["s0"]), "--out", str(ens), "--n-models", "0", *TINY]) == 2
    assert "--n-models" in capsys.readouterr().err


def test_overwrite_never_deletes_a_folder_bitro_did_not_write(toy, tmp_path, capsys):
    """``--overwrite`` replaces bitro's own model folder / metrics CSV, never the user's files."""
    s0 = str(toy["s0"])
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.docx").write_text("three years of work")
    (mine / "config.json").write_text("{}")
    assert main(["fit", s0, "--out", str(mine), "--overwrite", *TINY]) == 2
    err = capsys.readouterr().err
    assert "not a model folder written by bitro" in err and "thesis.docx" in err
    assert (mine / "thesis.docx").read_text() == "three years of work"

    # a model folder bitro wrote is replaced
    model = tmp_path / "model"
    assert main(["fit", s0, "--out", str(model), *TINY]) == 0
    before = (model / "model.safetensors").stat().st_mtime_ns
    assert main(["fit", s0, "--out", str(model), "--overwrite", *TINY[:-2], "--seed", "1", *TINY[-2:]]) == 0
    assert (model / "model.safetensors").stat().st_mtime_ns != before
    # ... but not once the user has put a file of their own into it
    (model / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["fit", s0, "--out", str(model), "--overwrite", *TINY]) == 2
    assert "notes.txt" in capsys.readouterr().err and (model / "notes.txt").exists()

    # evaluate --out DIR --overwrite: a folder is never replaced by a CSV
    pred = tmp_path / "p.zarr"
    assert main(["predict", str(toy["model"]), str(toy["s2"]), "--out", str(pred)]) == 0
    assert main(["evaluate", str(pred), "--out", str(mine), "--overwrite"]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err and (mine / "thesis.docx").exists()
    other = tmp_path / "other.csv"
    other.write_text("sample,age\nA,3\n")
    assert main(["evaluate", str(pred), "--out", str(other), "--overwrite"]) == 2
    assert "header" in capsys.readouterr().err and other.read_text() == "sample,age\nA,3\n"
    csv = tmp_path / "m.csv"
    assert main(["evaluate", str(pred), "--out", str(csv)]) == 0
    assert main(["evaluate", str(pred), "--out", str(csv), "--overwrite"]) == 0  # its own CSV
    assert pd.read_csv(csv).columns[0] == "metric"


def test_preprocess_refuses_a_sample_id_that_leaves_the_scratch_folder(synthetic_zarr, tmp_path, capsys):
    scratch = tmp_path / "a" / "b" / "scratch"
    args = ["preprocess", str(synthetic_zarr), "--reader", "zarr", "--encoder", "morphology"]
    for bad in ("../../x", "..", ".hidden", "a/b"):
        code = main(
            [*args, "--sample-id", bad, "--scratch-dir", str(scratch), "--out", str(tmp_path / "o.zarr")]
        )
        assert code == 2
        assert "cannot be used as a file name" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "o.zarr").exists()


@pytest.fixture(scope="module")
def synthetic_zarr(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("syn") / "syn.zarr"
    bitro.datasets.synthetic_tissue(1, size=600, technology="visium", seed=0).write(path)
    return path


def test_preprocess_a_synthetic_slide(synthetic_zarr, tmp_path, capsys):
    out = tmp_path / "pp.zarr"
    args = ["preprocess", str(synthetic_zarr), "--reader", "zarr", "--encoder", "morphology"]
    assert main([*args, "--stain", "macenko", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    sdata = sd.read_zarr(out)
    assert {"he", "he_normalized"} <= set(sdata.images) and "tissue" in sdata.labels
    cells = sdata.tables["cells"]
    truth = sdata.tables["cells_truth"].n_obs
    assert 0.5 * truth < cells.n_obs < 1.5 * truth  # segmentation finds about the true number of nuclei
    assert cells.obsm["X_bitro"].shape[0] == cells.n_obs and np.isfinite(cells.obsm["X_bitro"]).all()
    assigned = cells.obs["spot_id"].dropna()
    assert len(assigned) > 0 and set(assigned) <= set(sdata.tables["spots"].obs_names)
    assert "cells_shapes" in sdata.shapes

    assert main([*args, "--out", str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_preprocess_st_reader_with_files_in_a_folder(synthetic_zarr, tmp_path, capsys):
    """Legacy-ST input (counts/spots tables + image, names relative to the INPUT folder)."""
    from PIL import Image

    src = sd.read_zarr(synthetic_zarr)
    folder = tmp_path / "section"
    folder.mkdir()
    Image.fromarray(np.asarray(src.images["he"]).transpose(1, 2, 0)).save(folder / "he.png")
    spots = src.tables["spots"]
    ids = [f"{i}x1" for i in range(spots.n_obs)]
    counts = spots.layers["counts"]
    counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    pd.DataFrame(counts, index=ids, columns=spots.var_names).to_csv(folder / "counts.tsv", sep="\t")
    xy = spots.obsm["spatial"]
    table = {"x": np.arange(spots.n_obs), "y": 1, "pixel_x": xy[:, 0], "pixel_y": xy[:, 1], "selected": 1}
    pd.DataFrame(table).to_csv(folder / "spots.tsv", sep="\t", index=False)
    out = tmp_path / "st.zarr"
    args = ["preprocess", str(folder), "--reader", "st", "--counts", "counts.tsv", "--spots", "spots.tsv"]
    args += ["--image", "he.png", "--mpp", "0.5", "--sample-id", "A1", "--encoder", "morphology"]
    assert main([*args, "--stain", "none", "--out", str(out)]) == 0
    sdata = sd.read_zarr(out)
    assert sdata.attrs["bitro_scale"]["mpp"] == 0.5 and sdata.attrs["bitro_scale"]["sample_id"] == "A1"
    assert sdata.tables["spots"].n_obs == spots.n_obs
    assert sdata.tables["cells"].obs["spot_id"].notna().sum() > 0
    assert "he_normalized" not in sdata.images  # --stain none
    capsys.readouterr()
    assert main(["preprocess", str(folder), "--reader", "st", "--out", str(tmp_path / "o.zarr")]) == 2
    assert "needs spots= (--spots)" in capsys.readouterr().err


def test_preprocess_cohort_skips_done_slides_and_reports_failures(synthetic_zarr, tmp_path, capsys):
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("corrupt")
    folder = tmp_path / "cohort"
    args = ["preprocess", str(synthetic_zarr), str(bad), "--cohort", "--out", str(folder)]
    args += ["--reader", "zarr", "--encoder", "morphology", "--stain", "none", "--patches"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "1 of 2 slides failed: bad (" in captured.err
    assert "cohort: 1 written, 0 skipped, 1 failed" in captured.out
    # nothing half-written for "bad"; manifest.json records both slides (bt.pp.run_pipeline)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "syn.zarr"]
    status = {k: v["status"] for k, v in json.loads((folder / "manifest.json").read_text())["slides"].items()}
    assert status == {"syn": "done", "bad": "failed"}
    done = sd.read_zarr(folder / "syn.zarr")
    assert "patches" in done.tables and "patch_id" in done.tables["cells"].obs

    # fix the bad slide and resume: the finished slide is skipped, the other one is processed
    stamp = (folder / "syn.zarr" / "zarr.json").stat().st_mtime_ns
    import shutil

    shutil.rmtree(bad)
    shutil.copytree(synthetic_zarr, bad)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped syn" in out and "cohort: 1 written, 1 skipped, 0 failed" in out
    assert (folder / "syn.zarr" / "zarr.json").stat().st_mtime_ns == stamp
    assert "X_bitro" in sd.read_zarr(folder / "bad.zarr").tables["cells"].obsm


def test_preprocess_scratch_dir_reaches_the_steps(synthetic_zarr, tmp_path, capsys, monkeypatch):
    seen = []
    for name in ("segment_cells", "embed_cells"):
        real = getattr(bitro.pp, name)

        def spy(sdata, *, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs.get("scratch_dir"), kwargs.get("keep_scratch")))
            return _real(sdata, **kwargs)

        monkeypatch.setattr(bitro.pp, name, spy)
    scratch = tmp_path / "scratch"
    args = ["preprocess", str(synthetic_zarr), "--reader", "zarr", "--encoder", "morphology"]
    args += ["--stain", "none", "--patches", "--scratch-dir", str(scratch)]
    assert main([*args, "--out", str(tmp_path / "one.zarr")]) == 0
    slide = scratch.resolve() / "syn"
    assert seen == [("segment_cells", slide / "segment", True), ("embed_cells", slide / "embed", True)]
    assert list(scratch.iterdir()) == []  # removed once the slide is written
    assert "X_bitro" in sd.read_zarr(tmp_path / "one.zarr").tables["cells"].obsm

    seen.clear()
    assert main([*args, "--cohort", "--out", str(tmp_path / "cohort")]) == 0
    assert [s[1] for s in seen] == [slide / "segment", slide / "embed"]
    assert list(scratch.iterdir()) == []

    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    bad = [*args[:-1], str(tmp_path / "a_file"), "--out", str(tmp_path / "two.zarr")]
    assert main(bad) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_preprocess_argument_errors(synthetic_zarr, tmp_path, capsys):
    two = [str(synthetic_zarr), str(synthetic_zarr)]
    assert main(["preprocess", *two, "--out", str(tmp_path / "o.zarr")]) == 2
    assert "pass --cohort" in capsys.readouterr().err
    (tmp_path / "not_a_folder").write_text("")
    assert main(["preprocess", str(synthetic_zarr), "--cohort", "--out", str(tmp_path / "not_a_folder")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path / "nothing.svs"), "--out", str(tmp_path / "o.zarr")]) == 2
    assert "not found" in capsys.readouterr().err
    odd = tmp_path / "slide.xyz"
    odd.write_text("")
    assert main(["preprocess", str(odd), "--out", str(tmp_path / "o.zarr")]) == 2
    assert "pass --reader" in capsys.readouterr().err
    assert main(["preprocess", str(odd), "--reader", "hest", "--out", str(tmp_path / "o.zarr")]) == 2
    assert "--sample-id" in capsys.readouterr().err


def test_demo_subcommand_is_wired(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["demo", "--out", str(out)]) == 2  # refuses a non-empty folder before any work
    assert "not empty" in capsys.readouterr().err


def test_verbose_after_the_subcommand_and_version(capsys):
    from bitro.cli import _build_parser

    assert _build_parser().parse_args(["evaluate", "x.zarr", "-vv"]).verbose == 2
    assert _build_parser().parse_args(["-v", "evaluate", "x.zarr"]).verbose == 1
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bitro {bitro.__version__}"
    assert main([]) == 2  # a sub-command is required


def test_installed_entry_point_version():
    exe = Path(sys.executable).parent / "bitro"
    if not exe.exists():
        pytest.skip("the bitro console script is not installed in this environment")
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert done.stdout.strip() == f"bitro {bitro.__version__}"


def test_training_options_are_checked_before_any_work(toy, tmp_path, capsys):
    s0, out = str(toy["s0"]), str(tmp_path / "m")
    for args, text in (
        (["--batch-size", "0"], "--batch-size must be an integer ≥ 1, got 0"),
        (["--validation-fraction", "1.5"], "--validation-fraction must be a number in [0, 1)"),
        (["--config", '{"hiden_dim": 8}'], "Unknown BiTroConfig field(s) ['hiden_dim']"),
        (["--context-um", "-3"], "--context-um must be a number"),
    ):
        assert main(["fit", s0, "--out", out, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and text in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    # every SetupConfig / TrainConfig field is an option of `bitro fit`, with its default in the help
    from bitro.tl import SetupConfig, TrainConfig

    assert main(["fit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls in (SetupConfig, TrainConfig):
        for name in cls.names():
            if name != "device":
                assert f"--{name.replace('_', '-')}" in text, name
    assert "--lr LR Adam learning rate (default: 0.001)" in text


def test_a_missing_input_fails_before_the_heavy_imports():
    code = (
        "import sys; from bitro.cli import main; "
        "rc = main(['predict', '/nonexistent/model', '/nonexistent/x.zarr', '--out', 'y.zarr']); "
        "print(rc, 'torch' in sys.modules, 'spatialdata' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "False", "False"]
    assert "MODEL_DIR '/nonexistent/model' not found" in done.stderr


def test_preprocess_checks_names_and_the_out_folder_before_any_work(
    synthetic_zarr, tmp_path, capsys, monkeypatch
):
    import errno

    from bitro.pp import _scratch

    reads = []
    real = C.read_sdata
    monkeypatch.setattr(C, "read_sdata", lambda p: reads.append(p) or real(p))
    args = ["preprocess", str(synthetic_zarr), "--reader", "zarr", "--out", str(tmp_path / "o" / "pp.zarr")]
    cases = [
        (["--segment", "cellpose2"], "Unknown segmentation method 'cellpose2'"),
        (["--encoder", "resnet9000"], "Unknown encoder 'resnet9000'"),
        (["--encoder", str(tmp_path / "weights.pt")], "Encoder checkpoint '.*weights.pt' does not exist"),
    ]
    for extra, match in cases:
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
        assert re.search(match, err), err

    def denied(path, data):  # tests may run as root, where chmod does not deny
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(_scratch, "_write_bytes", denied)
    assert main([*args, "--encoder", "morphology"]) == 2
    assert "Cannot write to the folder of --out" in capsys.readouterr().err
    assert reads == []  # every refusal came before the slide was read


def test_preprocess_a_plain_png_needs_mpp_and_then_runs(synthetic_zarr, tmp_path, capsys):
    from PIL import Image

    he = np.asarray(sd.read_zarr(synthetic_zarr).images["he"]).transpose(1, 2, 0)
    Image.fromarray(he).save(tmp_path / "he.png")
    args = ["preprocess", str(tmp_path / "he.png"), "--out", str(tmp_path / "he.zarr")]
    args += ["--encoder", "morphology", "--stain", "none", "--patches"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "plain PNG image" in err and "--mpp" in err and "corrupt" not in err
    assert main([*args, "--mpp", "0.5"]) == 0
    sdata = bitro.io.read_zarr(tmp_path / "he.zarr")  # written with its integrity record
    assert sdata.tables["cells"].n_obs > 0 and "patches" in sdata.tables
    np.testing.assert_array_equal(np.asarray(sdata.images["he"]).transpose(1, 2, 0), he)


def test_predict_inplace_keeps_the_integrity_record_true(toy, tmp_path, capsys):
    data = bitro.io.write_zarr(make_toy_slide(6), tmp_path / "slide.zarr")
    assert main(["predict", str(toy["model"]), str(data), "--inplace", "--key-added", "pred"]) == 0
    assert "pred" in bitro.io.read_zarr(data).tables["spots"].layers  # verified: the record was updated
    layer = data / "tables" / "spots" / "layers" / "pred"
    next(p for p in sorted(layer.rglob("*")) if p.is_file() and p.name != "zarr.json").unlink()
    capsys.readouterr()
    assert main(["predict", str(toy["model"]), str(data), "--out", str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tables/spots/layers/pred" in err and "is missing" in err


def test_every_option_of_every_command_has_help_and_states_its_default():
    import argparse

    from bitro.cli import _build_parser

    parser = _build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if not action.help:
                missing.append(f"{name} {action.dest}: no help")
            elif (
                action.option_strings
                and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in action.help
            ):
                missing.append(
                    f"{name} {'/'.join(action.option_strings)}: default {action.default!r} not stated"
                )
    assert not missing, missing


def reference_text() -> str:
    """The ``--help`` of ``bitro`` and of each command at 80 columns: docs/cli.md's reference block."""
    import contextlib
    import io
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    parts = []
    try:
        for cmd in ("", "preprocess", "fit", "predict", "evaluate", "transfer", "demo"):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
                main([cmd, "--help"] if cmd else ["--help"])
            parts.append(f"=== {cmd}\n{buf.getvalue().rstrip()}")
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def test_the_cli_reference_in_the_docs_is_the_current_help():
    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    block = text.split("## Reference", 1)[1].split("```text\n", 1)[1].split("\n```", 1)[0]
    assert block == reference_text(), (
        "docs/cli.md's reference block differs from `bitro --help`; replace it with the output of "
        "`python -c 'import sys; sys.path.insert(0, \"tests\"); from test_cli import reference_text; "
        "print(reference_text())'`"
    )
