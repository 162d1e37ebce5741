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
  each sized to ``chunk_bytes``. Same numbers as the reference path (≤ 2e-6 on the fixture).

Peak extra memory (beyond the inputs and the output tensor), ``chunk_bytes`` = 64 MiB,
qk_dim 128, one image 448×448, features 32×32 (ViT-S/14, Cv 384), float32, measured with
``bench/bench_jafar_memory.py`` (peak RSS growth minus the output, CPU): see
:data:`MEASURED_PEAK_MB` — about 340 MB for a 448² output and about 360 MB for 1024²; the
unchunked attention alone would be 1.6 GB (448²) and 16 GB (1024²). The image-resolution part
(three 128-channel tensors at 448², 103 MB each) dominates and does not grow with the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsdense.errors import ConfigError, WeightsError

GN_GROUPS = 8
GN_EPS = 1e-5
ROPE_THETA = 100.0
DEFAULT_QK_DIM = 128
DEFAULT_HEADS = 4
DEFAULT_CHUNK_BYTES = 64 << 20
STATE_DICT_KEY = "jafar"  # the released files are {"jafar": state_dict}
META_KEY = "zsdense"  # safetensors metadata entry (JSON) of zsdense's own upsampler files
FORMAT = "zsdense-jafar/1"

#: Peak extra memory (MB) of :meth:`JAFAR.forward_chunked`, measured by
#: ``bench/bench_jafar_memory.py`` (see the module docstring): output side -> MB.
MEASURED_PEAK_MB = {448: 340, 1024: 360}

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "JAFAR",
    "JafarConfig",
    "Upsampler",
    "config_from_state_dict",
    "jafar_from_state_dict",
    "load_jafar",
    "read_jafar_file",
    "reference_key_order",
    "save_jafar",
    "upsample",
]


# ---------------------------------------------------------------------------------------------
# The module (parameter names = the released state dict's keys)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JafarConfig:
    """Constructor arguments (the authors' defaults: qk 128, 4 heads, kernel 1)."""

    v_dim: int
    qk_dim: int = DEFAULT_QK_DIM
    num_heads: int = DEFAULT_HEADS
    kernel_size: int = 1
    input_dim: int = 3

    def __post_init__(self) -> None:
        for name in ("v_dim", "qk_dim", "num_heads", "kernel_size", "input_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"JAFAR {name} must be >= 1, got {getattr(self, name)}")
        if self.qk_dim % GN_GROUPS:
            raise ConfigError(f"JAFAR qk_dim must be a multiple of {GN_GROUPS} (GroupNorm)")
        if self.qk_dim % self.num_heads:
            raise ConfigError(f"JAFAR qk_dim {self.qk_dim} is not divisible by {self.num_heads}")
        if self.qk_dim % 4:
            raise ConfigError("JAFAR qk_dim must be a multiple of 4 (positional encoding)")
        if self.kernel_size % 2 == 0:
            raise ConfigError("JAFAR kernel_size must be odd")

    def to_json(self) -> dict:
        return {
            "v_dim": self.v_dim,
            "qk_dim": self.qk_dim,
            "num_heads": self.num_heads,
            "kernel_size": self.kernel_size,
            "input_dim": self.input_dim,
        }


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(GN_GROUPS, c, eps=GN_EPS)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.norm2 = nn.GroupNorm(GN_GROUPS, c, eps=GN_EPS)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _encoder(cin: int, c: int, k: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, c, k, padding=k // 2, padding_mode="reflect", bias=False)
    return nn.Sequential(conv, _ResBlock(c), _ResBlock(c))


class _RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnable weight and eps = the machine epsilon."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm"):  # torch >= 2.4; eps=None: finfo(x).eps, float32's for bf16
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=None)
        xf = x.float()  # pragma: no cover - older torch
        eps = torch.finfo(xf.dtype).eps
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y * self.weight.float()).to(x.dtype)


