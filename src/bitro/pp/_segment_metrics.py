"""Scores of an instance segmentation against a reference: pixel Dice, object F1 and AJI.

Both inputs are integer instance masks of the same shape (0 = background, every other value one
object). The overlaps between all reference and predicted objects are counted once with a sparse
contingency table, so the cost is linear in the number of pixels.
"""

from __future__ import annotations

import numpy as np


def _check_pair(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        msg = f"Masks must have the same shape, got {truth.shape} (truth) and {pred.shape} (prediction)."
        raise ValueError(msg)
    return truth, pred


def _relabel(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive labels ``0..n`` and the pixel area of each (index 0 = background)."""
    ids, inverse = np.unique(mask.ravel(), return_inverse=True)
    if ids[0] != 0:  # no background pixel: shift so that 0 stays background
        inverse = inverse + 1
        ids = np.concatenate([[0], ids])
    return inverse.astype(np.int64), np.bincount(inverse, minlength=len(ids)).astype(np.int64)


def overlap_table(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections and areas of every (truth, prediction) object pair.

    Returns
    -------
    inter
        ``(n_truth, n_pred)`` intersection areas in pixels (background excluded).
    area_truth, area_pred
        Object areas in pixels.
    """
    truth, pred = _check_pair(truth, pred)
    t, area_t = _relabel(truth)
    p, area_p = _relabel(pred)
    n_t, n_p = len(area_t), len(area_p)
    both = (t > 0) & (p > 0)
    inter = np.bincount(t[both] * n_p + p[both], minlength=n_t * n_p).reshape(n_t, n_p)
    return inter[1:, 1:], area_t[1:], area_p[1:]


def pixel_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice of the foreground (any object) of two masks; 1.0 when both are empty."""
    truth, pred = _check_pair(truth, pred)
    a, b = truth > 0, pred > 0
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else float(2 * np.logical_and(a, b).sum() / denom)


def object_f1(truth: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5) -> dict[str, float]:
    """Object-level precision, recall and F1 with matches at IoU > ``iou_threshold``.

    For thresholds ≥ 0.5 a pair with IoU above the threshold is the only match either object can
    have, so greedy matching on IoU is optimal (equal to Hungarian matching).
    """
    inter, area_t, area_p = overlap_table(truth, pred)
    n_t, n_p = len(area_t), len(area_p)
    if n_t == 0 and n_p == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "n_true": 0, "n_pred": 0, "n_matched": 0}
    iou = inter / np.maximum(area_t[:, None] + area_p[None, :] - inter, 1)
    cand_t, cand_p = np.nonzero(iou > iou_threshold)
    order = np.argsort(-iou[cand_t, cand_p], kind="stable")
    used_t, used_p, matched = set(), set(), 0
    for i, j in zip(cand_t[order], cand_p[order], strict=True):
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            matched += 1
    precision = matched / n_p if n_p else 0.0
    recall = matched / n_t if n_t else 0.0
    f1 = 2 * matched / (n_t + n_p)
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "n_true": int(n_t),
        "n_pred": int(n_p),
        "n_matched": int(matched),
    }


def aggregated_jaccard(truth: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al., 2017).

    Each reference object is paired with the predicted object of highest IoU; the intersections of
    the pairs are summed (numerator) and their unions plus the area of every predicted object never
    paired are summed (denominator). 1.0 when both masks are empty, 0.0 when only one is.
    """
    inter, area_t, area_p = overlap_table(truth, pred)
    if len(area_t) == 0 and len(area_p) == 0:
        return 1.0
    if len(area_t) == 0 or len(area_p) == 0:
        return 0.0
    union = area_t[:, None] + area_p[None, :] - inter
    iou = inter / np.maximum(union, 1)
    best = iou.argmax(axis=1)
    rows = np.arange(len(area_t))
    has = inter[rows, best] > 0
    numerator = inter[rows, best][has].sum()
    denominator = union[rows, best][has].sum() + area_t[~has].sum()
    used = np.zeros(len(area_p), dtype=bool)
    used[best[has]] = True
    denominator += area_p[~used].sum()
    return float(numerator / denominator) if denominator else 0.0


def segmentation_scores(
    truth: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5
) -> dict[str, float]:
    """Pixel Dice, object precision/recall/F1 at ``iou_threshold`` and AJI in one dict."""
    scores = {"dice": pixel_dice(truth, pred), "aji": aggregated_jaccard(truth, pred)}
    scores.update(object_f1(truth, pred, iou_threshold=iou_threshold))
    return scores
