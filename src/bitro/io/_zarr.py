"""Writing and reading SpatialData zarr stores with an integrity record (``bt.io.write_zarr`` / ``read_zarr``).

zarr reads a missing chunk file as the array's fill value (zeros), so a store damaged after it was
written (an interrupted copy or sync, a deleted file, a flipped byte) would otherwise read back as
plausible data. :func:`write_zarr` therefore records, in ``bitro_integrity.json`` at the top of the
store, every file of every element it wrote with its sha256, and a hash of the store's attributes
(``sdata.attrs``, e.g. the µm-per-pixel scale); :func:`read_zarr` checks the record before reading.

Record (JSON)::

    {"format": "bitro-integrity/1", "algorithm": "sha256", "attrs_sha256": "…",
     "elements": {"images/he": {"s0/zarr.json": "…", "s0/c/0/0/0": "…", …}, "tables/cells": {…}, …}}

Chunks that zarr never wrote (all fill value) are not files and are not recorded. The group
metadata at the top of the store (``zarr.json``, ``tables/zarr.json``, …) is not recorded either:
spatialdata rewrites it whenever an element is added, and it only mirrors the elements' own
metadata, which is recorded. Elements added to the store later (e.g. with spatialdata's
``write_element``) are read without a check (logged); bitro's in-place updates
(``bitro predict --inplace``) update the record of the tables they rewrite.
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from bitro._files import write_replacing
from bitro._hashing import file_sha256, json_sha256
from bitro._logging import logger

if TYPE_CHECKING:
    import spatialdata as sd

#: File of the integrity record, at the top level of the store (allowed by ``_files.ZARR_ENTRIES``).
INTEGRITY_FILE = "bitro_integrity.json"
FORMAT = "bitro-integrity/1"
#: Top-level folders of a SpatialData store; their subfolders are the elements.
ELEMENT_KINDS = ("images", "labels", "points", "shapes", "tables")
#: Keys of the store attributes spatialdata itself manages (its version), left out of the hash.
_SPATIALDATA_ATTRS = ("spatialdata_attrs",)
_ARRAY_METADATA = ("zarr.json", ".zarray")


# ------------------------------------------------------------------------------------------ record
def _element_folders(store: Path) -> list[str]:
    """``"kind/name"`` of every element folder in ``store``."""
    found = []
    for kind in ELEMENT_KINDS:
        folder = store / kind
        if folder.is_dir():
            found += [f"{kind}/{p.name}" for p in sorted(folder.iterdir()) if p.is_dir()]
    return found


def _hash_element(store: Path, element: str) -> dict[str, str]:
    """sha256 of every file under ``store/element``, by path relative to the element (posix)."""
    root = store / element
    hashes = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            hashes[path.relative_to(root).as_posix()] = file_sha256(path, cache=False)
    return hashes


def _store_attrs(store: Path) -> dict[str, Any]:
    """The store's attributes (``sdata.attrs``) without spatialdata's own bookkeeping."""
    meta = store / "zarr.json"
    if meta.is_file():
        attrs = json.loads(meta.read_text()).get("attributes", {})
    elif (store / ".zattrs").is_file():
        attrs = json.loads((store / ".zattrs").read_text())
    else:
        attrs = {}
    return {k: v for k, v in attrs.items() if k not in _SPATIALDATA_ATTRS}


def _save_record(store: Path, record: Mapping[str, Any]) -> None:
    tmp = store / f".{INTEGRITY_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(record, indent=0, sort_keys=True))
    os.replace(tmp, store / INTEGRITY_FILE)


def _load_record(store: Path) -> dict[str, Any] | None:
    path = store / INTEGRITY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        ok = (
            isinstance(record, dict)
            and record.get("format") == FORMAT
            and isinstance(record.get("elements"), dict)
            and all(isinstance(v, dict) for v in record["elements"].values())
        )
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        msg = (
            f"{str(path)!r} is not a readable bitro integrity record ({FORMAT}); the store was damaged or "
            "edited. Restore it from a backup or write it again; read_zarr(..., verify=False) skips the check."
        )
        raise ValueError(msg)
    return record


def record_integrity(store: str | Path) -> Path:
    """Hash every element file of ``store`` (one pass) and write its ``bitro_integrity.json``."""
    store = Path(store)
    elements = {element: _hash_element(store, element) for element in _element_folders(store)}
    record = {
        "format": FORMAT,
        "algorithm": "sha256",
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "attrs_sha256": json_sha256(_store_attrs(store)),
        "elements": elements,
    }
    _save_record(store, record)
    return store / INTEGRITY_FILE


def update_integrity(store: str | Path, elements: Iterable[str]) -> None:
    """Re-hash ``elements`` (``"tables/spots"``, …) of ``store`` after bitro rewrote them in place.

    A store without a record is left without one (it was not written by :func:`write_zarr`).
    """
    store = Path(store)
    record = _load_record(store)
    if record is None:
        return
    for element in elements:
        if (store / element).is_dir():
            record["elements"][element] = _hash_element(store, element)
        else:
            record["elements"].pop(element, None)
    _save_record(store, record)


def _array_of(element: str, files: Mapping[str, str], rel: str) -> tuple[str, str]:
    """The array (``element/…``) holding file ``rel`` of ``element``, and the file's chunk key in it."""
    path = PurePosixPath(rel)
    for parent in path.parents:
        if any((parent / meta).as_posix() in files for meta in _ARRAY_METADATA) and parent != path:
            array = element if str(parent) == "." else f"{element}/{parent.as_posix()}"
            return array, path.relative_to(parent).as_posix()
    return element, rel


