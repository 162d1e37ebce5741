"""MuSc (zero-shot, set-level): the images of one set score each other, exactly as MuSc's
reference code runs it. Declares the scorer ``musc`` and its presets ``musc`` (as run: erf GELU
at 518 px) and ``musc-fixed`` (OpenAI's QuickGELU); the computation is :mod:`zsdense.tasks.musc`.
"""

from __future__ import annotations

from zsdense.config import AnomalyPreset
from zsdense.tasks.anomaly_registry import (
    AnomalyScorer,
    RawScore,
    register_anomaly_preset,
    register_scorer,
)
from zsdense.tasks.thresholds import Default

DEFAULT_NOTE = (
    "musc maps are patch distances, not probabilities: pass --threshold or --calibrate-with "
    "for a meaningful mask"
)


def _backbones(cfg: AnomalyPreset) -> tuple[str, str | None]:
    from zsdense.dense.musc_backbones import resolve_backbone

    return cfg.clip_arch, resolve_backbone(cfg.musc_backbone)[1]


def prepare(rt, opts) -> None:
    """Load CLIP (its class token ranks the images) and the DINOv2 backbone if one is used."""
    clip_arch, dino_name = _backbones(opts.config())
    rt.clip(clip_arch)
    if dino_name is not None:
        rt.dinov2(dino_name)


def run(rt, ctxs, opts, state) -> list[RawScore]:  # noqa: ARG001
    from zsdense.tasks.common import preset_meta, resize_map
    from zsdense.tasks.musc import run_musc

    cfg = opts.config()
    maps, scores, info = run_musc(rt, cfg, list(ctxs), dataset=opts.dataset)
    meta = {"musc": info, **preset_meta(cfg, opts.domain)}
    return [
        RawScore(resize_map(m, c.size), float(s), dict(meta), m.numpy())
        for c, m, s in zip(ctxs, maps, scores)
    ]


def encoders(cfg: AnomalyPreset) -> tuple[str, ...]:
    clip_arch, dino_name = _backbones(cfg)
    return (f"clip/{clip_arch}",) + ((f"dinov2/{dino_name}",) if dino_name else ())


def min_images(cfg: AnomalyPreset) -> int:
    from zsdense.tasks.musc import min_images as msm_min

    return max(int(cfg.musc_min_images), msm_min(cfg.musc_topmin))


SCORER = register_scorer(
    AnomalyScorer(
        name="musc",
        prepare=prepare,
        run=run,
        description="the images of one set score each other (MuSc, >= 5 images)",
        group="all",
        min_images=min_images,
        encoders=encoders,
        default_threshold=lambda rt, opts, state: Default(note=DEFAULT_NOTE),
    )
)
# MuSc as its reference runs it: no smoothing; at 518 px CLIP runs with erf GELU
register_anomaly_preset(
    AnomalyPreset(name="musc", method="musc", prompts="none", sigma=0.0),
    description="MuSc as its reference runs it (no smoothing; erf GELU at 518 px)",
)
# the same with OpenAI's own QuickGELU (what the weights were trained with)
register_anomaly_preset(
    AnomalyPreset(
        name="musc-fixed", method="musc", prompts="none", sigma=0.0, musc_act="quick_gelu"
    ),
    description="musc with CLIP's own QuickGELU (what OpenAI's weights were trained with)",
)
