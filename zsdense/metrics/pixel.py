"""Pixel metrics over a category's maps: exact in memory (:func:`pixel_metrics`) or streamed
in bins (:class:`PixelAccumulator`, with :class:`RangeTracker` for a first pass)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zsdense.config import PIXEL_METRIC_BINS
from zsdense.metrics.image import (
    ap_counts,
    auroc_counts,
    counts_exact,
    counts_hist,
    f1_argmax_counts,
    f1max_counts,
)
from zsdense.metrics.region import (
    AUPRO_FPR_LIMIT,
    area_to_limit,
    aupro_mvtec,
    aupro_papers,
    check_pair,
    region_weights,
)

DEFAULT_BINS = PIXEL_METRIC_BINS


def pixel_metrics(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """Exact (in-memory) pixel AUROC, AP, F1-max and both AUPRO forms over a stack of maps.

    ``maps``: (N, H, W) float, ``masks``: (N, H, W) bool ground truth.
    """
    maps = np.asarray(maps)
    masks = np.asarray(masks).astype(bool)
    tps, fps = counts_exact(masks, maps)
    return {
        "pixel_auroc": auroc_counts(tps, fps),
        "pixel_ap": ap_counts(tps, fps),
        "pixel_f1_max": f1max_counts(tps, fps),
        "aupro": aupro_papers(masks, maps),
        "aupro_mvtec": aupro_mvtec(masks, maps),
    }


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
        amap, mask = check_pair(amap, mask)
        idx = self._bin(amap.ravel())
        m = mask.ravel()
        self.pos += np.bincount(idx[m], minlength=self.bins)
        self.neg += np.bincount(idx[~m], minlength=self.bins)
        if m.any():
            w, n = region_weights(mask)
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
        return counts_hist(self.pos, self.neg)

    def auroc(self) -> float:
        return auroc_counts(*self._counts())

    def ap(self) -> float:
        return ap_counts(*self._counts())

    def f1_max(self) -> float:
        return f1max_counts(*self._counts())

    def _edges_desc(self) -> np.ndarray:
        """Lower edge of every non-empty bin, highest first (the thresholds of the counts)."""
        lo, hi = self.value_range
        edges = lo + np.arange(self.bins, dtype=np.float64) * ((hi - lo) / self.bins)
        keep = (self.pos + self.neg) > 0
        return edges[::-1][keep[::-1]]

    def f1_max_threshold(self) -> tuple[float, float | None]:
        """(F1-max of the binned scores, its threshold): the lower edge of the bin where it is
        reached, so ``map >= threshold`` predicts that bin and every one above."""
        f1, i = f1_argmax_counts(*self._counts())
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
        points = self._pro_points()
        if points is not None:
            out["pro_fpr"], out["pro"] = points
        return out

    def _pro_points(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(FPR, PRO) per non-empty bin, highest threshold first; None without a region or
        a negative pixel."""
        n_neg = int(self.neg.sum())
        if self.n_regions == 0 or n_neg == 0:
            return None
        keep = ((self.pos + self.neg) > 0)[::-1]
        fpr = np.minimum((np.cumsum(self.neg[::-1]) / n_neg)[keep], 1.0)
        return fpr, (np.cumsum(self.pro[::-1]) / self.n_regions)[keep]

    def aupro_mvtec(self, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
        """MVTec AUPRO of the bin-quantised scores (thresholds at the bin edges)."""
        points = self._pro_points()
        if points is None:
            return float("nan")
        fpr = np.r_[0.0, points[0], 1.0]
        pro = np.r_[0.0, points[1], 1.0]
        return float(area_to_limit(fpr, pro, fpr_limit) / fpr_limit)

    def metrics(self) -> dict[str, float]:
        tps, fps = self._counts()
        return {
            "pixel_auroc": auroc_counts(tps, fps),
            "pixel_ap": ap_counts(tps, fps),
            "pixel_f1_max": f1max_counts(tps, fps),
            "aupro_mvtec": self.aupro_mvtec(),
        }
