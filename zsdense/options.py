"""Typed options of each task: one frozen dataclass per task, validated once, at the edge.

The command line, the ``zsdense run`` TOML, ``--task k=v`` strings and Python keyword arguments
all become one of these through :meth:`from_mapping` (aliases such as ``object`` ->
``object_name`` applied, ``None`` values meaning "not given"). Fields of the task's own options
sit in the dataclass; every other key must be a field of the task's preset dataclass
(``zsdense.config``) and is kept, validated, in ``overrides``. Anything else is a
:class:`~zsdense.errors.ConfigError` that lists the valid names, raised before any model loads.

The heads (``zsdense.tasks``) receive these objects and never filter keyword lists again.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from zsdense.config import (
    ANOMALY_PRESETS,
    DATTN_MEAN_MODES,
    DEFAULT_ANOMALY_PRESET,
    DEFAULT_OPENVOCAB_PRESET,
    DEFAULT_REFER_PRESET,
    FALLBACK_READINGS,
    FUSION_MODES,
    OPENVOCAB_DATASETS,
    OPENVOCAB_PRESETS,
    PARSERS,
    PROPOSAL_DECODERS,
    PROPOSAL_STABILITY_MODES,
    REFER_PRESETS,
    AnomalyPreset,
    OpenVocabPreset,
    ReferPreset,
    openvocab_preset,
    pick_preset,
    with_overrides,
)
from zsdense.dense.methods import get_method
from zsdense.dense.upsamplers import DEFAULT_SCALE, check_scale, parse_upsampler
from zsdense.errors import ConfigError

if TYPE_CHECKING:  # the classifier imports torch: loaded when classes are parsed, not for --help
    from zsdense.text.classifier import ClassEntry

OUTPUT_FORMATS = ("tiff", "npy", "rle", "none")
DOMAINS = ("industrial", "medical")
MAX_CLASSES = 256  # a label PNG holds at most 256 values


@dataclass(frozen=True)
class OutputOptions:
    """What the writers produce for every result: float maps as ``fmt``, and JPEG overlays."""

    fmt: str = "tiff"  # tiff | npy | rle (masks also as COCO RLE JSON, maps as tiff) | none
    overlay: bool = True

    def __post_init__(self) -> None:
        if self.fmt not in OUTPUT_FORMATS:
            raise ConfigError(
                f"unknown output format {self.fmt!r}; choose one of: {', '.join(OUTPUT_FORMATS)}"
            )


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple]:
    """field name -> the types its annotation allows (None left out)."""
    import types as _types

    def allowed(h: Any) -> tuple:
        if typing.get_origin(h) in (typing.Union, _types.UnionType):
            return tuple(a for a in typing.get_args(h) if a is not type(None))
        return (h,)

    from zsdense.text.classifier import ClassEntry  # a type-checking-only import at the top

    hints = typing.get_type_hints(cls, localns={"ClassEntry": ClassEntry})
    return {k: allowed(h) for k, h in hints.items()}


def _typed(cls: type, key: str, value: Any) -> Any:
    """Text from ``--task k=v`` as the field's declared type: int, float, bool, or a tuple of
    numbers (``6|12|18``); other values, and text that does not convert, are returned as given
    (the option's own validation then names the problem)."""
    types = _field_types(cls).get(key, ())
    tup = next((t for t in types if typing.get_origin(t) is tuple), None)
    item = (typing.get_args(tup) or (str,))[0] if tup is not None else None
    try:
        if isinstance(value, (list, tuple)):
            if item in (int, float) and all(isinstance(v, str) for v in value):
                return tuple(item(v) for v in value)
            return value
        if not isinstance(value, str):
            return value
        text = value.strip()
        for t in types:
            if t is bool and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            if t in (int, float) and t is not bool:
                return t(text)
            if t is tup and item in (int, float):
                return tuple(item(x) for x in text.split(",") if x.strip())
    except ValueError:
        pass
    return value


class _TaskOptions:
    """Shared :meth:`from_mapping` for the task option dataclasses below."""

    TASK: ClassVar[str] = ""
    ALIASES: ClassVar[dict[str, str]] = {}
    PRESET_CLASS: ClassVar[type] = object

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None = None, **kw: Any):
        """Options from a flat mapping (CLI values, a TOML table, Python keyword arguments)."""
        given = {**dict(mapping or {}), **kw}
        own = {f.name for f in fields(cls)} - {"overrides"}
        preset_fields = {f.name for f in fields(cls.PRESET_CLASS)} - {"name"}
        values: dict[str, Any] = {}
        overrides: dict[str, Any] = {}
        unknown = []
        for key, value in given.items():
            key = cls.ALIASES.get(key, key)
            if value is None:
                continue
            if key in own:
                values[key] = _typed(cls, key, value)
            elif key in preset_fields:
                overrides[key] = _freeze(_typed(cls.PRESET_CLASS, key, value))
            else:
                unknown.append(key)
        if unknown:
            valid = sorted((own | preset_fields | set(cls.ALIASES)) - {"overrides"})
            raise ConfigError(
                f"unknown option(s) {', '.join(sorted(unknown))} for the {cls.TASK} task; "
                f"valid: {', '.join(valid)}"
            )
        values = cls._prepare(values)
        return cls(**values, overrides=tuple(sorted(overrides.items())))

    @classmethod
    def _prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        return values

    def with_options(self, **changes: Any):
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)


