"""Nucleus segmentation backends and their registry (``bt.pp.register_segmenter``, ``bt.pp.list_segmenters``).

A *backend* is a :class:`Segmenter`. :func:`bitro.pp.segment_cells` owns what every backend shares
(tiling with overlap, stitching, the tissue mask, the area filter, dask, resume, provenance); a
backend only says how to find nuclei. There are two kinds:

- ``kind = "tiles"``: :meth:`Segmenter.segment_tile` turns one ``(h, w, 3)`` uint8 RGB tile into an
  ``(h, w)`` integer instance mask (0 = background). :meth:`Segmenter.prepare` runs once per slide
  before the tiles (the watershed fixes its hematoxylin threshold there). The backend object is sent
  to each dask worker once, so it must be picklable to run on process-based workers.
- ``kind = "import"``: :meth:`Segmenter.import_cells` reads a finished whole-slide segmentation
  (CellViT, HoVer-Net, HEST files, through :func:`bitro.io.read_cell_segmentation`).

:meth:`Segmenter.params` describes the backend (JSON); it is recorded in ``uns`` and in the scratch
manifest, so it must name everything that changes the result.

Names map to *factories* (callables returning a Segmenter, or a function ``(rgb, mpp) -> labels``).
``method="name:argument"`` calls ``factory("argument")`` (e.g. a file path) and
``method_kwargs`` are passed as keywords, so backend options never enter ``segment_cells``'s own
signature. Built in: ``"watershed"``; the importers ``"cellvit"``, ``"hovernet"``, ``"hest"`` and
``"import"`` (any supported file); ``"stardist"`` and ``"cellpose"`` (optional packages and your own
local weights, :mod:`bitro.pp._segmenters_external`).

A new backend touches at most three files: its module (``src/bitro/pp/_segmenters_<name>.py``), one
``register_segmenter`` line at the end of this module, and its test (``tests/pp/test_segmenters.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro.pp import _watershed
from bitro.pp._tiles import read_box, tile_grid
from bitro.pp._watershed import WatershedParams, estimate_threshold, smoothed_hematoxylin

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

__all__ = [
    "CallableSegmenter",
    "ImportedSegmentation",
    "Segmenter",
    "WatershedSegmenter",
    "get_segmenter",
    "list_segmenters",
    "register_segmenter",
]

#: ``kind`` of the backends.
KINDS = ("tiles", "import")


class Segmenter:
    """Base class of nucleus segmentation backends (see the module docstring for the contract)."""

    name: str = "segmenter"
    kind: str = "tiles"

    def prepare(
        self, image: Any, *, mpp: float, tissue: Any, seed: int, area_um2: tuple[float, float]
    ) -> None:
        """Slide-wide set-up before the tiles (default: nothing).

        Parameters
        ----------
        image
            ``(c, y, x)`` level-0 image (lazy).
        mpp
            µm per level-0 pixel.
        tissue
            The tissue labels element (:func:`bitro.pp.detect_tissue`), or ``None``.
        seed
            Seed for any sampling.
        area_um2
            ``(min, max)`` nucleus area in µm² of this call (nuclei outside are dropped afterwards).
        """

    def segment_tile(self, rgb: np.ndarray, mpp: float) -> np.ndarray:
        """``(h, w)`` integer instance mask (0 = background) of an ``(h, w, 3)`` uint8 tile."""
        msg = f"Segmenter {self.name!r} does not segment tiles (kind={self.kind!r})."
        raise NotImplementedError(msg)

    def import_cells(
        self, sdata: sd.SpatialData, *, key_added: str, mpp: float, overwrite: bool
    ) -> ad.AnnData:
        """Write a finished segmentation into ``sdata`` (``kind == "import"``) and return its table."""
        msg = f"Segmenter {self.name!r} does not import segmentations (kind={self.kind!r})."
        raise NotImplementedError(msg)

    def params(self) -> dict[str, Any]:
        """Backend parameters (JSON): recorded in ``uns`` and in the scratch manifest."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


