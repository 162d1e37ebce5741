"""Upsampling of K-channel score maps to the image size, and PAMR refinement.

Default: bilinear (``align_corners=False``), what every reference method does. Option: joint
bilateral upsampling (JBU) guided by the RGB image, applied to the K-channel score maps (never to
the high-dimensional features): for an output pixel p with low-resolution position p/s,

    f̂(p) = Σ_q f(q)·exp(-‖p/s - q‖² / 2σ_s²)·exp(-‖I_p - Ī_q‖² / 2σ_r²) / Σ weights

over the low-resolution samples q in a (2r+1)² neighbourhood of p/s, Ī the image averaged over
each low-resolution cell. ``σ_s`` is in low-resolution cells, ``σ_r`` in [0, 1] colour units.

PAMR (pixel-adaptive mask refinement, used by NACLIP): local colour affinities at a few
dilations, iterated as a weighted average of each pixel's 8 neighbours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zsdense.config import UPSAMPLE_MODES
from zsdense.errors import ConfigError


def upsample_scores(
    scores_khw: torch.Tensor,
    out_hw: tuple[int, int],
    mode: str = "bilinear",
    *,
    guide_hwc: torch.Tensor | None = None,
    sigma_spatial: float = 1.0,
    sigma_range: float = 0.1,
    radius: int | None = None,
) -> torch.Tensor:
    """Score maps (K, h, w) -> (K, H, W); ``mode`` ``bilinear`` or ``jbu`` (needs ``guide_hwc``,
    the (H, W, 3) image in [0, 1])."""
    out_hw = (int(out_hw[0]), int(out_hw[1]))
    if mode == "bilinear":
        if tuple(scores_khw.shape[-2:]) == out_hw:
            return scores_khw
        return F.interpolate(scores_khw[None], size=out_hw, mode="bilinear", align_corners=False)[0]
    if mode != "jbu":
        raise ConfigError(f"unknown upsampling {mode!r}; choose one of {', '.join(UPSAMPLE_MODES)}")
    if guide_hwc is None:
        raise ConfigError("joint bilateral upsampling needs the guide image")
    return joint_bilateral_upsample(
        scores_khw, guide_hwc, sigma_spatial=sigma_spatial, sigma_range=sigma_range, radius=radius
    )


def joint_bilateral_upsample(
    scores_khw: torch.Tensor,
    guide_hwc: torch.Tensor,
    *,
    sigma_spatial: float = 1.0,
    sigma_range: float = 0.1,
    radius: int | None = None,
) -> torch.Tensor:
    """JBU of (K, h, w) scores to the guide's (H, W); loops over the (2r+1)² offsets only."""
    k, h, w = scores_khw.shape
    H, W = int(guide_hwc.shape[0]), int(guide_hwc.shape[1])
    r = int(math.ceil(2 * sigma_spatial)) if radius is None else int(radius)
    dev, dt = scores_khw.device, scores_khw.dtype
    guide = guide_hwc.to(device=dev, dtype=dt).permute(2, 0, 1)  # (3, H, W)
    low_guide = F.adaptive_avg_pool2d(guide[None], (h, w))[0]  # (3, h, w)
    # low-resolution position of every output pixel (pixel centres)
    py = (torch.arange(H, device=dev, dtype=dt) + 0.5) * (h / H) - 0.5  # (H,)
    px = (torch.arange(W, device=dev, dtype=dt) + 0.5) * (w / W) - 0.5  # (W,)
    cy, cx = torch.round(py).long(), torch.round(px).long()
    num = scores_khw.new_zeros(k, H, W)
    den = scores_khw.new_zeros(1, H, W)
    for dy in range(-r, r + 1):
        qy = (cy + dy).clamp(0, h - 1)
        wy = torch.exp(-((py - qy.to(dt)) ** 2) / (2 * sigma_spatial**2))  # (H,)
        for dx in range(-r, r + 1):
            qx = (cx + dx).clamp(0, w - 1)
            wx = torch.exp(-((px - qx.to(dt)) ** 2) / (2 * sigma_spatial**2))  # (W,)
            g = low_guide.index_select(1, qy).index_select(2, qx)  # (3, H, W)
            wr = torch.exp(-((guide - g) ** 2).sum(0, keepdim=True) / (2 * sigma_range**2))
            wgt = wy[None, :, None] * wx[None, None, :] * wr  # (1, H, W)
            num.addcmul_(scores_khw.index_select(1, qy).index_select(2, qx), wgt)
            den += wgt
    return num / den.clamp_min(1e-12)


_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _shifted(xp: torch.Tensor, d: int, dy: int, dx: int, hw: tuple[int, int]) -> torch.Tensor:
    """View of the replicate-padded ``xp`` shifted by (dy, dx)·d, cropped to ``hw``."""
    h, w = hw
    return xp[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w]


def pamr(
    image_bchw: torch.Tensor,
    masks_bkhw: torch.Tensor,
    *,
    num_iter: int = 10,
    dilations: tuple[int, ...] = (8, 16),
) -> torch.Tensor:
    """PAMR: refine masks/scores (B, K, H, W) with local affinities of the image (B, 3, H, W).

    Affinity to each of the 8 neighbours at every dilation: ``-|I_p - I_q| / (1e-8 + 0.1·σ_p)``
    (σ_p the local standard deviation over the 3×3 neighbourhood incl. the centre), averaged over
    colour channels and softmaxed over all neighbours; then ``num_iter`` times
    ``m_p ← Σ_q a_pq m_q``. Neighbours are accumulated one shift at a time (no (K·8·d)-fold
    copies), so memory stays at a few (K, H, W) maps.
    """
    if masks_bkhw.shape[-2:] != image_bchw.shape[-2:]:
        masks_bkhw = F.interpolate(
            masks_bkhw, size=image_bchw.shape[-2:], mode="bilinear", align_corners=True
        )
    hw = tuple(image_bchw.shape[-2:])
    x = image_bchw.to(masks_bkhw.dtype)
    logits = []
    for d in dilations:
        xp = F.pad(x, (d, d, d, d), mode="replicate")
        nb = torch.stack(
            [_shifted(xp, d, dy, dx, hw) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dim=2
        )  # (B, 3, 9, H, W)
        std = nb.std(dim=2)  # (B, 3, H, W), unbiased, centre included
        for dy, dx in _OFFSETS:
            diff = (_shifted(xp, d, dy, dx, hw) - x).abs()
            logits.append((-diff / (1e-8 + 0.1 * std)).mean(dim=1, keepdim=True))
    aff = torch.softmax(torch.stack(logits, dim=0), dim=0)  # (8·nd, B, 1, H, W)
    m = masks_bkhw
    for _ in range(num_iter):
        out = torch.zeros_like(m)
        i = 0
        for d in dilations:
            mp = F.pad(m, (d, d, d, d), mode="replicate")
            for dy, dx in _OFFSETS:
                out.addcmul_(_shifted(mp, d, dy, dx, hw), aff[i])
                i += 1
        m = out
    return m
