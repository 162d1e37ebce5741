"""The registry of anomaly scorers and their presets: one contract for every method.

A scorer is an :class:`AnomalyScorer`: what it needs (a whole set at once, a minimum number of
images, good reference images or a memory bank, which encoders), ``prepare(rt, opts) -> state``
(once per run: models, prompt checkpoints, banks, reference statistics) and ``run(rt, ctxs,
opts, state) -> [RawScore]`` (raw maps and image scores; **no thresholds**: decisions are made
once for every preset by :mod:`zsdense.tasks.thresholds`). A preset is a
:class:`~zsdense.config.AnomalyPreset` whose ``method`` names a registered scorer.

A new method is one file::

    from zsdense.config import AnomalyPreset
    from zsdense.tasks.anomaly_registry import AnomalyScorer, RawScore, register_scorer
    from zsdense.tasks.anomaly_registry import register_anomaly_preset

    register_scorer(AnomalyScorer(name="mine", prepare=..., run=..., description="..."))
    register_anomaly_preset(AnomalyPreset(name="mine", method="mine", prompts="none"))

Scorers and presets live in :class:`zsdense.plugins.Registry` tables (presets in
:data:`zsdense.config.ANOMALY_PRESETS`, so the CLI's ``--preset`` choices, ``zsdense info`` and
the evaluation see every registered one). The built-in methods are files of
:mod:`zsdense.methods` (``crane``, ``musc``, ``anomalydino``, ``crane_fewshot``), loaded with the
plug-ins of the ``zsdense.methods`` entry-point group the first time a table is read.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from zsdense.config import ANOMALY_PRESETS, AnomalyPreset
from zsdense.errors import ConfigError
from zsdense.plugins import Registry, withdraw_method

GROUPS = ("batch", "all")
REFERENCE_NEEDS = ("none", "required", "optional")
REFERENCE_KINDS = ("images", "bank")


@dataclass
class RawScore:
    """One image's raw output of a scorer: no mask, no label (those are decisions).

    ``anomaly_map`` (H, W) float32 at the original image size; ``score`` the image score;
    ``meta`` JSON-able facts about how it was computed; ``model_map`` optionally the map at the
    model's input size (what evaluation scores when it matches the evaluation size).
    """

    anomaly_map: np.ndarray
    score: float
    meta: dict = field(default_factory=dict)
    model_map: np.ndarray | None = None


def _no_encoders(cfg: AnomalyPreset) -> tuple[str, ...]:  # noqa: ARG001
    return ()


@dataclass(frozen=True)
class AnomalyScorer:
    """One anomaly method: its declarations, ``prepare`` and ``run``.

    - ``name``: the ``method`` that presets name;
    - ``prepare(rt, opts) -> state``: once per run and runtime (its result is memoised per
      runtime and options, so reference work is never redone per batch or per Python call);
    - ``run(rt, ctxs, opts, state) -> [RawScore]``: one per context, same order;
    - ``group``: ``"batch"`` (any batch of images) or ``"all"`` (the whole set at once: the
      images score each other, e.g. MuSc); ``min_images(cfg)``: images a call needs (the input
      set for ``group="all"``, and then the calibration set too);
    - ``references``: ``"none"``, ``"required"`` or ``"optional"`` good reference images
      (``--reference``), of the ``reference_kinds`` it takes: ``"images"`` (a folder, glob or
      list) and/or ``"bank"`` (a ``.zsdmem`` memory bank);
    - ``encoders(cfg)``: the encoders it loads (``"clip/ViT-L-14-336"``), for the docs;
    - ``uses_prompts``: its maps come from CLIP text prompts (``--prompts`` applies);
    - ``feature_upsampling``: its maps come from an encoder's dense patch features and its
      ``prepare`` honours ``--upsampler`` (:mod:`zsdense.dense.upsamplers`); other scorers
      refuse an upsampler other than ``bilinear``;
    - ``default_threshold(rt, opts, state) -> thresholds.Default``: the pixel threshold when
      none is given or calibrated (None: 0.5 on a probability map).
    """

    name: str
    prepare: Callable[[Any, Any], Any]
    run: Callable[[Any, Sequence, Any, Any], list[RawScore]]
    description: str = ""
    group: str = "batch"
    min_images: Callable[[AnomalyPreset], int] = field(default=lambda cfg: 1)
    references: str = "none"
    reference_kinds: tuple[str, ...] = ()
    encoders: Callable[[AnomalyPreset], tuple[str, ...]] = _no_encoders
    uses_prompts: bool = False
    feature_upsampling: bool = False
    default_threshold: Callable[[Any, Any, Any], Any] | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("an anomaly scorer needs a name (the method presets refer to)")
        if self.group not in GROUPS:
            raise ConfigError(f"scorer {self.name}: group must be one of {GROUPS}")
        if self.references not in REFERENCE_NEEDS:
            raise ConfigError(f"scorer {self.name}: references must be one of {REFERENCE_NEEDS}")
        bad = sorted(set(self.reference_kinds) - set(REFERENCE_KINDS))
        if bad or (self.references != "none" and not self.reference_kinds):
            raise ConfigError(
                f"scorer {self.name}: reference_kinds must name some of {REFERENCE_KINDS}"
            )
        if not callable(self.prepare) or not callable(self.run):
            raise ConfigError(f"scorer {self.name}: prepare and run must be callables")


_SCORERS: Registry[AnomalyScorer] = Registry("anomaly scorer")
PRESET_DESCRIPTIONS: dict[str, str] = {}  # preset -> its own line (else the scorer's)


def register_scorer(scorer: AnomalyScorer, *, replace: bool = False) -> AnomalyScorer:
    """Add ``scorer`` under ``scorer.name`` (a name already taken is a ConfigError unless
    ``replace``); returns it."""
    if not isinstance(scorer, AnomalyScorer):
        raise ConfigError(f"register_scorer needs an AnomalyScorer, got {type(scorer).__name__}")
    old = _SCORERS.current().get(scorer.name)
    if old is not None and not replace and old is not scorer:
        raise ConfigError(f"an anomaly scorer named {scorer.name!r} is already registered")
    _SCORERS[scorer.name] = scorer
    return scorer


def register_anomaly_preset(
    preset: AnomalyPreset, *, description: str = "", replace: bool = False
) -> AnomalyPreset:
    """Add ``preset`` to the preset table (its ``method`` must be a registered scorer);
    ``description`` is its line in ``zsdense info --methods`` (default: the scorer's)."""
    if not isinstance(preset, AnomalyPreset):
        raise ConfigError(
            f"register_anomaly_preset needs an AnomalyPreset, got {type(preset).__name__}"
        )
    get_scorer(preset.method)  # a preset without its method is refused here, not at run time
    old = ANOMALY_PRESETS.current().get(preset.name)
    if old is not None and old != preset and not replace:
        raise ConfigError(f"an anomaly preset named {preset.name!r} is already registered")
    ANOMALY_PRESETS[preset.name] = preset
    PRESET_DESCRIPTIONS[preset.name] = description
    return preset


def anomaly_methods_table() -> str:
    """A Markdown table of the anomaly presets, their scorers and what each needs (README,
    ``zsdense info --methods``)."""
    rows = ["| preset | method | needs | what |", "|---|---|---|---|"]
    for name, p in ANOMALY_PRESETS.items():
        sc = get_scorer(p.method)
        needs = []
        if sc.group == "all":
            needs.append(f"a set of >= {sc.min_images(p)} images")
        if sc.references != "none":
            kinds = " or ".join(
                {"images": "good images", "bank": "a memory bank"}[k] for k in sc.reference_kinds
            )
            needs.append(kinds if sc.references == "required" else f"optionally {kinds}")
        what = PRESET_DESCRIPTIONS.get(name) or sc.description
        rows.append(f"| `{name}` | {sc.name} | {', '.join(needs) or 'one image'} | {what} |")
    return "\n".join(rows)


def unregister(name: str) -> None:
    """Remove a scorer, the presets that use it and their descriptions (tests, plug-in
    reloads)."""
    withdraw_method(name, _SCORERS, ANOMALY_PRESETS, PRESET_DESCRIPTIONS)


def get_scorer(method: str) -> AnomalyScorer:
    """The scorer registered for ``method`` (ConfigError listing the known ones)."""
    return _SCORERS.lookup(method)


def scorers() -> dict[str, AnomalyScorer]:
    """Every registered scorer (the built-ins and plug-ins loaded), by method name."""
    return dict(_SCORERS)


def scorer_for(preset: str | AnomalyPreset) -> AnomalyScorer:
    """The scorer of a preset (name or object)."""
    if isinstance(preset, str):
        if preset not in ANOMALY_PRESETS:
            raise ConfigError(
                f"unknown anomaly preset {preset!r}; choose one of: "
                f"{', '.join(sorted(ANOMALY_PRESETS))}"
            )
        preset = ANOMALY_PRESETS[preset]
    return get_scorer(preset.method)


def presets_with_feature_upsampling() -> list[str]:
    """The presets whose scorer honours ``--upsampler`` (for messages)."""
    out = []
    for name, p in ANOMALY_PRESETS.items():
        with contextlib.suppress(ConfigError):
            if get_scorer(p.method).feature_upsampling:
                out.append(name)
    return out


def presets_needing_references() -> list[str]:
    """The presets whose scorer needs good reference images (for messages)."""
    out = []
    for name, p in ANOMALY_PRESETS.items():
        try:
            if get_scorer(p.method).references != "none":
                out.append(name)
        except ConfigError:
            continue
    return out


__all__ = [
    "AnomalyScorer",
    "RawScore",
    "get_scorer",
    "presets_needing_references",
    "presets_with_feature_upsampling",
    "register_anomaly_preset",
    "register_scorer",
    "scorer_for",
    "scorers",
    "unregister",
]
