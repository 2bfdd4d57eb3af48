"""The zarr store behind prepared sections: write through a partial folder, read and verify, discard.

Used by :mod:`bitro.datasets._prepared`. A store holds the tables, shapes and the tissue mask of a
prepared section (never the images) and records its key in ``attrs["bitro_prepared"]``; a store
whose key differs, or that cannot be read, is unusable (:class:`_Unusable`) and is rebuilt by the
caller. Partial folders of writers that died are removed; folders bitro did not write are never
touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitro import _keys as K
from bitro._logging import logger

if TYPE_CHECKING:
    import spatialdata as sd

#: Key of ``sdata.attrs`` holding the store's key, per-step timings and build date.
RECORD_KEY = "bitro_prepared"


class _Unusable(Exception):
    """A cached store that cannot be used (the message says why)."""


def _write_store(sdata: sd.SpatialData, path: Path, record: dict[str, Any]) -> None:
    """Write tables, shapes and labels of ``sdata`` (no images) to ``path`` through a partial folder."""
    import spatialdata as sd

    from bitro._files import remove_path

    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    remove_path(partial)
    out = sd.SpatialData(
        labels=dict(sdata.labels),
        shapes=dict(sdata.shapes),
        tables=dict(sdata.tables),
        attrs={**json.loads(json.dumps(dict(sdata.attrs), default=_json_default)), RECORD_KEY: record},
    )
    try:
        with warnings.catch_warnings():  # zarr warns about autosharding once per array
            warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)
            warnings.filterwarnings(
                "ignore", message=".*deprecated class Scaler", category=DeprecationWarning
            )
            out.write(partial)
        try:
            partial.rename(path)
        except OSError:
            if not path.exists():
                raise
            logger.info("%s was written by another process meanwhile; using that one.", path)
    finally:
        remove_path(partial)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _remove_dead_partials(path: Path) -> None:
    """Remove partial folders of ``path`` left by processes that no longer run."""
    from bitro._files import remove_path

    for partial in path.parent.glob(f".{path.name}.partial-*"):
        try:
            pid = int(partial.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            remove_path(partial)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_store(path: Path, key: dict[str, Any]) -> sd.SpatialData:
    """The store's elements (detached from the store), after checking its recorded key and content."""
    import spatialdata as sd

    try:
        with warnings.catch_warnings(), _quiet("ome_zarr"):
            warnings.simplefilter("ignore")
            stored = sd.read_zarr(path)
        record = stored.attrs.get(RECORD_KEY)
        labels = {name: _in_memory(element) for name, element in stored.labels.items()}
        tables = {name: table.copy() for name, table in stored.tables.items()}
        shapes = dict(stored.shapes)
    except Exception as err:  # any failure to read means the store is unusable
        msg = f"it cannot be read ({type(err).__name__}: {err})"
        raise _Unusable(msg) from err
    if not isinstance(record, dict) or record.get("key") != key:
        raise _Unusable("its recorded key (parameters, versions, input files) differs from this call's")
    missing = [f"table {t!r}" for t in (K.SPOTS, K.CELLS) if t not in tables]
    missing += [f"shapes {s!r}" for s in (K.shapes_key(K.SPOTS), K.shapes_key(K.CELLS)) if s not in shapes]
    if K.CELLS in tables and K.EMBEDDING not in tables[K.CELLS].obsm:
        missing.append(f"cells.obsm[{K.EMBEDDING!r}]")
    if K.SPOTS in tables and K.N_CELLS not in tables[K.SPOTS].obs:
        missing.append(f"spots.obs[{K.N_CELLS!r}]")
    if missing:
        raise _Unusable(f"it lacks {', '.join(missing)}")
    return sd.SpatialData(labels=labels, shapes=shapes, tables=tables, attrs=dict(stored.attrs))


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence logger ``name`` below ERROR (ome_zarr logs 'no parent found' for every labels element)."""
    import logging

    other = logging.getLogger(name)
    old = other.level
    other.setLevel(logging.ERROR)
    try:
        yield
    finally:
        other.setLevel(old)


def _in_memory(element: Any) -> Any:
    """A labels element with its pixels loaded (a dask array over memory, not over the store)."""
    import dask.array as da
    import numpy as np

    return element.copy(data=da.from_array(np.asarray(element.data)))


def _discard(path: Path, why: str) -> None:
    """Remove an unusable store at ``path`` if bitro wrote it; refuse anything else."""
    from bitro._files import check_replaceable, remove_path

    try:
        check_replaceable(path, kind="zarr", overwrite=True)
    except FileExistsError as err:
        msg = (
            f"The prepared-section cache entry {str(path)!r} is unusable ({why}) and is not a store bitro "
            f"wrote, so it is left alone: {err}"
        )
        raise FileExistsError(msg) from err
    logger.warning("Prepared-section cache %s is unusable (%s); rebuilding it.", path, why)
    remove_path(path)
