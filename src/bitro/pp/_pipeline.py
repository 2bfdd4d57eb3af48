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
import datetime
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bitro import _keys as K
from bitro._files import check_replaceable
from bitro._files import remove_path as _remove
from bitro._logging import logger
from bitro._settings import progress, resolve_seed, settings
from bitro.io._zarr import write_store
from bitro.pp._scratch import check_scratch_dir, check_writable_dir, clear_scratch_dir, disk_full

STEPS = ("normalize_stains", "detect_tissue", "segment_cells", "embed_cells", "assign_cells")
KNOWN_STEPS = (*STEPS, "make_patches", "bags")
MANIFEST = "manifest.json"
#: Lock file of a run in progress (one run per ``out`` folder at a time).
LOCK = ".bitro-run.lock"
COLUMNS = ("name", "status", "seconds", "n_cells", "error")
_PARTIAL = re.compile(r"^\..+\.zarr\.partial-\d+(\.old)?$")

Step = str | Callable[[Any], Any]


# ------------------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class PipelineOptions:
    """What :func:`apply_steps` runs on each slide (built and validated by :func:`pipeline_options`)."""

    steps: tuple[Step, ...]
    stain_method: str = K.STAIN_METHOD
    segment_method: str = "watershed"
    encoder: Any = "efficientnet_lite0"
    mode: str = "tile"
    patch_um: float | None = None
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    step_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    scratch_dir: str | None = None


