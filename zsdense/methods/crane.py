"""Crane / Crane+ (zero-shot anomaly segmentation): CLIP E-Attn (+ DINOv2 D-Attn) maps against
normal/abnormal prompts, as the reference code ran for the published numbers.

Declares the scorer ``crane`` and its presets ``crane`` and ``crane+``; the computation is
:mod:`zsdense.tasks.crane_head` (imported when a run needs it, so ``--help`` stays light).
"""

from __future__ import annotations

from zsdense.config import AnomalyPreset
from zsdense.tasks.anomaly_registry import AnomalyScorer, register_anomaly_preset, register_scorer


def prepare(rt, opts) -> None:
    """Load CLIP (+ DINOv2) and the prompts; the text features stay in the runtime's cache."""
    from zsdense.tasks import crane_head

    crane_head.load_encoders(rt, opts)


def run(rt, ctxs, opts, state):  # noqa: ARG001 - no run state beyond the runtime's caches
    from zsdense.tasks import crane_head

    return crane_head.crane_scores(rt, opts, list(ctxs))


def encoders(cfg: AnomalyPreset) -> tuple[str, ...]:
    from zsdense.tasks import crane_head

    return crane_head.encoders(cfg)


SCORER = register_scorer(
    AnomalyScorer(
        name="crane",
        prepare=prepare,
        run=run,
        description="zero-shot: CLIP E-Attn (+ DINOv2 D-Attn) against normal/abnormal prompts",
        encoders=encoders,
        uses_prompts=True,
    )
)
register_anomaly_preset(
    AnomalyPreset(name="crane", method="crane"),
    description="Crane as run for the published numbers: ViT-L/14-336 at 518, last-block E-Attn "
    "map, learned prompts",
)
register_anomaly_preset(
    AnomalyPreset(
        name="crane+",
        method="crane",
        use_dattn=True,
        soft_mean=False,  # test.sh: MVTec/VisA/MPDD/SDD/BTAD/DTD; True with --domain medical
        checkpoint="crane+-mvtec",
        checkpoint_mvtec="crane+-visa",
        checkpoint_medical="crane+-mvtec-epoch1",
    ),
    description="Crane+: Crane plus DINOv2 D-Attn, its own learned prompts",
)
