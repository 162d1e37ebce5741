"""``crane+fewshot`` (ours): Crane+ and AnomalyDINO, each put on the scale of the good
references' own maps (0 = a typical good pixel, 1 = the worst good pixel), then combined.

The references are scored by both methods once per run: Crane+ on the reference images (or its
statistics stored in a bank by ``zsdense memory build --crane-preset``), the few-shot maps
leave-one-out (:func:`~zsdense.tasks.fewshot.scoring.reference_maps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from zsdense.errors import ConfigError
from zsdense.io.membank import MemoryBank
from zsdense.options import AnomalyOptions
from zsdense.tasks import crane_head
from zsdense.tasks.anomaly_registry import RawScore
from zsdense.tasks.anomaly_result import AnomalyResult
from zsdense.tasks.fewshot.options import FewShotOptions
from zsdense.tasks.fewshot.run import FewShotState, decided_results, fewshot_raw, fewshot_state
from zsdense.tasks.fewshot.scoring import reference_maps
from zsdense.tasks.good_images import is_bank, resolve_images, score_good_images, single
from zsdense.tasks.thresholds import Default

FUSION_RULES = ("mean", "max")

# ---- the rule ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapStats:
    """A method's scale on good parts: the mean and the max of the reference images' maps."""

    mean: float
    high: float
    n_images: int

    @property
    def scale(self) -> float:
        return max(self.high - self.mean, 1e-12 * max(1.0, abs(self.high)))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "high": self.high, "n_images": self.n_images}


def map_stats(maps: Sequence[np.ndarray]) -> MapStats:
    """:class:`MapStats` of the references' own maps (mean over all pixels, max pixel)."""
    if not maps:
        raise ConfigError("fusion needs the maps of at least one reference image")
    flat = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    return MapStats(mean=float(flat.mean()), high=float(flat.max()), n_images=len(maps))


def normalise(values: np.ndarray | float, stats: MapStats) -> np.ndarray | float:
    """(v − mean) / (high − mean): 0 = a typical good pixel, 1 = the worst good pixel."""
    return (np.asarray(values, dtype=np.float64) - stats.mean) / stats.scale


def fuse_maps(
    crane_map: np.ndarray,
    fewshot_map: np.ndarray,
    crane_stats: MapStats,
    fewshot_stats: MapStats,
    *,
    weight: float = 0.5,
    rule: str = "mean",
) -> np.ndarray:
    """The ``crane+fewshot`` map: each map normalised by its method's reference statistics
    (:func:`normalise`), then combined: ``rule="mean"`` → (1−w)·crane + w·fewshot (default
    w = 0.5), ``"max"`` → the pixelwise max. A value above 1 is above anything either method
    saw on the good references, so 1.0 is the natural threshold. Float32 (H, W)."""
    if rule not in FUSION_RULES:
        raise ConfigError(f"fusion rule must be one of {', '.join(FUSION_RULES)}, not {rule!r}")
    if not 0.0 <= float(weight) <= 1.0:
        raise ConfigError(f"fusion weight must be in [0, 1], got {weight}")
    c = normalise(crane_map, crane_stats)
    f = normalise(fewshot_map, fewshot_stats)
    if c.shape != f.shape:
        raise ConfigError(f"fusion maps differ in size: {c.shape} vs {f.shape}")
    out = np.maximum(c, f) if rule == "max" else (1.0 - weight) * c + weight * f
    return out.astype(np.float32)


def fuse_scores(
    crane_score: float,
    fewshot_score: float,
    crane_stats: MapStats,
    fewshot_stats: MapStats,
    *,
    weight: float = 0.5,
    rule: str = "mean",
) -> float:
    """The image score, fused like the maps: each method's score normalised with the same
    reference statistics as its map (both scores are in their map's units: Crane's is an
    abnormal probability, AnomalyDINO's a mean of patch distances), then mean / max."""
    c = float(normalise(crane_score, crane_stats))
    f = float(normalise(fewshot_score, fewshot_stats))
    if rule == "max":
        return max(c, f)
    return (1.0 - weight) * c + weight * f


FUSED_THRESHOLD = 1.0


# ---- the run: state once, then raw fused maps per batch -----------------------------------------


