"""Stain normalisation of H&E images: fit a reference once, re-paint tile by tile (method.md §2.1).

The numerical core lives in :mod:`bitro.pp._stain_methods`; this module handles the reference
object, input checks, sampling tissue pixels from a (possibly huge, lazy) slide, and writing the
normalised image back into the SpatialData object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro._validate import check_not_exists
from bitro.pp import _stain_methods as M

if TYPE_CHECKING:
    import spatialdata as sd

METHODS = ("vahadane", "macenko", "reinhard")
_MATRIX_METHODS = ("vahadane", "macenko")
#: Key of ``sdata.attrs`` holding the provenance of every normalised image.
STAIN_ATTRS_KEY = "bitro_stain"
_DEFAULT_FILE = "stain_reference_default.json"
#: Images with at most this many level-0 pixels are read whole when sampling; larger ones by windows.
_WHOLE_IMAGE_PIXELS = 4096 * 4096
_WINDOW = 256
_N_WINDOWS = 32
_THUMBNAIL_SIDE = 1024
_FORMAT_VERSION = 1


def _check_method(method: str) -> str:
    if method not in METHODS:
        msg = f"Unknown stain normalisation method {method!r}; choose one of {list(METHODS)}."
        raise ValueError(msg)
    return method


def _as_array(values: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.array(values, dtype=np.float64)
    if arr.shape != shape or not np.all(np.isfinite(arr)):
        msg = f"StainReference.{name} must be a finite array of shape {shape}, got {np.shape(values)}."
        raise ValueError(msg)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class StainReference:
    """Stain parameters of one image: the target of a normalisation, or a fitted source.

    Parameters
    ----------
    method
        ``"vahadane"``, ``"macenko"`` or ``"reinhard"``.
    stain_matrix
        ``(2, 3)`` unit optical-density vectors, hematoxylin row first (vahadane/macenko).
    max_concentrations
        ``(2,)`` 99th-percentile stain concentrations (vahadane/macenko).
    lab_mean, lab_std
        ``(3,)`` CIELAB mean and standard deviation of tissue pixels (reinhard).
    n_pixels
        Number of pixels the parameters were fitted on (``None`` for published constants).
    description
        Free-text provenance, e.g. where published constants come from.
    """

    method: str
    stain_matrix: np.ndarray | None = None
    max_concentrations: np.ndarray | None = None
    lab_mean: np.ndarray | None = None
    lab_std: np.ndarray | None = None
    n_pixels: int | None = None
    description: str = field(default="")

    def __post_init__(self) -> None:
        _check_method(self.method)
        if self.method in _MATRIX_METHODS:
            if self.stain_matrix is None or self.max_concentrations is None:
                msg = (
                    f"A {self.method!r} StainReference needs stain_matrix (2, 3) and max_concentrations (2,)."
                )
                raise ValueError(msg)
            matrix = _as_array(self.stain_matrix, (2, 3), "stain_matrix")
            if np.any(matrix < 0) or not np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-3):
                msg = "StainReference.stain_matrix rows must be non-negative unit vectors (OD of H, then E)."
                raise ValueError(msg)
            maxc = _as_array(self.max_concentrations, (2,), "max_concentrations")
            if np.any(maxc <= 0):
                msg = f"StainReference.max_concentrations must be positive, got {maxc.tolist()}."
                raise ValueError(msg)
            object.__setattr__(self, "stain_matrix", matrix)
            object.__setattr__(self, "max_concentrations", maxc)
        else:
            if self.lab_mean is None or self.lab_std is None:
                msg = "A 'reinhard' StainReference needs lab_mean (3,) and lab_std (3,)."
                raise ValueError(msg)
            object.__setattr__(self, "lab_mean", _as_array(self.lab_mean, (3,), "lab_mean"))
            std = _as_array(self.lab_std, (3,), "lab_std")
            if np.any(std <= 0):
                msg = f"StainReference.lab_std must be positive, got {std.tolist()}."
                raise ValueError(msg)
            object.__setattr__(self, "lab_std", std)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (lists of floats); inverse of :meth:`from_dict`."""
        out: dict[str, Any] = {"method": self.method, "format_version": _FORMAT_VERSION}
        for name in ("stain_matrix", "max_concentrations", "lab_mean", "lab_std"):
            value = getattr(self, name)
            if value is not None:
                out[name] = np.asarray(value).tolist()
        out["n_pixels"] = self.n_pixels
        out["description"] = self.description
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainReference:
        """Build a reference from :meth:`to_dict` output (validates every field)."""
        if not isinstance(data, dict) or "method" not in data:
            msg = "A stain reference dict needs at least a 'method' key (see StainReference.to_dict)."
            raise ValueError(msg)
        version = data.get("format_version", _FORMAT_VERSION)
        if version > _FORMAT_VERSION:
            msg = f"Stain reference format_version {version} is newer than this bitro ({_FORMAT_VERSION}); upgrade bitro."
            raise ValueError(msg)
        fields = (
            "method",
            "stain_matrix",
            "max_concentrations",
            "lab_mean",
            "lab_std",
            "n_pixels",
            "description",
        )
        return cls(**{k: data[k] for k in fields if k in data and data[k] is not None})

    def save(self, path: str | Path) -> None:
        """Write the reference as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> StainReference:
        """Read a reference written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        if self.method in _MATRIX_METHODS:
            body = f"stain_matrix={np.round(self.stain_matrix, 3).tolist()}, max_concentrations={np.round(self.max_concentrations, 3).tolist()}"
        else:
            body = f"lab_mean={np.round(self.lab_mean, 2).tolist()}, lab_std={np.round(self.lab_std, 2).tolist()}"
        return f"StainReference(method={self.method!r}, {body})"


