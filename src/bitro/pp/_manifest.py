"""Cohort-run bookkeeping: the manifest of slides, the parameters each was made with, the folder lock.

``out/manifest.json`` records each slide's status, time, cell count, error and the parameters it was
made with (:func:`slide_params`); it is replaced atomically after every change. ``out/.bitro-run.lock``
keeps a second run out of a folder a run is writing into (:func:`run_lock`); a lock left by a killed
run on this host is taken over. Partial stores of killed runs are removed by :func:`remove_partials`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitro._files import remove_path as _remove
from bitro._logging import logger

if TYPE_CHECKING:
    from bitro.pp._steps import PipelineOptions

MANIFEST = "manifest.json"
#: Lock file of a run in progress (one run per ``out`` folder at a time).
LOCK = ".bitro-run.lock"
_PARTIAL = re.compile(r"^\..+\.zarr\.partial-\d+(\.old)?$")


# ---------------------------------------------------------------------------------------- manifest
class Manifest:
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


def param_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
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


def remove_partials(folder: Path, names: Sequence[str] | None = None) -> None:
    """Delete partial folders left by a killed run (only names matching the partial pattern)."""
    for path in folder.iterdir():
        if not _PARTIAL.match(path.name):
            continue
        if names is not None and not any(path.name.startswith(f".{n}.zarr.partial-") for n in names):
            continue
        logger.info("removing %s (left by an interrupted run)", path)
        _remove(path)