class CallableSegmenter(Segmenter):
    """A function ``(rgb_tile, mpp) -> labels`` as a tile backend (the hook for models you load yourself).

    Parameters
    ----------
    func
        Takes an ``(h, w, 3)`` uint8 tile and its µm per pixel, returns an ``(h, w)`` integer (or
        boolean) mask.
    name
        Name recorded in the provenance (default: the function's name).
    """

    def __init__(self, func: Callable[[np.ndarray, float], Any], *, name: str | None = None) -> None:
        self.func = func
        self.name = name or getattr(func, "__name__", type(func).__name__)

    def segment_tile(self, rgb: np.ndarray, mpp: float) -> np.ndarray:
        """Call the function."""
        return self.func(rgb, mpp)

    def params(self) -> dict[str, Any]:
        """The function's qualified name (so a scratch folder of another function is refused)."""
        qualname = getattr(self.func, "__qualname__", type(self.func).__name__)
        return {"function": f"{getattr(self.func, '__module__', '')}.{qualname}"}


# ----------------------------------------------------------------------------------------------------------
# the built-in watershed
# ----------------------------------------------------------------------------------------------------------
#: Side (px) and maximum number of the boxes sampled to fix the slide-wide hematoxylin threshold.
_SAMPLE_SIZE = 1024
_MAX_SAMPLES = 16
#: Boxes at least this much covered by tissue are preferred for the threshold sample.
_DENSE_FRACTION = 0.5
#: WatershedParams fields set by segment_cells itself (its common area filter).
_COMMON_FIELDS = ("min_area_um2", "max_area_um2")


class WatershedSegmenter(Segmenter):
    """The built-in classical method (:mod:`bitro.pp._watershed`), no weights needed.

    Hematoxylin by colour deconvolution, smoothing, a Li threshold fixed once per slide, a
    distance-transform h-maxima watershed and size filters.

    Parameters
    ----------
    threshold
        Hematoxylin optical-density cut; default estimated once per slide on up to 16 boxes of
        1024 px, so that every tile uses the same cut. With a tissue mask, boxes at least half
        covered by tissue are preferred and only their tissue pixels count, so the cut of a whole
        section matches that of a window cut from its interior.
    **params
        Fields of :class:`~bitro.pp._watershed.WatershedParams` (``sigma_um``, ``h_um``,
        ``threshold_method``, …) except the area bounds, which are ``segment_cells``'s own
        ``min_area_um2`` / ``max_area_um2``.
    """

    name = "watershed"

    def __init__(self, *, threshold: float | None = None, **params: Any) -> None:
        valid = [f.name for f in fields(WatershedParams) if f.name not in _COMMON_FIELDS]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            common = [k for k in unknown if k in _COMMON_FIELDS]
            hint = (
                f" {common} are options of bt.pp.segment_cells itself (they apply to every method)."
                if common
                else ""
            )
            msg = f"Unknown watershed option(s) {unknown}; valid method_kwargs are {['threshold', *valid]}.{hint}"
            raise TypeError(msg)
        self.threshold = None if threshold is None else float(threshold)
        self.options = WatershedParams(**params)
        self._threshold = self.threshold

    def prepare(
        self, image: Any, *, mpp: float, tissue: Any, seed: int, area_um2: tuple[float, float]
    ) -> None:
        """Apply the area bounds and fix the slide's threshold (unless given)."""
        self.options = replace(self.options, min_area_um2=area_um2[0], max_area_um2=area_um2[1])
        shape_yx = (int(image.shape[1]), int(image.shape[2]))
        self._threshold = (
            self.threshold
            if self.threshold is not None
            else slide_threshold(image, shape_yx, mpp, self.options, tissue, seed)
        )

    def segment_tile(self, rgb: np.ndarray, mpp: float) -> np.ndarray:
        """:func:`bitro.pp._watershed.segment_tile` with the slide's threshold."""
        return _watershed.segment_tile(rgb, mpp, threshold=self._threshold, params=self.options)

    def params(self) -> dict[str, Any]:
        """The :class:`~bitro.pp._watershed.WatershedParams` fields and the threshold used."""
        return {
            **asdict(self.options),
            "threshold": None if self._threshold is None else float(self._threshold),
        }


def _box_tissue(mask: Any, box: tuple[int, int, int, int], step: int) -> np.ndarray | None:
    """Tissue mask of a level-0 box ``(y0, x0, y1, x1)`` sampled every ``step`` pixels (nearest)."""
    if mask is None:
        return None
    from bitro.pp._tissue import _mask_scale

    sy, sx = _mask_scale(mask)
    arr = np.asarray(mask.data)
    y0, x0, y1, x1 = box
    rows = np.clip((np.arange(y0, y1, step) / sy).astype(int), 0, arr.shape[0] - 1)
    cols = np.clip((np.arange(x0, x1, step) / sx).astype(int), 0, arr.shape[1] - 1)
    return arr[np.ix_(rows, cols)] > 0


