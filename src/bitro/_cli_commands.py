"""The work behind each ``bitro`` sub-command (imported only when a command runs).

Every ``cmd_*`` function takes the parsed :class:`argparse.Namespace` and returns an exit code.
User errors are raised as :class:`FileNotFoundError`, :class:`FileExistsError`, :class:`KeyError` or
:class:`ValueError` with a message that names the fix; :func:`bitro.cli.main` turns them into
``error: <message>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitro import _keys as K
from bitro._files import OutputKind, check_replaceable, write_replacing
from bitro._files import remove_path as _remove
from bitro._logging import logger
from bitro.io._read import guess_reader as _guess_reader
from bitro.io._read import read_sdata
from bitro.io._zarr import INTEGRITY_FILE, update_integrity, write_store
from bitro.tl._metrics import COLUMNS as METRIC_COLUMNS

#: First line of the metrics CSV that ``bitro evaluate --out`` writes (and may replace).
METRICS_HEADER = ",".join(METRIC_COLUMNS)


# ---------------------------------------------------------------------------------------- helpers
def out(text: str) -> None:
    """Write one line of command output to stdout (results; diagnostics go to the logger)."""
    sys.stdout.write(f"{text}\n")


def check_output(path: str | Path, *, overwrite: bool, kind: OutputKind, header: str | None = None) -> Path:
    """Refuse an existing output path unless ``--overwrite`` and it is bitro's own output of ``kind``.

    See :func:`bitro._files.check_replaceable`: a folder of the user's files is never replaced.
    """
    return check_replaceable(path, kind=kind, overwrite=overwrite, flag="--overwrite", header=header)


def replace_path(
    write: Callable[[Path], Any],
    path: str | Path,
    *,
    overwrite: bool,
    kind: OutputKind,
    header: str | None = None,
) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then move the result into place.

    An interrupted or failed write never leaves a half-written ``path`` (so a resumed cohort run
    does not mistake it for finished work), and an existing ``path`` (``overwrite=True``, and only if
    it is bitro's own output of ``kind``) is only removed once the new one is complete, so it may even
    be the store the data were read from.
    """
    return write_replacing(write, path, kind=kind, overwrite=overwrite, flag="--overwrite", header=header)


def write_sdata(sdata: Any, path: str | Path, *, overwrite: bool) -> Path:
    """Write a SpatialData object to a new zarr store ``path`` with its integrity record.

    Atomic, see :func:`replace_path`; the record is :func:`bitro.io.write_zarr`'s.
    """
    return replace_path(lambda tmp: write_store(sdata, tmp), path, overwrite=overwrite, kind="zarr")


def rewrite_tables(sdata: Any, names: list[str]) -> None:
    """Replace tables ``names`` in the zarr store ``sdata`` was read from, one at a time.

    The store's integrity record (:func:`bitro.io.write_zarr`) is updated for the rewritten tables.
    spatialdata refuses to overwrite an element inside the store backing the object, so each old
    table folder is first moved aside (next to the store), the table is written afresh, and the old
    folder is deleted only after the write succeeded (restored if it failed).
    """
    if sdata.path is None:
        msg = "the data are not backed by a zarr store; use --out instead of --inplace."
        raise ValueError(msg)
    store = Path(sdata.path)
    for name in names:
        folder = store / "tables" / name
        backup = store.parent / f".{store.name}.{name}.bak-{uuid.uuid4().hex[:8]}"
        if folder.exists():
            folder.rename(backup)
        try:
            with warnings.catch_warnings():  # zarr notes that bitro's record file is not a zarr node
                warnings.filterwarnings("ignore", message=f".*{INTEGRITY_FILE}.*not recognized")
                sdata.write_element(name)
        except BaseException:
            if backup.exists():
                _remove(folder)
                backup.rename(folder)
                if sdata.has_consolidated_metadata():
                    sdata.write_consolidated_metadata()
            raise
        if backup.exists():
            _remove(backup)
    update_integrity(store, [f"tables/{name}" for name in names])


def read_genes(path: str | Path | None) -> list[str] | None:
    """Read a gene list: ``.npy`` (1-D array of names) or text (one gene per line, ``#`` comments)."""
    if path is None:
        return None
    import numpy as np

    path = Path(path)
    if not path.is_file():
        msg = f"gene list {str(path)!r} not found; give a .txt file (one gene per line) or a .npy array."
        raise FileNotFoundError(msg)
    if path.suffix == ".npy":
        try:
            genes = [str(g) for g in np.load(path, allow_pickle=False).ravel()]
        except ValueError as err:
            msg = f"{str(path)!r} is not a .npy array of strings (object arrays are not read): {err}"
            raise ValueError(msg) from err
    else:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        genes = [g for g in lines if g]
    if not genes:
        msg = f"gene list {str(path)!r} is empty."
        raise ValueError(msg)
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        msg = f"gene list {str(path)!r} repeats genes {dup[:5]}; list each gene once."
        raise ValueError(msg)
    return genes


