"""Multi-label metrics written with numpy: average precision per class, its macro mean, and per-item recall."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one class: sum over ranks of (recall step) x (precision), ties grouped as by sklearn.

    Returns NaN when the class has no positives.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets).ravel() > 0
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # Keep only the last index of each run of tied scores: thresholds sit between distinct scores.
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(steps * precision))


def per_class_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Average precision of each column of `scores` [N, C] against multi-hot `targets` [N, C]."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    return np.array([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro mean of the per-class average precision, over classes that have at least one positive."""
    return float(np.nanmean(per_class_ap(scores, targets)))


def per_item_recall(
    probs: np.ndarray, item_classes: Sequence[Sequence[int]], threshold: float = 0.5, num_classes: int | None = None
) -> tuple[float, np.ndarray]:
    """Fraction of items whose class gets probability >= threshold in their scene, overall and per class.

    `item_classes[i]` lists the class of every item in scene i (an item class repeated in a scene counts twice).
    The per-class array is NaN for classes with no items.
    """
    probs = np.asarray(probs)
    c = num_classes or probs.shape[1]
    hits, totals = np.zeros(c), np.zeros(c)
    for row, classes in zip(probs, item_classes, strict=True):
        for k in classes:
            totals[k] += 1
            hits[k] += row[k] >= threshold
    overall = float(hits.sum() / totals.sum()) if totals.sum() else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(totals > 0, hits / np.maximum(totals, 1), np.nan)
    return overall, per_class