def default_reference(method: str = K.STAIN_METHOD) -> StainReference:
    """The shipped standard reference for ``method`` (see ``bitro/pp/data/stain_reference_default.json``)."""
    _check_method(method)
    text = resources.files("bitro.pp").joinpath("data", _DEFAULT_FILE).read_text()
    return StainReference.from_dict(json.loads(text)[method])


# --------------------------------------------------------------------------- input arrays


def _to_hwc_uint8(image: Any) -> np.ndarray:
    """Return an ``(h, w, 3)`` uint8 numpy array from a numpy/xarray image in ``hwc`` or ``cyx`` order."""
    dims = getattr(image, "dims", None)
    arr = np.asarray(image)
    if arr.ndim == 2 or (
        arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]) and 3 not in (arr.shape[0], arr.shape[-1])
    ):
        msg = (
            f"Stain normalisation needs an RGB image, got a grey-scale array of shape {arr.shape}. "
            "Convert it to RGB first (e.g. skimage.color.gray2rgb) — H&E stains cannot be separated in grey."
        )
        raise ValueError(msg)
    if arr.ndim != 3:
        msg = f"Expected an image with 3 axes (h, w, 3) or (c, y, x), got shape {arr.shape}."
        raise ValueError(msg)
    channels_first = (dims is not None and tuple(dims) == ("c", "y", "x")) or (
        dims is None and arr.shape[-1] not in (3, 4) and arr.shape[0] in (3, 4)
    )
    if channels_first:
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] == 4:
        logger.warning("Image has 4 channels (RGBA); dropping the alpha channel for stain normalisation.")
        arr = arr[..., :3]
    if arr.shape[-1] != 3:
        msg = f"Expected 3 (RGB) or 4 (RGBA) channels, got shape {arr.shape}; convert the image to RGB first."
        raise ValueError(msg)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _no_tissue_error(what: str) -> ValueError:
    msg = (
        f"No tissue pixels found in {what} (every pixel is near-white or unstained). "
        "Pass reference=... (a StainReference or an H&E image) or check the image."
    )
    return ValueError(msg)


def _sample(pixels: np.ndarray, n_pixels: int, rng: np.random.Generator) -> np.ndarray:
    if len(pixels) > n_pixels:
        pixels = pixels[rng.choice(len(pixels), n_pixels, replace=False)]
    return pixels


def _tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    return rgb[M.stain_pixel_mask(rgb)]