def crane_side_options(
    crane_preset: str, object_name: str | None = None, options: dict | None = None
) -> AnomalyOptions:
    """The options of the Crane side (its preset, object, domain and preset overrides)."""
    given = {k: v for k, v in (options or {}).items() if k not in ("threshold", "image_threshold")}
    return AnomalyOptions.from_mapping(given, preset=crane_preset, object_name=object_name)


def check_fusion(weight: float, rule: str) -> None:
    if rule not in FUSION_RULES:
        raise ConfigError(f"fusion rule must be one of {', '.join(FUSION_RULES)}, not {rule!r}")
    if not 0.0 <= float(weight) <= 1.0:
        raise ConfigError(f"fusion weight must be in [0, 1], got {weight}")


def stored_crane_stats(rt, bank: MemoryBank, copts: AnomalyOptions) -> tuple[MapStats, dict]:
    """Crane's statistics stored in the bank for this preset, checked against the run: the same
    model set; the same ``--object`` when the prompts name the object (the prompt ensemble),
    else (learned prompts are object-agnostic) a note in the results."""
    preset = copts.preset
    stored = (bank.extra.get("crane_stats") or {}).get(preset)
    if stored is None:
        raise ConfigError(
            f"crane+fewshot with a memory bank needs Crane's statistics for {preset!r}"
            ": build the bank with `zsdense memory build ... --crane-preset "
            f"{preset}` or give the reference images too"
        )
    if stored.get("models") != rt.config.models:
        raise ConfigError(
            f"the bank's Crane statistics were made with models={stored.get('models')!r}, "
            f"this run uses {rt.config.models!r}: rebuild the bank"
        )
    notes: dict = {}
    made_for, now = stored.get("object"), copts.object_name
    if made_for != now:
        _, tmeta = crane_head.options_text(rt, copts)
        if tmeta.get("prompts") == "ensemble":
            raise ConfigError(
                f"the bank's Crane statistics were made for --object {made_for!r} and this run "
                f"uses --object {now!r}; the prompt ensemble names the object, so the scale "
                f"differs: rebuild the bank with `zsdense memory build ... --object {now}` or "
                f"run with --object {made_for}"
            )
        notes["crane_stats_note"] = (
            f"the bank's Crane statistics were made for --object {made_for!r}, this run uses "
            f"{now!r}: learned prompts are object-agnostic, so they apply"
        )
    return MapStats(float(stored["mean"]), float(stored["high"]), int(stored["n_images"])), notes


def crane_reference_stats(
    rt, bank: MemoryBank, copts: AnomalyOptions, reference_images: Any = None
) -> tuple[MapStats, dict]:
    """Crane's :class:`MapStats` on the good references: its maps of the first ``n_shots``
    reference images, or (``reference_images`` None) the statistics stored in the bank by
    :func:`add_crane_stats`; and notes for the results."""
    if reference_images is None:
        return stored_crane_stats(rt, bank, copts)
    items = resolve_images(reference_images, "--reference")[: bank.n_shots]
    raws = score_good_images(
        rt,
        items,
        lambda cs: crane_head.crane_scores(rt, copts, cs),
        what="--reference",
        label=f"{copts.preset} on the good references",
        batch=rt.config.batch_size,
    )
    return map_stats([r.anomaly_map for r in raws]), {}


@dataclass
class FusedState:
    """What a ``crane+fewshot`` run computes once: the few-shot memory, the Crane options and
    both methods' statistics on the good references."""

    few: FewShotState
    crane: AnomalyOptions
    crane_stats: MapStats
    few_stats: MapStats
    weight: float = 0.5
    rule: str = "mean"
    notes: dict = field(default_factory=dict)


def fused_state(
    rt,
    few: FewShotState,
    copts: AnomalyOptions,
    reference_images: Any = None,
    *,
    weight: float = 0.5,
    rule: str = "mean",
) -> FusedState:
    """Both methods' reference statistics (Crane's from ``reference_images`` or the bank)."""
    check_fusion(weight, rule)
    few_stats = map_stats([m for m, _ in reference_maps(few.bank, few.options)])
    crane_head.load_encoders(rt, copts)
    crane_stats, notes = crane_reference_stats(rt, few.bank, copts, reference_images)
    return FusedState(few, copts, crane_stats, few_stats, float(weight), rule, notes)


