"""Reader for legacy Spatial Transcriptomics (e.g. HER2ST): counts + spot table + H&E."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro.io._build import circles_element, image_element, set_scale, table_element
from bitro.io._image import read_image_file

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_SPACING_UM = 200.0


def read_counts_table(path: str | Path, *, make_unique: bool = False) -> pd.DataFrame:
    """Read a spots × genes count table (tab-separated, first column = spot id) and validate it."""
    path = Path(path)
    if path.is_dir():
        msg = f"Counts file {str(path)!r} is a folder; pass the tab-separated counts file inside it."
        raise ValueError(msg)
    if not path.is_file():
        msg = f"Counts file {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    try:
        header = pd.read_csv(path, sep="\t", header=None, nrows=1, dtype=str).iloc[0, 1:]
        counts = pd.read_csv(path, sep="\t", index_col=0)
        counts.columns = (
            header.fillna("").astype(str).to_numpy()
        )  # pandas renames duplicates; keep the real names
    except Exception as err:
        msg = f"Could not parse counts file {str(path)!r} as a tab-separated table ({err}); is it truncated?"
        raise ValueError(msg) from err
    counts.index = counts.index.astype(str)
    return validate_counts(counts, source=str(path), make_unique=make_unique)


def check_positive(value: Any, name: str) -> float:
    """``value`` as a float, or an error when it is not a finite positive number."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value) and value > 0
    if not ok:
        msg = f"{name} must be a positive number, got {value!r}."
        raise ValueError(msg)
    return float(value)


def _examples(items: Any, n: int = 5) -> str:
    items = list(items)
    more = f", … ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def validate_counts(counts: pd.DataFrame, *, source: str, make_unique: bool = False) -> pd.DataFrame:
    """Check a spots × genes count table; return it (duplicate genes renamed with ``make_unique``).

    Raw counts are non-negative integers: a table with duplicate spot ids, duplicate gene names
    (unless ``make_unique``), no spot or no gene, non-numeric columns, or NaN, infinite, negative or
    fractional values is refused with a message naming the problem (normalised or log values are
    not counts; round estimated counts, e.g. ambient-corrected ones, with ``np.rint`` first).
    """
    if counts.shape[0] == 0 or counts.shape[1] == 0:
        msg = (
            f"{source}: the count table has {counts.shape[0]} spots and {counts.shape[1]} genes; it needs at "
            "least one of each (spots as rows, genes as columns, spot ids in the first column)."
        )
        raise ValueError(msg)
    dup = counts.columns[counts.columns.duplicated()].unique()
    if len(dup):
        if not make_unique:
            msg = (
                f"{source}: {len(dup)} duplicate gene names (e.g. {list(dup[:5])}). Pass make_unique=True to "
                "rename them GENE-1, GENE-2, … (anndata's var_names_make_unique), or fix the table."
            )
            raise ValueError(msg)
        import anndata as ad

        tmp = ad.AnnData(var=pd.DataFrame(index=counts.columns.astype(str)))
        tmp.var_names_make_unique()
        counts.columns = tmp.var_names
    dup_rows = counts.index[counts.index.duplicated()].unique()
    if len(dup_rows):
        msg = f"{source}: duplicate spot ids {list(dup_rows[:5])}; each spot must appear once."
        raise ValueError(msg)
    non_numeric = [
        c
        for i, c in enumerate(counts.columns)
        if not pd.api.types.is_numeric_dtype(counts.iloc[:, i])
        or pd.api.types.is_bool_dtype(counts.iloc[:, i])
    ]
    if non_numeric:
        msg = f"{source}: non-numeric count columns {non_numeric[:5]}; the table must hold counts only."
        raise ValueError(msg)
    values = counts.to_numpy(dtype=np.float64)
    problems = {
        "NaN": (np.isnan(values), "replace missing values with 0 or drop those spots"),
        "infinite": (np.isinf(values), "fix or drop those spots"),
        "negative": (values < 0, "raw counts must be non-negative integers"),
    }
    for what, (bad, fix) in problems.items():
        if bad.any():
            raise ValueError(_cell_message(counts, bad, f"{what} counts", fix, source))
    fractional = values != np.rint(values)
    if fractional.any():
        fix = (
            "raw counts must be non-negative integers; normalised or log-transformed values are not counts, "
            "and estimated counts (e.g. ambient-corrected) must be rounded first (np.rint)"
        )
        raise ValueError(_cell_message(counts, fractional, "fractional counts", fix, source))
    return counts


