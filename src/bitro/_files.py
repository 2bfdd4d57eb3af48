"""File-system helpers shared by the writers (model folders, CLI outputs, cohort runs).

The one rule they enforce: bitro replaces only what bitro wrote. ``overwrite=True`` (``--overwrite``)
lets a writer replace its *own* earlier output of the same kind — a model folder it can recognise, a
SpatialData zarr store, its metrics CSV — and nothing else: a folder of the user's files, a store with
foreign entries or a file of another kind is refused with a message (see :func:`check_replaceable`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

#: Files a saved model folder holds (``BiTroModel.save``); anything else makes it foreign.
MODEL_FILES = frozenset({"config.json", "model.safetensors"})
#: Top-level entries of a SpatialData zarr store (plus bitro's integrity record).
ZARR_ENTRIES = frozenset(
    {
        "images",
        "labels",
        "points",
        "shapes",
        "tables",
        "zarr.json",
        ".zgroup",
        ".zattrs",
        ".zmetadata",
        "zmetadata",
        "bitro_integrity.json",
    }
)
#: The manifest of a saved ensemble folder (``BiTroEnsemble.save``), beside its ``model_<i>`` folders.
ENSEMBLE_FILE = "ensemble.json"
OutputKind = Literal["model", "ensemble", "zarr", "csv"]


def remove_path(path: Path) -> None:
    """Remove a folder tree, a file or a symlink (a symlink itself, never its target); absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _foreign_ensemble(path: Path, entries: set[str]) -> str | None:
    """Why the folder ``path`` is not an ensemble bitro saved: ``ensemble.json`` and model folders only."""
    try:
        manifest = json.loads((path / ENSEMBLE_FILE).read_text())
    except (OSError, ValueError):
        return f"it has no readable {ENSEMBLE_FILE}"
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("bitro-ensemble/"):
        return f"its {ENSEMBLE_FILE} is not a bitro ensemble manifest"
    members = sorted(entries - {ENSEMBLE_FILE})
    extra = [m for m in members if not m.startswith("model_")]
    if extra:
        return f"it holds files a bitro ensemble folder does not ({extra[:5]})"
    for m in members:
        why = _foreign(path / m, "model", None)
        if why is not None:
            return f"its {m} is not a bitro model folder ({why})"
    return None


def _foreign(path: Path, kind: OutputKind, header: str | None) -> str | None:
    """Why ``path`` is not a ``kind`` output bitro wrote (``None`` when it is one)."""
    if path.is_symlink():
        return "it is a symbolic link"
    if kind == "csv":
        if not path.is_file():
            return "it is a folder, not a file" if path.is_dir() else "it is not a regular file"
        try:
            with path.open(encoding="utf-8") as fh:
                first = fh.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError):
            return "it is not a text file"
        if header is not None and first != header:
            return f"its first line is not bitro's header {header!r}"
        return None
    if not path.is_dir():
        return "it is a file, not a folder"
    entries = {p.name for p in path.iterdir()}
    if kind == "ensemble":
        return _foreign_ensemble(path, entries)
    if kind == "model":
        extra = sorted(entries - MODEL_FILES)
        if extra:
            return f"it holds files a bitro model folder does not ({extra[:5]})"
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return "it has no readable config.json"
        fmt = str(config.get("format", "")) if isinstance(config, dict) else ""
        if not fmt.startswith(("bitro-model/", "bitro-aligned-encoder/")):
            return "its config.json is not a bitro model config"
        return None
    if not entries & {"zarr.json", ".zgroup"}:
        return "it is not a zarr store"
    extra = sorted(entries - ZARR_ENTRIES)
    if extra:
        return f"it holds entries a SpatialData store does not ({extra[:5]})"
    return None


def check_replaceable(
    path: str | Path,
    *,
    kind: OutputKind,
    overwrite: bool,
    flag: str = "overwrite=True",
    header: str | None = None,
) -> Path:
    """Refuse to write ``path`` unless it is absent, or ``overwrite`` and it is bitro's own ``kind`` output.

    Parameters
    ----------
    path
        Output path.
    kind
        ``"model"`` (a folder with only ``config.json`` of a bitro model and ``model.safetensors``),
        ``"ensemble"`` (a folder with only ``ensemble.json`` and such model folders ``model_<i>``),
        ``"zarr"`` (a SpatialData zarr store with no foreign top-level entries) or ``"csv"`` (a text
        file whose first line is ``header``).
    overwrite
        Whether the caller was asked to replace an existing output.
    flag
        How the caller names the overwrite switch in messages (``"--overwrite"`` for the CLI).
    header
        ``kind="csv"``: the first line bitro writes.

    Returns
    -------
    ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false, or it is not an output bitro wrote (then nothing
        is ever replaced, whatever ``overwrite`` says).
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return path
    if not overwrite:
        msg = f"output {str(path)!r} already exists; pass {flag} to replace it, or choose another path."
        raise FileExistsError(msg)
    why = _foreign(path, kind, header)
    if why is not None:
        what = {
            "model": "model folder",
            "ensemble": "model ensemble folder",
            "zarr": "SpatialData zarr store",
            "csv": "metrics CSV",
        }[kind]
        msg = (
            f"{str(path)!r} is not a {what} written by bitro ({why}); bitro replaces only its own outputs, "
            f"even with {flag}. Move it away or choose another path."
        )
        raise FileExistsError(msg)
    return path


def write_replacing(
    write: Callable[[Path], Any],
    path: str | Path,
    *,
    kind: OutputKind,
    overwrite: bool,
    flag: str = "overwrite=True",
    header: str | None = None,
) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then move the result into place.

    ``path`` is first checked with :func:`check_replaceable` (and again just before the swap). An
    interrupted or failed write never leaves a half-written ``path`` (so a resumed run does not
    mistake it for finished work), and an existing ``path`` is only removed once the new one is
    complete, so it may even be the store the data were read from.
    """
    path = check_replaceable(path, kind=kind, overwrite=overwrite, flag=flag, header=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    try:
        write(tmp)
        if path.exists() or path.is_symlink():
            check_replaceable(path, kind=kind, overwrite=overwrite, flag=flag, header=header)  # still ours
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        remove_path(tmp)
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    if old.exists() or old.is_symlink():
        remove_path(old)
    return path
