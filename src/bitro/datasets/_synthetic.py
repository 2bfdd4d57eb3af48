"""Synthetic H&E tissue with known cells, spots and bulk counts (``bt.datasets.synthetic_tissue``).

The generator is the built-in data set of the demo and of the fast tests. Each slide has:

- a procedurally rendered H&E-like image whose nuclei belong to cell types that differ in
  size, shape, stain darkness and texture, arranged in smooth spatial domains;
- the ground-truth cells (outlines, instance mask, counts drawn from a negative binomial
  whose mean depends on the cell type, on smooth spatial programs and on the nucleus size);
- ST or Visium spots whose counts are the exact sums of the cells whose centroid they hold;
- the slide's bulk profile.

Cell-type appearance and expression profiles come from one random stream shared by all
slides of a call; the layout of each slide comes from its own stream, so a model trained
on some slides generalises to the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import progress, resolve_seed
from bitro._version import __version__
from bitro.datasets import _synthetic_render as R

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

CELLS_TRUTH = "cells_truth"
NUCLEI_TRUTH = "nuclei_truth"
ATTRS_KEY = "bitro_synthetic"
N_PROGRAMS = 3
"""Number of smooth spatial expression programs."""
MPP_RANGE = (0.1, 2.0)
MAX_CELL_TYPES = 12
DOMAIN_SIZE_RANGE_UM = (20.0, 1000.0)
"""Valid correlation lengths (µm) of the cell-type domains."""
COMPOSITION_SD_RANGE = (0.0, 3.0)
"""Valid standard deviations of a slide's log cell-type weights."""


@dataclass(frozen=True)
class _Technology:
    label: str
    diameter_um: float
    spacing_um: float
    grid: Literal["square", "hex"]


TECHNOLOGIES = {
    "st": _Technology("ST", 100.0, 200.0, "square"),
    "visium": _Technology("Visium", 55.0, 100.0, "hex"),
}

_MARKER_NAMES = {
    "tumour": ("EPCAM", "KRT8", "KRT18", "ERBB2", "MKI67"),
    "lymphocyte": ("PTPRC", "CD3E", "CD2", "MS4A1", "CCL5"),
    "fibroblast": ("COL1A1", "COL1A2", "DCN", "LUM", "FAP"),
    "macrophage": ("CD68", "CD163", "LYZ", "C1QA", "AIF1"),
    "plasma": ("MZB1", "JCHAIN", "IGKC", "XBP1", "SDC1"),
    "endothelial": ("PECAM1", "VWF", "CDH5", "PLVAP", "CLDN5"),
}


@dataclass(frozen=True)
class _Expression:
    """Cell-type expression profiles shared by all slides of one call."""

    genes: list[str]
    base: np.ndarray  # (G,) log mean count of a reference-sized cell
    type_effect: np.ndarray  # (T, G) log fold changes per type
    loadings: np.ndarray  # (P, G) gene loadings of the spatial programs
    dispersion: np.ndarray  # (G,) negative-binomial shape (larger = closer to Poisson)
    markers: dict[str, list[str]]


