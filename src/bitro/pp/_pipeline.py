"""Cohort runs: every slide through the preprocessing steps into ``out/<name>.zarr``, resumably.

Each slide is written to a hidden ``out/.<name>.zarr.partial-<pid>`` folder and renamed to
``out/<name>.zarr`` only when complete, so the presence of ``out/<name>.zarr`` means *finished*.
``out/manifest.json`` (replaced atomically after every change) records each slide's status, time,
cell count and error. A restarted run removes partial folders left by a killed run, skips finished
slides and redoes the others. With a ``dask.distributed`` client, one task per slide is submitted.

With ``scratch_dir``, :func:`~bitro.pp.segment_cells` and :func:`~bitro.pp.embed_cells` write their
finished tiles to ``scratch_dir/<name>/segment`` and ``scratch_dir/<name>/embed``, so a slide
killed half-way resumes from its finished tiles; they are deleted once ``out/<name>.zarr`` is written.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bitro import _keys as K
from bitro._files import check_replaceable
from bitro._files import remove_path as _remove
from bitro._logging import logger
from bitro._settings import progress, settings
from bitro.io._zarr import write_store
from bitro.pp._manifest import (
    MANIFEST,
    Manifest,
    param_changes,
    remove_partials,
    run_lock,
    slide_params,
)
from bitro.pp._scratch import check_writable_dir, disk_full
from bitro.pp._steps import (
    STEPS,
    PipelineOptions,
    Step,
    apply_steps,
    pipeline_options,
    remove_slide_scratch,
    slide_scratch,
)

COLUMNS = ("name", "status", "seconds", "n_cells", "error")


# --------------------------------------------------------------------------------------- one slide
def _fresh(sdata: Any) -> Any:
    """A new SpatialData sharing the (lazy) images, labels, points and shapes, with copied tables.

    Steps add elements and table columns; working on a copy leaves the caller's object unchanged
    and lets a retry start from the original again.
    """
    import spatialdata as sd

    return sd.SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes=dict(sdata.shapes),
        tables={k: v.copy() for k, v in sdata.tables.items()},
        attrs=copy.deepcopy(dict(sdata.attrs)),
    )


def _load(source: Any, reader: str | None) -> Any:
    from bitro.io._read import read_path

    if isinstance(source, str | Path):
        return read_path(source, reader=reader)
    if callable(source):
        return source()
    return _fresh(source)


def _write(sdata: Any, out: Path, name: str, *, overwrite: bool) -> Path:
    """Write ``out/<name>.zarr`` through a partial folder renamed into place when complete."""
    target = out / f"{name}.zarr"
    partial = out / f".{name}.zarr.partial-{os.getpid()}"
    aside = partial.with_name(f"{partial.name}.old")
    _remove(partial)
    try:
        write_store(sdata, partial)  # with its integrity record (bt.io.read_zarr checks it)
        if target.exists() or target.is_symlink():
            if not overwrite:
                msg = f"{str(target)!r} appeared while slide {name!r} was processed; not replaced."
                raise FileExistsError(msg)
            check_replaceable(target, kind="zarr", overwrite=True)
            target.rename(aside)
        partial.rename(target)
    except BaseException as err:
        _remove(partial)
        if aside.exists() and not target.exists():
            aside.rename(target)
        if isinstance(err, OSError) and disk_full(err):
            msg = (
                f"Writing slide {name!r} to {str(target)!r} failed: the disk is full ({err.strerror or err}). "
                f"No partial store was left. Free space in {str(out)!r} and rerun the same call: finished "
                "slides are skipped and this one is redone."
            )
            raise OSError(err.errno, msg) from err
        raise
    _remove(aside)
    return target


@contextlib.contextmanager
def _settings_as(values: Mapping[str, Any] | None) -> Iterator[None]:
    if values is None:
        yield
        return
    old = {k: getattr(settings, k) for k in values}
    try:
        for k, v in values.items():
            setattr(settings, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(settings, k, v)


def _process_slide(
    name: str,
    source: Any,
    out: str,
    options: PipelineOptions,
    reader: str | None = None,
    worker_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read, preprocess and write one slide; return its cell count and seconds (raises on failure)."""
    import dask

    from bitro.pp._parallel import on_worker

    start = time.perf_counter()
    # on a distributed worker, dask work inside the slide (lazy images, zarr writes) stays in this
    # task's thread: submitting it to the same cluster and waiting can deadlock (see active_client)
    local = dask.config.set(scheduler="synchronous") if on_worker() else contextlib.nullcontext()
    scratch = slide_scratch(options, name)
    with _settings_as(worker_settings), local:
        sdata = apply_steps(_load(source, reader), options, scratch=scratch)
        n_cells = sdata.tables[K.CELLS].n_obs if K.CELLS in sdata.tables else None
        _write(sdata, Path(out), name, overwrite=options.overwrite)
    remove_slide_scratch(scratch)
    return {"n_cells": n_cells, "seconds": round(time.perf_counter() - start, 3)}