def _check_upsampler(opts: Any) -> None:
    """``upsampler`` parsed (a registered name, a file where it takes one; stored as its
    canonical text) and ``upsampler_scale`` checked (zsdense.dense.upsamplers)."""
    spec = parse_upsampler(opts.upsampler)
    object.__setattr__(opts, "upsampler", spec.text)
    object.__setattr__(opts, "upsampler_scale", check_scale(opts.upsampler_scale, spec))


# ---- anomaly -------------------------------------------------------------------------------


def parse_layers(value: Any) -> tuple[int, ...] | None:
    """``--eattn-layers``: ``"6,12,18,24"`` or a sequence -> tuple; ``"as-run"`` -> None."""
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("", "as-run", "asrun", "last", "none"):
            return None
        try:
            return tuple(int(x) for x in v.replace(" ", "").split(",") if x)
        except ValueError:
            raise ConfigError(
                f"--eattn-layers {value!r}: give block numbers like 6,12,18,24 or 'as-run'"
            ) from None
    return tuple(int(x) for x in value)


def resolve_anomaly_preset(preset: str | AnomalyPreset, **overrides: Any) -> AnomalyPreset:
    """The preset with overrides applied (``eattn_layers`` parsed; unknown names -> ConfigError)."""
    base = (
        preset
        if isinstance(preset, AnomalyPreset)
        else pick_preset(ANOMALY_PRESETS, preset, "anomaly")
    )  # the table registered presets join (zsdense.tasks.anomaly_registry)
    ov = dict(overrides)
    layers_given = "eattn_layers" in ov
    layers = parse_layers(ov.pop("eattn_layers", None))
    cfg = with_overrides(base, **ov)
    if layers_given:
        cfg = replace(cfg, eattn_layers=layers)
    if cfg.dattn_mean not in DATTN_MEAN_MODES:
        raise ConfigError(
            f"--dattn-mean must be one of {', '.join(DATTN_MEAN_MODES)}, not {cfg.dattn_mean!r}"
        )
    validate_image_size(cfg.image_size)
    return cfg


def validate_image_size(size: int, patch: int = 14) -> int:
    """The model input size of the CLIP anomaly heads (``zsdense anomaly`` and
    ``zsdense train-prompts`` alike): a multiple of the 14-px patch, at least two patches."""
    if int(size) < 2 * patch or int(size) % patch:
        raise ConfigError(
            f"image size {size} must be a multiple of the patch size {patch} and at least "
            f"{2 * patch} (e.g. 518)"
        )
    return int(size)


@dataclass(frozen=True)
class TileSpec:
    """``--tile SIZE[:OVERLAP]``: tile side and overlap in pixels of the original image (the
    tiling itself: :mod:`zsdense.tasks.tiling`)."""

    size: int
    overlap: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"--tile {self.text()}: SIZE must be a positive number of pixels")
        if not 0 <= self.overlap or not 2 * self.overlap < self.size:
            raise ConfigError(
                f"--tile {self.text()}: OVERLAP must satisfy 0 <= OVERLAP < SIZE/2 "
                f"(here < {self.size / 2:g})"
            )

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    def text(self) -> str:
        """The canonical ``SIZE:OVERLAP`` string (what run settings record)."""
        return f"{self.size}:{self.overlap}"


def default_overlap(size: int) -> int:
    """OVERLAP when ``--tile SIZE`` gives none: an eighth of the tile (518 -> 64)."""
    return int(size) // 8


