"""Hybrid global-local mask features (HybridGL): one CLIP embedding per proposal mask.

For every mask two views of the *whole* frame are encoded (no crop, aspect ratio not kept):

- the **global view** keeps the image inside the mask and blurs it outside, so the encoder still
  sees the context;
- the **local view** keeps the image inside the mask and replaces the outside by a constant, so
  the encoder sees only the object.

Both run through the first blocks of CLIP as usual. In the last ``fusion_blocks`` blocks the two
streams are mixed (fusion mode ``G2L``, the default: the global stream, restricted by an attention
mask to the masked patches, is injected into the local one) and the class token of the receiving
stream, projected, is the mask feature. Everything is batched: all masks × both views go through
the encoder at once, the fused blocks run as one batch with a per-row attention bias.

Preprocessing constants follow the reference code exactly (see
``shared/specs/referring.md`` §2 and the fixture README): ImageNet mean/std for both views, the
local fill value (0.48145466, 0.4578275, 0.40821073) *in normalised space*, OpenCV's 15×15
Gaussian blur on the uint8 image, bilinear resizes without antialias, and the token-grid mask
resized straight from the full-resolution mask (bilinear, no antialias).

All functions here work over the lead's :class:`~zsdense.models.clip.ClipModel` (its blocks'
weights), not over patched modules.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.dense.attention import merge_heads, out_proj, qkv_heads
from zsdense.errors import ConfigError
from zsdense.models.clip import pixels_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The reference fills the local view's outside with CLIP's mean *after* ImageNet normalisation.
LOCAL_FILL = (0.48145466, 0.4578275, 0.40821073)
BLUR_KSIZE = 15
FUSION_MODES = ("G2L", "L2G", "G2L&L2G")
FUSION_GAIN = 2.0  # the reference adds 2x the other stream


def blur_image_u8(image_u8_hwc: np.ndarray) -> np.ndarray:
    """OpenCV ``GaussianBlur(img, (15, 15), 0)`` on the uint8 image (σ 2.6, reflect-101).

    OpenCV itself is used: its uint8 Gaussian is fixed-point and a float re-implementation
    differs by one grey level on a few percent of the pixels.
    """
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv is a core dependency
        from zsdense.errors import DependencyError

        raise DependencyError("opencv-python-headless", "dev", "HybridGL global views") from None
    return cv2.GaussianBlur(np.ascontiguousarray(image_u8_hwc), (BLUR_KSIZE, BLUR_KSIZE), 0)


def _as_masks(masks: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(m.shape)}")
    return m.to(device=device, dtype=torch.bool)


def _resize(x_nchw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=False, no antialias (torchvision ``Resize(antialias=None)``)."""
    return F.interpolate(x_nchw, size=size, mode="bilinear", align_corners=False, antialias=False)


