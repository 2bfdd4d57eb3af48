"""One registry of slide readers, used by ``bt.io``, ``bt.pp.run_pipeline`` and the ``bitro`` command line.

A :class:`Reader` reads a slide from a path, given a few generic options (``sample_id``, ``mpp``,
``image``, ``counts``, ``spots``, ``bulk``, ``cells``); it may recognise the paths it reads
(``detect``), which is how :func:`guess_reader` picks one. Registering a reader
(:func:`register_reader`) makes it a ``reader=`` choice everywhere: ``read_path``, ``run_pipeline``
and ``bitro preprocess --reader``. Readers are listed in registration order; detection tries them in
that order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The generic options a reader may take (the command line's ``--sample-id``, ``--mpp``, ...).
OPTIONS = ("sample_id", "mpp", "image", "counts", "spots", "bulk", "cells")
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class Reader:
    """A registered way to read a slide from a path.

    Attributes
    ----------
    name
        The ``reader=`` name.
    read
        ``read(path, **options) -> SpatialData`` taking the options in ``options``.
    detect
        ``detect(path) -> bool``: whether a path looks like this reader's input (``None``: never guessed).
    options
        Generic options it uses (of :data:`OPTIONS`); others given are ignored with a warning.
    needs
        Options it cannot do without.
    description
        One line for help texts.
    """

    name: str
    read: Callable[..., Any]
    detect: Callable[[Path], bool] | None = None
    options: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    description: str = ""


_READERS: dict[str, Reader] = {}


def register_reader(
    name: str,
    read: Callable[..., Any],
    *,
    detect: Callable[[Path], bool] | None = None,
    options: tuple[str, ...] = (),
    needs: tuple[str, ...] = (),
    description: str = "",
    overwrite: bool = False,
) -> Reader:
    """Register a slide reader under ``name`` (see :class:`Reader`); returns it.

    Examples
    --------
    >>> import bitro as bt
    >>> def read_mine(path, *, sample_id=None):
    ...     return bt.io.read_wsi(path, mpp=0.5, sample_id=sample_id)
    >>> bt.io.register_reader("mine", read_mine, options=("sample_id",))  # doctest: +SKIP
    """
    unknown = sorted(set(options) - set(OPTIONS)) + sorted(set(needs) - set(options))
    if unknown:
        msg = f"reader {name!r}: options must be among {OPTIONS} and needs among its options; got {unknown}."
        raise ValueError(msg)
    if name in _READERS and not overwrite:
        msg = f"a reader named {name!r} is registered already; pass overwrite=True to replace it."
        raise ValueError(msg)
    reader = Reader(name, read, detect, tuple(options), tuple(needs), description)
    _READERS[name] = reader
    return reader


def list_readers() -> list[str]:
    """Names of the registered readers, in registration (and detection) order."""
    return list(_READERS)


def get_reader(name: str) -> Reader:
    """The reader ``name``; unknown names raise with the registered ones."""
    if name not in _READERS:
        msg = (
            f"unknown reader {name!r}; registered readers: {list_readers()} (bt.io.register_reader adds one)."
        )
        raise ValueError(msg)
    return _READERS[name]


def guess_reader(path: str | Path, *, option: str = "reader=") -> str:
    """The first registered reader that recognises ``path``.

    ``option`` is how the caller names the override in the error message (``"--reader "`` for the CLI).
    """
    path = Path(path)
    for reader in _READERS.values():
        if reader.detect is not None and reader.detect(path):
            return reader.name
    msg = f"cannot tell which reader to use for {str(path)!r}; pass {option}{{{','.join(list_readers())}}}."
    raise ValueError(msg)


def read_path(path: str | Path, *, reader: str | None = None, **options: Any) -> Any:
    """Read one slide from ``path`` with ``reader`` (guessed when ``None``) and the generic ``options``.

    Options the reader does not use are ignored with a warning; a missing required option raises.
    """
    from bitro._logging import logger

    path = Path(path)
    if not path.exists():
        msg = f"input {str(path)!r} not found."
        raise FileNotFoundError(msg)
    r = get_reader(reader or guess_reader(path))
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        msg = f"unknown reader option(s) {unknown}; the generic options are {OPTIONS}."
        raise TypeError(msg)
    missing = [n for n in r.needs if n not in given]
    if missing:
        flags = ", ".join(f"{n}= (--{n.replace('_', '-')})" for n in missing)
        msg = f"reader {r.name!r} needs {flags} to read {str(path)!r}."
        raise ValueError(msg)
    for name in sorted(set(given) - set(r.options)):
        logger.warning("%s is ignored by reader %r", name, r.name)
    return r.read(path, **{k: v for k, v in given.items() if k in r.options})


def read_sdata(path: str | Path) -> Any:
    """Read a stored slide with its integrity checked (:func:`bitro.io.read_zarr`), clear errors on failure."""
    from bitro.io._zarr import read_zarr

    return read_zarr(path)


# ------------------------------------------------------------------------------------- built-in readers
def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (
        path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup"))
    )


def _read_zarr(path: Path) -> Any:
    return read_sdata(path)


def _read_visium(path: Path, *, image: Any = None, sample_id: str | None = None) -> Any:
    from bitro.io._visium import read_visium

    return read_visium(path, fullres_image=image, sample_id=sample_id)


def _is_xenium(path: Path) -> bool:
    return path.is_dir() and (path / "experiment.xenium").is_file()


def _read_xenium(path: Path, *, sample_id: str | None = None) -> Any:
    from bitro.io._xenium import read_xenium

    return read_xenium(path, sample_id=sample_id)


def _read_hest(path: Path, *, sample_id: str, cells: bool = True) -> Any:
    from bitro.io._hest import read_hest

    return read_hest(path, sample_id, cells=cells)


def _read_wsi(path: Path, *, bulk: Any = None, mpp: float | None = None, sample_id: str | None = None) -> Any:
    from bitro.io._wsi import read_wsi

    return read_wsi(path, bulk=bulk, mpp=mpp, sample_id=sample_id)


def _read_st(
    path: Path,
    *,
    spots: str | Path,
    counts: str | Path | None = None,
    image: str | Path | None = None,
    mpp: float | None = None,
    sample_id: str | None = None,
) -> Any:
    """Legacy ST: ``path`` is the counts file, or a folder holding ``counts``/``spots``/``image`` names."""
    from bitro.io._st import read_st

    if path.is_dir():
        if counts is None:
            msg = f"reader 'st' with the folder {str(path)!r} needs counts= (--counts) and spots= (--spots): file names in it."
            raise ValueError(msg)
        counts_file, spots_file = path / counts, path / spots
        image_file = None if image is None else path / image
    else:
        counts_file, spots_file, image_file = path, Path(spots), None if image is None else Path(image)
    return read_st(counts_file, spots_file, image_file, mpp=mpp, sample_id=sample_id)


register_reader("zarr", _read_zarr, detect=_is_zarr, description="a SpatialData zarr store (bitro's or any)")
register_reader(
    "visium",
    _read_visium,
    detect=lambda p: p.is_dir() and (p / "spatial").is_dir(),
    options=("image", "sample_id"),
    description="a Space Ranger output folder (image: the full-resolution H&E)",
)
register_reader(
    "xenium",
    _read_xenium,
    detect=_is_xenium,
    options=("sample_id",),
    description="a Xenium output folder (cell-resolved truth)",
)
register_reader(
    "hest",
    _read_hest,
    detect=lambda p: p.is_dir() and (p / "st").is_dir() and (p / "wsis").is_dir(),
    options=("sample_id", "cells"),
    needs=("sample_id",),
    description="the HEST-1k root folder (sample_id: the sample)",
)
register_reader(
    "wsi",
    _read_wsi,
    detect=lambda p: p.suffix.lower() in SLIDE_SUFFIXES,
    options=("bulk", "mpp", "sample_id"),
    description="a whole-slide or plain image (bulk: the slide's bulk profile)",
)
register_reader(
    "st",
    _read_st,
    options=("spots", "counts", "image", "mpp", "sample_id"),
    needs=("spots",),
    description="legacy ST: a counts file (or a folder with counts=, spots=, image=)",
)
