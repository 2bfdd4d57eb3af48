"""How good is an alignment: cross-modal retrieval, kNN expression regression, mixing of slides (HESCAPE).

- :func:`cross_modal_recall`: recall@k image→expression and expression→image among the spots of one
  held-out slide (chance = ``k / n_spots``).
- :func:`knn_expression`: a spot's expression as the similarity-weighted mean of its ``k`` most similar
  reference spots (BLEEP-style retrieval prediction; the :class:`~bitro.tl.ExemplarIndex` search and
  the weighting of ``model="retrieval"``).
- :func:`batch_silhouette`: silhouette of the spots grouped by slide (scikit-learn): near 1 when each
  slide sits apart, near 0 or below when slides mix.
- :func:`evaluate_alignment`: all three on a held-out slide, in the aligned space and in the unaligned
  spot features of the cross-slice models (pooled projected cells + log1p cell count), so "before"
  and "after" are compared with the same searches and statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import spatialdata as sd

    from bitro.tl._align import Alignment

DIRECTIONS = ("image→expression", "expression→image")


def cross_modal_recall(
    image: np.ndarray, expression: np.ndarray, *, ks: Sequence[int] = (1, 5, 10)
) -> pd.DataFrame:
    """Recall@k of the true partner in both directions, by cosine similarity.

    Parameters
    ----------
    image, expression
        ``(n, d)`` paired embeddings: row ``i`` of each is spot ``i`` (rows with NaN are dropped from both).
    ks
        Cut-offs; each must be ``1 ≤ k``; a ``k ≥ n`` gives recall 1 (reported with chance 1).

    Returns
    -------
    One row per direction and ``k``: ``direction``, ``k``, ``recall``, ``chance`` (= ``min(k, n) / n``),
    ``n_spots``. Ties are broken against the true partner (it must beat every other candidate).
    """
    image, expression = np.asarray(image, dtype=np.float64), np.asarray(expression, dtype=np.float64)
    if image.ndim != 2 or image.shape != expression.shape:
        msg = f"image and expression must be paired (n, d) arrays of one shape, got {image.shape} and {expression.shape}."
        raise ValueError(msg)
    ok = np.isfinite(image).all(axis=1) & np.isfinite(expression).all(axis=1)
    image, expression = image[ok], expression[ok]
    n = len(image)
    if n < 2:
        msg = f"Recall needs at least 2 spots with both embeddings, got {n}."
        raise ValueError(msg)
    if any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 for k in ks):
        msg = f"ks must be integers ≥ 1, got {list(ks)}."
        raise ValueError(msg)

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = unit(image) @ unit(expression).T
    rows = []
    for direction, s in zip(DIRECTIONS, (sim, sim.T), strict=True):
        true = np.diag(s)
        rank = (s >= true[:, None]).sum(axis=1) - 1  # other candidates at least as similar
        for k in ks:
            rows.append({"direction": direction, "k": int(k), "recall": float(np.mean(rank < k)),
                         "chance": min(int(k), n) / n, "n_spots": n})  # fmt: skip
    return pd.DataFrame(rows)


def knn_expression(reference: np.ndarray, values: np.ndarray, query: np.ndarray, *, k: int = 8) -> np.ndarray:
    """``(m, p)`` similarity-weighted mean of ``values`` of the ``k`` reference rows most similar to each query.

    Parameters
    ----------
    reference
        ``(n, d)`` reference embeddings (e.g. training spots).
    values
        ``(n, p)`` what to average (e.g. their normalised expression).
    query
        ``(m, d)`` query embeddings in the same space.
    k
        Neighbours (cosine similarity; weights = similarity clipped at 0, as ``model="retrieval"``).
    """
    from bitro.tl._exemplars import ExemplarIndex
    from bitro.tl._retrieval import weighted_mean

    reference = np.asarray(reference)
    index = ExemplarIndex.build(reference, np.repeat("reference", len(reference)), np.arange(len(reference)).astype(str),
                                values=np.asarray(values))  # fmt: skip
    found = index.query(np.asarray(query), k, query_slides="query")
    return weighted_mean(index.values_of(found.index), found.similarity)


def batch_silhouette(x: np.ndarray, batches: Sequence[Any], *, metric: str = "cosine") -> float:
    """Silhouette score of the rows of ``x`` grouped by ``batches`` (e.g. slide names), scikit-learn.

    1: every slide forms its own cluster (strong batch effect); 0: slides overlap; below 0: mixed.
    Rows with NaN are dropped.
    """
    from sklearn.metrics import silhouette_score

    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(batches).astype(str)
    ok = np.isfinite(x).all(axis=1)
    x, labels = x[ok], labels[ok]
    if len(np.unique(labels)) < 2 or len(x) <= len(np.unique(labels)):
        msg = f"batch_silhouette needs at least 2 batches and more rows than batches; got {len(np.unique(labels))} batches, {len(x)} rows."
        raise ValueError(msg)
    return float(silhouette_score(x, labels, metric=metric))


def _check_held_out(alignment: Alignment, sdata: sd.SpatialData, name: str, what: str) -> None:
    from bitro.tl._align import _fingerprint

    same = name if name in alignment.train_slides else None
    fp = _fingerprint(sdata, alignment.setup)
    if same is None and fp in alignment.fingerprints:
        same = alignment.train_slides[alignment.fingerprints.index(fp)]
    if same is not None:
        how = "is" if same == name else f"({name!r}) holds the same cells as"
        msg = (
            f"The {what} {how} training slide {same!r} of this alignment (leakage: the towers saw its pairs). "
            "Evaluate on a slide left out of align_encoder."
        )
        raise ValueError(msg)


def evaluate_alignment(
    alignment: Alignment,
    test: sd.SpatialData,
    *,
    reference: Sequence[sd.SpatialData],
    ks: Sequence[int] = (1, 5, 10),
    n_neighbors: int = 8,
) -> pd.DataFrame:
    """Recall@k, kNN expression regression and batch silhouette on a held-out slide, before and after alignment.

    Parameters
    ----------
    alignment
        From :func:`~bitro.tl.align_encoder`.
    test
        A held-out slide with counts of the alignment's genes; refused when it is (by name or by its
        cells) one of the alignment's training slides.
    reference
        Slides whose spots serve as kNN neighbours (usually the training slides; never ``test``).
    ks
        Recall cut-offs.
    n_neighbors
        ``k`` of the kNN regression.

    Returns
    -------
    Tidy rows ``metric, space, direction, k, value, chance, n_spots``: ``recall`` (aligned space only,
    both directions), ``knn_pcc_gene`` (PCC_gene of the kNN prediction of the normalised expression;
    ``space`` = ``"aligned"`` or ``"unaligned"``) and ``silhouette_slide`` (reference + test spots).
    """
    from bitro.tl._metric_fns import pcc_gene
    from bitro.tl._setup import slide_name
    from bitro.tl._spot_features import SpotFeatures

    name = slide_name(test, len(reference))
    _check_held_out(alignment, test, name, "slide to evaluate")
    ref_names = [slide_name(s, i) for i, s in enumerate(reference)]
    if name in ref_names:
        msg = f"The slide to evaluate ({name!r}) is also a kNN reference; pass reference slides without it."
        raise ValueError(msg)
    held = alignment.embed(test, i=len(reference), expression=True)
    refs = [alignment.embed(s, i=i, expression=True) for i, s in enumerate(reference)]
    has = np.isfinite(held.expression).all(axis=1)
    rows = [{"metric": "recall", "space": "aligned", **r}
            for r in cross_modal_recall(held.image, held.expression, ks=ks).to_dict("records")]  # fmt: skip
    for r in rows:
        r["value"] = r.pop("recall")
    # unaligned: the cross-slice spot features, fitted on the reference slides
    features, tables = SpotFeatures.fit(list(reference), alignment.setup)
    test_table = features.table(test, alignment.setup, i=len(reference))
    spaces = {
        "aligned": ([r.image for r in refs], [r.spot_ids for r in refs], held.image, held.spot_ids),
        "unaligned": ([t.x for t in tables], [t.spot_ids for t in tables], test_table.x, test_table.spot_ids),
    }
    obs = held.z[has]
    for space, (ref_x, ref_ids, test_x, test_ids) in spaces.items():
        # every space is scored on the same reference spots: the aligned ones, in their order
        x_ref = np.concatenate(
            [_align_rows(x, ids, r.spot_ids) for x, ids, r in zip(ref_x, ref_ids, refs, strict=True)]
        )
        z_ref = np.concatenate([r.z for r in refs])
        keep = np.isfinite(x_ref).all(axis=1) & np.isfinite(z_ref).all(axis=1)
        q = _align_rows(test_x, test_ids, held.spot_ids)[has]
        pred = knn_expression(x_ref[keep], z_ref[keep], q, k=n_neighbors)
        res = pcc_gene(obs, pred)
        rows.append({"metric": "knn_pcc_gene", "space": space, "direction": None, "k": n_neighbors,
                     "value": res.value, "chance": None, "n_spots": int(has.sum()), "n_constant": res.n_constant})  # fmt: skip
        emb = np.concatenate([x_ref, _align_rows(test_x, test_ids, held.spot_ids)])
        labels = np.concatenate(
            [np.repeat(r.slide, len(r.spot_ids)) for r in refs] + [np.repeat(name, len(held.spot_ids))]
        )
        rows.append({"metric": "silhouette_slide", "space": space, "direction": None, "k": None,
                     "value": batch_silhouette(emb, labels), "chance": None, "n_spots": len(emb)})  # fmt: skip
    return pd.DataFrame(rows)


def _align_rows(x: np.ndarray, ids: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (indexed by ``ids``) in the order of ``want`` (NaN where absent)."""
    pos = pd.Index(ids).get_indexer(want)
    out = np.full((len(want), x.shape[1]), np.nan, dtype=np.float64)
    out[pos >= 0] = x[pos[pos >= 0]]
    return out
