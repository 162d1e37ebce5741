"""Scorer ``crane``: zero-shot Crane / Crane+ (presets ``crane``, ``crane+``)."""

from __future__ import annotations

from zsdense.config import ANOMALY_PRESETS
from zsdense.tasks import crane_head
from zsdense.tasks.anomaly_registry import AnomalyScorer, register_anomaly_preset, register_scorer


def prepare(rt, opts) -> None:
    """Load CLIP (+ DINOv2) and the prompts; the text features stay in the runtime's cache."""
    crane_head.load_encoders(rt, opts)


def run(rt, ctxs, opts, state):  # noqa: ARG001 - no run state beyond the runtime's caches
    return crane_head.crane_scores(rt, opts, list(ctxs))


SCORER = register_scorer(
    AnomalyScorer(
        name="crane",
        prepare=prepare,
        run=run,
        description="zero-shot: CLIP E-Attn (+ DINOv2 D-Attn) against normal/abnormal prompts",
        encoders=crane_head.encoders,
        uses_prompts=True,
    )
)
register_anomaly_preset(ANOMALY_PRESETS["crane"])
register_anomaly_preset(ANOMALY_PRESETS["crane+"])
