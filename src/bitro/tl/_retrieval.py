"""The retrieval baseline: a spot is the similarity-weighted mean of its ``k`` nearest training spots.

The simplest member of the exemplar family SpaHGC descends from (EGN/EGGN): no training. Each spot of
the slide to predict retrieves its ``n_exemplars`` most similar training spots (cosine of the spot
features of :mod:`bitro.tl._spot_features`) from the :class:`~bitro.tl.ExemplarIndex`, and its
normalised expression is their mean weighted by the similarity clipped at 0 (equal weights when every
similarity is ≤ 0). With ``k = 1`` a spot identical to a training spot gets that spot's expression.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitro.tl._cross_slice import CrossSliceModel


def weighted_mean(values: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """``(m, p)`` mean of ``values`` ``(m, k, p)`` weighted by ``max(similarity, 0)`` ``(m, k)`` (uniform if all 0)."""
    w = np.clip(np.asarray(similarity, dtype=np.float64), 0.0, None)
    none = w.sum(axis=1) <= 0
    w[none] = 1.0
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("mk,mkp->mp", w, values)


class RetrievalModel(CrossSliceModel):
    """Predict spots as the similarity-weighted mean of their nearest training spots (``model="retrieval"``).

    Parameters
    ----------
    sdatas
        Training slides (``spots`` with counts, ``cells`` with ``obsm[use_rep]`` and ``obs["spot_id"]``).
        One slide is enough: the exemplars of a new slide come from the training slides.
    genes
        Genes to predict (default: :func:`bitro.pp.select_genes` of the training spots).
    setup
        :class:`~bitro.tl.SetupConfig` or a dict of its fields (``target``, ``use_rep``, ``n_components``, ...).
    cross_slice
        :class:`~bitro.tl.CrossSliceConfig` or a dict of its fields (``n_exemplars``, ``spot_rep``, ``index``).
    **options
        Fields of either config.
    """

    kind = "retrieval"

    def __init__(self, sdatas: Any, **kwargs: Any) -> None:
        super().__init__(sdatas, **kwargs)
        self.state.is_trained = True

    def predict_z(self, table, *, batch_size: int = 64, device: str | None = None):
        """Similarity-weighted mean of the exemplars' normalised expression (``batch_size``, ``device`` unused)."""
        ex = self.index.query(table.x, self.cross_slice.n_exemplars, query_slides=table.slide)
        return weighted_mean(self.index.values_of(ex.index), ex.similarity), ex

    def __repr__(self) -> str:
        return (
            f"RetrievalModel(genes={len(self.genes)}, k={self.cross_slice.n_exemplars}, "
            f"references={self.index.n_references} from {len(self.train_slides)} slides)"
        )
