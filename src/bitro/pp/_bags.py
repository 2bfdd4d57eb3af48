"""Bags of cells: cell→spot assignment and spot-sized patches of a slide.

A *bag* is the set of cells that share one label: the cells inside an ST spot
(:func:`assign_cells`) or inside a spot-sized square patch of a bulk slide
(:func:`make_patches`). The kNN graph within bags is :mod:`bitro.pp._graph`. Everything uses
KD-trees; no dense cell × spot distance matrix is ever built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._validate import check_not_exists
from bitro._version import __version__

if TYPE_CHECKING:
    import anndata as ad
    import geopandas as gpd
    import spatialdata as sd

PATCH_ID = "patch_id"
"""``cells.obs`` column written by :func:`make_patches` (the patch each cell lies in)."""
N_CELLS = "n_cells"
"""``obs`` column of spots/patches: number of cells in the bag."""
LEGACY_ST_SPOT_UM = 100.0
"""Patch size used when the slide records no spot diameter (legacy ST spots are 100 µm across)."""

_CELLS_HINT = "Cells are created by bt.pp.segment_cells or bt.io.read_cell_segmentation."
_SPOTS_HINT = (
    "Spots come with ST/Visium data (bt.io.read_st, read_hest, read_visium); "
    "for a slide without spots (bulk), cut it into bags with bt.pp.make_patches."
)


def _coords(adata: ad.AnnData, table_key: str) -> np.ndarray:
    if K.SPATIAL not in adata.obsm:
        msg = (
            f"Table {table_key!r} has no obsm[{K.SPATIAL!r}] (centres in level-0 pixels); "
            "it must be created by a bitro reader or segmenter."
        )
        raise KeyError(msg)
    xy = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        msg = f"obsm[{K.SPATIAL!r}] of table {table_key!r} must be n x 2 (x, y); got shape {xy.shape}."
        raise ValueError(msg)
    return xy[:, :2]


def _extent(xy: np.ndarray) -> str:
    if len(xy) == 0:
        return "empty"
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    return f"x {lo[0]:.0f} to {hi[0]:.0f}, y {lo[1]:.0f} to {hi[1]:.0f} px"


# ------------------------------------------------------------------------------------------ cells → spots
def _spot_radius_px(sdata: sd.SpatialData, spots_key: str, radius_um: float | None, mpp: float):
    from bitro.io._build import get_scale

    if radius_um is not None:
        if not np.isfinite(radius_um) or radius_um <= 0:
            msg = f"radius_um must be a positive number of µm, got {radius_um!r}."
            raise ValueError(msg)
        return float(radius_um) / mpp, float(radius_um), "radius_um"
    scale = get_scale(sdata)
    if scale.get(K.SPOT_DIAMETER_UM):
        r_um = float(scale[K.SPOT_DIAMETER_UM]) / 2.0
        return r_um / mpp, r_um, "spot_diameter_um / 2"
    shapes = sdata.shapes.get(K.shapes_key(spots_key))
    if shapes is not None and "radius" in shapes:
        r_px = float(np.median(shapes["radius"].to_numpy()))
        return r_px, r_px * mpp, f"median radius of shapes {K.shapes_key(spots_key)!r}"
    msg = (
        "The spot radius is unknown: no spot_diameter_um in sdata.attrs['bitro_scale'] and no circle "
        "radius on the spot shapes. Pass radius_um= or bt.io.set_scale(sdata, mpp=..., spot_diameter_um=...)."
    )
    raise ValueError(msg)


def _mismatch_error(
    cell_xy: np.ndarray, spot_xy: np.ndarray, radius_px: float, radius_um: float
) -> ValueError:
    msg = (
        f"No cell centroid falls inside any spot disc (radius {radius_um:g} µm = {radius_px:.1f} px): "
        f"the coordinates of the cells ({_extent(cell_xy)}) and the spots ({_extent(spot_xy)}) do not match."
    )
    c_span = np.ptp(cell_xy, axis=0).max() if len(cell_xy) > 1 else 0.0
    s_span = np.ptp(spot_xy, axis=0).max() if len(spot_xy) > 1 else 0.0
    if c_span > 0 and s_span > 0 and not 0.5 < s_span / c_span < 2.0:
        msg += f" The spot layout spans {s_span / c_span:.3g} times the cells' extent, which suggests another pixel frame."
    msg += (
        " Both obsm['spatial'] must be level-0 pixels of the H&E image 'he' (x = column, y = row): rescale the "
        "spot centres (e.g. from a downscaled 'hires' image) or the cell centroids, or read both with bt.io readers; "
        "also check the µm-per-pixel scale (bt.io.set_scale) and radius_um."
    )
    return ValueError(msg)


def assign_cells(
    sdata: sd.SpatialData,
    *,
    spots_key: str = K.SPOTS,
    cells_key: str = K.CELLS,
    radius_um: float | None = None,
    key_added: str = K.SPOT_ID,
    overwrite: bool = False,
    inplace: bool = True,
) -> pd.Series | None:
    """Assign each cell to the spot whose disc contains its centroid.

    A KD-tree over the spot centres returns, for every cell, the nearest spot centre
    within the spot radius; where discs overlap, the nearest spot wins. Cells outside
    every disc are kept with a missing ``spot_id`` (their number is logged). Spots
    without any cell are kept too and flagged by ``n_cells == 0`` (a warning gives
    their number); nothing is dropped.

    Parameters
    ----------
    sdata
        Slide with tables ``spots_key`` and ``cells_key`` (centres in ``obsm["spatial"]``, level-0 px).
    spots_key
        Spots table.
    cells_key
        Cells table.
    radius_um
        Disc radius in µm. Default: ``spot_diameter_um / 2`` from ``sdata.attrs["bitro_scale"]``
        (else the radius of the spot circles).
    key_added
        ``cells.obs`` column of the assignment.
    overwrite
        Replace existing ``cells.obs[key_added]`` and ``spots.obs["n_cells"]``.
    inplace
        Write into the tables and return ``None``; ``False``: write nothing and return the assignment
        (see :doc:`/contributing`, "Return values and inplace").

    Returns
    -------
    ``None`` when ``inplace``, else the assignment as a categorical Series indexed by the cells'
    ``obs_names`` (``value_counts()`` gives the cells per spot). When ``inplace``, writes

    - ``cells.obs[key_added]``: categorical of spot ``obs_names`` (categories: all spots), NaN outside spots.
    - ``spots.obs["n_cells"]``: number of cells per spot (0 for empty spots).
    - ``cells.uns[key_added]``: parameters and counts (provenance).

    Raises
    ------
    ValueError
        When no cell falls in any spot although both exist: the two coordinate frames do not match.
    """
    from scipy.spatial import cKDTree

    from bitro.io._build import get_mpp, get_table

    spots = get_table(sdata, spots_key, hint=_SPOTS_HINT)
    cells = get_table(sdata, cells_key, hint=_CELLS_HINT)
    if inplace:
        check_not_exists(key_added, cells.obs, what="obs column", overwrite=overwrite)
        check_not_exists(N_CELLS, spots.obs, what=f"{spots_key}.obs column", overwrite=overwrite)
    mpp = get_mpp(sdata)
    radius_px, r_um, r_source = _spot_radius_px(sdata, spots_key, radius_um, mpp)
    spot_xy, cell_xy = _coords(spots, spots_key), _coords(cells, cells_key)

    codes = np.full(len(cell_xy), -1, dtype=np.int64)
    if len(spot_xy) and len(cell_xy):
        dist, idx = cKDTree(spot_xy).query(cell_xy, k=1, distance_upper_bound=radius_px)
        inside = np.isfinite(dist)
        codes[inside] = idx[inside]
        if not inside.any():
            raise _mismatch_error(cell_xy, spot_xy, radius_px, r_um)
    inside = codes >= 0
    n_per_spot = np.bincount(codes[inside], minlength=len(spot_xy)).astype(np.int64)
    spot_ids = pd.Categorical.from_codes(codes, categories=pd.Index(spots.obs_names.astype(str)))
    if not inplace:
        return pd.Series(spot_ids, index=cells.obs_names, name=key_added)

    cells.obs[key_added] = spot_ids
    spots.obs[N_CELLS] = n_per_spot
    n_out, n_empty = int((~inside).sum()), int((n_per_spot == 0).sum())
    if n_empty:
        logger.warning(
            "assign_cells: %d of %d spots contain no cell centroid; they are kept with %s.obs['%s'] == 0.",
            n_empty,
            len(spot_xy),
            spots_key,
            N_CELLS,
        )
    logger.info(
        "assign_cells: %d of %d cells lie inside a spot; %d lie outside every spot (spot_id NA).",
        int(inside.sum()),
        len(cell_xy),
        n_out,
    )
    cells.uns[key_added] = {
        "params": {
            "spots_key": spots_key,
            "radius_um": r_um,
            "radius_px": float(radius_px),
            "radius_source": r_source,
            "mpp": mpp,
        },
        "n_assigned": int(inside.sum()),
        "n_unassigned": n_out,
        "n_empty_spots": n_empty,
        "bitro_version": __version__,
    }
    return None


# ----------------------------------------------------------------------------------------------- patches
def _tissue_mask(sdata: sd.SpatialData, tissue_key: str):
    """Return ``(mask, sx, sy, tx, ty)``: global x = col · sx + tx for mask pixel column ``col``."""
    from spatialdata.transformations import get_transformation

    element = sdata.labels[tissue_key]
    if hasattr(element, "children") and len(element.children) > 0:  # multiscale: use the finest level
        node = element["scale0"]
        arr = next(iter(node.ds.data_vars.values()))
    else:
        arr = element
    affine = get_transformation(element, to_coordinate_system=K.CS).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    affine = np.asarray(affine, dtype=np.float64)
    if abs(affine[0, 1]) > 1e-9 or abs(affine[1, 0]) > 1e-9 or affine[0, 0] <= 0 or affine[1, 1] <= 0:
        msg = (
            f"The tissue mask {tissue_key!r} has a rotated or flipped transformation to {K.CS!r}; "
            "make_patches supports scale + translation only. Re-run bt.pp.detect_tissue."
        )
        raise ValueError(msg)
    mask = np.asarray(arr.data) > 0
    return mask, affine[0, 0], affine[1, 1], affine[0, 2], affine[1, 2]


def _tissue_fraction(mask, sx, sy, tx, ty, x0s, y0s, size_px) -> np.ndarray:
    """Fraction of mask pixels (by their centres) that are tissue, for each grid square (rows × cols)."""
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)

    def _range(starts, s, t, n):
        lo = np.clip(np.ceil((starts - t) / s - 0.5), 0, n).astype(np.int64)
        hi = np.clip(np.ceil((starts + size_px - t) / s - 0.5), 0, n).astype(np.int64)
        return lo, hi

    c0, c1 = _range(x0s, sx, tx, w)
    r0, r1 = _range(y0s, sy, ty, h)
    total = sat[r1][:, c1] - sat[r0][:, c1] - sat[r1][:, c0] + sat[r0][:, c0]
    count = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    frac = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    # a patch smaller than one mask pixel covers no pixel centre: read the mask at its centre
    small = count == 0
    if small.any():
        rr = np.clip(np.floor((y0s + size_px / 2 - ty) / sy), 0, h - 1).astype(np.int64)
        cc = np.clip(np.floor((x0s + size_px / 2 - tx) / sx), 0, w - 1).astype(np.int64)
        frac = np.where(small, mask[rr][:, cc].astype(np.float64), frac)
    return frac


def make_patches(
    sdata: sd.SpatialData,
    *,
    size_um: float | None = None,
    tissue_key: str = K.TISSUE,
    min_tissue_fraction: float = 0.5,
    cells_key: str = K.CELLS,
    key_added: str = K.PATCHES,
    assign: bool = True,
    overwrite: bool = False,
    inplace: bool = True,
) -> tuple[ad.AnnData, gpd.GeoDataFrame, pd.Series | None] | None:
    """Cut the tissue of a slide into spot-sized square patches on a regular grid (bulk bags).

    The grid starts at the top-left corner of the tissue and steps by ``size_um``.
    With a tissue mask (labels ``tissue_key``, written by :func:`bitro.pp.detect_tissue`,
    any resolution, placed by its scale/translation transformation), a square is kept
    when at least ``min_tissue_fraction`` of it is tissue. Without a mask, the grid
    covers the extent of the cell centroids and a square is kept when it holds at
    least one cell (``tissue_fraction`` is then NaN and ``min_tissue_fraction`` unused).

    Parameters
    ----------
    sdata
        Slide (level-0 pixel coordinates, scale in ``sdata.attrs["bitro_scale"]``).
    size_um
        Side of a patch in µm. Default: the spot diameter recorded on the slide (that of the ST
        training data), else 100 µm (legacy ST).
    tissue_key
        Labels element of the tissue mask; ignored when absent.
    min_tissue_fraction
        Minimum tissue fraction of a kept patch.
    cells_key
        Cells table (for ``n_cells`` and the assignment); optional when a tissue mask exists.
    key_added
        Name of the patches table; its shapes are ``f"{key_added}_shapes"``.
    assign
        Write ``cells.obs["patch_id"]``.
    overwrite
        Replace existing patches (table, shapes) and ``cells.obs["patch_id"]``.
    inplace
        Write into ``sdata`` and return ``None``; ``False``: write nothing and return what would be
        written (see :doc:`/contributing`, "Return values and inplace").

    Returns
    -------
    ``None`` when ``inplace``, else ``(table, shapes, patch_id)`` with ``patch_id`` the cells'
    assignment (a categorical Series indexed by their ``obs_names``; ``None`` without cells or
    ``assign``). When ``inplace``, writes

    - shapes ``f"{key_added}_shapes"``: one square polygon per kept patch (level-0 px).
    - table ``key_added``: one row per patch; ``obs``: ``patch_id``, ``row``, ``col``, ``n_cells``,
      ``tissue_fraction``; ``obsm["spatial"]``: patch centres; ``uns[key_added]``: parameters.
    - ``cells.obs["patch_id"]`` (when ``assign``): the patch holding each centroid (squares are
      half-open, so a cell lies in at most one), NaN outside every kept patch.
    """
    import anndata as ad
    import shapely
    from scipy import sparse

    from bitro.io._build import get_mpp, get_scale, get_table, polygons_element, table_element

    mpp = get_mpp(sdata)
    if size_um is None:
        size_um = get_scale(sdata).get(K.SPOT_DIAMETER_UM)
        if not size_um:
            size_um = LEGACY_ST_SPOT_UM
            logger.warning(
                "make_patches: no spot_diameter_um recorded on the slide; using %g µm patches (legacy ST). "
                "Pass size_um= to match the spot size of the training data.",
                size_um,
            )
    if not np.isfinite(size_um) or size_um <= 0:
        msg = f"size_um must be a positive number of µm, got {size_um!r}."
        raise ValueError(msg)
    if not 0.0 <= min_tissue_fraction <= 1.0:
        msg = f"min_tissue_fraction must lie in [0, 1], got {min_tissue_fraction!r}."
        raise ValueError(msg)
    size_px = float(size_um) / mpp
    shapes_name = K.shapes_key(key_added)
    if inplace:
        check_not_exists(key_added, sdata.tables, what="table", overwrite=overwrite)
        check_not_exists(shapes_name, sdata.shapes, what="shapes element", overwrite=overwrite)

    has_tissue = tissue_key in sdata.labels
    cells = sdata.tables.get(cells_key)
    if cells is None and not has_tissue:
        get_table(
            sdata,
            cells_key,
            hint=f"make_patches needs a tissue mask {tissue_key!r} (bt.pp.detect_tissue) "
            f"or cells ({_CELLS_HINT[:-1]}).",
        )
    if cells is not None and assign and inplace:
        check_not_exists(PATCH_ID, cells.obs, what="obs column", overwrite=overwrite)
    cell_xy = _coords(cells, cells_key) if cells is not None else np.zeros((0, 2))

    if has_tissue:
        mask, sx, sy, tx, ty = _tissue_mask(sdata, tissue_key)
        rows_t, cols_t = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if len(rows_t) == 0:
            msg = f"The tissue mask {tissue_key!r} is empty; check bt.pp.detect_tissue or drop the mask."
            raise ValueError(msg)
        x_lo, x_hi = cols_t[0] * sx + tx, (cols_t[-1] + 1) * sx + tx
        y_lo, y_hi = rows_t[0] * sy + ty, (rows_t[-1] + 1) * sy + ty
        n_cols = max(1, int(np.ceil((x_hi - x_lo) / size_px - 1e-9)))
        n_rows = max(1, int(np.ceil((y_hi - y_lo) / size_px - 1e-9)))
    else:
        if len(cell_xy) == 0:
            msg = f"Table {cells_key!r} has no cells and there is no tissue mask {tissue_key!r}; nothing to patch."
            raise ValueError(msg)
        x_lo, y_lo = cell_xy.min(axis=0)
        n_cols = int(np.floor((cell_xy[:, 0].max() - x_lo) / size_px)) + 1
        n_rows = int(np.floor((cell_xy[:, 1].max() - y_lo) / size_px)) + 1
        logger.info("make_patches: no tissue mask %r; the grid covers the extent of the cells.", tissue_key)
    x0s = x_lo + size_px * np.arange(n_cols)
    y0s = y_lo + size_px * np.arange(n_rows)

    # cell -> grid square (half-open squares: each centroid falls in exactly one)
    cc = np.floor((cell_xy[:, 0] - x_lo) / size_px).astype(np.int64)
    rr = np.floor((cell_xy[:, 1] - y_lo) / size_px).astype(np.int64)
    in_grid = (cc >= 0) & (cc < n_cols) & (rr >= 0) & (rr < n_rows)
    flat = np.where(in_grid, rr * n_cols + cc, -1)
    n_cells_grid = np.bincount(flat[in_grid], minlength=n_rows * n_cols).reshape(n_rows, n_cols)

    if has_tissue:
        frac = _tissue_fraction(mask, sx, sy, tx, ty, x0s, y0s, size_px)
        keep = frac >= min_tissue_fraction
    else:
        frac = np.full((n_rows, n_cols), np.nan)
        keep = n_cells_grid > 0
    if not keep.any():
        msg = (
            f"No patch of {size_um:g} µm has a tissue fraction ≥ {min_tissue_fraction}; "
            "lower min_tissue_fraction or size_um, or check the tissue mask."
        )
        raise ValueError(msg)
    prow, pcol = np.nonzero(keep)
    ids = pd.Index([f"patch_{r}_{c}" for r, c in zip(prow, pcol)], dtype=str)
    px0, py0 = x0s[pcol], y0s[prow]
    centres = np.column_stack([px0 + size_px / 2, py0 + size_px / 2])
    obs = pd.DataFrame(
        {
            PATCH_ID: ids.to_numpy(),
            "row": prow.astype(np.int64),
            "col": pcol.astype(np.int64),
            N_CELLS: n_cells_grid[prow, pcol].astype(np.int64),
            "tissue_fraction": frac[prow, pcol].astype(np.float32),
        },
        index=ids,
    )
    table = ad.AnnData(X=sparse.csr_matrix((len(ids), 0), dtype=np.float32), obs=obs)
    table.obsm[K.SPATIAL] = centres
    params = {
        "size_um": float(size_um),
        "size_px": size_px,
        "mpp": mpp,
        "origin_px": [float(x_lo), float(y_lo)],
        "grid_shape": [int(n_rows), int(n_cols)],
        "tissue_key": tissue_key if has_tissue else "",
        "min_tissue_fraction": float(min_tissue_fraction),
        "cells_key": cells_key if cells is not None else "",
    }
    table.uns[key_added] = {"params": params, "n_patches": len(ids), "bitro_version": __version__}
    table.uns[K.SCALE] = dict(get_scale(sdata))
    shapes = polygons_element(list(shapely.box(px0, py0, px0 + size_px, py0 + size_px)), ids)
    table = table_element(table, region=shapes_name)
    patch_ids = None
    if cells is not None and assign:
        patch_of_square = np.full(n_rows * n_cols, -1, dtype=np.int64)
        patch_of_square[prow * n_cols + pcol] = np.arange(len(ids))
        codes = np.where(flat >= 0, patch_of_square[np.maximum(flat, 0)], -1)
        patch_ids = pd.Categorical.from_codes(codes, categories=ids)
    if not inplace:
        series = None if patch_ids is None else pd.Series(patch_ids, index=cells.obs_names, name=PATCH_ID)
        return table, shapes, series

    if key_added in sdata.tables:
        del sdata.tables[key_added]
    if shapes_name in sdata.shapes:
        del sdata.shapes[shapes_name]
    sdata.shapes[shapes_name] = shapes
    sdata.tables[key_added] = table

    if patch_ids is not None:
        cells.obs[PATCH_ID] = patch_ids
        cells.uns[PATCH_ID] = {
            "params": {"patches_key": key_added, **params},
            "n_assigned": int((patch_ids.codes >= 0).sum()),
            "n_unassigned": int((patch_ids.codes < 0).sum()),
            "bitro_version": __version__,
        }
    logger.info(
        "make_patches: %d patches of %g µm (%d x %d grid); %d cells in kept patches.",
        len(ids),
        size_um,
        n_rows,
        n_cols,
        int(obs[N_CELLS].sum()),
    )
