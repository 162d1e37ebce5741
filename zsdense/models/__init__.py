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
        if hasattr(model, "_pos_cache"):
            model._pos_cache.clear()
    return model


def _cached(key: tuple, build: Callable[[], object]) -> object:
    with _LOCK:
        obj = _CACHE.get(key)
        if obj is None:
            obj = build()
            _CACHE[key] = obj
        return obj


def _check_models(models: str) -> None:
    from zsdense.errors import ConfigError

    if models not in MODEL_SETS:
        raise ConfigError(f"unknown model set {models!r}; choose one of: {', '.join(MODEL_SETS)}")


def get_clip(
    arch: str,
    *,
    models: str = "default",
    device: str = "cpu",
    weights_dir=None,
    download=None,
    pretrained: str = "openai",
    dtype=None,
):
    """The CLIP ``arch`` (open_clip name), real weights or ``tiny`` random ones, cached."""
    from zsdense.models import clip

    _check_models(models)
    key = ("clip", arch, pretrained, models, str(device), str(weights_dir), str(dtype))
    if models == "tiny":
        build = lambda: clip.build_tiny_clip(arch).to(device)  # noqa: E731
    elif models == "random":
        build = lambda: clip.build_random_clip(arch).to(device)  # noqa: E731
    else:
        build = lambda: clip.load_clip(  # noqa: E731
            arch, pretrained=pretrained, weights_dir=weights_dir, device=device, download=download
        )
    return _cached(key, lambda: _cast(build(), dtype))


def get_dinov2(
    name: str = "dinov2-reg-base",
    *,
    models: str = "default",
    device: str = "cpu",
    weights_dir=None,
    download=None,
    dtype=None,
):
    """DINOv2 by registry name (``dinov2-reg-base``...), real or ``tiny``, cached."""
    from zsdense.models import dinov2

    _check_models(models)
    key = ("dinov2", name, models, str(device), str(weights_dir), str(dtype))
    if models in ("tiny", "random"):
        build = lambda: dinov2.build_dinov2(name, tiny=models == "tiny").to(device)  # noqa: E731
    else:
        build = lambda: dinov2.load_dinov2(  # noqa: E731
            name, weights_dir=weights_dir, device=device, download=download
        )
    return _cached(key, lambda: _cast(build(), dtype))


def get_sam(
    arch: str = "vit_b",
    *,
    models: str = "default",
    device: str = "cpu",
    weights_dir=None,
    download=None,
    dtype=None,
):
    """SAM ``vit_b|vit_l|vit_h``, real or ``tiny``, cached."""
    from zsdense.models import sam

    _check_models(models)
    key = ("sam", arch, models, str(device), str(weights_dir), str(dtype))
    if models in ("tiny", "random"):
        build = lambda: sam.build_sam(arch, tiny=models == "tiny").to(device)  # noqa: E731
    else:
        build = lambda: sam.load_sam(  # noqa: E731
            arch, weights_dir=weights_dir, device=device, download=download
        )
    return _cached(key, lambda: _cast(build(), dtype))


def clear_cache() -> None:
    """Drop every cached model (tests; freeing memory)."""
    with _LOCK:
        _CACHE.clear()
