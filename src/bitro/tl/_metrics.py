"""Scoring predictions against observed expression: ``bt.tl.evaluate`` and the metric functions.

The metric functions themselves are pure numpy and live in :mod:`bitro.tl._metric_fns`;
this module aligns tables, chooses the genes and units that can be scored, puts observed
and predicted expression on a common scale and writes the results back.

Scales (always both by default, method §5):

- ``"raw"``: ``log1p`` of raw counts (the paper's convention). Spot depth moves every gene
  together on this scale and inflates PCC_gene.
- ``"library_size"``: each unit's counts rescaled to ``target_sum`` over the scored genes,
  then ``log1p``; only the gene-specific signal is left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._validate import check_key, check_not_exists
from bitro.tl._metric_fns import (
    TOP_N,
    MetricResult,
    js_divergence,
    mae,
    mse,
    original_reference,
    pcc_gene,
    pcc_gene_top,
    pcc_overall,
)
from bitro.tl._targets import MAX_LOG1P

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

__all__ = [
    "MetricResult",
    "evaluate",
    "js_divergence",
    "mae",
    "mse",
    "original_reference",
    "pcc_gene",
    "pcc_gene_top",
    "pcc_overall",
    "score_cells",
]

Normalize = Literal["raw", "library_size", "both"]
_NORMALIZE = {"raw": ("raw",), "library_size": ("library_size",), "both": ("raw", "library_size")}
METRICS = (
    "pcc_gene",
    "pcc_overall",
    f"pcc_gene_top{TOP_N}_var",
    f"pcc_gene_top{TOP_N}_mean",
    "mse",
    "mae",
    "js",
)
"""Metrics reported by :func:`evaluate`, in row order (for every scale)."""
COLUMNS = ("metric", "scale", "value", "n_units", "n_genes", "n_constant")


def _table(data: sd.SpatialData | ad.AnnData, table_key: str, hint: str | None = None) -> ad.AnnData:
    if hasattr(data, "tables"):
        from bitro.io._build import get_table

        return get_table(data, table_key, hint=hint)
    return data


def _dense(adata: ad.AnnData, layer: str | None) -> np.ndarray:
    from bitro.tl._targets import dense

    return dense(adata.X if layer is None else adata.layers[layer])


def _pred_scale(adata: ad.AnnData, layer: str) -> str:
    meta = adata.uns.get(layer)
    return str(meta.get("target_scale", "raw")) if isinstance(meta, dict) else "raw"


def _counts(log1p: np.ndarray) -> np.ndarray:
    """log1p values → counts (non-negative; log1p capped at ``MAX_LOG1P`` against overflow)."""
    return np.clip(np.expm1(np.minimum(log1p, MAX_LOG1P)), 0.0, None)


def _normalise_log(counts: np.ndarray, target_sum: float) -> np.ndarray:
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log1p(np.where(total > 0, counts / total * target_sum, 0.0))


def _select(
    obs: np.ndarray, pred: np.ndarray, var_names: pd.Index, genes: list[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Columns with predictions, columns to score, rows to score, and what was dropped."""
    if obs.shape != pred.shape:
        msg = (
            f"Observed {obs.shape} and predicted {pred.shape} matrices differ in shape; "
            "they must be aligned unit by unit and gene by gene."
        )
        raise ValueError(msg)
    has_pred = np.isfinite(pred).any(axis=0)
    no_pred = [str(g) for g in var_names[~has_pred]]
    scored = has_pred.copy()
    if genes is not None:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in var_names]
        if missing:
            msg = f"{len(missing)} requested genes are not in the table's var_names (e.g. {missing[:5]})."
            raise KeyError(msg)
        wanted = pd.Index(var_names.astype(str)).isin(genes)  # hashed (np.isin on strings is pairwise)
        unpredicted = [str(g) for g in var_names[wanted & ~has_pred]]
        if unpredicted:
            logger.warning(
                "evaluate: %d requested genes have no prediction: %s", len(unpredicted), unpredicted[:10]
            )
        scored &= wanted
    if not scored.any():
        msg = (
            "No gene has both an observation and a prediction: the prediction layer is NaN for every "
            "requested gene. Check that the model's genes overlap the table's var_names (and genes=)."
        )
        raise ValueError(msg)
    rows = np.isfinite(pred[:, has_pred]).all(axis=1) & np.isfinite(obs[:, has_pred]).all(axis=1)
    if int(rows.sum()) < 1:
        msg = (
            "No unit has predictions for all genes; run bt.tl.predict first or check the units without cells."
        )
        raise ValueError(msg)
    if int(rows.sum()) == 1:
        logger.info(
            "evaluate: one unit scored (e.g. one bulk sample): gene-wise PCCs are NaN, per-unit metrics are kept."
        )
    info = {
        "genes_without_prediction": no_pred,
        "n_units_without_prediction": int((~rows).sum()),
    }
    if info["n_units_without_prediction"]:
        logger.info("evaluate: %d units without prediction (e.g. no cells) are not scored.", (~rows).sum())
    return has_pred, scored, rows, info


