"""Scorer ``anomalydino``: few-shot, each patch's distance to the good references' DINOv2
patches (AnomalyDINO as its reference code runs it; preset ``anomalydino``)."""

from __future__ import annotations

from zsdense.config import ANOMALY_PRESETS, AnomalyPreset
from zsdense.tasks.anomaly_registry import AnomalyScorer, register_anomaly_preset, register_scorer
from zsdense.tasks.fewshot.options import FewShotOptions, options_for
from zsdense.tasks.fewshot.run import FewShotState, fewshot_raw, fewshot_state, reference_default
from zsdense.tasks.good_images import is_bank, single


def fewshot_options(opts) -> FewShotOptions | None:
    """None for a bank (it brings its own settings), else the reference's per-dataset table
    for the options' object and dataset (``dino_name`` picks the model)."""
    if is_bank(single(opts.reference)):
        return None
    ov = dict(opts.overrides)
    return options_for(
        opts.object_name, opts.dataset, model=ov.get("dino_name") or None, shots=opts.shots
    )


def prepare(rt, opts) -> FewShotState:
    """The memory of good references: built from the images, or a bank loaded and checked."""
    return fewshot_state(rt, opts.reference, fewshot_options(opts), opts.object_name, opts.dataset)


def run(rt, ctxs, opts, state: FewShotState):  # noqa: ARG001 - the state holds the options
    return fewshot_raw(rt, ctxs, state)


def encoders(cfg: AnomalyPreset) -> tuple[str, ...]:
    return (f"dinov2/{cfg.dino_name}",)


SCORER = register_scorer(
    AnomalyScorer(
        name="anomalydino",
        prepare=prepare,
        run=run,
        description="few-shot: nearest-neighbour distance of each DINOv2 patch to the good "
        "images' patches (AnomalyDINO)",
        references="required",
        reference_kinds=("images", "bank"),
        encoders=encoders,
        default_threshold=lambda rt, opts, state: reference_default(state),
    )
)
register_anomaly_preset(ANOMALY_PRESETS["anomalydino"])
