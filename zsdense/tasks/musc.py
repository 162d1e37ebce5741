"""Batch mutual scoring (``musc``, MuSc-style): unlabelled images of one category score each other.

For every image i and every other image j of the set, a patch p of i gets the distance to its
nearest patch in j, ``d_j(p) = min_q ‖z_i,p − z_j,q‖₂``; its score is the mean of the smallest
30 % of ``{d_j(p)}_j`` (a defect is far from every other image; a normal patch has close matches
in most of them). Features: raw residual tokens of CLIP blocks 6/12/18/24 (scaled to the model's
depth) at the input size, layer-normalised per image over (N, C) without affine weights,
averaged over r×r neighbourhoods (r ∈ {1, 3, 5}, zero padding counted, as unfold + average does),
L2-normalised. Maps are averaged over layers and r, upsampled bilinearly and smoothed like Crane's.

Image score: the max of the map, min-max normalised over the set, then smoothed over the k
nearest images in CLIP class-token space (k ∈ {1, 2, 3}, the image itself included, weights =
cosine similarities row-normalised; averaged over k).

Cost and memory grow with (images × patches)²: sets larger than ``musc_group_size`` are split
into groups (each ≥ ``musc_min_images``) that are scored independently.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from zsdense.errors import ConfigError


def layer_features(tokens_bnc: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Raw patch tokens (B, N, C) -> LN over (N, C) (no affine), r×r mean, L2 norm: (B, N, C)."""
    b, n, c = tokens_bnc.shape
    x = F.layer_norm(tokens_bnc.float(), (n, c))
    if r > 1:
        g = x.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        g = F.avg_pool2d(g, kernel_size=r, stride=1, padding=r // 2, count_include_pad=True)
        x = g.flatten(2).transpose(1, 2)
    return F.normalize(x, dim=-1)


def mutual_scores(z_mnc: torch.Tensor, topmin: float = 0.3) -> torch.Tensor:
    """(M, N, C) L2-normalised features -> (M, N) patch scores (mean of the smallest ``topmin``
    fraction of nearest-patch distances to the other M − 1 images)."""
    m, n, _ = z_mnc.shape
    if m < 2:
        raise ConfigError("mutual scoring needs at least 2 images")
    d = torch.zeros(m, m, n, dtype=z_mnc.dtype, device=z_mnc.device)  # d[i, j, p]
    for i in range(m):
        for j in range(i + 1, m):
            sim = z_mnc[i] @ z_mnc[j].t()  # (N_i, N_j); ‖a−b‖² = 2 − 2 a·b for unit vectors
            d[i, j] = (2.0 - 2.0 * sim.max(dim=1).values).clamp_min(0.0).sqrt()
            d[j, i] = (2.0 - 2.0 * sim.max(dim=0).values).clamp_min(0.0).sqrt()
    eye = torch.eye(m, dtype=torch.bool, device=z_mnc.device)
    others = d[~eye].reshape(m, m - 1, n)  # (M, M-1, N)
    k = max(1, int((m - 1) * topmin))
    smallest = others.topk(k, dim=1, largest=False).values
    return smallest.mean(dim=1)


def neighbour_smoothing(
    scores_m: torch.Tensor, embeds_md: torch.Tensor, ks: Sequence[int] = (1, 2, 3)
) -> torch.Tensor:
    """Smooth image scores over the k most similar images (self included), averaged over k."""
    e = F.normalize(embeds_md.float(), dim=-1)
    sim = e @ e.t()
    m = sim.shape[0]
    outs = []
    for k in ks:
        kk = max(1, min(int(k), m))
        vals, idx = sim.topk(kk, dim=1)
        w = torch.zeros_like(sim).scatter_(1, idx, vals.clamp_min(1e-6))
        w = w / w.sum(dim=1, keepdim=True)
        outs.append(w @ scores_m)
    return torch.stack(outs).mean(dim=0)


def group_sizes(m: int, group: int, minimum: int) -> list[int]:
    """Split m images into near-equal groups of at most ``group`` and at least ``minimum``."""
    n = max(1, min(math.ceil(m / max(group, 1)), m // max(minimum, 1)))
    base, extra = divmod(m, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def _features(seg, cfg, ctxs: list) -> list[dict]:
    from zsdense.dense.crane import scale_layers
    from zsdense.tasks.anomaly import model_input

    clip = seg.clip(cfg.clip_arch)
    layers = scale_layers(cfg.musc_layers, clip.num_layers)
    x = clip.normalize(model_input(ctxs, cfg.image_size, seg.device))
    with seg.autocast():
        o = clip.embed(x, "bilinear")
        got = clip.forward_layers(o, sorted(set(layers) | {clip.num_layers}))
        glob = F.normalize(clip.head(got[clip.num_layers][:, 0]).float(), dim=-1)
    grid = (x.shape[-2] // clip.patch_size, x.shape[-1] // clip.patch_size)
    per_layer = {layer: got[layer][:, 1:].float().cpu() for layer in layers}
    return [
        {
            "tokens": {layer: t[i] for layer, t in per_layer.items()},
            "global": glob[i].cpu(),
            "grid": grid,
            "layers": layers,
        }
        for i in range(len(ctxs))
    ]


@torch.no_grad()
def run_musc(seg, cfg, ctxs: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Smoothed maps (M, S, S) and image scores (M,) for a set of images of one category."""
    from zsdense.dense.crane import upsample_grid
    from zsdense.dense.smoothing import smooth_maps
    from zsdense.tasks.anomaly import batched_get

    m = len(ctxs)
    if m < cfg.musc_min_images:
        raise ConfigError(
            f"preset musc scores images against each other and needs at least "
            f"{cfg.musc_min_images} images of one category; got {m}. Give more images (a "
            f"folder of one product) or use --preset crane"
        )
    if cfg.musc_backbone != "clip":
        raise ConfigError(f"musc backbone {cfg.musc_backbone!r} is not available; use 'clip'")
    key = ("musc-feats", cfg.clip_arch, cfg.image_size, cfg.musc_layers)
    bs = int(seg.config.batch_size)
    feats: list[dict] = []
    for i in range(0, m, bs):
        feats.extend(batched_get(ctxs[i : i + bs], key, lambda cs: _features(seg, cfg, cs)))
    grid = feats[0]["grid"]
    layers = feats[0]["layers"]
    size = (cfg.image_size, cfg.image_size)
    sizes = group_sizes(m, cfg.musc_group_size, cfg.musc_min_images)
    patch_scores = []
    start = 0
    for g in sizes:
        part = feats[start : start + g]
        start += g
        acc = None
        for layer in layers:
            tok = torch.stack([f["tokens"][layer] for f in part]).to(seg.device)  # (g, N, C)
            for r in cfg.musc_r:
                s = mutual_scores(layer_features(tok, grid, int(r)), cfg.musc_topmin)
                acc = s if acc is None else acc + s
        patch_scores.append((acc / (len(layers) * len(cfg.musc_r))).cpu())
    patch = torch.cat(patch_scores, dim=0)  # (M, N)
    maps = upsample_grid(patch.unsqueeze(-1), grid, size)[..., 0]  # (M, S, S)
    maps = smooth_maps(maps, cfg.sigma, cfg.smoothing_backend)
    raw = maps.flatten(1).max(dim=1).values
    lo, hi = raw.min(), raw.max()
    norm = (raw - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(raw)
    glob = torch.stack([f["global"] for f in feats])
    scores = neighbour_smoothing(norm, glob, cfg.musc_k)
    info = {
        "layers": list(layers),
        "r": list(cfg.musc_r),
        "groups": sizes,
        "topmin": cfg.musc_topmin,
        "k": list(cfg.musc_k),
    }
    return maps, scores, info
