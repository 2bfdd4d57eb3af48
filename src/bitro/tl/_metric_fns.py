"""Pure numpy metrics of predicted against observed expression (paper §4, Eqs. 14–16).

Every function takes two ``(n_units, n_genes)`` arrays on the same scale — ``obs``
(observed) and ``pred`` (predicted) — and returns a :class:`MetricResult`: the summary
``value``, the per-unit or per-gene ``values`` behind it and the number of ``n_constant``
entries that could not be correlated and were counted as 0.

Conventions
-----------
- A Pearson correlation is undefined when either vector is constant. Such a unit or
  gene counts as **0** in the mean (a constant prediction carries no information) and
  is counted in ``n_constant``; the per-entry array holds 0 there too.
- The Jensen–Shannon divergence uses the mixture ``M = (P + Q) / 2`` and the natural
  logarithm, so it lies in ``[0, ln 2]``. (The paper's Eq. 16 prints ``KL(P‖Q)`` twice;
  that is a typo for the standard definition used here.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

CONSTANT_RTOL = 1e-5
"""A vector is constant when its standard deviation is below ``CONSTANT_RTOL * (1 + |mean|)``.

Loose enough that float32 rounding (predictions are stored as float32) of a constant vector,
e.g. a depth-only prediction after library-size normalisation, is not correlated as if it
were signal."""
TOP_N = 50
"""Number of genes in the ``top-50`` variants of PCC_gene (HEST-Benchmark / TRIPLEX convention)."""


@dataclass(frozen=True)
class MetricResult:
    """Result of one metric.

    Attributes
    ----------
    value
        The summary: mean over units (PCC_overall, JS) or genes (PCC_gene), or the mean error.
    values
        Per-unit (PCC_overall, JS) or per-gene (PCC_gene) values, float64. Constant entries
        hold 0 for PCCs; JS holds NaN for units whose observed or predicted row sums to 0.
    n_constant
        Entries counted as 0 because the observed or predicted vector was constant (PCCs), or
        left out because a row had no mass (JS).
    index
        For the ``top``-gene variants: column indices of the genes scored; otherwise ``None``.
    """

    value: float
    values: np.ndarray = field(repr=False)
    n_constant: int = 0
    index: np.ndarray | None = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.value)


def _pair(obs: np.ndarray, pred: np.ndarray, *, allow_1d: bool = True) -> tuple[np.ndarray, np.ndarray]:
    obs = np.asarray(obs, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if allow_1d and obs.ndim == 1 and pred.ndim == 1:
        obs, pred = obs[None, :], pred[None, :]
    if obs.ndim != 2 or pred.ndim != 2:
        msg = f"obs and pred must be 2-D (units x genes); got shapes {obs.shape} and {pred.shape}."
        raise ValueError(msg)
    if obs.shape != pred.shape:
        msg = (
            f"obs and pred must have the same shape (units x genes); got {obs.shape} and {pred.shape}. "
            "Align rows (units) and columns (genes) first."
        )
        raise ValueError(msg)
    if obs.size == 0:
        msg = f"obs and pred are empty (shape {obs.shape}); nothing to score."
        raise ValueError(msg)
    if not (np.isfinite(obs).all() and np.isfinite(pred).all()):
        msg = "obs and pred contain NaN or infinite values; drop the units/genes without predictions first."
        raise ValueError(msg)
    return obs, pred


def _pearson_along(obs: np.ndarray, pred: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation along ``axis``; returns ``(r, constant)`` with ``r = 0`` where constant."""
    mo, mp = obs.mean(axis=axis, keepdims=True), pred.mean(axis=axis, keepdims=True)
    co, cp = obs - mo, pred - mp
    so, sp = np.sqrt((co**2).mean(axis=axis)), np.sqrt((cp**2).mean(axis=axis))
    const = (so <= CONSTANT_RTOL * (1 + np.abs(mo.squeeze(axis)))) | (
        sp <= CONSTANT_RTOL * (1 + np.abs(mp.squeeze(axis)))
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (co * cp).mean(axis=axis) / (so * sp)
    r = np.where(const, 0.0, np.clip(r, -1.0, 1.0))
    return r, const


def pcc_overall(obs: np.ndarray, pred: np.ndarray) -> MetricResult:
    """PCC_overall (paper Eq. 14): Pearson across genes within each unit, averaged over units.

    Parameters
    ----------
    obs, pred
        ``(n_units, n_genes)`` observed and predicted expression on the same scale (a 1-D pair
        is treated as one unit). At least 2 genes.

    Returns
    -------
    :class:`MetricResult` with ``values`` = per-unit correlation (0 for units whose observed or
    predicted profile is constant, counted in ``n_constant``).
    """
    obs, pred = _pair(obs, pred)
    if obs.shape[1] < 2:
        msg = f"PCC_overall correlates across genes and needs at least 2 genes; got {obs.shape[1]}."
        raise ValueError(msg)
    r, const = _pearson_along(obs, pred, axis=1)
    return MetricResult(float(r.mean()), r, int(const.sum()))


def pcc_gene(obs: np.ndarray, pred: np.ndarray) -> MetricResult:
    """PCC_gene (paper Eq. 15): Pearson across units for each gene, averaged over genes.

    Parameters
    ----------
    obs, pred
        ``(n_units, n_genes)`` observed and predicted expression on the same scale; at least 2 units.

    Returns
    -------
    :class:`MetricResult` with ``values`` = per-gene correlation. A gene whose prediction (or
    observation) is constant across units counts as 0 and is counted in ``n_constant``.
    """
    obs, pred = _pair(obs, pred, allow_1d=False)
    if obs.shape[0] < 2:
        msg = (
            f"PCC_gene correlates across units and needs at least 2 units; got {obs.shape[0]}. "
            "Score several spots/samples together, or use PCC_overall for a single unit."
        )
        raise ValueError(msg)
    r, const = _pearson_along(obs, pred, axis=0)
    return MetricResult(float(r.mean()), r, int(const.sum()))


def top_genes(obs: np.ndarray, n: int = TOP_N, *, by: Literal["variance", "mean"] = "variance") -> np.ndarray:
    """Column indices of the ``n`` genes with the largest observed variance (or mean) across units."""
    obs = np.asarray(obs, dtype=np.float64)
    if by == "variance":
        score = obs.var(axis=0)
    elif by == "mean":
        score = obs.mean(axis=0)
    else:
        msg = f"by must be 'variance' or 'mean', got {by!r}."
        raise ValueError(msg)
    n = min(int(n), obs.shape[1])
    return np.sort(np.argsort(-score, kind="stable")[:n])


def pcc_gene_top(
    obs: np.ndarray, pred: np.ndarray, *, n: int = TOP_N, by: Literal["variance", "mean"] = "variance"
) -> MetricResult:
    """PCC_gene over the ``n`` genes with the largest observed variance (or mean) across units.

    All genes are used when fewer than ``n`` exist. ``index`` of the result holds the columns scored.
    """
    obs, pred = _pair(obs, pred, allow_1d=False)
    idx = top_genes(obs, n, by=by)
    res = pcc_gene(obs[:, idx], pred[:, idx])
    return MetricResult(res.value, res.values, res.n_constant, idx)


def _distributions(x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    if (x < 0).any():
        msg = (
            f"JS divergence needs non-negative expression (counts, TPM); {what} has negative values. "
            "Pass expression in count space (e.g. expm1 of log1p values, clipped at 0)."
        )
        raise ValueError(msg)
    total = x.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / total, total[:, 0] > 0


def js_divergence(obs: np.ndarray, pred: np.ndarray) -> MetricResult:
    """Jensen–Shannon divergence between each unit's observed and predicted gene distribution.

    Each row is normalised to a probability distribution over genes (so counts, TPM or
    library-size-normalised counts give the same result);
    ``JS(P, Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M)`` with ``M = (P + Q) / 2`` and the natural logarithm,
    so ``0 ≤ JS ≤ ln 2``: 0 for identical distributions, ``ln 2`` for disjoint supports.

    Parameters
    ----------
    obs, pred
        ``(n_units, n_genes)`` non-negative expression in count space (not log-transformed).

    Returns
    -------
    :class:`MetricResult` with ``values`` = per-unit JS (NaN for rows that sum to 0, counted in
    ``n_constant`` and left out of the mean).
    """
    obs, pred = _pair(obs, pred)
    p, p_ok = _distributions(obs, "obs")
    q, q_ok = _distributions(pred, "pred")
    ok = p_ok & q_ok
    m = (p + q) / 2

    def _kl(a: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = np.where(a > 0, a * np.log(a / m), 0.0)
        return terms.sum(axis=1)

    js = np.clip(0.5 * _kl(p) + 0.5 * _kl(q), 0.0, np.log(2.0))
    js = np.where(ok, js, np.nan)
    value = float(np.nanmean(js)) if ok.any() else float("nan")
    return MetricResult(value, js, int((~ok).sum()))


def mse(obs: np.ndarray, pred: np.ndarray) -> MetricResult:
    """Mean squared error over all entries; ``values`` = per-gene MSE."""
    obs, pred = _pair(obs, pred)
    per_gene = ((obs - pred) ** 2).mean(axis=0)
    return MetricResult(float(per_gene.mean()), per_gene)


def mae(obs: np.ndarray, pred: np.ndarray) -> MetricResult:
    """Mean absolute error over all entries; ``values`` = per-gene MAE."""
    obs, pred = _pair(obs, pred)
    per_gene = np.abs(obs - pred).mean(axis=0)
    return MetricResult(float(per_gene.mean()), per_gene)


def original_reference(
    obs_bulk: np.ndarray, *, max_pairs: int = 1000, log1p: bool = True, seed: int | None = None
) -> dict[str, float]:
    """The paper's "Original" reference: how similar two random real bulk samples are.

    PCC_overall and JS divergence are computed between pairs of distinct samples (rows) of
    ``obs_bulk``: all pairs when there are at most ``max_pairs``, otherwise ``max_pairs`` pairs
    drawn at random without replacement. A model should beat this to be useful.

    Parameters
    ----------
    obs_bulk
        ``(n_samples, n_genes)`` non-negative bulk expression (TPM or counts); at least 2 samples.
    max_pairs
        Largest number of pairs to score.
    log1p
        Correlate ``log1p`` values (the scale bulk predictions are written on); JS always uses the
        expression itself as a distribution.
    seed
        Seed for drawing pairs (default: ``bt.settings.seed``).

    Returns
    -------
    dict with ``pcc_overall``, ``pcc_overall_sd``, ``js``, ``js_sd`` (means and standard deviations
    over pairs) and ``n_pairs``.
    """
    from bitro._settings import resolve_seed

    x = np.asarray(obs_bulk, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        msg = f"original_reference needs a (samples x genes) array with at least 2 samples; got shape {x.shape}."
        raise ValueError(msg)
    i, j = np.triu_indices(x.shape[0], k=1)
    if len(i) > max_pairs:
        pick = np.random.default_rng(resolve_seed(seed)).choice(len(i), size=max_pairs, replace=False)
        i, j = i[pick], j[pick]
    a, b = x[i], x[j]
    la, lb = (np.log1p(a), np.log1p(b)) if log1p else (a, b)
    pcc = pcc_overall(la, lb).values
    js = js_divergence(a, b).values
    return {
        "pcc_overall": float(pcc.mean()),
        "pcc_overall_sd": float(pcc.std()),
        "js": float(np.nanmean(js)),
        "js_sd": float(np.nanstd(js)),
        "n_pairs": len(i),
    }
