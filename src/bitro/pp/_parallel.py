"""Map a per-tile function over the tiles of an image with dask, results in tile order.

Three ways of running the same call (:func:`map_tiles`):

- **local loop** (the default when no dask client is active): one tile after the other in this
  process with a tqdm bar — exactly the behaviour of bitro before dask support;
- **plain dask** (``scheduler="threads" | "processes" | "synchronous"``): tiles are computed in
  batches with :func:`dask.compute`;
- **dask.distributed** (``client=`` a ``distributed.Client``, or the client that is active in this
  process): one task per tile; the bar advances as tiles complete (``as_completed``).

Tile pixels are never materialised in the driver on the dask paths: each task depends on the dask
slice of its read box, which the workers compute from the image chunks. Results are gathered in
tile order, so every path gives the same output.

A tile whose pixels cannot be read (e.g. a corrupt chunk) raises a :class:`RuntimeError` naming the
image and the tile box; an error of the per-tile function is re-raised with a note naming the tile.
With ``on_error="skip"`` such tiles are skipped with a logged warning and their boxes returned.

The ``shared`` object (e.g. a torch encoder) is sent to each dask worker once — scattered with
``broadcast=True`` on distributed, one graph key shared by all tasks with plain dask — and passed to
every call of the per-tile function, so a model is unpickled once per worker, not once per tile.
(The ``"processes"`` scheduler of plain dask pickles it with every task; prefer distributed there.)
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bitro._logging import logger
from bitro._settings import progress
from bitro.pp._tiles import read_box

Box = tuple[int, int, int, int]

#: Plain dask schedulers accepted by ``scheduler=``.
SCHEDULERS = ("threads", "processes", "synchronous")
#: Accepted values of ``on_error=``.
ON_ERROR = ("raise", "skip")


class _TileFailure:
    """Returned by a worker task whose per-tile function raised (read errors raise in the dependency)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def check_parallel_args(client: Any, scheduler: str | None, on_error: str) -> None:
    """Validate ``client``/``scheduler``/``on_error`` before any work is done."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        msg = (
            f"Unknown dask scheduler {scheduler!r}; use one of {SCHEDULERS}, pass client=<distributed.Client> "
            "for a dask cluster, or leave both unset for the local loop."
        )
        raise ValueError(msg)
    if client is not None and scheduler is not None:
        msg = (
            f"Pass either client= (a dask.distributed cluster) or scheduler={scheduler!r} (plain dask), not both."
        )
        raise ValueError(msg)
    if on_error not in ON_ERROR:
        msg = f"on_error must be one of {ON_ERROR}, got {on_error!r}."
        raise ValueError(msg)


def on_worker() -> bool:
    """Whether this code runs inside a task on a ``dask.distributed`` worker."""
    if "distributed" not in sys.modules:
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def active_client() -> Any:
    """The ``distributed.Client`` active in this process, or ``None`` (never imports distributed).

    Inside a task on a worker this is ``None``: a task that submits tiles to its own cluster and
    waits for them can deadlock when every worker thread is busy with such a task (e.g. one slide
    per worker in :func:`bitro.pp.run_pipeline`), so nested work runs in the task's own thread.
    """
    if "distributed" not in sys.modules or on_worker():
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def execution_info(client: Any, scheduler: str | None) -> dict[str, Any]:
    """Provenance of where the tiles ran: ``{"backend": "local"|"dask"|"distributed", ...}``."""
    if scheduler is not None:
        return {"backend": "dask", "scheduler": scheduler}
    client = client if client is not None else active_client()
    if client is None:
        return {"backend": "local"}
    try:
        n_workers = len(client.scheduler_info().get("workers", {}))
    except Exception:  # provenance only
        n_workers = None
    return {"backend": "distributed", "n_workers": n_workers}


def map_tiles(
    func: Callable[..., Any],
    tiles: Sequence[Any],
    data: Any,
    *,
    boxes: Sequence[Box | Sequence[Box]] | None = None,
    shared: Any = None,
    client: Any = None,
    scheduler: str | None = None,
    on_error: str = "raise",
    image_name: str = "image",
    desc: str = "tiles",
    on_result: Callable[[int, Any], Any] | None = None,
) -> tuple[list[Any], list[list[int]]]:
    """Apply ``func`` to the pixels of each tile of ``data`` and return the results in tile order.

    Parameters
    ----------
    func
        ``func(rgb, tile)`` (or ``func(rgb, tile, shared)`` when ``shared`` is given), where ``rgb``
        is the ``(h, w, 3)`` uint8 read box of the tile (as :func:`bitro.pp._tiles.read_box` returns
        it, white outside the image) or a list of them when the tile has several boxes. Must be
        picklable for process-based workers (module-level function or ``functools.partial``).
    tiles
        One item per task, passed to ``func`` as is (e.g. a :class:`~bitro.pp._tiles.Tile` or the
        cell indices of a tile); keep it small, it is sent to the worker.
    data
        ``(c, y, x)`` image: xarray ``DataArray``, dask or numpy array.
    boxes
        Read box ``(y0, x0, y1, x1)`` of each item, or a list of boxes; default ``tile.box``.
    shared
        An object passed to every call (e.g. an encoder), sent to each worker once.
    client
        A ``distributed.Client``. ``None``: the active client of this process if there is one
        (and ``scheduler`` is ``None``), else the local loop.
    scheduler
        ``"threads"``, ``"processes"`` or ``"synchronous"`` to run with plain dask.
    on_error
        ``"raise"``: stop at the first failed tile. ``"skip"``: log a warning, return ``None`` for
        that tile and record its boxes.
    image_name
        Name of the image in error messages.
    desc
        Description of the progress bar.
    on_result
        ``on_result(i, result)`` is called in this process as soon as tile ``i``'s result arrives
        (e.g. to write it to disk); its return value is kept instead of the result, so the results
        need not all be held in memory. Its errors always stop the run (whatever ``on_error``).

    Returns
    -------
    ``(results, skipped)``: the result of each tile in tile order (``None`` where skipped) and the
    boxes ``[y0, x0, y1, x1]`` of the skipped tiles.
    """
    check_parallel_args(client, scheduler, on_error)
    tiles = list(tiles)
    box_lists, multi = _box_lists(tiles, boxes)
    if client is None and scheduler is None:
        client = active_client()
    ctx = _Context(func, tiles, box_lists, multi, shared, on_error, image_name, on_result)
    if client is not None:
        _run_distributed(ctx, data, client, desc)
    elif scheduler is not None:
        _run_dask(ctx, data, scheduler, desc)
    else:
        _run_local(ctx, data, desc)
    return ctx.results, ctx.skipped


# --------------------------------------------------------------------------------------------- helpers
def _box_lists(tiles: list[Any], boxes: Sequence[Any] | None) -> tuple[list[list[Box]], list[bool]]:
    if boxes is None:
        boxes = [t.box for t in tiles]
    if len(boxes) != len(tiles):
        msg = f"Got {len(boxes)} boxes for {len(tiles)} tiles."
        raise ValueError(msg)
    out, multi = [], []
    for b in boxes:
        is_multi = len(b) > 0 and not np.isscalar(b[0])
        out.append([tuple(int(v) for v in bb) for bb in b] if is_multi else [tuple(int(v) for v in b)])
        multi.append(is_multi)
    return out, multi


class _Context:
    """State shared by the three runners: inputs, results and error policy."""

    def __init__(
        self,
        func: Callable[..., Any],
        tiles: list[Any],
        box_lists: list[list[Box]],
        multi: list[bool],
        shared: Any,
        on_error: str,
        image_name: str,
        on_result: Callable[[int, Any], Any] | None = None,
    ) -> None:
        self.func, self.tiles, self.box_lists, self.multi = func, tiles, box_lists, multi
        self.on_result = on_result
        self.shared, self.has_shared = shared, shared is not None
        self.on_error, self.image_name = on_error, image_name
        self.results: list[Any] = [None] * len(tiles)
        self.skipped: list[list[int]] = []

    def where(self, i: int) -> str:
        boxes = self.box_lists[i]
        what = f"box (y0, x0, y1, x1) = {boxes[0]}" if len(boxes) == 1 else f"boxes (y0, x0, y1, x1) = {boxes}"
        return f"tile {i} ({what}) of image {self.image_name!r}"

    def read_failed(self, i: int, err: BaseException) -> None:
        if self.on_error == "raise":
            msg = (
                f"Reading {self.where(i)} failed: {type(err).__name__}: {err}. The image data may be corrupt "
                "or unreadable there; fix or re-export the image, or pass on_error='skip' to skip such tiles "
                "(they are listed in the provenance under 'skipped_tiles')."
            )
            raise RuntimeError(msg) from err
        self._skip(i, err)

    def func_failed(self, i: int, err: BaseException) -> None:
        if self.on_error == "raise":
            err.add_note(f"(raised while processing {self.where(i)}; on_error='skip' skips failed tiles)")
            raise err
        self._skip(i, err)

    def _skip(self, i: int, err: BaseException) -> None:
        logger.warning("Skipping %s: %s: %s", self.where(i), type(err).__name__, err)
        self.skipped += [list(b) for b in self.box_lists[i]]

    def keep(self, i: int, value: Any) -> None:
        """Store tile ``i``'s result (through ``on_result`` when given; its errors propagate)."""
        self.results[i] = value if self.on_result is None else self.on_result(i, value)

    def call(self, i: int, pixels: list[np.ndarray]) -> Any:
        rgb = pixels if self.multi[i] else pixels[0]
        args = (rgb, self.tiles[i], self.shared) if self.has_shared else (rgb, self.tiles[i])
        return self.func(*args)