def _cell_message(counts: pd.DataFrame, bad: np.ndarray, what: str, fix: str, source: str) -> str:
    rows, cols = np.nonzero(bad)
    value = float(counts.iat[rows[0], cols[0]])
    where = f"e.g. {value!r} for spot {counts.index[rows[0]]!r}, gene {counts.columns[cols[0]]!r}"
    return f"{source}: {int(bad.sum())} {what} ({where}); {fix}."


def read_spot_table(path: str | Path, *, only_selected: bool = True) -> pd.DataFrame:
    """Read a legacy-ST spot table (``x y pixel_x pixel_y``, optional ``selected``), indexed ``"{x}x{y}"``.

    Array coordinates ``x``, ``y`` must be integers and each ``(x, y)`` must appear on one row only
    (a duplicate is refused, naming its lines); with ``only_selected`` only rows with
    ``selected == 1`` are kept.
    """
    path = Path(path)
    if path.is_dir():
        msg = f"Spot table {str(path)!r} is a folder; pass the tab-separated spot table inside it."
        raise ValueError(msg)
    if not path.is_file():
        msg = f"Spot table {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    try:
        spot_df = pd.read_csv(path, sep="\t")
    except Exception as err:
        msg = f"Could not parse spot table {str(path)!r} as a tab-separated table ({err}); is it truncated?"
        raise ValueError(msg) from err
    missing = {"x", "y", "pixel_x", "pixel_y"} - set(spot_df.columns)
    if missing:
        msg = f"Spot table {str(path)!r} lacks columns {sorted(missing)}; expected x, y, pixel_x, pixel_y."
        raise ValueError(msg)
    if spot_df.empty:
        msg = f"Spot table {str(path)!r} has no rows; it needs one row per spot (x, y, pixel_x, pixel_y)."
        raise ValueError(msg)
    for col in ("x", "y", "pixel_x", "pixel_y", *(["selected"] if "selected" in spot_df else [])):
        if not pd.api.types.is_numeric_dtype(spot_df[col]) or pd.api.types.is_bool_dtype(spot_df[col]):
            msg = f"Spot table {str(path)!r}: column {col!r} is not numeric ({spot_df[col].dtype}); fix the table."
            raise ValueError(msg)
    array_xy = spot_df[["x", "y"]].to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(array_xy) & (array_xy == np.rint(array_xy))).all(axis=1)
    if bad.any():
        lines = (np.flatnonzero(bad) + 2).tolist()  # line 1 is the header
        msg = (
            f"Spot table {str(path)!r}: {int(bad.sum())} rows have array coordinates x, y that are not integers "
            f"(missing, infinite or fractional; lines {_examples(lines)}). x and y are the spot's column and "
            "row on the array; fix or drop those rows."
        )
        raise ValueError(msg)
    ids = pd.Index([f"{int(x)}x{int(y)}" for x, y in array_xy], dtype=str)
    if ids.has_duplicates:
        repeated = ids[ids.duplicated(keep=False)]
        lines = {i: (np.flatnonzero(ids == i) + 2).tolist() for i in repeated.unique()[:3]}
        listing = "; ".join(f"{i!r} on lines {ls}" for i, ls in lines.items())
        msg = (
            f"Spot table {str(path)!r}: {len(repeated.unique())} array positions appear on several rows "
            f"({listing}). Each spot must appear once; remove the extra rows."
        )
        raise ValueError(msg)
    spot_df.index = ids
    spot_df.index.name = "spot"
    if only_selected and "selected" in spot_df:
        spot_df = spot_df[spot_df["selected"] == 1]
    return spot_df


