"""Anomaly segmentation, zero-shot: Crane / Crane+ maps and scores, batch mutual scoring (MuSc).

``run_anomaly(rt, ctxs, object_name=..., preset=...)`` runs a zero-shot preset (one whose scorer
needs no reference images) through the one anomaly pipeline
(:mod:`zsdense.tasks.anomaly_methods`). Per image it returns an :class:`AnomalyResult` at the
original image size:

- ``anomaly_map`` (H, W) float32: the abnormal probability map, computed at the preset's input
  size (518), Gaussian-smoothed there (σ=4, scipy's reflect mode) and resized bilinearly
  (:mod:`zsdense.tasks.crane_head`);
- ``score``: Crane's score-based pooling (or MuSc's max-of-map score, min-max normalised over
  the set and smoothed over CLIP neighbours, :mod:`zsdense.tasks.musc`);
- ``mask = anomaly_map >= threshold``; ``label = score >= image_threshold`` (None without one).

Decisions (:mod:`zsdense.tasks.thresholds`, the same for every preset). ``threshold``: a fixed
value, else one calibrated from known-good images (``calibrate_with``: the max over their maps,
or the ``calibrate_percentile``-th percentile of their pixels), else 0.5 on the probability map
(``ANOMALY_DEFAULT_THRESHOLD``; for ``musc``, whose maps are distances, pass a threshold or
calibrate). ``image_threshold``: a fixed value, else calibrated from the good images' scores
the same way, else None (no label). Every result records the thresholds used and where they
came from in ``meta``.
"""

from __future__ import annotations

from typing import Any, Sequence

from zsdense.errors import ConfigError
from zsdense.options import AnomalyOptions, parse_layers, resolve_anomaly_preset
from zsdense.tasks import anomaly_methods
from zsdense.tasks.anomaly_result import AnomalyResult
from zsdense.tasks.common import model_input, resize_map
from zsdense.tasks.crane_head import (
    choose_checkpoint,
    crane_model_maps,
    load_encoders,
    text_features,
)
from zsdense.tasks.thresholds import calibrate_threshold

__all__ = [
    "AnomalyResult",
    "calibrate_threshold",
    "choose_checkpoint",
    "crane_model_maps",
    "load_encoders",
    "model_input",
    "parse_layers",
    "resize_map",
    "resolve_preset",
    "run_anomaly",
    "text_features",
]

resolve_preset = resolve_anomaly_preset


def run_anomaly(
    rt, ctxs: Sequence, options: AnomalyOptions | None = None, /, **kwargs: Any
) -> list[AnomalyResult]:
    """Anomaly results of a zero-shot preset for ``ctxs`` (see the module docstring).

    ``options``: an :class:`~zsdense.options.AnomalyOptions`, or keyword arguments mapped onto
    one: ``preset``, ``object_name``, ``domain`` (industrial | medical: the medical fusion order
    and checkpoint), ``dataset`` (``"mvtec"`` selects the VisA-trained prompts as the papers do),
    ``threshold``, ``image_threshold``, ``calibrate_with``, ``calibrate_percentile``,
    ``batch_size``, ``keep_model_map`` (attach the smoothed map at the input size), and any
    :class:`~zsdense.config.AnomalyPreset` field (``attn_type``, ``eattn_layers`` e.g.
    ``"6,12,18,24"``, ``dattn_mean``, ``soft_mean``, ``sigma``, ``prompts``...). Presets that
    score against good references run through :func:`zsdense.tasks.anomaly_methods.run`.
    """
    if options is None:
        options = AnomalyOptions.from_mapping(kwargs)
    elif kwargs:
        raise ConfigError("give an AnomalyOptions or keyword options, not both")
    cfg = options.config()
    if anomaly_methods.scorer(options).references == "required":
        raise ConfigError(
            f"preset {options.preset!r} ({cfg.method}) is not a zero-shot method: run it through "
            "Segmenter.anomaly or zsdense.tasks.anomaly_methods.run"
        )
    return anomaly_methods.run(rt, list(ctxs), options)