def slide_threshold(
    data: Any, shape_yx: tuple[int, int], mpp: float, params: WatershedParams, mask: Any, seed: int
) -> float:
    """One hematoxylin threshold for the whole image, from up to 16 boxes of 1024 px.

    With a tissue mask, boxes mostly covered by tissue are preferred and only their tissue pixels
    enter the histogram: glass and thin tissue at the section's edge would otherwise pull the cut
    down and merge neighbouring nuclei (measured on HER2ST C2: a whole-section estimate from all
    pixels of random tissue boxes gave 0.015 and median nucleus area 78 µm², a central-window
    estimate 0.025 and 50 µm²).
    """
    boxes = tile_grid(shape_yx, tile_size=_SAMPLE_SIZE, overlap=0)
    if mask is not None:
        from bitro.pp._tissue import tissue_fraction

        fractions = np.array([tissue_fraction(mask, (t.x0, t.y0, t.x1, t.y1)) for t in boxes])
        dense = fractions >= _DENSE_FRACTION
        keep = dense if dense.any() else fractions > 0
        boxes = [t for t, k in zip(boxes, keep) if k]
    if not boxes:
        return estimate_threshold(np.zeros(1, dtype=np.float32), params=params)
    if len(boxes) > _MAX_SAMPLES:
        rng = np.random.default_rng(seed)
        boxes = [boxes[i] for i in sorted(rng.choice(len(boxes), _MAX_SAMPLES, replace=False))]
    values = []
    for t in boxes:
        h = smoothed_hematoxylin(read_box(data, t.box), mpp, params.sigma_um)[::2, ::2]
        inside = _box_tissue(mask, t.box, 2)
        if inside is not None and inside.shape == h.shape and inside.any():
            h = h[inside]
        values.append(h.ravel())
    return estimate_threshold(np.concatenate(values), params=params)


# ----------------------------------------------------------------------------------------------------------
# importers of finished segmentations
# ----------------------------------------------------------------------------------------------------------
class ImportedSegmentation(Segmenter):
    """A whole-slide segmentation read from a file (:func:`bitro.io.read_cell_segmentation`).

    Parameters
    ----------
    path
        The file; polygons in level-0 pixels of the slide's image.
    format
        ``"auto"``, ``"geojson"`` (CellViT, QuPath), ``"hovernet"`` or ``"geoparquet"`` (HEST).
    name
        Name recorded as the method.
    """

    kind = "import"

    def __init__(self, path: str | os.PathLike[str], *, format: str = "auto", name: str = "import") -> None:
        self.path, self.format, self.name = Path(path), format, name
        if not self.path.is_file():
            msg = f"Cell segmentation file {str(self.path)!r} (method={name!r}) does not exist."
            raise FileNotFoundError(msg)

    def import_cells(
        self, sdata: sd.SpatialData, *, key_added: str, mpp: float, overwrite: bool
    ) -> ad.AnnData:
        """Read the file into ``sdata`` (table ``key_added`` and its shapes)."""
        from bitro.io._cells import read_cell_segmentation

        return read_cell_segmentation(
            sdata, self.path, format=self.format, key_added=key_added, mpp=mpp, overwrite=overwrite
        )

    def params(self) -> dict[str, Any]:
        """Source file and format."""
        return {"source": str(self.path), "format": self.format}


