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
speed (no expanded image side, vectorised softmax over a prompt's tokens, channels-last
upscaling as matrix products); the prompt encoder's random-Fourier positional encodings are
computed in float32 (sin/cos of arguments up to ~30 need the mantissa) and cast. The bf16 logits
are upsampled and thresholded in float32 (bf16 bilinear resizes run 2× slower on the CPU).
Decoding 64 prompts (full-size random SAM ViT-B, one thread, AMD EPYC with avx512_bf16): 2.24 s
against 5.14 s in float32 and 2.76 s for the same bf16 weights through :func:`decode_points`.
The float32 path is unchanged (bit-identical to ``SamAutomaticMaskGenerator``); the bf16 one
is within the tolerance ``tests/test_precision.py`` asserts (README, "Devices and precision").
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.config import PROPOSAL_STABILITY_MODES as STABILITY_MODES
from zsdense.config import ReferPreset
from zsdense.errors import ConfigError

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


# ---- reduced precision ----------------------------------------------------------------------


class _PromptEncoderAt:
    """SAM's prompt encoder computed in float32 with autocast off (its positional encoding takes
    sin/cos of ``2π·coords·G``, up to ~30 rad: bf16 would shift them by up to 0.1 rad), the
    sparse (point) embeddings cast to ``dtype``."""

    def __init__(self, prompt_encoder, dtype: torch.dtype):
        self._pe = prompt_encoder
        self.dtype = dtype
        self.no_mask_embed = prompt_encoder.no_mask_embed  # float32: added to the float32 image

    def _fp32(self):
        dev = self.no_mask_embed.weight.device.type
        return torch.autocast(device_type=dev, enabled=False)

    def __call__(self, points=None, boxes=None, masks=None):
        with self._fp32():
            sparse, dense = self._pe(points=points, boxes=boxes, masks=masks)
        # dense: the no-mask embedding expanded over the grid (a view; decoding adds it to the
        # image side once, in float32): casting it would copy B × 256 × 64 × 64 values
        return sparse.to(self.dtype), dense

    def get_dense_pe(self) -> torch.Tensor:
        with self._fp32():
            return self._pe.get_dense_pe()


class ReducedDecoderSam:
    """What :func:`decode_points` reads from a ``Sam`` model, with the mask decoder in ``dtype``
    (a cast copy: the model's own decoder is left in float32) and the prompt encoder in float32
    (:class:`_PromptEncoderAt`)."""

    def __init__(self, model, dtype: torch.dtype):
        self.dtype = dtype
        self.image_encoder = model.image_encoder
        self.mask_threshold = model.mask_threshold
        self.prompt_encoder = _PromptEncoderAt(model.prompt_encoder, dtype)
        self.mask_decoder = copy.deepcopy(model.mask_decoder).to(dtype).eval()
        self.mask_decoder.requires_grad_(False)


def decoder_for(sam) -> Any:
    """The model :func:`sam_proposals` decodes with: ``sam.model`` itself when SAM's image encoder
    is float32 (the exact path), else a :class:`ReducedDecoderSam` at the encoder's precision,
    built once per SAM wrapper and precision."""
    model = sam.model
    dtype = model.image_encoder.patch_embed.proj.weight.dtype
    if dtype == torch.float32:
        return model
    cache = sam.__dict__.setdefault("_reduced_decoders", {})
    dev = str(model.device)
    key = (dtype, dev)
    if key not in cache:
        cache[key] = ReducedDecoderSam(model, dtype)
    return cache[key]


# ---- the mask decoder, shared image side ------------------------------------------------------


def _project(attn, q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None):
    """``Attention``'s three input projections (None: not needed)."""
    return (
        None if q is None else attn.q_proj(q),
        None if k is None else attn.k_proj(k),
        None if v is None else attn.v_proj(v),
    )