def _log_scored_genes(
    n_scored: int, no_pred: list[str], n_table: int, layer: str, genes: list[str] | None
) -> None:
    """One line saying which genes were scored and how many of the table have no prediction."""
    which = "of genes=" if genes is not None else "with a prediction"
    msg = f"evaluate: scored the {n_scored} genes {which} in layer {layer!r}"
    if no_pred:
        msg += f"; {len(no_pred)} of the table's {n_table} genes have no prediction (not in the model)"
    logger.info("%s.", msg)


def _score_scale(
    o: np.ndarray, p: np.ndarray, scale: str
) -> tuple[list[dict[str, Any]], MetricResult, MetricResult | None]:
    """Score aligned log1p arrays (units × genes, finite) of one scale; returns rows, per-gene and per-unit PCC."""
    n_units, n_genes = o.shape
    if n_units >= 2:
        results = {
            "pcc_gene": pcc_gene(o, p),
            f"pcc_gene_top{TOP_N}_var": pcc_gene_top(o, p, by="variance"),
            f"pcc_gene_top{TOP_N}_mean": pcc_gene_top(o, p, by="mean"),
        }
    else:  # gene-wise correlation needs ≥ 2 units
        nan = MetricResult(float("nan"), np.full(n_genes, np.nan))
        results = {"pcc_gene": nan, f"pcc_gene_top{TOP_N}_var": nan, f"pcc_gene_top{TOP_N}_mean": nan}
    results.update({"mse": mse(o, p), "mae": mae(o, p)})
    if n_genes >= 2:
        results["pcc_overall"] = pcc_overall(o, p)
        results["js"] = js_divergence(_counts(o), _counts(p))
    else:
        logger.warning("evaluate: only one gene scored; PCC_overall and JS need at least 2 genes.")
    rows = [
        {
            "metric": metric,
            "scale": scale,
            "value": results[metric].value,
            "n_units": n_units,
            "n_genes": n_genes if results[metric].index is None else len(results[metric].index),
            "n_constant": results[metric].n_constant,
        }
        for metric in METRICS
        if metric in results
    ]
    return rows, results["pcc_gene"], results.get("pcc_overall")


