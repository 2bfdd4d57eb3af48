"""HER2ST sections preprocessed once and cached as zarr (``bt.datasets.her2st(section, prepared=True)``).

Preparing a section runs the benchmarks' preprocessing (:class:`Preparation`): Macenko stain
normalisation, tissue detection, watershed segmentation inside the tissue, EfficientNet-Lite0 tile
embedding of every nucleus and assignment of the cells to the spots. The result (tables, shapes and
the tissue mask; not the images) is written once to a SpatialData zarr store under the cache folder
(:func:`cache_dir`); later calls read it and re-attach the kit's H&E image and its (lazy,
deterministic) normalised copy.

The store's name carries a digest of its *key*: the section, the crop, every field of the
:class:`Preparation`, :data:`PREPARATION_VERSION`, bitro's version and the sha256 of the kit files
read. The key is also recorded in the store's attrs (``attrs["bitro_prepared"]``) and compared on
every read, so a changed pipeline or changed inputs never reuse a stale store; an unreadable or
mismatching store is rebuilt (with a warning), and a folder at that path that bitro did not write
is refused, never deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitro import _keys as K
from bitro._logging import logger
from bitro.datasets._prepared_store import (
    RECORD_KEY,
    _discard,
    _read_store,
    _Unusable,
    _write_store,
)

if TYPE_CHECKING:
    import spatialdata as sd

CACHE_ENV_VAR = "BITRO_CACHE_DIR"
#: Testing hook: when set (µm), ``her2st(section, prepared=True)`` without ``crop_um`` prepares a
#: window of this side instead of the whole section (the README smoke test uses it to stay fast).
CROP_ENV_VAR = "BITRO_PREPARED_CROP_UM"
#: Version of what the preparation writes. Bump it whenever a change in ``bt.pp`` changes the
#: output of any step (segmentation, embedding, assignment, ...): every cached store is then rebuilt.
PREPARATION_VERSION = 2  # 2: neighbourhood context windows in the cell features
#: CPU minutes to prepare one whole HER2ST section (measured on C2: 2 on a quiet machine with one
#: thread per process, as in the benchmarks; 5 on a busy shared machine; see the README).
WHOLE_SECTION_CPU_MINUTES = "2–5"
_SUBFOLDER = "her2st"

Timer = Callable[[str], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Preparation:
    """How a section is prepared: the benchmarks' preprocessing. Every field is part of the cache key.

    Attributes
    ----------
    stain_method
        :func:`bitro.pp.normalize_stains` method (on image ``"he"``, written as ``"he_normalized"``).
    tissue_method
        :func:`bitro.pp.detect_tissue` method, on the normalised image.
    segment_method
        :func:`bitro.pp.segment_cells` method, on the normalised image inside the tissue mask.
    tile_size
        Tile side (px) of segmentation and embedding.
    encoders
        :func:`bitro.pp.embed_cells` encoders; the first writes ``obsm["X_bitro"]``, the others
        ``obsm["X_<encoder>"]`` (``"morphology"`` always in tile mode).
    mode
        Embedding mode, ``"tile"`` or ``"crop"``.
    embed_crop_um
        Side (µm) of the image patch described around each nucleus.
    embed_context_um
        :func:`bitro.pp.embed_cells` ``context_um``: neighbourhood windows (µm) appended to each
        cell's features (``()``: none).
    device
        Embedding device (``"cpu"``: the benchmarks' numbers, on any machine).
    seed
        Seed of the stain-pixel sampling, the segmentation and the embedding.
    keep
        With a crop, :func:`bitro.datasets.crop`'s ``keep``: ``"whole"`` keeps only spots whose
        whole disc lies in the window.
    """

    stain_method: str = "macenko"
    tissue_method: str = "otsu"
    segment_method: str = "watershed"
    tile_size: int = 1024
    encoders: tuple[str, ...] = ("efficientnet_lite0",)
    mode: str = "tile"
    embed_crop_um: float = 33.0
    embed_context_um: tuple[float, ...] = (200.0,)
    device: str = "cpu"
    seed: int = 0
    keep: str = "whole"

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``encoders`` as a list)."""
        out = dataclasses.asdict(self)
        out["encoders"] = list(self.encoders)
        out["embed_context_um"] = list(self.embed_context_um)
        return out


# ------------------------------------------------------------------------------------ the folder
def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder bitro caches prepared sections in (created when missing).

    ``path``, else ``$BITRO_CACHE_DIR``, else the platform's user cache folder
    (``~/.cache/bitro`` on Linux, ``~/Library/Caches/bitro`` on macOS,
    ``%LOCALAPPDATA%/bitro/Cache`` on Windows). Prepared HER2ST sections live in its
    ``her2st/`` subfolder, one zarr store per section, crop and set of parameters; delete the
    folder to free the space (the next call rebuilds what it needs).

    Parameters
    ----------
    path
        An explicit folder.

    Returns
    -------
    The folder, as an absolute path.

    Raises
    ------
    ValueError
        The folder lies inside the (read-only) data kit.
    """
    if path is None:
        path = os.environ.get(CACHE_ENV_VAR) or None
    if path is None:
        import platformdirs

        path = platformdirs.user_cache_dir("bitro", appauthor=False)
    folder = Path(path).expanduser().resolve()
    _refuse_inside_kit(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _refuse_inside_kit(folder: Path) -> None:
    from bitro.datasets._kit import _kit_root

    try:
        kit = _kit_root(None).resolve()
    except FileNotFoundError:
        return
    if folder == kit or kit in folder.parents:
        msg = (
            f"The cache folder {str(folder)!r} is inside the data kit {str(kit)!r}, which bitro only reads. "
            f"Set ${CACHE_ENV_VAR} (or pass cache_dir=) to a folder of your own, e.g. ~/.cache/bitro."
        )
        raise ValueError(msg)


# --------------------------------------------------------------------------------------- the key
def _inputs(section: str, data_dir: str | Path | None) -> dict[str, str]:
    """sha256 of the kit files a section is read from (counts, spot selection, image)."""
    from bitro._hashing import file_sha256
    from bitro.datasets._kit import _kit_root

    root = _kit_root(data_dir) / "her2st"
    files = {
        "counts": root / "counts" / f"{section}.tsv.gz",
        "spots": root / "spots" / f"{section}_selection.tsv",
        "image": root / "images" / f"{section}.jpg",
    }
    return {name: file_sha256(path) for name, path in files.items()}


def store_key(
    section: str,
    *,
    crop_um: float | None,
    preparation: Preparation,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Everything a prepared store depends on, as a JSON-normalised dict."""
    from bitro._version import __version__

    key = {
        "dataset": "her2st",
        "section": section,
        "crop_um": None if crop_um is None else float(crop_um),
        "preparation": preparation.as_dict(),
        "preparation_version": PREPARATION_VERSION,
        "bitro_version": __version__,
        "inputs": _inputs(section, data_dir),
    }
    return json.loads(json.dumps(key))


def store_path(key: dict[str, Any], cache_root: Path) -> Path:
    """``<cache_root>/her2st/<section>[_crop<µm>um]_<digest>.zarr`` for ``key``."""
    from bitro._hashing import json_sha256

    crop = "" if key["crop_um"] is None else f"_crop{key['crop_um']:g}um"
    return cache_root / _SUBFOLDER / f"{key['section']}{crop}_{json_sha256(key)[:12]}.zarr"


# ------------------------------------------------------------------------------------- the steps
@contextlib.contextmanager
def _timed(name: str, records: dict[str, dict[str, float]], timer: Timer | None) -> Iterator[None]:
    outer = timer(name) if timer is not None else contextlib.nullcontext()
    with outer:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            records[name] = {
                "seconds": round(time.perf_counter() - t0, 2),
                "cpu_seconds": round(time.process_time() - c0, 2),
            }


def load_section(
    section: str,
    *,
    crop_um: float | None,
    preparation: Preparation,
    data_dir: str | Path | None = None,
) -> sd.SpatialData:
    """The kit section (cut to ``crop_um`` with ``preparation.keep``), before any preparation."""
    from bitro.datasets._crop import crop
    from bitro.datasets._kit import her2st

    sdata = her2st(section, data_dir=data_dir)
    if crop_um is not None:
        sdata = crop(sdata, size_um=crop_um, keep=preparation.keep)
    return sdata


def prepare(
    sdata: sd.SpatialData,
    preparation: Preparation | None = None,
    *,
    timer: Timer | None = None,
    records: dict[str, dict[str, float]] | None = None,
    desc: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run the preparation steps on ``sdata`` in place, with a progress bar over the steps.

    Returns the wall and CPU seconds of every step (added to ``records`` when given); ``timer``
    (a context-manager factory taking the step name) wraps each step as well.
    """
    import bitro as bt
    from bitro._settings import progress

    p = preparation or Preparation()
    norm = K.IMAGE_NORMALIZED
    records = {} if records is None else records

    def embed(index: int, encoder: str) -> None:
        context = list(p.embed_context_um) if encoder != "morphology" and p.embed_context_um else None
        bt.pp.embed_cells(
            sdata,
            image_key=norm,
            encoder=encoder,
            mode=p.mode if encoder != "morphology" else "tile",
            tile_size=p.tile_size,
            crop_um=p.embed_crop_um,
            context_um=context,
            device=p.device,
            key_added=K.EMBEDDING if index == 0 else f"X_{encoder}",
            seed=p.seed,
        )

    steps: list[tuple[str, Callable[[], Any]]] = [
        (
            "stain_norm",
            lambda: bt.pp.normalize_stains(sdata, image_key=K.IMAGE, method=p.stain_method, seed=p.seed),
        ),
        ("tissue", lambda: bt.pp.detect_tissue(sdata, image_key=norm, method=p.tissue_method)),
        (
            "segmentation",
            lambda: bt.pp.segment_cells(
                sdata,
                image_key=norm,
                method=p.segment_method,
                tile_size=p.tile_size,
                tissue_key=K.TISSUE,
                seed=p.seed,
            ),
        ),
        *[(f"embed_{enc}_{p.mode}", lambda i=i, enc=enc: embed(i, enc)) for i, enc in enumerate(p.encoders)],
        ("assign_cells", lambda: bt.pp.assign_cells(sdata)),
    ]
    bar = progress(steps, desc=desc or "preparing", unit="step")
    for name, run in bar:
        bar.set_postfix_str(name)
        with _timed(name, records, timer):
            run()
    return records


def _attach_images(
    sdata: sd.SpatialData,
    section: str,
    *,
    crop_um: float | None,
    preparation: Preparation,
    data_dir: str | Path | None,
) -> None:
    """Add the kit's H&E image and its normalised copy (lazy, same parameters as the build)."""
    import bitro as bt

    kit = load_section(section, crop_um=crop_um, preparation=preparation, data_dir=data_dir)
    sdata.images[K.IMAGE] = kit.images[K.IMAGE]
    bt.pp.normalize_stains(sdata, image_key=K.IMAGE, method=preparation.stain_method, seed=preparation.seed)


# --------------------------------------------------------------------------------------- the API
def crop_from_env(crop_um: float | None) -> float | None:
    """``crop_um``, or the window side of ``$BITRO_PREPARED_CROP_UM`` when that is set and ``crop_um`` is not."""
    if crop_um is not None:
        return crop_um
    text = os.environ.get(CROP_ENV_VAR, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        msg = f"${CROP_ENV_VAR}={text!r} is not a positive window side in µm; unset it or give e.g. 1500."
        raise ValueError(msg)
    logger.warning(
        "$%s=%g: prepared sections are %g µm windows, not whole sections (a testing setting).",
        CROP_ENV_VAR,
        value,
        value,
    )
    return value


def load_prepared(
    section: str,
    *,
    crop_um: float | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    image: bool = True,
    preparation: Preparation | None = None,
    timer: Timer | None = None,
) -> sd.SpatialData:
    """A prepared section from the cache, building (and caching) it on first use.

    See :func:`bitro.datasets.her2st` (``prepared=True``) for the user-facing description;
    ``preparation`` and ``timer`` are used by the benchmarks (other encoders, per-step memory).
    """
    from bitro.datasets._kit import her2st_sections

    preparation = preparation or Preparation()
    if crop_um is not None and (not math.isfinite(float(crop_um)) or float(crop_um) <= 0):
        msg = f"crop_um must be a positive window side in µm or None (whole section), got {crop_um!r}."
        raise ValueError(msg)
    imaged = her2st_sections(data_dir, with_image=True)
    if section not in imaged:
        msg = f"HER2ST section {section!r} cannot be prepared: it is not a kit section with an H&E image {imaged}."
        raise KeyError(msg)
    key = store_key(section, crop_um=crop_um, preparation=preparation, data_dir=data_dir)
    path = store_path(key, _cache_dir(cache_dir))
    sdata = None
    if path.exists() or path.is_symlink():
        try:
            sdata = _read_store(path, key)
            logger.info("her2st %s: prepared section read from %s", section, path)
        except _Unusable as err:
            _discard(path, str(err))
    if sdata is None:
        _build(section, key, path, crop_um=crop_um, preparation=preparation, data_dir=data_dir, timer=timer)
        try:
            sdata = _read_store(path, key)
        except _Unusable as err:
            msg = f"The prepared section just written to {str(path)!r} cannot be read back: {err}."
            raise RuntimeError(msg) from err
    if image:
        _attach_images(sdata, section, crop_um=crop_um, preparation=preparation, data_dir=data_dir)
    return sdata


def _cache_dir(path: str | Path | None) -> Path:
    return cache_dir(path)


def _build(
    section: str,
    key: dict[str, Any],
    path: Path,
    *,
    crop_um: float | None,
    preparation: Preparation,
    data_dir: str | Path | None,
    timer: Timer | None,
) -> None:
    what = "the whole section" if crop_um is None else f"a {crop_um:g} µm window"
    logger.info(
        "her2st %s: preparing %s once (stain normalisation, tissue, segmentation, %s embedding, spots); "
        "a whole section takes about %s CPU minutes. Cached in %s; later calls read it.",
        section,
        what,
        "+".join(preparation.encoders),
        WHOLE_SECTION_CPU_MINUTES,
        path,
    )
    records: dict[str, dict[str, float]] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    with _timed("load", records, timer):
        sdata = load_section(section, crop_um=crop_um, preparation=preparation, data_dir=data_dir)
    prepare(
        sdata,
        preparation,
        timer=timer,
        records=records,
        desc=f"her2st {section}: one-time preparation",
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    record = {
        "key": key,
        "steps": records,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "n_cells": int(sdata.tables[K.CELLS].n_obs),
        "built_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    _write_store(sdata, path, record)
    logger.info(
        "her2st %s prepared in %.0f s (%.0f CPU s, %d cells); stored in %s",
        section,
        seconds,
        cpu,
        record["n_cells"],
        path,
    )


def read_record(path: str | Path) -> dict[str, Any]:
    """The ``attrs["bitro_prepared"]`` record of a prepared store (``{}`` when absent or unreadable)."""
    path = Path(path)
    for name in ("zarr.json", ".zattrs"):
        meta = path / name
        if meta.is_file():
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(meta.read_text())
                attrs = data.get("attributes", data)
                return dict(attrs.get(RECORD_KEY, {}))
    return {}