def _expression_model(rng: np.random.Generator, styles: list[R.CellTypeStyle], n_genes: int) -> _Expression:
    n_types = len(styles)
    per_type = int(np.clip(n_genes // (3 * n_types), 1, 5))
    genes = [f"GENE{g + 1:04d}" for g in range(n_genes)]
    base = rng.normal(np.log(0.4), 1.0, n_genes).clip(np.log(0.01), np.log(20.0))
    effect = rng.normal(0, 0.35, (n_types, n_genes)) * (rng.uniform(size=(n_types, n_genes)) < 0.4)
    markers: dict[str, list[str]] = {}
    for t, style in enumerate(styles):
        idx = np.arange(t * per_type, (t + 1) * per_type)
        names = _MARKER_NAMES.get(style.name, ())
        for k, g in enumerate(idx):
            if k < len(names):
                genes[g] = names[k]
        base[idx] = rng.normal(np.log(0.3), 0.3, len(idx))
        effect[:, idx] = -0.5
        effect[t, idx] = rng.uniform(2.2, 3.2, len(idx))
        markers[style.name] = [genes[g] for g in idx]
    loadings = rng.normal(0, 0.6, (N_PROGRAMS, n_genes)) * (rng.uniform(size=(N_PROGRAMS, n_genes)) < 0.3)
    dispersion = np.exp(rng.normal(np.log(4.0), 0.5, n_genes))
    return _Expression(genes, base, effect, loadings, dispersion, markers)


def _draw_counts(
    rng: np.random.Generator,
    expr: _Expression,
    cell_type: np.ndarray,
    programs: np.ndarray,
    area_um2: np.ndarray,
) -> np.ndarray:
    """Negative-binomial counts (cells × genes): type profile + spatial programs + nucleus size."""
    size = 0.5 * np.log(np.maximum(area_um2, 1.0) / 50.0) + rng.normal(0, 0.2, len(cell_type))
    log_mu = expr.base[None] + expr.type_effect[cell_type] + programs @ expr.loadings + size[:, None]
    mu = np.exp(log_mu)
    theta = expr.dispersion[None]
    return rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)


def _spot_grid(
    height: int, width: int, radius_px: float, spacing_px: float, grid: str
) -> tuple[np.ndarray, list]:
    """Centres (x, y) of the spots whose disc lies fully inside the image, centred, with ids ``"<col>x<row>"``."""
    row_step = spacing_px if grid == "square" else spacing_px * np.sqrt(3) / 2
    span_x, span_y = width - 1 - 2 * radius_px, height - 1 - 2 * radius_px
    n_col = int(np.floor(span_x / spacing_px)) + 1
    n_row = int(np.floor(span_y / row_step)) + 1
    shift = spacing_px / 2 if grid == "hex" and n_row > 1 else 0.0
    used_x = (n_col - 1) * spacing_px + (shift if (n_col - 1) * spacing_px + shift <= span_x else 0.0)
    x0 = radius_px + (span_x - used_x) / 2
    y0 = radius_px + (span_y - (n_row - 1) * row_step) / 2
    cols, rows = np.meshgrid(np.arange(n_col), np.arange(n_row))
    cols, rows = cols.ravel(), rows.ravel()
    x = x0 + cols * spacing_px + (rows % 2) * shift
    y = y0 + rows * row_step
    eps = 1e-6
    inside = (
        (x - radius_px >= -eps) & (x + radius_px <= width - 1 + eps) & (y + radius_px <= height - 1 + eps)
    )
    ids = [f"{c}x{r}" for c, r in zip(cols[inside], rows[inside])]
    return np.column_stack([x[inside], y[inside]]), ids


def _number_in(value: object, lo: float, hi: float) -> bool:
    """``value`` is a real number (not a bool) in ``[lo, hi]``."""
    number = (int, float, np.integer, np.floating)
    return not isinstance(value, bool) and isinstance(value, number) and lo <= value <= hi


def _check_mixing(domain_size_um: float, mixing: float, composition_sd: float = 0.0) -> None:
    lo, hi = DOMAIN_SIZE_RANGE_UM
    if not _number_in(domain_size_um, lo, hi):
        msg = (
            f"domain_size_um must be a number of µm in [{lo:g}, {hi:g}], got {domain_size_um!r}; "
            f"{R.DOMAIN_SIZE_UM:g} (the default) makes domains about one ST spot wide."
        )
        raise ValueError(msg)
    if not _number_in(mixing, 0.0, 1.0):
        msg = (
            f"mixing must be a number in [0, 1] (share of cells whose type ignores the domains), got {mixing!r}; "
            f"0 gives pure domains, 1 no domains, {R.MIXING:g} is the default."
        )
        raise ValueError(msg)
    lo, hi = COMPOSITION_SD_RANGE
    if not _number_in(composition_sd, lo, hi):
        msg = (
            f"composition_sd must be a number in [{lo:g}, {hi:g}] (standard deviation of each slide's log "
            f"cell-type weights), got {composition_sd!r}; 0 (the default) gives every slide the same "
            "expected composition, 0.7 about twofold differences between slides."
        )
        raise ValueError(msg)


def _check_args(
    n_slides: int, size: int | tuple[int, int], technology: str, n_genes: int, n_cell_types: int, mpp: float
) -> tuple[int, int, _Technology]:
    if not isinstance(n_slides, int | np.integer) or n_slides < 1:
        msg = f"n_slides must be a positive integer, got {n_slides!r}; pass n_slides=1 for a single slide."
        raise ValueError(msg)
    tech = TECHNOLOGIES.get(str(technology).lower())
    if tech is None:
        msg = f"Unknown technology {technology!r}; choose 'ST' (100 µm spots, 200 µm grid) or 'visium' (55 µm, 100 µm)."
        raise ValueError(msg)
    if not (isinstance(mpp, int | float | np.floating) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        msg = f"mpp (µm per pixel) must be a number in [{MPP_RANGE[0]}, {MPP_RANGE[1]}], got {mpp!r}; 0.5 is typical."
        raise ValueError(msg)
    if not isinstance(n_cell_types, int | np.integer) or not 1 <= n_cell_types <= MAX_CELL_TYPES:
        msg = f"n_cell_types must be an integer in [1, {MAX_CELL_TYPES}], got {n_cell_types!r}."
        raise ValueError(msg)
    if not isinstance(n_genes, int | np.integer) or n_genes < n_cell_types:
        msg = (
            f"n_genes must be an integer ≥ n_cell_types ({n_cell_types}) so that every type has a marker gene, "
            f"got {n_genes!r}."
        )
        raise ValueError(msg)
    hw = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int | np.integer) for v in hw):
        msg = f"size must be an int or a (height, width) pair of ints in pixels, got {size!r}."
        raise ValueError(msg)
    need = int(np.ceil(tech.diameter_um / mpp)) + 1
    if min(hw) < need:
        msg = (
            f"size {hw} px is too small to hold one {tech.label} spot ({tech.diameter_um:g} µm = {need} px at "
            f"mpp={mpp}); pass size ≥ {need} (e.g. size={max(need, 600)})."
        )
        raise ValueError(msg)
    return int(hw[0]), int(hw[1]), tech


