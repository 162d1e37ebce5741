"""Sliding windows (mmseg grid), padding, and splicing windows back into one image.

Two splicing styles serve the open-vocabulary presets:

* segment-then-splice (ProxyCLIP, SCLIP, ClearCLIP, NACLIP): each window's class logits are
  upsampled to the (padded) window size, the padding is cut, and the rest is averaged into a
  logit canvas (:func:`splice_logits`);
* splice-then-segment (Trident): each window's *tokens* are placed on a token canvas in CLIP-patch
  units and overlaps averaged (:func:`splice_tokens`), then aggregated globally.

Boxes are ``(y1, x1, y2, x2)`` end-exclusive; paddings ``(left, right, top, bottom)`` (``F.pad``
order); window order is row-major (all rows outer, columns inner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD_MULTIPLE = 56  # lcm of the CLIP (8/16) and DINO (14) patch sizes, as ProxyCLIP pads


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def grid_counts(hw: tuple[int, int], crop, stride) -> tuple[int, int]:
    """Windows per axis with the mmseg formula ``max(H - c + t - 1, 0) // t + 1``."""
    (h, w), (ch, cw), (sh, sw) = hw, _pair(crop), _pair(stride)
    return max(h - ch + sh - 1, 0) // sh + 1, max(w - cw + sw - 1, 0) // sw + 1


def window_boxes(hw: tuple[int, int], crop, stride) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, x1, y2, x2) in pixels, row-major (mmseg ``slide_inference``).

    Window ``i`` starts at ``i·t`` and ends at ``min(start + c, H)``; a window that ends at H is
    shifted back to start at ``max(H - c, 0)``.
    """
    h, w = int(hw[0]), int(hw[1])
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    nh, nw = grid_counts((h, w), (ch, cw), (sh, sw))
    boxes = []
    for i in range(nh):
        for j in range(nw):
            y1, x1 = i * sh, j * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            boxes.append((y1, x1, y2, x2))
    return boxes


def pad_amounts(hw: tuple[int, int], multiple: int = PAD_MULTIPLE) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding to a multiple of ``multiple``; the odd pixel goes
    right / bottom."""
    h, w = int(hw[0]), int(hw[1])
    ph = (multiple - h % multiple) % multiple
    pw = (multiple - w % multiple) % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


