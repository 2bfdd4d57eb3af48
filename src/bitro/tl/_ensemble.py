"""Predict with several BiTro models at once: their outputs averaged, written once (``bt.tl.predict([m0, m1])``).

Models fitted on the same slides with different seeds differ in initialisation, validation split, batches,
PCA solver and phenotypes; averaging what they predict removes part of that variance. The average is taken
where one model's outputs live before they are written: each bag's normalised prediction ``z`` (so the
spots are the mean of the members' log1p predictions on the target scale) and each cell's share of its
bag (a mean of distributions, so the cells of a bag still sum exactly to the bag's prediction). The
members must predict the same genes on the same level with the same target statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import spatialdata as sd

    from bitro.tl._model import BiTroModel


def check_members(models: Sequence[Any]) -> list[BiTroModel]:
    """The models as a list, refusing what cannot be averaged (with the reason and the fix)."""
    from bitro.tl._model import BiTroModel

    models = list(models)
    if not models:
        msg = "An ensemble needs at least one model; pass a list of models from bt.tl.fit."
        raise ValueError(msg)
    wrong = [type(m).__name__ for m in models if not isinstance(m, BiTroModel)]
    if wrong:
        msg = (
            f"Only BiTro models can be averaged in one prediction, got {wrong}; predict baselines and "
            "cross-slice models one at a time."
        )
        raise TypeError(msg)
    first = models[0]
    for i, m in enumerate(models[1:], start=1):
        differs = [
            what
            for what, same in (
                ("genes", list(m.genes) == list(first.genes)),
                ("level", m.level == first.level),
                ("table keys", m.keys == first.keys),
                ("target scale", m.transform.scale == first.transform.scale),
                ("target statistics", _same_statistics(m.transform, first.transform)),
                ("cell embedding", m.use_rep == first.use_rep),
            )
            if not same
        ]
        if differs:
            msg = (
                f"Model {i} of the ensemble differs from model 0 in its {', '.join(differs)}; average only "
                "models fitted on the same slides and genes with the same options (e.g. different seeds)."
            )
            raise ValueError(msg)
    return models


def _same_statistics(a: Any, b: Any) -> bool:
    """Two target transforms map predictions to counts the same way."""
    return (
        a.zscore == b.zscore
        and np.shape(a.mean) == np.shape(b.mean)
        and bool(np.allclose(a.mean, b.mean) and np.allclose(a.std, b.std))
    )


def predict_ensemble(
    models: Sequence[Any],
    sdata: sd.SpatialData,
    *,
    key_added: str,
    batch_size: int = 64,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, np.ndarray]:
    """Average the members' bag predictions and cell shares, then write them like one model's.

    Returns the arrays written (see :meth:`bitro.tl.BiTroModel.predict`); the provenance in ``uns`` is the
    first member's with ``ensemble`` = every member's seed and weights hash.
    """
    members = check_members(models)
    first = members[0]
    bags, is_unit, z, attn = first.predict_bags(sdata, batch_size=batch_size, device=device)
    z, attn = z.astype(np.float64), attn.astype(np.float64)
    for m in members[1:]:
        b, _, zm, am = m.predict_bags(sdata, batch_size=batch_size, device=device)
        if not (np.array_equal(b.bag_ids, bags.bag_ids) and np.array_equal(b.cell_obs, bags.cell_obs)):
            msg = "The ensemble's models grouped the slide's cells into different bags; fit them with the same options."
            raise ValueError(msg)
        z += zm
        attn += am
    z, attn = (z / len(members)).astype(np.float32), (attn / len(members)).astype(np.float32)
    ensemble = {
        "n_models": len(members),
        "seeds": [int(m.seed) for m in members],
        "weights_sha256": [m.weights_hash() for m in members],
    }
    return first.write_outputs(
        sdata,
        bags,
        is_unit,
        z,
        attn,
        key_added=key_added,
        overwrite=overwrite,
        provenance={"ensemble": ensemble},
    )
