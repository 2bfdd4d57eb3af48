"""Per-spot cell-type proportions of the HER2ST kit (the original study's stereoscope deconvolution)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from bitro.datasets._kit import _kit_root

DECONV_DIR = ("her2st", "deconv", "major")
#: The 8 major cell types of the deconvolution, in the kit's column order.
HER2ST_CELL_TYPES = (
    "B-cells",
    "CAFs",
    "Endothelial",
    "Epithelial",
    "Myeloid",
    "Plasma Cells",
    "PVL",
    "T-cells",
)
_SPOT_ID = re.compile(r"^\d+x\d+$")
_SUM_TOLERANCE = 1e-3


def her2st_proportions(section: str, data_dir: str | Path | None = None) -> pd.DataFrame:
    """Per-spot proportions of 8 major cell types in a HER2ST section, from the original study.

    Andersson et al. (Nat. Commun. 2021) deconvolved every spot with stereoscope against a
    breast-cancer single-cell reference. These are estimates, not cell truth, but the only real
    signal in the kit of which cell types a spot holds.

    Parameters
    ----------
    section
        Section name, e.g. ``"C2"``. Every section with counts has proportions (C1–H3); only C2–C6
        have an H&E image (:func:`bitro.datasets.her2st_sections`).
    data_dir
        Kit folder; see :func:`bitro.datasets.data_dir`.

    Returns
    -------
    Spots × 8 types (``B-cells``, ``CAFs``, ``Endothelial``, ``Epithelial``, ``Myeloid``,
    ``Plasma Cells``, ``PVL``, ``T-cells``), float64, each row summing to 1. The index (named
    ``"spot"``) holds ``"{x}x{y}"`` array coordinates, the same ids as the ``obs_names`` of the spots
    table of :func:`bitro.datasets.her2st`; align with
    ``props.reindex(sdata["spots"].obs_names)`` (spots without proportions become NaN rows).

    Raises
    ------
    KeyError
        The section has no proportions file in the kit (the message lists those that do).
    ValueError
        The file is not a table of proportions: unknown spot ids, non-numeric, negative or
        non-finite values, or rows that do not sum to 1.
    """
    folder = _kit_root(data_dir).joinpath(*DECONV_DIR)
    path = folder / f"{section}-proportion.tsv"
    if not path.is_file():
        available = sorted(p.name.split("-")[0] for p in folder.glob("*-proportion.tsv"))
        msg = (
            f"HER2ST section {section!r} has no cell-type proportions in {str(folder)!r}; "
            f"available: {available}."
        )
        raise KeyError(msg)
    table = pd.read_csv(path, sep="\t", index_col=0)
    table.index = table.index.astype(str)
    table.index.name = "spot"
    bad_ids = [i for i in table.index if not _SPOT_ID.match(i)]
    if bad_ids:
        msg = f"{str(path)!r}: row ids must be '{{x}}x{{y}}' array coordinates, got e.g. {bad_ids[:3]}."
        raise ValueError(msg)
    if table.index.duplicated().any():
        msg = f"{str(path)!r}: repeated spot ids, e.g. {list(table.index[table.index.duplicated()][:3])}."
        raise ValueError(msg)
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        msg = f"{str(path)!r}: columns {non_numeric} are not numeric; a proportions file holds numbers only."
        raise ValueError(msg)
    values = table.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all() or (values < 0).any():
        msg = f"{str(path)!r}: proportions must be finite and non-negative."
        raise ValueError(msg)
    sums = values.sum(axis=1)
    off = np.abs(sums - 1) > _SUM_TOLERANCE
    if off.any():
        msg = (
            f"{str(path)!r}: {int(off.sum())} rows do not sum to 1 (e.g. spot {table.index[off][0]!r} "
            f"sums to {sums[off][0]:.4f}); this is not a proportions table."
        )
        raise ValueError(msg)
    return table.astype(np.float64)
