"""Pseudo-spots: spot-sized bins of cell-resolved data (paper §4.3).

Cell-resolved data (Xenium cells, the synthetic tissue's true cells) are binned into
spots laid out like an ST array; each pseudo-spot's counts are the sum of the counts of
the cells whose centroid falls inside it. A model trained on pseudo-spots predicts
pseudo single cells, which are scored against the real cells with
:func:`bitro.tl._metrics.score_cells`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._validate import check_key, check_not_exists

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

CELLS_TRUTH = "cells_truth"
"""Default table of cell-resolved counts (the synthetic tissue's true cells)."""
DEFAULT_DIAMETER_UM = 100.0
"""Spot diameter used when none is given or recorded (legacy ST spots)."""
N_CELLS = "n_cells"
SHAPES = ("disc", "square")
GRIDS = ("square", "hex")


def _grid(
    lo: np.ndarray, hi: np.ndarray, radius_px: float, spacing_px: float, grid: str, origin: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (x, y) of a square or hexagonal spot array covering ``[lo, hi]``, with column and row numbers."""
    row_step = spacing_px if grid == "square" else spacing_px * np.sqrt(3.0) / 2
    n_col = max(int(np.floor((hi[0] + radius_px - origin[0]) / spacing_px)) + 1, 1)
    n_row = max(int(np.floor((hi[1] + radius_px - origin[1]) / row_step)) + 1, 1)
    cols, rows = np.meshgrid(np.arange(n_col), np.arange(n_row))
    cols, rows = cols.ravel(), rows.ravel()
    x = origin[0] + cols * spacing_px
    if grid == "hex":
        x = x + (rows % 2) * spacing_px / 2
    y = origin[1] + rows * row_step
    return np.column_stack([x, y]), cols, rows


def _membership(cell_xy: np.ndarray, centres: np.ndarray, radius_px: float, shape: str) -> np.ndarray:
    """Index of the spot containing each cell centroid (-1 outside every spot)."""
    from scipy.spatial import cKDTree

    codes = np.full(len(cell_xy), -1, dtype=np.int64)
    if not len(cell_xy):
        return codes
    k = min(4, len(centres))
    _, idx = cKDTree(centres).query(cell_xy, k=k)
    idx = idx.reshape(len(cell_xy), k)
    for j in range(k)[::-1]:  # nearest candidate that contains the cell wins
        d = cell_xy - centres[idx[:, j]]
        inside = (
            np.hypot(d[:, 0], d[:, 1]) <= radius_px if shape == "disc" else np.abs(d).max(axis=1) <= radius_px
        )
        codes[inside] = idx[inside, j]
    return codes


def _resolve_sizes(
    scale: dict[str, Any], spot_diameter_um: float | None, spacing_um: float | None
) -> tuple[float, float, str]:
    if spot_diameter_um is None:
        diameter = float(scale.get(K.SPOT_DIAMETER_UM, DEFAULT_DIAMETER_UM))
        source = "bitro_scale" if K.SPOT_DIAMETER_UM in scale else "default"
        if spacing_um is None:
            spacing_um = scale.get(K.SPOT_SPACING_UM) if K.SPOT_DIAMETER_UM in scale else None
    else:
        diameter, source = float(spot_diameter_um), "argument"
    spacing = 2.0 * diameter if spacing_um is None else float(spacing_um)
    if not (np.isfinite(diameter) and diameter > 0 and np.isfinite(spacing) and spacing > 0):
        msg = f"spot_diameter_um and spacing_um must be positive; got {diameter!r} and {spacing!r}."
        raise ValueError(msg)
    if spacing < diameter:
        msg = (
            f"spacing_um={spacing:g} is smaller than spot_diameter_um={diameter:g}: pseudo-spots would overlap "
            "and a cell could belong to two spots. Use spacing_um >= spot_diameter_um."
        )
        raise ValueError(msg)
    return diameter, spacing, source


def pseudo_spots(
    data: sd.SpatialData | ad.AnnData,
    *,
    table_key: str = CELLS_TRUTH,
    layer: str | None = K.COUNTS_LAYER,
    spot_diameter_um: float | None = None,
    spacing_um: float | None = None,
    shape: Literal["disc", "square"] = "disc",
    grid: Literal["square", "hex"] = "square",
    origin_px: tuple[float, float] | None = None,
    min_cells: int = 1,
    key_added: str = K.SPOTS,
    cells_key_added: str = K.SPOT_ID,
    overwrite: bool = False,
) -> ad.AnnData:
    """Bin cell-resolved counts into spot-sized pseudo-spots laid out like an ST array.

    Spot centres form a square (legacy ST) or hexagonal (Visium) array with centre-to-centre
    distance ``spacing_um``, starting at ``origin_px`` (default: the smallest cell ``x`` and ``y``
    plus one spot radius, so the first spot touches the outermost cells). A cell belongs to the
    spot whose disc (or axis-aligned square of side ``spot_diameter_um``) contains its centroid;
    spots never overlap, so a cell belongs to at most one spot. Pseudo-spot counts are the sums of
    their cells' counts. Spots with fewer than ``min_cells`` cells are dropped.

    Parameters
    ----------
    data
        SpatialData holding a cell table, or that cell table (AnnData; its scale is read from
        ``uns["bitro_scale"]``). Cells need counts and centroids in ``obsm["spatial"]`` (level-0 px).
    table_key
        Cell table with counts (ignored for AnnData).
    layer
        Layer with the cells' raw counts (``None`` for ``.X``).
    spot_diameter_um
        Spot diameter in µm. Default: ``spot_diameter_um`` of the object's ``bitro_scale``, else
        100 µm (legacy ST).
    spacing_um
        Centre-to-centre distance in µm. Default: the recorded ``spot_spacing_um`` when the
        diameter also comes from the record, else ``2 × spot_diameter_um`` (the legacy ST layout:
        100 µm spots 200 µm apart; Visium is 55 µm spots 100 µm apart).
    shape
        ``"disc"`` (ST/Visium spots) or ``"square"`` (bins of side ``spot_diameter_um``).
    grid
        ``"square"`` (legacy ST) or ``"hex"`` (Visium: odd rows shifted by half a spacing, rows
        ``spacing × √3 / 2`` apart).
    origin_px
        Centre ``(x, y)`` of the first spot in level-0 px.
    min_cells
        Keep pseudo-spots with at least this many cells.
    key_added
        Name of the pseudo-spot table; its shapes are ``f"{key_added}_shapes"``.
    cells_key_added
        ``obs`` column of the cell table that receives each cell's pseudo-spot.
    overwrite
        Replace an existing table/shapes ``key_added`` and ``obs[cells_key_added]``.

    Returns
    -------
    The pseudo-spot table (AnnData), laid out like a real ST spots table: ``X`` and
    ``layers["counts"]`` summed counts (CSR float32), ``obsm["spatial"]`` centres (level-0 px),
    ``obs["n_cells"]``, ``obs["array_col"]``/``obs["array_row"]``, ``uns["bitro_scale"]`` and
    provenance in ``uns[key_added]``. Spot ids are ``f"{col}x{row}"``. Also writes

    - cell table ``obs[cells_key_added]``: categorical pseudo-spot id, NA outside every kept spot;
    - for SpatialData: ``tables[key_added]`` and shapes ``f"{key_added}_shapes"`` (circles of radius
      ``spot_diameter_um / 2``, or square polygons), and ``spot_diameter_um``/``spot_spacing_um`` in
      ``sdata.attrs["bitro_scale"]`` when none are recorded (so :func:`bitro.pp.assign_cells` finds the
      pseudo-spot radius; a different recorded diameter is kept and a warning says to pass ``radius_um=``).
    """
    import anndata as ad
    from scipy import sparse

    from bitro._version import __version__
    from bitro.io._build import circles_element, get_scale, get_table, polygons_element, table_element

    is_sdata = hasattr(data, "tables")
    if is_sdata:
        cells = get_table(
            data, table_key, hint="Cell-resolved data come from bt.io.read_xenium or bt.datasets."
        )
    else:
        cells = data
    if shape not in SHAPES:
        msg = f"shape must be one of {SHAPES}, got {shape!r}."
        raise ValueError(msg)
    if grid not in GRIDS:
        msg = f"grid must be one of {GRIDS}, got {grid!r}."
        raise ValueError(msg)
    if layer is not None:
        check_key(layer, cells.layers.keys(), what="layer", hint="Pass layer=None to use .X.")
    if cells.n_vars == 0:
        msg = f"Cell table {table_key!r} has no genes; pseudo-spots need cell-resolved counts."
        raise ValueError(msg)
    if K.SPATIAL not in cells.obsm:
        msg = f"Cell table {table_key!r} has no obsm[{K.SPATIAL!r}] (cell centroids in level-0 px)."
        raise KeyError(msg)
    shapes_name = K.shapes_key(key_added)
    if is_sdata:
        check_not_exists(key_added, data.tables, what="table", overwrite=overwrite)
        check_not_exists(shapes_name, data.shapes, what="shapes element", overwrite=overwrite)
    check_not_exists(cells_key_added, cells.obs, what=f"{table_key}.obs column", overwrite=overwrite)
    if int(min_cells) < 1:
        msg = f"min_cells must be at least 1, got {min_cells!r}."
        raise ValueError(msg)

    scale = get_scale(data)
    mpp = float(scale[K.MPP])
    diameter_um, spacing_um, size_source = _resolve_sizes(scale, spot_diameter_um, spacing_um)
    radius_px, spacing_px = diameter_um / 2 / mpp, spacing_um / mpp

    xy = np.asarray(cells.obsm[K.SPATIAL], dtype=np.float64)[:, :2]
    if not len(xy):
        msg = f"Cell table {table_key!r} is empty."
        raise ValueError(msg)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    origin = lo + radius_px if origin_px is None else np.asarray(origin_px, dtype=np.float64)
    centres, cols, rows = _grid(lo, hi, radius_px, spacing_px, grid, origin)
    codes = _membership(xy, centres, radius_px, shape)

    n_per = np.bincount(codes[codes >= 0], minlength=len(centres))
    kept = np.flatnonzero(n_per >= int(min_cells))
    if not len(kept):
        msg = (
            f"No pseudo-spot holds {min_cells} or more cells (spot diameter {diameter_um:g} µm = "
            f"{2 * radius_px:.1f} px, spacing {spacing_um:g} µm, cells span {hi - lo} px): check the "
            "µm-per-pixel scale and the spot size."
        )
        raise ValueError(msg)
    new_code = np.full(len(centres), -1, dtype=np.int64)
    new_code[kept] = np.arange(len(kept))
    codes = np.where(codes >= 0, new_code[np.maximum(codes, 0)], -1)
    inside = codes >= 0
    ids = pd.Index([f"{c}x{r}" for c, r in zip(cols[kept], rows[kept])], dtype=str)

    x = cells.X if layer is None else cells.layers[layer]
    x = sparse.csr_matrix(x, dtype=np.float64)
    member = sparse.csr_matrix(
        (np.ones(int(inside.sum())), (codes[inside], np.flatnonzero(inside))), shape=(len(kept), cells.n_obs)
    )
    counts = sparse.csr_matrix(member @ x, dtype=np.float32)

    spot_scale = {**scale, K.SPOT_DIAMETER_UM: diameter_um, K.SPOT_SPACING_UM: spacing_um}
    params = {
        "table_key": table_key if is_sdata else None,
        "layer": layer,
        "spot_diameter_um": diameter_um,
        "spacing_um": spacing_um,
        "size_source": size_source,
        "shape": shape,
        "grid": grid,
        "origin_px": [float(v) for v in origin],
        "min_cells": int(min_cells),
        "mpp": mpp,
    }
    table = ad.AnnData(
        X=counts,
        obs=pd.DataFrame(
            {N_CELLS: n_per[kept].astype(np.int64), "array_col": cols[kept], "array_row": rows[kept]},
            index=ids,
        ),
        var=cells.var.copy(),
        layers={K.COUNTS_LAYER: counts.copy()},
        obsm={K.SPATIAL: centres[kept].astype(np.float64)},
        uns={
            K.SCALE: spot_scale,
            key_added: {
                "params": params,
                "n_spots": len(kept),
                "n_cells_in_spots": int(inside.sum()),
                "n_cells_outside": int((~inside).sum()),
                "bitro_version": __version__,
            },
        },
    )
    cells.obs[cells_key_added] = pd.Categorical.from_codes(codes, categories=ids)
    cells.uns[cells_key_added] = {"params": {"spots_key": key_added, **params}, "bitro_version": __version__}
    logger.info(
        "pseudo_spots: %d pseudo-spots of %g µm (%s, %s grid, %g µm apart) hold %d of %d cells.",
        len(kept),
        diameter_um,
        shape,
        grid,
        spacing_um,
        int(inside.sum()),
        cells.n_obs,
    )
    if not is_sdata:
        return table

    if shape == "disc":
        shapes = circles_element(centres[kept], radius_px, ids)
    else:
        from shapely.geometry import box

        polys = [
            box(cx - radius_px, cy - radius_px, cx + radius_px, cy + radius_px) for cx, cy in centres[kept]
        ]
        shapes = polygons_element(polys, ids)
    data.shapes[shapes_name] = shapes
    table = table_element(table, region=shapes_name)
    data.tables[key_added] = table
    recorded = scale.get(K.SPOT_DIAMETER_UM)
    if recorded is None:
        from bitro.io._build import set_scale

        set_scale(data, mpp=mpp, spot_diameter_um=diameter_um, spot_spacing_um=spacing_um)
    elif not np.isclose(float(recorded), diameter_um):
        logger.warning(
            "pseudo_spots: the slide records spot_diameter_um=%g but the pseudo-spots are %g µm; pass "
            "radius_um=%g to bt.pp.assign_cells for these spots.",
            float(recorded),
            diameter_um,
            diameter_um / 2,
        )
    return table
