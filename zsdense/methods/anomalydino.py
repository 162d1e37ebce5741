"""AnomalyDINO (few-shot): each patch's distance to the good references' DINOv2 patches, as
its reference code runs it. Declares the scorer and preset ``anomalydino``; the computation is
:mod:`zsdense.tasks.fewshot`.

``--upsampler jafar[:FILE]``: the test image's patch features are upsampled to ``scale`` × the
patch grid (default 2) by the upsampler made for the DINOv2 in use, and every finer cell is
compared with the memory of good patches at the memory's own grid (a bank is the same whatever
the upsampler). The kNN search grows with scale² (the test cells); the memory does not grow.
"""

from __future__ import annotations

from zsdense.config import AnomalyPreset
from zsdense.tasks.anomaly_registry import AnomalyScorer, register_anomaly_preset, register_scorer


def fewshot_options(opts):
    """None for a bank (it brings its own settings), else the reference's per-dataset table
    for the options' object and dataset (``dino_name`` picks the model)."""
    from zsdense.tasks.fewshot.options import options_for
    from zsdense.tasks.good_images import is_bank, single

    if is_bank(single(opts.reference)):
        return None
    ov = dict(opts.overrides)
    return options_for(
        opts.object_name, opts.dataset, model=ov.get("dino_name") or None, shots=opts.shots
    )


def prepare(rt, opts):
    """The memory of good references: built from the images, or a bank loaded and checked; and
    the feature upsampler of ``--upsampler`` for the bank's DINOv2 (loaded once, here)."""
    from dataclasses import replace

    from zsdense.dense.upsamplers import load_upsampler
    from zsdense.tasks.fewshot.run import fewshot_state

    state = fewshot_state(rt, opts.reference, fewshot_options(opts), opts.object_name, opts.dataset)
    up = load_upsampler(rt, opts.upsampler, rt.dinov2(state.options.model))
    if up is None:
        return state
    return replace(state, upsampler=up, upsampler_scale=opts.upsampler_factor)


def run(rt, ctxs, opts, state):  # noqa: ARG001 - the state holds the options
    from zsdense.tasks.fewshot.run import fewshot_raw

    return fewshot_raw(rt, ctxs, state)


def encoders(cfg: AnomalyPreset) -> tuple[str, ...]:
    return (f"dinov2/{cfg.dino_name}",)


def default_threshold(rt, opts, state):  # noqa: ARG001
    from zsdense.tasks.fewshot.run import reference_default

    return reference_default(state)


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
        default_threshold=default_threshold,
        feature_upsampling=True,
    )
)
# few-shot: good reference images score each test image (AnomalyDINO as its reference runs)
register_anomaly_preset(
    AnomalyPreset(
        name="anomalydino", method="anomalydino", prompts="none", dino_name="dinov2-small"
    )
)