# ------------------------------------------------------------------------------------------- inputs
def _named_inputs(inputs: Any) -> dict[str, Any]:
    import spatialdata as sd

    if isinstance(inputs, str | Path | sd.SpatialData):
        inputs = [inputs]
    if isinstance(inputs, Mapping):
        named = {str(k): v for k, v in inputs.items()}
    else:
        named = {}
        for item in inputs:
            if not isinstance(item, str | Path):
                msg = (
                    f"inputs must be paths or a dict name → SpatialData, got a {type(item).__name__} "
                    "without a name; pass e.g. {'slide1': sdata}."
                )
                raise TypeError(msg)
            p = Path(item)
            name = p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.stem
            if name in named:
                msg = f"several inputs would be written as {name!r}.zarr; give inputs with distinct names."
                raise ValueError(msg)
            named[name] = p
    if not named:
        msg = "inputs is empty; give slide paths or a dict name → SpatialData."
        raise ValueError(msg)
    for name in named:
        check_slide_name(name)
    return named


def check_slide_name(name: str) -> str:
    """Refuse a slide name that is not a plain file name (it names ``out/<name>.zarr`` and scratch folders).

    ``..``, path separators, a leading ``.`` and control characters could reach outside the output
    or scratch folder, or collide with bitro's hidden partial folders.
    """
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or (os.altsep is not None and os.altsep in name)
        or name.startswith(".")
        or any(ord(c) < 32 for c in name)
    )
    if bad:
        msg = (
            f"slide name {name!r} cannot be used as a file name in the output or scratch folder; use a name "
            "without '/', '\\', control characters or a leading '.' (e.g. --sample-id C2)."
        )
        raise ValueError(msg)
    return name


def _resolve_client(client: Any) -> Any:
    from bitro.pp._parallel import active_client

    if client is False:
        return None
    return client if client is not None else active_client()


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err) or type(err).__name__


