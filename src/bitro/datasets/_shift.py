"""Simulated domain shifts of one slide: sequencing depth, stain and scanner scale (``bt.datasets``).

A model trained on some patients meets slides sequenced shallower, stained in another lab or
scanned at another magnification. These functions make such a slide from one of the kit's, one
shift at a time, so a benchmark can measure what each shift does to a prediction:

- :func:`thin_counts`: binomial thinning of the count table (fewer molecules, same biology);
- :func:`restain`: the H&E image re-painted with the stains of a reference image;
- :func:`rescale`: the image resampled by a factor while the recorded µm per pixel is kept.

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
from bitro.io._build import get_image, get_table, image_levels
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


# --------------------------------------------------------------------------- scale
def rescale(sdata: sd.SpatialData, factor: float, *, image_key: str = K.IMAGE) -> sd.SpatialData:
    """A copy of the slide as a scanner at another magnification would give it, with the old scale recorded.

    The image is resampled by ``factor`` (``1.2``: 20 % more pixels along each axis) while
    ``attrs["bitro_scale"]`` is kept as it was (µm per pixel, spot diameter and spacing in µm). In
    the slide's recorded µm, nuclei are then ``factor`` times longer (``factor²`` the area), and
    bitro, which places a spot's disc from the recorded spot diameter (:func:`bitro.pp.assign_cells`),
    finds about ``1 / factor²`` as many nuclei in each spot: the density and size shift of a slide
    scanned at another magnification than recorded.

    The spots stay on the same tissue: their centres ``(x, y)`` map to ``((x + ½)·factor − ½,
    (y + ½)·factor − ½)`` (pixel centres at integer coordinates), the radii of their circles are
    multiplied by ``factor``, and their counts are unchanged.

    What is kept, what is dropped:

    - image ``image_key``: resampled lazily (bilinear, with a Gaussian pre-filter of
      ``σ = (1/factor − 1)/2`` px when shrinking, like ``skimage.transform.rescale``), same pyramid
      factors and chunks; other images are left out (re-derive them, e.g. with
      :func:`bitro.pp.normalize_stains`);
    - labels (tissue masks, nucleus masks) and points: left out;
    - tables annotating polygons (segmented or truth cells, patches) and those polygons: left out,
      since their morphology (areas in µm², embeddings, spot assignment) describes the unscaled
      image — segment the result again (the shift benchmark does);
    - tables annotating circles (spots) with their circles: kept and scaled; the column
      ``obs["n_cells"]`` written by :func:`bitro.pp.assign_cells` is dropped with the cells;
    - shapes no table annotates: scaled (circle radii too); tables with no location (``"bulk"``):
      kept as they are.

    Parameters
    ----------
    sdata
        Slide in bitro's convention (every element in level-0 pixels of ``image_key``).
    factor
        Resampling factor, e.g. ``0.8`` or ``1.2``.
    image_key
        Image to resample.

    Returns
    -------
    A new SpatialData as described; ``attrs["bitro_shift"]`` gains ``{"kind": "rescale", "factor",
    "image_key", "shape_before", "shape_after", "mpp", "dropped"}`` (``dropped``: element names
    left out, by kind).

    Raises
    ------
    ValueError
        A factor that is not a positive finite number, or that leaves no pixel.
    KeyError
        No image ``image_key``.

    Examples
    --------
    >>> denser = bt.datasets.rescale(sdata, 0.8)
    """
    from bitro.io._build import get_mpp, image_element

    factor = _check_factor(factor)
    level0 = get_image(sdata, image_key)
    c, height, width = (int(n) for n in level0.shape)
    out_h, out_w = round(height * factor), round(width * factor)
    if min(out_h, out_w) < 1:
        msg = f"factor={factor:g} leaves no pixel of the {width} × {height} image; pass a larger factor."
        raise ValueError(msg)
    if c not in (3, 4):
        msg = f"Image {image_key!r} has {c} channels; rescale expects an RGB H&E image."
        raise ValueError(msg)
    data = level0.data[:3]
    chunk = int(data.chunksize[1]) if hasattr(data, "chunksize") else 1024
    resampled = resample_image(data, factor, chunk=chunk)
    shapes_yx = image_levels(sdata, image_key)
    scale_factors = [max(1, round(shapes_yx[i - 1][0] / shapes_yx[i][0])) for i in range(1, len(shapes_yx))]
    images = {image_key: image_element(resampled, scale_factors=scale_factors or None, chunks=chunk)}

    tables, shapes, dropped = _scale_tables_and_shapes(sdata, factor)
    dropped["images"] = sorted(k for k in sdata.images if k != image_key)
    dropped["labels"] = sorted(sdata.labels)
    dropped["points"] = sorted(sdata.points)
    out = _new_sdata(sdata, images=images, labels={}, points={}, shapes=shapes, tables=tables)
    from bitro.pp._stain import STAIN_ATTRS_KEY

    if STAIN_ATTRS_KEY in out.attrs:
        out.attrs[STAIN_ATTRS_KEY] = {k: v for k, v in out.attrs[STAIN_ATTRS_KEY].items() if k in images}
    dropped = {k: v for k, v in dropped.items() if v}
    _record(
        out,
        {
            "kind": "rescale",
            "factor": factor,
            "image_key": image_key,
            "shape_before": [height, width],
            "shape_after": [out_h, out_w],
            "mpp": get_mpp(sdata) if K.SCALE in sdata.attrs else None,
            "dropped": dropped,
        },
    )
    if dropped:
        logger.info("rescale: left out %s (they describe the unscaled image).", dropped)
    logger.info(
        "rescale: %r resampled ×%g to %d × %d px; µm per pixel kept.", image_key, factor, out_w, out_h
    )
    return out


def _check_factor(factor: float) -> float:
    try:
        value = float(factor)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        msg = f"factor must be a positive number (e.g. 0.8 or 1.2), got {factor!r}."
        raise ValueError(msg)
    return value


def resample_image(data: Any, factor: float, *, chunk: int = 1024) -> Any:
    """Resample a ``(c, y, x)`` uint8 array (numpy or dask) by ``factor``, lazily, block by block.

    Output pixel ``(i, j)`` samples the source at ``((i + ½)/factor − ½, (j + ½)/factor − ½)``
    bilinearly (edges repeat the border pixel). When shrinking, the source is first smoothed with
    a Gaussian of ``σ = (1/factor − 1)/2`` px against aliasing. Each output block reads only the
    source window it needs, with a margin that makes the result identical to resampling the whole
    image at once.
    """
    import dask
    import dask.array as da

    source = (
        data
        if isinstance(data, da.Array)
        else da.from_array(np.asarray(data), chunks=(data.shape[0], chunk, chunk))
    )
    c, height, width = (int(n) for n in source.shape)
    out_h, out_w = max(1, round(height * factor)), max(1, round(width * factor))
    sigma = max(0.0, (1.0 / factor - 1.0) / 2.0)
    margin = int(np.ceil(4.0 * sigma)) + 2
    rows = []
    for y0 in range(0, out_h, chunk):
        sy = _source_coords(y0, min(y0 + chunk, out_h), factor)
        ya, yb = _window(sy, margin, height)
        row = []
        for x0 in range(0, out_w, chunk):
            sx = _source_coords(x0, min(x0 + chunk, out_w), factor)
            xa, xb = _window(sx, margin, width)
            block = dask.delayed(_resample_block, pure=True)(source[:, ya:yb, xa:xb], sy - ya, sx - xa, sigma)
            row.append(da.from_delayed(block, shape=(c, len(sy), len(sx)), dtype=np.uint8))
        rows.append(row)
    return da.block([rows])


def _source_coords(start: int, stop: int, factor: float) -> np.ndarray:
    return (np.arange(start, stop, dtype=np.float64) + 0.5) / factor - 0.5


def _window(coords: np.ndarray, margin: int, size: int) -> tuple[int, int]:
    lo = int(np.clip(np.floor(coords[0]) - margin, 0, size - 1))
    hi = int(np.clip(np.ceil(coords[-1]) + margin + 1, lo + 1, size))
    return lo, hi


def _resample_block(window: np.ndarray, sy: np.ndarray, sx: np.ndarray, sigma: float) -> np.ndarray:
    """Bilinear samples of ``window`` (``c, h, w``) at rows ``sy`` × columns ``sx`` (window coordinates)."""
    from scipy import ndimage

    window = np.asarray(window)
    out = np.empty((window.shape[0], len(sy), len(sx)), dtype=np.uint8)
    grid = np.meshgrid(sy, sx, indexing="ij")
    for ch in range(window.shape[0]):
        plane = window[ch].astype(np.float32)
        if sigma > 0:
            plane = ndimage.gaussian_filter(plane, sigma, mode="nearest")
        values = ndimage.map_coordinates(plane, grid, order=1, mode="nearest")
        out[ch] = np.clip(np.rint(values), 0, 255)
    return out


def _scale_xy(xy: np.ndarray, factor: float) -> np.ndarray:
    return (np.asarray(xy, dtype=np.float64) + 0.5) * factor - 0.5


def _scale_tables_and_shapes(sdata: sd.SpatialData, factor: float) -> tuple[dict, dict, dict[str, list[str]]]:
    """Tables and shapes of the rescaled slide: circles scaled, polygon-annotating tables dropped."""
    from spatialdata.models import TableModel

    dropped: dict[str, list[str]] = {"tables": [], "shapes": []}
    polygon_shapes = {k for k, gdf in sdata.shapes.items() if "radius" not in gdf.columns}
    tables = {}
    for key, table in sdata.tables.items():
        attrs = table.uns.get(TableModel.ATTRS_KEY) or {}
        regions = {str(r) for r in np.atleast_1d(attrs.get(TableModel.REGION_KEY, []))}
        if regions & polygon_shapes:
            dropped["tables"].append(key)
            continue
        new = table.copy()
        if K.SPATIAL in new.obsm:
            xy = np.asarray(new.obsm[K.SPATIAL], dtype=np.float64).copy()
            xy[:, :2] = _scale_xy(xy[:, :2], factor)
            new.obsm[K.SPATIAL] = xy
        if K.N_CELLS in new.obs:
            del new.obs[K.N_CELLS]
        if K.DISTANCES in new.obsp:
            new.obsp[K.DISTANCES] = new.obsp[K.DISTANCES] * factor
        tables[key] = new
    annotated_by_dropped = set()
    for key in dropped["tables"]:
        attrs = sdata.tables[key].uns.get(TableModel.ATTRS_KEY) or {}
        annotated_by_dropped |= {str(r) for r in np.atleast_1d(attrs.get(TableModel.REGION_KEY, []))}
    shapes = {}
    for key, gdf in sdata.shapes.items():
        if key in annotated_by_dropped:
            dropped["shapes"].append(key)
            continue
        shapes[key] = _scale_shapes(gdf, factor)
    return tables, shapes, dropped


def _scale_shapes(gdf: Any, factor: float) -> Any:
    """Shapes mapped like the image: ``(p + ½)·factor − ½``; circle radii × ``factor``."""
    import shapely
    from spatialdata.models import ShapesModel

    out = gdf.copy()
    offset = 0.5 * factor - 0.5
    out.geometry = shapely.transform(np.asarray(gdf.geometry.values), lambda pts: pts * factor + offset)
    if "radius" in out.columns:
        out["radius"] = out["radius"].to_numpy(dtype=np.float64) * factor
    return ShapesModel.parse(out)
