"""Pure numpy helpers of the cell benchmark: reference splits, within-spot entropy, bulk deviation.

Cells are tied to spots by ``spot_index`` (one integer per cell: the row of its spot, ``-1`` outside
every spot). Count matrices are cells × genes (or spots × genes) in count space, never log1p.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _members(spot_index: np.ndarray, n_spots: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inside, n_cells)``: mask of the cells under a spot and the number of cells of each spot."""
    spot_index = np.asarray(spot_index)
    inside = spot_index >= 0
    return inside, np.bincount(spot_index[inside], minlength=n_spots)


def spot_sums(cell_counts: np.ndarray, spot_index: np.ndarray, n_spots: int) -> np.ndarray:
    """Sum of the cells of each spot (``n_spots × genes``; NaN cells count as 0)."""
    inside, _ = _members(spot_index, n_spots)
    out = np.zeros((n_spots, cell_counts.shape[1]), dtype=np.float64)
    np.add.at(out, np.asarray(spot_index)[inside], np.nan_to_num(cell_counts[inside]))
    return out


def equal_split(spot_counts: np.ndarray, spot_index: np.ndarray) -> np.ndarray:
    """Each cell gets its spot's counts divided by the number of cells of the spot (NaN outside spots)."""
    spot_counts = np.asarray(spot_counts, dtype=np.float64)
    inside, n = _members(spot_index, len(spot_counts))
    out = np.full((len(inside), spot_counts.shape[1]), np.nan)
    idx = np.asarray(spot_index)[inside]
    out[inside] = spot_counts[idx] / n[idx, None]
    return out


def type_profiles(cell_counts: np.ndarray, cell_type: np.ndarray, n_types: int) -> np.ndarray:
    """Mean counts of each type (``n_types × genes``); a type without cells gets the overall mean."""
    cell_type = np.asarray(cell_type)
    out = np.zeros((n_types, cell_counts.shape[1]))
    np.add.at(out, cell_type, cell_counts)
    n = np.bincount(cell_type, minlength=n_types)
    overall = cell_counts.mean(axis=0)
    return np.where(n[:, None] > 0, out / np.maximum(n, 1)[:, None], overall[None])


def type_aware_split(
    spot_counts: np.ndarray, spot_index: np.ndarray, cell_type: np.ndarray, profiles: np.ndarray
) -> np.ndarray:
    """Split each spot's counts over its cells in proportion to their types' profiles (NaN outside spots).

    Cell ``i`` of spot ``s`` gets ``y[s, g] * m[t_i, g] / sum_{j in s} m[t_j, g]``; a gene whose profile
    is zero for every cell of the spot is split equally.
    """
    spot_counts = np.asarray(spot_counts, dtype=np.float64)
    inside, n = _members(spot_index, len(spot_counts))
    idx = np.asarray(spot_index)[inside]
    weight = np.asarray(profiles, dtype=np.float64)[np.asarray(cell_type)[inside]]
    total = np.zeros_like(spot_counts)
    np.add.at(total, idx, weight)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total[idx] > 0, weight / total[idx], 1.0 / n[idx, None])
    out = np.full((len(inside), spot_counts.shape[1]), np.nan)
    out[inside] = share * spot_counts[idx]
    return out