def pipeline_options(
    steps: Sequence[Step] = STEPS,
    *,
    step_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int | None = None,
    device: str | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> PipelineOptions:
    """Check the steps and fill the defaults (seed and device from ``bt.settings``).

    ``scratch_dir`` is checked (created and probe-written) and stored as an absolute path, so that
    workers of a cluster resolve it alike.
    """
    if isinstance(steps, str) or callable(steps):
        steps = [steps]
    steps = tuple(steps)
    for step in steps:
        if not callable(step) and step not in KNOWN_STEPS:
            msg = f"unknown step {step!r}; use one of {KNOWN_STEPS} or a function taking the SpatialData."
            raise ValueError(msg)
    if not steps:
        msg = f"steps is empty; give some of {KNOWN_STEPS}."
        raise ValueError(msg)
    step_kwargs = dict(step_kwargs or {})
    for name in step_kwargs:
        if name not in KNOWN_STEPS:
            msg = f"step_kwargs has unknown step {name!r}; keys must be among {KNOWN_STEPS}."
            raise ValueError(msg)
    return PipelineOptions(
        steps=steps,
        seed=resolve_seed(seed),
        device=settings.device if device is None else device,
        step_kwargs=step_kwargs,
        scratch_dir=None if scratch_dir is None else str(check_scratch_dir(scratch_dir).resolve()),
        **options,
    )


#: Subfolders of a slide's scratch folder, per step that writes tiles there.
SCRATCH_SUBFOLDERS = {"segment_cells": "segment", "embed_cells": "embed"}


def slide_scratch(options: PipelineOptions, name: str) -> Path | None:
    """``scratch_dir/<name>`` of one slide, or ``None`` without ``scratch_dir``."""
    return None if options.scratch_dir is None else Path(options.scratch_dir) / name


def remove_slide_scratch(scratch: Path | None) -> None:
    """Delete the tile files the steps left in ``scratch`` (see :func:`slide_scratch`), nothing else."""
    if scratch is None:
        return
    for sub in SCRATCH_SUBFOLDERS.values():
        clear_scratch_dir(scratch / sub)
    with contextlib.suppress(OSError):
        scratch.rmdir()  # only when empty


def _has_spots(sdata: Any) -> bool:
    return K.SPOTS in sdata.tables


def apply_steps(sdata: Any, options: PipelineOptions, *, scratch: Path | None = None) -> Any:
    """Run ``options.steps`` on one slide, in place; later steps use the stain-normalised image.

    With ``scratch`` (the slide's folder, :func:`slide_scratch`), segmentation and embedding write
    their tiles to its subfolders ``segment`` and ``embed`` and keep them (a rerun of a slide that
    failed later resumes); :func:`remove_slide_scratch` deletes them once the slide is written.
    """
    import bitro as bt

    ow, seed = options.overwrite, options.seed
    image = K.IMAGE
    bags = []
    for step in options.steps:
        if callable(step):
            step(sdata)
            continue
        extra = dict(options.step_kwargs.get(step, {}))
        if step == "bags":
            step = "assign_cells" if _has_spots(sdata) else "make_patches"
            extra = dict(options.step_kwargs.get(step, {})) | extra
        if step == "normalize_stains":
            kw = {"image_key": K.IMAGE, "method": options.stain_method, "overwrite": ow, "seed": seed}
            kw |= extra
            bt.pp.normalize_stains(sdata, **kw)
            image = kw.get("key_added", K.IMAGE_NORMALIZED)
        elif step == "detect_tissue":
            bt.pp.detect_tissue(sdata, **({"image_key": image, "overwrite": ow} | extra))
        elif step == "segment_cells":
            kw = {"image_key": image, "method": options.segment_method, "overwrite": ow, "seed": seed}
            kw |= _scratch_kwargs(scratch, step)
            bt.pp.segment_cells(sdata, **(kw | extra))
        elif step == "embed_cells":
            kw = {"image_key": image, "encoder": options.encoder, "mode": options.mode}
            kw |= {"device": options.device, "overwrite": ow, "seed": seed} | _scratch_kwargs(scratch, step)
            bt.pp.embed_cells(sdata, **(kw | extra))
        elif step == "assign_cells":
            if not _has_spots(sdata):
                logger.info("no %r table: assign_cells skipped", K.SPOTS)
                continue
            bt.pp.assign_cells(sdata, **({"overwrite": ow} | extra))
            bags.append("assign")
        elif step == "make_patches":
            bt.pp.make_patches(sdata, **({"size_um": options.patch_um, "overwrite": ow} | extra))
            bags.append("patches")
    if K.CELLS in sdata.tables:
        cells = sdata.tables[K.CELLS]
        features = cells.obsm[K.EMBEDDING].shape[1] if K.EMBEDDING in cells.obsm else 0
        logger.info("%d cells, %d features; bags: %s", cells.n_obs, features, "+".join(bags) or "none")
    return sdata


def _scratch_kwargs(scratch: Path | None, step: str) -> dict[str, Any]:
    if scratch is None:
        return {}
    return {"scratch_dir": scratch / SCRATCH_SUBFOLDERS[step], "keep_scratch": True}


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


# ---------------------------------------------------------------------------------------- manifest
class _Manifest:
    """``out/manifest.json``: one entry per slide, rewritten atomically (temp file + ``os.replace``)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / MANIFEST
        self.slides: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.slides = dict(data["slides"])
            except (ValueError, KeyError, TypeError) as err:
                msg = (
                    f"{str(self.path)!r} is not a bitro pipeline manifest ({err}); move it away or choose "
                    "another out folder."
                )
                raise ValueError(msg) from err

    def status(self, name: str) -> str | None:
        return self.slides.get(name, {}).get("status")

    def update(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        for name, entry in entries.items():
            self.slides[name] = {**self.slides.get(name, {}), **entry, "updated": now}
        tmp = self.path.with_name(f".{MANIFEST}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        tmp.write_text(json.dumps({"format": "bitro.pp.run_pipeline", "slides": self.slides}, indent=1))
        os.replace(tmp, self.path)


def slide_params(options: PipelineOptions, reader: str | None = None) -> dict[str, Any]:
    """What a slide's output depends on, as JSON values (recorded per slide in the manifest).

    Steps given as functions are named by module and qualified name, encoder objects by class (and
    ``name`` when they have one); the device is left out (it does not change what is computed).
    """

    def named(obj: Any) -> str:
        if isinstance(obj, str):
            return obj
        label = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
        return f"{label}:{obj.name}" if isinstance(getattr(obj, "name", None), str) else label

    params = {
        "steps": [named(step) for step in options.steps],
        "reader": reader,
        "stain_method": options.stain_method,
        "segment_method": named(options.segment_method),
        "encoder": named(options.encoder)
        if not isinstance(options.encoder, os.PathLike)
        else str(options.encoder),
        "mode": options.mode,
        "patch_um": options.patch_um,
        "seed": options.seed,
        "step_kwargs": options.step_kwargs,
    }
    return json.loads(json.dumps(params, sort_keys=True, default=repr))


def _param_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@contextlib.contextmanager
def _run_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.bitro-run.lock`` while a run writes into ``folder``; refuse a second run.

    A lock left by a run that was killed (same host, process gone) is taken over with a warning.
    """
    path = folder / LOCK
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    for _attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and _lock_is_stale(holder):
                logger.warning(
                    "%s was left by run %s (pid %s, started %s), which no longer runs; taking it over.",
                    path,
                    holder.get("host"),
                    holder.get("pid"),
                    holder.get("started"),
                )
                path.unlink(missing_ok=True)
                continue
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                if holder
                else "a run that is starting"
            )
            msg = (
                f"Another bitro cohort run ({who}) is writing into {str(folder)!r}; two runs into one folder "
                f"would delete each other's work. Wait for it to finish or use another out folder. If no run "
                f"is active, delete {str(path)!r}."
            )
            raise FileExistsError(msg) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _lock_is_stale(holder: Mapping[str, Any]) -> bool:
    """True when the lock's process ran on this host and is gone."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_partials(folder: Path, names: Sequence[str] | None = None) -> None:
    """Delete partial folders left by a killed run (only names matching the partial pattern)."""
    for path in folder.iterdir():
        if not _PARTIAL.match(path.name):
            continue
        if names is not None and not any(path.name.startswith(f".{n}.zarr.partial-") for n in names):
            continue
        logger.info("removing %s (left by an interrupted run)", path)
        _remove(path)


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
    with _run_lock(folder):
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
    manifest = _Manifest(folder)
    _remove_partials(folder)
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
                changed[name] = _param_changes(entry["params"], params)
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
        _remove_partials(folder, pending)  # those of workers that died mid-slide
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
