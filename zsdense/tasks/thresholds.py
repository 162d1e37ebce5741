"""Anomaly decisions: which thresholds apply, where they came from, and the mask and label.

Every anomaly preset decides the same way, here and only here (scorers return raw maps and
scores, never masks):

1. an explicit value (``--threshold`` / ``--image-threshold``): source ``"fixed"``;
2. else a calibration on known-good images (``--calibrate-with``), scored by the same scorer
   with the same settings: the max of their maps / scores, or the ``--calibrate-percentile``-th
   percentile (source ``"calibrated"``);
3. else the preset's own default, which its scorer declares (``"default"`` 0.5 on a probability
   map; AnomalyDINO's largest leave-one-out distance among its references, ``"references"``;
   1.0 on the ``crane+fewshot`` fused scale). The image threshold has no default: no label.

The result is a :class:`Thresholds` record, small and JSON-serialisable
(:meth:`Thresholds.to_dict` / :meth:`Thresholds.from_dict`), and :func:`decide` is the pure
function ``(map, score, thresholds) -> (mask, label)``: a later ``zsdense decide OUT
--threshold X`` re-derives masks from saved maps with exactly the function a run used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from zsdense.config import ANOMALY_DEFAULT_THRESHOLD
from zsdense.errors import ConfigError

SOURCES = ("fixed", "calibrated", "references", "bank", "default")


@dataclass(frozen=True)
class Thresholds:
    """The decision rule of a run: mask = map >= ``pixel``; label = score >= ``image``.

    ``pixel_source`` / ``image_source`` say where each value came from (:data:`SOURCES`;
    ``image_source`` is None when there is no image threshold). ``calibration`` holds
    ``{"n_images", "rule"}`` when known-good images were used; ``note`` explains a default that
    is not meaningful for the map's units.
    """

    pixel: float
    pixel_source: str = "default"
    image: float | None = None
    image_source: str | None = None
    calibration: dict | None = None
    note: str | None = None

    def meta(self) -> dict:
        """The fields every result's ``meta`` (and so each manifest line) carries."""
        out: dict[str, Any] = {
            "threshold": self.pixel,
            "threshold_source": self.pixel_source,
            "image_threshold": self.image,
            "image_threshold_source": self.image_source,
        }
        if self.calibration is not None:
            out["calibration"] = dict(self.calibration)
        if self.note:
            out["threshold_note"] = self.note
        return out

    def to_dict(self) -> dict:
        """JSON-able record (what a thresholds file or a bank would store)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Thresholds:
        """The record back from :meth:`to_dict` (unknown keys are a ConfigError)."""
        names = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - names)
        if bad:
            raise ConfigError(f"unknown threshold field(s) {', '.join(bad)}")
        if "pixel" not in d:
            raise ConfigError("a thresholds record needs a 'pixel' threshold")
        t = cls(**d)
        image = None if t.image is None else float(t.image)
        return replace(t, pixel=float(t.pixel), image=image)


def decide(
    anomaly_map: np.ndarray, score: float, thresholds: Thresholds
) -> tuple[np.ndarray, bool | None]:
    """(mask = map >= pixel threshold, label = score >= image threshold or None)."""
    mask = np.asarray(anomaly_map) >= thresholds.pixel
    label = None if thresholds.image is None else bool(score >= thresholds.image)
    return mask, label


def decision_note(mask: np.ndarray, label: bool | None) -> str | None:
    """A note when the image label and the mask disagree (labelled anomalous with an empty
    mask, or a non-empty mask on an image labelled normal): the image score and the map are
    different quantities (e.g. AnomalyDINO scores the unsmoothed patch distances, its map is
    smoothed), so each threshold decides its own output."""
    if label is None:
        return None
    has = bool(np.any(mask))
    if label and not has:
        return (
            "image score >= image threshold but no pixel reaches the pixel threshold: the score "
            "and the map are different quantities, each decided by its own threshold"
        )
    if has and not label:
        return (
            "pixels reach the pixel threshold but the image score is below the image threshold: "
            "the score and the map are different quantities, each decided by its own threshold"
        )
    return None


def calibrate_threshold(values: Sequence[np.ndarray], percentile: float | None = None) -> float:
    """Max of known-good values (maps or scores), or their ``percentile``-th percentile."""
    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])
    if flat.size == 0:
        raise ConfigError("calibration needs at least one known-good image")
    if percentile is None:
        return float(flat.max())
    if not 0.0 <= float(percentile) <= 100.0:
        raise ConfigError(f"--calibrate-percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(flat, float(percentile)))


def calibration_rule(percentile: float | None) -> str:
    return "max" if percentile is None else f"percentile {percentile}"


@dataclass(frozen=True)
class Default:
    """A preset's default pixel threshold, where it came from, and an optional note."""

    value: float = ANOMALY_DEFAULT_THRESHOLD
    source: str = "default"
    note: str | None = None


def resolve_thresholds(
    *,
    threshold: float | None = None,
    image_threshold: float | None = None,
    calibrate: Callable[[], tuple[list, list]] | None = None,
    percentile: float | None = None,
    default: Callable[[], Default] | None = None,
) -> Thresholds:
    """The thresholds of a run (module docstring): fixed values win, then ``calibrate()``
    (called only when a value is missing; returns the good images' (maps, scores)), then
    ``default()`` for the pixel threshold (0.5 when None)."""
    thr, thr_src = threshold, "fixed" if threshold is not None else None
    ithr, ithr_src = image_threshold, "fixed" if image_threshold is not None else None
    calibration = None
    if calibrate is not None and (thr is None or ithr is None):
        maps, scores = calibrate()
        calibration = {"n_images": len(maps), "rule": calibration_rule(percentile)}
        if thr is None:
            thr, thr_src = calibrate_threshold(maps, percentile), "calibrated"
        if ithr is None:
            ithr = calibrate_threshold([np.array([s]) for s in scores], percentile)
            ithr_src = "calibrated"
    note = None
    if thr is None:
        d = default() if default is not None else Default()
        thr, thr_src, note = d.value, d.source, d.note
    return Thresholds(
        pixel=float(thr),
        pixel_source=str(thr_src),
        image=None if ithr is None else float(ithr),
        image_source=ithr_src,
        calibration=calibration,
        note=note,
    )


__all__ = [
    "SOURCES",
    "Default",
    "Thresholds",
    "calibrate_threshold",
    "calibration_rule",
    "decide",
    "decision_note",
    "resolve_thresholds",
]
