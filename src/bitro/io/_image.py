"""Reading H&E image files into arrays with errors that say what went wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bitro._logging import logger

_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf"}


def _corrupt(path: Path, err: Exception) -> ValueError:
    msg = (
        f"Could not read image file {str(path)!r} ({type(err).__name__}: {err}). The file is corrupt, "
        "truncated or not an image; check the download (e.g. its size or checksum) and re-export it."
    )
    return ValueError(msg)


def as_rgb(array: Any, *, source: str = "image") -> np.ndarray:
    """Return ``array`` as ``(y, x, 3)`` uint8 RGB.

    Grey-scale images raise (an H&E image needs colour); RGBA loses its alpha
    channel with a logged warning. Floats in ``[0, 1]`` are scaled to ``[0, 255]``; other
    values are rounded and clipped to ``[0, 255]`` (NaN becomes 0). ``source`` names the
    array in messages (e.g. ``"Image 'slide.png'"``).
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
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            array = np.nan_to_num(array, nan=0.0)
            if array.max() <= 1.0:
                array = array * 255.0
            array = np.rint(array)
        array = np.clip(array, 0, 255).astype(np.uint8)
    return array


def read_image_file(path: str | Path) -> np.ndarray:
    """Read a JPEG/PNG/TIFF image into a ``(y, x, 3)`` uint8 array (read-only access to the file)."""
    path = Path(path)
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
                array = np.asarray(im.convert("RGB") if im.mode not in ("RGB", "RGBA", "L") else im)
    except Exception as err:
        raise _corrupt(path, err) from err
    return as_rgb(np.asarray(array), source=f"Image {path.name!r}")
