"""Reading H&E image files into arrays with errors that say what went wrong.

Every reader turns its pixels into 8-bit RGB by one rule (:func:`uint8_factor`):

- ``uint8`` is kept as it is.
- Integers wider than 8 bits are scaled by the bit depth their values use: the smallest of 8, 10,
  12, 14 and 16 bits that holds the largest value, ``v × 255 / (2**bits − 1)`` (so a full-range
  16-bit image maps 65535 to 255 and a 12-bit camera image 4095 to 255). Values above 65535 are
  refused; negative values become 0.
- Floats are on the ``[0, 1]`` scale when at most 1 % of the finite values exceed 1.0, else on the
  ``[0, 255]`` scale; values outside the chosen range are clipped with a logged warning that says
  how many. NaN and infinities become 0.

The rule is decided once per image from its values (for a lazy whole slide, from its smallest
pyramid level) and applied to every level alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bitro._logging import logger

_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf"}
#: Image files read whole into memory by PIL (no pyramid, no recorded scale).
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg"}
#: Bit depths an integer image may use, in the order they are tried (see :func:`uint8_factor`).
BIT_DEPTHS = (8, 10, 12, 14, 16)
#: A float image is on the [0, 1] scale when at most this fraction of its finite values exceeds 1.
UNIT_SCALE_TOLERANCE = 0.01
#: PIL modes that hold one channel of more than 8 bits (read as arrays, so grey-scale is refused).
_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _corrupt(path: Path, err: Exception) -> ValueError:
    msg = (
        f"Could not read image file {str(path)!r} ({type(err).__name__}: {err}). The file is corrupt, "
        "truncated or not an image; check the download (e.g. its size or checksum) and re-export it."
    )
    return ValueError(msg)


def uint8_factor(sample: np.ndarray, *, source: str = "image") -> float | None:
    """The factor that maps ``sample``'s values onto ``[0, 255]`` (``None``: already uint8).

    See the module docstring for the rule. ``sample`` is the whole image or, for a lazy slide, a
    small version of it; a warning names ``source`` whenever values are rescaled or clipped.
    """
    sample = np.asarray(sample)
    if sample.dtype == np.uint8:
        return None
    if sample.dtype == np.bool_ or not (
        np.issubdtype(sample.dtype, np.integer) or np.issubdtype(sample.dtype, np.floating)
    ):
        msg = f"{source} has pixel type {sample.dtype}; expected integers (e.g. uint8, uint16) or floats."
        raise ValueError(msg)
    if np.issubdtype(sample.dtype, np.integer):
        top = int(sample.max()) if sample.size else 0
        if int(sample.min() if sample.size else 0) < 0:
            logger.warning("%s has negative pixel values; they become 0.", source)
        if top <= 255:
            return 1.0
        bits = next((b for b in BIT_DEPTHS if top <= 2**b - 1), None)
        if bits is None:
            msg = (
                f"{source} has pixel values up to {top}, more than 16 bits hold; bitro reads 8- to 16-bit "
                "images. Convert it to 8-bit RGB (e.g. with tifffile or PIL) and read that."
            )
            raise ValueError(msg)
        logger.warning(
            "%s is %s with values up to %d: read as %d-bit and scaled to 8 bits (value × 255 / %d).",
            source,
            sample.dtype,
            top,
            bits,
            2**bits - 1,
        )
        return 255.0 / (2**bits - 1)
    finite = sample[np.isfinite(sample)]
    n_bad = sample.size - finite.size
    if n_bad:
        logger.warning("%s has %d NaN or infinite pixel values; they become 0.", source, n_bad)
    above_one = int(np.count_nonzero(finite > 1.0))
    unit = above_one <= UNIT_SCALE_TOLERANCE * max(finite.size, 1)
    top = 1.0 if unit else 255.0
    clipped = int(np.count_nonzero((finite > top) | (finite < 0)))
    if clipped:
        logger.warning(
            "%s is a float image read on the [0, %g] scale (%s); %d values outside [0, %g] are clipped.",
            source,
            top,
            "at most 1% of its values exceed 1" if unit else "more than 1% of its values exceed 1",
            clipped,
            top,
        )
    return 255.0 if unit else 1.0


def to_uint8(array: Any, factor: float | None) -> Any:
    """Apply :func:`uint8_factor`'s ``factor`` to a numpy or dask array (lazy stays lazy)."""
    if factor is None:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    else:
        array = array.astype(np.float32)  # exact for every integer up to 2**24
    return np.clip(np.rint(array * np.float32(factor)), 0, 255).astype(np.uint8)


def as_rgb(array: Any, *, source: str = "image") -> np.ndarray:
    """Return ``array`` as ``(y, x, 3)`` uint8 RGB.

    Grey-scale images raise (an H&E image needs colour); RGBA loses its alpha channel with a logged
    warning. Other pixel types are converted by the rule of :func:`uint8_factor` (16-bit by the bit
    depth its values use; floats on the ``[0, 1]`` scale unless more than 1 % of the values exceed
    1). ``source`` names the array in messages (e.g. ``"Image 'slide.png'"``).
    """
    array = np.asarray(array)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 1):
        msg = (
            f"{source} is grey-scale (shape {array.shape}); bitro needs an RGB H&E image. "
            "Convert it to RGB (e.g. `np.repeat(img[..., None], 3, axis=-1)`) only if it really is a stained slide."
        )
        raise ValueError(msg)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        msg = (
            f"{source} has shape {array.shape}; expected (height, width, 3) RGB or (height, width, 4) RGBA. "
            "Move the channel axis last (e.g. `np.moveaxis(img, 0, -1)`) or convert the image to RGB."
        )
        raise ValueError(msg)
    if array.shape[0] == 0 or array.shape[1] == 0:
        msg = f"{source} is empty (shape {array.shape}); pass an image with at least one pixel."
        raise ValueError(msg)
    if array.shape[-1] == 4:
        logger.warning("%s is RGBA; the alpha channel is dropped.", source)
        array = array[..., :3]
    return to_uint8(array, uint8_factor(array, source=source))


def read_image_file(path: str | Path) -> np.ndarray:
    """Read a JPEG/PNG/TIFF image into a ``(y, x, 3)`` uint8 array (read-only access to the file).

    16-bit and float images are converted by the rule of :func:`uint8_factor`.
    """
    path = Path(path)
    if path.is_dir():
        msg = f"Image file {str(path)!r} is a folder; pass the path of the image file (JPEG/PNG/TIFF) itself."
        raise ValueError(msg)
    if not path.is_file():
        msg = f"Image file {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    if path.stat().st_size == 0:
        raise _corrupt(path, OSError("file is empty"))
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            array = tifffile.imread(path, series=0, level=0)
        else:
            from PIL import Image

            # H&E scans are legitimately larger than PIL's decompression-bomb guard.
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(path) as im:
                keep = im.mode in ("RGB", "RGBA", "L") or im.mode in _WIDE_GREY_MODES
                array = np.asarray(im if keep else im.convert("RGB"))
    except Exception as err:
        raise _corrupt(path, err) from err
    return as_rgb(np.asarray(array), source=f"Image {path.name!r}")
