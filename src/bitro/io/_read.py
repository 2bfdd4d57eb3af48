"""Pick a reader from a slide's path and read it (shared by ``bt.pp.run_pipeline`` and the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

READERS = ("st", "hest", "visium", "wsi", "zarr")
PATH_READERS = ("visium", "wsi", "zarr")  # readers that need nothing but the path
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".png", ".jpg", ".jpeg"}


def guess_reader(path: str | Path, *, option: str = "reader=") -> str:
    """Pick a reader from the input path: ``"zarr"``, ``"visium"``, ``"hest"`` or ``"wsi"``.

    ``option`` is how the caller names the override in the error message (``"--reader "`` for the CLI).
    """
    path = Path(path)
    if path.suffix == ".zarr" or (
        path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup"))
    ):
        return "zarr"
    if path.is_dir() and (path / "spatial").is_dir():
        return "visium"
    if path.is_dir() and (path / "st").is_dir() and (path / "wsis").is_dir():
        return "hest"
    if path.suffix.lower() in SLIDE_SUFFIXES:
        return "wsi"
    msg = f"cannot tell which reader to use for {str(path)!r}; pass {option}{{{','.join(READERS)}}}."
    raise ValueError(msg)


def read_sdata(path: str | Path) -> Any:
    """Read a stored slide with its integrity checked (:func:`bitro.io.read_zarr`), clear errors on failure."""
    from bitro.io._zarr import read_zarr

    return read_zarr(path)


def read_path(path: str | Path, *, reader: str | None = None) -> Any:
    """Read one slide from ``path`` with ``reader`` (guessed when ``None``); only path-only readers.

    ``"st"`` and ``"hest"`` need more than a path (count/spot files, a sample id); read those with
    :func:`bitro.io.read_st` / :func:`bitro.io.read_hest` yourself.
    """
    import bitro as bt

    path = Path(path)
    if not path.exists():
        msg = f"input {str(path)!r} not found."
        raise FileNotFoundError(msg)
    reader = reader or guess_reader(path)
    if reader == "zarr":
        return read_sdata(path)
    if reader == "visium":
        return bt.io.read_visium(path)
    if reader == "wsi":
        return bt.io.read_wsi(path)
    msg = (
        f"reader {reader!r} needs more than a path ({str(path)!r}); read the slide with "
        f"bt.io.read_{reader}(...) and pass the SpatialData (or a function returning it) by name. "
        f"Path-only readers: {PATH_READERS}."
    )
    raise ValueError(msg)
