"""Property-based tests (hypothesis) of the readers' shared paths: count tables, spot tables and images.

Every generated input must end in a correct object or a clear error (``ValueError`` /
``KeyError`` / ``FileNotFoundError`` with a message naming the problem), never an unrelated
exception or a silently wrong object. The expected outcome is worked out independently from the
documented rules (``bitro.io._st.validate_counts`` / ``read_spot_table``, ``bitro.io._image``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bitro as bt
from bitro.io._image import as_rgb, read_image_file
from bitro.io._st import validate_counts

CLEAR_ERRORS = (ValueError, KeyError, FileNotFoundError)
PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

# --------------------------------------------------------------------------------- count tables
GRID = [(x, y) for x in range(3) for y in range(3)]
GRID_IDS = [f"{x}x{y}" for x, y in GRID]
BAD_COUNTS = [-1.0, 2.5, np.nan, np.inf, -np.inf]


def _expected_counts_error(ids: list[str], genes: list[str], values: np.ndarray) -> str | None:
    """The first problem ``validate_counts`` must report (a fragment of its message), or None."""
    if not ids or not genes:
        return "at least one of each"
    if len(set(genes)) < len(genes):
        return "duplicate gene"
    if len(set(ids)) < len(ids):
        return "duplicate spot ids"
    for bad, what in (
        (np.isnan(values), "NaN counts"),
        (np.isinf(values), "infinite counts"),
        (values < 0, "negative counts"),
        (values != np.rint(values), "fractional counts"),
    ):
        if bad.any():
            return what
    return None


def _maybe(draw, p: float) -> bool:
    """True with probability about ``p``; shrinks towards False (hypothesis favours small draws)."""
    return draw(st.integers(0, 99)) >= 100 * (1 - p)


@st.composite
def count_tables(draw, pool: tuple[str, ...] = (*GRID_IDS, "r1")):
    """Mostly valid raw counts; sometimes a duplicate spot or gene, an empty axis or one bad value.

    Spot ids come from ``pool`` (plus, sometimes, one id from outside it).
    """
    ids = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=7, unique=True))
    if _maybe(draw, 0.3):
        ids.append(draw(st.sampled_from([i for i in (*GRID_IDS, "r1") if i not in ids])))
    genes = draw(st.lists(st.sampled_from(["A", "B", "C", "ERBB2"]), min_size=1, max_size=4, unique=True))
    if _maybe(draw, 0.1):
        ids.append(draw(st.sampled_from(ids)))
    if _maybe(draw, 0.1):
        genes.append(draw(st.sampled_from(genes)))
    if _maybe(draw, 0.05):
        ids, genes = (ids, []) if draw(st.booleans()) else ([], genes)
    values = np.array(
        draw(st.lists(st.integers(0, 30), min_size=len(ids) * len(genes), max_size=len(ids) * len(genes))),
        dtype=np.float64,
    ).reshape(len(ids), len(genes))
    if values.size and _maybe(draw, 0.25):
        values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from(BAD_COUNTS))
    return ids, genes, values


@PROPERTY
@given(
    table=count_tables(), dtype=st.sampled_from(["float64", "float32", "int64", "uint16", "object", "bool"])
)
def test_validate_counts_accepts_only_raw_counts(table, dtype):
    ids, genes, values = table
    frame = pd.DataFrame(values, index=pd.Index(ids, dtype=str), columns=pd.Index(genes, dtype=str))
    expected = _expected_counts_error(ids, genes, values)
    event(f"counts {expected}")
    if dtype in ("object", "bool") and expected is None:
        frame = frame.astype(dtype)
        expected = "non-numeric"
    elif dtype in ("int64", "uint16") and expected is None:
        frame = frame.astype(dtype)  # whole, non-negative, finite values survive the cast exactly
    if expected is None:
        out = validate_counts(frame.copy(), source="t")
        np.testing.assert_array_equal(out.to_numpy(np.float64), values)
        assert list(out.index) == ids and list(out.columns) == genes
    else:
        with pytest.raises(CLEAR_ERRORS) as err:
            validate_counts(frame.copy(), source="t")
        assert expected in str(err.value), str(err.value)


# ------------------------------------------------------------------------ read_st (counts + spots)
@st.composite
def spot_rows(draw):
    """Mostly valid spot rows on the grid; sometimes a repeated position or one broken coordinate."""
    positions = draw(st.lists(st.sampled_from(GRID), min_size=1, max_size=7, unique=True))
    if _maybe(draw, 0.05):
        positions = []
    if positions and _maybe(draw, 0.1):
        positions.append(draw(st.sampled_from(positions)))
    rows = [
        {"x": float(x), "y": float(y), "pixel_x": 100.0 * x + 50, "pixel_y": 80.0 * y + 30 + 5 * x}
        for x, y in positions
    ]
    for row in rows:
        row["selected"] = 0 if _maybe(draw, 0.15) else 1
    if rows and _maybe(draw, 0.3):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        column, value = draw(
            st.sampled_from([("x", np.nan), ("x", 1.5), ("pixel_x", np.nan), ("pixel_y", np.inf)])
        )
        row[column] = value
    return rows


def _expected_read_st(ids, genes, values, rows, mpp):
    """``(error fragment, None)`` or ``(None, joined spot ids in spot-table order)``."""
    error = _expected_counts_error(ids, genes, values)
    if error is not None:
        return error, None
    if not rows:
        return "has no rows", None
    xy = np.array([[r["x"], r["y"]] for r in rows])
    if not (np.isfinite(xy) & (xy == np.rint(xy))).all():
        return "not integers", None
    spot_ids = [f"{int(r['x'])}x{int(r['y'])}" for r in rows]
    if len(set(spot_ids)) < len(spot_ids):
        return "appear on several rows", None
    joined = [(s, r) for s, r in zip(spot_ids, rows) if r["selected"] == 1 and s in ids]
    if not joined:
        return "joins", None
    if not all(np.isfinite([r["pixel_x"], r["pixel_y"]]).all() for _, r in joined):
        return "no valid pixel position", None
    if mpp is None and len(joined) < 3:
        return "At least 3 spots", None
    return None, [s for s, _ in joined]


@st.composite
def st_sections(draw):
    """A spot table and a count table whose rows mostly (not always) name the same spots."""
    rows = draw(spot_rows())
    named = tuple(
        f"{int(r['x'])}x{int(r['y'])}" for r in rows if np.isfinite(r["x"]) and float(r["x"]).is_integer()
    )
    table = draw(count_tables(pool=named or tuple(GRID_IDS)))
    return table, rows


@PROPERTY
@given(section=st_sections(), mpp=st.sampled_from([1.0, 1.0, None]))
def test_read_st_gives_the_joined_table_or_a_clear_error(section, mpp):
    (ids, genes, values), rows = section
    with tempfile.TemporaryDirectory() as tmp:
        counts_path, spots_path = Path(tmp) / "c.tsv", Path(tmp) / "s.tsv"
        pd.DataFrame(values, index=pd.Index(ids, name=""), columns=genes).to_csv(counts_path, sep="\t")
        columns = ["x", "y", "pixel_x", "pixel_y", "selected"]
        pd.DataFrame(rows, columns=columns).to_csv(spots_path, sep="\t", index=False)
        error, joined = _expected_read_st(ids, genes, values, rows, mpp)
        event(f"read_st expects {error}")
        try:
            sdata = bt.io.read_st(counts_path, spots_path, mpp=mpp)
        except CLEAR_ERRORS as err:
            if error is None and mpp is None and "mpp" in str(err):
                return  # the spot grid may be too degenerate to estimate µm per pixel: said so
            assert error is not None, f"unexpected error: {err}"
            assert error in str(err), str(err)
            return
    assert error is None, f"expected an error ({error!r}) but read_st returned"
    table = sdata["spots"]
    assert list(table.obs_names) == joined
    by_id = dict(zip(ids, values))
    np.testing.assert_array_equal(table.layers["counts"].toarray(), np.array([by_id[s] for s in joined]))
    by_spot = {f"{int(r['x'])}x{int(r['y'])}": (r["pixel_x"], r["pixel_y"]) for r in rows}
    np.testing.assert_array_equal(table.obsm["spatial"], np.array([by_spot[s] for s in joined]))
    mpp_out = sdata.attrs["bitro_scale"]["mpp"]
    assert np.isfinite(mpp_out) and mpp_out > 0 and (mpp is None or mpp_out == mpp)


# ----------------------------------------------------------------------------------------- images
def _expected_rgb(array: np.ndarray) -> np.ndarray:
    """The documented conversion rule of ``bitro.io._image``, written out plainly (float64)."""
    if np.issubdtype(array.dtype, np.integer):
        top = int(array.max())
        if top <= 255:
            return np.clip(array, 0, 255).astype(np.uint8)
        bits = next(b for b in (8, 10, 12, 14, 16) if top <= 2**b - 1)
        return np.clip(np.rint(array.astype(np.float64) * 255 / (2**bits - 1)), 0, 255).astype(np.uint8)
    finite = array[np.isfinite(array)]
    unit = np.count_nonzero(finite > 1) <= 0.01 * max(finite.size, 1)
    clean = np.where(np.isfinite(array), array, 0.0).astype(np.float64)
    return np.clip(np.rint(clean * (255.0 if unit else 1.0)), 0, 255).astype(np.uint8)


DTYPES = ["uint8", "uint16", "int16", "int32", "int64", "float32", "float64", "bool"]


def _elements(dtype: np.dtype):
    if dtype.kind == "f":
        return st.one_of(
            st.floats(0, 1, width=dtype.itemsize * 8),
            st.floats(-10, 300, width=dtype.itemsize * 8),
            st.sampled_from([np.nan, np.inf, -np.inf, 1.0001]),
        )
    if dtype.kind == "b":
        return st.booleans()
    info = np.iinfo(dtype)
    return st.one_of(st.integers(0, 255), st.integers(max(info.min, -5), min(info.max, 70_000)))


@st.composite
def images(draw, *, valid_shape: bool = False):
    """Arrays of many dtypes; mostly ``(h, w, 3|4)``, sometimes grey, odd channels or empty."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = [draw(st.integers(1, 6)), draw(st.integers(1, 6)), 3]
    if not valid_shape:
        shape[2] = draw(st.sampled_from([3, 3, 3, 4, 4, 1, 2, 5]))
        if _maybe(draw, 0.1):
            shape = shape[:2]
        elif _maybe(draw, 0.05):
            shape.append(1)
        if _maybe(draw, 0.05):
            shape[0] = 0
    return draw(hnp.arrays(dtype, tuple(shape), elements=_elements(dtype)))