# -------------------------------------------------------------------------------------------- public
def run_pipeline(
    inputs: Sequence[str | Path] | Mapping[str, Any] | str | Path,
    *,
    out: str | Path,
    steps: Sequence[Step] = STEPS,
    reader: str | None = None,
    stain_method: str = K.STAIN_METHOD,
    segment_method: str = "watershed",
    encoder: Any = "efficientnet_lite0",
    mode: str = "tile",
    patch_um: float | None = None,
    device: str | None = None,
    seed: int | None = None,
    step_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    retries: int = 1,
    client: Any = None,
    overwrite: bool = False,
    scratch_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Preprocess a cohort of slides into ``out/<name>.zarr``, resumably, one slide after another or on dask.

    Each slide is read, run through ``steps`` (by default :func:`~bitro.pp.normalize_stains` →
    :func:`~bitro.pp.detect_tissue` → :func:`~bitro.pp.segment_cells` → :func:`~bitro.pp.embed_cells` →
    :func:`~bitro.pp.assign_cells`) and written as a SpatialData zarr store. The store is written to
    ``out/.<name>.zarr.partial-<pid>`` and renamed to ``out/<name>.zarr`` only when complete, and
    ``out/manifest.json`` records each slide's status (``running``, ``done``, ``failed``), seconds,
    cell count, error and the parameters it was made with. Run the same call again after a crash or a
    kill: partial folders are removed, finished slides are skipped and unfinished or failed ones are
    redone. A rerun with other parameters (stain method, encoder, mode, steps, seed, step options)
    refuses to keep slides made with the old ones: it raises, naming the slides and the changed
    parameters, unless ``overwrite=True`` redoes them. Nothing else in ``out`` is touched (an
    ``out/<name>.zarr`` not written by this function is skipped with a warning; ``overwrite=True``
    replaces only SpatialData stores, never other folders or files). One run per ``out`` folder at a
    time: the run holds ``out/.bitro-run.lock`` and a second run into the same folder raises
    :class:`FileExistsError` (a lock left by a killed run on this host is taken over).

    A slide that raises is retried ``retries`` times, then recorded as failed; the other slides go on.

    Parameters
    ----------
    inputs
        Slide paths (zarr stores, Visium folders, whole-slide images: anything :mod:`bitro.io` reads
        from a path alone; each is named after its file, without ``.zarr``), or a dict name → slide,
        where a slide is a SpatialData object (left unchanged; a copy is processed), a path, or a
        function without arguments returning a SpatialData (e.g. ``lambda: bt.io.read_st(...)``).
    out
        Output folder (created). Slide ``name`` is written to ``out/<name>.zarr``. A file, or a
        folder that cannot be written to, raises an error before any slide runs. If the disk fills
        while a slide is written, its partial store is deleted and it is recorded as failed with a
        message saying so; after freeing space, rerun the same call.
    steps
        Steps run in order: names among ``"normalize_stains"``, ``"detect_tissue"``,
        ``"segment_cells"``, ``"embed_cells"``, ``"assign_cells"`` (skipped on slides without a
        ``"spots"`` table), ``"make_patches"``, ``"bags"`` (``assign_cells`` on slides with spots,
        ``make_patches`` on the others), or functions called with the slide's SpatialData (modify it
        in place). Steps after ``normalize_stains`` use the normalised image.
    reader
        Reader of path inputs: ``"zarr"``, ``"visium"`` or ``"wsi"`` (default: guessed from each path).
    stain_method
        ``method`` of :func:`~bitro.pp.normalize_stains` (default ``"macenko"``, the method the
        benchmarks use; see there).
    segment_method
        ``method`` of :func:`~bitro.pp.segment_cells`.
    encoder
        ``encoder`` of :func:`~bitro.pp.embed_cells` (e.g. ``"morphology"`` for a fast run).
    mode
        ``mode`` of :func:`~bitro.pp.embed_cells`.
    patch_um
        ``size_um`` of :func:`~bitro.pp.make_patches`.
    device
        Device of :func:`~bitro.pp.embed_cells` (default: ``bt.settings.device``).
    seed
        Seed of every step (default: ``bt.settings.seed``), the same on every worker.
    step_kwargs
        More keyword arguments per step name, e.g. ``{"segment_cells": {"tile_size": 512}}``.
    retries
        How often a failing slide is tried again before it is recorded as failed. With a client,
        dask's own retries (``client.submit(..., retries=retries)``) also cover a worker dying mid-slide.
    client
        A :class:`distributed.Client`: one task per slide, results gathered as they complete (``out``
        must be reachable from the workers). ``None`` uses the active client if there is one;
        ``False`` (or no client) runs the slides one after another in this process.
    overwrite
        Redo finished slides and replace their ``out/<name>.zarr`` (the old store is deleted only once
        the new one is complete), and let the steps replace existing elements of the inputs.
    scratch_dir
        Folder (created; checked writable before any slide runs) for the per-tile results of
        :func:`~bitro.pp.segment_cells` and :func:`~bitro.pp.embed_cells`: slide ``name`` uses
        ``scratch_dir/<name>/segment`` and ``scratch_dir/<name>/embed`` (their ``scratch_dir``). A
        cohort run killed (or failing) mid-slide then resumes that slide from its finished tiles
        instead of from the start; the outputs are identical to a run without it. A slide's tile
        files are deleted once its ``out/<name>.zarr`` is written. With a client, the folder must be
        reachable from the workers. ``None`` (default): no per-tile files.

    Returns
    -------
    One row per slide, in input order: ``name``, ``status`` (``"done"``, ``"skipped"`` or
    ``"failed"``), ``seconds``, ``n_cells`` and ``error`` (the message of the last failure).

    Examples
    --------
    >>> import bitro as bt
    >>> slides = dict(zip(["a", "b"], bt.datasets.synthetic_tissue(2, size=600, technology="visium")))
    >>> report = bt.pp.run_pipeline(slides, out="cohort", encoder="morphology")  # doctest: +SKIP
    """
    if not isinstance(retries, int) or retries < 0:
        msg = f"retries must be a non-negative int, got {retries!r}."
        raise ValueError(msg)
    options = pipeline_options(
        steps,
        step_kwargs=step_kwargs,
        seed=seed,
        device=device,
        stain_method=stain_method,
        segment_method=segment_method,
        encoder=encoder,
        mode=mode,
        patch_um=patch_um,
        overwrite=overwrite,
        scratch_dir=scratch_dir,
    )
    named = _named_inputs(inputs)
    folder = check_writable_dir(out, name="out", holds="the slides' zarr stores and manifest.json")
    with run_lock(folder):
        return _run_locked(named, folder, options, reader, retries, client)


def _run_locked(
    named: Mapping[str, Any],
    folder: Path,
    options: PipelineOptions,
    reader: str | None,
    retries: int,
    client: Any,
) -> pd.DataFrame:
    """The body of :func:`run_pipeline`, run while this process holds the folder's lock."""
    overwrite = options.overwrite
    manifest = Manifest(folder)
    remove_partials(folder)
    params = slide_params(options, reader)

    rows: dict[str, dict[str, Any]] = {}
    pending: list[str] = []
    changed: dict[str, list[str]] = {}
    for name in named:
        target = folder / f"{name}.zarr"
        if overwrite:  # only bitro's own stores are ever replaced: refuse others before any work
            check_replaceable(target, kind="zarr", overwrite=True)
        if (target.exists() or target.is_symlink()) and not overwrite:
            entry = manifest.slides.get(name)
            if entry is None:
                logger.warning(
                    "%s: skipped: %s exists but is not in %s (not written by run_pipeline; its parameters "
                    "are unknown). Pass overwrite=True to redo it.",
                    name,
                    target,
                    MANIFEST,
                )
            elif entry.get("params") is None:
                logger.warning(
                    "%s: skipped: %s records no parameters for it (written by an older bitro); pass "
                    "overwrite=True to redo it with the current ones.",
                    name,
                    MANIFEST,
                )
            elif entry["params"] != params:
                changed[name] = param_changes(entry["params"], params)
                continue
            if entry is not None and entry.get("status") != "done":  # killed after rename, before update
                manifest.update({name: {"status": "done", "error": None}})
            n_cells = (entry or {}).get("n_cells")
            rows[name] = {"status": "skipped", "seconds": 0.0, "n_cells": n_cells, "error": None}
        else:
            pending.append(name)
    if changed:
        listing = "; ".join(f"{n} ({', '.join(c)})" for n, c in changed.items())
        msg = (
            f"{len(changed)} slide(s) in {str(folder)!r} were made with other parameters: {listing}. Keeping "
            "them would mix outputs of different settings. Pass overwrite=True (--overwrite) to redo them "
            "with the new parameters, or choose another out folder."
        )
        raise ValueError(msg)
    if rows:
        logger.info("%d of %d slides already in %s: skipped", len(rows), len(named), folder)

    client = _resolve_client(client)
    if pending:
        manifest.update({n: {"status": "running", "error": None, "params": params} for n in pending})
        run = _run_distributed if client is not None else _run_sequential
        bar = progress(total=len(pending), desc="slides", unit="slide")
        try:
            for name, row in run(client, named, pending, folder, options, reader, retries):
                rows[name] = row
                manifest.update({name: {k: row[k] for k in ("status", "seconds", "n_cells", "error")}})
                if row["status"] == "done":
                    logger.info("%s: done in %.1f s (%s cells)", name, row["seconds"], row["n_cells"])
                else:
                    logger.error("%s: failed: %s", name, row["error"])
                bar.update(1)
        finally:
            bar.close()
        remove_partials(folder, pending)  # those of workers that died mid-slide
    table = pd.DataFrame([{"name": n, **rows[n]} for n in named], columns=list(COLUMNS))
    return table.astype({"n_cells": "Int64"})