def parse_config(text: str | None) -> dict[str, Any] | None:
    """``--config``: a JSON object given inline or as the path of a ``.json`` file."""
    if text is None:
        return None
    source = "--config"
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            msg = f"--config {text!r} is neither a JSON object nor an existing JSON file."
            raise FileNotFoundError(msg)
        text, source = path.read_text(), str(path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        msg = f"{source} is not valid JSON ({err}); e.g. --config '{{\"hidden_dim\": 64}}'."
        raise ValueError(msg) from err
    if not isinstance(config, dict):
        msg = f"{source} must be a JSON object of BiTroConfig fields, got {type(config).__name__}."
        raise ValueError(msg)
    return config


def check_device(device: str) -> str:
    """Fail early (as a user error) when the requested device is not available."""
    from bitro._settings import resolve_device

    try:
        resolve_device(device)
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    return device


def _table_name(sdata: Any, name: str) -> str:
    from bitro._validate import check_key

    return check_key(name, sdata.tables.keys(), what="table")


# ------------------------------------------------------------------------------------ preprocess
@dataclass
class Job:
    """One slide of ``bitro preprocess``: a name (output file stem) and how to read it."""

    name: str
    read: Callable[[], Any]


def guess_reader(path: Path) -> str:
    """Pick a reader from the input path (``--reader`` overrides)."""
    return _guess_reader(path, option="--reader ")


def _read_bulk(path: str | None) -> Any:
    if path is None:
        return None
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        msg = f"--bulk {path!r} not found; give a CSV/TSV of gene → TPM (genes in the first column)."
        raise FileNotFoundError(msg)
    table = pd.read_csv(p, sep="\t" if p.suffix in (".tsv", ".txt") else ",", index_col=0)
    if table.shape[1] != 1:
        msg = f"--bulk {path!r} must have one value column (gene → TPM), found {table.shape[1]}."
        raise ValueError(msg)
    return table.iloc[:, 0]


def make_jobs(args: argparse.Namespace) -> list[Job]:
    """Turn the inputs and reader options into one :class:`Job` per slide (readers: ``bitro.io._read``)."""
    from bitro.io._read import get_reader, read_path

    paths = [Path(p) for p in args.inputs]
    if not args.cohort and len(paths) > 1:
        msg = f"{len(paths)} inputs given; pass --cohort (with --out a folder) to process several slides."
        raise ValueError(msg)
    for p in paths:
        if not p.exists():
            msg = f"input {str(p)!r} not found."
            raise FileNotFoundError(msg)
    reader = get_reader(args.reader or guess_reader(paths[0]))
    ids = list(args.sample_id or [])
    options = {
        "mpp": args.mpp,
        "image": args.image,
        "counts": args.counts,
        "spots": args.spots,
        "bulk": _read_bulk(args.bulk) if args.bulk is not None else None,
        "cells": (args.segment == "none") if "cells" in reader.options else None,
    }
    if "sample_id" in reader.needs:  # one input, one slide per --sample-id (HEST)
        if len(paths) != 1 or not ids:
            msg = (
                f"--reader {reader.name} takes one INPUT and --sample-id (repeat it with --cohort); "
                f"{reader.description}."
            )
            raise ValueError(msg)
        root = paths[0]
        jobs = [Job(i, lambda i=i: read_path(root, reader=reader.name, sample_id=i, **options)) for i in ids]
    else:
        if len(ids) > 1 or (ids and len(paths) > 1):
            msg = "--sample-id names a single slide; omit it with --cohort (slides are named after their files)."
            raise ValueError(msg)
        sid = ids[0] if ids else None
        jobs = [
            Job(
                sid or (p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.stem),
                lambda p=p: read_path(p, reader=reader.name, sample_id=sid, **options),
            )
            for p in paths
        ]
    from bitro.pp._pipeline import check_slide_name

    names = [check_slide_name(j.name) for j in jobs]  # names become output and scratch folder names
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        msg = f"several inputs would be written as {dup}; give inputs with distinct names."
        raise ValueError(msg)
    return jobs


def _require_cells(sdata: Any) -> None:
    """``--segment none``: the input must bring its own cells table."""
    _table_name(sdata, K.CELLS)


def _require_spots(sdata: Any) -> None:
    """``--assign``: the slide must have spots."""
    _table_name(sdata, K.SPOTS)


def pipeline_options(args: argparse.Namespace) -> Any:
    """The :func:`bitro.pp.run_pipeline` steps and options that ``bitro preprocess`` asks for."""
    from bitro.pp._encoders import check_encoder_name
    from bitro.pp._pipeline import pipeline_options as options
    from bitro.pp._segmenters import get_segmenter

    # a misspelt name or a missing checkpoint fails here, not after the slide was read and normalised
    check_encoder_name(args.encoder)
    if args.segment != "none":
        get_segmenter(args.segment)
    steps: list[Any] = [] if args.stain == "none" else ["normalize_stains"]
    steps += ["detect_tissue", _require_cells if args.segment == "none" else "segment_cells", "embed_cells"]
    steps += {"assign": [_require_spots, "assign_cells"], "patches": ["make_patches"], None: ["bags"]}[
        args.bags
    ]
    return options(
        steps,
        stain_method=args.stain,
        segment_method=args.segment,
        encoder=args.encoder,
        mode=args.mode,
        patch_um=args.patch_um,
        device=args.device,
        seed=args.seed,
        overwrite=args.overwrite,
        scratch_dir=args.scratch_dir,
    )


def cmd_preprocess(args: argparse.Namespace) -> int:
    """``bitro preprocess``: one slide to one zarr, or a cohort into a folder (resumable, see ``run_pipeline``)."""
    import bitro as bt
    from bitro.pp._pipeline import apply_steps, remove_slide_scratch, slide_scratch

    check_device(args.device)
    jobs = make_jobs(args)
    options = pipeline_options(args)
    if not args.cohort:
        from bitro.pp._scratch import check_writable_dir

        target = check_output(args.out, overwrite=args.overwrite, kind="zarr")
        # an unwritable --out folder fails now, not after the slide was processed
        check_writable_dir(target.parent, name="the folder of --out", holds=f"the store {target.name}")
        scratch = slide_scratch(options, jobs[0].name)
        sdata = apply_steps(jobs[0].read(), options, scratch=scratch)
        write_sdata(sdata, target, overwrite=args.overwrite)
        remove_slide_scratch(scratch)
        out(str(target))
        return 0
    folder = Path(args.out)  # run_pipeline refuses a file or an unwritable folder before any slide
    report = bt.pp.run_pipeline(
        {job.name: job.read for job in jobs},
        out=folder,
        steps=options.steps,
        stain_method=options.stain_method,
        segment_method=options.segment_method,
        encoder=options.encoder,
        mode=options.mode,
        patch_um=options.patch_um,
        device=options.device,
        seed=options.seed,
        retries=0,
        client=False,
        overwrite=args.overwrite,
        scratch_dir=options.scratch_dir,
    )
    for row in report.itertuples():
        target = folder / f"{row.name}.zarr"
        if row.status == "skipped":
            out(f"skipped {row.name}: {target} exists")
        elif row.status == "done":
            out(f"written {row.name}: {target}")
    counts = report["status"].value_counts()
    done, skipped, failed = (int(counts.get(s, 0)) for s in ("done", "skipped", "failed"))
    out(f"cohort: {done} written, {skipped} skipped, {failed} failed")
    if failed:
        bad = report[report["status"] == "failed"]
        listing = "; ".join(f"{n} ({m})" for n, m in zip(bad["name"], bad["error"], strict=True))
        sys.stderr.write(f"error: {failed} of {len(report)} slides failed: {listing}\n")
        return 1
    return 0


# ------------------------------------------------------------------------------------ modelling
def _read_all(paths: list[str]) -> list[Any]:
    return [read_sdata(p) for p in paths]


def training_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SetupConfig and TrainConfig options given on the command line, validated before any work.

    Only options the user typed are returned (the dataclass defaults apply to the rest); a bad value
    raises a ``ValueError`` naming the command-line option.
    """
    from bitro.tl._configs import SetupConfig, TrainConfig

    given = vars(args)
    parts = []
    for cls in (SetupConfig, TrainConfig):
        opts = {name: given[name] for name in cls.names() if name in given}
        try:
            cls.from_dict(opts)
        except ValueError as err:
            flag = next(
                (f"--{n.replace('_', '-')}" for n in opts if f"{cls.__name__}.{n} " in str(err)), None
            )
            text = str(err)
            if flag is not None:
                text = text.replace(f"{cls.__name__}.{flag[2:].replace('-', '_')}", flag)
            raise ValueError(text) from err
        parts.append(opts)
    if args.device is not None:
        parts[1]["device"] = check_device(args.device)
    return parts[0], parts[1]


def check_net_config(config: dict[str, Any] | None, source: str) -> None:
    """Refuse unknown or invalid BiTroConfig fields before any data are read."""
    if config is None:
        return
    from bitro.models._config import BiTroConfig

    try:
        BiTroConfig.from_dict({"n_genes": 1, **config})
    except (TypeError, ValueError) as err:
        msg = f"{source}: {err}"
        raise ValueError(msg) from err


def cmd_fit(args: argparse.Namespace) -> int:
    """``bitro fit``: train on preprocessed slides and save the model folder."""
    import bitro as bt

    if args.model != "bitro":
        msg = (
            f"--model {args.model}: only --model bitro can be saved (baselines have no save format); "
            f"train baselines in Python with bt.tl.fit(..., model={args.model!r})."
        )
        raise ValueError(msg)
    kind = "ensemble" if args.n_models > 1 else "model"
    target = check_output(args.out, overwrite=args.overwrite, kind=kind)
    genes = read_genes(args.genes)
    config = parse_config(args.config)
    check_net_config(config, f"--config {args.config}")
    setup, train = training_options(args)
    sdatas = _read_all(args.train)
    model = bt.tl.fit(
        sdatas, level=args.level, genes=genes, config=config, n_models=args.n_models, **setup, **train
    )
    model.save(target, overwrite=args.overwrite)
    logger.info("%r trained; saved to %s", model, target)
    out(str(target))
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    """``bitro transfer``: fine-tune a saved model on another level and save the new model."""
    import bitro as bt
    from bitro.tl._ensemble_model import load_model

    model = load_model(args.model_dir)
    kind = "model" if isinstance(model, bt.tl.BiTroModel) else "ensemble"
    target = check_output(args.out, overwrite=args.overwrite, kind=kind)
    genes = read_genes(args.genes)
    setup, train = training_options(args)
    sdatas = _read_all(args.data)
    new = bt.tl.transfer(
        model,
        sdatas,
        level=args.level,
        method=args.method,
        genes=genes,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        **setup,
        **train,
    )
    new.save(target, overwrite=args.overwrite)
    logger.info("%r (%s from %s level) saved to %s", new, args.method, model.level, target)
    out(str(target))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``bitro predict``: load a model, predict one slide, write a new zarr or update it in place."""
    from bitro.tl._ensemble_model import load_model

    target = None if args.inplace else check_output(args.out, overwrite=args.overwrite, kind="zarr")
    if args.device is not None:
        check_device(args.device)
    model = load_model(args.model_dir)
    sdata = read_sdata(args.data)
    model.predict(
        sdata,
        key_added=args.key_added,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
    )
    if target is not None:
        write_sdata(sdata, target, overwrite=args.overwrite)
        out(str(target))
        return 0
    # Predictions only touch tables (held in memory), so rewrite just those elements of the store.
    written = [name for name, table in sdata.tables.items() if args.key_added in table.uns]
    rewrite_tables(sdata, written)
    logger.info("updated tables %s of %s", written, args.data)
    out(str(args.data))
    return 0


def _compact(metrics: Any) -> str:
    table = metrics.pivot_table(index="metric", columns="scale", values="value", sort=False)
    return table.round(3).to_string()


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``bitro evaluate``: score predictions against observed counts; CSV + compact table."""
    import bitro as bt

    target = (
        None
        if args.out is None
        else check_output(args.out, overwrite=args.overwrite, kind="csv", header=METRICS_HEADER)
    )
    sdata = read_sdata(args.data)
    table = _table_name(sdata, args.table)
    truth = None if args.truth_layer in ("X", "none") else args.truth_layer
    metrics = bt.tl.evaluate(
        sdata, table_key=table, layer=args.layer, truth_layer=truth, normalize=args.normalize, inplace=False
    )
    if target is not None:
        replace_path(
            lambda tmp: metrics.to_csv(tmp, index=False),
            target,
            overwrite=args.overwrite,
            kind="csv",
            header=METRICS_HEADER,
        )
        logger.info("metrics written to %s", target)
    out(_compact(metrics))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "preprocess": cmd_preprocess,
    "fit": cmd_fit,
    "transfer": cmd_transfer,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
}
