"""Per-slide standardisation of cell features (``bt.pp.standardize_features``).

A stain or scanner difference moves every cell feature of a slide by about the same amount. Each
feature is z-scored within its own slide (the slide's cells minus the slide's mean, divided by the
slide's standard deviation), so such an offset or scale is removed before a model sees the
features. What is lost with it: differences between slides that are real (a slide that truly has
more of some cell type looks, feature by feature, like the others).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro._validate import check_key, check_not_exists

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

#: Default ``obsm`` key of the standardised features.
KEY_ADDED = f"{K.EMBEDDING}_slide"


def _cells_table(data: Any, table_key: str) -> ad.AnnData:
    if hasattr(data, "tables"):
        check_key(
            table_key, data.tables.keys(), what="table", hint="Cells are written by bt.pp.segment_cells."
        )
        return data.tables[table_key]
    if hasattr(data, "obsm"):
        return data
    msg = f"Expected a SpatialData or an AnnData of cells, got {type(data).__name__}."
    raise TypeError(msg)


def _standardize(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Column-wise z-scores (float32) and the number of constant columns (left at 0)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return np.zeros(x.shape, dtype=np.float32), 0
    from bitro.pp._projection import feature_scale

    constant = np.ptp(x, axis=0) == 0
    mean = x.mean(axis=0)
    z = (x - mean) / feature_scale(x)  # near-constant columns: floored scale, no huge z-scores
    z[:, constant] = 0.0
    return z.astype(np.float32), int(constant.sum())


def standardize_features(
    sdatas: sd.SpatialData | ad.AnnData | Sequence[sd.SpatialData | ad.AnnData],
    *,
    use_rep: str = K.EMBEDDING,
    key_added: str = KEY_ADDED,
    table_key: str = K.CELLS,
    overwrite: bool = False,
    inplace: bool = True,
) -> np.ndarray | list[np.ndarray] | None:
    """Z-score every cell feature within its own slide.

    For each slide, feature ``j`` of cell ``i`` becomes ``(x_ij − mean_j) / std_j`` with the mean
    and (population) standard deviation over that slide's cells. A feature that is constant on a
    slide becomes 0 there. A slide whose features are all shifted by a constant, or scaled by a
    positive constant, gets the same standardised features: a model trained with
    ``use_rep=key_added`` does not see such stain- or scanner-like offsets.

    Parameters
    ----------
    sdatas
        One slide or a list of slides (SpatialData with a cells table, or cells AnnData).
    use_rep
        ``obsm`` key of the features (e.g. written by :func:`bitro.pp.embed_cells`).
    key_added
        ``obsm`` key of the standardised features.
    table_key
        Cells table of a SpatialData (ignored for AnnData).
    overwrite
        Replace an existing ``obsm[key_added]``.
    inplace
        Write into each slide (and return ``None``); with ``False`` nothing is written.

    Returns
    -------
    ``None`` when ``inplace``; else the ``(n_cells, n_features)`` float32 standardised features,
    one array per slide (a list when a list was given). When ``inplace``, writes
    ``cells.obsm[key_added]`` and ``cells.uns[key_added]`` =
    ``{"params": {"use_rep", "table_key"}, "n_cells", "n_constant_features", "function"}``.

    Raises
    ------
    KeyError
        A slide without the cells table or without ``obsm[use_rep]``.
    ValueError
        Non-finite features, ``key_added == use_rep``, or an existing ``key_added`` without
        ``overwrite=True``.

    Examples
    --------
    >>> bt.pp.standardize_features(slides)
    >>> model = bt.tl.fit(slides, use_rep="X_bitro_slide")
    """
    single = not isinstance(sdatas, list | tuple)
    slides = [sdatas] if single else list(sdatas)
    if key_added == use_rep:
        msg = f"key_added={key_added!r} equals use_rep; the input features are never overwritten. Choose another key_added."
        raise ValueError(msg)
    tables = [_cells_table(s, table_key) for s in slides]
    for i, cells in enumerate(tables):
        check_key(
            use_rep,
            cells.obsm.keys(),
            what="obsm key",
            hint=f"Run bt.pp.embed_cells(key_added={use_rep!r}) first.",
        )
        if inplace:
            check_not_exists(key_added, cells.obsm, what=f"obsm key (slide {i})", overwrite=overwrite)
    results = []
    for i, cells in enumerate(tables):
        x = np.asarray(cells.obsm[use_rep])
        if x.ndim != 2:
            msg = f"cells.obsm[{use_rep!r}] of slide {i} has shape {x.shape}; expected (n_cells, n_features)."
            raise ValueError(msg)
        if not np.isfinite(x).all():
            msg = (
                f"cells.obsm[{use_rep!r}] of slide {i} has non-finite values; re-run bt.pp.embed_cells "
                "or drop those cells before standardising."
            )
            raise ValueError(msg)
        z, n_constant = _standardize(x)
        logger.info(
            "standardize_features: slide %d, %d cells × %d features (%d constant).", i, *z.shape, n_constant
        )
        results.append((z, n_constant))
    if not inplace:
        arrays = [z for z, _ in results]
        return arrays[0] if single else arrays
    for cells, (z, n_constant) in zip(tables, results, strict=True):
        cells.obsm[key_added] = z
        cells.uns[key_added] = {
            "function": "bt.pp.standardize_features",
            "params": {"use_rep": use_rep, "table_key": table_key},
            "n_cells": int(z.shape[0]),
            "n_constant_features": n_constant,
        }
    return None
