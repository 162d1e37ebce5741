"""Helpers every anomaly head shares: batched per-image caching and the model input batch.

They live below both ``tasks.anomaly`` and ``tasks.musc`` so that neither imports the other.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch


def batched_get(ctxs: Sequence, key: Hashable, compute: Callable[[list], list]) -> list:
    """``ctx.get(key)`` for every context, computing the missing ones in one batched call."""
    missing = [c for c in ctxs if key not in c.cache]
    if missing:
        values = compute(missing)
        for c, v in zip(missing, values):
            c.cache[key] = v
            c.computed[key] += 1
    return [c.cache[key] for c in ctxs]


def exact_inputs(model) -> bool:
    """Whether a model's inputs are resized exactly as the references resize them (PIL): in
    float32, the path that matches the fixtures; a reduced-precision model (bf16, fp16) gets
    torch's faster uint8 resize (:func:`~zsdense.models.clip.preprocess_images`)."""
    return getattr(model, "dtype", torch.float32) == torch.float32


def model_input(
    ctxs: Sequence, size: int, device, interpolation: str = "bicubic", *, exact: bool = True
) -> torch.Tensor:
    """[0, 1] RGB batch (B, 3, size, size): whole image resized like PIL (default bicubic), no
    crop — the ``Resize((S, S))`` of the references, which squashes non-square images.
    ``exact=False``: see :func:`exact_inputs`."""
    from zsdense.models.clip import preprocess_images

    return preprocess_images(
        [c.image for c in ctxs],
        size,
        interpolation=interpolation,
        device=device,
        exact=exact,
        u8s=[c.exact_u8 for c in ctxs],  # decided once per image; the uint8 picture stays for SAM
    )


def resize_map(map_hw: torch.Tensor, size_hw: tuple[int, int]):
    """(S, S) -> (H, W) float32 numpy, bilinear (align_corners=False)."""
    import numpy as np
    import torch.nn.functional as F

    m = map_hw.float()
    if tuple(m.shape[-2:]) != tuple(size_hw):
        m = F.interpolate(m[None, None], size=tuple(size_hw), mode="bilinear", align_corners=False)[
            0, 0
        ]
    return m.cpu().numpy().astype(np.float32, copy=False)


def preset_meta(cfg, domain: str) -> dict:
    """What every CLIP-based anomaly result records about its preset (Crane, MuSc)."""
    return {
        "preset": cfg.name,
        "method": cfg.method,
        "domain": domain,
        "image_size": cfg.image_size,
        "clip_arch": cfg.clip_arch,
        "soft_mean": cfg.soft_mean,
        "sigma": cfg.sigma,
    }
