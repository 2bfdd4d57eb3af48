"""Gene selection for training (the paper's Appendix B), or validation of a user-given gene list."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from bitro import _keys as K
from bitro._logging import logger

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

EXCLUDE_PATTERNS = ("^MT-", "^RP[SL]")
"""Default regular expressions (case-insensitive) of genes never selected: mitochondrial and ribosomal."""
_SPOTS_HINT = "Spot counts come from bt.io.read_st / read_hest / read_visium."


def _counts(adata: ad.AnnData, layer: str | None) -> sparse.csr_matrix:
    if layer is None:
        x = adata.X
    elif layer in adata.layers:
        x = adata.layers[layer]
    else:
        msg = (
            f"Layer {layer!r} not found (layers: {sorted(adata.layers.keys())}); select_genes needs raw counts. "
            "Pass layer=None to use .X."
        )
        raise KeyError(msg)
    return sparse.csr_matrix(x, dtype=np.float64)


def _log_normalise(x: sparse.csr_matrix, target_sum: float) -> sparse.csr_matrix:
    """Counts per ``target_sum`` per spot, then log1p (spots without counts stay zero)."""
    lib = np.asarray(x.sum(axis=1)).ravel()
    factor = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    y = sparse.diags(factor) @ x
    y = sparse.csr_matrix(y)
    y.data = np.log1p(y.data)
    return y


def _excluded(names: pd.Index, patterns: Sequence[str]) -> np.ndarray:
    mask = np.zeros(len(names), dtype=bool)
    for pat in patterns:
        mask |= np.asarray(names.str.contains(re.compile(pat, flags=re.IGNORECASE), regex=True), dtype=bool)
    return mask


def _sample_hvgs(y: sparse.csr_matrix, names: pd.Index, *, n_hvg: int, n_bins: int) -> list[str]:
    """Top ``n_hvg`` genes of one sample by binned normalised dispersion (scanpy ``flavor="seurat"``)."""
    import anndata as ad
    import scanpy as sc

    expressed = np.asarray((y > 0).sum(axis=0)).ravel() > 0
    if expressed.sum() == 0:
        return []
    a = ad.AnnData(X=y[:, expressed].astype(np.float32), var=pd.DataFrame(index=names[expressed]))
    n_top = int(min(n_hvg, a.n_vars))
    hv = sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=n_top, n_bins=n_bins, inplace=False)
    hv.index = a.var_names
    order = hv["dispersions_norm"].fillna(-np.inf).sort_values(ascending=False, kind="stable")
    return list(order.index[:n_top])


def _top_k(values: pd.Series, k: int) -> set[str]:
    ranked = pd.DataFrame({"v": values.to_numpy(), "g": values.index}).sort_values(
        ["v", "g"], ascending=[False, True], kind="stable"
    )
    return set(ranked["g"].iloc[:k])


def select_genes(
    data: sd.SpatialData | ad.AnnData | Sequence[sd.SpatialData | ad.AnnData],
    *,
    n_top: int = 1000,
    genes: Sequence[str] | None = None,
    table_key: str = K.SPOTS,
    layer: str | None = K.COUNTS_LAYER,
    n_hvg_per_sample: int = 1000,
    exclude_patterns: Sequence[str] = EXCLUDE_PATTERNS,
    n_bins: int = 20,
    target_sum: float = 1e4,
    missing: Literal["raise", "drop"] = "raise",
) -> list[str]:
    """Choose the genes a model predicts (Appendix B of the paper), or check a user list.

    Without ``genes``:

    1. each sample's counts are normalised to ``target_sum`` per spot and log1p-transformed;
    2. per sample, genes are ranked by normalised dispersion: the variance-to-mean ratio
       standardised within ``n_bins`` bins of mean expression (Eq. 19; scanpy's
       ``highly_variable_genes(flavor="seurat")``), after removing genes matching
       ``exclude_patterns`` (mitochondrial, ribosomal) — note ``^RP[SL]`` also removes e.g.
       ``RPS6K*`` kinases; pass your own patterns to be stricter;
    3. the candidate pool is the union of the ``n_hvg_per_sample`` top genes of every sample,
       restricted to genes measured in every sample;
    4. over all spots of all samples (log-normalised), each candidate's mean and standard
       deviation are computed; the result is the candidates in both the top ``n_top`` by mean
       and the top ``n_top`` by standard deviation (Eq. 20).

    The result is sorted alphabetically (a stable order, independent of the sample order).

    Parameters
    ----------
    data
        One or several samples: SpatialData (table ``table_key``) or AnnData of spots × genes.
    n_top
        K of Eq. 20 (size of each top-K list; the result has at most this many genes).
    genes
        A user gene list (e.g. the 785-gene HER2ST list). It always wins: returned in the given
        order (duplicates removed), checked to be present in every sample.
    table_key
        Table of the counts in a SpatialData.
    layer
        Layer of raw counts; ``None`` uses ``.X``.
    n_hvg_per_sample
        Top genes by normalised dispersion taken from each sample into the candidate pool.
    exclude_patterns
        Regular expressions (case-insensitive) of genes never selected.
    n_bins
        Mean-expression bins of the normalised dispersion.
    target_sum
        Counts per spot after normalisation.
    missing
        With ``genes``: ``"raise"`` (default) when some genes are absent from a sample, or
        ``"drop"`` them with a warning.

    Returns
    -------
    The selected gene names.
    """
    from bitro.pp._reduce import _tables

    tables = _tables(data, table_key, hint=_SPOTS_HINT)
    names = [pd.Index(a.var_names.astype(str)) for a in tables]
    common = names[0]
    for idx in names[1:]:
        common = common.intersection(idx, sort=False)

    if genes is not None:
        return _check_user_genes(genes, common, names, missing=missing)

    if n_top < 1 or n_hvg_per_sample < 1:
        msg = f"n_top and n_hvg_per_sample must be positive, got {n_top} and {n_hvg_per_sample}."
        raise ValueError(msg)
    logs = [_log_normalise(_counts(a, layer), target_sum) for a in tables]
    pool: set[str] = set()
    for y, idx in zip(logs, names, strict=True):
        keep = ~_excluded(idx, exclude_patterns)
        pool.update(_sample_hvgs(y[:, keep], idx[keep], n_hvg=n_hvg_per_sample, n_bins=n_bins))
    n_pool_all = len(pool)
    candidates = pd.Index(sorted(pool & set(common)))
    if len(candidates) == 0:
        msg = "No highly variable gene is measured in every sample; check that the samples share gene names."
        raise ValueError(msg)

    total = np.zeros(len(candidates))
    total_sq = np.zeros(len(candidates))
    n_spots = 0
    for y, idx in zip(logs, names, strict=True):
        sub = y[:, idx.get_indexer(candidates)]
        total += np.asarray(sub.sum(axis=0)).ravel()
        total_sq += np.asarray(sub.multiply(sub).sum(axis=0)).ravel()
        n_spots += sub.shape[0]
    mean = total / max(n_spots, 1)
    std = np.sqrt(np.maximum(total_sq / max(n_spots, 1) - mean**2, 0.0))
    top_mean = _top_k(pd.Series(mean, index=candidates), n_top)
    top_std = _top_k(pd.Series(std, index=candidates), n_top)
    selected = sorted(top_mean & top_std)
    logger.info(
        "select_genes: %d candidate HVGs (%d measured in all %d samples); %d genes in both top-%d lists.",
        n_pool_all,
        len(candidates),
        len(tables),
        len(selected),
        n_top,
    )
    if not selected:
        msg = f"No gene is in both the top-{n_top} by mean and by standard deviation; increase n_top."
        raise ValueError(msg)
    return selected


def _check_user_genes(
    genes: Sequence[str], common: pd.Index, names: list[pd.Index], *, missing: str
) -> list[str]:
    if isinstance(genes, str):
        msg = f"genes must be a list of gene names, got the string {genes!r}; wrap it in a list."
        raise TypeError(msg)
    if missing not in ("raise", "drop"):
        msg = f"missing must be 'raise' or 'drop', got {missing!r}."
        raise ValueError(msg)
    wanted = list(dict.fromkeys(str(g) for g in np.asarray(genes).ravel()))
    if not wanted:
        msg = "genes is empty; pass at least one gene name or genes=None to select genes from the data."
        raise ValueError(msg)
    present = set(common)
    absent = [g for g in wanted if g not in present]
    if absent:
        per_sample = [sum(g not in set(idx) for g in wanted) for idx in names]
        shown = ", ".join(absent[:20]) + (" …" if len(absent) > 20 else "")
        text = (
            f"{len(absent)} of {len(wanted)} requested genes are not measured in every sample "
            f"(missing per sample: {per_sample}): {shown}."
        )
        if missing == "raise":
            msg = text + " Pass missing='drop' to keep only the genes present everywhere."
            raise ValueError(msg)
        logger.warning("select_genes: %s They are dropped.", text)
    kept = [g for g in wanted if g in present]
    if not kept:
        msg = "None of the requested genes is measured in every sample; check the gene names (symbols vs Ensembl ids)."
        raise ValueError(msg)
    return kept