def estimate_mpp(array_xy: np.ndarray, pixel_xy: np.ndarray, *, spacing_um: float) -> float:
    """Estimate µm per pixel from array coordinates (1 unit = one spot pitch) and pixel centres.

    A least-squares fit of pixel position on array position gives pixels per
    spot pitch along each axis; their mean converts ``spacing_um`` to µm/px.
    """
    if len(array_xy) < 3:
        msg = "At least 3 spots are needed to estimate µm per pixel; pass mpp= explicitly."
        raise ValueError(msg)
    if not (np.isfinite(array_xy).all() and np.isfinite(pixel_xy).all()):
        msg = "Could not estimate µm per pixel: some spot coordinates are NaN or infinite; pass mpp= explicitly."
        raise ValueError(msg)
    design = np.column_stack([array_xy, np.ones(len(array_xy))])
    coef_x = np.linalg.lstsq(design, pixel_xy[:, 0], rcond=None)[0]
    coef_y = np.linalg.lstsq(design, pixel_xy[:, 1], rcond=None)[0]
    px_per_pitch = np.mean([np.hypot(coef_x[0], coef_y[0]), np.hypot(coef_x[1], coef_y[1])])
    if not np.isfinite(px_per_pitch) or px_per_pitch <= 0:
        msg = "Could not estimate µm per pixel from the spot grid (degenerate coordinates); pass mpp= explicitly."
        raise ValueError(msg)
    return float(spacing_um / px_per_pitch)


