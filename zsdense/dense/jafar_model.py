"""JAFAR feature upsampling (Couairon, Chambon et al., 2025): low-resolution ViT features to any
output size, guided by the image.

The module computes what the authors' ``JAFAR(image, features, output_size)`` computes (commit
``94d4d545`` of ``PaulCouairon/JAFAR``; ``../shared/fixtures/jafar/README.md`` §1):

1. ``E = image_encoder(image)`` at the image resolution; each encoder is a ``kernel_size`` conv
   (reflect padding, no bias) and two residual blocks ``x + conv(SiLU(GN(conv(SiLU(GN(x))))))``
   (GroupNorm 8 groups, 1×1 convs). ``image`` is normalised with the backbone's mean/std: the
   same tensor the backbone sees.
2. A rotary-style encoding on ``E`` with *trainable* frequencies ``rope.freqs`` (2, C):
   coordinates ``[y, x]`` from ``linspace(0, 1)`` over the image pixels, ``angle = coords @
   freqs``, ``t·cos + rotate_half(t)·sin`` where ``rotate_half`` pairs channel c with c + C/2
   (not a norm-preserving rotation). The frequencies are loaded, never recomputed.
3. Queries: ``query_encoder(E)`` adaptive-average-pooled to the output size (no interpolation;
   beyond the image size the windows replicate pixels), GroupNorm without affine, then a 3×3
   conv (zero padding).
4. Keys: ``key_encoder(E)`` adaptive-average-pooled to the feature grid, GroupNorm without
   affine, modulated ``gamma(kf)·K + beta(kf)`` with ``kf = key_features_encoder(L2-normalised
   features)``.
5. Both token sets go through an RMSNorm with the machine epsilon, the q / k in-projections of a
   multi-head attention (head dim C / heads, temperature 1/sqrt(head dim)); the attention
   weights are **averaged over the heads** and the result is ``attention @ raw features``: every
   output pixel is a convex combination of the input feature vectors. The attention's own value
   / output projections and ``norm_v`` exist in the state dict but never influence the output.

Two implementations of the same function:

- :meth:`JAFAR.forward_reference` follows the steps above on whole tensors (autograd, the
  training step, the fixture's intermediates);
- :meth:`JAFAR.forward_chunked` is the inference path (what :meth:`JAFAR.forward` runs when no
  gradient is needed): it never holds the ``Ho·Wo × h·w`` attention, nor the queries at the
  output size, whole. Per sample, the image-resolution encoders run in row bands with their
  GroupNorm statistics taken from the full tensors (three C×H×W tensors at most are alive); the
  output is computed in bands of output rows (two passes: the query GroupNorm statistics, then
  pooled queries with a one-row halo for the 3×3 conv) and the attention in chunks of queries,
  each sized to ``chunk_bytes``. Same numbers as the reference path (≤ 1.1e-6 on the fixture).

Peak extra memory (beyond the inputs and the output tensor), measured with
``bench/bench_jafar.py`` (peak resident-set growth during a process's first call, minus the
output; AMD EPYC CPU, 2 threads, float32, ``chunk_bytes`` 64 MiB, qk_dim 128, 4 heads, one
448×448 image, features 32×32 with Cv 384, as ViT-S/14): **273 MB for a 448² output, 296 MB for
1024²** (:data:`MEASURED_PEAK_MB`). The whole per-head attention the reference holds would be
3.1 GB (448²) and 16 GB (1024²). Most of the peak is the image-resolution part (three 128-channel
maps of 448², 103 MB each), which does not grow with the output size. Same run, CPU time at
1 thread, image = output = 224², grid 16: chunked / reference = 0.83 (112²: 1.11).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsdense.dense.jafar_bands import _gn_apply, _group_stats, _Moments, _Pooler
from zsdense.dense.jafar_layers import (
    _SFT,
    GN_EPS,
    GN_GROUPS,
    JafarConfig,
    _apply_rope,
    _CrossDecode,
    _encoder,
    _ResBlock,
    _Rope,
    image_coords,
)
from zsdense.errors import ConfigError

DEFAULT_CHUNK_BYTES = 64 << 20
IMAGE_BAND_BYTES = 2 << 20  # image-resolution bands: cache-sized (speed), whatever the budget
QUERY_CHUNK = 2048  # queries per attention chunk at most (speed: cache-sized score blocks)

#: Peak extra memory (MB) of :meth:`JAFAR.forward_chunked` from a 32² grid and a 448² image,
#: measured by ``bench/bench_jafar.py`` (see the module docstring): output side -> MB.
MEASURED_PEAK_MB = {448: 273, 1024: 296}


def _size2(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(size[0]), int(size[1]))
    except (TypeError, ValueError, IndexError):
        raise ConfigError(f"output size must be (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"output size must be positive, got {(h, w)}")
    return h, w


class JAFAR(nn.Module):
    """The upsampler; ``forward(image, features, output_size)`` -> (B, Cv, Ho, Wo).

    Parameter names and order are the released state dict's (65 tensors; 63 in the packed
    ``v == qk`` layout). ``chunk_bytes`` bounds the working set of :meth:`forward_chunked`
    (None: no bound; the work is still split into cache-sized blocks).
    """

    def __init__(self, config: JafarConfig, chunk_bytes: int | None = DEFAULT_CHUNK_BYTES):
        super().__init__()
        c, v, k = config.qk_dim, config.v_dim, config.kernel_size
        self.config = config
        self.chunk_bytes = chunk_bytes
        self.image_encoder = _encoder(config.input_dim, c, k)
        self.key_encoder = _encoder(c, c, 1)
        self.query_encoder = _encoder(c, c, 1)
        self.key_features_encoder = _encoder(v, c, 1)
        self.cross_decode = _CrossDecode(c, v, config.num_heads)
        self.sft_key = _SFT(c)
        self.rope = _Rope(c)

    # ---- shared pieces -----------------------------------------------------------------------
    def _check_inputs(self, image: torch.Tensor, features: torch.Tensor) -> None:
        cfg = self.config
        if image.dim() != 4 or image.shape[1] != cfg.input_dim:
            raise ConfigError(
                f"JAFAR expects an image batch (B, {cfg.input_dim}, H, W), got {tuple(image.shape)}"
            )
        if features.dim() != 4 or features.shape[1] != cfg.v_dim:
            raise ConfigError(
                f"this JAFAR upsampler takes {cfg.v_dim}-channel features (B, {cfg.v_dim}, h, w); "
                f"got {tuple(features.shape)}: it was trained for another encoder width"
            )
        if image.shape[0] != features.shape[0]:
            raise ConfigError(
                f"JAFAR: {image.shape[0]} images but {features.shape[0]} feature maps"
            )

    def _keys(self, keys_pooled: torch.Tensor, features: torch.Tensor, trace=None):
        """SFT-modulated keys (B, C, h, w) from the pooled key map and the raw features."""
        fn = F.normalize(features, dim=1)
        kf = self.key_features_encoder(fn)
        gamma, beta = self.sft_key.gamma(kf), self.sft_key.beta(kf)
        keys = gamma * F.group_norm(keys_pooled, GN_GROUPS, eps=GN_EPS) + beta
        if trace is not None:
            trace.update(
                features_normalized=fn, key_features=kf, sft_gamma=gamma, sft_beta=beta, keys=keys
            )
        return keys

    def _key_heads(self, k_tokens: torch.Tensor) -> torch.Tensor:
        """RMSNorm + k projection, split into heads: (B, heads, h·w, d)."""
        ca = self.cross_decode.cross_attn
        _, _, wk, bk = ca.attention.qk_weights()
        kp = F.linear(ca.norm_k(k_tokens), wk, bk)
        b, n, c = kp.shape
        heads = self.config.num_heads
        return kp.view(b, n, heads, c // heads).transpose(1, 2)

    def _attend(self, q_normed: torch.Tensor, k_heads: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention weights (B, n_q, h·w) of RMS-normed query tokens."""
        ca = self.cross_decode.cross_attn
        wq, bq, _, _ = ca.attention.qk_weights()
        qp = F.linear(q_normed, wq, bq)
        b, n, c = qp.shape
        heads = self.config.num_heads
        d = c // heads
        q = qp.view(b, n, heads, d).transpose(1, 2) * math.sqrt(1.0 / float(d))
        w = torch.softmax(q @ k_heads.transpose(-2, -1), dim=-1)
        return w.mean(dim=1)

    # ---- whole-tensor path -------------------------------------------------------------------
    def forward_reference(
        self,
        image: torch.Tensor,
        features: torch.Tensor,
        output_size,
        trace: dict | None = None,
    ) -> torch.Tensor:
        """The steps of the module docstring on whole tensors (autograd-friendly).

        ``trace``: a dict that receives every intermediate under the fixture's names.
        """
        self._check_inputs(image, features)
        ho, wo = _size2(output_size)
        b, _, h_img, w_img = image.shape
        h, w = features.shape[-2:]
        c = self.config.qk_dim
        enc = self.image_encoder(image)
        coords = image_coords(h_img, w_img, device=image.device)[None]
        tokens = enc.flatten(2).transpose(1, 2)
        tokens = _apply_rope(tokens, coords, self.rope.freqs)
        enc_r = tokens.transpose(1, 2).reshape(b, c, h_img, w_img)
        q_pooled = F.adaptive_avg_pool2d(self.query_encoder(enc_r), (ho, wo))
        queries = F.group_norm(q_pooled, GN_GROUPS, eps=GN_EPS)
        k_pooled = F.adaptive_avg_pool2d(self.key_encoder(enc_r), (h, w))
        keys = self._keys(k_pooled, features, trace)
        q_conv = self.cross_decode.conv2d(queries)
        ca = self.cross_decode.cross_attn
        q_normed = ca.norm_q(q_conv.flatten(2).transpose(1, 2))
        k_tokens = keys.flatten(2).transpose(1, 2)
        attn = self._attend(q_normed, self._key_heads(k_tokens))
        out_tokens = attn @ features.flatten(2).transpose(1, 2).to(attn.dtype)
        out = out_tokens.transpose(1, 2).reshape(b, -1, ho, wo)
        if trace is not None:
            trace.update(
                encoded_image=enc,
                coords=coords,
                encoded_image_rope_tokens=tokens,
                queries_pooled=q_pooled,
                queries=queries,
                keys_pooled=k_pooled,
                q_conv=q_conv,
                q_normed=q_normed,
                k_normed=ca.norm_k(k_tokens),
                attn=attn,
                attn_output_tokens=out_tokens,
            )
        return out

    # ---- memory-bounded path -----------------------------------------------------------------
    def _rows(self, per_row_bytes: int, total: int) -> int:
        """Rows per band so that a band's working set stays within ``chunk_bytes``."""
        if self.chunk_bytes is None:
            return max(1, total)
        return max(1, min(total, int(self.chunk_bytes) // max(1, per_row_bytes)))

    def chunk_plan(self, image_hw, feature_hw, output_size) -> dict:
        """Band sizes :meth:`forward_chunked` uses: image rows per band, output rows per band
        and queries per attention chunk (float32)."""
        c, heads, v = self.config.qk_dim, self.config.num_heads, self.config.v_dim
        h_img, w_img = _size2(image_hw)
        h, w = _size2(feature_hw)
        ho, wo = _size2(output_size)
        # image bands: a small working set (cache-sized, at most ``chunk_bytes``)
        small = min(IMAGE_BAND_BYTES, self.chunk_bytes or IMAGE_BAND_BYTES)
        img_rows = max(1, min(h_img, small // (c * w_img * 4)))
        out_rows = self._rows(8 * c * max(wo, w_img) * 4, ho)
        per_q = (2 * heads + 2) * h * w + 2 * c + v
        q_chunk = max(1, min(self._rows(per_q * 4, (out_rows + 2) * wo), QUERY_CHUNK))
        return {"image_rows": img_rows, "output_rows": out_rows, "query_chunk": q_chunk}

    def _resblock_inplace(self, blk: _ResBlock, x: torch.Tensor, bands, stats):
        """``x + blk(x)`` written into ``x`` (pixels, C), band by band of pixels.

        ``stats``: GroupNorm statistics of ``x``; returns (x, the statistics of the result),
        both gathered while the bands are produced (no extra pass over the map)."""
        m1, r1 = stats
        a = torch.empty_like(x)
        w1, w2 = blk.conv1.weight[:, :, 0, 0].t(), blk.conv2.weight[:, :, 0, 0].t()
        mom = _Moments(x.shape[-1], x.device)
        for s, e in bands:
            hb = F.silu(_gn_apply(x[s:e], m1, r1, blk.norm1.weight, blk.norm1.bias), inplace=True)
            mom.add(torch.mm(hb, w1, out=a[s:e]))
        m2, r2 = mom.groups()
        mom = _Moments(x.shape[-1], x.device)
        for s, e in bands:
            hb = F.silu(_gn_apply(a[s:e], m2, r2, blk.norm2.weight, blk.norm2.bias), inplace=True)
            mom.add(x[s:e].addmm_(hb, w2))
        del a
        return x, mom.groups()

    def _encode_sample(self, img: torch.Tensor, h: int, w: int):
        """(queries at the image resolution (H, W, C), pooled keys (C, h, w)) of one image.

        The image-resolution maps are kept channels-last, (H·W, C), and processed in bands of
        whole rows (small enough to stay in cache); at most three maps are alive at once."""
        c = self.config.qk_dim
        _, h_img, w_img = img.shape
        rows = self.chunk_plan((h_img, w_img), (h, w), (h, w))["image_rows"]
        bands = [(r0 * w_img, min(h_img, r0 + rows) * w_img) for r0 in range(0, h_img, rows)]
        conv0 = self.image_encoder[0]
        if conv0.kernel_size == (1, 1):
            enc = img.reshape(img.shape[0], -1).t() @ conv0.weight[:, :, 0, 0].t()
        else:  # reflect-padded k×k conv on the whole image, then channels-last
            enc = conv0(img[None])[0].permute(1, 2, 0).reshape(-1, c).contiguous()
        stats = _group_stats(enc, bands)
        for blk in self.image_encoder[1:]:
            enc, stats = self._resblock_inplace(blk, enc, bands, stats)
        # positional encoding in place; the first key / query convs read the result
        freqs = self.rope.freqs
        wk0 = self.key_encoder[0].weight[:, :, 0, 0].t()
        kmap = torch.empty_like(enc)
        kmom = _Moments(c, enc.device)
        for s, e in bands:
            r0, r1 = s // w_img, e // w_img
            band = enc[s:e]
            band.copy_(
                _apply_rope(band, image_coords(h_img, w_img, r0, r1, device=img.device), freqs)
            )
            kmom.add(torch.mm(band, wk0, out=kmap[s:e]))
        stats = kmom.groups()
        for blk in self.key_encoder[1:]:
            kmap, stats = self._resblock_inplace(blk, kmap, bands, stats)
        k_pooled = _Pooler(kmap.view(h_img, w_img, c), h, w)(0, h).permute(2, 0, 1)
        del kmap
        # queries in place over the encoded image
        wq0 = self.query_encoder[0].weight[:, :, 0, 0].t()
        qmom = _Moments(c, enc.device)
        for s, e in bands:
            enc[s:e] = enc[s:e] @ wq0
            qmom.add(enc[s:e])
        stats = qmom.groups()
        for blk in self.query_encoder[1:]:
            enc, stats = self._resblock_inplace(blk, enc, bands, stats)
        return enc.view(h_img, w_img, c), k_pooled.contiguous()

    def forward_chunked(
        self,
        image: torch.Tensor,
        features: torch.Tensor,
        output_size,
        values: torch.Tensor | None = None,
    ):
        """The same function as :meth:`forward_reference`, memory-bounded (no autograd).

        Per sample: encoders in row bands, output rows in bands (two passes: the query
        GroupNorm statistics, then the rows with a one-row halo for the 3×3 conv), attention in
        query chunks; every working set is sized to ``chunk_bytes`` (:meth:`chunk_plan`).

        ``values`` (B, D, h, w), on the grid of ``features``: apply the attention computed from
        ``features`` to these maps instead (any width D); the output is (B, D, Ho, Wo). JAFAR's
        output being ``attention @ values``, a per-pixel linear map of the features (a
        projection, a classifier) commutes with it.
        """
        self._check_inputs(image, features)
        ho, wo = _size2(output_size)
        cfg = self.config
        c = cfg.qk_dim
        b = image.shape[0]
        h, w = features.shape[-2:]
        dtype = self.rope.freqs.dtype
        dev = self.rope.freqs.device
        image = image.to(device=dev, dtype=dtype)
        features = features.to(device=dev, dtype=dtype)
        if values is None:
            values = features
        elif values.dim() != 4 or values.shape[0] != b or values.shape[-2:] != (h, w):
            raise ConfigError(
                f"values must be (B={b}, D, {h}, {w}) on the feature grid, got "
                f"{tuple(values.shape)}"
            )
        values = values.to(device=dev, dtype=dtype)
        d_out = values.shape[1]
        out = torch.empty(b, d_out, ho, wo, device=dev, dtype=dtype)
        plan = self.chunk_plan(image.shape[-2:], (h, w), (ho, wo))
        rows, q_chunk = plan["output_rows"], plan["query_chunk"]
        ca = self.cross_decode.cross_attn
        conv3 = self.cross_decode.conv2d.weight
        out_bands = [(r0, min(ho, r0 + rows)) for r0 in range(0, ho, rows)]
        with torch.no_grad():
            for i in range(b):
                q_img, k_pooled = self._encode_sample(image[i], h, w)
                keys = self._keys(k_pooled[None], features[i : i + 1])
                k_heads = self._key_heads(keys.flatten(2).transpose(1, 2))
                vals = values[i].flatten(1).t()  # (h·w, D)
                pool = _Pooler(q_img, ho, wo)
                mom = _Moments(c, dev)
                for r0, r1 in out_bands:
                    mom.add(pool(r0, r1).reshape(-1, c))
                mean, rstd = mom.groups()
                for r0, r1 in out_bands:
                    e0, e1 = max(0, r0 - 1), min(ho, r1 + 1)
                    y = _gn_apply(pool(e0, e1), mean, rstd)  # (rows, Wo, C)
                    y = F.pad(y, (0, 0, 1, 1, 1 if r0 == 0 else 0, 1 if r1 == ho else 0))
                    y = y.permute(2, 0, 1)[None]  # channels-last (1, C, rows + 2, Wo + 2)
                    qc = F.conv2d(y, conv3)[0].permute(1, 2, 0)  # (r1 - r0, Wo, C)
                    qt = ca.norm_q(qc.reshape(-1, c))
                    res = torch.empty(qt.shape[0], d_out, device=dev, dtype=dtype)
                    for s in range(0, qt.shape[0], q_chunk):
                        attn = self._attend(qt[None, s : s + q_chunk], k_heads)[0]
                        torch.mm(attn, vals, out=res[s : s + q_chunk])
                    out[i, :, r0:r1] = res.view(r1 - r0, wo, -1).permute(2, 0, 1)
        return out

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        """Upsample ``features`` (B, Cv, h, w) to ``output_size`` guided by ``image``
        (B, 3, H, W, normalised like the backbone's input). With gradients enabled (training)
        the whole-tensor path runs; otherwise the memory-bounded one."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self.forward_reference(image, features, output_size)
        return self.forward_chunked(image, features, output_size)
