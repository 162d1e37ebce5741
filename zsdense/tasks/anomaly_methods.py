"""The anomaly head behind one call, for every registered scorer.

``prepare(rt, options)`` runs once per run (the engine calls it at setup, before the first
input): the scorer's own preparation (models, prompts, the memory of good references, their
statistics) and the thresholds of the run (fixed, calibrated on known-good images by the same
scorer with the same settings, or the preset's default). Both are memoised on the runtime
(:meth:`~zsdense.runtime.Runtime.memo`), so a run with many batches and a Python loop calling
``Segmenter.anomaly`` again and again do this work once. ``run(rt, ctxs, options)`` then asks
the scorer for raw maps and scores and decides masks and labels
(:mod:`zsdense.tasks.thresholds`).

Scorers and presets are registered in :mod:`zsdense.tasks.anomaly_registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

from zsdense.dense.upsamplers import BILINEAR
from zsdense.errors import ConfigError
from zsdense.options import AnomalyOptions
from zsdense.tasks.anomaly_registry import (
    AnomalyScorer,
    get_scorer,
    presets_needing_references,
    presets_with_feature_upsampling,
)
from zsdense.tasks.anomaly_result import AnomalyResult
from zsdense.tasks.good_images import calibration_values, is_bank, memo, source_key
from zsdense.tasks.thresholds import Thresholds, resolve_thresholds
from zsdense.tasks.tiling import tiled

# option fields that change the decisions only (not what a scorer prepares)
DECISION_FIELDS = ("threshold", "image_threshold", "calibrate_with", "calibrate_percentile")
# option fields that change neither (what is attached to a result)
RESULT_FIELDS = ("keep_model_map",)


@dataclass
class Prepared:
    """A run's scorer, its prepared state and the thresholds it decides with."""

    scorer: AnomalyScorer
    state: Any
    thresholds: Thresholds


def scorer(opts: AnomalyOptions) -> AnomalyScorer:
    """The scorer of the options' preset (run on tiles with ``opts.tile``:
    :func:`zsdense.tasks.tiling.tiled`)."""
    sc = get_scorer(opts.config().method)
    return sc if opts.tile is None else tiled(sc, opts)


def check_options(opts: AnomalyOptions) -> AnomalyScorer:
    """The preset's scorer, after checking the options against its declarations: good
    reference images required, optional or not taken, and of a kind it takes (images, a
    memory bank), and ``--upsampler`` only for a scorer that declares feature upsampling.
    Every face calls it before the first input (through :func:`prepare` or the engine's task
    spec)."""
    sc = scorer(opts)
    if opts.upsampler != BILINEAR and not sc.feature_upsampling:
        raise ConfigError(
            f"--upsampler {opts.upsampler}: preset {opts.preset} does not score dense encoder "
            f"features that an upsampler could refine; presets that take one: "
            f"{', '.join(presets_with_feature_upsampling()) or 'none'} (or --upsampler bilinear)"
        )
    if sc.references == "required" and opts.reference is None:
        raise ConfigError(
            f"--preset {opts.preset} scores images against good reference images: "
            "give --reference GOOD_DIR (or a .zsdmem bank from `zsdense memory build`)"
        )
    if sc.references == "none" and opts.reference is not None:
        raise ConfigError(
            f"--reference needs a few-shot preset ({', '.join(presets_needing_references())})"
            f"; {opts.preset!r} does not use reference images"
        )
    if opts.reference is not None:
        refs = opts.reference if isinstance(opts.reference, tuple) else (opts.reference,)
        banks = [r for r in refs if is_bank(r)]
        if banks and "bank" not in sc.reference_kinds:
            raise ConfigError(f"--preset {opts.preset} does not take a memory bank as --reference")
        if banks and len(refs) > 1:
            raise ConfigError("--reference: give one memory bank, or good images, not both")
        if len(banks) < len(refs) and "images" not in sc.reference_kinds:
            raise ConfigError(
                f"--preset {opts.preset} takes a memory bank (.zsdmem) as --reference"
            )
    return sc