def _evaluate_table(
    adata: ad.AnnData,
    obs: np.ndarray,
    pred: np.ndarray,
    *,
    layer: str,
    truth_layer: str | None,
    normalize: Normalize,
    target_sum: float | None,
    genes: list[str] | None,
    key_added: str,
    inplace: bool,
    overwrite: bool,
    what: str,
) -> pd.DataFrame:
    if normalize not in _NORMALIZE:
        msg = f"normalize must be one of {sorted(_NORMALIZE)}, got {normalize!r}."
        raise ValueError(msg)
    scales = _NORMALIZE[normalize]
    var_col = {s: f"{key_added}_pcc_{s}" for s in scales}
    obs_col = {s: f"{key_added}_pcc_overall_{s}" for s in scales}
    uns_key = f"{key_added}_eval"
    if inplace:
        for col in var_col.values():
            check_not_exists(col, adata.var, what=f"{what}.var column", overwrite=overwrite)
        for col in obs_col.values():
            check_not_exists(col, adata.obs, what=f"{what}.obs column", overwrite=overwrite)
        check_not_exists(uns_key, adata.uns, what=f"{what}.uns key", overwrite=overwrite)
    if (obs < 0).any():
        msg = f"The observed matrix ({truth_layer or 'X'}) has negative values; evaluate needs raw (count-like) data."
        raise ValueError(msg)

    has_pred, scored, rows, info = _select(obs, pred, adata.var_names, genes)
    _log_scored_genes(int(scored.sum()), info["genes_without_prediction"], adata.n_vars, layer, genes)
    o_all, p_all = obs[rows][:, has_pred], pred[rows][:, has_pred]
    # library sizes are taken over the genes that have predictions, for observation and prediction alike
    lib_obs = o_all.sum(axis=1)
    if target_sum is None:
        target_sum = float(np.median(lib_obs))
    if not np.isfinite(target_sum) or target_sum <= 0:
        msg = f"target_sum must be positive; got {target_sum!r} (median observed library size). Pass target_sum=."
        raise ValueError(msg)
    keep = scored[has_pred]
    raw_rows, per_gene, per_unit, unit_rows = [], {}, {}, {}
    for s in scales:
        if s == "raw":
            ok = np.ones(len(o_all), dtype=bool)
            o_log, p_log = np.log1p(o_all[:, keep]), p_all[:, keep]
        else:
            # a unit without observed molecules has no composition: it is not scored on this scale
            ok = lib_obs > 0
            if int(ok.sum()) < 1:
                msg = "No unit has observed counts; the library_size scale cannot be scored."
                raise ValueError(msg)
            if not ok.all():
                logger.info(
                    "evaluate: %d units with no observed counts are not scored on 'library_size'.",
                    (~ok).sum(),
                )
            o_log = _normalise_log(o_all[ok], target_sum)[:, keep]
            p_log = _normalise_log(_counts(p_all[ok]), target_sum)[:, keep]
        r, per_gene[s], per_unit[s] = _score_scale(o_log, p_log, s)
        unit_rows[s] = np.flatnonzero(rows)[ok]
        raw_rows += r
    df = pd.DataFrame(raw_rows, columns=list(COLUMNS))
    pred_scale = _pred_scale(adata, layer)
    if pred_scale != "raw" and "raw" in scales:
        logger.warning(
            "evaluate: layer %r holds predictions on the %r scale; on the 'raw' scale they are compared "
            "with log1p raw counts as they are (they carry no spot depth).",
            layer,
            pred_scale,
        )
    logger.info(
        "evaluate: %s", ", ".join(f"{m}[{s}]={v:.3f}" for m, s, v in zip(df.metric, df.scale, df.value))
    )
    if inplace:
        from bitro._version import __version__

        scored_idx = np.flatnonzero(scored)
        for s in scales:
            col = np.full(adata.n_vars, np.nan, dtype=np.float32)
            col[scored_idx] = per_gene[s].values
            adata.var[var_col[s]] = col
            ocol = np.full(adata.n_obs, np.nan, dtype=np.float32)
            if per_unit[s] is not None:
                ocol[unit_rows[s]] = per_unit[s].values
            adata.obs[obs_col[s]] = ocol
        adata.uns[uns_key] = {
            "results": {c: df[c].tolist() for c in COLUMNS},
            "params": {
                "layer": layer,
                "truth_layer": truth_layer,
                "normalize": normalize,
                "target_sum": float(target_sum),
                "genes": None if genes is None else [str(g) for g in genes],
                "prediction_scale": pred_scale,
            },
            "var_keys": list(var_col.values()),
            "obs_keys": list(obs_col.values()),
            **info,
            "bitro_version": __version__,
        }
    return df


