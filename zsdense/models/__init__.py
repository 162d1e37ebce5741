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

MODEL_SETS = ("default", "tiny")


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
):
    """The CLIP ``arch`` (open_clip name), real weights or ``tiny`` random ones, cached."""
    from zsdense.models import clip

    _check_models(models)
    key = ("clip", arch, pretrained, models, str(device), str(weights_dir))
    if models == "tiny":
        return _cached(key, lambda: clip.build_tiny_clip(arch).to(device))
    return _cached(
        key,
        lambda: clip.load_clip(
            arch, pretrained=pretrained, weights_dir=weights_dir, device=device, download=download
        ),
    )


def get_dinov2(
    name: str = "dinov2-reg-base",
    *,
    models: str = "default",
    device: str = "cpu",
    weights_dir=None,
    download=None,
):
    """DINOv2 by registry name (``dinov2-reg-base``...), real or ``tiny``, cached."""
    from zsdense.models import dinov2

    _check_models(models)
    key = ("dinov2", name, models, str(device), str(weights_dir))
    if models == "tiny":
        return _cached(key, lambda: dinov2.build_dinov2(name, tiny=True).to(device))
    return _cached(
        key,
        lambda: dinov2.load_dinov2(name, weights_dir=weights_dir, device=device, download=download),
    )


def get_sam(
    arch: str = "vit_b",
    *,
    models: str = "default",
    device: str = "cpu",
    weights_dir=None,
    download=None,
):
    """SAM ``vit_b|vit_l|vit_h``, real or ``tiny``, cached."""
    from zsdense.models import sam

    _check_models(models)
    key = ("sam", arch, models, str(device), str(weights_dir))
    if models == "tiny":
        return _cached(key, lambda: sam.build_sam(arch, tiny=True).to(device))
    return _cached(
        key,
        lambda: sam.load_sam(arch, weights_dir=weights_dir, device=device, download=download),
    )


def clear_cache() -> None:
    """Drop every cached model (tests; freeing memory)."""
    with _LOCK:
        _CACHE.clear()
