"""SAM's mask decoder in reduced precision (:mod:`zsdense.models.sam_proposals`, "Reduced
precision"): a bf16 copy of the decoder with the prompt encoder kept in float32, cached per SAM
wrapper (:func:`decoder_for`), :func:`decode_points_reduced`, the same model arranged for
speed instead of bit-identity, and :func:`composite_upsampler`, ``Sam.postprocess_masks``' two
bilinear resizes as one."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.models.sam_decoder import (
    DecoderImageSide,
    _token_self_attention,
    decode_points,
)


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


def decoder_for(sam, *, arranged: bool = False) -> Any:
    """The model :func:`sam_proposals` decodes with: ``sam.model`` itself when SAM's image encoder
    is float32 (the exact path), else a :class:`ReducedDecoderSam` at the encoder's precision,
    built once per SAM wrapper and precision. ``arranged``: in float32 too, a float32
    :class:`ReducedDecoderSam` (the copy :func:`decode_points_reduced` runs; opt-in, as its
    logits are not the reference's bits)."""
    model = sam.model
    dtype = model.image_encoder.patch_embed.proj.weight.dtype
    if dtype == torch.float32 and not arranged:
        return model
    cache = sam.__dict__.setdefault("_reduced_decoders", {})
    dev = str(model.device)
    key = (dtype, dev)
    if key not in cache:
        cache[key] = ReducedDecoderSam(model, dtype)
    return cache[key]


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, N, h·c) -> (B·h, N, c)."""
    b, n, hc = x.shape
    return x.view(b, n, h, hc // h).transpose(1, 2).reshape(b * h, n, hc // h)


def _unheads(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B·h, N, c) -> (B, N, h·c)."""
    bh, n, c = x.shape
    return x.view(b, bh // b, n, c).transpose(1, 2).reshape(b, n, (bh // b) * c)


def _tokens_to_shared_image(attn, qp, kp, vp) -> torch.Tensor:
    """Tokens (B, T, C') attending to the shared image side's projected keys and values (1, HW,
    C'; block 0, projected once per image), then out_proj. The image side is not expanded: the
    tokens of every prompt are stacked as rows of one product per head."""
    h, b, t, c = attn.num_heads, qp.shape[0], qp.shape[1], qp.shape[2]
    q = qp.reshape(1, b * t, c) * (1.0 / math.sqrt(c // h))
    a = torch.softmax(torch.bmm(_heads(q, h), _heads(kp, h).transpose(1, 2)), dim=-1)
    out = torch.bmm(a, _heads(vp, h))  # (h, B·T, c/h)
    return attn.out_proj(_unheads(out, 1).view(b, t, c))


def _by_head(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, T, h·c) -> (h, B·T, c): each head's rows for every prompt."""
    b, t, hc = x.shape
    return x.view(b, t, h, hc // h).permute(2, 0, 1, 3).reshape(h, b * t, hc // h)


def _by_prompt(x: torch.Tensor, b: int) -> torch.Tensor:
    """(h, B·T, D) -> (B, h·T, D): each prompt's rows, head-major."""
    h, bt, d = x.shape
    return x.view(h, b, bt // b, d).transpose(0, 1).reshape(b, h * (bt // b), d)


def _tokens_to_image_folded(attn, qp, k_pe, keys) -> torch.Tensor:
    """Tokens (B, T, C') attending to each prompt's own image side (``k_pe``, ``keys``: (B, HW,
    C)), then out_proj, without projecting the HW image rows: the key projection is folded into
    the queries (q_h·(W_k,h x + b_k,h) = (q_h W_k,h)·x + a constant per query row, which the
    softmax cancels) and the value projection applied after the weighted sum (the attention
    weights of a row sum to 1, so its bias passes through). The image-side products have h·T
    rows (56 for SAM's single-point prompts) instead of projecting HW rows to C' columns."""
    h, b, t, ci = attn.num_heads, qp.shape[0], qp.shape[1], qp.shape[2]
    cph = ci // h
    qh = _by_head(qp * (1.0 / math.sqrt(cph)), h)  # (h, B·T, c/h)
    qf = _by_prompt(torch.bmm(qh, attn.k_proj.weight.view(h, cph, -1)), b)  # (B, h·T, C)
    a = torch.softmax(torch.bmm(qf, k_pe.transpose(1, 2)), dim=-1)  # (B, h·T, HW)
    pooled = torch.bmm(a, keys).view(b, h, t, -1).transpose(0, 1).reshape(h, b * t, -1)
    out = torch.bmm(pooled, attn.v_proj.weight.view(h, cph, -1).transpose(1, 2))  # (h, B·T, c/h)
    out = out.view(h, b, t, cph).permute(1, 2, 0, 3).reshape(b, t, ci) + attn.v_proj.bias
    return attn.out_proj(out)


def _image_to_tokens_folded(attn, iq, kp, vp, projected: bool) -> torch.Tensor:
    """Image queries attending to each prompt's few tokens (keys ``kp``, values ``vp``: (B, T,
    C') after their projections), out_proj included, as (B, HW, C), without projecting the HW
    image rows: the output projection is applied to the values first (Σₕ Pₕ Vₕ W_o,hᵀ + b_o =
    Σₕ Pₕ (Vₕ W_o,hᵀ + b_o / h): every head's weights sum to 1 per pixel), so the update is one
    product of the (HW × h·T) weights with (h·T × C) projected values. ``iq``: the image
    queries already projected ((1, HW, C'), ``projected``: block 0's shared image side) or the
    image rows ``keys + key_pe`` (B, HW, C), whose query projection is folded into the token
    keys (a score bias per token, b_q,h·kₜ, is kept: it varies along the softmax). Scores are
    formed (…, T, HW) so that the softmax over a prompt's tokens is vectorised along HW."""
    h, b, t, ci = attn.num_heads, kp.shape[0], kp.shape[1], kp.shape[2]
    cph = ci // h
    kh = _by_head(kp * (1.0 / math.sqrt(cph)), h)  # (h, B·T, c/h)
    wo = attn.out_proj.weight.view(-1, h, cph).permute(1, 2, 0)  # (h, c/h, C)
    vo = _by_prompt(torch.bmm(_by_head(vp, h), wo), b) + attn.out_proj.bias / h  # (B, h·T, C)
    if projected:  # (1, HW, C') shared by every prompt: heads outermost, then re-ordered
        st = torch.bmm(kh, _heads(iq, h).transpose(1, 2))  # (h, B·T, HW)
        p = torch.softmax(st.view(h, b, t, -1), dim=2).transpose(0, 1)
        p = p.reshape(b, h * t, -1)
    else:
        kf = _by_prompt(torch.bmm(kh, attn.q_proj.weight.view(h, cph, -1)), b)  # (B, h·T, C)
        bias = (kh * attn.q_proj.bias.view(h, 1, cph)).sum(-1, keepdim=True)  # (h, B·T, 1)
        st = torch.baddbmm(_by_prompt(bias, b), kf, iq.transpose(1, 2))  # (B, h·T, HW)
        p = torch.softmax(st.view(b, h, t, -1), dim=2).view(b, h * t, -1)
    return torch.bmm(p.transpose(1, 2), vo)  # (B, HW, C)


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

    - attention between a prompt's tokens and the image never projects the HW image rows
      per prompt: block 0 reads the shared image side's projections (computed once per image;
      the tokens of every prompt become rows of one product), and from block 1 on and in the
      final attention, where each prompt has its own image side, the projections are folded
      into the few tokens
      (:func:`_tokens_to_image_folded`, :func:`_image_to_tokens_folded`): each image-side
      product then has one dimension of h·T (56: 8 heads × 7 tokens for a single-point prompt)
      where the reference's projections have 128 or 256 (39 % fewer multiply-adds for the
      whole decoder of the full-size SAM: ``bench/bench_sam_decoder.py``), and the heads are
      never split or merged on the image side. Image-to-token scores are formed (…, T, HW),
      so that the softmax over a prompt's few tokens is vectorised along HW;
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
        if i == 0:  # the shared image side's projections, computed once per image
            att = _tokens_to_shared_image(t2i, t2i.q_proj(q), side.t2i_k, side.t2i_v)
        else:  # each prompt's own image side: projections folded into the tokens
            k_pe = keys + side.key_pe
            att = _tokens_to_image_folded(t2i, t2i.q_proj(q), k_pe, keys)
        queries = layer.norm2(queries + att)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tokens
        iq = side.i2t_q if i == 0 else k_pe
        upd = _image_to_tokens_folded(i2t, iq, i2t.k_proj(q), i2t.v_proj(queries), i == 0)
        keys = layer.norm4(keys + upd)  # (B, HW, C)
    fin = tr.final_attn_token_to_image
    att = _tokens_to_image_folded(fin, fin.q_proj(queries + tokens), keys + side.key_pe, keys)
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


# ---- the two bilinear resizes of Sam.postprocess_masks as one ---------------------------------


def _bilinear_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) weights of torch's bilinear resize along one axis (``align_corners=False``,
    source index ``scale·(d + ½) − ½`` clamped at 0), in float64."""
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = src - i0
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - l1)
    np.add.at(m, (rows, i1), l1)
    return m


def _composite_taps(n_low: int, size: int, n_input: int, n_out: int):
    """One axis of ``postprocess_masks``: ``n_low`` → ``size`` (×4), crop to ``n_input``, →
    ``n_out``, as at most K consecutive source taps per output: (first tap (n_out,) int64,
    weights (n_out, K) float32)."""
    m = _bilinear_matrix(n_input, n_out, n_input / n_out)
    m = m @ _bilinear_matrix(n_low, size, n_low / size)[:n_input]
    nz = m != 0.0
    first = nz.argmax(1)
    last = m.shape[1] - 1 - nz[:, ::-1].argmax(1)
    k = int((last - first).max()) + 1
    start = np.minimum(first, n_low - k)
    w = np.stack([m[np.arange(n_out), start + j] for j in range(k)], axis=1)
    return torch.as_tensor(start), torch.as_tensor(w, dtype=torch.float32)


@functools.lru_cache(maxsize=32)
def _taps_for(low_hw, size, input_size, original_size):
    return (
        _composite_taps(low_hw[0], size, input_size[0], original_size[0]),
        _composite_taps(low_hw[1], size, input_size[1], original_size[1]),
    )


def _apply_taps(low: torch.Tensor, rows, cols) -> torch.Tensor:
    """(N, h, w) logits through per-axis taps: columns first (gathered as rows of the transposed
    logits), then rows. (N, H, W) float32."""
    x = low.float().transpose(1, 2).contiguous()  # (N, w, h)
    t = None
    for j in range(cols[1].shape[1]):
        g = x.index_select(1, cols[0] + j)  # (N, W, h)
        t = g.mul_(cols[1][:, j, None]) if t is None else t.addcmul_(g, cols[1][:, j, None])
    t = t.transpose(1, 2).contiguous()  # (N, h, W)
    out = None
    for j in range(rows[1].shape[1]):
        g = t.index_select(1, rows[0] + j)  # (N, H, W)
        out = g.mul_(rows[1][:, j, None]) if out is None else out.addcmul_(g, rows[1][:, j, None])
    return out


def composite_upsampler(
    model, low_hw, input_size, original_size
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a reduced-precision decoder (:class:`ReducedDecoderSam`) whose masks end at most half
    the pixels of SAM's input: ``Sam.postprocess_masks``' two bilinear resizes (×4 to the
    encoder's square, crop to the input, resize to the image) composed into one per axis, a
    function (N, h, w) logits -> (N, H, W) float32 logits. Each output pixel reads at most a few
    low-resolution ones, so the 1024² intermediate is never formed: a chunk of 8 masks for a
    240×320 image took 1.3 against 5.6 ms, 5.3 against 7.3 ms at 480×640, and more than the
    two resizes at 720×960 and beyond (one thread pair, AMD EPYC), hence the half-the-pixels
    rule. The weights are the exact composition in float64 (torch's own resizes round theirs in
    float32): logits within 1e-4 of the two resizes. None (use :func:`upsample_logits`) on the
    float32 exact path and for larger images."""
    if not isinstance(model, ReducedDecoderSam):
        return None
    (ih, iw), (oh, ow) = (int(v) for v in input_size), (int(v) for v in original_size)
    if 2 * oh * ow > ih * iw:
        return None
    size = int(model.image_encoder.img_size)
    rows, cols = _taps_for((int(low_hw[0]), int(low_hw[1])), size, (ih, iw), (oh, ow))
    return lambda low: _apply_taps(low, rows, cols)