def parse_tile(value: Any) -> TileSpec | None:
    """``--tile`` / ``tile=`` value -> :class:`TileSpec` (None: no tiles).

    ``"512:64"``, ``"512"`` (overlap :func:`default_overlap`), ``512``, ``(512, 64)`` or a
    TileSpec. Anything else is a ConfigError saying the syntax."""
    if value is None or isinstance(value, TileSpec):
        return value
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return TileSpec(int(value), default_overlap(value))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return TileSpec(int(value[0]), int(value[1]))
        if isinstance(value, str):
            head, sep, tail = value.strip().partition(":")
            size = int(head)
            return TileSpec(size, int(tail) if sep else default_overlap(size))
    except (TypeError, ValueError):
        pass
    raise ConfigError(
        f"--tile {value!r}: give SIZE[:OVERLAP] in pixels, e.g. --tile 518:64 (tile = '518:64')"
    )


@dataclass(frozen=True)
class AnomalyOptions(_TaskOptions):
    """Options of the anomaly head (``specs/anomaly.md``); ``overrides`` are preset fields."""

    TASK: ClassVar[str] = "anomaly"
    ALIASES: ClassVar[dict[str, str]] = {"object": "object_name"}
    PRESET_CLASS: ClassVar[type] = AnomalyPreset

    preset: str = DEFAULT_ANOMALY_PRESET
    object_name: str | None = None
    domain: str = "industrial"  # industrial | medical (the papers' medical settings)
    dataset: str | None = None  # "mvtec" selects the VisA-trained prompts (the papers' protocol)
    threshold: float | None = None
    image_threshold: float | None = None
    calibrate_with: Any = None  # folder / file / glob / list of known-good images
    calibrate_percentile: float | None = None
    batch_size: int | None = None
    keep_model_map: bool = False
    reference: Any = None  # few-shot presets: good images (folder/glob/paths) or a .zsdmem bank
    shots: int | None = None  # use the first N references (None: all)
    # feature upsampling (presets whose scorer declares it): bilinear | jafar | jafar:FILE
    upsampler: str = "bilinear"
    upsampler_scale: int | None = None  # cells per patch side (None: DEFAULT_SCALE["anomaly"])
    tile: Any = None  # "SIZE[:OVERLAP]": score tiles at full resolution (zsdense.tasks.tiling)
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _check_upsampler(self)
        for name in ("reference", "calibrate_with"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.shots is not None and int(self.shots) < 1:
            raise ConfigError(f"--shots must be at least 1, got {self.shots}")
        # whether the preset takes --reference is its scorer's declaration, checked where the
        # options become a run (zsdense.tasks.anomaly_methods.check_options)
        if self.domain not in DOMAINS:
            raise ConfigError(f"--domain must be one of {', '.join(DOMAINS)}, not {self.domain!r}")
        if self.calibrate_percentile is not None:
            if self.calibrate_with is None:
                raise ConfigError("--calibrate-percentile needs --calibrate-with DIR")
            if not 0.0 <= float(self.calibrate_percentile) <= 100.0:
                raise ConfigError(
                    f"--calibrate-percentile must be in [0, 100], got {self.calibrate_percentile}"
                )
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ConfigError("batch_size must be at least 1")
        if self.tile is not None:  # canonical "SIZE:OVERLAP" (the scorer checks the rest)
            object.__setattr__(self, "tile", parse_tile(self.tile).text())
        self.config()  # the preset and its overrides are valid

    @property
    def upsampler_factor(self) -> int:
        """The finer grid of ``--upsampler``: cells per patch side (the given scale or the
        anomaly default)."""
        return int(self.upsampler_scale or DEFAULT_SCALE["anomaly"])

    @property
    def prompts_explicit(self) -> bool:
        """True when the user chose the prompts (not the preset's default checkpoint)."""
        return any(k == "prompts" for k, _ in self.overrides)

    def config(self) -> AnomalyPreset:
        """The preset with the overrides (and the medical domain's fusion order) applied."""
        ov = dict(self.overrides)
        cfg = resolve_anomaly_preset(self.preset, **ov)
        if self.domain == "medical" and "soft_mean" not in ov:
            cfg = replace(cfg, soft_mean=cfg.soft_mean_medical)
        return cfg


# ---- open vocabulary -----------------------------------------------------------------------


def resolve_classes(classes: Any = None, classes_file: Any = None) -> tuple[ClassEntry, ...]:
    """The one parser of class lists: a list, a ``"a, b; synonym"`` string, ``file:NAME`` or a
    class file (path or shipped name such as ``voc21``)."""
    from zsdense.text.classifier import load_class_file, parse_classes

    if classes is not None and classes_file is not None:
        raise ConfigError("give classes or a classes file, not both")
    if classes is None and classes_file is None:
        raise ConfigError(
            "open-vocabulary segmentation needs classes (e.g. classes = ['cat', 'sofa'])"
        )
    if classes_file is not None:
        parsed = load_class_file(classes_file)
    else:
        if isinstance(classes, (list, tuple)) and len(classes) == 1 and isinstance(classes[0], str):
            classes = classes[0] if classes[0].startswith("file:") else classes
        if isinstance(classes, str) and classes.startswith("file:"):
            parsed = load_class_file(classes[5:])
        else:
            parsed = parse_classes(classes)
    out = tuple((str(n), tuple(str(s) for s in syn)) for n, syn in parsed)
    if len(out) > MAX_CLASSES:
        raise ConfigError(f"{len(out)} classes: a label PNG holds at most {MAX_CLASSES}")
    return out


@dataclass(frozen=True)
class OpenVocabOptions(_TaskOptions):
    """Options of the open-vocabulary head; ``classes`` are parsed here, once."""

    TASK: ClassVar[str] = "openvocab"
    ALIASES: ClassVar[dict[str, str]] = {"dataset_preset": "dataset"}
    PRESET_CLASS: ClassVar[type] = OpenVocabPreset

    classes: tuple[ClassEntry, ...] = ()
    preset: str = DEFAULT_OPENVOCAB_PRESET
    dataset: str | None = None  # benchmark settings (voc21, context60, ...)
    save_probs: bool = False  # also write the (K, H, W) probabilities as the float map
    # feature upsampling of the dense CLIP features: bilinear | jafar | jafar:FILE
    upsampler: str = "bilinear"
    upsampler_scale: int | None = None  # cells per patch side (None: DEFAULT_SCALE)
    overrides: tuple[tuple[str, Any], ...] = ()
    classes_file: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def _prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = dict(values)
        classes_file = values.pop("classes_file", None)
        values["classes"] = resolve_classes(values.get("classes"), classes_file)
        return values

    def __post_init__(self) -> None:
        _check_upsampler(self)
        if not self.classes:
            raise ConfigError("open-vocabulary segmentation needs classes")
        if self.dataset is not None and self.dataset not in OPENVOCAB_DATASETS:
            raise ConfigError(
                f"unknown dataset preset {self.dataset!r}; "
                f"choose one of: {', '.join(OPENVOCAB_DATASETS)}"
            )
        cfg = self.config()
        if cfg.sam_refine and not get_method(cfg.method).needs_sam:
            with_sam = [n for n, p in OPENVOCAB_PRESETS.items() if get_method(p.method).needs_sam]
            raise ConfigError(
                f"--sam-refine needs a preset whose method uses SAM: {', '.join(with_sam)}"
            )

    def config(self) -> OpenVocabPreset:
        return openvocab_preset(self.preset, self.dataset, **dict(self.overrides))

    @property
    def upsampler_factor(self) -> int:
        """The finer grid of ``--upsampler``: cells per patch side (the given scale, else the
        default of the preset's pipeline)."""
        if self.upsampler_scale:
            return int(self.upsampler_scale)
        pipeline = get_method(self.config().method).pipeline
        return int(DEFAULT_SCALE.get(f"openvocab-{pipeline}", DEFAULT_SCALE["openvocab"]))


# ---- referring -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferOptions(_TaskOptions):
    """Options of the referring head; the text may also come per input (queries files)."""

    TASK: ClassVar[str] = "refer"
    ALIASES: ClassVar[dict[str, str]] = {"expression": "text"}
    PRESET_CLASS: ClassVar[type] = ReferPreset

    preset: str = DEFAULT_REFER_PRESET
    text: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        self.config()

    def config(self) -> ReferPreset:
        base = pick_preset(REFER_PRESETS, self.preset, "referring")
        cfg = with_overrides(base, **dict(self.overrides)) if self.overrides else base
        for name, allowed in (
            ("proposal_stability", PROPOSAL_STABILITY_MODES),
            ("proposal_decoder", PROPOSAL_DECODERS),
            ("fusion", FUSION_MODES),
            ("parser", PARSERS),
            ("fallback_reading", FALLBACK_READINGS),
        ):
            if getattr(cfg, name) not in allowed:
                raise ConfigError(
                    f"{name} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}"
                )
        return cfg


TASK_OPTIONS: dict[str, type] = {
    "anomaly": AnomalyOptions,
    "openvocab": OpenVocabOptions,
    "refer": ReferOptions,
}


def options_for(task: str, mapping: Mapping[str, Any] | None = None, **kw: Any):
    """``TASK_OPTIONS[task].from_mapping(...)`` with a clear error for an unknown task."""
    try:
        cls = TASK_OPTIONS[task]
    except KeyError:
        raise ConfigError(
            f"unknown task {task!r}; choose one of: {', '.join(TASK_OPTIONS)}"
        ) from None
    return cls.from_mapping(mapping, **kw)
