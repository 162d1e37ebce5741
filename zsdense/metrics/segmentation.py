"""Segmentation metrics: mIoU as mmseg's ``IoUMetric`` and the referring metrics (oIoU, mIoU,
precision at IoU thresholds); see :mod:`zsdense.metrics`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


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