def _importer(name: str, fmt: str, what: str) -> Callable[..., Segmenter]:
    def factory(path: str | os.PathLike[str] | None = None) -> Segmenter:
        if path is None:
            msg = (
                f"method={name!r} imports {what}; give the file: method='{name}:/path/to/file' or "
                "method_kwargs={'path': '/path/to/file'}."
            )
            raise ValueError(msg)
        return ImportedSegmentation(path, format=fmt, name=name)

    return factory


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_segmenter(name: str, factory: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Register a nucleus segmentation backend under ``name``.

    Parameters
    ----------
    name
        Name used as ``bt.pp.segment_cells(sdata, method=name)``; must not contain ``":"``.
    factory
        Callable returning a :class:`~bitro.pp._segmenters.Segmenter` or a function
        ``(rgb_tile (h, w, 3) uint8, mpp) -> (h, w) int labels`` (wrapped automatically).
        ``method="name:argument"`` calls ``factory("argument")``, plain ``"name"`` calls
        ``factory()``; ``segment_cells(..., method_kwargs={...})`` adds keyword arguments.
    overwrite
        Replace an existing registration of ``name``.

    Examples
    --------
    >>> import bitro as bt
    >>> from scipy import ndimage
    >>> bt.pp.register_segmenter(
    ...     "dark_blobs", lambda level=100: (lambda rgb, mpp: ndimage.label(rgb[..., 1] < level)[0])
    ... )
    """
    if not isinstance(name, str) or not name or ":" in name:
        msg = f"Segmenter names must be non-empty strings without ':', got {name!r}."
        raise ValueError(msg)
    if not callable(factory):
        msg = f"factory for segmenter {name!r} must be callable, got {type(factory).__name__}."
        raise TypeError(msg)
    if name in _REGISTRY and not overwrite:
        msg = f"Segmenter {name!r} is already registered; pass overwrite=True to replace it or choose another name."
        raise ValueError(msg)
    _REGISTRY[name] = factory


def list_segmenters() -> list[str]:
    """Names of the registered segmentation backends (sorted).

    ``"cellvit"``, ``"hovernet"``, ``"hest"`` and ``"import"`` read a file
    (``method="cellvit:/path/cells.geojson"``); ``"stardist"`` and ``"cellpose"`` need their package
    and your local weights (``method_kwargs``).
    """
    return sorted(_REGISTRY)


def get_segmenter(method: Any, method_kwargs: dict[str, Any] | None = None) -> Segmenter:
    """Resolve ``method`` (name, ``"name:arg"``, Segmenter or function) with ``method_kwargs`` to a Segmenter."""
    kwargs = dict(method_kwargs or {})
    if isinstance(method, Segmenter) or (callable(method) and not isinstance(method, str)):
        if kwargs:
            msg = (
                f"method_kwargs={kwargs} apply to a registered method name; configure the "
                f"{type(method).__name__} you pass yourself instead."
            )
            raise ValueError(msg)
        return _wrap(method, name=None)
    if isinstance(method, str):
        if method in _REGISTRY:
            return _wrap(_REGISTRY[method](**kwargs), name=method)
        prefix, sep, arg = method.partition(":")
        if sep and prefix in _REGISTRY and arg:
            return _wrap(_REGISTRY[prefix](arg, **kwargs), name=prefix)
    msg = (
        f"Unknown segmentation method {method!r}. Registered methods: {list_segmenters()}. Pass one of "
        "these names (importers: 'cellvit:/path/to/file'), a bitro Segmenter, a callable "
        "(rgb_tile, mpp) -> int label mask (for models you load yourself), or register your own with "
        "bt.pp.register_segmenter."
    )
    raise ValueError(msg)


def _wrap(obj: Any, *, name: str | None) -> Segmenter:
    if isinstance(obj, Segmenter):
        if obj.kind not in KINDS:
            msg = f"Segmenter {obj.name!r} has kind={obj.kind!r}; it must be one of {KINDS}."
            raise ValueError(msg)
        return obj
    if callable(obj):
        return CallableSegmenter(obj, name=name)
    msg = (
        f"Cannot use {type(obj).__name__} as a segmentation method; expected a Segmenter or a function "
        f"(rgb_tile, mpp) -> labels. Registered methods: {list_segmenters()}."
    )
    raise TypeError(msg)


# ----------------------------------------------------------------------------------------------------------
# built-in factories
# ----------------------------------------------------------------------------------------------------------
def _stardist(*args: Any, **kwargs: Any) -> Segmenter:
    from bitro.pp._segmenters_external import StarDistSegmenter

    return StarDistSegmenter(*args, **kwargs)


def _cellpose(*args: Any, **kwargs: Any) -> Segmenter:
    from bitro.pp._segmenters_external import CellposeSegmenter

    return CellposeSegmenter(*args, **kwargs)


register_segmenter("watershed", WatershedSegmenter)
register_segmenter("cellvit", _importer("cellvit", "geojson", "a CellViT GeoJSON export"))
register_segmenter("hovernet", _importer("hovernet", "hovernet", "a HoVer-Net JSON ({'nuc': ...})"))
register_segmenter("hest", _importer("hest", "geoparquet", "a HEST CellViT GeoParquet file"))
register_segmenter("import", _importer("import", "auto", "a GeoJSON, HoVer-Net JSON or GeoParquet file"))
register_segmenter("stardist", _stardist)
register_segmenter("cellpose", _cellpose)
