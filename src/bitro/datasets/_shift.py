"""Simulated domain shifts of one slide: sequencing depth, stain and scanner scale (``bt.datasets``).

A model trained on some patients meets slides sequenced shallower, stained in another lab or
scanned at another magnification. These functions make such a slide from one of the kit's, one
shift at a time, so a benchmark can measure what each shift does to a prediction:

- :func:`thin_counts`: binomial thinning of the count table (fewer molecules, same biology);
- :func:`restain`: the H&E image re-painted with the stains of a reference image;
- :func:`rescale` (in :mod:`bitro.datasets._rescale`): the image resampled by a factor while the
  recorded µm per pixel is kept.

Each returns a **new** SpatialData and never modifies its input: tables and shapes are copied,
images are new lazy arrays or shared (dask arrays are never written to). Each appends a record of
what it did to ``attrs["bitro_shift"]`` (a list, so shifts applied one after another are all
recorded, in order).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro.io._build import get_image, get_table
from bitro.io._counts import count_matrix, median_total_counts, total_counts

if TYPE_CHECKING:
    import spatialdata as sd

    from bitro.pp._stain import StainReference

#: Key of ``sdata.attrs`` holding the list of shifts applied to a slide.
SHIFT_ATTRS_KEY = "bitro_shift"
#: Suffixes of files read as JSON stain references (others are read as images).
_REFERENCE_JSON = (".json",)


# --------------------------------------------------------------------------- shared
def _new_sdata(
    sdata: sd.SpatialData,
    *,
    images: dict[str, Any] | None = None,
    labels: dict[str, Any] | None = None,
    shapes: dict[str, Any] | None = None,
    tables: dict[str, Any] | None = None,
    points: dict[str, Any] | None = None,
) -> sd.SpatialData:
    """A new SpatialData: the given elements, else copies of the tables and shapes of ``sdata``.

    Images, labels and points (lazy, never written to) are shared with ``sdata`` unless given;
    tables and shapes are copied so later steps writing into them leave ``sdata`` unchanged.
    """
    import spatialdata as sd

    out = sd.SpatialData(
        images=dict(sdata.images) if images is None else images,
        labels=dict(sdata.labels) if labels is None else labels,
        points=dict(sdata.points) if points is None else points,
        shapes={k: v.copy() for k, v in sdata.shapes.items()} if shapes is None else shapes,
        tables={k: v.copy() for k, v in sdata.tables.items()} if tables is None else tables,
    )
    out.attrs.update(copy.deepcopy(dict(sdata.attrs)))
    return out


def _record(sdata: sd.SpatialData, entry: dict[str, Any]) -> None:
    """Append ``entry`` to ``sdata.attrs["bitro_shift"]``."""
    from bitro._version import __version__

    history = list(sdata.attrs.get(SHIFT_ATTRS_KEY, []))
    history.append({**entry, "bitro_version": __version__})
    sdata.attrs[SHIFT_ATTRS_KEY] = history


# --------------------------------------------------------------------------- depth
def thin_counts(
    sdata: sd.SpatialData,
    *,
    median_umi: float | None = None,
    fraction: float | None = None,
    seed: int | None = 0,
    table_key: str = K.SPOTS,
) -> sd.SpatialData:
    """A copy of the slide sequenced shallower: every molecule kept with probability ``fraction``.

    Binomial thinning: each count ``n`` becomes a draw of ``Binomial(n, fraction)``, independently
    per entry, so the expected count is ``fraction × n``, counts stay non-negative integers and no
    entry grows. It is what sequencing a random ``fraction`` of the same library gives, and models a
    slide whose depth is lower (the held-out HER2ST patient has a median of about 650 UMI per spot
    against about 10,000 in patient C).

    Parameters
    ----------
    sdata
        Slide with a count table ``table_key`` (raw counts in ``layers["counts"]``, else in ``X``).
    median_umi
        Target median total count of the spots with at least one count; the fraction is
        ``median_umi / median`` of the slide (which must be larger). Give this or ``fraction``.
    fraction
        Probability of keeping each molecule, in ``(0, 1]`` (e.g. ``0.1`` for 10 %).
    seed
        Seed of the draws (``None``: ``bt.settings.seed``).
    table_key
        Table to thin. Other tables (e.g. ``"bulk"``, truth cells) are left as they are and named
        in the record.

    Returns
    -------
    A new SpatialData sharing the images, labels and points of ``sdata``, with copies of its tables
    and shapes. In table ``table_key``, ``layers["counts"]`` (when present) and ``X`` hold the
    thinned counts (same dtype and sparsity) and ``obs["total_counts"]`` (when present) their row
    sums. ``X`` is replaced even when it held values other than the counts (e.g. normalised ones,
    which would no longer match; a warning says so). ``attrs["bitro_shift"]`` gains
    ``{"kind": "thin_counts", "table_key", "fraction", "median_umi_before", "median_umi_target",
    "median_umi_after", "seed", "tables_not_thinned"}``.

    Raises
    ------
    ValueError
        Both or neither of ``median_umi`` and ``fraction``; a fraction outside ``(0, 1]``; a target
        median above the slide's (thinning cannot add molecules); counts that are not
        non-negative integers.
    KeyError
        No table ``table_key``.

    Examples
    --------
    >>> shallow = bt.datasets.thin_counts(sdata, median_umi=650)
    >>> tenth = bt.datasets.thin_counts(sdata, fraction=0.1, seed=1)
    """
    from scipy import sparse

    table = get_table(sdata, table_key, hint="Thinning needs a count table, e.g. the spots of bt.io.read_st.")
    layer = K.COUNTS_LAYER if K.COUNTS_LAYER in table.layers else None
    matrix = count_matrix(table, layer)
    before = median_total_counts(table, layer)
    p = _thinning_fraction(median_umi, fraction, before, table_key)
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    _check_counts(values, table_key, layer)
    seed = resolve_seed(seed)
    rng = np.random.default_rng(seed)
    drawn = rng.binomial(np.rint(values).astype(np.int64), p).astype(values.dtype)
    if sparse.issparse(matrix):
        thinned = matrix.copy()
        thinned.data = drawn
        thinned.eliminate_zeros()
    else:
        thinned = drawn.reshape(np.shape(matrix))

    out = _new_sdata(sdata)
    new = out.tables[table_key]
    if layer is not None:
        if not _same_values(table.X, matrix):
            logger.warning(
                "thin_counts: %s.X held values other than layers[%r] (e.g. normalised); it is replaced by "
                "the thinned counts. Re-run your normalisation on the result.",
                table_key,
                layer,
            )
        new.layers[layer] = thinned
    new.X = thinned.copy() if sparse.issparse(thinned) else np.array(thinned)
    if "total_counts" in new.obs:
        new.obs["total_counts"] = total_counts(thinned).astype(new.obs["total_counts"].dtype)
    after = median_total_counts(new, layer)
    others = sorted(k for k in sdata.tables if k != table_key)
    _record(
        out,
        {
            "kind": "thin_counts",
            "table_key": table_key,
            "layer": layer,
            "fraction": p,
            "median_umi_before": before,
            "median_umi_target": None if median_umi is None else float(median_umi),
            "median_umi_after": after,
            "seed": seed,
            "tables_not_thinned": others,
        },
    )
    logger.info(
        "thin_counts: %s thinned to %.4g of its molecules (median %.0f → %.0f per spot).",
        table_key,
        p,
        before,
        after,
    )
    return out


def _thinning_fraction(
    median_umi: float | None, fraction: float | None, before: float, table_key: str
) -> float:
    if (median_umi is None) == (fraction is None):
        msg = "Pass exactly one of median_umi= (target median count per spot) or fraction= (e.g. 0.1)."
        raise ValueError(msg)
    if fraction is not None:
        if not np.isfinite(fraction) or not 0 < fraction <= 1:
            msg = f"fraction must be in (0, 1] (the probability of keeping a molecule), got {fraction!r}."
            raise ValueError(msg)
        return float(fraction)
    if not np.isfinite(median_umi) or median_umi <= 0:
        msg = f"median_umi must be a positive count, got {median_umi!r}."
        raise ValueError(msg)
    if not np.isfinite(before):
        msg = f"Table {table_key!r} has no unit with counts; there is nothing to thin."
        raise ValueError(msg)
    if median_umi > before:
        msg = (
            f"median_umi={median_umi:g} is above the slide's median of {before:g} counts per spot; thinning "
            "only removes molecules. Pass a smaller median_umi (or fraction=)."
        )
        raise ValueError(msg)
    return float(median_umi) / before


def _check_counts(values: np.ndarray, table_key: str, layer: str | None) -> None:
    where = f"{table_key}.layers[{layer!r}]" if layer else f"{table_key}.X"
    if values.size and (
        not np.all(np.isfinite(values)) or values.min() < 0 or not np.array_equal(values, np.rint(values))
    ):
        msg = (
            f"{where} does not hold raw counts (non-negative integers); binomial thinning needs them. "
            "Thin the raw count table as read by bt.io (before any normalisation)."
        )
        raise ValueError(msg)


def _same_values(a: Any, b: Any) -> bool:
    from scipy import sparse

    if a is b:
        return True
    if a is None or b is None or a.shape != b.shape:
        return False
    if sparse.issparse(a) or sparse.issparse(b):
        diff = sparse.csr_matrix(a) - sparse.csr_matrix(b)
        return diff.count_nonzero() == 0
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


# --------------------------------------------------------------------------- stain
def _resolve_reference(reference: Any, method: str, seed: int) -> StainReference:
    """A fitted stain reference from a reference object, dict, JSON file, image file or array."""
    from bitro.io._image import read_image_file
    from bitro.pp._stain import StainReference, fit_stain_reference

    if isinstance(reference, StainReference):
        target = reference
    elif isinstance(reference, dict):
        target = StainReference.from_dict(reference)
    elif isinstance(reference, str | Path):
        path = Path(reference)
        if path.suffix.lower() in _REFERENCE_JSON:
            target = StainReference.load(path)
        else:
            target = fit_stain_reference(read_image_file(path), method=method, seed=seed)
            target = StainReference.from_dict(
                {**target.to_dict(), "description": f"{target.description} ({path.name})"}
            )
    else:
        target = fit_stain_reference(reference, method=method, seed=seed)
    if target.method == "reinhard" or method == "reinhard":
        msg = (
            f"restain re-paints with a stain matrix; method={method!r} / reference method={target.method!r} "
            "must be 'macenko' or 'vahadane'."
        )
        raise ValueError(msg)
    return target


def restain(
    sdata: sd.SpatialData,
    *,
    reference: StainReference | np.ndarray | dict | str | Path,
    method: str = "macenko",
    image_key: str = K.IMAGE,
    key_added: str | None = None,
    seed: int | None = 0,
) -> sd.SpatialData:
    """A copy of the slide as if stained in another lab: the H&E image re-painted with a reference's stains.

    The stain matrix and the 99th-percentile stain concentrations of the slide and of the reference
    are estimated with bitro's own estimator (:func:`bitro.pp.fit_stain_reference`); every pixel's
    hematoxylin and eosin concentrations are then rescaled to the reference's and multiplied by the
    reference's stain matrix (:func:`bitro.pp.normalize_stains`, lazily, tile by tile: nothing is
    computed until the image is read).

    Parameters
    ----------
    sdata
        Slide with an RGB H&E image ``image_key``.
    reference
        The stains to paint with: an image (RGB array, or the path of a PNG/JPEG/TIFF file, e.g. the
        kit's ``stain/TCGA-HE-7130-01Z-00-DX1.png``), a fitted :class:`bitro.pp.StainReference`, its
        dict, or the path of its JSON file.
    method
        Stain estimator, ``"macenko"`` or ``"vahadane"``.
    image_key
        Image to re-paint.
    key_added
        Name of the re-painted image in the result; default ``image_key``, replacing the original
        there (so the usual pipeline runs on it unchanged). Another name keeps both.
    seed
        Seed of the pixel sampling of the stain fits (``None``: ``bt.settings.seed``).

    Returns
    -------
    A new SpatialData with the re-painted image ``key_added`` (lazy, ``c, y, x`` uint8, the source's
    transformations, pyramid and chunks) and copies of the other elements of ``sdata``. Images
    derived from ``image_key`` before (stain-normalised ones recorded in ``attrs["bitro_stain"]``)
    show the old stains and are left out. ``attrs["bitro_shift"]`` gains ``{"kind": "restain",
    "image_key", "key_added", "method", "reference" (the target stain dict), "source" (the slide's
    stain dict), "seed", "dropped_images"}``.

    Raises
    ------
    ValueError
        ``method="reinhard"`` (it has no stain matrix), a reference without tissue, an image that
        is not RGB.
    KeyError
        No image ``image_key``.

    Examples
    --------
    >>> other_lab = bt.datasets.restain(sdata, reference="stain/target_image.png")
    """
    from bitro.pp._stain import STAIN_ATTRS_KEY, normalize_stains

    if method not in ("macenko", "vahadane"):
        msg = f"method must be 'macenko' or 'vahadane' (stain-matrix estimators), got {method!r}."
        raise ValueError(msg)
    get_image(sdata, image_key)  # the KeyError lists the images
    key_added = image_key if key_added is None else key_added
    seed = resolve_seed(seed)
    target = _resolve_reference(reference, method, seed)
    stain_records = dict(sdata.attrs.get(STAIN_ATTRS_KEY, {}))
    derived = sorted(
        k for k, v in stain_records.items() if v.get("image_key") == image_key and k != image_key
    )
    images = {k: v for k, v in sdata.images.items() if k not in derived}
    out = _new_sdata(sdata, images=images)
    out.attrs[STAIN_ATTRS_KEY] = {k: v for k, v in stain_records.items() if k not in derived}

    scratch = f"{image_key}__restained"
    while scratch in out.images:
        scratch += "_"
    normalize_stains(out, image_key=image_key, reference=target, method=method, key_added=scratch, seed=seed)
    record = out.attrs[STAIN_ATTRS_KEY].pop(scratch)
    element = out.images[scratch]
    del out.images[scratch]
    if key_added in out.images:
        del out.images[key_added]
    out.images[key_added] = element
    if derived:
        logger.info(
            "restain: images %s were derived from %r before re-staining; left out.", derived, image_key
        )
    _record(
        out,
        {
            "kind": "restain",
            "image_key": image_key,
            "key_added": key_added,
            "method": method,
            "reference": record["reference"],
            "source": record["source"],
            "seed": seed,
            "dropped_images": derived,
        },
    )
    logger.info("restain: %r re-painted with %r into %r.", image_key, target, key_added)
    return out
