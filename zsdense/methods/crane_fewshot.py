"""Crane+ fused with AnomalyDINO (ours, few-shot): each map put on the scale of the good
references' own maps, averaged. Declares the scorer and preset ``crane+fewshot``; the
computation is :mod:`zsdense.tasks.fewshot.fusion`.
"""

from __future__ import annotations

from zsdense.config import ANOMALY_PRESETS, AnomalyPreset
from zsdense.methods import anomalydino
from zsdense.tasks.anomaly_registry import AnomalyScorer, register_anomaly_preset, register_scorer

CRANE_PRESET = "crane+"


def crane_options(opts):
    """The Crane+ side: the preset's overrides (the few-shot model's ``dino_name`` aside), the
    object and the domain."""
    from zsdense.tasks.fewshot.fusion import crane_side_options

    given = {k: v for k, v in opts.overrides if k != "dino_name"}
    if opts.domain != "industrial":
        given["domain"] = opts.domain
    return crane_side_options(CRANE_PRESET, opts.object_name, given)


def prepare(rt, opts):
    """The few-shot memory, the Crane+ models, and both methods' reference statistics (Crane+
    on the reference images, or stored in the bank): once per run and runtime."""
    from zsdense.tasks.fewshot.fusion import fused_state
    from zsdense.tasks.good_images import is_bank, single

    few = anomalydino.prepare(rt, opts)
    ref = single(opts.reference)
    return fused_state(rt, few, crane_options(opts), None if is_bank(ref) else ref)


def run(rt, ctxs, opts, state):  # noqa: ARG001 - the state holds the options
    from zsdense.tasks.fewshot.fusion import fused_raw

    return fused_raw(rt, ctxs, state)


def encoders(cfg: AnomalyPreset) -> tuple[str, ...]:  # noqa: ARG001
    from zsdense.tasks import crane_head
    from zsdense.tasks.fewshot.options import FewShotOptions

    return (
        *crane_head.encoders(ANOMALY_PRESETS[CRANE_PRESET]),
        f"dinov2/{FewShotOptions().model}",
    )


def default_threshold(rt, opts, state):  # noqa: ARG001
    from zsdense.tasks.fewshot.fusion import fused_default

    return fused_default(state)


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
        default_threshold=default_threshold,
    )
)
# our fusion: Crane+ and AnomalyDINO, each normalised on the good references
register_anomaly_preset(
    AnomalyPreset(
        name="crane+fewshot",
        method="crane+fewshot",
        use_dattn=True,
        soft_mean=False,
        checkpoint="crane+-mvtec",
        checkpoint_mvtec="crane+-visa",
        checkpoint_medical="crane+-mvtec-epoch1",
    )
)