def _run_sequential(
    client: Any,
    named: Mapping[str, Any],
    pending: Sequence[str],
    folder: Path,
    options: PipelineOptions,
    reader: str | None,
    retries: int,
) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, name in enumerate(pending, 1):
        logger.info("[%d/%d] %s: preprocessing", i, len(pending), name)
        start = time.perf_counter()
        for attempt in range(retries + 1):
            try:
                result = _process_slide(name, named[name], str(folder), options, reader)
            except Exception as err:  # one bad slide must not stop the cohort
                logger.debug("slide %s failed", name, exc_info=True)
                error = _message(err)
                if attempt < retries:
                    logger.warning("%s: attempt %d failed (%s); retrying", name, attempt + 1, error)
                continue
            yield name, {"status": "done", **result, "error": None}
            break
        else:
            seconds = round(time.perf_counter() - start, 3)
            yield name, {"status": "failed", "seconds": seconds, "n_cells": None, "error": error}


def _run_distributed(
    client: Any,
    named: Mapping[str, Any],
    pending: Sequence[str],
    folder: Path,
    options: PipelineOptions,
    reader: str | None,
    retries: int,
) -> Iterator[tuple[str, dict[str, Any]]]:
    from distributed import as_completed

    worker_settings = {"verbosity": settings.verbosity, "progress": False}
    tag = uuid.uuid4().hex[:8]
    futures = {}
    start = time.perf_counter()
    for name in pending:
        future = client.submit(
            _process_slide,
            name,
            named[name],
            str(folder.resolve()),
            options,
            reader,
            worker_settings,
            key=f"bitro-slide-{name}-{tag}",
            pure=False,
            retries=retries,
        )
        futures[future] = name
    logger.info("%d slides submitted to %s", len(pending), client)
    for future in as_completed(futures):
        name = futures.pop(future)
        try:
            result = future.result()
        except Exception as err:
            logger.debug("slide %s failed", name, exc_info=True)
            seconds = round(time.perf_counter() - start, 3)
            yield name, {"status": "failed", "seconds": seconds, "n_cells": None, "error": _message(err)}
        else:
            yield name, {"status": "done", **result, "error": None}
        future.release()