class _Attention(nn.Module):
    """The parameters of ``nn.MultiheadAttention(qk, vdim=v, heads)`` under its key names.

    Only the q / k in-projections and their biases are used (the weights are averaged over the
    heads and applied to the raw features); ``v_proj_weight``, ``in_proj_bias[2C:]`` and
    ``out_proj`` are kept so that a state dict round-trips. With ``v == qk`` the packed
    ``in_proj_weight`` layout of ``nn.MultiheadAttention`` is used instead.
    """

    def __init__(self, qk: int, v: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.packed = v == qk
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * qk, qk))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(qk, qk))
            self.k_proj_weight = nn.Parameter(torch.empty(qk, qk))
            self.v_proj_weight = nn.Parameter(torch.empty(qk, v))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * qk))
        self.out_proj = nn.Linear(qk, qk)
        for w in (
            (self.in_proj_weight,)
            if self.packed
            else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        ):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.out_proj.bias)

    def qk_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.in_proj_bias.shape[0] // 3
        if self.packed:
            wq, wk = self.in_proj_weight[:c], self.in_proj_weight[c : 2 * c]
        else:
            wq, wk = self.q_proj_weight, self.k_proj_weight
        return wq, self.in_proj_bias[:c], wk, self.in_proj_bias[c : 2 * c]


class _CrossAttention(nn.Module):
    def __init__(self, qk: int, v: int, heads: int) -> None:
        super().__init__()
        self.norm_q = _RMSNorm(qk)
        self.norm_k = _RMSNorm(qk)
        self.norm_v = _RMSNorm(v)
        self.attention = _Attention(qk, v, heads)


class _CrossDecode(nn.Module):
    def __init__(self, qk: int, v: int, heads: int) -> None:
        super().__init__()
        self.cross_attn = _CrossAttention(qk, v, heads)
        self.conv2d = nn.Conv2d(qk, qk, 3, padding=1, bias=False)


class _SFT(nn.Module):
    def __init__(self, qk: int) -> None:
        super().__init__()
        self.gamma = nn.Conv2d(qk, qk, 1, bias=False)
        self.beta = nn.Conv2d(qk, qk, 1, bias=False)


