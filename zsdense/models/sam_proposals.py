"""SAM automatic mask proposals from an encoded image, at the cost of the mask decoder.

:func:`sam_proposals` gives the same masks, predicted IoUs, boxes and order as
``segment_anything.SamAutomaticMaskGenerator`` with one crop (the whole image) decoding the same
prompt counts per call (``points_per_batch`` = ``DECODE_CHUNK`` where :func:`decoder_call_sizes`
chunks; other counts: equal up to the last bits of the logits), without running
the image encoder again (it reads a :class:`~zsdense.models.sam.SamImageState`) and with much
less work per prompt:

1. **decoding** (:func:`decode_points`): the mask decoder for a batch of point prompts, doing
   the arithmetic of ``MaskDecoder`` operation for operation (bit-identical logits and IoUs at
   the same batch size; across batch sizes the reference's own last bits move on some CPUs and
   thread counts, see :func:`decode_in_chunks`), but computing once per
   image what the reference repeats for every prompt: the image embedding plus the no-mask
   embedding, its positional terms and the first block's image-side projections (token-to-image
   keys and values, image-to-token queries), which do not depend on the prompt; the sum
   ``keys + key_pe``, which each block computes twice with the same inputs, is computed once;
   the upscaling's LayerNorm2d and GELUs run in place;
2. **filtering before upsampling**: the predicted-IoU filter is per mask, so it runs on the
   low-resolution logits; only the survivors are upsampled (the reference upsamples every mask);
3. **one batched pass for the survivors**: upsampling to the image (``Sam.postprocess_masks``'
   two bilinear resizes, the first restricted to the rows and columns that survive its crop),
   stability score and thresholding run over the survivors of the whole grid together (pooled
   across decoder batches, up to ``FLUSH_MASKS`` at a time so that large grids stay bounded in
   memory), in chunks of ``UPSAMPLE_CHUNK``, without copying float logits (masks are indexed
   after thresholding);
4. NMS, small-region cleaning and the second NMS exactly as the reference.

``stability="lowres"`` (opt-in, not the default) scores stability on the 256×256 decoder
logits (cropped to the image) instead of the upsampled ones, so masks failing the stability
filter are never upsampled; it saves nothing when every mask survives. Its scores differ from
the reference's, so the kept set can differ near the threshold: measured by
``bench/bench_sam_proposals.py`` on the full-size random ViT-B, 0 difference over 192 masks
(offset 1.0: random logits are far from the threshold); on the tiny random SAM with offset
0.02 (pixel-scale noise logits) up to 0.49. Trained weights (smooth logits) were not available
to measure.

**Reduced precision.** When SAM's image encoder runs in bf16 (``--precision bf16``, or ``auto`` on
a machine with native bf16), the decoding runs in bf16 too: a bf16 copy of the mask decoder
(cached on the :class:`~zsdense.models.sam.SamModel`; the model's own decoder stays float32 for
the predictor paths) run by :func:`decode_points_reduced`, which arranges the same model for
speed (no expanded image side, the attention projections folded into the prompt's few tokens
from the second block on, vectorised softmax over a prompt's tokens, channels-last upscaling as
matrix products); the prompt encoder's random-Fourier positional encodings are
computed in float32 (sin/cos of arguments up to ~30 need the mantissa) and cast. The bf16 logits
are upsampled and thresholded in float32 (bf16 bilinear resizes run 2× slower on the CPU); when
the image has at most half the pixels of SAM's input, ``postprocess_masks``' two resizes run as
one (:func:`~zsdense.models.sam_decoder_reduced.composite_upsampler`: 4× faster at 240×320).
Decoding 64 prompts (full-size random SAM ViT-B, 2 threads, AMD EPYC with avx512_bf16;
``bench/bench_sam_decoder.py``): 0.71 s against 2.36 s in float32 and 1.19 s for the same bf16
weights through :func:`decode_points`, with 39 % fewer multiply-adds.
The float32 path is unchanged (bit-identical to ``SamAutomaticMaskGenerator``); the bf16 one
is within the tolerance ``tests/test_precision.py`` asserts (README, "Devices and precision").
:func:`sam_proposals`' ``decoder`` (``--proposal-decoder``) overrides the choice:
``"arranged"`` runs :func:`decode_points_reduced` in float32 too, on a float32 copy of the
decoder (opt-in: the same model, other last bits; 1.55 against 2.19 s for 64 prompts),
``"reference"`` runs :func:`decode_points` in bf16 too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.config import PROPOSAL_DECODERS, ReferPreset
from zsdense.config import PROPOSAL_STABILITY_MODES as STABILITY_MODES
from zsdense.errors import ConfigError
from zsdense.models.sam_decoder import DecoderImageSide, decode_points, decoder_image_side
from zsdense.models.sam_decoder_reduced import (
    ReducedDecoderSam,
    composite_upsampler,
    decode_points_reduced,
    decoder_for,
)

__all__ = [
    "DECODE_CHUNK",
    "FLUSH_MASKS",
    "STABILITY_MODES",
    "UPSAMPLE_CHUNK",
    "DecoderImageSide",
    "ProposalSettings",
    "Proposals",
    "ReducedDecoderSam",
    "decode_in_chunks",
    "decode_points",
    "decode_points_reduced",
    "decoder_call_sizes",
    "decoder_for",
    "decoder_image_side",
    "sam_proposals",
    "stability_scores",
    "upsample_logits",
    "whole_image_proposal",
]

_HYBRIDGL = ReferPreset()  # the proposal defaults (HybridGL / TAS settings)

# Masks upsampled together in one chunk (full resolution float logits: 4 MB per mask at 1024²).
# 8 keeps a chunk's intermediates near the CPU cache: 192 masks of a 640x426 image took 3.85 s
# for the whole proposal step against 4.3 s with chunks of 32 (same masks and scores).
UPSAMPLE_CHUNK = 8
# Low-resolution survivors pooled across decoder batches before they are upsampled together
# (256 KB each at 256²: bounds memory for large grids such as SAM's default 32×32).
FLUSH_MASKS = 512
# Prompts decoded together on the CPU within one points_per_batch batch (decode_in_chunks)
DECODE_CHUNK = 4


@dataclass
class Proposals:
    """Class-agnostic masks of one image (CPU tensors)."""

    masks: torch.Tensor  # (N, H, W) bool
    boxes_xywh: torch.Tensor  # (N, 4) int64, SAM's convention (w = x_max − x_min)
    iou_preds: torch.Tensor  # (N,) SAM's predicted IoU (0 for the fallback)
    fallback: bool = False  # True: no SAM mask survived, the whole image stands in
    stability: torch.Tensor | None = None  # (N,) stability scores (None for the fallback)


@dataclass(frozen=True)
class ProposalSettings:
    """The generator's knobs, named as in ``SamAutomaticMaskGenerator``; defaults are HybridGL's
    (``zsdense.config.ReferPreset``, the one place they are defined: an 8×8 grid, 0.7 / 0.7 and
    800 px)."""

    points_per_side: int = _HYBRIDGL.points_per_side
    points_per_batch: int = _HYBRIDGL.points_per_batch
    pred_iou_thresh: float = _HYBRIDGL.pred_iou_thresh
    stability_score_thresh: float = _HYBRIDGL.stability_score_thresh
    stability_score_offset: float = _HYBRIDGL.stability_score_offset
    box_nms_thresh: float = _HYBRIDGL.box_nms_thresh
    min_mask_region_area: int = _HYBRIDGL.min_mask_region_area
    crop_nms_thresh: float = 0.7  # with one crop it only enters the small-region NMS threshold


def whole_image_proposal(height: int, width: int) -> Proposals:
    """The fallback when no SAM mask survives: one mask covering the image."""
    return Proposals(
        masks=torch.ones(1, height, width, dtype=torch.bool),
        boxes_xywh=torch.tensor([[0, 0, width - 1, height - 1]], dtype=torch.int64),
        iou_preds=torch.zeros(1),
        fallback=True,
    )


# ---- decoding a batch of prompts --------------------------------------------------------------


def decoder_call_sizes(batch: int, device: torch.device | str = "cpu") -> list[int]:
    """The prompt counts of the :func:`decode_points` calls that :func:`decode_in_chunks` makes
    for one batch of ``batch`` prompts: ``DECODE_CHUNK`` at a time on the CPU when ``batch`` is
    a larger multiple of it, else the whole batch in one call."""
    b = int(batch)
    if b <= DECODE_CHUNK or b % DECODE_CHUNK or torch.device(device).type != "cpu":
        return [b]
    return [DECODE_CHUNK] * (b // DECODE_CHUNK)


def decode_in_chunks(
    model,
    side: DecoderImageSide,
    coords: torch.Tensor,
    labels: torch.Tensor,
    *,
    arranged: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_points` for one batch of ``points_per_batch`` prompts, in the calls that
    :func:`decoder_call_sizes` gives (``DECODE_CHUNK`` prompts at a time on the CPU when the
    batch is a multiple of it, else whole).

    Every prompt's result depends only on its own rows of each product, but the matrix products
    of a 4-prompt call have other shapes than those of a 64-prompt one, and MKL / oneDNN pick
    their blocking and thread split by shape (and thread count): the logits and IoUs equal those
    of decoding the batch at once up to the last bits (measured max |Δ logit| 5.2e-8 with 3
    threads on an AVX-512 CPU, 0 with 1, 2, 4 or 8). Bit-identity holds against the reference
    decoding the same prompt counts (``SamAutomaticMaskGenerator`` with
    ``points_per_batch=DECODE_CHUNK``; ``tests/test_sam_proposals.py``). The per-prompt
    image-side tensors (4 × 4096 × 256 floats, 16 MB) stay in the CPU's cache: decoding the
    preset's 64 prompts took 0.76 of the time of one batch of 64
    (``bench/bench_sam_proposals.py``).

    ``arranged``: decode with :func:`decode_points_reduced` (True) or :func:`decode_points`
    (False); None: the arranged decoder exactly when ``model`` is a
    :class:`ReducedDecoderSam`."""
    if arranged is None:
        arranged = isinstance(model, ReducedDecoderSam)
    decode = decode_points_reduced if arranged else decode_points
    sizes = decoder_call_sizes(coords.shape[0], coords.device)
    if len(sizes) == 1:
        return decode(model, side, coords, labels)
    parts = [
        decode(model, side, coords[i : i + DECODE_CHUNK], labels[i : i + DECODE_CHUNK])
        for i in range(0, coords.shape[0], DECODE_CHUNK)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---- upsampling and filtering -----------------------------------------------------------------


def upsample_logits(model, low: torch.Tensor, input_size, original_size) -> torch.Tensor:
    """``Sam.postprocess_masks`` for (N, 1, 4h, 4w) logits, with the first bilinear resize
    computed only for the rows and columns its crop keeps (the same interpolation weights, so the
    same values), then resized to ``original_size``."""
    size = int(model.image_encoder.img_size)
    lh, lw = low.shape[-2:]
    sh, sw = size / lh, size / lw
    ih, iw = int(input_size[0]), int(input_size[1])
    # source rows used by output rows < ih: floor((ih - 1 + 0.5) / s - 0.5) + 1 (the next row)
    rh = min(lh, int(math.floor((ih - 0.5) / sh - 0.5)) + 2)
    rw = min(lw, int(math.floor((iw - 0.5) / sw - 0.5)) + 2)
    if sh == int(sh) and sw == int(sw) and (rh < lh or rw < lw):
        part = F.interpolate(
            low[..., :rh, :rw],
            scale_factor=(sh, sw),
            mode="bilinear",
            align_corners=False,
            recompute_scale_factor=False,
        )
    else:
        part = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
    part = part[..., :ih, :iw]
    return F.interpolate(part, tuple(original_size), mode="bilinear", align_corners=False)


def stability_scores(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """``segment_anything.utils.amg.calculate_stability_score`` (the same integer counts)."""
    inter = (logits > (threshold + offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    union = (logits > (threshold - offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return inter / union


def _setting(settings: Any, name: str, overrides: dict) -> Any:
    if name in overrides and overrides[name] is not None:
        return overrides[name]
    return getattr(settings, name, getattr(ProposalSettings, name))


def _resolved_settings(
    settings: Any, points_per_side: int | None, stability: str, overrides: dict
) -> ProposalSettings:
    """The knobs of one call: ``overrides`` and ``points_per_side`` over ``settings`` over the
    defaults, converted and checked (unknown names, stability mode, grid side)."""
    if stability not in STABILITY_MODES:
        raise ConfigError(
            f"unknown stability mode {stability!r}; choose one of {', '.join(STABILITY_MODES)}"
        )
    unknown = set(overrides) - set(ProposalSettings.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown proposal setting(s): {', '.join(sorted(unknown))}")
    overrides["points_per_side"] = points_per_side
    n_side = int(_setting(settings, "points_per_side", overrides))
    per_batch = max(1, int(_setting(settings, "points_per_batch", overrides)))
    iou_thr = float(_setting(settings, "pred_iou_thresh", overrides))
    stab_thr = float(_setting(settings, "stability_score_thresh", overrides))
    offset = float(_setting(settings, "stability_score_offset", overrides))
    nms_thr = float(_setting(settings, "box_nms_thresh", overrides))
    min_area = int(_setting(settings, "min_mask_region_area", overrides))
    crop_nms = float(_setting(settings, "crop_nms_thresh", overrides))
    if n_side < 1:
        raise ConfigError(f"points_per_side must be >= 1, got {n_side}")
    return ProposalSettings(
        points_per_side=n_side,
        points_per_batch=per_batch,
        pred_iou_thresh=iou_thr,
        stability_score_thresh=stab_thr,
        stability_score_offset=offset,
        box_nms_thresh=nms_thr,
        min_mask_region_area=min_area,
        crop_nms_thresh=crop_nms,
    )


@torch.no_grad()
def sam_proposals(
    sam,
    state,
    settings: Any = None,
    *,
    points_per_side: int | None = None,
    stability: str = "image",
    decoder: str = "auto",
    **overrides: Any,
) -> Proposals:
    """SAM automatic masks from an encoded image (no second encoder pass).

    ``settings``: any object with :class:`ProposalSettings`' fields (a ``ReferPreset`` has
    them), None for the defaults; ``points_per_side`` and ``overrides`` replace fields. The
    steps of ``SamAutomaticMaskGenerator`` with one crop: a ``points_per_side``² grid of
    positive point prompts decoded ``points_per_batch`` at a time (multimask), keep predicted
    IoU > ``pred_iou_thresh`` and stability ≥ ``stability_score_thresh`` (each only when its
    threshold is > 0, as the reference), box NMS at ``box_nms_thresh``; then holes and islands
    smaller than ``min_mask_region_area`` are removed and NMS reruns (at
    max(``box_nms_thresh``, ``crop_nms_thresh``), as the reference) preferring unchanged
    masks. Returns the whole-image fallback when nothing survives. ``stability="lowres"``: the
    opt-in fast mode (module docstring). ``decoder`` (``PROPOSAL_DECODERS``): ``"auto"``
    decodes with ``MaskDecoder``'s arithmetic in float32 (the exact path) and with the arranged
    decoder in reduced precision; ``"reference"`` with ``MaskDecoder``'s arithmetic whatever
    the precision; ``"arranged"`` with :func:`decode_points_reduced` whatever the precision (in
    float32 on a float32 copy of the decoder: the same model, other last bits).
    """
    from segment_anything.utils.amg import batched_mask_to_box, build_point_grid
    from segment_anything.utils.transforms import ResizeLongestSide

    cfg = _resolved_settings(settings, points_per_side, stability, overrides)
    if decoder not in PROPOSAL_DECODERS:
        raise ConfigError(
            f"unknown proposal decoder {decoder!r}; choose one of {', '.join(PROPOSAL_DECODERS)}"
        )
    # sam.model in float32 (a float32 copy arranged for speed with decoder="arranged"); a
    # reduced-precision copy otherwise
    model = decoder_for(sam, arranged=decoder == "arranged")
    arranged = decoder == "arranged" or (decoder == "auto" and isinstance(model, ReducedDecoderSam))
    H, W = state.original_size
    transform = ResizeLongestSide(int(model.image_encoder.img_size))
    points = build_point_grid(cfg.points_per_side) * np.array([[W, H]], dtype=np.float64)
    side = decoder_image_side(model, state.embedding)
    masks, iou, stab = _decode_grid(model, state, side, points, transform, cfg, stability, arranged)
    if masks.shape[0] == 0:
        return whole_image_proposal(H, W)
    boxes = batched_mask_to_box(masks)
    return _suppress_overlaps(masks, iou, boxes, stab, cfg)


def _decode_grid(
    model,
    state,
    side: DecoderImageSide,
    points,
    transform,
    cfg: ProposalSettings,
    stability: str,
    arranged: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-3: decode the grid ``points_per_batch`` prompts at a time, keep by predicted IoU
    on the low-resolution logits, then (:func:`_finish_survivors`) the survivors of several
    decoder batches pooled up to ``FLUSH_MASKS`` masks. (masks, IoUs, stability scores)."""
    H, W = state.original_size
    device = state.embedding.device
    per_batch, iou_thr = cfg.points_per_batch, cfg.pred_iou_thresh
    masks_l: list[torch.Tensor] = []
    iou_l: list[torch.Tensor] = []
    stab_l: list[torch.Tensor] = []
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    n_pending = 0
    for s in range(0, len(points), per_batch):
        pts = points[s : s + per_batch]
        coords = torch.as_tensor(transform.apply_coords(pts, (H, W)), device=device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
        low, iou = decode_in_chunks(
            model, side, coords[:, None, :], labels[:, None], arranged=arranged
        )
        low, iou = low.flatten(0, 1), iou.flatten(0, 1)
        if iou_thr > 0.0:
            keep = iou > iou_thr
            low, iou = low[keep], iou[keep]
        pending.append((low, iou))
        n_pending += low.shape[0]
        if n_pending >= FLUSH_MASKS or s + per_batch >= len(points):
            out = _finish_survivors(
                model,
                state,
                torch.cat([p[0] for p in pending]),
                torch.cat([p[1] for p in pending]),
                cfg,
                stability,
            )
            masks_l += out[0]
            iou_l += out[1]
            stab_l += out[2]
            pending, n_pending = [], 0
    masks = torch.cat(masks_l) if masks_l else torch.zeros(0, H, W, dtype=torch.bool)
    iou = torch.cat(iou_l) if iou_l else torch.zeros(0)
    stab = torch.cat(stab_l) if stab_l else torch.zeros(0)
    return masks, iou, stab


def _finish_survivors(
    model, state, low: torch.Tensor, iou: torch.Tensor, cfg: ProposalSettings, stability: str
):
    """Step 3: stability (and, by default, upsampling) for the survivors only, in chunks of
    ``UPSAMPLE_CHUNK``: lists of (masks, IoUs, stability scores) per chunk, on the CPU."""
    thr = float(model.mask_threshold)
    offset, stab_thr = cfg.stability_score_offset, cfg.stability_score_thresh
    size = int(model.image_encoder.img_size)
    if stability == "lowres":
        ch = math.ceil(state.input_size[0] * low.shape[-2] / size)
        cw = math.ceil(state.input_size[1] * low.shape[-1] / size)
        stab = stability_scores(low[:, :ch, :cw], thr, offset)
        if stab_thr > 0.0:
            keep = stab >= stab_thr
            low, iou, stab = low[keep], iou[keep], stab[keep]
    out_m, out_i, out_s = [], [], []
    one_pass = composite_upsampler(model, low.shape[-2:], state.input_size, state.original_size)
    for c in range(0, low.shape[0], UPSAMPLE_CHUNK):
        if one_pass is not None:  # reduced precision, small images: both resizes in one
            logits = one_pass(low[c : c + UPSAMPLE_CHUNK])
        else:
            # in float32 (a no-op there): CPU bilinear resizes of bf16 ran 2× slower than fp32
            part = low[c : c + UPSAMPLE_CHUNK, None].float()
            logits = upsample_logits(model, part, state.input_size, state.original_size)[:, 0]
        m, i = logits > thr, iou[c : c + UPSAMPLE_CHUNK]
        if stability == "image":
            st = stability_scores(logits, thr, offset)
            if stab_thr > 0.0:
                keep = st >= stab_thr
                m, i, st = m[keep], i[keep], st[keep]
        else:
            st = stab[c : c + UPSAMPLE_CHUNK]
        del logits
        out_m.append(m.cpu())
        out_i.append(i.float().cpu())
        out_s.append(st.float().cpu())
    return out_m, out_i, out_s


def _suppress_overlaps(masks, iou, boxes, stab, cfg: ProposalSettings) -> Proposals:
    """Step 4: NMS, small regions, NMS again (segment_anything's order of operations)."""
    from torchvision.ops.boxes import batched_nms

    nms_thr, min_area = cfg.box_nms_thresh, cfg.min_mask_region_area
    keep = batched_nms(boxes.float(), iou, torch.zeros(len(boxes)), nms_thr)
    masks, iou, boxes, stab = masks[keep], iou[keep], boxes[keep], stab[keep]
    if min_area > 0:
        masks, iou, boxes, stab = _clean_small_regions(
            masks, iou, boxes, stab, min_area, max(nms_thr, cfg.crop_nms_thresh)
        )
    xywh = boxes.clone().to(torch.int64)  # SAM's bbox: [x0, y0, x1 - x0, y1 - y0]
    xywh[:, 2] -= xywh[:, 0]
    xywh[:, 3] -= xywh[:, 1]
    return Proposals(masks=masks, boxes_xywh=xywh, iou_preds=iou, fallback=False, stability=stab)


def _clean_small_regions(masks, iou, boxes, stab, min_area: int, nms_thr: float):
    """``SamAutomaticMaskGenerator.postprocess_small_regions``: holes, then islands smaller
    than ``min_area``; NMS preferring unchanged masks; only kept changed masks take the new
    mask and box."""
    from segment_anything.utils.amg import batched_mask_to_box, remove_small_regions
    from torchvision.ops.boxes import batched_nms

    new, scores = [], []
    for mk in masks.numpy():
        mk, changed_h = remove_small_regions(mk, min_area, mode="holes")
        mk, changed_i = remove_small_regions(mk, min_area, mode="islands")
        new.append(torch.as_tensor(mk))
        scores.append(float(not (changed_h or changed_i)))
    new_masks = torch.stack(new)
    new_boxes = batched_mask_to_box(new_masks)
    keep = batched_nms(
        new_boxes.float(), torch.as_tensor(scores), torch.zeros(len(new_boxes)), nms_thr
    )
    for i in keep.tolist():
        if scores[i] == 0.0:
            masks[i] = new_masks[i]
            boxes[i] = new_boxes[i]
    return masks[keep], iou[keep], boxes[keep], stab[keep]