def spots_table(
    counts: pd.DataFrame,
    centres_xy: np.ndarray,
    *,
    obs: pd.DataFrame | None = None,
    region: str = K.shapes_key(K.SPOTS),
) -> ad.AnnData:
    """Build the spots AnnData: counts in ``X`` and ``layers["counts"]`` (CSR float32), centres in ``obsm``."""
    import anndata as ad
    from scipy import sparse

    matrix = sparse.csr_matrix(counts.to_numpy(dtype=np.float32))
    adata = ad.AnnData(
        X=matrix,
        obs=pd.DataFrame(index=counts.index.astype(str)) if obs is None else obs,
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.layers[K.COUNTS_LAYER] = matrix.copy()
    adata.obsm[K.SPATIAL] = np.asarray(centres_xy, dtype=np.float64)
    adata.obs["total_counts"] = np.asarray(matrix.sum(axis=1)).ravel()
    return table_element(adata, region=region)


def check_finite_centres(centres_xy: np.ndarray, *, ids: pd.Index, source: str) -> None:
    """Raise when a spot centre is NaN or infinite (such a spot has no place on the image)."""
    bad = ~np.isfinite(centres_xy).all(axis=1)
    if bad.any():
        msg = (
            f"{source}: {int(bad.sum())} of {len(bad)} spots have no valid pixel position (NaN or infinite "
            f"coordinates; spots {_examples(ids[bad])}). Fix or drop those spots in the coordinate table."
        )
        raise ValueError(msg)


def check_inside_image(
    centres_xy: np.ndarray, shape_yx: tuple[int, int], *, ids: pd.Index, source: str
) -> None:
    """Raise when spot centres are not finite or fall outside the image (wrong image, swapped axes or scale)."""
    check_finite_centres(centres_xy, ids=ids, source=source)
    h, w = shape_yx
    outside = (
        (centres_xy[:, 0] < 0) | (centres_xy[:, 0] >= w) | (centres_xy[:, 1] < 0) | (centres_xy[:, 1] >= h)
    )
    if outside.any():
        msg = (
            f"{source}: {int(outside.sum())} of {len(outside)} spot centres lie outside the image "
            f"({w} × {h} px; e.g. spot {ids[outside][0]!r} at x={centres_xy[outside][0, 0]:.0f}, "
            f"y={centres_xy[outside][0, 1]:.0f}). Check that the image belongs to this section, that x is the "
            "column and y the row, and that the coordinates are in full-resolution pixels."
        )
        raise ValueError(msg)


def read_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path | None = None,
    *,
    mpp: float | None = None,
    spot_diameter_um: float = ST_SPOT_DIAMETER_UM,
    spot_spacing_um: float = ST_SPOT_SPACING_UM,
    only_selected: bool = True,
    make_unique: bool = False,
    sample_id: str | None = None,
    chunks: int = 1024,
) -> sd.SpatialData:
    """Read a legacy Spatial Transcriptomics section (HER2ST layout).

    Parameters
    ----------
    counts
        Tab-separated spots × genes raw counts; row ids are ``"{x}x{y}"`` array coordinates.
    spots
        Spot selection table with columns ``x y pixel_x pixel_y`` (and optionally ``selected``,
        ``new_x``, ``new_y``); ``pixel_x`` is the image column, ``pixel_y`` the row.
    image
        Full-resolution H&E image (JPEG/PNG/TIFF). ``None`` builds a SpatialData without image.
    mpp
        µm per image pixel. Estimated from the spot grid (``spot_spacing_um`` centre to centre) when ``None``.
    spot_diameter_um, spot_spacing_um
        Spot diameter and centre-to-centre distance (legacy ST: 100 µm and 200 µm).
    only_selected
        Keep only spots with ``selected == 1`` (spots under tissue).
    make_unique
        Rename duplicate gene names instead of raising.
    sample_id
        Name recorded in the scale metadata and table ``obs["sample_id"]`` (default: counts file stem).
    chunks
        Dask chunk size of the image.

    Returns
    -------
    SpatialData with image ``"he"``, shapes ``"spots_shapes"`` and table ``"spots"`` (raw counts in
    ``layers["counts"]``, centres in ``obsm["spatial"]``); the scale in ``attrs["bitro_scale"]``.
    Spots present in only one of the two tables are dropped with a logged warning (their number and
    examples). Refused with a message: count tables that are not raw counts (see
    :func:`validate_counts`), a spot table with repeated or non-integer array positions, and spots
    with NaN or infinite pixel coordinates.
    """
    import spatialdata as sd

    for name, value in (
        ("mpp", mpp),
        ("spot_diameter_um", spot_diameter_um),
        ("spot_spacing_um", spot_spacing_um),
    ):
        if value is not None:
            check_positive(value, name)
    counts_path, spots_path = Path(counts), Path(spots)
    sample_id = sample_id or counts_path.name.split(".")[0]
    table = read_counts_table(counts_path, make_unique=make_unique)
    spot_df = read_spot_table(spots_path, only_selected=only_selected)
    shared = spot_df.index.intersection(table.index)
    if len(shared) == 0:
        msg = (
            f"No spot of {spots_path.name} joins to a row of {counts_path.name}: count row ids must be "
            f"'{{x}}x{{y}}' array coordinates (e.g. {table.index[0]!r} vs {spot_df.index[0] if len(spot_df) else None!r}). "
            "Check that both files belong to the same section."
        )
        raise ValueError(msg)
    spot_only = spot_df.index.difference(table.index)
    count_only = table.index.difference(spot_df.index)
    if len(spot_only) or len(count_only):
        logger.warning(
            "%s: %d %s without a count row were dropped%s; %d count rows without a %s were dropped%s. "
            "(HER2ST has a few of these; many mean the files do not belong together.)",
            sample_id,
            len(spot_only),
            "selected spots" if only_selected else "spots",
            f" ({_examples(spot_only)})" if len(spot_only) else "",
            len(count_only),
            "selected spot" if only_selected else "spot",
            f" ({_examples(count_only)})" if len(count_only) else "",
        )
    # keep the spot table's order
    shared = spot_df.index[spot_df.index.isin(shared)]
    spot_df, table = spot_df.loc[shared], table.loc[shared]
    centres = spot_df[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    check_finite_centres(centres, ids=shared, source=f"{sample_id} ({spots_path.name})")
    array_cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(spot_df.columns) else ["x", "y"]
    if mpp is None:
        mpp = estimate_mpp(spot_df[array_cols].to_numpy(float), centres, spacing_um=spot_spacing_um)
        logger.info("%s: estimated %.4f µm/px from the spot grid.", sample_id, mpp)

    obs = pd.DataFrame(
        {
            "array_x": spot_df["x"].to_numpy(int),
            "array_y": spot_df["y"].to_numpy(int),
            "sample_id": pd.Categorical([sample_id] * len(spot_df)),
        },
        index=shared.astype(str),
    )
    images = {}
    if image is not None:
        rgb = read_image_file(image)
        check_inside_image(centres, rgb.shape[:2], ids=shared, source=sample_id)
        images[K.IMAGE] = image_element(rgb, dims=("y", "x", "c"), chunks=chunks)
    radius_px = spot_diameter_um / 2 / mpp
    sdata = sd.SpatialData(
        images=images,
        shapes={K.shapes_key(K.SPOTS): circles_element(centres, radius_px, shared)},
        tables={K.SPOTS: spots_table(table, centres, obs=obs)},
    )
    set_scale(
        sdata,
        mpp=mpp,
        spot_diameter_um=spot_diameter_um,
        spot_spacing_um=spot_spacing_um,
        technology="ST",
        sample_id=sample_id,
    )
    return sdata
