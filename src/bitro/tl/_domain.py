"""How far a slide sits from the training slides: domain statistics and the domain report (``bt.tl``).

A model extrapolates when a new slide's sequencing depth, nucleus density or size, or stain lie
outside what it was trained on. :func:`domain_stats` summarises one slide in a few numbers (a
JSON-serialisable dict, small enough to store in a model file); :func:`domain_report` compares a
slide's numbers with those of the training slides, one row per statistic, and flags the ones
beyond the training range; :func:`format_domain_report` says it in a few lines for the log.

Stain vectors are unit optical-density directions: the report compares them by angle (one row per
stain), not per RGB component, because a component of a unit vector moves whenever the direction
tilts a little, and a few training slides of one lab span a range far narrower than what an
unshifted new slide of that lab shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro.io._counts import median_total_counts

if TYPE_CHECKING:
    import spatialdata as sd

FORMAT_VERSION = 1
#: Default tolerance of :func:`domain_report`: a value is outside when it lies beyond the training
#: range by more than this fraction of the training median (or, for centred statistics, of one
#: training standard deviation).
TOLERANCE = 0.1
#: Default angular tolerance of :func:`domain_report` for the stain vectors, in degrees: a slide's
#: stain vector is outside when its angle to the training slides' mean direction exceeds the largest
#: training slide's angle by more than this. Measured on HER2ST patient C (Macenko, 3000 px windows):
#: with four sections training and the fifth held out, the held-out section's vector lies at most
#: 4.4° (eosin) and 0.3° (hematoxylin) beyond the training cone, while the same section re-stained
#: to the kit's stain target or TCGA tile lies 8–18° beyond it.
STAIN_ANGLE_TOLERANCE_DEG = 6.0
#: Number of principal directions of the embedding summarised when a projection is given.
N_COMPONENTS = 3
#: Column of ``cells.obs`` written by ``bt.pp.segment_cells`` (µm²) and its mean hematoxylin OD.
AREA_COLUMN = "area_um2"
HEMATOXYLIN_COLUMN = "mean_hematoxylin"
_STAINS = ("hematoxylin", "eosin")
_CHANNELS = ("r", "g", "b")

#: What each statistic measures (the report's ``description`` column).
DESCRIPTIONS = {
    "median_umi_per_spot": "median total count of the spots with counts (sequencing depth)",
    "median_nuclei_per_spot": "median number of segmented nuclei per spot (density, scanner scale)",
    "median_nucleus_area_um2": "median segmented nucleus area in µm² (scanner scale, segmentation)",
    "median_nucleus_hematoxylin": "median of the nuclei's mean hematoxylin optical density (stain, darkness)",
    **{
        f"stain_{s}_od_{c}": f"{c.upper()} optical density of the slide's unit {s} vector (stain)"
        for s in _STAINS
        for c in _CHANNELS
    },
    **{
        f"stain_{s}_max_concentration": f"99th-percentile {s} concentration (stain strength)" for s in _STAINS
    },
    **{
        f"stain_{s}_angle_deg": (
            f"angle in degrees between the slide's {s} vector and the training slides' mean {s} "
            "direction (stain hue)"
        )
        for s in _STAINS
    },
}


def _stain_components(name: str) -> str | None:
    """The stain whose unit-vector component ``name`` is (``stain_{stain}_od_{channel}``), else ``None``."""
    for stain in _STAINS:
        if name in {f"stain_{stain}_od_{c}" for c in _CHANNELS}:
            return stain
    return None


def _centred(name: str) -> bool:
    """Statistics centred on 0 (means along principal directions): no ratio, margins in SD units."""
    return name.startswith("embedding_pc") and name.endswith("_mean")


def domain_stats(
    sdata: sd.SpatialData,
    *,
    spots_key: str = K.SPOTS,
    cells_key: str = K.CELLS,
    use_rep: str = K.EMBEDDING,
    projection: Any | None = None,
    n_components: int = N_COMPONENTS,
) -> dict[str, Any]:
    """Summary statistics of one slide that say how it may differ from other slides.

    Only what the slide reliably holds is reported; a statistic whose input is missing is left out:

    - ``median_umi_per_spot``: median total count of the spots with at least one count (raw counts
      in ``layers["counts"]``, else ``X``);
    - ``median_nuclei_per_spot``: median of ``spots.obs["n_cells"]`` (:func:`bitro.pp.assign_cells`)
      over all spots, else counted from ``cells.obs["spot_id"]``;
    - ``median_nucleus_area_um2`` and ``median_nucleus_hematoxylin``: medians of the ``cells.obs``
      columns ``area_um2`` and ``mean_hematoxylin`` written by :func:`bitro.pp.segment_cells`;
    - ``stain_{hematoxylin,eosin}_od_{r,g,b}`` and ``stain_{hematoxylin,eosin}_max_concentration``:
      the slide's own stain vectors and 99th-percentile concentrations, as fitted by
      :func:`bitro.pp.normalize_stains` before normalising (``attrs["bitro_stain"]``; the record of the
      image the cells were segmented on, else the only one); :func:`domain_report` compares the
      vectors by angle;
    - with a fitted ``projection`` (e.g. the model's :class:`bitro.pp.FeatureProjection`):
      ``embedding_pc{k}_mean`` and ``embedding_pc{k}_std`` of the cells' ``obsm[use_rep]`` along
      the first ``n_components`` principal directions, in units of the training standard deviation
      along each (so a training slide has values near 0 and 1).

    Parameters
    ----------
    sdata
        A preprocessed slide (any subset of the above may be present).
    spots_key, cells_key
        Spot and cell tables.
    use_rep
        Cell features summarised along the projection's directions.
    projection
        Object with ``transform(x)`` and ``explained_variance`` (a fitted
        :class:`bitro.pp.FeatureProjection`); ``None`` leaves out the embedding statistics.
    n_components
        Number of principal directions summarised.

    Returns
    -------
    ``{"format_version": 1, "stats": {name: float}, "context": {"sample_id", "n_spots", "n_cells",
    "use_rep", "stain_key"}}``, built of plain Python numbers, strings and lists (JSON-serialisable).

    Examples
    --------
    >>> train = [bt.tl.domain_stats(s) for s in slides]
    >>> report = bt.tl.domain_report(train, bt.tl.domain_stats(new_slide))
    """
    stats: dict[str, float] = {}
    spots = sdata.tables.get(spots_key)
    cells = sdata.tables.get(cells_key)
    if spots is not None and spots.n_vars > 0:
        depth = median_total_counts(spots)
        if np.isfinite(depth):
            stats["median_umi_per_spot"] = depth
    per_spot = _nuclei_per_spot(spots, cells)
    if per_spot is not None:
        stats["median_nuclei_per_spot"] = per_spot
    if cells is not None:
        for column, name in (
            (AREA_COLUMN, "median_nucleus_area_um2"),
            (HEMATOXYLIN_COLUMN, "median_nucleus_hematoxylin"),
        ):
            if column in cells.obs and cells.n_obs:
                values = cells.obs[column].to_numpy(dtype=np.float64)
                values = values[np.isfinite(values)]
                if len(values):
                    stats[name] = float(np.median(values))
    stain_key = _stain_key(sdata, cells, cells_key)
    if stain_key is not None:
        stats.update(_stain_stats(sdata.attrs["bitro_stain"][stain_key]))
    if projection is not None and cells is not None:
        stats.update(_embedding_stats(cells, use_rep, projection, n_components))
    scale = sdata.attrs.get(K.SCALE, {})
    context = {
        "sample_id": None if scale.get("sample_id") is None else str(scale["sample_id"]),
        "n_spots": None if spots is None else int(spots.n_obs),
        "n_cells": None if cells is None else int(cells.n_obs),
        "use_rep": use_rep if projection is not None else None,
        "stain_key": stain_key,
    }
    return {
        "format_version": FORMAT_VERSION,
        "stats": {k: float(v) for k, v in stats.items()},
        "context": context,
    }


def _nuclei_per_spot(spots: Any, cells: Any) -> float | None:
    if spots is None or spots.n_obs == 0:
        return None
    if K.N_CELLS in spots.obs:
        return float(np.median(spots.obs[K.N_CELLS].to_numpy(dtype=np.float64)))
    if cells is not None and K.SPOT_ID in cells.obs:
        codes = pd.Categorical(cells.obs[K.SPOT_ID].astype("object"), categories=spots.obs_names).codes
        return float(np.median(np.bincount(codes[codes >= 0], minlength=spots.n_obs)))
    return None


def _stain_key(sdata: sd.SpatialData, cells: Any, cells_key: str) -> str | None:
    records = sdata.attrs.get("bitro_stain") or {}
    if not records:
        return None
    info = cells.uns.get(cells_key, {}) if cells is not None else {}
    segmented_on = info.get("image_key") if isinstance(info, dict) else None
    if segmented_on in records:
        return str(segmented_on)
    if len(records) > 1:
        logger.info("domain_stats: several stain records %s; using %r.", sorted(records), sorted(records)[0])
    return str(sorted(records)[0])


def _stain_stats(record: dict[str, Any]) -> dict[str, float]:
    source = record.get("source") or {}
    matrix, maxc = source.get("stain_matrix"), source.get("max_concentrations")
    if matrix is None or maxc is None:
        return {}  # a reinhard record: no stain vectors
    out = {}
    for s, stain in enumerate(_STAINS):
        for c, channel in enumerate(_CHANNELS):
            out[f"stain_{stain}_od_{channel}"] = float(matrix[s][c])
        out[f"stain_{stain}_max_concentration"] = float(maxc[s])
    return out


def _embedding_stats(cells: Any, use_rep: str, projection: Any, n_components: int) -> dict[str, float]:
    fitted_on = getattr(projection, "use_rep", use_rep)
    if fitted_on != use_rep:
        msg = (
            f"The projection was fitted on obsm[{fitted_on!r}] but use_rep={use_rep!r}; pass "
            f"use_rep={fitted_on!r} (the same features) or a projection fitted on {use_rep!r}."
        )
        raise ValueError(msg)
    if use_rep not in cells.obsm or cells.n_obs == 0:
        logger.info("domain_stats: cells.obsm[%r] is missing; embedding statistics left out.", use_rep)
        return {}
    z = np.asarray(projection.transform(np.asarray(cells.obsm[use_rep], dtype=np.float32)), dtype=np.float64)
    k = min(int(n_components), z.shape[1])
    sd_train = np.sqrt(np.maximum(np.asarray(projection.explained_variance, dtype=np.float64)[:k], 1e-12))
    out = {}
    for j in range(k):
        out[f"embedding_pc{j + 1}_mean"] = float(z[:, j].mean() / sd_train[j])
        out[f"embedding_pc{j + 1}_std"] = float(z[:, j].std() / sd_train[j])
    return out


def domain_report(
    train_stats: Sequence[dict[str, Any]],
    slide_stats: dict[str, Any],
    *,
    tolerance: float = TOLERANCE,
    stain_tolerance_deg: float = STAIN_ANGLE_TOLERANCE_DEG,
) -> pd.DataFrame:
    """Compare one slide's :func:`domain_stats` with those of the training slides.

    A value is ``outside`` when it lies below the training minimum or above the training maximum
    by more than ``tolerance`` × the training median (for the centred ``embedding_pc{k}_mean``
    statistics, by more than ``tolerance`` training standard deviations).

    The stain vectors are compared by angle, not per RGB component: for each stain, the row
    ``stain_{stain}_angle_deg`` holds the angle between the slide's unit stain vector and the
    normalised mean of the training slides' vectors, and its training range is the training slides'
    own angles to that mean (a cone around it). The slide is ``outside`` (``"above"``) when its angle
    exceeds the widest training angle by more than ``stain_tolerance_deg`` degrees. The per-channel
    ``stain_{stain}_od_{r,g,b}`` statistics of :func:`domain_stats` are folded into these rows.

    Parameters
    ----------
    train_stats
        :func:`domain_stats` of each training slide.
    slide_stats
        :func:`domain_stats` of the slide to check.
    tolerance
        Margin beyond the training range, as a fraction of the training median.
    stain_tolerance_deg
        Margin beyond the training cone of stain directions, in degrees
        (default :data:`STAIN_ANGLE_TOLERANCE_DEG`; unshifted sections of one patient lie within
        about 4.4° of the cone of the others, re-stained ones 8° or more beyond it).

    Returns
    -------
    One row per statistic present in the slide or in a training slide, indexed by ``statistic``,
    with ``train_min``, ``train_median``, ``train_max``, ``n_train`` (training slides that have it),
    ``value`` (the slide's; NaN when missing), ``ratio`` (``value / train_median``; NaN for centred
    statistics and stain angles), ``outside`` (bool; ``False`` where either side is missing),
    ``direction`` (``"below"``, ``"above"`` or ``""``) and ``description``.
    ``df.attrs["tolerance"]`` and ``df.attrs["stain_tolerance_deg"]`` hold the tolerances.

    Examples
    --------
    >>> df = bt.tl.domain_report(train, bt.tl.domain_stats(new_slide))
    >>> df[df["outside"]]
    """
    if not np.isfinite(tolerance) or tolerance < 0:
        msg = f"tolerance must be a non-negative fraction (e.g. 0.1), got {tolerance!r}."
        raise ValueError(msg)
    if not np.isfinite(stain_tolerance_deg) or not 0 <= stain_tolerance_deg <= 180:
        msg = f"stain_tolerance_deg must be an angle in degrees from 0 to 180 (e.g. 6), got {stain_tolerance_deg!r}."
        raise ValueError(msg)
    train = [_stats_of(s, f"train_stats[{i}]") for i, s in enumerate(train_stats)]
    if not train:
        msg = "train_stats is empty; pass the domain_stats of at least one training slide."
        raise ValueError(msg)
    slide = _stats_of(slide_stats, "slide_stats")
    names = list(dict.fromkeys([*(n for t in train for n in t), *slide]))
    rows = []
    for name in names:
        stain = _stain_components(name)
        if stain is not None:
            if name == f"stain_{stain}_od_{_CHANNELS[0]}":
                rows.append(_stain_angle_row(stain, train, slide, stain_tolerance_deg))
            continue
        values = np.array([t[name] for t in train if name in t], dtype=np.float64)
        value = float(slide.get(name, np.nan))
        lo, mid, hi = (
            (float(f(values)) for f in (np.min, np.median, np.max)) if len(values) else (np.nan,) * 3
        )
        centred = _centred(name)
        margin = tolerance * (1.0 if centred else abs(mid))
        direction = ""
        if np.isfinite(value) and len(values):
            if value < lo - margin:
                direction = "below"
            elif value > hi + margin:
                direction = "above"
        ratio = (
            value / mid
            if (not centred and np.isfinite(value) and mid not in (0.0,) and np.isfinite(mid))
            else np.nan
        )
        rows.append(
            {
                "statistic": name,
                "train_min": lo,
                "train_median": mid,
                "train_max": hi,
                "n_train": len(values),
                "value": value,
                "ratio": ratio,
                "outside": bool(direction),
                "direction": direction,
                "description": _description(name),
            }
        )
    df = pd.DataFrame(rows).set_index("statistic")
    df.attrs["tolerance"] = float(tolerance)
    df.attrs["stain_tolerance_deg"] = float(stain_tolerance_deg)
    return df


def _stain_vector(stats: dict[str, float], stain: str) -> np.ndarray | None:
    """The slide's unit ``stain`` vector, or ``None`` when a component is missing or it is zero."""
    keys = [f"stain_{stain}_od_{c}" for c in _CHANNELS]
    if not all(k in stats for k in keys):
        return None
    v = np.array([stats[k] for k in keys], dtype=np.float64)
    norm = np.linalg.norm(v)
    return v / norm if np.isfinite(norm) and norm > 0 else None


def _angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(u @ v, -1.0, 1.0))))