def _fit_pixels(pixels: np.ndarray, method: str, *, description: str = "") -> StainReference:
    """Fit ``method`` on tissue pixels ``(n, 3)`` uint8."""
    if method == "reinhard":
        mean, std = M.lab_stats(pixels)
        return StainReference(
            method, lab_mean=mean, lab_std=std, n_pixels=len(pixels), description=description
        )
    od = M.rgb_to_od(pixels)
    matrix = M.fit_macenko(od) if method == "macenko" else M.fit_vahadane(od)
    maxc = M.max_concentrations(M.concentrations(od, matrix))
    if np.any(maxc <= 0):
        msg = (
            "A stain has zero concentration in the sampled tissue; the image may not be H&E. Check the image."
        )
        raise ValueError(msg)
    return StainReference(
        method, stain_matrix=matrix, max_concentrations=maxc, n_pixels=len(pixels), description=description
    )


# --------------------------------------------------------------------------- slide sampling


def _level_arrays(sdata: sd.SpatialData, image_key: str) -> list[Any]:
    from bitro.io._build import get_image, image_levels

    return [get_image(sdata, image_key, level=i) for i in range(len(image_levels(sdata, image_key)))]


def _check_slide_channels(arr: Any, image_key: str) -> Any:
    n_c = int(arr.sizes["c"])
    if n_c < 3:
        msg = f"Image {image_key!r} has {n_c} channel(s); stain normalisation needs RGB. Convert it to RGB first."
        raise ValueError(msg)
    if n_c == 4:
        logger.warning("Image %r has 4 channels (RGBA); dropping the alpha channel.", image_key)
    elif n_c != 3:
        msg = f"Image {image_key!r} has {n_c} channels; expected 3 (RGB) or 4 (RGBA)."
        raise ValueError(msg)
    return arr.data[:3]