def _run_local(ctx: _Context, data: Any, desc: str) -> None:
    for i in progress(range(len(ctx.tiles)), desc=desc, unit="tile"):
        try:
            pixels = [read_box(data, b) for b in ctx.box_lists[i]]
        except Exception as err:  # re-raised with the tile named, or skipped
            ctx.read_failed(i, err)
            continue
        try:
            value = ctx.call(i, pixels)
        except Exception as err:
            ctx.func_failed(i, err)
            continue
        ctx.keep(i, value)
        del pixels, value  # not held while the next tile is computed


def _clipped_slice(arr: Any, box: Box) -> tuple[Any, Box]:
    """The in-image part of ``box`` as a lazy slice, and ``box`` relative to that slice's origin."""
    y0, x0, y1, x1 = box
    height, width = int(arr.shape[1]), int(arr.shape[2])
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
    if cy1 <= cy0 or cx1 <= cx0:
        return None, box
    return arr[:3, cy0:cy1, cx0:cx1], (y0 - cy0, x0 - cx0, y1 - cy0, x1 - cx0)


def _tile_task(func: Callable[..., Any], multi: bool, tile: Any, rel_boxes: list[Box], *rest: Any) -> Any:
    """Worker side: pad each pre-read slice to its box (as ``read_box`` does) and apply ``func``."""
    n = len(rel_boxes)
    parts, shared = rest[:n], rest[n:]
    try:
        pixels = [
            read_box(part, box) if part is not None else _blank(box)
            for part, box in zip(parts, rel_boxes, strict=True)
        ]
        return func(pixels if multi else pixels[0], tile, *shared)
    except Exception as err:  # reported by the driver with the tile named
        return _TileFailure(err)


