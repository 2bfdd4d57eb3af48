"""Cell typing by marker genes, per-spot composition, and its comparison with a reference.

The check of cell resolution on real data (issue 13): type every predicted cell by literature marker
genes, count each spot's cells per type, and compare those fractions with a deconvolution of the
spots (e.g. :func:`bitro.datasets.her2st_proportions`). An equal split of a spot's prediction gives
every cell of the spot the same profile, hence one type per spot: it cannot produce mixtures.

Scoring is deterministic (no random reference genes, unlike :func:`scanpy.tl.score_genes`): each
marker gene is z-scored across the scored observations, a type's score is the mean z-score of its
markers, standardised across the observations (a mean of few markers varies more than a mean of
many, and would otherwise win the comparison more often by chance); a cell gets the type with the
highest score (ties go to the type listed first).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._validate import check_key, check_not_exists

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

TYPE_KEY = "marker_type"
"""Default ``obs`` column of :func:`type_cells` (its scores go to ``obsm[f"{TYPE_KEY}_scores"]``)."""
COMPOSITION_KEY = "marker_composition"
"""Default ``spots.obsm`` key of :func:`spot_composition`."""
NORMALIZE_TARGET = 1e4
"""Counts per observation after library-size normalisation (as in ``X_bitro_expr``)."""

#: Literature marker genes of the 8 major cell types of the HER2ST deconvolution (Wu et al.,
#: Nat. Genet. 53, 1334–1347, 2021, breast-cancer atlas "major" types), canonical markers first. Lists
#: are restricted to the genes at hand at use time (:func:`cell_type_markers`).
MARKERS: dict[str, tuple[str, ...]] = {
    # luminal/tumour epithelium: EPCAM, keratins 8/18/19, claudins 3/4, MUC1, HER2 (ERBB2), the
    # luminal secretory AGR2/TFF3, luminal transcription factor GATA3, S100A14 (Wu 2021; PanglaoDB)
    "Epithelial": (
        "EPCAM", "KRT8", "KRT18", "KRT19", "ERBB2", "CDH1", "CLDN3", "CLDN4", "MUC1", "AGR2", "TFF3",
        "GATA3", "S100A14",
    ),
    # fibroblasts: fibrillar collagens, DCN/LUM, FAP, PDGFRA, POSTN, CTSK, CDH11, MFAP4, FBLN2,
    # COL14A1 (Wu et al., EMBO J. 39, e104063, 2020: CAFs PDGFRA+ COL1A1+; Bartoschek 2018)
    "CAFs": (
        "COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "FAP", "PDGFRA", "POSTN", "CTSK", "CDH11", "MFAP4",
        "FBLN2", "COL14A1",
    ),
    # vascular endothelium: PECAM1 (CD31), VWF, VE-cadherin CDH5, CLDN5, PLVAP, RAMP2, AQP1 (PanglaoDB)
    "Endothelial": ("PECAM1", "VWF", "CDH5", "CLDN5", "PLVAP", "RAMP2", "AQP1"),
    # T-cell receptor complex (CD3D/E, TRAC), CD2, its kinase LCK, HCST (DAP10; CD8 T and NK)
    "T-cells": ("CD3D", "CD3E", "CD2", "TRAC", "LCK", "HCST"),
    # B-cell receptor (CD79A/B), MS4A1 (CD20), CD19, HLA-DOA (B-cell MHC-II chaperone)
    "B-cells": ("MS4A1", "CD79A", "CD79B", "CD19", "HLA-DOA"),
    # immunoglobulin chains, JCHAIN, MZB1 and the ER-stress gene DERL3 of antibody-secreting cells
    "Plasma Cells": (
        "IGKC", "JCHAIN", "MZB1", "IGHG1", "IGHG3", "IGHG4", "IGHA1", "IGLC2", "IGLC3", "IGLC7", "DERL3",
    ),
    # monocytes/macrophages: CD68, CD163, LYZ, complement C1Q, CD14, CSF1R, Fc receptor chains
    # TYROBP/FCER1G, MS4A6A, LST1, SIGLEC1 (PanglaoDB)
    "Myeloid": (
        "CD68", "CD163", "LYZ", "C1QA", "C1QB", "C1QC", "CD14", "CSF1R", "TYROBP", "FCER1G", "MS4A6A",
        "LST1", "SIGLEC1",
    ),
    # perivascular-like cells (pericytes, vascular smooth muscle): RGS5, ACTA2, MYH11, PDGFRB, MCAM,
    # NOTCH3, TAGLN, MYL9, TPM2 (Wu et al., EMBO J. 2020: PVL MCAM+ ACTA2+ PDGFRB+)
    "PVL": ("RGS5", "ACTA2", "MYH11", "PDGFRB", "MCAM", "NOTCH3", "TAGLN", "MYL9", "TPM2"),
}  # fmt: skip


def cell_type_markers(
    genes: Sequence[str] | None = None, *, markers: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[str]]:
    """Marker genes per cell type, restricted to ``genes``.

    Parameters
    ----------
    genes
        The genes at hand (e.g. ``bt.datasets.her2st_genes()`` or a table's ``var_names``); ``None``
        keeps every marker.
    markers
        Type → marker genes; default :data:`MARKERS` (literature markers of the 8 major types of the
        HER2ST deconvolution: B-cells, CAFs, Endothelial, Epithelial, Myeloid, Plasma Cells, PVL,
        T-cells; references in the source).

    Returns
    -------
    Type → the markers present in ``genes``, in the order given (a type none of whose markers is
    present maps to an empty list). Markers absent from ``genes`` are logged at INFO level.
    """
    markers = MARKERS if markers is None else markers
    if isinstance(markers, str | bytes) or not isinstance(markers, Mapping):
        msg = f"markers must map each type to a list of genes, e.g. {{'T-cells': ['CD3D']}}; got {type(markers).__name__}."
        raise TypeError(msg)
    out: dict[str, list[str]] = {}
    for cell_type, type_genes in markers.items():
        if isinstance(type_genes, str):
            msg = f"markers[{cell_type!r}] is the string {type_genes!r}; give a list of genes, e.g. [{type_genes!r}]."
            raise TypeError(msg)
        out[str(cell_type)] = list(dict.fromkeys(str(g) for g in type_genes))
    if genes is None:
        return out
    have = set(map(str, genes))
    missing = {t: [g for g in gs if g not in have] for t, gs in out.items()}
    missing = {t: gs for t, gs in missing.items() if gs}
    if missing:
        logger.info("cell_type_markers: markers absent from the genes at hand: %s", missing)
    return {t: [g for g in gs if g in have] for t, gs in out.items()}


def _table(data: ad.AnnData | sd.SpatialData, table_key: str) -> ad.AnnData:
    import anndata as ad

    if isinstance(data, ad.AnnData):
        return data
    from bitro.io._build import get_table

    return get_table(data, table_key)


def _log_expression(table: ad.AnnData, layer: str | None) -> np.ndarray:
    from scipy import sparse

    if layer is not None:
        check_key(
            layer,
            table.layers.keys(),
            what="layer",
            hint="Run bt.tl.predict first, or pass layer=None for .X.",
        )
        x = table.layers[layer]
    else:
        x = table.X
    if x is None:
        msg = "The table has no .X; pass layer= naming a layer of log1p expression."
        raise ValueError(msg)
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def _scores(
    x: np.ndarray, var_names: Sequence[str], markers: Mapping[str, Sequence[str]] | None, normalize: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]], dict[str, list[str]]]:
    """``(scores, scored, used, missing)``: observations × types mean marker z-scores (NaN where unscored)."""
    scored = np.isfinite(x).any(axis=1)
    cols = np.isfinite(x[scored]).all(axis=0) if scored.any() else np.zeros(x.shape[1], dtype=bool)
    genes = [str(g) for g, ok in zip(var_names, cols, strict=True) if ok]
    x = x[:, cols]
    if (x[scored] < 0).any():
        msg = "The expression has negative values; type_cells expects log1p expression (log1p of counts)."
        raise ValueError(msg)
    if normalize:
        counts = np.expm1(np.where(scored[:, None], x, 0.0))
        lib = counts.sum(axis=1)
        scored &= lib > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.log1p(counts / lib[:, None] * NORMALIZE_TARGET)
    every = cell_type_markers(None, markers=markers)
    used = cell_type_markers(genes, markers=markers)
    empty = [t for t, gs in used.items() if not gs]
    if empty:
        msg = (
            f"No marker of {empty} is among the {len(genes)} genes with values "
            f"(markers {[every[t] for t in empty]}); pass markers= without these types or with markers present "
            f"in the data (e.g. bt.tl.cell_type_markers(genes) shows what is left)."
        )
        raise ValueError(msg)
    missing = {t: [g for g in every[t] if g not in used[t]] for t in every}
    index = pd.Index(genes)
    scores = np.full((len(x), len(used)), np.nan)
    if scored.any():
        rows = x[scored]
        mean, sd = rows.mean(axis=0), rows.std(axis=0)
        z = np.divide(rows - mean, sd, out=np.zeros_like(rows), where=sd > 0)
        for j, gs in enumerate(used.values()):
            scores[scored, j] = z[:, index.get_indexer(gs)].mean(axis=1)
        part = scores[scored]
        mean, sd = part.mean(axis=0), part.std(axis=0)
        scores[scored] = np.divide(part - mean, sd, out=np.zeros_like(part), where=sd > 0)
    return scores, scored, used, missing


def type_cells(
    data: ad.AnnData | sd.SpatialData,
    *,
    layer: str | None = K.PRED,
    normalize: bool = True,
    markers: Mapping[str, Sequence[str]] | None = None,
    table_key: str = K.CELLS,
    key_added: str = TYPE_KEY,
    inplace: bool = True,
    overwrite: bool = False,
) -> pd.DataFrame | None:
    """Type each cell (or any observation) by the marker genes of each cell type.

    Each marker gene is z-scored across the scored observations; a type's score is the mean z-score
    of its markers present in the data, standardised across the observations (so that types with few
    and with many markers compete on equal terms), and each observation gets the type with the
    highest score (ties: the type listed first). Deterministic.

    Parameters
    ----------
    data
        A table of log1p expression (e.g. the predicted cells), or a SpatialData holding it as
        ``table_key``.
    layer
        Layer of log1p expression (default: ``"bitro"``, the log1p predicted counts written by
        :func:`bitro.tl.predict`); ``None`` uses ``.X``. Genes are the table's ``var_names``; genes
        without values (all-NaN columns, e.g. genes the model does not predict) are left out, and
        observations without any value (cells outside every spot) stay untyped.
    normalize
        Library-size normalise each observation over the genes with values (counts per
        ``1e4``, log1p) before scoring, so that depth does not decide the type. Pass ``False`` for
        data that is already normalised.
    markers
        Type → marker genes; default :data:`bitro.tl._composition.MARKERS` (the 8 major types of
        :func:`bitro.datasets.her2st_proportions`). See :func:`cell_type_markers`.
    table_key
        Table to type when ``data`` is a SpatialData.
    key_added
        ``obs`` column of the type; the scores go to ``obsm[f"{key_added}_scores"]``.
    inplace
        Write into the table (and return ``None``); ``False`` returns the result instead.
    overwrite
        Replace existing keys.

    Returns
    -------
    With ``inplace=True`` nothing; writes

    - ``obs[key_added]``: categorical type (categories: the types in ``markers`` order), NaN where untyped;
    - ``obsm[f"{key_added}_scores"]``: DataFrame of the per-type scores (NaN where untyped);
    - ``uns[key_added]``: ``params``, ``markers`` (used), ``markers_missing`` (absent from the data).

    With ``inplace=False`` a DataFrame (observations × types) of the scores with the type in
    column ``key_added``.

    Raises
    ------
    ValueError
        A type has no marker among the genes with values; the expression is negative (not log1p);
        ``key_added`` exists and ``overwrite`` is False.
    """
    from bitro import __version__

    table = _table(data, table_key)
    if inplace:
        check_not_exists(key_added, table.obs, what="obs column", overwrite=overwrite)
        check_not_exists(f"{key_added}_scores", table.obsm, what="obsm key", overwrite=overwrite)
    x = _log_expression(table, layer)
    scores, scored, used, missing = _scores(x, table.var_names, markers, normalize)
    types = list(used)
    codes = np.full(len(scores), -1, dtype=np.int64)
    if scored.any():
        codes[scored] = np.argmax(scores[scored], axis=1)
    typed = pd.Categorical.from_codes(codes, categories=pd.Index(types))
    score_df = pd.DataFrame(scores, index=table.obs_names.copy(), columns=types)
    n_untyped = int((codes < 0).sum())
    logger.info(
        "type_cells: %d of %d observations typed (%s)%s.",
        int(scored.sum()),
        len(codes),
        ", ".join(f"{t} {int((codes == j).sum())}" for j, t in enumerate(types)),
        f"; {n_untyped} without expression stay untyped" if n_untyped else "",
    )
    if not inplace:
        return score_df.assign(**{key_added: typed})
    table.obs[key_added] = typed
    table.obsm[f"{key_added}_scores"] = score_df
    table.uns[key_added] = {
        "params": {"layer": layer, "normalize": normalize, "table_key": table_key},
        "markers": used,
        "markers_missing": {t: gs for t, gs in missing.items() if gs},
        "bitro_version": __version__,
    }
    return None


def spot_composition(
    data: sd.SpatialData | ad.AnnData,
    *,
    type_key: str = TYPE_KEY,
    spot_key: str = K.SPOT_ID,
    cells_key: str = K.CELLS,
    spots_key: str = K.SPOTS,
    key_added: str = COMPOSITION_KEY,
    inplace: bool = True,
    overwrite: bool = False,
) -> pd.DataFrame | None:
    """Each spot's fraction of cells per type.

    Parameters
    ----------
    data
        SpatialData with the cells table (types in ``obs[type_key]``, e.g. from :func:`type_cells`,
        spots in ``obs[spot_key]`` from :func:`bitro.pp.assign_cells`) and the spots table; or the cells
        table alone (then ``inplace=False``).
    type_key
        ``cells.obs`` column of the cell type. Untyped cells (NaN) are not counted.
    spot_key
        ``cells.obs`` column of each cell's spot (NaN outside every spot).
    cells_key, spots_key
        Tables of the cells and spots.
    key_added
        ``spots.obsm`` key of the fractions.
    inplace
        Write into the spots table (and return ``None``); ``False`` returns the fractions.
    overwrite
        Replace an existing ``spots.obsm[key_added]``.

    Returns
    -------
    With ``inplace=True`` nothing; writes ``spots.obsm[key_added]`` (DataFrame, spots × types, rows
    summing to 1; NaN for spots without a typed cell) and ``spots.obs[f"{key_added}_n_cells"]``
    (typed cells per spot). With ``inplace=False`` the DataFrame of fractions, indexed by spot id
    (all spots of the spots table, or of the categories of ``cells.obs[spot_key]``).

    Raises
    ------
    KeyError
        ``type_key`` or ``spot_key`` is not a column of the cells table.
    ValueError
        ``inplace=True`` with a cells table alone; cells name spots the spots table lacks; the key
        exists and ``overwrite`` is False.
    """
    import anndata as ad

    cells_only = isinstance(data, ad.AnnData)
    if inplace and cells_only:
        msg = (
            "spot_composition was given a cells table alone, so there is no spots table to write into; "
            "pass the SpatialData, or inplace=False to get the fractions as a DataFrame."
        )
        raise ValueError(msg)
    cells = _table(data, cells_key)
    check_key(type_key, cells.obs.columns, what="cells.obs column", hint="Run bt.tl.type_cells first.")
    check_key(spot_key, cells.obs.columns, what="cells.obs column", hint="Run bt.pp.assign_cells first.")
    types_col, spot_col = cells.obs[type_key], cells.obs[spot_key]
    types = (
        list(types_col.cat.categories)
        if isinstance(types_col.dtype, pd.CategoricalDtype)
        else sorted(types_col.dropna().unique().tolist())
    )
    if cells_only:
        spot_ids = (
            pd.Index(spot_col.cat.categories.astype(str))
            if isinstance(spot_col.dtype, pd.CategoricalDtype)
            else pd.Index(sorted(spot_col.dropna().astype(str).unique()))
        )
    else:
        spots = _table(data, spots_key)
        if inplace:
            check_not_exists(key_added, spots.obsm, what="spots.obsm key", overwrite=overwrite)
        spot_ids = spots.obs_names
    keep = types_col.notna().to_numpy() & spot_col.notna().to_numpy()
    spot_of = pd.Index(spot_ids).get_indexer(spot_col[keep].astype(str))
    if (spot_of < 0).any():
        bad = spot_col[keep].astype(str)[spot_of < 0].unique()[:3].tolist()
        msg = (
            f"{int((spot_of < 0).sum())} cells name spots that are not in the {spots_key!r} table (e.g. {bad}); "
            "re-run bt.pp.assign_cells on this slide."
        )
        raise ValueError(msg)
    type_of = pd.Index(types).get_indexer(types_col[keep].astype(str))
    counts = np.zeros((len(spot_ids), len(types)), dtype=np.float64)
    np.add.at(counts, (spot_of, type_of), 1.0)
    n_typed = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(n_typed[:, None] > 0, counts / n_typed[:, None], np.nan)
    out = pd.DataFrame(fractions, index=pd.Index(spot_ids, name="spot"), columns=types)
    if not inplace:
        return out
    spots.obsm[key_added] = out.set_axis(spots.obs_names, axis=0)
    spots.obs[f"{key_added}_n_cells"] = n_typed.astype(np.int64)
    logger.info(
        "spot_composition: %d of %d spots hold typed cells (median %d typed cells).",
        int((n_typed > 0).sum()),
        len(n_typed),
        int(np.median(n_typed)) if len(n_typed) else 0,
    )
    return None


def compare_composition(
    pred: pd.DataFrame, reference: pd.DataFrame, *, types: Sequence[str] | None = None
) -> pd.DataFrame:
    """Spearman correlation across spots, per cell type, of two per-spot compositions.

    Parameters
    ----------
    pred
        Spots × types (e.g. ``spots.obsm["marker_composition"]`` from :func:`spot_composition`).
    reference
        Spots × types (e.g. :func:`bitro.datasets.her2st_proportions`). Rows are matched to ``pred``
        by spot id (index); spots in only one of the two are left out.
    types
        Types to compare; default: every type present in both (in ``pred``'s order).

    Returns
    -------
    DataFrame indexed by type (named ``"type"``) with ``spearman``, ``pvalue`` and ``n_spots`` (spots
    where both have a finite value). ``spearman`` is NaN when fewer than 3 spots remain or either
    side is constant over them (e.g. a type no spot was given).

    Raises
    ------
    ValueError
        No spot id or no type is shared; an index holds repeated spot ids.
    KeyError
        A requested type is missing from either side.
    """
    from scipy.stats import spearmanr

    for name, frame in (("pred", pred), ("reference", reference)):
        if not isinstance(frame, pd.DataFrame):
            msg = f"{name} must be a DataFrame of spots × types, got {type(frame).__name__}."
            raise TypeError(msg)
        if frame.index.duplicated().any():
            dup = frame.index[frame.index.duplicated()].unique()[:3].tolist()
            msg = f"{name} has repeated spot ids (e.g. {dup}); give one row per spot."
            raise ValueError(msg)
    p_idx, r_idx = pred.index.astype(str), reference.index.astype(str)
    shared = p_idx.intersection(r_idx, sort=False)
    if len(shared) == 0:
        msg = (
            f"pred and reference share no spot id (e.g. {p_idx[:3].tolist()} vs {r_idx[:3].tolist()}); "
            "both must be indexed by the same spot ids, e.g. '{x}x{y}' for HER2ST."
        )
        raise ValueError(msg)
    if types is None:
        types = [t for t in pred.columns if t in set(reference.columns)]
        if not types:
            msg = (
                f"pred and reference share no type: {list(pred.columns)} vs {list(reference.columns)}; "
                "rename the columns to the same type names."
            )
            raise ValueError(msg)
        only = sorted(set(map(str, pred.columns)) ^ set(map(str, reference.columns)))
        if only:
            logger.info("compare_composition: types in only one of the two are left out: %s", only)
    else:
        types = list(types)
        for name, frame in (("pred", pred), ("reference", reference)):
            absent = [t for t in types if t not in frame.columns]
            if absent:
                msg = f"Types {absent} are not columns of {name} (columns: {list(frame.columns)})."
                raise KeyError(msg)
    n_left = len(p_idx) + len(r_idx) - 2 * len(shared)
    if n_left:
        logger.info("compare_composition: %d spots are in only one of the two and are left out.", n_left)
    a = pred.set_axis(p_idx, axis=0).loc[shared, types].to_numpy(dtype=np.float64)
    b = reference.set_axis(r_idx, axis=0).loc[shared, types].to_numpy(dtype=np.float64)
    rows = []
    for j, t in enumerate(types):
        ok = np.isfinite(a[:, j]) & np.isfinite(b[:, j])
        rho = pval = np.nan
        constant = ok.sum() < 3 or np.ptp(a[ok, j]) == 0 or np.ptp(b[ok, j]) == 0
        if not constant:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = spearmanr(a[ok, j], b[ok, j])
            rho, pval = float(res.statistic), float(res.pvalue)
        rows.append({"type": t, "spearman": rho, "pvalue": pval, "n_spots": int(ok.sum())})
    return pd.DataFrame(rows).set_index("type")
