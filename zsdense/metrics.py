"""Evaluation metrics with the exact protocols of the papers zsdense reproduces.

Anomaly detection / segmentation (image and pixel level):

- AUROC and AP with scikit-learn's definitions (``roc_auc_score``, ``average_precision_score``),
  F1-max = max over the precision-recall curve of 2PR/(P+R) ignoring non-finite values
  (``precision_recall_curve`` semantics). Implemented here with numpy only: scikit-learn is a
  test dependency, not a runtime one.
- AUPRO in two forms, each under its own name:
  :func:`aupro_papers` (Crane / AnomalyCLIP / APRIL-GAN code: 200 thresholds
  ``numpy.arange(min, max, (max - min) / 200)``, prediction ``map > t``, PRO = mean over every
  8-connected ground-truth region of the covered fraction, FPR = false positives / negatives,
  keep points with FPR < 0.3, min-max rescale those FPRs to [0, 1], trapezoid area) and
  :func:`aupro_mvtec` (the MVTec AD definition: the exact PRO(FPR) curve over every distinct
  score, integrated up to FPR = 0.3 and divided by 0.3).

Both forms also exist as streaming accumulators, because a category of thousands of 518x518
maps should not be held in memory at once:

- :class:`PixelAccumulator` keeps histograms of the scores of positive pixels, negative pixels
  and region-weighted positive pixels over ``bins`` equal bins of a range fixed up front
  (default 16384 bins over [0, 1], the range of anomaly probabilities). Its metrics are the
  exact metrics of the scores quantised to their bin, so AUROC differs from the exact value by
  at most the fraction of (positive, negative) pairs that share a bin (about 1e-4 or less with
  the default bins on smooth maps). Values outside the range are counted in the edge bins
  (``n_clipped`` says how many); when the range is unknown, run a first pass with
  :class:`RangeTracker`, or keep the maps on disk and make two passes (``zsdense eval`` does).
- :class:`AuproAccumulator` computes the papers' AUPRO exactly from the category's min and max
  (a first pass), with per-threshold counts instead of the stack of maps.

Segmentation: :class:`IoUAccumulator` (mmseg ``IoUMetric``: intersection and union summed per
class over the dataset, IoU = sum I / sum U, classes with a zero union are NaN and ignored by the
mean, ``ignore_index`` pixels dropped, labels outside ``[0, num_classes)`` dropped as
``torch.histc`` drops them). Referring: :class:`ReferAccumulator` (oIoU = sum I / sum U over all
sentences, mIoU = mean per-sentence IoU with an empty union counting 0, precision at IoU
thresholds 0.5 / 0.7 / 0.9 counting IoU >= threshold).

Degenerate inputs (only one class present) give NaN instead of raising, so one empty category
does not abort a whole evaluation; the tables show NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from zsdense.config import PIXEL_METRIC_BINS

__all__ = [
    "auroc",
    "average_precision",
    "f1_max",
    "f1_max_threshold",
    "roc_curve",
    "pr_curve",
    "image_metrics",
    "pixel_metrics",
    "aupro_papers",
    "aupro_mvtec",
    "pro_curve_papers",
    "pro_curve_mvtec",
    "papers_thresholds",
    "label_regions",
    "PixelAccumulator",
    "AuproAccumulator",
    "RangeTracker",
    "IoUAccumulator",
    "mean_iou",
    "ReferAccumulator",
    "refer_metrics",
    "DEFAULT_BINS",
    "PAPERS_AUPRO_STEPS",
    "AUPRO_FPR_LIMIT",
]

DEFAULT_BINS = PIXEL_METRIC_BINS
PAPERS_AUPRO_STEPS = 200
AUPRO_FPR_LIMIT = 0.3
# 8-connectivity: skimage.measure.label's default on 2-D masks, which the papers' code uses.
_EIGHT = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------------------------
# Curves from (tps, fps) counts at decreasing thresholds.
# ----------------------------------------------------------------------------------------------


def _counts_exact(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _counts_hist(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same counts from per-bin histograms (bin i holds scores in [edge_i, edge_i+1))."""
    keep = (pos + neg) > 0
    tps = np.cumsum(pos[::-1].astype(np.float64))[keep[::-1]]
    fps = np.cumsum(neg[::-1].astype(np.float64))[keep[::-1]]
    return tps, fps