def _blank(box: Box) -> np.ndarray:
    """A box wholly outside the image: white, like ``read_box``'s fill."""
    y0, x0, y1, x1 = box
    return np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)


def _delayed_tasks(ctx: _Context, data: Any, shared: Any) -> list[Any]:
    import dask
    import dask.array as da

    arr = data.data if hasattr(data, "dims") else data
    if not isinstance(arr, da.Array):
        arr = da.from_array(np.asarray(arr), chunks=(arr.shape[0], 2048, 2048))
    task = dask.delayed(_tile_task, pure=True)
    run_id = uuid.uuid4().hex[:12]  # unique keys: concurrent runs on one cluster must not share results
    out = []
    for i, boxes in enumerate(ctx.box_lists):
        parts, rel = zip(*(_clipped_slice(arr, b) for b in boxes), strict=True)
        extra = (shared,) if ctx.has_shared else ()
        out.append(
            task(ctx.func, ctx.multi[i], ctx.tiles[i], list(rel), *parts, *extra, dask_key_name=f"bitro-tile-{run_id}-{i}")
        )
    return out


def _store(ctx: _Context, i: int, value: Any) -> None:
    if isinstance(value, _TileFailure):
        ctx.func_failed(i, value.error)
    else:
        ctx.keep(i, value)


def _run_dask(ctx: _Context, data: Any, scheduler: str, desc: str) -> None:
    """Plain dask: batches of tiles; a failed batch is retried tile by tile to name the failed tile."""
    import dask

    shared = dask.delayed(ctx.shared, pure=False) if ctx.has_shared else None
    tasks = _delayed_tasks(ctx, data, shared)
    batch = max(8, 4 * (os.cpu_count() or 1))
    bar = progress(total=len(tasks), desc=desc, unit="tile")
    try:
        for start in range(0, len(tasks), batch):
            idx = range(start, min(start + batch, len(tasks)))
            try:
                values = dask.compute(*[tasks[i] for i in idx], scheduler=scheduler)
            except Exception:  # locate the failed tile(s)
                values = None
            for k, i in enumerate(idx):
                if values is None:
                    try:
                        (value,) = dask.compute(tasks[i], scheduler=scheduler)
                    except Exception as err:
                        ctx.read_failed(i, err)
                        bar.update(1)
                        continue
                else:
                    value = values[k]
                _store(ctx, i, value)
                bar.update(1)
    finally:
        bar.close()


def _run_distributed(ctx: _Context, data: Any, client: Any, desc: str) -> None:
    """dask.distributed: one future per tile, gathered as they complete."""
    from distributed import as_completed

    shared = client.scatter(ctx.shared, broadcast=True, hash=False) if ctx.has_shared else None
    futures = client.compute(_delayed_tasks(ctx, data, shared))
    index = {f.key: i for i, f in enumerate(futures)}
    bar = progress(total=len(futures), desc=desc, unit="tile")
    try:
        for fut in as_completed(futures, loop=client.loop):
            i = index[fut.key]
            try:
                value = fut.result()
            except Exception as err:  # the read (a dependency of the tile task) failed
                ctx.read_failed(i, err)
            else:
                _store(ctx, i, value)
            finally:
                fut.release()
            bar.update(1)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
