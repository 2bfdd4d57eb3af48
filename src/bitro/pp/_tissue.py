"""Low-resolution tissue detection so that later steps skip glass (method.md §2, item 2).

A pixel of the low-resolution image is tissue when its HSV saturation exceeds an Otsu threshold
(clamped to ``[0.05, 0.15]`` so that an all-tissue or all-glass field is not split in two) and its
summed optical density exceeds 0.1 (with ``method="od"`` the Otsu threshold is taken on the summed
optical density instead, clamped to ``[0.1, 0.4]``). Pen marks — large areas that are saturated red
(hue ≥ 345° or ≤ 20°, saturation > 0.65), green/cyan (hue 70–180°, saturation > 0.25), strongly
saturated blue (hue 180–250°, saturation > 0.75) or very dark (HSV value < 0.25) at mask
resolution — are removed together with a 40 µm margin around them (their out-of-focus halo).
The mask is then closed and opened, small objects removed and small holes filled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro._validate import check_not_exists
from bitro.io._image import as_rgb

if TYPE_CHECKING:
    import spatialdata as sd

TISSUE_METHODS = ("otsu", "od")
#: Key of ``sdata.attrs`` holding the parameters of every tissue mask.
TISSUE_ATTRS_KEY = "bitro_tissue"
#: Downsampling used when the image has no µm-per-pixel scale, and the level-0 scale then assumed.
FALLBACK_DOWNSAMPLE = 16
FALLBACK_MPP = 0.5
_SATURATION_RANGE = (0.05, 0.15)
_OD_RANGE = (0.1, 0.4)
_MIN_OD = 0.1
_PEN_MIN_AREA_UM2 = 3000.0
_PEN_MARGIN_UM = 40.0
_SMOOTH_UM = 16.0


def _clamped_otsu(values: np.ndarray, low: float, high: float) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or np.ptp(values) == 0:
        return high
    return float(np.clip(threshold_otsu(values), low, high))


def _remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def pen_mask(rgb: np.ndarray, *, mpp: float = 8.0) -> np.ndarray:
    """Boolean mask of pen marks in an ``(h, w, 3)`` uint8 image with ``mpp`` µm per pixel."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(as_rgb(rgb, source="The image given to pen_mask"))
    hue, sat, val = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    red = (sat > 0.65) & ((hue >= 345.0) | (hue <= 20.0))
    green = (sat > 0.25) & (hue >= 70.0) & (hue < 180.0)  # no H&E stain is green or cyan
    # hematoxylin-rich tissue is blue too (hue 225–250, saturation up to ~0.65 at 5 µm/px on HER2ST)
    blue = (sat > 0.75) & (hue >= 180.0) & (hue <= 250.0)
    dark = val < 0.25
    return _remove_small(red | green | blue | dark, _PEN_MIN_AREA_UM2 / mpp**2)