def _slide_tissue_pixels(
    sdata: sd.SpatialData, image_key: str, n_pixels: int, rng: np.random.Generator
) -> np.ndarray:
    """Sample tissue pixels of image ``image_key`` at full resolution without loading the whole slide."""
    import dask

    levels = _level_arrays(sdata, image_key)
    full = _check_slide_channels(levels[0], image_key)
    height, width = int(full.shape[1]), int(full.shape[2])
    if height * width <= _WHOLE_IMAGE_PIXELS:
        pixels = _tissue_pixels(np.moveaxis(np.asarray(full.compute()), 0, -1))
        if len(pixels) == 0:
            raise _no_tissue_error(f"image {image_key!r}")
        return _sample(pixels, n_pixels, rng)
    # locate tissue on a thumbnail, then read full-resolution windows centred on tissue
    thumb_level = next(
        (lvl for lvl in reversed(levels) if max(lvl.sizes["y"], lvl.sizes["x"]) >= _THUMBNAIL_SIDE), levels[0]
    )
    thumb = _check_slide_channels(thumb_level, image_key)
    step = max(1, int(max(thumb.shape[1:]) // _THUMBNAIL_SIDE))
    thumb = np.moveaxis(np.asarray(thumb[:, ::step, ::step].compute()), 0, -1)
    fy, fx = height / thumb.shape[0], width / thumb.shape[1]
    rows, cols = np.nonzero(M.stain_pixel_mask(thumb))
    if len(rows) == 0:
        raise _no_tissue_error(f"image {image_key!r}")
    pick = rng.choice(len(rows), min(_N_WINDOWS, len(rows)), replace=False)
    windows = []
    for r, c in zip(rows[pick], cols[pick]):
        y0 = int(np.clip((r + 0.5) * fy - _WINDOW / 2, 0, max(height - _WINDOW, 0)))
        x0 = int(np.clip((c + 0.5) * fx - _WINDOW / 2, 0, max(width - _WINDOW, 0)))
        windows.append(full[:, y0 : y0 + _WINDOW, x0 : x0 + _WINDOW])
    pixels = np.concatenate(
        [_tissue_pixels(np.moveaxis(np.asarray(w), 0, -1)) for w in dask.compute(*windows)]
    )
    if len(pixels) == 0:
        raise _no_tissue_error(f"image {image_key!r}")
    return _sample(pixels, n_pixels, rng)


# --------------------------------------------------------------------------- public API


def fit_stain_reference(
    image_or_sdata: np.ndarray | sd.SpatialData | Any,
    *,
    method: str = K.STAIN_METHOD,
    image_key: str = K.IMAGE,
    n_pixels: int = 100_000,
    seed: int | None = None,
) -> StainReference:
    """Fit the stain parameters of an H&E image.

    Parameters
    ----------
    image_or_sdata
        An RGB image as a numpy/xarray array, ``(h, w, 3)`` or ``(c, y, x)`` (RGBA loses its alpha),
        or a SpatialData object whose image ``image_key`` is sampled at full resolution in windows
        centred on tissue (a whole slide is never loaded into memory).
    method
        ``"macenko"`` (SVD plane, angle percentiles 1/99; the default, see
        :func:`normalize_stains`), ``"vahadane"`` (sparse non-negative dictionary learning) or
        ``"reinhard"`` (CIELAB mean/std).
    image_key
        Image element to sample when a SpatialData object is given.
    n_pixels
        Number of tissue pixels (luminosity < 0.8 and summed OD > 0.15) sampled for the fit.
    seed
        Seed of the pixel sampling (``None``: ``bt.settings.seed``).

    Returns
    -------
    The fitted :class:`StainReference`.
    """
    _check_method(method)
    if n_pixels < 100:
        msg = f"n_pixels={n_pixels} is too small to fit stains; use at least 100 (default 100_000)."
        raise ValueError(msg)
    rng = np.random.default_rng(resolve_seed(seed))
    if hasattr(image_or_sdata, "images") and hasattr(image_or_sdata, "tables"):
        pixels = _slide_tissue_pixels(image_or_sdata, image_key, n_pixels, rng)
        what = f"image {image_key!r}"
    else:
        rgb = _to_hwc_uint8(image_or_sdata)
        pixels = _tissue_pixels(rgb)
        if len(pixels) == 0:
            raise _no_tissue_error("the image")
        pixels = _sample(pixels, n_pixels, rng)
        what = f"array of shape {rgb.shape}"
    if len(pixels) < 100:
        logger.warning(
            "Only %d tissue pixels found in %s; the stain estimate may be unreliable.", len(pixels), what
        )
    return _fit_pixels(pixels, method, description=f"fitted on {len(pixels)} tissue pixels of {what}")


def apply_stains(tile: np.ndarray, source: StainReference, target: StainReference) -> np.ndarray:
    """Re-paint an ``(h, w, 3)`` uint8 tile from the ``source`` stain parameters to ``target``.

    ``source`` must be fitted on the slide the tile comes from (once per slide), with the same family
    of method as ``target``: vahadane and macenko references are interchangeable (both are stain
    matrices), reinhard needs reinhard.
    """
    if (source.method == "reinhard") != (target.method == "reinhard"):
        msg = (
            f"Cannot map a {source.method!r} source onto a {target.method!r} reference; "
            "fit both with the same method (vahadane/macenko share stain matrices, reinhard uses LAB statistics)."
        )
        raise ValueError(msg)
    if source.method == "reinhard":
        return M.reinhard(tile, source.lab_mean, source.lab_std, target.lab_mean, target.lab_std)
    return M.repaint(
        tile, source.stain_matrix, source.max_concentrations, target.stain_matrix, target.max_concentrations
    )


def _normalize_block(block: np.ndarray, source: StainReference, target: StainReference) -> np.ndarray:
    """``map_blocks`` kernel: ``(3, y, x)`` uint8 chunk → normalised chunk."""
    if block.size == 0:
        return block.astype(np.uint8)
    out = apply_stains(np.moveaxis(np.asarray(block), 0, -1), source, target)
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def _resolve_reference(reference: Any, method: str, seed: int | None) -> StainReference:
    if reference is None:
        return default_reference(method)
    if isinstance(reference, StainReference):
        target = reference
    elif isinstance(reference, dict):
        target = StainReference.from_dict(reference)
    elif isinstance(reference, str | Path):
        target = StainReference.load(reference)
    else:
        target = fit_stain_reference(reference, method=method, seed=seed)
    if (target.method == "reinhard") != (method == "reinhard"):
        msg = (
            f"reference was fitted with method={target.method!r} but method={method!r}; "
            f"pass method={target.method!r} or a reference fitted with {method!r}."
        )
        raise ValueError(msg)
    return target


def normalize_stains(
    sdata: sd.SpatialData,
    *,
    image_key: str = K.IMAGE,
    reference: StainReference | np.ndarray | dict | str | Path | None = None,
    method: str = K.STAIN_METHOD,
    key_added: str = K.IMAGE_NORMALIZED,
    n_pixels: int = 100_000,
    overwrite: bool = False,
    seed: int | None = None,
    inplace: bool = True,
):
    """Normalise the stains of an H&E image to a reference, lazily and tile by tile.

    The source slide's stain parameters are estimated once from a sample of its tissue pixels
    (:func:`fit_stain_reference`), then every dask chunk of the level-0 image is re-painted
    independently (paper Eqs. 17–18). The result keeps the source's coordinate transformations and
    pyramid scale factors; the source image is left untouched and nothing is computed until read.

    Parameters
    ----------
    sdata
        SpatialData with an RGB image ``image_key`` (``c, y, x`` uint8).
    image_key
        Image to normalise.
    reference
        Target stains: ``None`` for the shipped standard (published Macenko reference vectors for
        vahadane/macenko; typical H&E CIELAB statistics for reinhard), a :class:`StainReference`
        (or its dict / a JSON path), or an RGB image array that is fitted with ``method``.
    method
        ``"macenko"`` (default), ``"vahadane"`` or ``"reinhard"``. Macenko is the default because the
        benchmarks use it: every accuracy and pipeline benchmark preprocesses with it
        (``benchmarks/_common.py``), and the stain benchmark (docs/benchmarks.md, "Stain normalisation
        vs tiatoolbox") found it the closest of the three to tiatoolbox's output (MAE 0.73 of 255 vs
        0.85 for Vahadane) and 16× faster than Vahadane (0.26 vs 4.16 s).
    key_added
        Name of the new image element; the later steps read it by default (``image_key=None`` of
        :func:`detect_tissue`, :func:`segment_cells`, :func:`embed_cells`).
    n_pixels
        Number of tissue pixels sampled to fit the source.
    overwrite
        Replace an existing ``key_added`` element.
    seed
        Seed of the pixel sampling (``None``: ``bt.settings.seed``).
    inplace
        Write into ``sdata`` (and return ``None``); otherwise return the new element only.

    Returns
    -------
    ``None`` when ``inplace``; else the normalised image element. When ``inplace``, writes
    ``sdata.images[key_added]`` and ``sdata.attrs["bitro_stain"][key_added]`` =
    ``{"method", "image_key", "reference": dict, "source": dict (incl. the source stain matrix),
    "seed", "n_pixels"}``.
    """
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    _check_method(method)
    if inplace:
        check_not_exists(key_added, sdata.images, what="image", overwrite=overwrite)
    if key_added == image_key:
        msg = f"key_added={key_added!r} equals image_key; the source image is never modified. Choose another key_added."
        raise ValueError(msg)
    seed = resolve_seed(seed)
    target = _resolve_reference(reference, method, seed)
    source = fit_stain_reference(sdata, method=method, image_key=image_key, n_pixels=n_pixels, seed=seed)
    logger.info("Source stains of %r: %r; target: %r", image_key, source, target)

    levels = _level_arrays(sdata, image_key)
    data = _check_slide_channels(levels[0], image_key)
    if len(data.chunks[0]) != 1:
        data = data.rechunk({0: 3})
    normalised = da.map_blocks(_normalize_block, data, source=source, target=target, dtype=np.uint8)
    shapes = [(int(lvl.sizes["y"]), int(lvl.sizes["x"])) for lvl in levels]
    scale_factors = [max(1, round(shapes[i - 1][0] / shapes[i][0])) for i in range(1, len(shapes))] or None
    element = Image2DModel.parse(
        normalised,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=get_transformation(levels[0], get_all=True),
        scale_factors=scale_factors,
        chunks=(3, int(data.chunks[1][0]), int(data.chunks[2][0])),  # keep the source's chunking
    )
    if not inplace:
        return element
    sdata.images[key_added] = element
    record = dict(sdata.attrs.get(STAIN_ATTRS_KEY, {}))
    record[key_added] = {
        "method": method,
        "image_key": image_key,
        "reference": target.to_dict(),
        "source": source.to_dict(),
        "seed": seed,
        "n_pixels": n_pixels,
    }
    sdata.attrs[STAIN_ATTRS_KEY] = record
    return None
