"""The registry of dense open-vocabulary methods: a new method is one file with one call.

A method turns a batch of CLIP-normalised windows into L2-normalised dense features that the
open-vocabulary head scores against the class embeddings (segment-then-splice), or, for
``pipeline="splice-then-segment"`` (Trident), is run by the head's own pipeline.

:func:`register_method` adds the method *and* its presets (each with its own description) and,
optionally, its benchmark settings per dataset (``--dataset-preset``). The CLI's ``--preset``
choices, ``zsdense info --methods`` and the README table (:func:`methods_table`) read the
registry, so nothing else needs an edit::

    # my_package/zsdense_plugin.py (a plug-in: name it in the ``zsdense.methods`` entry-point
    # group), or zsdense/methods/mymethod.py (a built-in)
    from zsdense.dense.methods import register_method

    def my_features(clip, x_norm_bchw, cfg, vfm_fn):   # -> (B, D, gh, gw), L2-normalised
        ...

    register_method(
        "mymethod", my_features, description="what it does", reference="Paper, 2025",
        presets={"mymethod": {"crop": 224},
                 "mymethod-wide": {"crop": 448, "description": "448-px windows"}},
        datasets={"voc21": {"prob_thd": 0.2}},
    )

**Dtypes (the contract).** A method is called inside the run's autocast (``rt.autocast()``)
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

The built-ins are the files of ``zsdense/methods/`` (the feature functions themselves live in
:mod:`zsdense.dense.lastblock` and :mod:`zsdense.tasks.openvocab`). Crane's E-Attn correlation
types are the table ``zsdense.config.CORRELATION_TYPES``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from zsdense.config import (
    OPENVOCAB_DATASET_PRESETS,
    OPENVOCAB_PRESETS,
    OpenVocabPreset,
    preset_from_spec,
)
from zsdense.errors import ConfigError
from zsdense.plugins import MethodFamily, Registry

# (clip, x_norm_bchw, preset, vfm_fn or None) -> (B, D, gh, gw) float, L2-normalised over D
FeatureFn = Callable[[Any, Any, OpenVocabPreset, Any], Any]
PIPELINES = ("segment-then-splice", "splice-then-segment")
FAMILY = MethodFamily.over(OPENVOCAB_PRESETS, "dense method", "open-vocabulary preset")
METHODS: Registry[DenseMethod] = FAMILY.methods
PRESET_DESCRIPTIONS: Registry[str] = FAMILY.descriptions

PresetSpec = OpenVocabPreset | Mapping[str, Any]


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


def register_method(
    name: str,
    features: FeatureFn | None,
    *,
    needs_vfm: bool = False,
    needs_sam: bool = False,
    pipeline: str = "segment-then-splice",
    description: str = "",
    reference: str = "",
    preset: PresetSpec | None = None,
    presets: Mapping[str, PresetSpec] | None = None,
    datasets: Mapping[str, Mapping[str, Any]] | None = None,
    replace_existing: bool = False,
) -> DenseMethod:
    """Add a method, its presets and its per-dataset settings.

    ``presets``: preset name -> an :class:`OpenVocabPreset` or a mapping of its fields over the
    defaults (a ``description`` key describes that preset; without one it shares the method's).
    ``preset`` (one mapping) is the short form of ``presets={name: preset}``; with neither, one
    preset named after the method with the defaults. A method using DINOv2 / SAM gets
    ``vfm="dinov2-reg-base"`` / ``sam_arch="vit_b"`` unless its preset says otherwise.
    ``datasets``: dataset name (``zsdense.config.OPENVOCAB_DATASETS``) -> preset fields, applied
    by ``--dataset-preset`` / ``dataset=``.

    ``features(clip, x_norm_bchw, cfg, vfm_fn) -> (B, D, gh, gw)``: see the module docstring for
    what it receives (float32 windows, ``clip`` in the run's dtype, inside autocast), what it may
    return (any float dtype, L2-normalised over D) and who casts (the library, at
    ``clip.embed`` / ``run_blocks`` / ``forward_layers`` / ``head`` and the text scoring).

    A name (method or preset) already registered is a ConfigError unless ``replace_existing``.
    """
    FAMILY.check_new(name, replace_existing)
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; choose one of: {', '.join(PIPELINES)}")
    if features is None and pipeline == "segment-then-splice":
        raise ConfigError(f"method {name!r}: segment-then-splice needs a feature function")
    built = FAMILY.build_presets(
        name,
        preset,
        presets,
        lambda pname, spec: _build_preset(pname, name, spec, needs_vfm, needs_sam),
        replace_existing,
    )
    if datasets:
        valid = {f.name for f in fields(OpenVocabPreset)} - {"name", "method"}
        for ds, over in datasets.items():
            bad = sorted(set(over) - valid)
            if bad:
                raise ConfigError(f"method {name!r}, dataset {ds!r}: unknown field(s) {bad}")
    entry = DenseMethod(name, features, needs_vfm, needs_sam, pipeline, description, reference)
    FAMILY.add(name, entry, built)
    if datasets:
        OPENVOCAB_DATASET_PRESETS[name] = {ds: dict(v) for ds, v in datasets.items()}
    return entry


def register_openvocab_preset(
    name: str, method: str, *, description: str = "", replace_existing: bool = False, **fields_
) -> OpenVocabPreset:
    """Add a preset of an already registered method (e.g. a plug-in's tuning of ``trident``):
    ``fields_`` are :class:`OpenVocabPreset` fields over the defaults."""
    m = get_method(method)
    return FAMILY.add_preset(
        name,
        method,
        {**fields_, "description": description},
        lambda pname, spec: _build_preset(pname, method, spec, m.needs_vfm, m.needs_sam),
        replace_existing,
    )


def _build_preset(
    pname: str, method: str, spec: PresetSpec, needs_vfm: bool, needs_sam: bool
) -> tuple[OpenVocabPreset, str]:
    encoders = {"vfm": "dinov2-reg-base"} if needs_vfm else {}
    if needs_sam:
        encoders["sam_arch"] = "vit_b"
    return preset_from_spec(OpenVocabPreset, pname, method, spec, encoders)


def unregister_method(name: str) -> None:
    """Remove a method, its presets and its dataset settings (tests, plug-in reloads)."""
    OPENVOCAB_DATASET_PRESETS.pop(name, None)
    FAMILY.withdraw(name)


def get_method(name: str) -> DenseMethod:
    """The registered method, or a ConfigError listing the registered ones."""
    return METHODS.lookup(name)


def methods_table() -> str:
    """A Markdown table of the open-vocabulary presets and their methods (README, info)."""

    def row(pname: str, _preset: OpenVocabPreset, m: DenseMethod) -> list[str]:
        enc = ["CLIP"] + (["DINOv2"] if m.needs_vfm else []) + (["SAM"] if m.needs_sam else [])
        what = PRESET_DESCRIPTIONS.get(pname) or m.description
        return [f"`{pname}`", m.name, " + ".join(enc), m.pipeline, what]

    header = ("preset", "method", "encoders", "pipeline", "what")
    return FAMILY.table(header, row)
