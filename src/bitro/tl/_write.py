"""Writing unit-level predictions into a table, aligned to its genes."""

from __future__ import annotations

from typing import Any

import numpy as np


def write_units_layer(
    units: Any,
    unit_ids: np.ndarray,
    genes: list[str],
    values: np.ndarray,
    *,
    key_added: str,
    provenance: dict[str, Any],
    n_cells: np.ndarray | None = None,
    overwrite: bool = False,
) -> np.ndarray:
    """Write ``values`` (``len(unit_ids)`` × ``len(genes)``) into ``units.layers[key_added]``.

    Rows are matched by unit id and columns by gene name; entries without a prediction (genes
    the model lacks, units without cells) are NaN. Genes of the model missing from ``units.var``
    are listed in ``units.uns[key_added]["genes_missing_from_table"]``.
    """
    if key_added in units.layers and not overwrite:
        msg = f"layers[{key_added!r}] already exists in the units table; pass overwrite=True or another key_added."
        raise ValueError(msg)
    layer = np.full((units.n_obs, units.n_vars), np.nan, dtype=np.float32)
    rows = units.obs_names.get_indexer(unit_ids)
    if (rows < 0).any():
        msg = f"{int((rows < 0).sum())} predicted units are not in the table (e.g. {unit_ids[rows < 0][:3]})."
        raise ValueError(msg)
    cols = units.var_names.get_indexer(genes)
    have = cols >= 0
    layer[np.ix_(rows, cols[have])] = np.asarray(values)[:, have]
    units.layers[key_added] = layer
    if n_cells is not None:
        full = np.zeros(units.n_obs, dtype=np.int64)
        full[rows] = n_cells
        units.obs[f"{key_added}_n_cells"] = full
    units.uns[key_added] = {
        **provenance,
        "genes": list(genes),
        "genes_missing_from_table": [g for g, h in zip(genes, have) if not h],
    }
    return layer