def verify_store(store: str | Path) -> bool:
    """Check ``store`` against its integrity record; ``False`` when it has none.

    Raises
    ------
    ValueError
        A recorded file is missing (naming the element, array and chunk) or its bytes changed
        (naming the file), or the store's attributes changed.
    """
    store = Path(store)
    record = _load_record(store)
    if record is None:
        return False
    fix = (
        "The store was damaged or changed after bitro wrote it (e.g. an interrupted copy or sync, or an "
        "edit); restore it from a backup or write it again. read_zarr(..., verify=False) reads it anyway."
    )
    for element, files in record["elements"].items():
        missing = [rel for rel in files if not (store / element / rel).is_file()]
        if not missing:
            continue
        if len(missing) == len(files):
            msg = f"Store {str(store)!r}: element {element!r} is missing ({len(files)} files). {fix}"
            raise ValueError(msg)
        array, chunk = _array_of(element, files, missing[0])
        more = f" ({len(missing)} files of {element!r} are missing in all)" if len(missing) > 1 else ""
        what = (
            f"chunk {chunk!r} of array {array!r}" if array != element or "/" in chunk else f"file {chunk!r}"
        )
        msg = f"Store {str(store)!r}: {what} is missing{more}; zarr would read it as zeros. {fix}"
        raise ValueError(msg)
    for element, files in record["elements"].items():
        for rel, digest in files.items():
            if file_sha256(store / element / rel, cache=False) != digest:
                array, chunk = _array_of(element, files, rel)
                msg = (
                    f"Store {str(store)!r}: file {f'{element}/{rel}'!r} (chunk {chunk!r} of array {array!r}) "
                    f"has changed since bitro wrote it (its sha256 differs from {INTEGRITY_FILE}). {fix}"
                )
                raise ValueError(msg)
    if "attrs_sha256" in record and json_sha256(_store_attrs(store)) != record["attrs_sha256"]:
        msg = (
            f"Store {str(store)!r}: its attributes (sdata.attrs, e.g. the µm-per-pixel scale) have changed since "
            f"bitro wrote it. {fix}"
        )
        raise ValueError(msg)
    unrecorded = sorted(set(_element_folders(store)) - set(record["elements"]))
    if unrecorded:
        logger.info(
            "%s: elements %s were added after bitro wrote the store; they are read without an integrity check.",
            store,
            unrecorded,
        )
    return True


# ------------------------------------------------------------------------------------------ public
def write_store(sdata: sd.SpatialData, path: str | Path) -> Path:
    """Write ``sdata`` to the new store ``path`` and record its integrity (no overwrite checks)."""
    path = Path(path)
    with warnings.catch_warnings():  # zarr warns about autosharding once per array
        warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)
        sdata.write(path, update_sdata_path=False)
    record_integrity(path)
    return path


def write_zarr(sdata: sd.SpatialData, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a SpatialData object to a zarr store with an integrity record that :func:`read_zarr` checks.

    The store is written to a temporary sibling and moved into place when complete, with
    ``bitro_integrity.json`` listing every file of every element and its sha256 (and a hash of
    ``sdata.attrs``). Chunks zarr does not write (all zeros) are not files and need no record.

    Parameters
    ----------
    sdata
        The data to write (left unchanged; its lazy images are read while writing).
    path
        The store to create (e.g. ``"slide.zarr"``).
    overwrite
        Replace an existing ``path``, only if it is a SpatialData store (never a folder of other
        files); the old store is removed only once the new one is complete, so it may be the store
        ``sdata`` was read from.

    Returns
    -------
    The store's path.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false, or it is not a SpatialData store.

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.synthetic_tissue(1, size=400)[0]  # doctest: +SKIP
    >>> bt.io.write_zarr(sdata, "slide.zarr")  # doctest: +SKIP
    >>> sdata = bt.io.read_zarr("slide.zarr")  # verified  # doctest: +SKIP
    """
    return write_replacing(lambda tmp: write_store(sdata, tmp), path, kind="zarr", overwrite=overwrite)


def read_zarr(path: str | Path, *, verify: bool = True) -> sd.SpatialData:
    """Read a SpatialData zarr store, first checking the integrity record :func:`write_zarr` left in it.

    Parameters
    ----------
    path
        A SpatialData zarr store.
    verify
        Check the store against its ``bitro_integrity.json``: every recorded file must exist and
        have its recorded sha256 (this reads every file once), and the store's attributes must be
        unchanged. A store without a record (not written by bitro, e.g. by ``sdata.write``) is read
        with a logged note that it cannot be checked. ``False`` skips the check.

    Returns
    -------
    The SpatialData object (images lazy, as :func:`spatialdata.read_zarr` gives them).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a readable store, or (``verify``) a recorded file is missing — naming the
        element, array and chunk — or changed — naming the file.
    """
    import spatialdata as sd

    path = Path(path)
    if not path.exists():
        msg = f"{str(path)!r} not found; give the path of a SpatialData zarr store (e.g. written by `bitro preprocess`)."
        raise FileNotFoundError(msg)
    if not path.is_dir():
        msg = f"{str(path)!r} is a file, not a zarr store (a folder); give the path of a SpatialData zarr store."
        raise ValueError(msg)
    if verify and not verify_store(path):
        logger.info(
            "%s has no %s (not written by bitro.io.write_zarr); its integrity cannot be checked.",
            path,
            INTEGRITY_FILE,
        )
    try:
        return sd.read_zarr(path)
    except Exception as err:
        msg = f"{str(path)!r} is not a readable SpatialData zarr store ({type(err).__name__}: {err})."
        raise ValueError(msg) from err
