"""On-disk stores of per-task results, so a whole-slide run can be resumed.

The tiled-step runner (:mod:`bitro.pp._runner`) writes each finished task's result to
``scratch_dir/tile_<key><suffix>`` when a step runs with ``scratch_dir=``. :class:`ScratchStore`
holds what the stores share: the folder check, the parameter manifest, atomic writes, reading and
clean-up; each store defines the file format of one result:

- :class:`TileStore` (:func:`bitro.pp.segment_cells`): a tile's nuclei in
  ``tile_<core_y0>_<core_x0>.parquet`` (GeoParquet: ``geometry``, ``x``, ``y`` and the ``obs``
  feature columns; a tile without nuclei gets an empty file, so it counts as done).
- :class:`FeatureStore` (:func:`bitro.pp.embed_cells`): a task's cell indices and float32 feature
  rows in ``tile_<i>.npz`` (``i`` = the task's position in the run's deterministic task list).

Files are written as ``*.tmp`` and renamed with :func:`os.replace`, so a run killed mid-write never
leaves a half file that a rerun would trust. ``scratch_dir/manifest.json`` records every parameter
that determines a tile's result; a rerun with the same folder and the same parameters reads the
finished tiles instead of recomputing them, and different parameters raise an error.

The files are written by the driver process as the results arrive (also with a dask cluster), so
the folder only needs to be visible to the process that runs the step, and at most one tile's
result waits in memory to be written.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bitro._logging import logger
from bitro.io._cells import CELL_FEATURES

MANIFEST = "manifest.json"
#: Bumped when the file layout or the task list changes, so that old folders are refused rather than
#: misread (2: one tiling system for both steps, ``step`` recorded by segmentation too).
FORMAT = 2
_PROBE = ".bitro_write_probe"
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))

#: One segmentation task's result: polygons, ``(n, 2)`` centroids (x, y) and the features frame.
TileResult = tuple[list[Any], np.ndarray, pd.DataFrame]


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def _write_parquet(frame: Any, path: Path) -> None:
    frame.to_parquet(path, index=False)


def disk_full(err: OSError) -> bool:
    """Whether ``err`` says the disk (or the user's quota) is full."""
    return err.errno in _FULL


def check_writable_dir(path: str | os.PathLike[str], *, name: str, holds: str) -> Path:
    """Create folder ``path`` if needed and probe-write a small file; raise a clear error if that fails.

    Parameters
    ----------
    path
        The folder.
    name
        How the user passed it, for the message (e.g. ``"scratch_dir"``, ``"out"``).
    holds
        What will be written there, for the message (e.g. ``"the per-tile results"``).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        msg = (
            f"{name} {str(path)!r} is a file, not a folder. Pass the path of a folder (it is created "
            f"if missing) where {holds} can be written."
        )
        raise NotADirectoryError(msg)
    probe = path / _PROBE
    try:
        path.mkdir(parents=True, exist_ok=True)
        _write_bytes(probe, b"bitro")
        probe.unlink()
    except OSError as err:
        msg = (
            f"Cannot write to {name} {str(path)!r} ({type(err).__name__}: {err}). Pass a folder you can "
            f"write to (with room for {holds}), or fix its permissions."
        )
        cls = PermissionError if isinstance(err, PermissionError) else OSError
        raise (cls(msg) if err.errno is None else cls(err.errno, msg)) from err
    return path


def check_scratch_dir(path: str | os.PathLike[str]) -> Path:
    """:func:`check_writable_dir` for a ``scratch_dir`` argument."""
    return check_writable_dir(path, name="scratch_dir", holds="the per-tile results")


def _normalise(obj: Any) -> Any:
    """JSON round trip (tuples → lists, numpy scalars → Python), for comparing manifests."""
    return json.loads(json.dumps(obj, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


class ScratchStore:
    """Result files ``tile_<key><suffix>`` and a ``manifest.json`` in one folder (see the module docstring).

    One file per task of a tiled step (:mod:`bitro.pp._runner`); the subclasses define the file format
    of one task's result (:meth:`_dump`, :meth:`_load`).

    Parameters
    ----------
    path
        Folder checked with :func:`check_scratch_dir`.
    manifest
        Parameters that determine the task results (JSON-serialisable).
    step
        The bitro function whose results these are (e.g. ``"segment_cells"``); a folder written by
        another step is refused.
    """

    #: File name ending of the result files.
    suffix: str

    def __init__(self, path: Path, manifest: dict[str, Any], *, step: str) -> None:
        self.path = Path(path)
        self.step = step
        self.manifest = _normalise({"format": FORMAT, "step": step, **manifest})
        self._check_manifest()
        for stale in self.path.glob(f"tile_*{self.suffix}.tmp"):  # left by a killed write
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- manifest
    def _check_manifest(self) -> None:
        file = self.path / MANIFEST
        if not file.exists():
            if any(self.path.glob(f"tile_*{self.suffix}")):
                msg = (
                    f"scratch_dir {str(self.path)!r} holds tile files but no {MANIFEST}, so it is unknown "
                    "which parameters produced them. Use another scratch_dir, or delete that folder to start over."
                )
                raise ValueError(msg)
            try:
                _write_bytes(file, json.dumps(self.manifest, indent=1).encode())
            except OSError as err:
                raise self._write_error(file, err) from err
            return
        try:
            old = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            msg = (
                f"Cannot read {str(file)!r} ({err}). Use another scratch_dir, or delete "
                f"{str(self.path)!r} to start over."
            )
            raise ValueError(msg) from err
        if isinstance(old, dict) and old.get("step", "segment_cells") != self.step:
            msg = (
                f"scratch_dir {str(self.path)!r} holds the tiles of {old.get('step', 'segment_cells')}, not of "
                f"{self.step}. Give each step its own scratch_dir (e.g. subfolders 'segment' and 'embed')."
            )
            raise ValueError(msg)
        if old != self.manifest:
            keys = sorted(set(old) | set(self.manifest))
            diff = [
                f"{k} ({old.get(k)!r} there, {self.manifest.get(k)!r} now)"
                for k in keys
                if old.get(k) != self.manifest.get(k)
            ]
            msg = (
                f"scratch_dir {str(self.path)!r} holds tiles of {self.step} with different parameters: "
                f"{'; '.join(diff)}. Use another scratch_dir for these parameters, or delete that folder "
                "to start over."
            )
            raise ValueError(msg)

    # ---------------------------------------------------------------------------------------------- files
    def file(self, key: str) -> Path:
        """The result file ``tile_<key><suffix>`` of the task ``key``."""
        return self.path / f"tile_{key}{self.suffix}"

    def has(self, key: str) -> bool:
        """Whether the result of ``key`` was written by an earlier (or this) run."""
        return self.file(key).is_file()

    def write(self, key: str, result: Any) -> int:
        """Write one task's result atomically; return its number of cells."""
        count: list[int] = []
        self._atomic_write(self.file(key), lambda tmp: count.append(self._dump(tmp, result)))
        return count[0]

    def read(self, key: str) -> Any:
        """One task's result, or ``None`` when it has no file (e.g. skipped with ``on_error="skip"``)."""
        return self._load(self.file(key)) if self.has(key) else None

    def remove(self, keys: Sequence[str]) -> None:
        """Delete this run's task files and manifest, and the folder if nothing else is in it."""
        for key in keys:
            self.file(key).unlink(missing_ok=True)
        (self.path / MANIFEST).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            logger.info("Kept scratch_dir %r: it holds other files.", str(self.path))

    def _dump(self, path: Path, result: Any) -> int:
        """Write ``result`` to ``path``; return its number of cells (defined by each store)."""
        raise NotImplementedError

    def _load(self, path: Path) -> Any:
        """Read a result written by :meth:`_dump` (defined by each store)."""
        raise NotImplementedError

    def _atomic_write(self, target: Path, write: Any) -> None:
        """``write(tmp)`` to ``<target>.tmp``, then :func:`os.replace` it to ``target`` (no half files)."""
        tmp = target.with_name(target.name + ".tmp")
        try:
            write(tmp)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise self._write_error(target, err) from err

    def _write_error(self, target: Path, err: OSError) -> OSError:
        done = len(list(self.path.glob(f"tile_*{self.suffix}")))
        reason = "the disk is full" if disk_full(err) else f"{type(err).__name__}: {err}"
        msg = (
            f"Writing {str(target)!r} failed: {reason}. No partial file was left. Free space (or fix the "
            f"folder) and rerun the same call with scratch_dir={str(self.path)!r}: the {done} tile(s) "
            "already written there are reused, not recomputed."
        )
        return OSError(msg) if err.errno is None else OSError(err.errno, msg)


class TileStore(ScratchStore):
    """Per-tile nuclei of a segmentation run (GeoParquet; see the module docstring).

    A result is ``(polygons, centroids, features)``: shapely polygons, ``(n, 2)`` float64 centroids
    (x, y) and a :data:`~bitro.io._cells.CELL_FEATURES` frame, one row per nucleus.
    """

    suffix = ".parquet"

    def _dump(self, path: Path, result: TileResult) -> int:
        import geopandas as gpd

        polygons, centroids, features = result
        xy = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
        frame = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]})
        features = pd.DataFrame(features, columns=list(CELL_FEATURES)).reset_index(drop=True)
        frame = pd.concat([frame, features], axis=1)
        gdf = gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(list(polygons), dtype="geometry"))
        _write_parquet(gdf, path)
        return len(polygons)

    def _load(self, path: Path) -> TileResult:
        import geopandas as gpd

        cells = gpd.read_parquet(path)
        features = pd.DataFrame({c: cells[c].to_numpy() for c in CELL_FEATURES})
        return list(cells.geometry.values), cells[["x", "y"]].to_numpy(np.float64), features


def _write_features(path: Path, idx: np.ndarray, features: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
        np.savez(fh, idx=idx, features=features)


class FeatureStore(ScratchStore):
    """Per-task cell features of an embedding run (see the module docstring).

    A result is ``(idx, features)``: int64 row indices into the cells table and float32 features, one
    row per index, stored as ``tile_<i>.npz``.
    """

    suffix = ".npz"

    def _dump(self, path: Path, result: tuple[np.ndarray, np.ndarray]) -> int:
        idx, features = result
        _write_features(path, np.asarray(idx, dtype=np.int64), np.asarray(features, dtype=np.float32))
        return len(idx)

    def _load(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path, allow_pickle=False) as data:
            return data["idx"], data["features"]


def clear_scratch_dir(path: str | os.PathLike[str]) -> None:
    """Delete the bitro result files and manifest in ``path`` (nothing else), and ``path`` if then empty."""
    path = Path(path)
    if not path.is_dir():
        return
    for pattern in (MANIFEST, "tile_*.parquet", "tile_*.npz", "tile_*.parquet.tmp", "tile_*.npz.tmp"):
        for f in path.glob(pattern):
            f.unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        logger.info("Kept scratch folder %r: it holds other files.", str(path))
