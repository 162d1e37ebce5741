"""The anomaly scorers as a registry: zero-shot (Crane, Crane+), set-level (MuSc) and few-shot
(AnomalyDINO, Crane+ fused with it), behind one call.

``run(rt, ctxs, options)`` picks the scorer by the preset's ``method``; ``prepare(rt,
options)`` loads what a scorer needs before the first image (models, prompt checkpoints, and
for the few-shot scorers the memory of good references, built or loaded once per run). A new
scorer is one function pair and one :data:`SCORERS` entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from zsdense.options import AnomalyOptions
from zsdense.tasks import anomaly as zero_shot
from zsdense.tasks import fewshot
from zsdense.tasks.anomaly import AnomalyResult


@dataclass(frozen=True)
class Scorer:
    """``prepare(rt, options) -> state`` (once per run) and ``run(rt, ctxs, options, state)``."""

    prepare: Callable[[Any, AnomalyOptions], Any]
    run: Callable[[Any, Sequence, AnomalyOptions, Any], list[AnomalyResult]]
    description: str = ""


def _zero_shot_prepare(rt, opts: AnomalyOptions) -> None:
    zero_shot.load_encoders(rt, opts)


def _zero_shot_run(rt, ctxs, opts: AnomalyOptions, state) -> list[AnomalyResult]:  # noqa: ARG001
    return zero_shot.run_anomaly(rt, ctxs, opts)


def _fewshot_options(opts: AnomalyOptions) -> fewshot.FewShotOptions | None:
    """None for a bank (it brings its own settings), else the reference's per-dataset table."""
    ref = opts.reference
    if isinstance(ref, fewshot.MemoryBank) or (
        isinstance(ref, (str, Path)) and str(ref).endswith(".zsdmem")
    ):
        return None
    ov = dict(opts.overrides)
    return fewshot.options_for(
        opts.object_name, opts.dataset, model=ov.get("dino_name") or None, shots=opts.shots
    )


def _references(ref: Any) -> Any:
    """One reference argument: a single folder/glob/bank as itself, several paths as a list."""
    if isinstance(ref, tuple):
        return ref[0] if len(ref) == 1 else list(ref)
    return ref


def _bank(rt, opts: AnomalyOptions):
    """The memory of good references, built (or loaded) once per runtime and settings."""
    ref = _references(opts.reference)
    fopts = _fewshot_options(opts)
    key = (
        "fewshot-bank",
        repr(ref) if not hasattr(ref, "features") else id(ref),
        fopts,
        opts.shots,
    )
    return rt.memo(key, lambda: fewshot._as_bank(rt, ref, fopts, opts.object_name, opts.dataset))


def _fewshot_prepare(rt, opts: AnomalyOptions):
    bank, fopts = _bank(rt, opts)
    rt.dinov2(fopts.model)
    return bank, fopts


def _fewshot_run(rt, ctxs, opts: AnomalyOptions, state) -> list[AnomalyResult]:
    bank, fopts = state if state is not None else _fewshot_prepare(rt, opts)
    return fewshot.run_fewshot(
        rt,
        ctxs,
        reference=bank,
        options=fopts,
        object_name=opts.object_name,
        dataset=opts.dataset,
        threshold=opts.threshold,
        image_threshold=opts.image_threshold,
        calibrate_with=opts.calibrate_with,
        calibrate_percentile=opts.calibrate_percentile,
    )


def _fused_prepare(rt, opts: AnomalyOptions):
    state = _fewshot_prepare(rt, opts)
    zero_shot.load_encoders(rt, opts)
    return state


def _fused_run(rt, ctxs, opts: AnomalyOptions, state) -> list[AnomalyResult]:
    bank, fopts = state if state is not None else _fused_prepare(rt, opts)
    ref = _references(opts.reference)
    images = None if isinstance(ref, fewshot.MemoryBank) or str(ref).endswith(".zsdmem") else ref
    crane = {k: v for k, v in opts.overrides if k not in ("dino_name",)}
    if opts.domain != "industrial":
        crane["domain"] = opts.domain
    return fewshot.run_crane_fewshot(
        rt,
        ctxs,
        reference=bank,
        options=fopts,
        crane_preset="crane+",
        object_name=opts.object_name,
        dataset=opts.dataset,
        threshold=opts.threshold,
        image_threshold=opts.image_threshold,
        crane_options=crane or None,
        reference_images=images,
    )


SCORERS: dict[str, Scorer] = {
    "crane": Scorer(_zero_shot_prepare, _zero_shot_run, "zero-shot: CLIP E-Attn (+ DINOv2 D-Attn)"),
    "musc": Scorer(_zero_shot_prepare, _zero_shot_run, "the images of one set score each other"),
    "anomalydino": Scorer(_fewshot_prepare, _fewshot_run, "few-shot: kNN to good DINOv2 patches"),
    "crane+fewshot": Scorer(_fused_prepare, _fused_run, "Crane+ fused with few-shot scores"),
}


def scorer(opts: AnomalyOptions) -> Scorer:
    return SCORERS[opts.config().method]


def prepare(rt, opts: AnomalyOptions) -> Any:
    """Load what the scorer needs before the first image; returns its state for :func:`run`."""
    return scorer(opts).prepare(rt, opts)


def run(rt, ctxs: Sequence, opts: AnomalyOptions, state: Any = None) -> list[AnomalyResult]:
    """Anomaly results for ``ctxs`` by the preset's scorer."""
    return scorer(opts).run(rt, ctxs, opts, state)
