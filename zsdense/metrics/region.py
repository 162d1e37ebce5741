"""Region metrics: 8-connected ground-truth regions and AUPRO in its two forms.

:func:`aupro_papers` (the Crane / AnomalyCLIP / APRIL-GAN code, streamed by
:class:`AuproAccumulator`) and :func:`aupro_mvtec` (the MVTec AD definition); see
:mod:`zsdense.metrics` for both protocols.
"""

from __future__ import annotations

import numpy as np

PAPERS_AUPRO_STEPS = 200
AUPRO_FPR_LIMIT = 0.3
# 8-connectivity: skimage.measure.label's default on 2-D masks, which the papers' code uses.
_EIGHT = np.ones((3, 3), dtype=bool)


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


def papers_area(pros: np.ndarray, fprs: np.ndarray, fpr_limit: float) -> float:
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
    return papers_area(pro, fpr, fpr_limit)


def pro_curve_mvtec(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO(FPR) curve of MVTec AD: one point per distinct score (prediction
    ``map >= score``), framed by (0, 0) and (1, 1)."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    weights = np.zeros(maps.shape, dtype=np.float64)
    n_regions = 0
    for i, g in enumerate(masks):
        weights[i], n = region_weights(g)
        n_regions += n
    neg = ~masks
    order = np.argsort(maps.ravel(), kind="mergesort")[::-1]
    s = maps.ravel()[order]
    fpr = np.cumsum(neg.ravel()[order], dtype=np.float64) / max(int(neg.sum()), 1)
    pro = np.cumsum(weights.ravel()[order]) / max(n_regions, 1)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    fpr, pro = np.minimum(fpr[last], 1.0), pro[last]
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
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
    return float(area_to_limit(fpr, pro, fpr_limit) / fpr_limit)


def check_pair(amap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amap = np.asarray(amap)
    mask = np.asarray(mask).astype(bool)
    if amap.shape != mask.shape or amap.ndim != 2:
        raise ValueError(f"map {amap.shape} and mask {mask.shape} must be equal 2-D shapes")
    if not np.all(np.isfinite(amap)):
        raise ValueError("anomaly map contains NaN or infinite values")
    return amap, mask


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel 1/|region| inside each 8-connected GT region (0 outside), region count."""
    lab, n = label_regions(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=np.float64), 0
    sizes = np.bincount(lab.ravel())
    w = np.zeros(sizes.shape, dtype=np.float64)
    w[1:] = 1.0 / sizes[1:]
    return w[lab], n


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
        amap, mask = check_pair(amap, mask)
        # Compare in the maps' own dtype, as `map > th` does in the papers' code.
        values = amap.ravel()
        m = mask.ravel()
        self.fp += self._above(values[~m]).astype(np.int64)
        self.n_neg += int((~m).sum())
        if m.any():
            w, n = region_weights(mask)
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
        return papers_area(self.pro(), self.fpr(), fpr_limit)