def fused_raw(rt, ctxs: Sequence, state: FusedState) -> list[RawScore]:
    """Raw fused maps and scores (both methods on each image, normalised, combined)."""
    ctxs = list(ctxs)
    few = fewshot_raw(rt, ctxs, state.few)
    crane = crane_head.crane_scores(rt, state.crane, ctxs)
    cs, fs, w, rule = state.crane_stats, state.few_stats, state.weight, state.rule
    out = []
    for c, f in zip(crane, few):
        fmap = fuse_maps(c.anomaly_map, f.anomaly_map, cs, fs, weight=w, rule=rule)
        score = fuse_scores(c.score, f.score, cs, fs, weight=w, rule=rule)
        meta = {
            "preset": "crane+fewshot",
            "method": "crane+fewshot",
            "crane_preset": state.crane.preset,
            "fusion": {
                "rule": rule,
                "weight": w,
                "crane_stats": cs.to_dict(),
                "fewshot_stats": fs.to_dict(),
                "crane_score": c.score,
                "fewshot_score": f.score,
            },
            "fewshot": f.meta.get("fewshot"),
            **state.notes,
        }
        out.append(RawScore(fmap, float(score), meta))
    return out


def fused_default(state: FusedState) -> Default:  # noqa: ARG001 - the same for every run
    """1.0 on the fused map: worse than any good pixel either method saw."""
    return Default(FUSED_THRESHOLD, "default")


def run_crane_fewshot(
    rt,
    ctxs: Sequence,
    *,
    reference: Any,
    options: FewShotOptions | None = None,
    crane_preset: str = "crane+",
    object_name: str | None = None,
    dataset: str | None = None,
    weight: float = 0.5,
    rule: str = "mean",
    threshold: float | None = None,
    image_threshold: float | None = None,
    crane_options: dict | None = None,
    reference_images: Any = None,
    calibrate_with: Any = None,
    calibrate_percentile: float | None = None,
) -> list[AnomalyResult]:
    """``crane+fewshot``: Crane(+) and AnomalyDINO, each normalised on the good references.

    ``reference``: good images or a bank; with a bank, Crane's statistics come from
    ``bank.extra["crane_stats"][crane_preset]`` (stored by ``zsdense memory build
    --crane-preset``) or from ``reference_images``. Decisions as every preset: fixed values,
    else calibrated on ``calibrate_with`` (fused maps of known-good images), else 1.0 on the
    fused map and no image threshold.
    """
    ctxs = rt.contexts(list(ctxs))
    if not ctxs:
        return []
    few = fewshot_state(rt, reference, options, object_name, dataset)
    images = reference_images
    if images is None and not is_bank(single(reference)):
        images = single(reference)
    copts = crane_side_options(crane_preset, object_name, crane_options)
    state = fused_state(rt, few, copts, images, weight=weight, rule=rule)
    return decided_results(
        rt,
        lambda cs: fused_raw(rt, cs, state),
        ctxs,
        default=lambda: fused_default(state),
        threshold=threshold,
        image_threshold=image_threshold,
        calibrate_with=calibrate_with,
        calibrate_percentile=calibrate_percentile,
    )


def add_crane_stats(
    rt,
    bank: MemoryBank,
    images: Any,
    crane_preset: str = "crane+",
    object_name: str | None = None,
    crane_options: dict | None = None,
) -> MemoryBank:
    """Store Crane's reference statistics in ``bank.extra`` (for ``crane+fewshot`` from a bank),
    with the model set and the ``--object`` they were made for."""
    copts = crane_side_options(crane_preset, object_name, crane_options)
    crane_head.load_encoders(rt, copts)
    st, _ = crane_reference_stats(rt, bank, copts, images)
    extra = dict(bank.extra)
    cs = dict(extra.get("crane_stats") or {})
    cs[crane_preset] = {**st.to_dict(), "models": rt.config.models, "object": object_name}
    extra["crane_stats"] = cs
    bank.extra = extra
    return bank