def tissue_mask(
    rgb: np.ndarray,
    *,
    mpp: float = 8.0,
    method: str = "otsu",
    min_area_um2: float = 5000.0,
    max_hole_um2: float = 50_000.0,
    remove_pen: bool = True,
) -> np.ndarray:
    """Boolean tissue mask of a low-resolution ``(h, w, 3)`` RGB image (``True`` = tissue).

    Parameters
    ----------
    rgb
        RGB image (uint8, or float in ``[0, 1]``); RGBA loses its alpha.
    mpp
        µm per pixel of ``rgb`` (sizes below are physical and converted with it).
    method
        ``"otsu"`` (Otsu on HSV saturation) or ``"od"`` (Otsu on summed optical density).
    min_area_um2
        Tissue pieces smaller than this are removed.
    max_hole_um2
        Enclosed holes smaller than this (e.g. fat cells, small lumens) are filled.
    remove_pen
        Remove pen marks and a 40 µm margin around them.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hsv

    from bitro.pp._stain_methods import rgb_to_od

    if method not in TISSUE_METHODS:
        msg = f"Unknown tissue detection method {method!r}; choose one of {list(TISSUE_METHODS)}."
        raise ValueError(msg)
    rgb = as_rgb(rgb, source="The image given to tissue_mask")
    od = rgb_to_od(rgb).sum(axis=-1)
    if method == "otsu":
        sat = rgb2hsv(rgb)[..., 1]
        mask = (sat > _clamped_otsu(sat, *_SATURATION_RANGE)) & (od > _MIN_OD)
    else:
        mask = od > _clamped_otsu(od, *_OD_RANGE)
    pen_zone = None
    if remove_pen:
        pen = pen_mask(rgb, mpp=mpp)
        if pen.any():
            pen_zone = ndi.binary_dilation(pen, _disk(max(1, round(_PEN_MARGIN_UM / mpp))))
            mask &= ~pen_zone
    radius = max(1, round(_SMOOTH_UM / mpp))
    padded = np.pad(mask, radius, mode="edge")  # edge padding: the image border is not glass
    padded = ndi.binary_opening(ndi.binary_closing(padded, _disk(radius)), _disk(radius))
    mask = padded[radius:-radius, radius:-radius]
    mask = _remove_small(mask, min_area_um2 / mpp**2)
    holes = ndi.binary_fill_holes(mask) & ~mask
    mask |= holes & ~_remove_small(holes, max_hole_um2 / mpp**2)
    if pen_zone is not None:  # a pen mark enclosed by tissue is not a hole to fill
        mask &= ~pen_zone
    return mask


def tissue_fraction(
    mask: Any,
    bbox_level0: tuple[float, float, float, float],
    *,
    scale: float | tuple[float, float] | None = None,
) -> float:
    """Fraction of tissue pixels of ``mask`` inside a level-0 box ``(x0, y0, x1, y1)``.

    ``mask`` is a tissue labels element written by :func:`detect_tissue` (its ``Scale`` to
    ``"global"`` is read) or a 2-D array with ``scale`` level-0 pixels per mask pixel
    (a number or ``(sy, sx)``; default 1).
    """
    if hasattr(mask, "dims"):
        sy, sx = _mask_scale(mask)
        arr = np.asarray(mask.data)
    else:
        arr = np.asarray(mask)
        sy, sx = (1.0, 1.0) if scale is None else np.broadcast_to(np.asarray(scale, dtype=float), (2,))
    if scale is not None and hasattr(mask, "dims"):
        sy, sx = np.broadcast_to(np.asarray(scale, dtype=float), (2,))
    x0, y0, x1, y1 = (float(v) for v in bbox_level0)
    if x1 <= x0 or y1 <= y0:
        msg = f"bbox_level0 must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {bbox_level0}."
        raise ValueError(msg)
    r0, r1 = int(np.floor(y0 / sy)), int(np.ceil(y1 / sy))
    c0, c1 = int(np.floor(x0 / sx)), int(np.ceil(x1 / sx))
    r0, c0 = max(r0, 0), max(c0, 0)
    window = arr[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)]
    return float((window > 0).mean()) if window.size else 0.0


def tile_has_tissue(
    mask: Any,
    bbox_level0: tuple[float, float, float, float],
    *,
    min_fraction: float = 0.05,
    scale: float | tuple[float, float] | None = None,
) -> bool:
    """Whether the level-0 box ``(x0, y0, x1, y1)`` holds at least ``min_fraction`` tissue.

    See :func:`tissue_fraction` for ``mask`` and ``scale``. Boxes outside the mask have no tissue.
    """
    return tissue_fraction(mask, bbox_level0, scale=scale) >= min_fraction


def _mask_scale(element: Any) -> tuple[float, float]:
    """Level-0 pixels per mask pixel along (y, x), from the element's transformation to ``"global"``."""
    from spatialdata.transformations import get_transformation

    affine = get_transformation(element, to_coordinate_system=K.CS).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    return float(affine[1, 1]), float(affine[0, 0])


def _choose_level(shapes: list[tuple[int, int]], mpp: float, target_mpp: float) -> tuple[int, int]:
    """Coarsest level whose pixel is not larger than ``target_mpp``, and the block factor on top of it."""
    best = 0
    for i, (h, _) in enumerate(shapes):
        if mpp * shapes[0][0] / h <= target_mpp * (1 + 1e-6):
            best = i
    level_mpp = mpp * shapes[0][0] / shapes[best][0]
    return best, max(1, int(np.floor(target_mpp / level_mpp + 1e-6)))


