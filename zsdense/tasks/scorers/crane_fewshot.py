"""Scorer ``crane+fewshot`` (ours): Crane+ and AnomalyDINO, each on the scale of the good
references' own maps, averaged (preset ``crane+fewshot``)."""

from __future__ import annotations

from zsdense.config import ANOMALY_PRESETS, AnomalyPreset
from zsdense.tasks import crane_head
from zsdense.tasks.anomaly_registry import AnomalyScorer, register_anomaly_preset, register_scorer
from zsdense.tasks.fewshot.fusion import (
    FusedState,
    crane_side_options,
    fused_default,
    fused_raw,
    fused_state,
)
from zsdense.tasks.fewshot.options import FewShotOptions
from zsdense.tasks.good_images import is_bank, single
from zsdense.tasks.scorers import anomalydino

CRANE_PRESET = "crane+"


def crane_options(opts):
    """The Crane+ side: the preset's overrides (the few-shot model's ``dino_name`` aside), the
    object and the domain."""
    given = {k: v for k, v in opts.overrides if k != "dino_name"}
    if opts.domain != "industrial":
        given["domain"] = opts.domain
    return crane_side_options(CRANE_PRESET, opts.object_name, given)


def prepare(rt, opts) -> FusedState:
    """The few-shot memory, the Crane+ models, and both methods' reference statistics (Crane+
    on the reference images, or stored in the bank): once per run and runtime."""
    few = anomalydino.prepare(rt, opts)
    ref = single(opts.reference)
    return fused_state(rt, few, crane_options(opts), None if is_bank(ref) else ref)


def run(rt, ctxs, opts, state: FusedState):  # noqa: ARG001 - the state holds the options
    return fused_raw(rt, ctxs, state)


def encoders(cfg: AnomalyPreset) -> tuple[str, ...]:  # noqa: ARG001
    return (
        *crane_head.encoders(ANOMALY_PRESETS[CRANE_PRESET]),
        f"dinov2/{FewShotOptions().model}",
    )


SCORER = register_scorer(
    AnomalyScorer(
        name="crane+fewshot",
        prepare=prepare,
        run=run,
        description="few-shot: Crane+ and AnomalyDINO, each normalised on the good references, "
        "averaged (ours)",
        references="required",
        reference_kinds=("images", "bank"),
        encoders=encoders,
        uses_prompts=True,
        default_threshold=lambda rt, opts, state: fused_default(state),
    )
)
register_anomaly_preset(ANOMALY_PRESETS["crane+fewshot"])