def _options_key(opts: AnomalyOptions, keep: list, drop: Sequence[str]) -> tuple:
    return tuple(
        (f.name, source_key(getattr(opts, f.name), keep))
        for f in fields(opts)
        if f.name not in drop
    )


def min_images(opts: AnomalyOptions) -> int:
    """Images one call of the preset's scorer needs (a set for ``group="all"`` scorers)."""
    sc = scorer(opts)
    return int(sc.min_images(opts.config())) if sc.group == "all" else 1


def check_set_size(opts: AnomalyOptions, n: int, what: str = "DATA") -> None:
    """ConfigError when a set-level scorer is given fewer images than it needs."""
    need = min_images(opts)
    if 0 < n < need:
        raise ConfigError(
            f"preset {opts.preset} scores the images against each other and needs at least "
            f"{need} images of one product (one category); {what} has {n}. Give more images "
            "(a folder of one product) or use --preset crane or crane+"
        )


def _state(rt, opts: AnomalyOptions, sc: AnomalyScorer) -> Any:
    keep: list = []
    key = ("anomaly-state", sc.name, _options_key(opts, keep, DECISION_FIELDS + RESULT_FIELDS))
    return memo(rt, key, keep, lambda: sc.prepare(rt, opts))


def _calibrate(rt, opts: AnomalyOptions, sc: AnomalyScorer, state: Any):
    cfg = opts.config()
    whole = sc.group == "all"
    return calibration_values(
        rt,
        opts.calibrate_with,
        lambda ctxs: sc.run(rt, ctxs, opts, state),
        batch=opts.batch_size or rt.config.batch_size,
        min_images=int(sc.min_images(cfg)) if whole else 1,
        whole_set=whole,
    )


def thresholds(rt, opts: AnomalyOptions, sc: AnomalyScorer, state: Any) -> Thresholds:
    """The run's :class:`~zsdense.tasks.thresholds.Thresholds` (memoised per runtime)."""
    keep: list = []
    key = ("anomaly-thresholds", sc.name, _options_key(opts, keep, RESULT_FIELDS))
    calibrate = None
    if opts.calibrate_with is not None:

        def calibrate():
            return _calibrate(rt, opts, sc, state)

    default = None
    if sc.default_threshold is not None:

        def default():
            return sc.default_threshold(rt, opts, state)

    return memo(
        rt,
        key,
        keep,
        lambda: resolve_thresholds(
            threshold=opts.threshold,
            image_threshold=opts.image_threshold,
            calibrate=calibrate,
            percentile=opts.calibrate_percentile,
            default=default,
        ),
    )


def prepare(rt, opts: AnomalyOptions) -> Prepared:
    """Load and compute what the preset's scorer needs and decide the run's thresholds, before
    the first image (once per runtime and options)."""
    sc = check_options(opts)
    state = _state(rt, opts, sc)
    return Prepared(sc, state, thresholds(rt, opts, sc, state))


def run(
    rt, ctxs: Sequence, opts: AnomalyOptions, prepared: Prepared | None = None
) -> list[AnomalyResult]:
    """Anomaly results for ``ctxs`` by the preset's scorer, decided with the run's thresholds."""
    ctxs = rt.contexts(list(ctxs))
    if not ctxs:
        return []
    if prepared is None:
        prepared = prepare(rt, opts)
    if prepared.scorer.group == "all":
        check_set_size(opts, len(ctxs), what="the set")
    raws = prepared.scorer.run(rt, ctxs, opts, prepared.state)
    if len(raws) != len(ctxs):
        raise ConfigError(
            f"anomaly scorer {prepared.scorer.name!r} returned {len(raws)} results for "
            f"{len(ctxs)} images"
        )
    base = rt.result_meta()
    return [
        AnomalyResult.from_raw(r, prepared.thresholds, base, keep_model_map=opts.keep_model_map)
        for r in raws
    ]


__all__ = [
    "Prepared",
    "check_options",
    "check_set_size",
    "min_images",
    "prepare",
    "run",
    "scorer",
    "thresholds",
]