def synthetic_tissue(
    n_slides: int = 1,
    *,
    size: int | tuple[int, int] = 2000,
    technology: Literal["ST", "visium"] = "ST",
    n_genes: int = 200,
    n_cell_types: int = 5,
    mpp: float = 0.5,
    domain_size_um: float = R.DOMAIN_SIZE_UM,
    mixing: float = R.MIXING,
    composition_sd: float = 0.0,
    seed: int | None = None,
) -> sd.SpatialData | list[sd.SpatialData]:
    """Generate synthetic H&E slides with ground-truth cells, spot counts and bulk profiles.

    Nuclei of ``n_cell_types`` types (tumour, lymphocyte, fibroblast, macrophage, plasma,
    endothelial, then random types) are placed in smooth spatial domains with a minimum
    spacing and drawn into a Beer–Lambert H&E image over fibrous eosin stroma with glass
    holes. The type sets the nucleus size, elongation, darkness, colour and texture *and*
    the expression profile, so morphology predicts expression. Counts per cell are negative
    binomial with a mean from the type profile (marker genes per type), three smooth spatial
    programs and the nucleus area.

    Slides of one call share the cell-type appearance and expression profiles and differ in
    layout. Slide ``i`` depends only on ``seed`` and ``i`` (not on ``n_slides``).

    How many cells and how many types a spot holds follows from three knobs: ``technology`` (spot
    size), ``domain_size_um`` (how large the cell-type domains are) and ``mixing`` (how many cells
    ignore their domain). At the defaults an ST spot holds about 24 cells of 3 types (the dominant
    type ≈ 73% of them), like the legacy ST spots of HER2ST, and a Visium spot about 7 cells of 2 types.
    Smaller domains or more mixing put more types into a spot, which is what separates a method that
    tells the cells of a spot apart from an equal split of the spot.

    Parameters
    ----------
    n_slides
        Number of slides.
    size
        Image size in pixels: ``n`` for ``n × n`` or ``(height, width)``. It must hold at least one spot.
    technology
        Spot layout. ``"ST"``: legacy Spatial Transcriptomics as in HER2ST, 100 µm spots on a 200 µm square
        grid (about 24 cells per spot at the default density); ``"visium"``: 55 µm spots on a 100 µm
        hexagonal grid (about 7 cells per spot).
    n_genes
        Number of genes (≥ ``n_cell_types``). The first genes are the type markers (real marker
        names for the built-in types, e.g. ``EPCAM`` for tumour), the others ``GENE0001``….
    n_cell_types
        Number of cell types, 1–12.
    mpp
        µm per pixel, in [0.1, 2]; nuclei are 6–13 µm long whatever the pixel size.
    domain_size_um
        Spatial scale of the cell-type domains: the correlation length (µm, in [20, 1000]) of the smooth
        random field of each type whose soft maximum decides the local type. The default 110 µm makes
        domains about one ST spot wide; 40 µm puts several domains into an ST spot, 400 µm makes
        large uniform regions.
    mixing
        How mixed the types are within a domain (and hence within a spot), in [0, 1]: the share of cells
        whose type is drawn uniformly over the types regardless of the domain (then thinned by that
        type's density); less mixing also sharpens the domain borders (softmax gain ``3 * sqrt(0.06 /
        mixing)`` over the domain fields). 0 gives pure domains (one type each, meeting at sharp
        borders), 1 no domains at all (types independent of position). Default 0.06.
    composition_sd
        How much the slides differ in cell-type composition, in [0, 3]: each slide draws one log weight
        per type from a normal distribution with this standard deviation and multiplies the type
        probabilities by the weights (``attrs["bitro_synthetic"]["type_weights"]``). 0 (the default) gives
        every slide the same expected composition, so slides differ only by chance and by their spatial
        programs; 0.7 lets a type's share of a slide vary about twofold, as tumour or immune content
        varies between patients. This is what makes a slide's bulk deviate from the mean of others in a
        way its image shows.
    seed
        Random seed (``None``: ``bt.settings.seed``).

    Returns
    -------
    One :class:`~spatialdata.SpatialData` when ``n_slides == 1``, else a list of them. Each holds

    - image ``"he"``: ``(c, y, x)`` uint8 RGB;
    - labels ``"nuclei_truth"``: uint32 instance mask, 0 = background, value ``i + 1`` = row ``i`` of
      ``"cells_truth"``;
    - table ``"cells_truth"`` linked to polygons ``"cells_truth_shapes"`` (nucleus outlines): integer-valued
      counts (CSR float32, as bitro's readers store counts) in ``X`` and ``layers["counts"]``;
      ``obs["cell_type"]`` (categorical), ``obs["spot_id"]`` (categorical of the spot whose disc holds the
      centroid, NaN outside every spot), ``obs["area_um2"]``, ``obs["total_counts"]``; centroids of the
      labelled nucleus in ``obsm["spatial"]`` (x = column, y = row, level-0 px; pixel centres at integer
      coordinates); ``var["marker_of"]`` (the type a gene marks, ``""`` otherwise); obs names
      ``"cell_<label>"``;
    - table ``"spots"`` linked to circles ``"spots_shapes"`` (radius = diameter / 2 in px): counts = exact sum
      over the truth cells with that ``spot_id`` (empty spots kept as zero rows), centres in ``obsm["spatial"]``,
      ``obs["n_cells_truth"]``, ``obs["total_counts"]``, ``obs["array_col"]``, ``obs["array_row"]``; only spots
      whose disc lies fully inside the image;
    - table ``"bulk"`` (not linked to shapes): one row named after the slide (``"synthetic_<i>"``), summed
      counts of all cells in ``layers["counts"]`` and TPM over the genes in ``X``;
    - ``attrs["bitro_scale"]`` (mpp, spot diameter and spacing in µm, technology, sample id) and
      ``attrs["bitro_synthetic"]`` (parameters, seed, slide index, cell types, marker genes, glass fraction,
      bitro version); each table carries ``uns["bitro_synthetic"]`` (function, seed, slide id).

    Raises
    ------
    ValueError
        For ``n_slides < 1``, an unknown technology, an image too small for one spot, ``mpp``
        outside [0.1, 2], ``n_cell_types`` outside 1–12, fewer genes than cell types,
        ``domain_size_um`` outside [20, 1000], ``mixing`` outside [0, 1] or ``composition_sd`` outside [0, 3].

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.synthetic_tissue(size=800, seed=0)
    >>> train = bt.datasets.synthetic_tissue(3, size=1200, technology="visium", seed=1)
    >>> mixed = bt.datasets.synthetic_tissue(size=1200, technology="visium", mixing=0.5, seed=1)
    >>> cohort = bt.datasets.synthetic_tissue(4, size=1200, composition_sd=0.7, seed=2)
    """
    height, width, tech = _check_args(n_slides, size, technology, n_genes, n_cell_types, mpp)
    _check_mixing(domain_size_um, mixing, composition_sd)
    seed = resolve_seed(seed)
    root = np.random.SeedSequence(seed)
    shared_rng = np.random.default_rng(root.spawn(1)[0])
    slide_seeds = root.spawn(int(n_slides))
    styles = R.cell_type_styles(int(n_cell_types), shared_rng)
    expr = _expression_model(shared_rng, styles, int(n_genes))
    params = {
        "n_slides": int(n_slides),
        "size": [height, width],
        "technology": tech.label,
        "n_genes": int(n_genes),
        "n_cell_types": int(n_cell_types),
        "mpp": float(mpp),
        "domain_size_um": float(domain_size_um),
        "mixing": float(mixing),
        "composition_sd": float(composition_sd),
    }
    slides = [
        _make_slide(np.random.default_rng(ss), i, height, width, float(mpp), tech, styles, expr, params, seed)
        for i, ss in enumerate(progress(slide_seeds, desc="synthetic slides", total=len(slide_seeds)))
    ]
    return slides[0] if n_slides == 1 else slides


