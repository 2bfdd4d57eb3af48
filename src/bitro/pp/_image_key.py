"""Which image the preprocessing steps read by default: the stain-normalised one when it exists.

``image_key=None`` — the default of :func:`bitro.pp.detect_tissue`, :func:`bitro.pp.segment_cells`
and :func:`bitro.pp.embed_cells` — means ``"he_normalized"`` (what :func:`bitro.pp.normalize_stains`
writes) when the slide has it, else ``"he"``. So ``normalize_stains → detect_tissue →
segment_cells → embed_cells`` all read the same image without naming it. The choice is logged (info)
and recorded in each step's provenance; pass ``image_key="he"`` to read the original image.
"""

from __future__ import annotations

from typing import Any

from bitro import _keys as K
from bitro._logging import logger

__all__ = ["resolve_image_key"]


def resolve_image_key(sdata: Any, image_key: str | None, *, step: str) -> str:
    """``image_key``, or for ``None`` the normalised image if present, else the original (logged).

    Parameters
    ----------
    sdata
        The slide.
    image_key
        The caller's ``image_key``.
    step
        Name of the calling function, for the log.
    """
    if image_key is not None:
        return image_key
    key = K.IMAGE_NORMALIZED if K.IMAGE_NORMALIZED in sdata.images else K.IMAGE
    logger.info(
        "%s: reading image %r (image_key=None reads %r when it exists, else %r).",
        step,
        key,
        K.IMAGE_NORMALIZED,
        K.IMAGE,
    )
    return key
