"""One runner for the tiled steps of ``bt.pp`` (segmentation, embedding): tasks, dask, resume, errors.

A step that works tile by tile describes itself as a :class:`TiledStep`:

- ``tasks``: what to compute, one :class:`Task` per unit of work — a key naming its scratch file, a
  small ``item`` sent to the worker and the read box(es) of its pixels (tiles come from the one
  tiling system, :mod:`bitro.pp._tiles`);
- ``process``: the per-task function ``process(pixels, item, shared)`` (module level, picklable);
- ``shared``: an object passed to every call (a segmentation backend, an encoder), sent to each
  worker once;
- ``merge``: a :class:`Merger` that receives each task's result and stitches the output;
- ``store`` and ``fingerprint``: the scratch store class (file format of one result,
  :mod:`bitro.pp._scratch`) and the parameters that determine every result (its manifest).

:class:`TileRunner` runs it — in this process, with plain dask or on a ``dask.distributed`` cluster
(:func:`bitro.pp._parallel.map_tiles`) — and owns what every step shares:

- **arguments** ``client``, ``scheduler``, ``on_error``, ``scratch_dir``, ``keep_scratch``, checked
  when the runner is built (before any work);
- **resume**: with ``scratch_dir``, each result is written to disk as it arrives (by this process, also
  with a cluster) and a rerun with the same parameters computes only the missing tasks; the output is
  then filled from the files in task order, one file in memory at a time;
- **memory**: without ``scratch_dir`` each result goes to the merger as it arrives and is dropped
  (nothing gathers all results unless the merger keeps them);
- **errors**: ``on_error="raise"`` stops at the first failed task with the tile named,
  ``"skip"`` skips it with a warning; the skipped read boxes are recorded;
- **provenance**: :meth:`TileRunner.provenance` gives ``execution`` (where the tasks ran) and
  ``skipped_tiles`` for the step's ``uns`` record.

The step writes its output, then calls :meth:`TileRunner.finish`, which deletes its scratch files
unless ``keep_scratch``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from bitro._logging import logger
from bitro.pp._parallel import Box, check_parallel_args, execution_info, map_tiles
from bitro.pp._scratch import ScratchStore, check_scratch_dir

__all__ = ["Merger", "Task", "TileRunner", "TiledStep"]


@dataclass(frozen=True)
class Task:
    """One unit of work of a tiled step.

    Attributes
    ----------
    key
        Names the task's scratch file (``tile_<key><suffix>``); unique within a run and the same in
        every run with the same fingerprint.
    item
        Passed to the step's function with the pixels; sent to the worker, so keep it small.
    boxes
        Read box ``(y0, x0, y1, x1)`` of the task's pixels, or a list of boxes (the function then gets
        a list of arrays).
    """

    key: str
    item: Any
    boxes: Box | list[Box]


class Merger(Protocol):
    """Receives each task's result and builds the step's output."""

    def add(self, index: int, result: Any) -> None:
        """Take the result of task ``index`` (``None``: a skipped task); results may come in any order."""

    def result(self) -> Any:
        """The output once every task was added."""


@dataclass
class TiledStep:
    """What an algorithm gives :class:`TileRunner` (see the module docstring).

    Attributes
    ----------
    name
        The public function (``"segment_cells"``); recorded in the scratch manifest, so a folder of
        another step is refused.
    tasks
        The work, in output order.
    process
        ``process(pixels, item, shared) -> result``; module level (picklable for process workers).
    merge
        Stitches the results.
    store
        Scratch store class: the file format of one result.
    fingerprint
        Everything that determines the results (JSON-serialisable): the scratch manifest.
    shared
        Passed to every call of ``process``, sent to each worker once.
    desc
        Progress bar text.
    """

    name: str
    tasks: Sequence[Task]
    process: Callable[..., Any]
    merge: Merger
    store: type[ScratchStore]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    shared: Any = None
    desc: str = "tiles"


class TileRunner:
    """Runs :class:`TiledStep` s with the execution options of one public call.

    Parameters
    ----------
    client
        A ``distributed.Client``; ``None``: the client active in this process, else the local loop.
    scheduler
        ``"threads"``, ``"processes"`` or ``"synchronous"`` for plain dask; not with ``client``.
    on_error
        ``"raise"`` or ``"skip"`` (see :func:`bitro.pp._parallel.map_tiles`).
    scratch_dir
        Folder for per-task results (created and probe-written here, before any work), or ``None``.
    keep_scratch
        Leave the files in ``scratch_dir`` after :meth:`finish`.
    """

    def __init__(
        self,
        *,
        client: Any = None,
        scheduler: str | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        scratch_dir: str | Path | None = None,
        keep_scratch: bool = False,
    ) -> None:
        check_parallel_args(client, scheduler, on_error)
        self.client, self.scheduler, self.on_error = client, scheduler, on_error
        self.scratch = None if scratch_dir is None else check_scratch_dir(scratch_dir)
        self.keep_scratch = bool(keep_scratch)
        self.execution = execution_info(client, scheduler)
        self.skipped: list[list[int]] = []
        self._written: list[tuple[ScratchStore, list[str]]] = []

    def run(self, step: TiledStep, data: Any, *, image_name: str) -> Any:
        """Run every task of ``step`` on the pixels of ``data`` and return the merger's output.

        Parameters
        ----------
        step
            The step.
        data
            ``(c, y, x)`` image the boxes are read from (xarray, dask or numpy).
        image_name
            Name of the image in error messages.
        """
        tasks = list(step.tasks)
        store = None
        if self.scratch is not None:  # the manifest is checked here, before any task runs
            store = step.store(self.scratch, step.fingerprint, step=step.name)
            self._written.append((store, [t.key for t in tasks]))
        todo = [i for i, t in enumerate(tasks) if store is None or not store.has(t.key)]
        if store is not None and len(todo) < len(tasks):
            done = len(tasks) - len(todo)
            logger.info("Resuming from %r: %d of %d tiles already done.", str(self.scratch), done, len(tasks))

        if store is None:  # straight into the merger, nothing gathered here

            def on_result(j: int, result: Any) -> None:
                step.merge.add(todo[j], result)
        else:

            def on_result(j: int, result: Any) -> int:
                return store.write(tasks[todo[j]].key, result)

        _, skipped = map_tiles(
            step.process,
            [tasks[i].item for i in todo],
            data,
            boxes=[tasks[i].boxes for i in todo],
            shared=step.shared,
            client=self.client,
            scheduler=self.scheduler,
            on_error=self.on_error,
            image_name=image_name,
            desc=step.desc,
            on_result=on_result,
        )
        self.skipped.extend(skipped)
        if store is not None:
            for i, task in enumerate(tasks):  # one file in memory at a time, in task order
                step.merge.add(i, store.read(task.key))
        return step.merge.result()

    def sibling(self, scratch_dir: str | Path | None) -> TileRunner:
        """A runner with the same execution settings and its own ``scratch_dir`` (for a second step)."""
        return TileRunner(
            client=self.client,
            scheduler=self.scheduler,
            on_error=self.on_error,
            scratch_dir=scratch_dir,
            keep_scratch=self.keep_scratch,
        )

    def absorb(self, other: TileRunner) -> None:
        """Take over ``other``'s skipped boxes and scratch files (reported and cleaned by this runner)."""
        self.skipped.extend(other.skipped)
        self._written.extend(other._written)
        other.skipped, other._written = [], []

    def provenance(self) -> dict[str, Any]:
        """``{"execution": where the tasks ran, "skipped_tiles": read boxes skipped with on_error="skip"}``."""
        return {"execution": self.execution, "skipped_tiles": list(self.skipped)}

    def finish(self) -> None:
        """Delete the scratch files of the steps run (unless ``keep_scratch``); call once the output is written."""
        if self.keep_scratch:
            return
        for store, keys in reversed(self._written):  # a sibling's subfolder before its parent
            store.remove(keys)
        self._written = []