def evaluate(
    data: sd.SpatialData | ad.AnnData,
    *,
    table_key: str = K.SPOTS,
    layer: str = K.PRED,
    truth_layer: str | None = K.COUNTS_LAYER,
    normalize: Normalize = "both",
    target_sum: float | None = None,
    genes: list[str] | None = None,
    key_added: str = K.PRED,
    inplace: bool = True,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Score predicted against observed expression of a table (spots, patches or bulk samples).

    Observed counts are put on the log1p scale of raw counts (``"raw"``) and/or on the log1p
    scale of library-size-normalised counts (``"library_size"``: every unit rescaled to
    ``target_sum``). Predictions in ``layers[layer]`` are log1p values as written by
    :func:`bitro.tl.predict` (log1p of raw counts for a model trained on the raw scale); on the
    library-size scale they are converted the same way as the observations:
    ``expm1`` → clip at 0 → rescale each unit to ``target_sum`` → ``log1p``. Library sizes are
    summed over the genes that have predictions, for observations and predictions alike.

    Genes whose prediction column is entirely NaN (genes the model lacks) are not scored and are
    listed in ``uns[f"{key_added}_eval"]["genes_without_prediction"]``; units with NaN predictions
    (e.g. spots without cells) are not scored either, nor, on the library-size scale, units without
    observed counts (their composition is undefined). ``n_units`` of each row says how many were.

    Bulk tables: predictions are log1p(TPM), so score them against TPM with ``truth_layer=None``
    (``.X``) and ``table_key="bulk"``; PCC_gene needs at least 2 samples.

    Metrics (one row per metric × scale): ``pcc_gene`` (Eq. 15, mean over genes; constant
    predictions count as 0 and are counted in ``n_constant``), ``pcc_overall`` (Eq. 14, mean over
    units), ``pcc_gene_top50_var`` / ``pcc_gene_top50_mean`` (PCC_gene over the 50 genes with the
    largest observed variance / mean on that scale), ``mse``, ``mae`` and ``js`` (Jensen–Shannon
    divergence of each unit's gene distribution, natural log, in ``[0, ln 2]``; the composition does
    not change with library-size scaling, so it is the same on both scales up to rounding).

    Parameters
    ----------
    data
        SpatialData (table chosen by ``table_key``) or an AnnData table.
    table_key
        Table to score (``"spots"``, ``"patches"``, ``"bulk"``; ignored for AnnData).
    layer
        Layer with predictions (log1p).
    truth_layer
        Layer with observed raw counts; ``None`` for ``.X``.
    normalize
        ``"raw"``, ``"library_size"`` or ``"both"``.
    target_sum
        Library size of the ``"library_size"`` scale. Default: the median observed library size
        (over the predicted genes) of the scored units.
    genes
        Score only these genes (default: every gene with a prediction).
    key_added
        Prefix of the keys written.
    inplace
        Write the results into the table (otherwise only return them).
    overwrite
        Replace results of an earlier call with the same ``key_added``.

    Returns
    -------
    Tidy DataFrame with columns ``metric, scale, value, n_units, n_genes, n_constant``.
    With ``inplace=True`` also writes into the table:

    - ``var[f"{key_added}_pcc_{scale}"]``: per-gene PCC (NaN for genes not scored);
    - ``obs[f"{key_added}_pcc_overall_{scale}"]``: per-unit PCC_overall (NaN for units not scored);
    - ``uns[f"{key_added}_eval"]``: ``results`` (the DataFrame as a dict of columns), ``params``,
      ``genes_without_prediction``, ``n_units_without_prediction`` and the bitro version.

    Raises
    ------
    KeyError
        Unknown ``table_key`` (the message lists the tables), missing prediction or truth layer,
        ``genes`` not in the table.
    ValueError
        No gene with a prediction, fewer than 2 scorable units, negative observed values, or
        existing result keys without ``overwrite=True``.
    """
    hint = "Predictions are written by bt.tl.predict."
    adata = _table(data, table_key, hint=hint)
    what = table_key if hasattr(data, "tables") else "table"
    check_key(
        layer,
        adata.layers.keys(),
        what="layer",
        hint=f"Run bt.tl.predict(model, sdata, key_added={layer!r}) first.",
    )
    if truth_layer is not None:
        check_key(truth_layer, adata.layers.keys(), what="layer", hint="Pass truth_layer=None to use .X.")
    obs, pred = _dense(adata, truth_layer), _dense(adata, layer)
    return _evaluate_table(
        adata,
        obs,
        pred,
        layer=layer,
        truth_layer=truth_layer,
        normalize=normalize,
        target_sum=target_sum,
        genes=genes,
        key_added=key_added,
        inplace=inplace,
        overwrite=overwrite,
        what=what,
    )


def score_cells(
    data: sd.SpatialData | ad.AnnData,
    *,
    table_key: str = K.CELLS,
    pred_layer: str = K.PRED,
    truth_layer: str | None = K.COUNTS_LAYER,
    truth_key: str | None = None,
    normalize: Normalize = "both",
    target_sum: float | None = None,
    genes: list[str] | None = None,
    key_added: str = f"{K.PRED}_cells",
    inplace: bool = True,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Score predicted pseudo single-cell expression against the true expression of the cells.

    The cell-level check of paper §4.3: a model trained on pseudo-spots
    (:func:`bitro.tl.pseudo_spots`) predicts pseudo-cells (``cells.layers["bitro"]``, log1p of
    pseudo-counts, NaN for cells outside every bag); they are compared with the cells' true
    counts on the raw log1p and the library-size-normalised log1p scales, exactly as
    :func:`evaluate` scores spots (PCC_gene across cells, PCC_overall across genes of a cell, …).

    Parameters
    ----------
    data
        SpatialData or AnnData holding the predicted cells.
    table_key
        Table with the predictions (ignored for AnnData).
    pred_layer
        Layer of predicted pseudo-expression (log1p).
    truth_layer
        Layer of true counts (``None`` for ``.X``), read from ``truth_key`` when given, else from
        the predicted table.
    truth_key
        Another table of ``data`` (SpatialData only) holding the true counts, e.g. ``"cells_truth"``;
        cells are matched by ``obs_names`` and genes by ``var_names``. Predicted cells missing
        from it are not scored.
    normalize, target_sum, genes, key_added, inplace, overwrite
        As in :func:`evaluate` (the package rule: ``inplace=True`` writes the scores, ``False`` only
        returns them; the table is returned either way).

    Returns
    -------
    Tidy DataFrame like :func:`evaluate` (``n_units`` = number of cells scored).
    """
    hint = "Pseudo-cells are written by bt.tl.predict into the cells table."
    cells = _table(data, table_key, hint=hint)
    what = table_key if hasattr(data, "tables") else "cells"
    check_key(pred_layer, cells.layers.keys(), what="layer", hint="Run bt.tl.predict(model, sdata) first.")
    pred = _dense(cells, pred_layer)
    if truth_key is None:
        if truth_layer is not None:
            check_key(
                truth_layer, cells.layers.keys(), what="layer", hint="Pass truth_key= or truth_layer=None."
            )
        obs = _dense(cells, truth_layer)
    else:
        if not hasattr(data, "tables"):
            msg = "truth_key= needs a SpatialData; for AnnData put the true counts into a layer of the same table."
            raise ValueError(msg)
        truth = _table(data, truth_key)
        if truth_layer is not None:
            check_key(truth_layer, truth.layers.keys(), what="layer", hint="Pass truth_layer=None to use .X.")
        rows = truth.obs_names.get_indexer(cells.obs_names)
        cols = truth.var_names.get_indexer(cells.var_names)
        if (rows < 0).all() or (cols < 0).all():
            msg = (
                f"Tables {table_key!r} and {truth_key!r} share no cells (obs_names) or no genes (var_names); "
                "the predicted cells must be the true cells (same ids)."
            )
            raise ValueError(msg)
        t = _dense(truth, truth_layer)
        obs = np.full(pred.shape, np.nan)
        obs[np.ix_(rows >= 0, cols >= 0)] = t[np.ix_(rows[rows >= 0], cols[cols >= 0])]
        pred = pred.copy()
        pred[rows < 0] = np.nan
        pred[:, cols < 0] = np.nan
    return _evaluate_table(
        cells,
        obs,
        pred,
        layer=pred_layer,
        truth_layer=truth_layer,
        normalize=normalize,
        target_sum=target_sum,
        genes=genes,
        key_added=key_added,
        inplace=inplace,
        overwrite=overwrite,
        what=what,
    )
