"""Last-block replacements for dense CLIP features (SCLIP, ClearCLIP, NACLIP, ProxyCLIP).

CLIP blocks 1..L-1 run unchanged; the last block is replaced by one of the functions below,
each written over the block's weights (:class:`zsdense.models.clip.BlockWeights`) with the shared
primitives of :mod:`zsdense.dense.attention`. Tokens are batch-first ``(B, N, C)``; for the
CLIP-only variants the class token stays in the sequence (row 0) as the references keep it, and is
dropped after the head by :func:`dense_clip_features`.

Formulas (``s = head_dim^-0.5``, q/k/v from ``in_proj(ln_1(x))`` per head):

* SCLIP: ``A = softmax(s·qqᵀ) + softmax(s·kkᵀ)``; ``x + out_proj(A v)`` then ``+ MLP(ln_2(.))``.
* ClearCLIP: ``A = softmax(s·qqᵀ)``; ``out_proj(A v)`` (no residual, no MLP).
* NACLIP: ``A = softmax(s·kkᵀ + Ω)`` with a Gaussian Ω over patch coordinates (σ = 5 patches,
  zero class row/column); ``out_proj(A v)`` (no residual, no MLP).
* ProxyCLIP: ``A`` from the VFM's patch features (:func:`proxy_attention`), shared by every head;
  CLIP values resized to the VFM grid; ``out_proj(A v)`` on the VFM grid.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from zsdense.dense.attention import (
    merge_heads,
    out_proj,
    qkv_heads,
    self_correlation_attention,
    split_heads,
    vfm_guided_attention,
)
from zsdense.errors import ConfigError

POS_MODE = "bicubic-scale"  # positional-embedding resize of every open-vocab reference


def sclip_last_block(block_weights, x_bnc: torch.Tensor) -> torch.Tensor:
    """SCLIP correlative self-attention block: (B, N, C) -> (B, N, C) (residual + MLP kept)."""
    q, k, v = qkv_heads(block_weights, block_weights.ln_1(x_bnc))
    a = self_correlation_attention(q, k, v, "qq+kk")  # (B, H, N, N)
    x = x_bnc + out_proj(block_weights, merge_heads(a @ v))
    return x + block_weights.mlp(block_weights.ln_2(x))


def clearclip_last_block(block_weights, x_bnc: torch.Tensor) -> torch.Tensor:
    """ClearCLIP: q-q self-attention, no residual, no MLP: (B, N, C) -> (B, N, C)."""
    q, k, v = qkv_heads(block_weights, block_weights.ln_1(x_bnc))
    a = self_correlation_attention(q, k, v, "qq")
    return out_proj(block_weights, merge_heads(a @ v))


@lru_cache(maxsize=64)
def _naclip_omega_cpu(gh: int, gw: int, sigma: float, with_cls: bool) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )
    p = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)  # (N, 2) row-major
    d2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    omega = torch.exp(-d2 / (2.0 * sigma * sigma))
    if with_cls:
        omega = F.pad(omega, (1, 0, 1, 0))  # zero class row and column
    return omega


def naclip_omega(
    grid_hw: tuple[int, int],
    sigma: float = 5.0,
    *,
    with_cls: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """NACLIP's Gaussian neighbourhood term Ω ((1+N, 1+N) with a zero class row/column).

    ``Ω_ij = exp(-‖p_i - p_j‖² / 2σ²)`` over 2-D patch coordinates; cached per (grid, σ).
    """
    om = _naclip_omega_cpu(int(grid_hw[0]), int(grid_hw[1]), float(sigma), bool(with_cls))
    return om.to(device=device, dtype=dtype)


def naclip_last_block(
    block_weights, x_bnc: torch.Tensor, grid_hw: tuple[int, int], sigma: float = 5.0
) -> torch.Tensor:
    """NACLIP: ``softmax(s·kkᵀ + Ω)``, no residual, no MLP; ``x_bnc`` holds the class token
    (and test-time registers after the patches, which get no neighbourhood term, as the class)."""
    q, k, v = qkv_heads(block_weights, block_weights.ln_1(x_bnc))
    extra = x_bnc.shape[1] - grid_hw[0] * grid_hw[1]  # class token + test-time registers
    omega = naclip_omega(grid_hw, sigma, with_cls=extra > 0, device=x_bnc.device, dtype=k.dtype)
    if extra > 1:
        omega = F.pad(omega, (0, extra - 1, 0, extra - 1))
    s = k.shape[-1] ** -0.5
    a = torch.softmax(s * (k @ k.transpose(-1, -2)) + omega, dim=-1)
    return out_proj(block_weights, merge_heads(a @ v))


def proxy_attention(
    vfm_bchw: torch.Tensor,
    beta: float = 1.2,
    gamma: float = 3.0,
    *,
    mean_scope: str = "window",
) -> torch.Tensor:
    """ProxyCLIP's attention (B, N, N) from VFM patch features (B, C, h, w), N = h·w row-major.

    ``mean_scope="window"``: one mean per window (ProxyCLIP, which runs windows one at a time);
    ``"batch"``: one mean over all windows of the batch (Trident). The computation is shared with
    Crane+'s D-Attn: :func:`zsdense.dense.attention.vfm_guided_attention`.
    """
    if mean_scope not in ("window", "batch"):
        raise ConfigError(f"unknown mean scope {mean_scope!r}; use 'window' or 'batch'")
    return vfm_guided_attention(vfm_bchw, beta, gamma, mean=mean_scope).to(vfm_bchw.dtype)


def proxyclip_last_block(
    block_weights,
    x_bnc: torch.Tensor,
    clip_grid_hw: tuple[int, int],
    vfm_bchw: torch.Tensor,
    *,
    beta: float = 1.2,
    gamma: float = 3.0,
    mean_scope: str = "window",
) -> torch.Tensor:
    """ProxyCLIP's last block: (B, [1+]N_clip, C) -> (B, N_vfm, C) tokens before ln_post.

    The CLIP values of the last block (class token removed) are reshaped per head to the true
    CLIP grid (height, width: the references swap them for non-square windows) and resized
    bilinearly to the VFM grid; ``out_proj(A v)`` with :func:`proxy_attention`, no residual/MLP.
    """
    gh, gw = int(clip_grid_hw[0]), int(clip_grid_hw[1])
    b, n, c = x_bnc.shape
    if n == gh * gw + 1:
        x_bnc = x_bnc[:, 1:]
    elif n != gh * gw:
        raise ValueError(f"{n} tokens do not fit a {gh}x{gw} grid")
    hv, wv = int(vfm_bchw.shape[-2]), int(vfm_bchw.shape[-1])
    v = F.linear(
        block_weights.ln_1(x_bnc),
        block_weights.in_proj_weight[2 * c :],
        None if block_weights.in_proj_bias is None else block_weights.in_proj_bias[2 * c :],
    )  # (B, N, C)
    heads = block_weights.num_heads
    d = c // heads
    v = split_heads(v, heads)  # (B, H, N, d)
    v = v.transpose(-1, -2).reshape(b * heads, d, gh, gw)
    if (gh, gw) != (hv, wv):
        v = F.interpolate(v, size=(hv, wv), mode="bilinear", align_corners=False)
    v = v.reshape(b, heads, d, hv * wv).transpose(-1, -2)  # (B, H, Nv, d)
    a = proxy_attention(vfm_bchw.to(v.dtype), beta, gamma, mean_scope=mean_scope)  # (B, Nv, Nv)
    out = a[:, None] @ v  # (B, H, Nv, d)
    return out_proj(block_weights, merge_heads(out))


def clip_last_block_input(clip, x_norm_bchw: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens entering the last block (B, 1+N, C) and the CLIP grid, pos-embed as the references."""
    x = clip.embed(x_norm_bchw, POS_MODE)  # test-time registers (if any) after the patches
    x = clip.run_blocks(x, 0, clip.num_layers - 1)
    p = clip.patch_size
    return x, (x_norm_bchw.shape[-2] // p, x_norm_bchw.shape[-1] // p)


def dense_clip_features(
    clip,
    x_norm_bchw: torch.Tensor,
    variant: str,
    *,
    sigma: float = 5.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Dense CLIP features (B, D, gh, gw) of a CLIP-only variant (``sclip|clearclip|naclip``).

    Head = ``ln_post`` then the projection; class token dropped after the head; L2-normalised
    over D when ``normalize``.
    """
    x, (gh, gw) = clip_last_block_input(clip, x_norm_bchw)
    try:
        last_block = CLIP_LAST_BLOCKS[variant]
    except KeyError:
        raise ConfigError(
            f"unknown CLIP-only variant {variant!r}; choose one of {', '.join(CLIP_LAST_BLOCKS)}"
        ) from None
    y = last_block(clip.block(clip.num_layers - 1), x, (gh, gw), sigma)
    t = clip.head(clip.strip_registers(y))[:, 1:]  # (B, N, D)
    if normalize:
        t = F.normalize(t, dim=-1)
    return t.transpose(1, 2).reshape(t.shape[0], -1, gh, gw)


def proxy_clip_tokens(
    clip,
    x_norm_bchw: torch.Tensor,
    vfm_bchw: torch.Tensor,
    *,
    beta: float = 1.2,
    gamma: float = 3.0,
    mean_scope: str = "window",
) -> torch.Tensor:
    """ProxyCLIP tokens before ln_post (B, N_vfm, C) for a batch of CLIP-normalised windows."""
    x, grid = clip_last_block_input(clip, x_norm_bchw)
    x = clip.strip_registers(x)  # the last block reads only the patches' values
    bw = clip.block(clip.num_layers - 1)
    return proxyclip_last_block(
        bw, x, grid, vfm_bchw, beta=beta, gamma=gamma, mean_scope=mean_scope
    )


# CLIP-only last blocks: (block weights, tokens (B, 1+N, C), grid, sigma) -> (B, 1+N, C)
CLIP_LAST_BLOCKS: dict[str, Callable] = {
    "sclip": lambda bw, x, grid, sigma: sclip_last_block(bw, x),
    "clearclip": lambda bw, x, grid, sigma: clearclip_last_block(bw, x),
    "naclip": lambda bw, x, grid, sigma: naclip_last_block(bw, x, grid, sigma),
}


def clip_only_features(variant: str) -> Callable:
    """The feature function of a CLIP-only last block (``CLIP_LAST_BLOCKS``), for the registry."""

    def features(clip, x_norm_bchw, cfg, vfm_fn=None):  # noqa: ARG001 - no VFM
        return dense_clip_features(clip, x_norm_bchw, variant, sigma=cfg.naclip_sigma).float()

    return features


def proxyclip_features(clip, x_norm_bchw, cfg, vfm_fn) -> torch.Tensor:
    """ProxyCLIP window features (B, D, h_vfm, w_vfm), L2-normalised, on the VFM grid."""
    vf = vfm_fn(x_norm_bchw)
    tok = proxy_clip_tokens(
        clip, x_norm_bchw, vf.to(x_norm_bchw.dtype), beta=cfg.beta, gamma=cfg.gamma
    )
    f = F.normalize(clip.head(tok).float(), dim=-1)
    return f.transpose(1, 2).reshape(x_norm_bchw.shape[0], -1, vf.shape[-2], vf.shape[-1])