@dataclass(frozen=True)
class WindowBatch:
    """All windows of one image, stacked: ``images`` (n, 3, hp, wp) padded crops."""

    images: torch.Tensor
    boxes: list[tuple[int, int, int, int]]  # pixels, end-exclusive
    pads: tuple[int, int, int, int]  # (l, r, t, b), identical for every window of an image
    counts: tuple[int, int]  # windows per axis

    def patch_locs(self, patch: int) -> torch.Tensor:
        """(n, 4) boxes in patch units ``[y1, x1, y2, x2]`` (integer division)."""
        return torch.tensor([[b // patch for b in box] for box in self.boxes], dtype=torch.int64)


def make_windows(
    x_bchw: torch.Tensor, crop, stride, *, pad_multiple: int | None = PAD_MULTIPLE
) -> WindowBatch:
    """Crop every window of one image ((1, 3, H, W), already normalised) into one batch.

    Every window of an image has the same size (``min(c, H) × min(c, W)``); it is zero-padded to
    a multiple of ``pad_multiple`` (None: no padding). Zero padding in CLIP-normalised space is
    the CLIP mean colour, as in the references.
    """
    if x_bchw.shape[0] != 1:
        raise ValueError("make_windows takes one image (1, 3, H, W)")
    h, w = int(x_bchw.shape[-2]), int(x_bchw.shape[-1])
    boxes = window_boxes((h, w), crop, stride)
    crops = torch.cat([x_bchw[..., y1:y2, x1:x2] for (y1, x1, y2, x2) in boxes], dim=0)
    pads = (0, 0, 0, 0)
    if pad_multiple:
        pads = pad_amounts(crops.shape[-2:], pad_multiple)
        if any(pads):
            crops = F.pad(crops, pads)
    return WindowBatch(crops, boxes, pads, grid_counts((h, w), crop, stride))


def trident_resize_hw(
    hw: tuple[int, int], patch: int = 16, crop: int = 336, *, upscale_small: bool = True
) -> tuple[int, int]:
    """Trident's input size rule (``preprocess_image``).

    Both sides multiples of ``patch``: unchanged. Otherwise the long side is rounded up to a
    multiple of ``patch``, both sides scaled by that factor (truncated), each rounded up to a
    multiple of ``patch`` and raised to at least ``crop``. The reference leaves a small image whose
    sides are already multiples of ``patch`` below the crop (and then crashes when splicing);
    ``upscale_small`` (default) raises such sides to the crop too.
    """
    h, w = int(hw[0]), int(hw[1])
    if h % patch == 0 and w % patch == 0:
        if upscale_small:
            return max(h, crop), max(w, crop)
        return h, w
    long = max(h, w)
    dst = math.ceil(long / patch) * patch
    nh, nw = int(h * dst / long), int(w * dst / long)
    nh, nw = math.ceil(nh / patch) * patch, math.ceil(nw / patch) * patch
    return max(nh, crop), max(nw, crop)


def trident_resize(
    x_bchw: torch.Tensor, patch: int = 16, crop: int = 336, *, upscale_small: bool = True
) -> torch.Tensor:
    """Resize a (normalised) batch with :func:`trident_resize_hw` (bilinear, no antialias)."""
    size = trident_resize_hw(x_bchw.shape[-2:], patch, crop, upscale_small=upscale_small)
    if tuple(x_bchw.shape[-2:]) == size:
        return x_bchw
    return F.interpolate(x_bchw, size=size, mode="bilinear", align_corners=False)


def splice_ratio(vfm_hw: tuple[int, int], clip_hw: tuple[int, int]) -> tuple[int, bool]:
    """(ratio, needs_resize) for placing a VFM-grid window map on a CLIP-patch canvas.

    If the VFM grid width is an integer multiple of the CLIP window grid, the canvas is that many
    times finer and no resize is needed (DINO-B/8: 2); otherwise ``ratio = round(h_vfm / h_clip)``
    and each window map is resized to ``clip grid × ratio`` first (DINOv2-B/14: 24 → 21).
    """
    hv, wv = vfm_hw
    hc, wc = clip_hw
    if wv % wc == 0 and hv % hc == 0 and wv // wc == hv // hc:
        return wv // wc, False
    return max(1, int(round(hv / hc))), True


def splice_tokens(
    window_maps: torch.Tensor,
    patch_locs: torch.Tensor | list,
    canvas_hw: tuple[int, int],
) -> torch.Tensor:
    """Average window maps (n, D, hv, wv) into a canvas (D, Hc·r, Wc·r).

    ``patch_locs`` (n, 4) are the windows' ``[y1, x1, y2, x2]`` in CLIP-patch units and
    ``canvas_hw`` the canvas size in those units; ``r`` from :func:`splice_ratio`.
    """
    locs = torch.as_tensor(patch_locs, dtype=torch.int64).tolist()
    n, d, hv, wv = window_maps.shape
    y1, x1, y2, x2 = locs[0]
    ratio, resize = splice_ratio((hv, wv), (y2 - y1, x2 - x1))
    if resize:
        window_maps = F.interpolate(
            window_maps,
            size=((y2 - y1) * ratio, (x2 - x1) * ratio),
            mode="bilinear",
            align_corners=False,
        )
    H, W = canvas_hw[0] * ratio, canvas_hw[1] * ratio
    canvas = window_maps.new_zeros(d, H, W)
    count = window_maps.new_zeros(1, H, W)
    for i, (y1, x1, y2, x2) in enumerate(locs):
        canvas[:, y1 * ratio : y2 * ratio, x1 * ratio : x2 * ratio] += window_maps[i]
        count[:, y1 * ratio : y2 * ratio, x1 * ratio : x2 * ratio] += 1
    if bool((count == 0).any()):
        raise ValueError("windows do not cover the canvas")
    return canvas / count


def splice_logits(
    window_logits: torch.Tensor | list[torch.Tensor],
    boxes: list[tuple[int, int, int, int]],
    pads: tuple[int, int, int, int],
    image_hw: tuple[int, int],
) -> torch.Tensor:
    """Segment-then-splice: window logits (n, Q, h', w') -> image logits (Q, H, W).

    Each window's logits are upsampled bilinearly to the padded window size, the padding
    ``(l, r, t, b)`` is cut, and overlaps are averaged.
    """
    left, t = pads[0], pads[2]
    first = window_logits[0]
    q = first.shape[0]
    h, w = int(image_hw[0]), int(image_hw[1])
    canvas = first.new_zeros(q, h, w)
    count = first.new_zeros(1, h, w)
    for i, (y1, x1, y2, x2) in enumerate(boxes):
        hp, wp = (y2 - y1) + pads[2] + pads[3], (x2 - x1) + pads[0] + pads[1]
        lg = window_logits[i]
        if tuple(lg.shape[-2:]) != (hp, wp):
            lg = F.interpolate(lg[None], size=(hp, wp), mode="bilinear", align_corners=False)[0]
        canvas[:, y1:y2, x1:x2] += lg[:, t : t + (y2 - y1), left : left + (x2 - x1)]
        count[:, y1:y2, x1:x2] += 1
    return canvas / count
