"""Referring segmentation: one mask for an image and an expression, by a registered method.

**The contract of a referring method** (one function)::

    def my_method(rt, ctx, expr, preset) -> ReferResult:
        ...

* ``rt``: the :class:`~zsdense.runtime.Runtime` (``device``, ``autocast()``, ``clip(arch)``,
  ``sam(arch)``, ``text_cache``, ``tiny``...);
* ``ctx``: the image's :class:`~zsdense.context.ImageContext` (``image`` float HxWx3,
  ``image_u8``, ``size``, ``get(key, compute)`` a per-image cache shared with the other heads and
  the other expressions on the image, ``sam_state(sam)`` SAM's encoding computed once);
* ``expr``: the parsed expression (:class:`zsdense.text.parse.Expression`: ``sentence``,
  ``noun_phrase``, ``head_noun``, ``context``, ``relation``, ``direction``), parsed here once
  with the preset's ``parser``;
* ``preset``: the method's :class:`~zsdense.config.ReferPreset` with the user's overrides;
* returns a :class:`ReferResult` at the image size. When the method could not do its job and
  returns a stand-in (HybridGL: no SAM proposal, the whole image), it sets ``fallback=True``,
  a NaN ``score`` and says why in ``meta["warning_fallback"]``: the manifest line then carries
  ``"fallback": true`` and the run's summary counts it.

**Registering** (a file of ``zsdense/methods/`` or a plug-in module named in the
``zsdense.methods`` entry-point group; see :mod:`zsdense.plugins`)::

    from zsdense.tasks.referring import register_refer_method

    register_refer_method(
        "mymethod", my_method, encoders=("clip",), description="what it does",
        presets={"mymethod": {"clip_arch": "ViT-B-16"},
                 "mymethod-fast": {"k1": 1, "description": "one candidate"}},
    )

The presets become ``--preset`` choices of ``zsdense refer`` / ``eval refer``, rows of
``zsdense info --methods`` and of the README table (:func:`refer_methods_table`). The built-in
method is HybridGL (:mod:`zsdense.tasks.hybridgl`, declared in ``zsdense/methods/hybridgl.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from zsdense.config import REFER_PRESETS, ReferPreset, preset_from_spec
from zsdense.errors import ConfigError
from zsdense.io.instances import instance_masks, to_supervision, whole_mask_instance
from zsdense.io.writers import write_result
from zsdense.options import OutputOptions, ReferOptions
from zsdense.plugins import MethodFamily, Registry

ENCODERS = ("clip", "sam")  # what a referring method may declare it loads (setup, info table)


@dataclass
class ReferResult:
    """One mask for one (image, expression) pair, at the original image size.

    ``fallback``: True when the method returned a stand-in instead of an answer (HybridGL: SAM
    found no mask, so the mask is the whole image); ``score`` is then NaN (``null`` in the
    manifest) and ``candidates`` empty, so a fallback never looks like a confident answer.
    """

    mask: np.ndarray  # (H, W) bool
    score: float  # the method's score of the chosen mask (HybridGL: its mix F; not a probability)
    candidates: list[dict]  # top candidates: index, box_xywh, area, score, method terms
    meta: dict = field(default_factory=dict)
    fallback: bool = False

    def write(
        self, stem, image: np.ndarray, out: OutputOptions, params: dict | None = None
    ) -> dict:
        """Mask and overlay (the expression as caption) next to ``stem``; score, candidates,
        the query id and text for the manifest (and ``fallback``, the reason, when one)."""
        params = params or {}
        text = params.get("text") or self.meta.get("text")
        caption = str(text) if text else None
        outputs = write_result(stem, image, out, self.meta, mask=self.mask, caption=caption)
        scores: dict[str, Any] = {"score": float(self.score), "candidates": self.candidates}
        if params.get("id") is not None:
            scores["id"] = params["id"]
        scores["text"] = text
        got = {
            "outputs": outputs,
            "scores": scores,
            "meta": dict(self.meta),
            "instances": self.instances,
        }
        if self.fallback:
            got["fallback"] = str(self.meta.get("warning_fallback") or "fallback result")
        return got

    @property
    def instances(self) -> list[dict]:
        """The one mask as one instance (box, area; the result's score as its statistics)."""
        return whole_mask_instance(self.mask, self.score)

    def to_supervision(self):
        """The mask as one ``supervision.Detections`` row (class "referred", confidence = the
        result's score); needs ``pip install 'zsdense[supervision]'``."""
        insts = self.instances
        text = self.meta.get("text")
        return to_supervision(
            insts,
            instance_masks(self.mask, insts, whole=True),
            self.mask.shape,
            class_names=(str(text) if text else "referred",),
            confidence=float(self.score),
        )


# ---- the registry ---------------------------------------------------------------------------

ReferRun = Callable[[Any, Any, Any, ReferPreset], ReferResult]


@dataclass(frozen=True)
class ReferMethod:
    """One referring method: its function and the encoders its setup loads."""

    name: str
    run: ReferRun
    encoders: tuple[str, ...] = ENCODERS  # loaded at setup from the preset's clip_arch/sam_arch
    description: str = ""
    reference: str = ""


FAMILY = MethodFamily.over(REFER_PRESETS, "referring method", "referring preset")
REFER_METHODS: Registry[ReferMethod] = FAMILY.methods
REFER_PRESET_DESCRIPTIONS: Registry[str] = FAMILY.descriptions

ReferPresetSpec = ReferPreset | Mapping[str, Any]


def register_refer_method(
    name: str,
    run: ReferRun,
    *,
    encoders: Sequence[str] = ENCODERS,
    description: str = "",
    reference: str = "",
    preset: ReferPresetSpec | None = None,
    presets: Mapping[str, ReferPresetSpec] | None = None,
    replace_existing: bool = False,
) -> ReferMethod:
    """Add a referring method and its presets.

    ``presets``: preset name -> a :class:`~zsdense.config.ReferPreset` (a subclass may add
    fields) or a mapping of its fields over the defaults (a ``description`` key describes the
    preset). ``preset`` is the short form for one preset named after the method; with neither,
    one preset of the defaults. ``encoders``: which of ``clip`` / ``sam`` the run's setup loads
    (from the preset's ``clip_arch`` / ``sam_arch``), so missing weights fail before the first
    image. A name already registered is a ConfigError unless ``replace_existing``.
    """
    FAMILY.check_new(name, replace_existing)
    if not callable(run):
        raise ConfigError(f"referring method {name!r}: run must be a function")
    bad = sorted(set(encoders) - set(ENCODERS))
    if bad:
        raise ConfigError(f"referring method {name!r}: unknown encoder(s) {bad}; use {ENCODERS}")
    built = FAMILY.build_presets(
        name, preset, presets, lambda p, spec: _build_preset(p, name, spec), replace_existing
    )
    return FAMILY.add(name, ReferMethod(name, run, tuple(encoders), description, reference), built)


def register_refer_preset(
    name: str, method: str, *, description: str = "", replace_existing: bool = False, **fields_
) -> ReferPreset:
    """Add a preset of an already registered referring method (``fields_`` over the
    :class:`~zsdense.config.ReferPreset` defaults)."""
    spec = {**fields_, "description": description}
    return FAMILY.add_preset(
        name, method, spec, lambda p, s: _build_preset(p, method, s), replace_existing
    )


def _build_preset(pname: str, method: str, spec: ReferPresetSpec) -> tuple[ReferPreset, str]:
    return preset_from_spec(ReferPreset, pname, method, spec)


def unregister_refer_method(name: str) -> None:
    """Remove a referring method and its presets (tests, plug-in reloads)."""
    FAMILY.withdraw(name)


def get_refer_method(name: str) -> ReferMethod:
    """The registered method, or a ConfigError listing the registered ones."""
    return REFER_METHODS.lookup(name)


def refer_methods_table() -> str:
    """A Markdown table of the referring presets and their methods (README, info)."""

    def row(pname: str, _preset: ReferPreset, m: ReferMethod) -> list[str]:
        enc = " + ".join({"clip": "CLIP", "sam": "SAM"}[e] for e in m.encoders) or "-"
        return [f"`{pname}`", m.name, enc, REFER_PRESET_DESCRIPTIONS.get(pname) or m.description]

    header = ("preset", "method", "encoders", "what")
    return FAMILY.table(header, row)


# ---- the task ---------------------------------------------------------------------------------


def refer_one(rt, ctx, text: str, cfg: ReferPreset) -> ReferResult:
    """Parse ``text`` with the preset's parser, run the preset's method on ``ctx``, and add the
    meta every referring result carries (task, preset, method, the parse, fallback)."""
    from zsdense.text.parse import analyse

    if not isinstance(text, str) or not text.strip():
        raise ConfigError("a referring expression must be a non-empty string")
    method = get_refer_method(cfg.method)
    t0 = time.perf_counter()
    expr = analyse(
        text,
        backend=cfg.parser,
        right_relation=cfg.right_relation,
        fallback_reading=cfg.fallback_reading,
    )
    parse_s = time.perf_counter() - t0
    res = method.run(rt, ctx, expr, cfg)
    if not isinstance(res, ReferResult):
        raise TypeError(
            f"referring method {method.name!r} returned {type(res).__name__}, not a ReferResult"
        )
    if tuple(res.mask.shape) != tuple(ctx.size):
        raise ValueError(
            f"referring method {method.name!r} returned a mask of shape {res.mask.shape} for "
            f"an image of size {tuple(ctx.size)}"
        )
    meta = dict(rt.result_meta()) if hasattr(rt, "result_meta") else {}
    meta.update(
        {
            "task": "refer",
            "preset": cfg.name,
            "method": method.name,
            "text": text,
            "sentence": expr.sentence,
            "noun_phrase": expr.noun_phrase,
            "context": list(expr.context),
            "relation": expr.relation,
            "direction": expr.direction,
            "parser": expr.backend,
        }
    )
    meta.update(res.meta)
    meta.setdefault("fallback", None)
    if isinstance(meta.get("timing"), dict):
        meta["timing"] = {**meta["timing"], "parse": round(parse_s, 6)}
    res.meta = meta
    if res.fallback and not math.isnan(res.score):
        res.score = float("nan")  # a stand-in has no score (see ReferResult)
    return res


def run_refer(
    rt,
    ctxs: Sequence[Any],
    texts: Sequence[str],
    options: ReferOptions | None = None,
    /,
    **kwargs: Any,
) -> list[ReferResult]:
    """One :class:`ReferResult` per (context, text) pair, by the preset's registered method.

    ``options``: a :class:`~zsdense.options.ReferOptions`, or keyword arguments mapped onto one:
    ``preset`` (``hybridgl``, the reference, ``hybridgl+``, the default: defects fixed, or any
    registered preset) and any :class:`~zsdense.config.ReferPreset` field (unknown names are a
    ConfigError). Per-image work (HybridGL: SAM proposals and mask features) is cached in each
    ImageContext, so further expressions on the same context cost only text and scoring.
    """
    if options is None:
        if kwargs.get("preset") is None:
            kwargs.pop("preset", None)
        options = ReferOptions.from_mapping(kwargs)
    elif kwargs:
        raise ConfigError("give a ReferOptions or keyword options, not both")
    if len(ctxs) != len(texts):
        raise ConfigError(
            f"refer needs one text per image: got {len(ctxs)} images, {len(texts)} texts"
        )
    cfg = options.config()
    return [refer_one(rt, ctx, text, cfg) for ctx, text in zip(ctxs, texts)]


def load_encoders(rt, options: ReferOptions) -> None:
    """Load every model the preset's method declares (a run's setup, before its first image)."""
    cfg = options.config()
    method = get_refer_method(cfg.method)
    if "clip" in method.encoders:
        rt.clip(cfg.clip_arch)
    if "sam" in method.encoders:
        rt.sam(cfg.sam_arch)