@PROPERTY
@given(array=images())
def test_as_rgb_gives_8_bit_rgb_by_the_rule_or_a_clear_error(array):
    event(f"{array.dtype} ndim{array.ndim}")
    try:
        out = as_rgb(array, source="Image")
    except CLEAR_ERRORS as err:
        message = str(err)
        assert message.startswith("Image ")
        grey = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 1)
        if grey:
            assert "grey-scale" in message
        elif array.ndim != 3 or array.shape[-1] not in (3, 4):
            assert "expected (height, width, 3)" in message
        elif 0 in array.shape[:2]:
            assert "is empty" in message
        elif array.dtype == bool:
            assert "pixel type bool" in message
        else:
            assert array.dtype.kind in "iu" and int(array.max()) > 65535 and "16 bits" in message
        return
    assert array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype != bool
    assert out.dtype == np.uint8 and out.shape == (*array.shape[:2], 3)
    expected = _expected_rgb(array[..., :3])
    # the package multiplies in float32: a value exactly between two integers may round either way
    assert np.abs(out.astype(int) - expected.astype(int)).max(initial=0) <= 1


@PROPERTY
@given(array=images(valid_shape=True))
def test_image_files_read_as_the_array_they_hold(array):
    import tifffile

    if array.dtype == bool:  # not an RGB TIFF sample type
        array = array.astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "he.tif"
        tifffile.imwrite(path, array, photometric="rgb")
        try:
            expected = as_rgb(array, source="Image 'he.tif'")
        except ValueError as err:
            with pytest.raises(ValueError, match="16 bits") as got:
                read_image_file(path)
            assert str(got.value) == str(err)
            return
        np.testing.assert_array_equal(read_image_file(path), expected)
