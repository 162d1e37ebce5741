"""Ranking metrics of scores against binary labels: AUROC, AP, F1-max and their curves.

The image-level metrics of a category, and the exact (in-memory) pixel-level ones, with
scikit-learn's definitions (see :mod:`zsdense.metrics`). Every metric is computed from the
true / false positive counts at decreasing thresholds (:func:`counts_exact` for exact scores,
:func:`counts_hist` for the binned scores of :class:`~zsdense.metrics.pixel.PixelAccumulator`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def counts_exact(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True / false positive counts when predicting ``score >= t`` for each distinct score t,
    thresholds in decreasing order (sklearn's ``_binary_clf_curve``)."""
    y = np.asarray(y_true).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.shape} vs {s.shape}")
    if s.size and not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, dtype=int)
    tps = np.cumsum(y, dtype=np.float64)[last]
    fps = (last + 1).astype(np.float64) - tps
    return tps, fps


def counts_hist(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same counts from per-bin histograms (bin i holds scores in [edge_i, edge_i+1))."""
    keep = (pos + neg) > 0
    tps = np.cumsum(pos[::-1].astype(np.float64))[keep[::-1]]
    fps = np.cumsum(neg[::-1].astype(np.float64))[keep[::-1]]
    return tps, fps


def auroc_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    if tps.size == 0 or tps[-1] <= 0 or fps[-1] <= 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))


def ap_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    if tps.size == 0 or tps[-1] <= 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1max_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    if tps.size == 0 or tps[-1] <= 0:
        return float("nan")
    precision = np.r_[tps / (tps + fps), 1.0]
    recall = np.r_[tps / tps[-1], 0.0]
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = f1[np.isfinite(f1)]
    return float(f1.max()) if f1.size else float("nan")


def _thresholds_exact(scores: np.ndarray) -> np.ndarray:
    """The distinct scores in decreasing order: the thresholds of :func:`counts_exact`."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel(), kind="mergesort")[::-1]
    if not s.size:
        return s
    return s[np.r_[np.flatnonzero(np.diff(s)), s.size - 1]]


def f1_argmax_counts(tps: np.ndarray, fps: np.ndarray) -> tuple[float, int | None]:
    """(F1-max, index of the threshold that reaches it) over the counts; (NaN, None) when
    undefined. Ties: the first (highest) threshold, as ``argmax``."""
    if tps.size == 0 or tps[-1] <= 0:
        return float("nan"), None
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tps / (tps + fps)
        recall = tps / tps[-1]
        f1 = 2 * precision * recall / (precision + recall)
    f1 = np.where(np.isfinite(f1), f1, -np.inf)
    i = int(np.argmax(f1))
    if not np.isfinite(f1[i]):
        return float("nan"), None
    return float(f1[i]), i


def f1_max_threshold(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float | None]:
    """(F1-max, the threshold that reaches it): predicting ``score >= threshold`` gives the
    F1-max of :func:`f1_max` (the arg-max; ties: the highest threshold). (NaN, None) without
    positives."""
    tps, fps = counts_exact(y_true, scores)
    f1, i = f1_argmax_counts(tps, fps)
    return f1, (None if i is None else float(_thresholds_exact(scores)[i]))


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0), one point per distinct score (``score >= t``)."""
    tps, fps = counts_exact(y_true, scores)
    if tps.size == 0 or tps[-1] <= 0 or fps[-1] <= 0:
        return np.zeros(0), np.zeros(0)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def pr_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision), one point per distinct score (``score >= t``), highest first."""
    tps, fps = counts_exact(y_true, scores)
    if tps.size == 0 or tps[-1] <= 0:
        return np.zeros(0), np.zeros(0)
    return tps / tps[-1], tps / (tps + fps)


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN with one class only."""
    return auroc_counts(*counts_exact(y_true, scores))


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, sum of (R_n - R_n-1) P_n (``average_precision_score``); NaN without
    positives."""
    return ap_counts(*counts_exact(y_true, scores))


def f1_max(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Max of 2PR/(P+R) over ``precision_recall_curve`` points, non-finite values ignored."""
    return f1max_counts(*counts_exact(y_true, scores))


def image_metrics(labels: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max of one category."""
    tps, fps = counts_exact(np.asarray(labels), np.asarray(scores))
    return {
        "image_auroc": auroc_counts(tps, fps),
        "image_ap": ap_counts(tps, fps),
        "image_f1_max": f1max_counts(tps, fps),
    }
