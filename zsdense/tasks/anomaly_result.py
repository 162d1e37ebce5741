"""One image's anomaly result: the scorer's raw map and score plus the decision made on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zsdense.io.instances import instance_masks, mask_instances, to_supervision
from zsdense.io.writers import write_result
from zsdense.options import OutputOptions
from zsdense.tasks.anomaly_registry import RawScore
from zsdense.tasks.thresholds import Thresholds, decide, decision_note


@dataclass
class AnomalyResult:
    """One image's anomaly output, at the original image size (numpy, JSON-able meta)."""

    score: float
    anomaly_map: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) bool
    label: bool | None
    threshold: float
    image_threshold: float | None
    meta: dict = field(default_factory=dict)
    model_map: np.ndarray | None = field(default=None, repr=False)  # (S, S) smoothed, at input size

    @classmethod
    def from_raw(
        cls,
        raw: RawScore,
        thresholds: Thresholds,
        base_meta: dict | None = None,
        *,
        keep_model_map: bool = False,
    ) -> AnomalyResult:
        """The result of deciding ``raw`` with ``thresholds`` (:func:`~zsdense.tasks.thresholds
        .decide`); ``meta`` = ``base_meta`` (the runtime's), the scorer's, then the thresholds
        used and where they came from (and a note where label and mask disagree)."""
        amap = np.asarray(raw.anomaly_map, dtype=np.float32)
        mask, label = decide(amap, float(raw.score), thresholds)
        meta = {**(base_meta or {}), **raw.meta, **thresholds.meta()}
        note = decision_note(mask, label)
        if note:
            meta["decision_note"] = note
        model_map = raw.model_map if keep_model_map else None
        return cls(
            score=float(raw.score),
            anomaly_map=amap,
            mask=mask,
            label=label,
            threshold=thresholds.pixel,
            image_threshold=thresholds.image,
            meta=meta,
            model_map=None if model_map is None else np.asarray(model_map),
        )

    def write(
        self, stem, image: np.ndarray, out: OutputOptions, params: dict | None = None
    ) -> dict:
        """Mask, float map and overlay next to ``stem``; the scores and decisions for the
        manifest (the thresholds used and where they came from, the defect area)."""
        caption = f"anomaly score {float(self.score):.3f}"
        amap = self.anomaly_map
        outputs = write_result(
            stem, image, out, self.meta, mask=self.mask, float_map=amap, heat=amap, caption=caption
        )
        scores: dict[str, Any] = {"score": float(self.score)}
        if self.label is not None:
            scores["label"] = bool(self.label)
        scores["threshold"] = float(self.threshold)
        scores["threshold_source"] = self.meta.get("threshold_source")
        scores["image_threshold"] = self.image_threshold
        scores["label"] = self.label
        scores["defect_area"] = round(float(self.mask.mean()), 6) if self.mask.size else 0.0
        return {
            "outputs": outputs,
            "scores": scores,
            "meta": dict(self.meta),
            "instances": self.instances,
        }

    @property
    def instances(self) -> list[dict]:
        """The defects: connected components of the mask with box, area and the max / mean of
        the anomaly map over each (:func:`zsdense.io.instances.mask_instances`)."""
        return mask_instances(self.mask, self.anomaly_map)

    def to_supervision(self):
        """The defects as ``supervision.Detections`` (class "anomaly", confidence = the max of
        the map over the defect); needs ``pip install 'zsdense[supervision]'``."""
        insts = self.instances
        return to_supervision(
            insts, instance_masks(self.mask, insts), self.mask.shape, class_names=("anomaly",)
        )


__all__ = ["AnomalyResult"]