def rope_init(qk_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """The frequencies' initial value (2, C): ``f = theta**linspace(0, -1, C/4)`` twice over
    C/2, rows y (first half) and x (second half), times 2π."""
    f = theta ** torch.linspace(0, -1, qk_dim // 4)
    f = torch.cat([f, f])
    freqs = torch.zeros(2, qk_dim)
    freqs[0, : qk_dim // 2] = f
    freqs[1, qk_dim // 2 :] = f
    return freqs * (2 * math.pi)


class _Rope(nn.Module):
    def __init__(self, qk: int) -> None:
        super().__init__()
        self.freqs = nn.Parameter(rope_init(qk))


def image_coords(h: int, w: int, row0: int = 0, row1: int | None = None, *, device=None):
    """(rows·w, 2) ``[y, x]`` coordinates, row-major, ``linspace(0, 1)`` over the image pixels
    (endpoints included), for the image rows ``row0:row1``."""
    ys = torch.linspace(0, 1, h, device=device)[row0:row1]
    xs = torch.linspace(0, 1, w, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gy.reshape(-1), gx.reshape(-1)], dim=-1)


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    c = t.shape[-1] // 2
    return torch.cat([-t[..., c:], t[..., :c]], dim=-1)


def _apply_rope(tokens: torch.Tensor, coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    angle = coords.to(freqs.dtype) @ freqs
    return tokens * torch.cos(angle) + _rotate_half(tokens) * torch.sin(angle)


def _adaptive_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """``adaptive_avg_pool`` windows: output i averages ``floor(i·In/Out) … ceil((i+1)·In/Out)−1``."""
    return [((i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)) for i in range(n_out)]


def _pool_matrix(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i, (a, b) in enumerate(_adaptive_windows(n_in, n_out)):
        m[i, a:b] = 1.0 / (b - a)
    return m.to(device=device, dtype=dtype)


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
    (None: one chunk, i.e. whole tensors).
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
                f"JAFAR expects an image batch (B, {cfg.input_dim}, H, W), got "
                f"{tuple(image.shape)}"
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
        if self.chunk_bytes is None:
            return max(1, total)
        return max(1, min(total, int(self.chunk_bytes) // max(1, per_row_bytes)))

    @staticmethod
    def _gn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group mean and 1/std of a (C, H, W) tensor (GroupNorm's statistics)."""
        var, mean = torch.var_mean(x.reshape(GN_GROUPS, -1).float(), dim=1, correction=0)
        return mean, torch.rsqrt(var + GN_EPS)

    @staticmethod
    def _gn_apply(xb, mean, rstd, weight=None, bias=None) -> torch.Tensor:
        c = xb.shape[0]
        shape = (c,) + (1,) * (xb.dim() - 1)
        mc = mean.repeat_interleave(c // GN_GROUPS).view(shape).to(xb.dtype)
        rc = rstd.repeat_interleave(c // GN_GROUPS).view(shape).to(xb.dtype)
        y = (xb - mc) * rc
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        return y

    def _resblock_inplace(self, blk: _ResBlock, x: torch.Tensor, rows: int) -> torch.Tensor:
        """``x + blk(x)`` written into ``x`` (C, H, W), in row bands."""
        height = x.shape[1]
        m1, r1 = self._gn_stats(x)
        a = torch.empty_like(x)
        for r0 in range(0, height, rows):
            hb = F.silu(self._gn_apply(x[:, r0 : r0 + rows], m1, r1, blk.norm1.weight,
                                       blk.norm1.bias))
            a[:, r0 : r0 + rows] = F.conv2d(hb[None], blk.conv1.weight)[0]
        m2, r2 = self._gn_stats(a)
        for r0 in range(0, height, rows):
            hb = F.silu(self._gn_apply(a[:, r0 : r0 + rows], m2, r2, blk.norm2.weight,
                                       blk.norm2.bias))
            x[:, r0 : r0 + rows] += F.conv2d(hb[None], blk.conv2.weight)[0]
        del a
        return x

    def _conv1x1_bands(self, conv: nn.Conv2d, x: torch.Tensor, rows: int, out=None):
        """A 1×1 conv over (C, H, W) in row bands, into ``out`` (may be ``x`` itself)."""
        if out is None:
            out = x.new_empty((conv.weight.shape[0],) + tuple(x.shape[1:]))
        for r0 in range(0, x.shape[1], rows):
            out[:, r0 : r0 + rows] = F.conv2d(x[None, :, r0 : r0 + rows], conv.weight)[0]
        return out

    def _encode_sample(self, img: torch.Tensor, h: int, w: int):
        """(queries at the image resolution (C, H, W), pooled keys (C, h, w)) of one image."""
        c = self.config.qk_dim
        _, h_img, w_img = img.shape
        esize = img.element_size()
        rows = self._rows(6 * c * w_img * esize, h_img)
        enc = self.image_encoder[0](img[None])[0]
        for blk in self.image_encoder[1:]:
            enc = self._resblock_inplace(blk, enc, rows)
        freqs = self.rope.freqs
        for r0 in range(0, h_img, rows):
            r1 = min(h_img, r0 + rows)
            t = enc[:, r0:r1].permute(1, 2, 0).reshape(-1, c)
            coords = image_coords(h_img, w_img, r0, r1, device=img.device)
            t = _apply_rope(t, coords, freqs).to(enc.dtype)
            enc[:, r0:r1] = t.reshape(r1 - r0, w_img, c).permute(2, 0, 1)
        # keys first (they need the encoded image kept), then the queries in place over it
        kmap = self._conv1x1_bands(self.key_encoder[0], enc, rows)
        for blk in self.key_encoder[1:]:
            kmap = self._resblock_inplace(blk, kmap, rows)
        k_pooled = F.adaptive_avg_pool2d(kmap[None], (h, w))[0]
        del kmap
        q = self._conv1x1_bands(self.query_encoder[0], enc, rows, out=enc)
        for blk in self.query_encoder[1:]:
            q = self._resblock_inplace(blk, q, rows)
        return q, k_pooled

    def forward_chunked(self, image: torch.Tensor, features: torch.Tensor, output_size):
        """The same function as :meth:`forward_reference`, memory-bounded (no autograd).

        Per sample: encoders in row bands, output rows in bands (two passes), attention in
        query chunks; every working set is sized to ``chunk_bytes``.
        """
        self._check_inputs(image, features)
        ho, wo = _size2(output_size)
        cfg = self.config
        c, heads = cfg.qk_dim, cfg.num_heads
        b = image.shape[0]
        h, w = features.shape[-2:]
        dtype = self.rope.freqs.dtype
        dev = self.rope.freqs.device
        image = image.to(device=dev, dtype=dtype)
        features = features.to(device=dev, dtype=dtype)
        out = torch.empty(b, cfg.v_dim, ho, wo, device=dev, dtype=dtype)
        esize = torch.empty((), dtype=dtype).element_size()
        ca = self.cross_decode.cross_attn
        conv3 = self.cross_decode.conv2d.weight
        with torch.no_grad():
            for i in range(b):
                q_img, k_pooled = self._encode_sample(image[i], h, w)
                h_img, w_img = q_img.shape[-2:]
                keys = self._keys(k_pooled[None], features[i : i + 1])
                k_heads = self._key_heads(keys.flatten(2).transpose(1, 2))
                values = features[i].flatten(1).transpose(0, 1)  # (h·w, Cv)
                ph = _pool_matrix(h_img, ho, dev, dtype)
                pw = _pool_matrix(w_img, wo, dev, dtype)
                win_h = _adaptive_windows(h_img, ho)

                def pooled(r0: int, r1: int) -> torch.Tensor:
                    a, bnd = win_h[r0][0], win_h[r1 - 1][1]
                    x = torch.einsum("oh,chw->cow", ph[r0:r1, a:bnd], q_img[:, a:bnd])
                    return torch.einsum("cow,pw->cop", x, pw)

                rows = self._rows(10 * c * max(wo, w_img) * esize, ho)
                s1 = torch.zeros(GN_GROUPS, dtype=torch.float64, device=dev)
                s2 = torch.zeros(GN_GROUPS, dtype=torch.float64, device=dev)
                for r0 in range(0, ho, rows):
                    y = pooled(r0, min(ho, r0 + rows)).reshape(GN_GROUPS, -1).double()
                    s1 += y.sum(1)
                    s2 += (y * y).sum(1)
                n = (c // GN_GROUPS) * ho * wo
                mean = s1 / n
                var = (s2 / n - mean * mean).clamp_min(0)
                rstd = torch.rsqrt(var + GN_EPS)
                per_q = (2 * heads + 2) * h * w + 2 * c + cfg.v_dim
                q_chunk = self._rows(per_q * esize, (rows + 2) * wo)
                for r0 in range(0, ho, rows):
                    r1 = min(ho, r0 + rows)
                    e0, e1 = max(0, r0 - 1), min(ho, r1 + 1)
                    y = self._gn_apply(pooled(e0, e1), mean.float(), rstd.float())
                    y = F.pad(y, (1, 1, 1 if r0 == 0 else 0, 1 if r1 == ho else 0))
                    qc = F.conv2d(y[None], conv3)[0]  # (C, r1 - r0, Wo)
                    qt = ca.norm_q(qc.permute(1, 2, 0).reshape(-1, c))
                    res = torch.empty(qt.shape[0], cfg.v_dim, device=dev, dtype=dtype)
                    for s in range(0, qt.shape[0], q_chunk):
                        attn = self._attend(qt[None, s : s + q_chunk], k_heads)[0]
                        res[s : s + q_chunk] = attn @ values
                    out[i, :, r0:r1] = res.reshape(r1 - r0, wo, -1).permute(2, 0, 1)
        return out

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        """Upsample ``features`` (B, Cv, h, w) to ``output_size`` guided by ``image``
        (B, 3, H, W, normalised like the backbone's input). With gradients enabled (training)
        the whole-tensor path runs; otherwise the memory-bounded one."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self.forward_reference(image, features, output_size)
        return self.forward_chunked(image, features, output_size)
