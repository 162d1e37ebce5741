"""AnomalyDINO over image contexts: the run state (the memory and its options), raw maps and
scores, the references' default threshold, and :func:`run_fewshot` (results with decisions)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from zsdense.errors import ConfigError
from zsdense.io.membank import MemoryBank
from zsdense.tasks.anomaly_registry import RawScore
from zsdense.tasks.anomaly_result import AnomalyResult
from zsdense.tasks.fewshot.bank import check_bank, load_reference_bank
from zsdense.tasks.fewshot.options import FewShotOptions
from zsdense.tasks.fewshot.scoring import reference_maps, score_contexts
from zsdense.tasks.good_images import calibration_values, memo, single, source_key
from zsdense.tasks.thresholds import Default, calibrate_threshold, resolve_thresholds

SCORE_RULE = (
    "mean of the top 1% of the unsmoothed patch distances (AnomalyDINO); the map is smoothed "
    "(sigma 4), so the score may exceed the map's maximum"
)


@dataclass
class FewShotState:
    """What a few-shot run computes once: the memory of good references and its options, and
    the feature upsampler of ``--upsampler`` with its scale (None: bilinear, the reference)."""

    bank: MemoryBank
    options: FewShotOptions
    upsampler: Any = None  # zsdense.dense.upsamplers.LoadedUpsampler
    upsampler_scale: int = 1


def fewshot_state(
    rt,
    reference: Any,
    options: FewShotOptions | None = None,
    object_name: str | None = None,
    dataset: str | None = None,
) -> FewShotState:
    """The memory from good images (built) or a bank (loaded, ``shots`` applied), checked
    against the runtime's DINOv2 and the options (ConfigError for a bank made otherwise).
    Memoised per runtime, references and options: every preset and call that scores against
    the same good images shares one memory."""
    reference = single(reference)
    keep: list = []
    key = ("fewshot-memory", source_key(reference, keep), options, object_name, dataset)

    def compute() -> FewShotState:
        bank, opts = load_reference_bank(rt, reference, options, object_name, dataset)
        opts = opts.validate()
        check_bank(bank, opts, rt.dinov2(opts.model))
        return FewShotState(bank, opts)

    return memo(rt, key, keep, compute)


def upsampler_meta(state: FewShotState) -> dict:
    """What a result records about the feature upsampling: ``{"upsampler": "bilinear"}``, or
    the loaded upsampler's record with its scale and what the two sides are compared at."""
    if state.upsampler is None:
        return {"upsampler": "bilinear"}
    return {
        **state.upsampler.record,
        "scale": int(state.upsampler_scale),
        "compared": "test features upsampled to scale x the patch grid; the memory at its grid",
    }


def fewshot_meta(state: FewShotState, grid, kept: int, feature_grid=None) -> dict:
    opts = state.options
    extra = {} if feature_grid is None else {"feature_grid": list(feature_grid)}
    return {
        "preset": "anomalydino",
        "method": "fewshot",
        "upsampler": upsampler_meta(state),
        "fewshot": {
            **{k: v for k, v in asdict(opts).items() if k != "rot_angles"},
            "rot_angles": list(opts.angles()),
            "n_shots": state.bank.n_shots,
            "memory_rows": state.bank.n_rows,
            "grid": list(grid),
            **extra,
            "kept_patches": int(kept),
            "score_rule": SCORE_RULE,
        },
    }


def fewshot_raw(rt, ctxs: Sequence, state: FewShotState) -> list[RawScore]:
    """Raw few-shot maps (1 − cos distances, smoothed, at each image's size) and scores."""
    dino = rt.dinov2(state.options.model)
    up, scale = state.upsampler, int(state.upsampler_scale)
    with rt.autocast():
        scored = score_contexts(dino, state.bank, list(ctxs), state.options, up, scale)
    return [
        RawScore(
            r.anomaly_map.astype(np.float32),
            float(r.score),
            fewshot_meta(
                state,
                r.grid,
                r.mask.sum(),
                None if up is None else (r.grid[0] // scale, r.grid[1] // scale),
            ),
        )
        for r in scored
    ]


def reference_default(state: FewShotState) -> Default:
    """The default pixel threshold: the largest leave-one-out distance among the references
    (source ``"references"``), else 0.5 with a note (one reference without rotations)."""
    try:
        refs = reference_maps(state.bank, state.options)
    except ConfigError as exc:
        return Default(
            note=(
                f"few-shot maps are 1 - cos distances, not probabilities, and {exc}: pass "
                "--threshold or --calibrate-with for a meaningful mask"
            )
        )
    return Default(calibrate_threshold([m for m, _ in refs]), "references")


def run_fewshot(
    rt,
    ctxs: Sequence,
    *,
    reference: Any,
    options: FewShotOptions | None = None,
    object_name: str | None = None,
    dataset: str | None = None,
    threshold: float | None = None,
    image_threshold: float | None = None,
    calibrate_with: Any = None,
    calibrate_percentile: float | None = None,
) -> list[AnomalyResult]:
    """Few-shot (AnomalyDINO) results for ``ctxs`` against ``reference``.

    ``reference``: good images (folder, glob, paths, arrays), a ``.zsdmem`` path or a
    :class:`MemoryBank`. ``options``: :class:`FewShotOptions` (default: :func:`options_for`
    ``(object_name, dataset)`` for images, the bank's own settings for a bank; a bank built
    with other settings or another model is refused).

    Decisions as every preset (:mod:`zsdense.tasks.thresholds`): ``threshold`` fixed, else
    calibrated from ``calibrate_with`` good images (max of their maps or a percentile), else
    the max of the references' leave-one-out maps (source ``"references"``), else 0.5 with a
    note. ``image_threshold`` likewise from scores (no default: label None). The map is
    ``1 − cos`` distance (``L2_normalized``), not a probability.
    """
    ctxs = rt.contexts(list(ctxs))
    if not ctxs:
        return []
    state = fewshot_state(rt, reference, options, object_name, dataset)
    return decided_results(
        rt,
        lambda cs: fewshot_raw(rt, cs, state),
        ctxs,
        default=lambda: reference_default(state),
        threshold=threshold,
        image_threshold=image_threshold,
        calibrate_with=calibrate_with,
        calibrate_percentile=calibrate_percentile,
    )


def decided_results(
    rt,
    score,
    ctxs: list,
    *,
    default,
    threshold: float | None,
    image_threshold: float | None,
    calibrate_with: Any,
    calibrate_percentile: float | None,
) -> list[AnomalyResult]:
    """``score(ctxs)``'s raw results decided as every preset decides
    (:func:`~zsdense.tasks.thresholds.resolve_thresholds`): fixed values, else calibrated on
    ``calibrate_with`` scored by the same ``score``, else ``default()``."""
    raws = score(ctxs)
    calibrate = None
    if calibrate_with is not None:

        def calibrate():
            return calibration_values(rt, calibrate_with, score)

    th = resolve_thresholds(
        threshold=threshold,
        image_threshold=image_threshold,
        calibrate=calibrate,
        percentile=calibrate_percentile,
        default=default,
    )
    return [AnomalyResult.from_raw(r, th, rt.result_meta()) for r in raws]


__all__ = [
    "FewShotState",
    "fewshot_raw",
    "fewshot_state",
    "reference_default",
    "run_fewshot",
]