def within_spot_shares(cell_counts: np.ndarray, spot_index: np.ndarray, n_spots: int) -> np.ndarray:
    """Each in-spot cell's share of its spot per gene (cells × genes, NaN outside spots or for zero sums)."""
    inside, _ = _members(spot_index, n_spots)
    idx = np.asarray(spot_index)[inside]
    total = spot_sums(cell_counts, spot_index, n_spots)
    out = np.full(cell_counts.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[inside] = np.where(total[idx] > 0, cell_counts[inside] / total[idx], np.nan)
    return out


def share_entropy(cell_counts: np.ndarray, spot_index: np.ndarray, n_spots: int) -> dict[str, float]:
    """Normalised entropy of the within-spot shares, averaged over spots of ≥ 2 cells and genes.

    For a spot of ``n`` cells and a gene, the shares ``p_i`` (a cell's part of the spot's sum; for
    the attention head, the attention weights) give ``H = -sum p_i log p_i / log n``: 1 for a
    uniform (equal) split, 0 when one cell takes everything. Also returned: the mean effective
    number of cells ``exp(-sum p log p)`` divided by ``n``.
    """
    share = within_spot_shares(cell_counts, spot_index, n_spots)
    inside, n = _members(spot_index, n_spots)
    idx = np.asarray(spot_index)[inside]
    p = share[inside]
    with np.errstate(invalid="ignore", divide="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    plogp[np.isnan(p)] = np.nan
    h = np.zeros((n_spots, share.shape[1]))
    np.add.at(h, idx, -plogp)  # NaN propagates: a gene without signal in a spot is left out
    multi = n >= 2
    if not multi.any():
        return {"entropy": float("nan"), "effective_cells": float("nan")}
    norm = h[multi] / np.log(n[multi])[:, None]
    eff = np.exp(h[multi]) / n[multi][:, None]
    return {"entropy": float(np.nanmean(norm)), "effective_cells": float(np.nanmean(eff))}


def share_correlation(
    pred_counts: np.ndarray, true_counts: np.ndarray, spot_index: np.ndarray, n_spots: int
) -> float:
    """Mean within-spot Pearson correlation between predicted and true cell shares (spots of ≥ 3 cells).

    The correlation is taken per spot and gene across the spot's cells and averaged over the pairs
    where both shares vary; 0 for an equal split (undefined, left out), 1 for exact shares.
    """
    ps = within_spot_shares(pred_counts, spot_index, n_spots)
    ts = within_spot_shares(true_counts, spot_index, n_spots)
    inside, _ = _members(spot_index, n_spots)
    idx = np.asarray(spot_index)[inside]
    ps, ts = ps[inside], ts[inside]
    order = np.argsort(idx, kind="stable")
    idx, ps, ts = idx[order], ps[order], ts[order]
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    values = []
    for a, b in zip(starts, np.r_[starts[1:], len(idx)]):
        if b - a < 3:
            continue
        x, y = ps[a:b], ts[a:b]
        x, y = x - x.mean(axis=0), y - y.mean(axis=0)
        den = np.sqrt((x**2).sum(axis=0) * (y**2).sum(axis=0))
        ok = np.isfinite(den) & (den > 1e-12)
        values.append((x[:, ok] * y[:, ok]).sum(axis=0) / den[ok])
    flat = np.concatenate(values) if values else np.array([])
    return float(flat.mean()) if len(flat) else float("nan")


def log_cpm(counts: np.ndarray) -> np.ndarray:
    """``log1p`` of counts per million over the genes given (rows = samples)."""
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    return np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12) * 1e6)


def bulk_deviation_correlation(
    pred: np.ndarray, truth: np.ndarray, train: np.ndarray, *, pred_train: np.ndarray | None = None
) -> float:
    """Correlation across genes of the predicted and true deviation of a bulk from the training mean.

    ``pred`` and ``truth`` are one slide's bulk counts (genes), ``train`` the training slides' true bulk
    counts (slides × genes). Each is put on ``log1p(CPM)``; the true deviation is the slide's profile
    minus the mean training profile. The predicted deviation is taken from the same true training mean,
    or, with ``pred_train`` (the model's own predicted bulks of the training slides), from the mean of
    those, which removes a bias the model has on every slide. A prediction stuck at its reference has
    no deviation (NaN).
    """
    ref = log_cpm(train).mean(axis=0)
    ref_pred = ref if pred_train is None else log_cpm(pred_train).mean(axis=0)
    dp, dt = log_cpm(pred)[0] - ref_pred, log_cpm(truth)[0] - ref
    dp, dt = dp - dp.mean(), dt - dt.mean()
    den = float(np.sqrt((dp**2).sum() * (dt**2).sum()))
    return float((dp * dt).sum() / den) if den > 1e-12 else float("nan")


def mean_sd(values: Iterable[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation and count of the finite values (NaN mean when there are none)."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
