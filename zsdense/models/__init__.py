"""Encoder wrappers and the per-process model cache.

``get_clip`` / ``get_dinov2`` / ``get_sam`` return one shared instance per
(architecture, models, device, weights dir): however many tasks or images run, each encoder is
loaded once per process. This cache is the only global mutable state in zsdense.
"""

from __future__ import annotations

import threading
from typing import Callable

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()

MODEL_SETS = ("default", "tiny", "random")
MODEL_KINDS = ("clip", "dinov2", "sam")
# default: real checkpoints; tiny: the architectures shrunk to a few layers, random weights
# (tests, smoke runs); random: full-size architectures with random weights (benchmarks).


def _cast(model, dtype):
    """Reduced-precision copy of a wrapper's weights (bf16 only; fp16 stays fp32 + autocast).

    Casting the weights instead of relying on autocast alone matters on CPUs: autocast re-casts
    fp32 weights on every call (they don't require grad, so its cast cache is bypassed), which
    made a ViT-B/16 7x slower than fp32 here, while bf16 weights ran 3.4x faster
    (bench/bench_precision.py). For SAM only the image encoder is cast; outputs stay float32.
    """
    import torch

    if dtype != torch.bfloat16:
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "image_encoder"):  # SAM
        inner.image_encoder.to(dtype)
    elif inner is not None:
        inner.to(dtype)
        if hasattr(model, "clear_caches"):
            model.clear_caches()
    return model


def _cached(key: tuple, build: Callable[[], object]) -> object:
    with _LOCK:
        obj = _CACHE.get(key)
        if obj is None:
            obj = build()
            _CACHE[key] = obj
        return obj


def check_model_set(models: str) -> None:
    """A ConfigError for an unknown ``--models`` value."""
    from zsdense.errors import ConfigError

    if models not in MODEL_SETS:
        raise ConfigError(f"unknown model set {models!r}; choose one of: {', '.join(MODEL_SETS)}")


def _builder(kind: str, name: str, models: str, device, weights_dir, download, **extra):
    """How to build encoder ``kind`` ``name`` for a model set (not cached, not cast)."""
    from zsdense.models import clip, dinov2, sam

    if kind == "clip":
        if models == "tiny":
            return lambda: clip.build_tiny_clip(name).to(device)
        if models == "random":
            return lambda: clip.build_random_clip(name).to(device)
        return lambda: clip.load_clip(
            name, weights_dir=weights_dir, device=device, download=download, **extra
        )
    module, build = {"dinov2": (dinov2, "build_dinov2"), "sam": (sam, "build_sam")}[kind]
    if models in ("tiny", "random"):
        return lambda: getattr(module, build)(name, tiny=models == "tiny").to(device)
    load = getattr(module, f"load_{kind}")
    return lambda: load(name, weights_dir=weights_dir, device=device, download=download)


def get_model(
    kind: str,
    name: str,
    *,
    models: str = "default",
    device: str = "cpu",
    weights_dir=None,
    download=None,
    dtype=None,
    registers=None,
    **extra,
):
    """Encoder ``kind`` (``clip``: open_clip arch, ``pretrained=`` tag; ``dinov2``: registry
    name; ``sam``: ``vit_b|vit_l|vit_h``), real weights or ``tiny``/``random`` ones, loaded
    once per process and settings, cast to ``dtype`` (bf16 weights; see :func:`_cast`).

    ``registers``: a :class:`~zsdense.models.registers.RegisterSpec` to attach for good (CLIP and
    DINOv2; checked against the loaded encoder). The hooked model is its own cache entry (the
    spec's key is part of the cache key), so a process never shares one hooked model between two
    settings; None or R = 0 is the plain, shared model."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}; one of {', '.join(MODEL_KINDS)}")
    check_model_set(models)
    if kind == "clip":
        extra.setdefault("pretrained", "openai")
    key = (kind, name, *extra.values(), models, str(device), str(weights_dir), str(dtype))
    build = _builder(kind, name, models, device, weights_dir, download, **extra)
    if registers is None or not registers.active:
        return _cached(key, lambda: _cast(build(), dtype))
    if kind == "sam":
        raise ValueError("test-time registers apply to CLIP and DINOv2, not SAM")

    def build_hooked():
        from zsdense.models.registers import attach_registers

        model = _cast(build(), dtype)
        attach_registers(model, registers)  # for the lifetime of this cached copy
        return model

    return _cached((*key, "registers", registers.key), build_hooked)


def get_clip(arch: str, *, pretrained: str = "openai", **kw):
    """The CLIP ``arch`` (open_clip name); see :func:`get_model`."""
    return get_model("clip", arch, pretrained=pretrained, **kw)


def get_dinov2(name: str = "dinov2-reg-base", **kw):
    """DINOv2 by registry name (``dinov2-reg-base``...); see :func:`get_model`."""
    return get_model("dinov2", name, **kw)


def get_sam(arch: str = "vit_b", **kw):
    """SAM ``vit_b|vit_l|vit_h``; see :func:`get_model`."""
    return get_model("sam", arch, **kw)


def clear_cache() -> None:
    """Drop every cached model (tests; freeing memory)."""
    with _LOCK:
        _CACHE.clear()
