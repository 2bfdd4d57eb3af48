"""On-disk stores of per-tile results, so a whole-slide run can be resumed.

:class:`ScratchStore` holds what the stores share: the folder check, the parameter manifest, atomic
writes and clean-up. Two stores build on it:

- :class:`TileStore` (segmentation): :func:`bitro.pp.segment_cells` with ``scratch_dir=`` writes each finished tile's nuclei to
``scratch_dir/tile_<core_y0>_<core_x0>.parquet`` (GeoParquet: ``geometry``, ``x``, ``y`` and the
``obs`` feature columns; a tile without nuclei gets an empty file, so it counts as done).
- :class:`FeatureStore` (embedding): :func:`bitro.pp.embed_cells` with ``scratch_dir=`` writes each
  finished tile task's cell indices and float32 feature rows to ``scratch_dir/tile_<i>.npz``
  (``i`` = the task's position in the run's deterministic task list).

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
from bitro.pp._tiles import Tile

MANIFEST = "manifest.json"
#: Bumped when the file layout changes, so that old folders are refused rather than misread.
FORMAT = 1
_PROBE = ".bitro_write_probe"
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))

TileResult = tuple[list[Any], list[tuple[float, float]], list[dict[str, float]]]


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
    """Result files ``tile_*<suffix>`` and a ``manifest.json`` in one folder (see the module docstring).

    Parameters
    ----------
    path
        Folder checked with :func:`check_scratch_dir`.
    manifest
        Parameters that determine the tile results (JSON-serialisable).
    """

    #: File name ending of the result files.
    suffix: str
    #: The bitro function whose results these are (segmentation manifests of format 1 do not record it).
    step: str

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = _normalise({"format": FORMAT, **manifest})
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
    def file(self, key: Any) -> Path:
        """The result file of one tile (or task) ``key``; defined by each store."""
        raise NotImplementedError

    def has(self, key: Any) -> bool:
        """Whether the result of ``key`` was written by an earlier (or this) run."""
        return self.file(key).is_file()

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

    def _remove_files(self, files: Sequence[Path]) -> None:
        """Delete ``files`` and the manifest, and the folder if nothing else is in it."""
        for f in files:
            f.unlink(missing_ok=True)
        (self.path / MANIFEST).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            logger.info("Kept scratch_dir %r: it holds other files.", str(self.path))


class TileStore(ScratchStore):
    """The per-tile nuclei of one segmentation run in ``path`` (GeoParquet; see the module docstring).

    Parameters
    ----------
    path
        Folder checked with :func:`check_scratch_dir`.
    manifest
        Parameters that determine the tile results (JSON-serialisable).
    """

    suffix = ".parquet"
    step = "segment_cells"

    # ---------------------------------------------------------------------------------------------- tiles
    def file(self, tile: Tile) -> Path:
        """``tile_<core_y0>_<core_x0>.parquet`` (core corners are unique in a grid; read boxes may not be)."""
        return self.path / f"tile_{tile.core_y0}_{tile.core_x0}.parquet"

    def write(self, tile: Tile, result: TileResult) -> int:
        """Write one tile's ``(polygons, centroids, rows)`` atomically; return the number of nuclei."""
        import geopandas as gpd

        polygons, centroids, rows = result
        xy = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
        frame = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]})
        features = pd.DataFrame(rows, columns=list(CELL_FEATURES))
        frame = pd.concat([frame, features], axis=1)
        gdf = gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(list(polygons), dtype="geometry"))
        self._atomic_write(self.file(tile), lambda tmp: _write_parquet(gdf, tmp))
        return len(polygons)

    def read(self, tiles: Sequence[Tile]) -> tuple[list[Any], np.ndarray, pd.DataFrame]:
        """Polygons, ``(n, 2)`` centroids (x, y) and features of ``tiles`` (those with a file), in order."""
        import geopandas as gpd

        parts = [gpd.read_parquet(self.file(t)) for t in tiles if self.has(t)]
        parts = [p for p in parts if len(p)]
        if not parts:
            return [], np.zeros((0, 2)), pd.DataFrame(columns=list(CELL_FEATURES))
        cells = pd.concat(parts, ignore_index=True)
        features = pd.DataFrame({c: cells[c].to_numpy() for c in CELL_FEATURES})
        return list(cells.geometry.values), cells[["x", "y"]].to_numpy(np.float64), features

    def remove(self, tiles: Sequence[Tile]) -> None:
        """Delete this run's tile files and manifest, and the folder if nothing else is in it."""
        self._remove_files([self.file(t) for t in tiles])


def _write_features(path: Path, idx: np.ndarray, features: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
        np.savez(fh, idx=idx, features=features)


class FeatureStore(ScratchStore):
    """The per-task cell features of one :func:`bitro.pp.embed_cells` run in ``path`` (see the module docstring).

    Task ``i`` (a tile, or a group of tiles in crop mode) is stored as ``tile_<i>.npz`` holding ``idx``
    (int64 row indices into the cells table) and ``features`` (float32, one row per index). The task
    list is a deterministic function of the parameters in the manifest, so ``i`` names the same cells
    in every run with that manifest.

    Parameters
    ----------
    path
        Folder checked with :func:`check_scratch_dir`.
    manifest
        Parameters that determine the features (JSON-serialisable).
    """

    suffix = ".npz"
    step = "embed_cells"

    def file(self, i: int) -> Path:
        """``tile_<i>.npz``."""
        return self.path / f"tile_{int(i)}.npz"

    def write(self, i: int, result: tuple[np.ndarray, np.ndarray]) -> int:
        """Write task ``i``'s ``(idx, features)`` atomically; return the number of cells."""
        idx, features = result
        idx = np.asarray(idx, dtype=np.int64)
        features = np.asarray(features, dtype=np.float32)
        self._atomic_write(self.file(i), lambda tmp: _write_features(tmp, idx, features))
        return len(idx)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Task ``i``'s ``(idx, features)``, or ``None`` when it has no file (e.g. skipped)."""
        if not self.has(i):
            return None
        with np.load(self.file(i), allow_pickle=False) as data:
            return data["idx"], data["features"]

    def remove(self, n_tasks: int) -> None:
        """Delete this run's task files and manifest, and the folder if nothing else is in it."""
        self._remove_files([self.file(i) for i in range(n_tasks)])


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
