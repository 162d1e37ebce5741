"""SAM's mask decoder for point prompts with its prompt-independent image side computed once per
image (:mod:`zsdense.models.sam_proposals`, step 1): the arithmetic of ``MaskDecoder``
operation for operation (bit-identical logits and IoUs at the same batch size)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zsdense.errors import ConfigError


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

    keys: torch.Tensor  # (1, HW, C) image embedding + no-mask embedding, tokens, row-major
    key_pe: torch.Tensor  # (1, HW, C) dense positional encoding, tokens, row-major
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
    # the first block's projections of the reference's token-layout views (the same products)
    _, t2i_k, t2i_v = _project(first.cross_attn_token_to_image, None, k_pe, keys)
    i2t_q, _, _ = _project(first.cross_attn_image_to_token, k_pe, None, None)
    # what every batch adds its first update to, row-major: adding the channel-strided view to
    # the (B, HW, C) updates took 6.5 ms against 0.4 ms per batch of 4 (bf16), and handed
    # LayerNorm a strided sum to copy; the values are the same, so are the sums' bits
    keys = keys.contiguous()
    return DecoderImageSide(keys, key_pe.contiguous(), k_pe, t2i_k, t2i_v, i2t_q, (c, h, w))


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