def _stain_angle_row(
    stain: str, train: list[dict[str, float]], slide: dict[str, float], tolerance_deg: float
) -> dict[str, Any]:
    """The ``stain_{stain}_angle_deg`` row: angles to the training mean direction, flagged beyond the cone."""
    vectors = [v for v in (_stain_vector(t, stain) for t in train) if v is not None]
    mine = _stain_vector(slide, stain)
    lo = mid = hi = value = np.nan
    direction = ""
    if vectors:
        centre = np.sum(vectors, axis=0)
        centre /= np.linalg.norm(centre)
        angles = np.array([_angle_deg(v, centre) for v in vectors])
        lo, mid, hi = float(angles.min()), float(np.median(angles)), float(angles.max())
        if mine is not None:
            value = _angle_deg(mine, centre)
            direction = "above" if value > hi + tolerance_deg else ""
    name = f"stain_{stain}_angle_deg"
    return {
        "statistic": name,
        "train_min": lo,
        "train_median": mid,
        "train_max": hi,
        "n_train": len(vectors),
        "value": value,
        "ratio": np.nan,
        "outside": bool(direction),
        "direction": direction,
        "description": _description(name),
    }


def _stats_of(stats: Any, what: str) -> dict[str, float]:
    if not isinstance(stats, dict) or not isinstance(stats.get("stats"), dict):
        msg = f"{what} is not a domain_stats dict (it needs a 'stats' mapping); build it with bt.tl.domain_stats."
        raise ValueError(msg)
    version = stats.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        msg = f"{what} has format_version {version}, newer than this bitro ({FORMAT_VERSION}); upgrade bitro."
        raise ValueError(msg)
    return {str(k): float(v) for k, v in stats["stats"].items()}