def _auroc_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    if tps.size == 0 or tps[-1] <= 0 or fps[-1] <= 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))


def _ap_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    if tps.size == 0 or tps[-1] <= 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1max_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    if tps.size == 0 or tps[-1] <= 0:
        return float("nan")
    precision = np.r_[tps / (tps + fps), 1.0]
    recall = np.r_[tps / tps[-1], 0.0]
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = f1[np.isfinite(f1)]
    return float(f1.max()) if f1.size else float("nan")


def _thresholds_exact(scores: np.ndarray) -> np.ndarray:
    """The distinct scores in decreasing order: the thresholds of :func:`_counts_exact`."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel(), kind="mergesort")[::-1]
    if not s.size:
        return s
    return s[np.r_[np.flatnonzero(np.diff(s)), s.size - 1]]


def _f1_argmax_counts(tps: np.ndarray, fps: np.ndarray) -> tuple[float, int | None]:
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
    tps, fps = _counts_exact(y_true, scores)
    f1, i = _f1_argmax_counts(tps, fps)
    return f1, (None if i is None else float(_thresholds_exact(scores)[i]))


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0), one point per distinct score (``score >= t``)."""
    tps, fps = _counts_exact(y_true, scores)
    if tps.size == 0 or tps[-1] <= 0 or fps[-1] <= 0:
        return np.zeros(0), np.zeros(0)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def pr_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision), one point per distinct score (``score >= t``), highest first."""
    tps, fps = _counts_exact(y_true, scores)
    if tps.size == 0 or tps[-1] <= 0:
        return np.zeros(0), np.zeros(0)
    return tps / tps[-1], tps / (tps + fps)


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN with one class only."""
    return _auroc_counts(*_counts_exact(y_true, scores))


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, sum of (R_n - R_n-1) P_n (``average_precision_score``); NaN without
    positives."""
    return _ap_counts(*_counts_exact(y_true, scores))


def f1_max(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Max of 2PR/(P+R) over ``precision_recall_curve`` points, non-finite values ignored."""
    return _f1max_counts(*_counts_exact(y_true, scores))