def _make_slide(
    rng: np.random.Generator,
    index: int,
    height: int,
    width: int,
    mpp: float,
    tech: _Technology,
    styles: list[R.CellTypeStyle],
    expr: _Expression,
    params: dict,
    seed: int,
) -> sd.SpatialData:
    import spatialdata as sd
    from spatialdata.models import Labels2DModel

    from bitro.io._build import image_element, set_scale

    slide_id = f"synthetic_{index}"
    layout = R.make_layout(
        rng,
        height,
        width,
        mpp,
        styles,
        N_PROGRAMS,
        domain_size_um=params["domain_size_um"],
        mixing=params["mixing"],
        composition_sd=params["composition_sd"],
    )
    nuclei = R.place_nuclei(rng, layout, styles)
    chromatin = R.chromatin_noise(rng, (height, width), mpp)
    nuclei_od, labels = R.draw_nuclei(nuclei, styles, (height, width), chromatin)
    jitter = (float(np.exp(rng.normal(0, 0.06))), float(np.exp(rng.normal(0, 0.04))))
    image = R.compose_image(rng, layout, nuclei, styles, nuclei_od, stain_jitter=jitter)

    # keep nuclei that own pixels in the mask; renumber so label = row + 1
    n_px, centroid = R.label_stats(labels, len(nuclei.xy))
    keep = n_px >= 3
    lut = np.zeros(len(nuclei.xy) + 1, dtype=np.uint32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    labels = lut[labels]
    nuclei, n_px, centroid = nuclei.take(keep), n_px[keep], centroid[keep]
    area = (n_px * mpp**2).astype(np.float32)

    program_values = (
        np.stack([layout.grid.sample(p, centroid) for p in layout.programs], axis=1)
        if len(centroid)
        else np.zeros((0, N_PROGRAMS))
    )
    counts = _draw_counts(rng, expr, nuclei.cell_type, program_values, area)

    radius_px = tech.diameter_um / 2 / mpp
    spot_xy, spot_ids = _spot_grid(height, width, radius_px, tech.spacing_um / mpp, tech.grid)
    spot_code = _assign(centroid, spot_xy, radius_px)

    cells, cell_shapes = _cells_table(nuclei, centroid, area, counts, spot_code, spot_ids, styles, expr)
    spots, spot_shapes = _spots_table(counts, spot_code, spot_xy, spot_ids, radius_px, expr)
    bulk = _bulk_table(counts, slide_id, expr)

    sdata = sd.SpatialData(
        images={K.IMAGE: image_element(image)},
        labels={NUCLEI_TRUTH: Labels2DModel.parse(labels, dims=("y", "x"))},
        shapes={K.shapes_key(CELLS_TRUTH): cell_shapes, K.shapes_key(K.SPOTS): spot_shapes},
        tables={CELLS_TRUTH: cells, K.SPOTS: spots, K.BULK: bulk},
    )
    set_scale(
        sdata,
        mpp=mpp,
        spot_diameter_um=tech.diameter_um,
        spot_spacing_um=tech.spacing_um,
        technology=tech.label,
        sample_id=slide_id,
    )
    sdata.attrs[ATTRS_KEY] = {
        "params": dict(params),
        "seed": int(seed),
        "slide": int(index),
        "slide_id": slide_id,
        "cell_types": [s.name for s in styles],
        "type_weights": [round(float(w), 4) for w in layout.type_weights],
        "markers": {k: list(v) for k, v in expr.markers.items()},
        "glass_fraction": round(layout.glass_fraction, 4),
        "stain_jitter": [round(v, 4) for v in jitter],
        "n_cells": len(centroid),
        "n_spots": len(spot_ids),
        "bitro_version": __version__,
    }
    provenance = {"function": "bt.datasets.synthetic_tissue", "seed": int(seed), "slide_id": slide_id}
    for table in (cells, spots, bulk):
        table.uns[ATTRS_KEY] = dict(provenance)
    logger.info(
        "synthetic_tissue: slide %s, %d x %d px, %d cells, %d spots.",
        slide_id,
        height,
        width,
        len(centroid),
        len(spot_ids),
    )
    return sdata


def _assign(cell_xy: np.ndarray, spot_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """Index of the spot whose disc holds each centroid (-1 outside every spot)."""
    from scipy.spatial import cKDTree

    codes = np.full(len(cell_xy), -1, dtype=np.int64)
    if len(cell_xy) and len(spot_xy):
        dist, idx = cKDTree(spot_xy).query(cell_xy, k=1, distance_upper_bound=radius_px)
        inside = np.isfinite(dist)
        codes[inside] = idx[inside]
    return codes


def _var(expr: _Expression) -> pd.DataFrame:
    marker_of = dict.fromkeys(expr.genes, "")
    for type_name, genes in expr.markers.items():
        for g in genes:
            marker_of[g] = type_name
    return pd.DataFrame(
        {"marker_of": [marker_of[g] for g in expr.genes]}, index=pd.Index(expr.genes, dtype=str)
    )


def _cells_table(
    nuclei: R.Nuclei,
    centroid: np.ndarray,
    area: np.ndarray,
    counts: np.ndarray,
    spot_code: np.ndarray,
    spot_ids: list[str],
    styles: list[R.CellTypeStyle],
    expr: _Expression,
) -> tuple[ad.AnnData, object]:
    import anndata as ad
    import shapely
    from scipy import sparse

    from bitro.io._build import polygons_element, table_element

    names = [f"cell_{i + 1}" for i in range(len(centroid))]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(nuclei.cell_type, categories=[s.name for s in styles]),
            K.SPOT_ID: pd.Categorical.from_codes(spot_code, categories=pd.Index(spot_ids, dtype=str)),
            "area_um2": area,
            "total_counts": counts.sum(axis=1),
        },
        index=pd.Index(names, dtype=str),
    )
    matrix = sparse.csr_matrix(counts)
    adata = ad.AnnData(X=matrix, obs=obs, var=_var(expr))
    adata.layers[K.COUNTS_LAYER] = matrix.copy()
    adata.obsm[K.SPATIAL] = centroid.astype(np.float64)
    polygons = shapely.polygons(R.outline_polygons(nuclei))
    return table_element(adata, region=K.shapes_key(CELLS_TRUTH)), polygons_element(polygons, names)


