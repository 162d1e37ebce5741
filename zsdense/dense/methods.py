"""The registry of dense open-vocabulary methods: a new method is one function + one entry.

A method turns a batch of CLIP-normalised windows into L2-normalised dense features that the
open-vocabulary head scores against the class embeddings (segment-then-splice), or, for
``pipeline="splice-then-segment"`` (Trident), is run by the head's own pipeline.

``register_method`` adds the method *and* a preset of the same name (the method's defaults,
``zsdense.config.OpenVocabPreset`` fields), so the CLI's ``--preset`` choices, ``zsdense info``
and the README table (``zsdense info --methods``) pick it up with no other edit::

    from zsdense.dense.methods import register_method

    def my_features(clip, x_norm_bchw, cfg, vfm_fn):   # -> (B, D, gh, gw), L2-normalised
        ...

    register_method("mymethod", my_features, description="...", preset={"crop": 224})

**Dtypes (the contract).** A method is called inside the run's autocast (``seg.autocast()``)
with ``clip`` in the run's precision: its weights are bf16 under ``--precision bf16`` (and under
``auto`` on a CPU with native bf16, or a CUDA GPU), fp32 otherwise; ``clip.dtype`` says which.

- It receives ``x_norm_bchw`` as **float32** (CLIP-normalised windows on ``clip.device``), and
  ``vfm_fn`` (or None) returning DINOv2 features in the DINOv2's dtype.
- The library casts at its entry points, so a method need not: ``clip.embed``,
  ``clip.run_blocks``, ``clip.forward_layers`` and ``clip.head`` cast what they are given to the
  model's dtype (and return that dtype); ``vfm_fn`` casts to the DINOv2's dtype. A method that
  uses weights directly (``clip.block(i)``, ``clip.model``) gets them in the model's dtype and
  must match it itself (``x.to(clip.dtype)``); autocast covers matrix products, not layer norms.
- It may return any floating dtype (float32 or the model's), (B, D, gh, gw), L2-normalised over
  D. The head scores it against the text embeddings (cast to the features' dtype) under the same
  autocast, and every array in the result (``probs``; ``labels`` are int64) is float32.

A method written and tested at fp32 thus also runs at bf16, with bf16's tolerance (README,
"Devices and precision"); ``tests/test_method_dtypes.py`` runs one both ways.

The built-in CLIP last blocks (SCLIP, ClearCLIP, NACLIP, ProxyCLIP) register themselves in
:mod:`zsdense.dense.lastblock`; Trident in :mod:`zsdense.tasks.openvocab`. Crane's E-Attn
correlation types are the registry ``zsdense.dense.attention.CORRELATION_TYPES``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from zsdense.config import OPENVOCAB_PRESETS, OpenVocabPreset
from zsdense.errors import ConfigError

# (clip, x_norm_bchw, preset, vfm_fn or None) -> (B, D, gh, gw) float, L2-normalised over D
FeatureFn = Callable[[Any, Any, OpenVocabPreset, Any], Any]
PIPELINES = ("segment-then-splice", "splice-then-segment")


@dataclass(frozen=True)
class DenseMethod:
    """One dense method: its feature function and the encoders it needs."""

    name: str
    features: FeatureFn | None
    needs_vfm: bool = False  # a DINOv2 guides the attention (ProxyCLIP, Trident)
    needs_sam: bool = False  # SAM's attention / masks are used (Trident)
    pipeline: str = "segment-then-splice"
    description: str = ""
    reference: str = ""


METHODS: dict[str, DenseMethod] = {}


def register_method(
    name: str,
    features: FeatureFn | None,
    *,
    needs_vfm: bool = False,
    needs_sam: bool = False,
    pipeline: str = "segment-then-splice",
    description: str = "",
    reference: str = "",
    preset: OpenVocabPreset | Mapping[str, Any] | None = None,
    replace_existing: bool = False,
) -> DenseMethod:
    """Add a method and (unless a preset of that name exists) a preset named after it.

    ``features(clip, x_norm_bchw, cfg, vfm_fn) -> (B, D, gh, gw)``: see the module docstring for
    what it receives (float32 windows, ``clip`` in the run's dtype, inside autocast), what it may
    return (any float dtype, L2-normalised over D) and who casts (the library, at
    ``clip.embed`` / ``run_blocks`` / ``forward_layers`` / ``head`` and the text scoring).

    ``replace_existing`` allows re-registering a method (module reloads); existing presets are
    never replaced.

    ``preset``: a full :class:`OpenVocabPreset`, or a mapping of fields overriding the defaults.
    """
    if name in METHODS and not replace_existing:
        raise ConfigError(f"dense method {name!r} is already registered")
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; choose one of: {', '.join(PIPELINES)}")
    if features is None and pipeline == "segment-then-splice":
        raise ConfigError(f"method {name!r}: segment-then-splice needs a feature function")
    entry = DenseMethod(name, features, needs_vfm, needs_sam, pipeline, description, reference)
    METHODS[name] = entry
    if isinstance(preset, OpenVocabPreset):
        OPENVOCAB_PRESETS.setdefault(preset.name, preset)
    elif name not in OPENVOCAB_PRESETS:
        fields_ = dict(preset or {})
        if needs_vfm:
            fields_.setdefault("vfm", "dinov2-reg-base")
        if needs_sam:
            fields_.setdefault("sam_arch", "vit_b")
        OPENVOCAB_PRESETS[name] = replace(OpenVocabPreset(name, name), **fields_)
    return entry


def unregister_method(name: str) -> None:
    """Remove a method and the preset of the same name (tests, plug-in reloads)."""
    METHODS.pop(name, None)
    p = OPENVOCAB_PRESETS.get(name)
    if p is not None and p.method == name:
        OPENVOCAB_PRESETS.pop(name)


def get_method(name: str) -> DenseMethod:
    """The registered method, or a ConfigError listing the registered ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown dense method {name!r}; registered: {', '.join(sorted(METHODS))}"
        ) from None


def methods_table() -> str:
    """A Markdown table of the open-vocabulary presets and their methods (README, info)."""
    rows = ["| preset | method | encoders | pipeline | what |", "|---|---|---|---|---|"]
    for pname, p in OPENVOCAB_PRESETS.items():
        m = METHODS.get(p.method)
        if m is None:
            continue
        enc = ["CLIP"] + (["DINOv2"] if m.needs_vfm else []) + (["SAM"] if m.needs_sam else [])
        rows.append(
            f"| `{pname}` | {m.name} | {' + '.join(enc)} | {m.pipeline} | {m.description} |"
        )
    return "\n".join(rows)
