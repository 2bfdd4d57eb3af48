"""The count matrix of a table and its sequencing depth, read the same way everywhere.

bitro's readers store raw counts in ``layers["counts"]`` and in ``X``; the layer is the one to
trust (``X`` may have been normalised by the user). The depth of a table is summarised by the
median total count of its units that hold at least one molecule (empty spots, e.g. off tissue,
say nothing about the sequencing depth).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K

if TYPE_CHECKING:
    import anndata as ad


def count_matrix(table: ad.AnnData, layer: str | None = K.COUNTS_LAYER) -> Any:
    """``table.layers[layer]`` when it exists, else ``table.X`` (sparse or dense, not copied)."""
    if layer is not None and layer in table.layers:
        return table.layers[layer]
    return table.X


def total_counts(matrix: Any) -> np.ndarray:
    """Row sums of a sparse or dense matrix, float64."""
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()


def median_total_counts(table: ad.AnnData, layer: str | None = K.COUNTS_LAYER) -> float:
    """Median total count of the units with at least one count (NaN when none has any)."""
    if table.n_vars == 0 or table.n_obs == 0:
        return float("nan")
    totals = total_counts(count_matrix(table, layer))
    totals = totals[totals > 0]
    return float(np.median(totals)) if len(totals) else float("nan")