def _spots_table(
    counts: np.ndarray,
    spot_code: np.ndarray,
    spot_xy: np.ndarray,
    spot_ids: list[str],
    radius_px: float,
    expr: _Expression,
) -> tuple[ad.AnnData, object]:
    import anndata as ad
    from scipy import sparse

    from bitro.io._build import circles_element, table_element

    member = R.membership_matrix(spot_code, len(spot_ids))
    matrix = sparse.csr_matrix(member @ sparse.csr_matrix(counts), dtype=np.float32)
    cols_rows = np.array([s.split("x") for s in spot_ids], dtype=int).reshape(-1, 2)
    obs = pd.DataFrame(
        {
            "n_cells_truth": np.asarray(member.sum(axis=1)).ravel().astype(np.int64),
            "total_counts": np.asarray(matrix.sum(axis=1)).ravel(),
            "array_col": cols_rows[:, 0],
            "array_row": cols_rows[:, 1],
        },
        index=pd.Index(spot_ids, dtype=str),
    )
    adata = ad.AnnData(X=matrix, obs=obs, var=_var(expr))
    adata.layers[K.COUNTS_LAYER] = matrix.copy()
    adata.obsm[K.SPATIAL] = spot_xy.astype(np.float64)
    return table_element(adata, region=K.shapes_key(K.SPOTS)), circles_element(spot_xy, radius_px, spot_ids)


def _bulk_table(counts: np.ndarray, slide_id: str, expr: _Expression) -> ad.AnnData:
    import anndata as ad
    from spatialdata.models import TableModel

    total = counts.sum(axis=0, dtype=np.float64)[None]
    tpm = total / max(float(total.sum()), 1.0) * 1e6
    adata = ad.AnnData(X=tpm.astype(np.float32), obs=pd.DataFrame(index=[slide_id]), var=_var(expr))
    adata.layers[K.COUNTS_LAYER] = total.astype(np.float32)
    adata.uns["units"] = {
        "X": "TPM over the genes of the table",
        K.COUNTS_LAYER: "summed counts of all cells",
    }
    return TableModel.parse(adata)