def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` after the projections, the same operations in the same order.

    ``q``/``k``/``v`` may be batch-expanded views of one image's projections: the matrix products
    reshape them to the same contiguous batches the reference builds."""
    b = max(q.shape[0], k.shape[0], v.shape[0])
    q = attn._separate_heads(q, attn.num_heads).expand(b, -1, -1, -1)
    k = attn._separate_heads(k, attn.num_heads).expand(b, -1, -1, -1)
    v = attn._separate_heads(v, attn.num_heads).expand(b, -1, -1, -1)
    c_per_head = q.shape[-1]
    a = q @ k.permute(0, 1, 3, 2)
    a = a.div_(math.sqrt(c_per_head))  # in place: the same division, no new tensor
    a = torch.softmax(a, dim=-1)
    out = a @ v
    return attn.out_proj(attn._recombine_heads(out))


@dataclass
class DecoderImageSide:
    """What the mask decoder computes from the image alone (identical for every prompt)."""

    keys: torch.Tensor  # (1, HW, C) image embedding + no-mask embedding, token layout (a view)
    key_pe: torch.Tensor  # (1, HW, C) dense positional encoding, token layout (a view)
    k_pe: torch.Tensor  # (1, HW, C) keys + key_pe
    t2i_k: torch.Tensor  # first block, token-to-image key projection of k_pe
    t2i_v: torch.Tensor  # first block, token-to-image value projection of keys
    i2t_q: torch.Tensor  # first block, image-to-token query projection of k_pe
    size: tuple[int, int, int]  # (C, h, w) of the embedding


@torch.no_grad()
def decoder_image_side(model, embedding: torch.Tensor) -> DecoderImageSide:
    """Precompute the prompt-independent part of ``model.mask_decoder`` for one image
    (``embedding``: (1, C, h, w)), to be passed to :func:`decode_points` for every batch."""
    if embedding.dim() != 4 or embedding.shape[0] != 1:
        raise ConfigError(
            f"expected one image embedding (1, C, h, w), got {tuple(embedding.shape)}"
        )
    pe_mod = model.prompt_encoder
    tr = model.mask_decoder.transformer
    _, c, h, w = embedding.shape
    dense = pe_mod.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
    src = embedding + dense  # the reference: repeat_interleave(embedding) + dense, per prompt
    pos = pe_mod.get_dense_pe()
    dt = tr.layers[0].norm1.weight.dtype if len(tr.layers) else src.dtype  # the decoder's
    keys = src.flatten(2).permute(0, 2, 1).to(dt)  # (float32: the same tensor, no copy)
    key_pe = pos.flatten(2).permute(0, 2, 1).to(dt)
    k_pe = keys + key_pe
    first = tr.layers[0]
    _, t2i_k, t2i_v = _project(first.cross_attn_token_to_image, None, k_pe, keys)
    i2t_q, _, _ = _project(first.cross_attn_image_to_token, k_pe, None, None)
    return DecoderImageSide(keys, key_pe, k_pe, t2i_k, t2i_v, i2t_q, (c, h, w))


def _token_self_attention(layer, queries, query_pe):
    """A ``TwoWayAttentionBlock``'s first step: the prompt tokens' self-attention (with their
    positional encoding unless the block skips it) and ``norm1``, in the reference's order."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    return layer.norm1(queries)


def _block(layer, queries, keys, query_pe, key_pe, first: DecoderImageSide | None):
    """``TwoWayAttentionBlock.forward``; ``first``: the shared image side of block 0."""
    queries = _token_self_attention(layer, queries, query_pe)
    q = queries + query_pe
    t2i = layer.cross_attn_token_to_image
    if first is not None:
        k_pe = first.k_pe
        qp, kp, vp = t2i.q_proj(q), first.t2i_k, first.t2i_v
    else:
        k_pe = keys + key_pe  # the reference computes this sum twice per block: once here
        qp, kp, vp = _project(t2i, q, k_pe, keys)
    queries = layer.norm2(queries + _attend(t2i, qp, kp, vp))
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + query_pe
    i2t = layer.cross_attn_image_to_token
    if first is not None:
        qp = first.i2t_q
        _, kp, vp = _project(i2t, None, q, queries)
    else:
        qp, kp, vp = _project(i2t, k_pe, q, queries)
    keys = layer.norm4(keys + _attend(i2t, qp, kp, vp))
    return queries, keys


def _upscale(seq: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``MaskDecoder.output_upscaling`` with its LayerNorm2d and GELUs computed in place (the
    same operations on the same values; the reference's LayerNorm2d also computes ``x − u``
    twice)."""
    from segment_anything.modeling.common import LayerNorm2d

    for mod in seq:
        if isinstance(mod, LayerNorm2d):
            d = x - x.mean(1, keepdim=True)
            s = d.pow(2).mean(1, keepdim=True)
            x = d.div_(torch.sqrt(s + mod.eps))
            x = x.mul_(mod.weight[:, None, None]).add_(mod.bias[:, None, None])
        elif isinstance(mod, torch.nn.GELU):
            x = torch.ops.aten.gelu_(x, approximate=mod.approximate)
        else:
            x = mod(x)
    return x


@torch.no_grad()
def decode_points(
    model, side: DecoderImageSide, coords: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimask decoding of point prompts: low-resolution logits (B, 3, 4h, 4w) and predicted
    IoUs (B, 3), equal to ``model.mask_decoder(..., multimask_output=True)`` after
    ``model.prompt_encoder(points=(coords, labels))``.

    ``coords`` (B, n, 2) in the model's input frame (as ``SamPredictor.predict_torch`` takes
    them), ``labels`` (B, n); ``side`` from :func:`decoder_image_side`."""
    dec = model.mask_decoder
    tr = dec.transformer
    sparse, _ = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    out_tokens = out_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((out_tokens, sparse), dim=1)
    b = tokens.shape[0]
    c, h, w = side.size

    queries, keys = tokens, side.keys
    for i, layer in enumerate(tr.layers):
        queries, keys = _block(layer, queries, keys, tokens, side.key_pe, side if i == 0 else None)
    if len(tr.layers) == 0:  # (no such SAM; keeps the shapes right)
        keys = keys.expand(b, -1, -1)
    q = queries + tokens
    k = keys + side.key_pe
    qp, kp, vp = _project(tr.final_attn_token_to_image, q, k, keys)
    queries = tr.norm_final_attn(queries + _attend(tr.final_attn_token_to_image, qp, kp, vp))

    iou_token_out = queries[:, 0, :]
    mask_tokens_out = queries[:, 1 : 1 + dec.num_mask_tokens, :]
    src = keys.transpose(1, 2).view(b, c, h, w)
    up = _upscale(dec.output_upscaling, src)
    hyper = torch.stack(
        [
            dec.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
            for i in range(dec.num_mask_tokens)
        ],
        dim=1,
    )
    bu, cu, hu, wu = up.shape
    masks = (hyper @ up.view(bu, cu, hu * wu)).view(bu, -1, hu, wu)[:, 1:]
    iou_pred = dec.iou_prediction_head(iou_token_out)[:, 1:]
    return masks, iou_pred


# ---- the mask decoder in reduced precision ---------------------------------------------------


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, N, h·c) -> (B·h, N, c)."""
    b, n, hc = x.shape
    return x.view(b, n, h, hc // h).transpose(1, 2).reshape(b * h, n, hc // h)


def _unheads(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B·h, N, c) -> (B, N, h·c)."""
    bh, n, c = x.shape
    return x.view(b, bh // b, n, c).transpose(1, 2).reshape(b, n, (bh // b) * c)


def _attend_tokens_to_image(attn, qp, kp, vp) -> torch.Tensor:
    """Tokens (B, T, C') attending to image keys/values (1 or B, HW, C'), then out_proj.
    Shared (batch-1) image keys are not expanded: the prompts' tokens are stacked as rows."""
    h, b, t, c = attn.num_heads, qp.shape[0], qp.shape[1], qp.shape[2]
    scale = 1.0 / math.sqrt(c // h)
    if kp.shape[0] == 1:
        q = qp.reshape(1, b * t, c)  # every prompt's tokens as rows of one batch
        out = _attend_rows(_heads(q * scale, h), _heads(kp, h), _heads(vp, h))  # (h, B·T, c)
        out = _unheads(out, 1).view(b, t, c)
    else:
        out = _unheads(_attend_rows(_heads(qp * scale, h), _heads(kp, h), _heads(vp, h)), b)
    return attn.out_proj(out)


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ) v over a batch of heads (q already scaled)."""
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)


def _attend_image_to_tokens(attn, qp, kp, vp) -> torch.Tensor:
    """Image queries (1 or B, HW, C') attending to each prompt's few tokens (B, T, C'), then
    out_proj. The scores are formed transposed, (…, T, HW), so that the softmax over the T
    tokens runs along a dimension with HW contiguous elements behind it (10× faster than rows
    of 7 on the CPU), and shared image queries are never expanded."""
    h, b, t, c = attn.num_heads, kp.shape[0], kp.shape[1], kp.shape[2]
    hw, cph = qp.shape[1], c // h
    k = (kp * (1.0 / math.sqrt(cph))).view(b, t, h, cph)
    v = vp.view(b, t, h, cph)
    if qp.shape[0] == 1:  # one image side for every prompt: heads outermost
        qh = _heads(qp, h)  # (h, HW, c/h)
        kh = k.permute(2, 0, 1, 3).reshape(h, b * t, cph)
        st = torch.bmm(kh, qh.transpose(1, 2)).view(h * b, t, hw)
        vh = v.permute(2, 0, 1, 3).reshape(h * b, t, cph)
        out = torch.bmm(torch.softmax(st, dim=1).transpose(1, 2), vh)  # (h·B, HW, c/h)
        out = out.view(h, b, hw, cph).permute(1, 2, 0, 3).reshape(b, hw, c)
    else:
        kh = k.permute(0, 2, 1, 3).reshape(b * h, t, cph)
        st = torch.bmm(kh, _heads(qp, h).transpose(1, 2))  # (B·h, T, HW)
        vh = v.permute(0, 2, 1, 3).reshape(b * h, t, cph)
        out = _unheads(torch.bmm(torch.softmax(st, dim=1).transpose(1, 2), vh), b)
    return attn.out_proj(out)


def _conv_t2x2_channels_last(conv, x: torch.Tensor) -> torch.Tensor:
    """A 2×2 stride-2 ``ConvTranspose2d`` on per-pixel rows ``x`` (..., C_in) as one matrix
    product: (..., 2, 2, C_out) with the new pixels (di, dj) of each input pixel, in whatever
    pixel order ``x`` has (the caller puts the pixels in place at the end)."""
    w = conv.weight  # (C_in, C_out, 2, 2)
    cin, cout = w.shape[0], w.shape[1]
    wm = w.permute(0, 2, 3, 1).reshape(cin, 4 * cout)  # (C_in, [di, dj, C_out])
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    y = F.linear(x, wm.t(), bias)
    return y.view(*x.shape[:-1], 2, 2, cout)


def _upscaling_is_standard(seq) -> bool:
    from segment_anything.modeling.common import LayerNorm2d

    mods = list(seq)
    types = (torch.nn.ConvTranspose2d, LayerNorm2d, torch.nn.GELU, torch.nn.ConvTranspose2d)
    if len(mods) != 5 or not all(isinstance(m, t) for m, t in zip(mods, types)):
        return False
    if not isinstance(mods[4], torch.nn.GELU):
        return False
    return all(
        tuple(m.kernel_size) == (2, 2) and tuple(m.stride) == (2, 2) and tuple(m.padding) == (0, 0)
        for m in (mods[0], mods[3])
    )


@torch.no_grad()
def decode_points_reduced(
    model, side: DecoderImageSide, coords: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_points` for a reduced-precision decoder (:class:`ReducedDecoderSam`): the
    same model, arranged for speed instead of bit-identity with ``MaskDecoder``:

    - attention between a prompt's tokens and the image never expands the shared image side
      (the tokens of every prompt become rows of one product), and image-to-token scores are
      formed transposed so that the softmax over a prompt's few tokens is vectorised;
    - the output upscaling runs channels-last: each 2×2 stride-2 transposed convolution is one
      matrix product per pixel, LayerNorm2d a LayerNorm over the last axis, and the pixels stay
      in blocked order until the mask logits (3 channels instead of 32) are put in place.

    Low-resolution logits (B, 3, 4h, 4w) and IoUs (B, 3), in the decoder's dtype."""
    dec = model.mask_decoder
    tr = dec.transformer
    if not _upscaling_is_standard(dec.output_upscaling) or len(tr.layers) == 0:
        return decode_points(model, side, coords, labels)
    sparse, _ = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((out_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    b = tokens.shape[0]
    c, h, w = side.size

    queries, keys = tokens, side.keys  # keys: (1, HW, C) shared until block 0 writes them
    for i, layer in enumerate(tr.layers):
        queries = _token_self_attention(layer, queries, tokens)
        q = queries + tokens
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if i == 0:
            kp, vp, iq = side.t2i_k, side.t2i_v, side.i2t_q
        else:
            k_pe = keys + side.key_pe
            kp, vp, iq = t2i.k_proj(k_pe), t2i.v_proj(keys), i2t.q_proj(k_pe)
        queries = layer.norm2(queries + _attend_tokens_to_image(t2i, t2i.q_proj(q), kp, vp))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tokens
        upd = _attend_image_to_tokens(i2t, iq, i2t.k_proj(q), i2t.v_proj(queries))
        keys = layer.norm4(keys + upd)  # (B, HW, C)
    fin = tr.final_attn_token_to_image
    k_pe = keys + side.key_pe
    att = _attend_tokens_to_image(
        fin, fin.q_proj(queries + tokens), fin.k_proj(k_pe), fin.v_proj(keys)
    )
    queries = tr.norm_final_attn(queries + att)

    iou_token_out = queries[:, 0, :]
    mask_tokens_out = queries[:, 1 : 1 + dec.num_mask_tokens, :]
    conv1, ln, gelu1, conv2, gelu2 = list(dec.output_upscaling)
    x = keys.view(b, h, w, c)  # channels-last pixels, row-major
    x = _conv_t2x2_channels_last(conv1, x)  # (B, h, w, 2, 2, C1)
    x = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)
    x = torch.ops.aten.gelu_(x, approximate=gelu1.approximate)
    x = _conv_t2x2_channels_last(conv2, x)  # (B, h, w, 2, 2, 2, 2, C2)
    x = torch.ops.aten.gelu_(x, approximate=gelu2.approximate)
    hyper = torch.stack(
        [
            dec.output_hypernetworks_mlps[j](mask_tokens_out[:, j, :])
            for j in range(1, dec.num_mask_tokens)
        ],
        dim=1,
    )  # (B, 3, C2): the multimask outputs only
    blocked = torch.bmm(hyper, x.reshape(b, -1, x.shape[-1]).transpose(1, 2))  # (B, 3, pixels)
    # blocked pixel (i, j, di1, dj1, di2, dj2) -> row 4i + 2di1 + di2, column 4j + 2dj1 + dj2
    masks = blocked.view(b, -1, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
    masks = masks.reshape(b, -1, 4 * h, 4 * w)
    iou_pred = dec.iou_prediction_head(iou_token_out)[:, 1:]
    return masks, iou_pred

def decoder_call_sizes(batch: int, device: torch.device | str = "cpu") -> list[int]:
    """The prompt counts of the :func:`decode_points` calls that :func:`decode_in_chunks` makes
    for one batch of ``batch`` prompts: ``DECODE_CHUNK`` at a time on the CPU when ``batch`` is
    a larger multiple of it, else the whole batch in one call."""
    b = int(batch)
    if b <= DECODE_CHUNK or b % DECODE_CHUNK or torch.device(device).type != "cpu":
        return [b]
    return [DECODE_CHUNK] * (b // DECODE_CHUNK)


def decode_in_chunks(
    model, side: DecoderImageSide, coords: torch.Tensor, labels: torch.Tensor
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
    (``bench/bench_sam_proposals.py``)."""
    decode = decode_points_reduced if isinstance(model, ReducedDecoderSam) else decode_points
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


@torch.no_grad()
def sam_proposals(
    sam,
    state,
    settings: Any = None,
    *,
    points_per_side: int | None = None,
    stability: str = "image",
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
    opt-in fast mode (module docstring).
    """
    from segment_anything.utils.amg import batched_mask_to_box, build_point_grid
    from segment_anything.utils.transforms import ResizeLongestSide
    from torchvision.ops.boxes import batched_nms

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

    model = decoder_for(sam)  # sam.model in float32; a reduced-precision decoder otherwise
    H, W = state.original_size
    device = state.embedding.device
    transform = ResizeLongestSide(int(model.image_encoder.img_size))
    points = build_point_grid(n_side) * np.array([[W, H]], dtype=np.float64)  # (P, 2) x, y
    thr = float(model.mask_threshold)
    side = decoder_image_side(model, state.embedding)

    # 3: stability (and, by default, upsampling) for the survivors only, in bounded chunks;
    # survivors of several decoder batches are pooled (up to FLUSH_MASKS low-res masks)
    size = int(model.image_encoder.img_size)

    def finish(low: torch.Tensor, iou: torch.Tensor):
        if stability == "lowres":
            ch = math.ceil(state.input_size[0] * low.shape[-2] / size)
            cw = math.ceil(state.input_size[1] * low.shape[-1] / size)
            stab = stability_scores(low[:, :ch, :cw], thr, offset)
            if stab_thr > 0.0:
                keep = stab >= stab_thr
                low, iou, stab = low[keep], iou[keep], stab[keep]
        out_m, out_i, out_s = [], [], []
        for c in range(0, low.shape[0], UPSAMPLE_CHUNK):
            # in float32 (a no-op there): CPU bilinear resizes of bf16 ran 2× slower than float32
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

    # 1-2: decode the grid, keep by predicted IoU on the low-resolution logits
    masks_l: list[torch.Tensor] = []
    iou_l: list[torch.Tensor] = []
    stab_l: list[torch.Tensor] = []
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    n_pending = 0
    for s in range(0, len(points), per_batch):
        pts = points[s : s + per_batch]
        coords = torch.as_tensor(transform.apply_coords(pts, (H, W)), device=device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
        low, iou = decode_in_chunks(model, side, coords[:, None, :], labels[:, None])
        low, iou = low.flatten(0, 1), iou.flatten(0, 1)
        if iou_thr > 0.0:
            keep = iou > iou_thr
            low, iou = low[keep], iou[keep]
        pending.append((low, iou))
        n_pending += low.shape[0]
        if n_pending >= FLUSH_MASKS or s + per_batch >= len(points):
            out = finish(torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending]))
            masks_l += out[0]
            iou_l += out[1]
            stab_l += out[2]
            pending, n_pending = [], 0
    masks = torch.cat(masks_l) if masks_l else torch.zeros(0, H, W, dtype=torch.bool)
    iou = torch.cat(iou_l) if iou_l else torch.zeros(0)
    stab = torch.cat(stab_l) if stab_l else torch.zeros(0)
    if masks.shape[0] == 0:
        return whole_image_proposal(H, W)
    boxes = batched_mask_to_box(masks)

    # 4: NMS, small regions, NMS again (segment_anything's order of operations)
    keep = batched_nms(boxes.float(), iou, torch.zeros(len(boxes)), nms_thr)
    masks, iou, boxes, stab = masks[keep], iou[keep], boxes[keep], stab[keep]
    if min_area > 0:
        masks, iou, boxes, stab = _clean_small_regions(
            masks, iou, boxes, stab, min_area, max(nms_thr, crop_nms)
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