def global_views(
    image_u8_hwc: np.ndarray,
    masks_nhw: np.ndarray | torch.Tensor,
    size: int | tuple[int, int] = 224,
    *,
    blurred_u8_hwc: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Global views (N, 3, s, s): ``where(M_i, image, blur(image))`` in uint8, /255, resized,
    ImageNet-normalised. ``blurred_u8_hwc`` may pass a precomputed blur (shared by all masks)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    blur = blur_image_u8(image_u8_hwc) if blurred_u8_hwc is None else blurred_u8_hwc
    img = pixels_tensor(image_u8_hwc, device)
    blr = torch.as_tensor(np.ascontiguousarray(blur), device=device)
    m = _as_masks(masks_nhw, img.device)  # (N, H, W)
    comp = torch.where(m[..., None], img[None], blr[None])  # (N, H, W, 3) uint8
    x = comp.permute(0, 3, 1, 2).float() / 255.0
    x = _resize(x, size)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (x - mean) / std


def normalise_imagenet(
    image_u8_hwc: np.ndarray, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The full image /255, ImageNet-normalised: (3, H, W) float32."""
    x = pixels_tensor(image_u8_hwc, device).permute(2, 0, 1)
    x = x.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (x - mean) / std


def local_views(
    image_u8_hwc: np.ndarray,
    masks_nhw: np.ndarray | torch.Tensor,
    size: int | tuple[int, int] = 224,
    *,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Local views (N, 3, s, s): ImageNet-normalised image inside M_i, the constant
    :data:`LOCAL_FILL` outside (in normalised space), then resized (masks applied at full
    resolution first, so edge pixels blend as in the reference)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = normalise_imagenet(image_u8_hwc, device)  # (3, H, W)
    m = _as_masks(masks_nhw, x.device).float()[:, None]  # (N, 1, H, W)
    fill = torch.tensor(LOCAL_FILL, device=x.device)[None, :, None, None]
    views = x[None] * m + (1.0 - m) * fill
    return _resize(views, size)


def grid_masks(
    masks_nhw: np.ndarray | torch.Tensor,
    grid: int | tuple[int, int],
    *,
    antialias: bool = False,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Token-grid masks m_i (N, gh, gw) float: the full-resolution mask resized straight to the
    patch grid, bilinear, align_corners=False; ``antialias=False`` as the reference's pinned
    torchvision (a small mask can vanish from the grid)."""
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    m = _as_masks(masks_nhw, torch.device(device)).float()[:, None]  # (N, 1, H, W)
    out = F.interpolate(m, size=grid, mode="bilinear", align_corners=False, antialias=antialias)
    return out[:, 0]


def class_attention_mask(grid_masks_nhw: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The reference's boolean attention mask (N·heads, 1+P, 1+P), **True = blocked**.

    Row 0 (the class-token query) may attend only to itself and to patches with m_i > 0; patch
    queries are unrestricted. Index ``n·heads + h`` (mask-major), patches row-major.
    """
    n = grid_masks_nhw.shape[0]
    allowed = grid_masks_nhw.reshape(n, -1) > 0  # (N, P)
    p = allowed.shape[1]
    blocked = torch.zeros(n, 1 + p, 1 + p, dtype=torch.bool, device=grid_masks_nhw.device)
    blocked[:, 0, 1:] = ~allowed
    return blocked.repeat_interleave(num_heads, dim=0)


def class_attention_bias(grid_masks_nhw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive form of :func:`class_attention_mask` shared by all heads: (N, 1, 1+P, 1+P)
    with 0 where allowed and -inf where blocked (the class token always sees itself)."""
    n = grid_masks_nhw.shape[0]
    allowed = grid_masks_nhw.reshape(n, -1) > 0  # (N, P)
    p = allowed.shape[1]
    bias = torch.zeros(n, 1, 1 + p, 1 + p, dtype=dtype, device=grid_masks_nhw.device)
    bias[:, 0, 0, 1:] = torch.where(
        allowed,
        torch.zeros((), dtype=dtype, device=bias.device),
        torch.full((), float("-inf"), dtype=dtype, device=bias.device),
    )
    return bias


def block_forward(
    clip, index: int, x_bnc: torch.Tensor, attn_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """One residual block of ``clip`` (0-based ``index``) on (B, N, C) tokens with an optional
    additive attention bias (B or 1, 1, N, N); with no bias this equals the block's forward."""
    bw = clip.block(index)
    q, k, v = qkv_heads(bw, bw.ln_1(x_bnc))  # each (B, H, N, d)
    bias = None if attn_bias is None else attn_bias.to(q.dtype)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    x = x_bnc + out_proj(bw, merge_heads(a))
    return x + bw.mlp(bw.ln_2(x))


def _inject(
    receiver_bnc: torch.Tensor, source_bnc: torch.Tensor, m_np: torch.Tensor
) -> torch.Tensor:
    """receiver + 2·[cls(source); m ⊙ patches(source)] with m (B, P) float."""
    src = torch.cat([source_bnc[:, :1], m_np[..., None] * source_bnc[:, 1:]], dim=1)
    return receiver_bnc + FUSION_GAIN * src


def hybrid_mask_features(
    clip,
    global_views_nchw: torch.Tensor,
    local_views_nchw: torch.Tensor,
    grid_masks_nhw: torch.Tensor,
    *,
    mode: str = "G2L",
    fusion_blocks: int = 3,
    pos_mode: str = "bilinear",
) -> torch.Tensor:
    """Raw (unnormalised) hybrid mask features (N, D) = proj(ln_post(class token)).

    The first ``num_layers - fusion_blocks`` blocks run on all 2N views as one batch; then, per
    fused block (``mode``):

    - ``G2L``: local ← block(local + 2·[cls_G; m⊙patch_G]); global ← block(global, class mask);
      output from the local class token;
    - ``L2G``: local ← block(local); global ← block(local + 2·global, class mask); output from the
      global class token;
    - ``G2L&L2G``: plain local and masked global streams feed two hybrid streams,
      h_l ← block(h_l + 2·[cls_g; m⊙patch_g]), h_g ← block(x_l + 2·h_g, class mask); output the
      sum of both projections.

    G and the other stream are always the *inputs* of the current block. Every fused block is one
    batched call with a per-row attention bias (zero for unmasked streams).
    """
    if mode not in FUSION_MODES:
        raise ConfigError(f"unknown fusion mode {mode!r}; choose one of {', '.join(FUSION_MODES)}")
    n = global_views_nchw.shape[0]
    L = clip.num_layers
    start = L - int(fusion_blocks)
    if not 0 <= start < L:
        raise ConfigError(f"fusion_blocks must be in 1..{L}, got {fusion_blocks}")
    dev = clip.device
    views = torch.cat([local_views_nchw, global_views_nchw], dim=0).to(dev)  # (2N, 3, s, s)
    x = clip.run_blocks(clip.embed(views, pos_mode), 0, start)  # (2N, 1+P[+R], C)
    loc, glob = x[:n], x[n:]
    m = grid_masks_nhw.to(device=dev, dtype=x.dtype).reshape(n, -1)  # (N, P)
    r = clip.extra_tokens  # test-time registers after the patches: handled as the class token
    if m.shape[1] != x.shape[1] - 1 - r:
        raise ValueError(
            f"grid masks have {m.shape[1]} cells but the views {x.shape[1] - 1 - r} patches"
        )
    bias_mask = class_attention_bias(grid_masks_nhw.to(dev), x.dtype)  # (N, 1, T, T)
    if r:  # registers: injected unmasked, always visible to the class token
        m = torch.cat([m, m.new_ones(n, r)], dim=1)
        bias_mask = F.pad(bias_mask, (0, r, 0, r))
    zeros = torch.zeros_like(bias_mask)

    if mode == "G2L":
        bias = torch.cat([zeros, bias_mask], dim=0)
        for i in range(start, L):
            out = block_forward(clip, i, torch.cat([_inject(loc, glob, m), glob], dim=0), bias)
            loc, glob = out[:n], out[n:]
        return clip.head(loc[:, 0])
    if mode == "L2G":
        bias = torch.cat([zeros, bias_mask], dim=0)
        for i in range(start, L):
            out = block_forward(clip, i, torch.cat([loc, loc + FUSION_GAIN * glob], dim=0), bias)
            loc, glob = out[:n], out[n:]
        return clip.head(glob[:, 0])
    # G2L&L2G: four streams [x_l, x_g, h_l, h_g]
    h_l, h_g = loc, glob
    bias = torch.cat([zeros, bias_mask, zeros, bias_mask], dim=0)
    for i in range(start, L):
        inp = torch.cat([loc, glob, _inject(h_l, glob, m), loc + FUSION_GAIN * h_g], dim=0)
        out = block_forward(clip, i, inp, bias)
        loc, glob, h_l, h_g = out[:n], out[n : 2 * n], out[2 * n : 3 * n], out[3 * n :]
    return clip.head(h_l[:, 0]) + clip.head(h_g[:, 0])


def mask_features(
    clip,
    image_u8_hwc: np.ndarray,
    masks_nhw: np.ndarray | torch.Tensor,
    *,
    size: int | None = None,
    mode: str = "G2L",
    fusion_blocks: int = 3,
    grid_antialias: bool = False,
    batch_size: int = 32,
    blurred_u8_hwc: np.ndarray | None = None,
) -> torch.Tensor:
    """Hybrid features (N, D), raw, for full-resolution masks of one image.

    ``size`` defaults to the model's native input (224 for ViT-B/16). Masks are processed in
    chunks of ``batch_size`` (each chunk: 2·chunk views in one encoder batch).
    """
    size = clip.native_size if size is None else int(size)
    if size % clip.patch_size:
        raise ConfigError(f"view size {size} is not a multiple of the patch size {clip.patch_size}")
    grid = size // clip.patch_size
    blur = blur_image_u8(image_u8_hwc) if blurred_u8_hwc is None else blurred_u8_hwc
    masks = _as_masks(masks_nhw, torch.device("cpu"))
    outs: list[torch.Tensor] = []
    for s in range(0, masks.shape[0], max(1, batch_size)):
        chunk = masks[s : s + batch_size]
        gv = global_views(image_u8_hwc, chunk, size, blurred_u8_hwc=blur, device=clip.device)
        lv = local_views(image_u8_hwc, chunk, size, device=clip.device)
        gm = grid_masks(chunk, grid, antialias=grid_antialias, device=clip.device)
        outs.append(hybrid_mask_features(clip, gv, lv, gm, mode=mode, fusion_blocks=fusion_blocks))
    if not outs:
        return torch.zeros(0, clip.embed_dim, device=clip.device)
    return torch.cat(outs, dim=0)


def masks_to_boxes_xywh(masks_nhw: np.ndarray | torch.Tensor) -> np.ndarray:
    """SAM's integer XYWH boxes (inclusive pixel indices: w = x_max − x_min), (N, 4) int64;
    an empty mask gives [0, 0, 0, 0]."""
    m = _as_masks(masks_nhw, torch.device("cpu"))
    n = m.shape[0]
    out = np.zeros((n, 4), dtype=np.int64)
    for i in range(n):
        ys, xs = np.nonzero(m[i].numpy())
        if ys.size:
            x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
            out[i] = (x0, y0, x1 - x0, y1 - y0)
    return out


__all__: Sequence[str] = (
    "blur_image_u8",
    "global_views",
    "local_views",
    "grid_masks",
    "class_attention_mask",
    "class_attention_bias",
    "block_forward",
    "hybrid_mask_features",
    "mask_features",
    "masks_to_boxes_xywh",
)