def detect_tissue(
    sdata: sd.SpatialData,
    *,
    image_key: str | None = None,
    target_mpp: float = 8.0,
    method: str = "otsu",
    min_area_um2: float = 5000.0,
    max_hole_um2: float = 50_000.0,
    remove_pen: bool = True,
    key_added: str = K.TISSUE,
    overwrite: bool = False,
    inplace: bool = True,
):
    """Detect tissue on a low-resolution version of an H&E image.

    The coarsest pyramid level whose pixels are not larger than ``target_mpp`` is block-averaged
    (dask ``coarsen``) to about ``target_mpp`` µm per pixel, then :func:`tissue_mask` is applied.
    Without a recorded scale (``bt.io.set_scale``), the image is downsampled 16× and 0.5 µm per
    level-0 pixel is assumed for the physical sizes (a warning says so).

    Parameters
    ----------
    sdata
        SpatialData with an RGB image ``image_key``.
    image_key
        Image to analyse. ``None``: ``"he_normalized"`` when :func:`bitro.pp.normalize_stains` wrote
        it, else ``"he"`` (logged; see :mod:`bitro.pp._image_key`).
    target_mpp
        Approximate µm per pixel of the mask.
    method
        ``"otsu"`` (saturation) or ``"od"`` (optical density); see :func:`tissue_mask`.
    min_area_um2
        Remove tissue pieces smaller than this (µm²).
    max_hole_um2
        Fill enclosed holes smaller than this (µm²).
    remove_pen
        Exclude pen marks (saturated red/blue/green or black areas) and their halo.
    key_added
        Name of the labels element.
    overwrite
        Replace an existing element ``key_added``.
    inplace
        Write into ``sdata`` (return ``None``); otherwise return the labels element.

    Returns
    -------
    ``None`` when ``inplace``, else the element. Writes ``sdata.labels[key_added]`` (uint8, 1 = tissue,
    with a ``Scale`` to the ``"global"`` level-0 coordinate system) and
    ``sdata.attrs["bitro_tissue"][key_added]`` (parameters, mask µm per pixel, level used, tissue
    fraction). An image with no tissue gives an all-zero mask and a logged warning.
    """
    import dask.array as da
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Identity, Scale, Sequence, get_transformation

    from bitro.io._build import get_image, get_mpp, image_levels
    from bitro.pp._image_key import resolve_image_key

    image_key = resolve_image_key(sdata, image_key, step="detect_tissue")
    if method not in TISSUE_METHODS:
        msg = f"Unknown tissue detection method {method!r}; choose one of {list(TISSUE_METHODS)}."
        raise ValueError(msg)
    if not target_mpp > 0:
        msg = f"target_mpp must be a positive number of µm per pixel, got {target_mpp!r}."
        raise ValueError(msg)
    if inplace:
        check_not_exists(key_added, sdata.labels, what="labels element", overwrite=overwrite)
    shapes = image_levels(sdata, image_key)
    try:
        mpp, assumed = get_mpp(sdata), False
    except ValueError:
        mpp, assumed = FALLBACK_MPP, True
        target_mpp = FALLBACK_MPP * FALLBACK_DOWNSAMPLE
        logger.warning(
            "No µm-per-pixel scale on sdata; detecting tissue at %dx downsampling and assuming %.2f µm per "
            "level-0 pixel for sizes. Call bt.io.set_scale(sdata, mpp=...) for physical sizes.",
            FALLBACK_DOWNSAMPLE,
            FALLBACK_MPP,
        )
    level, factor = _choose_level(shapes, mpp, target_mpp)
    if min(shapes[level]) < factor:
        h0, w0 = shapes[0]
        msg = (
            f"Image {image_key!r} ({w0} × {h0} px, {w0 * mpp:.1f} × {h0 * mpp:.1f} µm) is smaller than one "
            f"pixel of the tissue mask ({target_mpp:g} µm per pixel), so no mask can be made. Pass a smaller "
            f"target_mpp (down to the image's {mpp:g} µm per pixel), or skip detect_tissue for an image this "
            "small (segment_cells then segments the whole image)."
        )
        raise ValueError(msg)
    image = get_image(sdata, image_key, level=level)
    n_c = int(image.sizes["c"])
    if n_c < 3:
        msg = (
            f"Image {image_key!r} has {n_c} channel(s); tissue detection needs RGB. Convert it to RGB first."
        )
        raise ValueError(msg)
    data = image.data[:3].astype(np.float32)
    if factor > 1:
        data = da.coarsen(np.mean, data, {1: factor, 2: factor}, trim_excess=True)
    small = np.moveaxis(np.rint(np.asarray(data.compute())), 0, -1).astype(np.uint8)
    sy = shapes[0][0] / shapes[level][0] * factor
    sx = shapes[0][1] / shapes[level][1] * factor
    mask_mpp = mpp * float(np.sqrt(sy * sx))
    mask = tissue_mask(
        small,
        mpp=mask_mpp,
        method=method,
        min_area_um2=min_area_um2,
        max_hole_um2=max_hole_um2,
        remove_pen=remove_pen,
    )
    fraction = float(mask.mean()) if mask.size else 0.0
    if not mask.any():
        logger.warning("No tissue found in image %r; the mask %r is empty.", image_key, key_added)
    scale = Scale([sy, sx], axes=("y", "x"))
    transformations = {}
    for cs, transform in get_transformation(get_image(sdata, image_key), get_all=True).items():
        transformations[cs] = scale if isinstance(transform, Identity) else Sequence([scale, transform])
    element = Labels2DModel.parse(mask.astype(np.uint8), dims=("y", "x"), transformations=transformations)
    if not inplace:
        return element
    sdata.labels[key_added] = element
    record = dict(sdata.attrs.get(TISSUE_ATTRS_KEY, {}))
    record[key_added] = {
        "image_key": image_key,
        "method": method,
        "target_mpp": float(target_mpp),
        "mask_mpp": mask_mpp,
        "mpp_assumed": assumed,
        "level": level,
        "block_factor": factor,
        "min_area_um2": float(min_area_um2),
        "max_hole_um2": float(max_hole_um2),
        "remove_pen": remove_pen,
        "tissue_fraction": fraction,
    }
    sdata.attrs[TISSUE_ATTRS_KEY] = record
    return None