def _description(name: str) -> str:
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    if name.startswith("embedding_pc"):
        what = "mean" if name.endswith("_mean") else "spread"
        return f"{what} of the cells along a training principal direction, in training SDs (features)"
    return ""


def format_domain_report(df: pd.DataFrame) -> str:
    """A few lines for the log: how many statistics are outside the training range, and which.

    Parameters
    ----------
    df
        Output of :func:`domain_report`.

    Returns
    -------
    Text; the first line gives the count and the tolerance, then one line per statistic outside
    the range (value, training range, ratio to the training median).
    """
    tol = df.attrs.get("tolerance", TOLERANCE)
    stain_tol = df.attrs.get("stain_tolerance_deg", STAIN_ANGLE_TOLERANCE_DEG)
    scored = df[np.isfinite(df["value"]) & (df["n_train"] > 0)]
    out = df[df["outside"]]
    head = (
        f"Domain report: {len(out)} of {len(scored)} statistics outside the training range "
        f"(beyond it by more than {tol:.0%} of the training median; stain vectors: more than "
        f"{stain_tol:g}° beyond the training slides' angles to their mean direction)"
    )
    if out.empty:
        return head + "; the slide looks like the training slides."
    lines = [head + "; predictions extrapolate for:"]
    for name, r in out.iterrows():
        ratio = "" if not np.isfinite(r["ratio"]) else f", {r['ratio']:.2g}× the training median"
        lines.append(
            f"  - {name} = {_fmt(r['value'])} ({r['direction']} the training range "
            f"{_fmt(r['train_min'])}–{_fmt(r['train_max'])}{ratio})"
        )
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