def image_metrics(labels: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max of one category."""
    tps, fps = _counts_exact(np.asarray(labels), np.asarray(scores))
    return {
        "image_auroc": _auroc_counts(tps, fps),
        "image_ap": _ap_counts(tps, fps),
        "image_f1_max": _f1max_counts(tps, fps),
    }


def pixel_metrics(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """Exact (in-memory) pixel AUROC, AP, F1-max and both AUPRO forms over a stack of maps.

    ``maps``: (N, H, W) float, ``masks``: (N, H, W) bool ground truth.
    """
    maps = np.asarray(maps)
    masks = np.asarray(masks).astype(bool)
    tps, fps = _counts_exact(masks, maps)
    return {
        "pixel_auroc": _auroc_counts(tps, fps),
        "pixel_ap": _ap_counts(tps, fps),
        "pixel_f1_max": _f1max_counts(tps, fps),
        "aupro": aupro_papers(masks, maps),
        "aupro_mvtec": aupro_mvtec(masks, maps),
    }


# ----------------------------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------------------------


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of a 2-D ground-truth mask: (labels (H, W) int32, count)."""
    from scipy import ndimage

    lab, n = ndimage.label(np.asarray(mask).astype(bool), structure=_EIGHT)
    return lab, int(n)


def papers_thresholds(
    lo: float | np.floating, hi: float | np.floating, steps: int = PAPERS_AUPRO_STEPS
) -> np.ndarray:
    """``numpy.arange(min, max, (max - min) / steps)``, exactly as the papers' code builds it.

    Pass ``lo``/``hi`` as the numpy scalars ``maps.min()``/``maps.max()`` to reproduce the same
    floating-point grid (its length can be ``steps`` or ``steps + 1``). A constant map gives a
    single threshold.
    """
    if not hi > lo:
        return np.asarray([lo], dtype=np.float64)
    return np.arange(lo, hi, (hi - lo) / steps)


def _sklearn_auc(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area of y(x) for monotonic x in either direction (``sklearn.metrics.auc``)."""
    if x.size < 2:
        return float("nan")
    dx = np.diff(x)
    direction = 1.0
    if np.any(dx < 0):
        if np.all(dx <= 0):
            direction = -1.0
        else:
            raise ValueError("x is neither increasing nor decreasing")
    return float(direction * np.sum(dx * (y[1:] + y[:-1]) * 0.5))


def _papers_area(pros: np.ndarray, fprs: np.ndarray, fpr_limit: float) -> float:
    keep = fprs < fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    if fprs.size < 2:
        return float("nan")
    span = fprs.max() - fprs.min()
    if span <= 0:
        return float("nan")
    return _sklearn_auc((fprs - fprs.min()) / span, pros)


def pro_curve_papers(
    masks: np.ndarray, maps: np.ndarray, steps: int = PAPERS_AUPRO_STEPS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, pro, fpr) at the papers' thresholds, computed with per-threshold counts."""
    maps = np.asarray(maps)
    acc = AuproAccumulator.from_range(maps.min(), maps.max(), steps=steps)
    for m, g in zip(maps, np.asarray(masks)):
        acc.update(m, g)
    return acc.thresholds, acc.pro(), acc.fpr()


def aupro_papers(
    masks: np.ndarray,
    maps: np.ndarray,
    steps: int = PAPERS_AUPRO_STEPS,
    fpr_limit: float = AUPRO_FPR_LIMIT,
) -> float:
    """AUPRO as Crane / AnomalyCLIP compute it (see the module docstring); NaN if undefined."""
    _, pro, fpr = pro_curve_papers(masks, maps, steps)
    return _papers_area(pro, fpr, fpr_limit)


def pro_curve_mvtec(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO(FPR) curve of MVTec AD: one point per distinct score (prediction
    ``map >= score``), framed by (0, 0) and (1, 1)."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    weights = np.zeros(maps.shape, dtype=np.float64)
    n_regions = 0
    for i, g in enumerate(masks):
        lab, n = label_regions(g)
        n_regions += n
        if n:
            sizes = np.bincount(lab.ravel())
            w = np.zeros_like(sizes, dtype=np.float64)
            w[1:] = 1.0 / sizes[1:]
            weights[i] = w[lab]
    neg = ~masks
    order = np.argsort(maps.ravel(), kind="mergesort")[::-1]
    s = maps.ravel()[order]
    fpr = np.cumsum(neg.ravel()[order], dtype=np.float64) / max(int(neg.sum()), 1)
    pro = np.cumsum(weights.ravel()[order]) / max(n_regions, 1)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    fpr, pro = np.minimum(fpr[last], 1.0), pro[last]
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area of pro(fpr) (fpr non-decreasing) on [0, limit], interpolating at limit."""
    finite = np.isfinite(fpr) & np.isfinite(pro)
    fpr, pro = fpr[finite], pro[finite]
    inside = fpr <= limit
    x, y = fpr[inside], pro[inside]
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))
    if x.size and x[-1] < limit and inside.size > x.size:
        j = x.size  # first point beyond the limit
        x0, y0, x1, y1 = fpr[j - 1], pro[j - 1], fpr[j], pro[j]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_lim) * (limit - x0)
    return float(area)


def aupro_mvtec(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """AUPRO as MVTec AD defines it: area under PRO(FPR) on [0, limit] divided by limit."""
    masks = np.asarray(masks).astype(bool)
    if not masks.any() or masks.all():
        return float("nan")
    fpr, pro = pro_curve_mvtec(masks, maps)
    return float(_area_to_limit(fpr, pro, fpr_limit) / fpr_limit)


# ----------------------------------------------------------------------------------------------
# Streaming accumulators
# ----------------------------------------------------------------------------------------------


def _check_pair(amap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amap = np.asarray(amap)
    mask = np.asarray(mask).astype(bool)
    if amap.shape != mask.shape or amap.ndim != 2:
        raise ValueError(f"map {amap.shape} and mask {mask.shape} must be equal 2-D shapes")
    if not np.all(np.isfinite(amap)):
        raise ValueError("anomaly map contains NaN or infinite values")
    return amap, mask


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel 1/|region| inside each 8-connected GT region (0 outside), region count."""
    lab, n = label_regions(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=np.float64), 0
    sizes = np.bincount(lab.ravel())
    w = np.zeros(sizes.shape, dtype=np.float64)
    w[1:] = 1.0 / sizes[1:]
    return w[lab], n


@dataclass
class RangeTracker:
    """First pass of a two-pass evaluation: the min and max over every map seen."""

    lo: np.floating | None = None
    hi: np.floating | None = None

    def update(self, amap: np.ndarray) -> None:
        a = np.asarray(amap)
        lo, hi = a.min(), a.max()
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)


class PixelAccumulator:
    """Binned, streaming pixel AUROC / AP / F1-max / MVTec AUPRO over many (map, mask) pairs.

    ``bins`` equal bins over ``value_range`` (default 16384 over [0, 1]); a score s goes to bin
    ``floor((s - lo) / (hi - lo) * bins)``, and values outside the range go to the edge bins
    (counted in ``n_clipped``). Memory is three arrays of ``bins`` numbers whatever the number
    of maps. The metrics equal the exact metrics of the bin-quantised scores.
    """

    def __init__(
        self, bins: int = DEFAULT_BINS, value_range: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo or bins < 1:
            raise ValueError(f"need bins >= 1 and a range lo < hi, got {bins}, {value_range}")
        self.bins = int(bins)
        self.value_range = (lo, hi)
        self.pos = np.zeros(self.bins, dtype=np.int64)  # (bins,) positive pixel counts
        self.neg = np.zeros(self.bins, dtype=np.int64)  # (bins,) negative pixel counts
        self.pro = np.zeros(self.bins, dtype=np.float64)  # (bins,) sum of 1/|region| weights
        self.n_regions = 0
        self.n_clipped = 0
        self.n_maps = 0

    def _bin(self, values: np.ndarray) -> np.ndarray:
        lo, hi = self.value_range
        v = values.astype(np.float64)
        idx = np.floor((v - lo) * (self.bins / (hi - lo)))  # v == hi lands in the last bin
        out = (v < lo) | (v > hi)
        if out.any():
            self.n_clipped += int(out.sum())
        return np.clip(idx, 0, self.bins - 1).astype(np.int64)

    def update(self, amap: np.ndarray, mask: np.ndarray) -> None:
        """Add one (H, W) map with its (H, W) ground-truth mask."""
        amap, mask = _check_pair(amap, mask)
        idx = self._bin(amap.ravel())
        m = mask.ravel()
        self.pos += np.bincount(idx[m], minlength=self.bins)
        self.neg += np.bincount(idx[~m], minlength=self.bins)
        if m.any():
            w, n = _region_weights(mask)
            self.pro += np.bincount(idx[m], weights=w.ravel()[m], minlength=self.bins)
            self.n_regions += n
        self.n_maps += 1

    def merge(self, other: PixelAccumulator) -> None:
        """Add another accumulator's counts (same bins and range), e.g. from another worker."""
        if other.bins != self.bins or other.value_range != self.value_range:
            raise ValueError("accumulators differ in bins or range")
        self.pos += other.pos
        self.neg += other.neg
        self.pro += other.pro
        self.n_regions += other.n_regions
        self.n_clipped += other.n_clipped
        self.n_maps += other.n_maps

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        return _counts_hist(self.pos, self.neg)

    def auroc(self) -> float:
        return _auroc_counts(*self._counts())

    def ap(self) -> float:
        return _ap_counts(*self._counts())

    def f1_max(self) -> float:
        return _f1max_counts(*self._counts())

    def _edges_desc(self) -> np.ndarray:
        """Lower edge of every non-empty bin, highest first (the thresholds of the counts)."""
        lo, hi = self.value_range
        edges = lo + np.arange(self.bins, dtype=np.float64) * ((hi - lo) / self.bins)
        keep = (self.pos + self.neg) > 0
        return edges[::-1][keep[::-1]]

    def f1_max_threshold(self) -> tuple[float, float | None]:
        """(F1-max of the binned scores, its threshold): the lower edge of the bin where it is
        reached, so ``map >= threshold`` predicts that bin and every one above."""
        f1, i = _f1_argmax_counts(*self._counts())
        return f1, (None if i is None else float(self._edges_desc()[i]))

    def curves(self) -> dict[str, np.ndarray]:
        """ROC (``fpr``, ``tpr``), PR (``recall``, ``precision``) and PRO (``pro_fpr``,
        ``pro``) points of the binned scores, one per non-empty bin, highest threshold first
        (``thresholds``)."""
        tps, fps = self._counts()
        out: dict[str, np.ndarray] = {"thresholds": self._edges_desc()}
        if tps.size and tps[-1] > 0 and fps[-1] > 0:
            out["fpr"], out["tpr"] = fps / fps[-1], tps / tps[-1]
        if tps.size and tps[-1] > 0:
            out["recall"], out["precision"] = tps / tps[-1], tps / (tps + fps)
        n_neg = int(self.neg.sum())
        if self.n_regions and n_neg:
            keep = ((self.pos + self.neg) > 0)[::-1]
            out["pro_fpr"] = np.minimum((np.cumsum(self.neg[::-1]) / n_neg)[keep], 1.0)
            out["pro"] = (np.cumsum(self.pro[::-1]) / self.n_regions)[keep]
        return out

    def aupro_mvtec(self, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
        """MVTec AUPRO of the bin-quantised scores (thresholds at the bin edges)."""
        n_neg = int(self.neg.sum())
        if self.n_regions == 0 or n_neg == 0:
            return float("nan")
        keep = ((self.pos + self.neg) > 0)[::-1]
        fpr = (np.cumsum(self.neg[::-1]) / n_neg)[keep]
        pro = (np.cumsum(self.pro[::-1]) / self.n_regions)[keep]
        fpr = np.r_[0.0, np.minimum(fpr, 1.0), 1.0]
        pro = np.r_[0.0, pro, 1.0]
        return float(_area_to_limit(fpr, pro, fpr_limit) / fpr_limit)

    def metrics(self) -> dict[str, float]:
        tps, fps = self._counts()
        return {
            "pixel_auroc": _auroc_counts(tps, fps),
            "pixel_ap": _ap_counts(tps, fps),
            "pixel_f1_max": _f1max_counts(tps, fps),
            "aupro_mvtec": self.aupro_mvtec(),
        }


class AuproAccumulator:
    """Streaming, exact AUPRO in the papers' form, given the category's score range.

    For each map it counts, per threshold t of :func:`papers_thresholds`, the negative pixels
    with ``map > t`` and the summed covered fraction of every GT region; no map is kept.
    """

    def __init__(self, thresholds: np.ndarray) -> None:
        self.thresholds = np.asarray(thresholds)
        t = self.thresholds.size
        self.fp = np.zeros(t, dtype=np.int64)  # (T,) negatives above each threshold
        self.pro_sum = np.zeros(t, dtype=np.float64)  # (T,) sum over regions of covered fraction
        self.n_neg = 0
        self.n_regions = 0

    @classmethod
    def from_range(
        cls, lo: float | np.floating, hi: float | np.floating, steps: int = PAPERS_AUPRO_STEPS
    ) -> AuproAccumulator:
        return cls(papers_thresholds(lo, hi, steps))

    def _above(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(T,) count (or weight sum) of values strictly above each threshold."""
        # k = number of thresholds strictly below the value: value > thr_j  <=>  j < k.
        k = np.searchsorted(self.thresholds, values, side="left")
        hist = np.bincount(k, weights=weights, minlength=self.thresholds.size + 1)
        return np.cumsum(hist[::-1])[::-1][1:]

    def update(self, amap: np.ndarray, mask: np.ndarray) -> None:
        amap, mask = _check_pair(amap, mask)
        # Compare in the maps' own dtype, as `map > th` does in the papers' code.
        values = amap.ravel()
        m = mask.ravel()
        self.fp += self._above(values[~m]).astype(np.int64)
        self.n_neg += int((~m).sum())
        if m.any():
            w, n = _region_weights(mask)
            self.pro_sum += self._above(values[m], w.ravel()[m])
            self.n_regions += n

    def pro(self) -> np.ndarray:
        return (
            self.pro_sum / self.n_regions if self.n_regions else np.full_like(self.pro_sum, np.nan)
        )

    def fpr(self) -> np.ndarray:
        return self.fp / self.n_neg if self.n_neg else np.full(self.fp.shape, np.nan)

    def aupro(self, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
        if self.n_regions == 0 or self.n_neg == 0:
            return float("nan")
        return _papers_area(self.pro(), self.fpr(), fpr_limit)


# ----------------------------------------------------------------------------------------------
# Segmentation: mIoU (mmseg IoUMetric)
# ----------------------------------------------------------------------------------------------


class IoUAccumulator:
    """Per-class intersection / union summed over a dataset, as mmseg's ``IoUMetric``."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        k = self.num_classes
        self.intersect = np.zeros(k, dtype=np.int64)
        self.area_pred = np.zeros(k, dtype=np.int64)
        self.area_label = np.zeros(k, dtype=np.int64)

    def _hist(self, values: np.ndarray) -> np.ndarray:
        values = values[(values >= 0) & (values < self.num_classes)]
        return np.bincount(values, minlength=self.num_classes)[: self.num_classes]

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Add one (H, W) predicted label map and its (H, W) ground truth."""
        pred = np.asarray(pred).astype(np.int64)
        label = np.asarray(label).astype(np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
        valid = label != self.ignore_index
        p, g = pred[valid], label[valid]
        inter = self._hist(p[p == g])
        self.intersect += inter
        self.area_pred += self._hist(p)
        self.area_label += self._hist(g)

    @property
    def union(self) -> np.ndarray:
        return self.area_pred + self.area_label - self.intersect

    def iou(self) -> np.ndarray:
        """(K,) per-class IoU; NaN where the class is absent from predictions and labels."""
        u = self.union
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(u > 0, self.intersect / np.maximum(u, 1), np.nan)

    def acc(self) -> np.ndarray:
        """(K,) per-class accuracy (recall); NaN where the class has no labelled pixel."""
        a = self.area_label
        return np.where(a > 0, self.intersect / np.maximum(a, 1), np.nan)

    def metrics(self) -> dict[str, float]:
        iou = self.iou()
        total = self.area_label.sum()
        return {
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "macc": float(np.nanmean(self.acc())) if (self.area_label > 0).any() else float("nan"),
            "aacc": float(self.intersect.sum() / total) if total else float("nan"),
        }


def mean_iou(
    preds: Iterable[np.ndarray],
    labels: Iterable[np.ndarray],
    num_classes: int,
    ignore_index: int = 255,
) -> float:
    """mIoU of a dataset (per-class accumulation, NaN classes ignored)."""
    acc = IoUAccumulator(num_classes, ignore_index)
    for p, g in zip(preds, labels):
        acc.update(p, g)
    return acc.metrics()["miou"]


# ----------------------------------------------------------------------------------------------
# Referring segmentation
# ----------------------------------------------------------------------------------------------


@dataclass
class ReferAccumulator:
    """oIoU, mIoU and precision@IoU over (prediction, ground truth) pairs, one per sentence."""

    thresholds: tuple[float, ...] = (0.5, 0.7, 0.9)
    cum_i: int = 0
    cum_u: int = 0
    ious: list[float] = field(default_factory=list)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Add one sentence's (H, W) masks; returns its IoU (0 when the union is empty)."""
        p = np.asarray(pred).astype(bool)
        g = np.asarray(gt).astype(bool)
        if p.shape != g.shape:
            raise ValueError(f"prediction {p.shape} and mask {g.shape} differ in shape")
        i = int(np.logical_and(p, g).sum())
        u = int(np.logical_or(p, g).sum())
        self.cum_i += i
        self.cum_u += u
        iou = i / u if u > 0 else 0.0
        self.ious.append(iou)
        return iou

    def metrics(self) -> dict[str, float]:
        ious = np.asarray(self.ious, dtype=np.float64)
        out = {
            "oiou": self.cum_i / self.cum_u if self.cum_u else float("nan"),
            "miou": float(ious.mean()) if ious.size else float("nan"),
        }
        for t in self.thresholds:
            out[f"prec@{t:g}"] = float((ious >= t).mean()) if ious.size else float("nan")
        out["n"] = float(ious.size)
        return out


def refer_metrics(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray]) -> dict[str, float]:
    """oIoU / mIoU / prec@0.5,0.7,0.9 of paired predicted and ground-truth masks."""
    acc = ReferAccumulator()
    for p, g in zip(preds, gts):
        acc.update(p, g)
    return acc.metrics()
