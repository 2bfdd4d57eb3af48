"""``bt.tl.apply_alignment``: write an alignment's cell, spot and expression embeddings into a slide."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bitro._logging import logger
from bitro.io._build import get_table
from bitro.tl._align import AlignedSpots, Alignment

if TYPE_CHECKING:
    import spatialdata as sd

#: Default ``obsm`` key of :func:`apply_alignment` (the expression side gets ``"<key>_expression"``).
ALIGNED_KEY = "X_aligned"


def apply_alignment(
    sdata: sd.SpatialData,
    alignment: Alignment | str | Path,
    *,
    key_added: str = ALIGNED_KEY,
    overwrite: bool = False,
) -> AlignedSpots:
    """Write a ``"features"`` alignment's embeddings into the slide's tables (``obsm``, not an image encoder).

    Parameters
    ----------
    sdata
        A slide embedded like the alignment's training slides (same encoder in ``cells.obsm[use_rep]``).
    alignment
        An :class:`~bitro.tl.Alignment` or the folder it was saved to.
    key_added
        Key of the embeddings written.
    overwrite
        Replace existing keys.

    Returns
    -------
    The :class:`~bitro.tl._align.AlignedSpots` written. Writes:

    - ``cells.obsm[key_added]``: every cell's aligned embedding (the image head on that cell; not normalised);
    - ``spots.obsm[key_added]``: unit-length mean of the embeddings of the spot's cells (NaN: no cell);
    - ``spots.obsm[f"{key_added}_expression"]``: unit-length expression embedding, when the spot table
      measures every gene of the alignment (NaN: no cell or no counts);
    - ``spots.uns[key_added]`` and ``cells.uns[key_added]``: the alignment's provenance.
    """
    from bitro._validate import check_not_exists

    if not isinstance(alignment, Alignment):
        alignment = Alignment.load(alignment)
    spots = get_table(sdata, alignment.setup.spots_key)
    cells = get_table(sdata, alignment.setup.cells_key)
    expr_key = f"{key_added}_expression"
    for key, table, what in (
        (key_added, cells, "cells.obsm"),
        (key_added, spots, "spots.obsm"),
        (expr_key, spots, "spots.obsm"),
    ):
        check_not_exists(key, table.obsm, what=what, overwrite=overwrite)
    out = alignment.embed(sdata)
    d = out.image.shape[1]
    image = np.full((spots.n_obs, d), np.nan, dtype=np.float32)
    image[out.rows] = out.image
    cells.obsm[key_added] = out.cells.astype(np.float32)
    spots.obsm[key_added] = image
    if out.expression is not None:
        expr = np.full((spots.n_obs, d), np.nan, dtype=np.float32)
        expr[out.rows] = out.expression
        spots.obsm[expr_key] = expr
    else:
        logger.info(
            "apply_alignment: the spots lack some of the %d genes; no expression embedding written.",
            len(alignment.genes),
        )
    info = {"kind": alignment.kind, "loss": alignment.config.loss, "dim": d, "use_rep": alignment.setup.use_rep,
            "train_slides": alignment.train_slides, "params": {"key_added": key_added}}  # fmt: skip
    spots.uns[key_added] = info
    cells.uns[key_added] = info
    return out
