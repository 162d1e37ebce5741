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
IMAGE_BAND_BYTES = 2 << 20  # image-resolution bands: cache-sized (speed), whatever the budget
QUERY_CHUNK = 2048  # queries per attention chunk at most (speed: cache-sized score blocks)
STATE_DICT_KEY = "jafar"  # the released files are {"jafar": state_dict}
META_KEY = "zsdense"  # safetensors metadata entry (JSON) of zsdense's own upsampler files
FORMAT = "zsdense-jafar/1"

#: Peak extra memory (MB) of :meth:`JAFAR.forward_chunked` from a 32² grid and a 448² image,
#: measured by ``bench/bench_jafar.py`` (see the module docstring): output side -> MB.
MEASURED_PEAK_MB = {448: 273, 1024: 296}

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
            if x.dtype == self.weight.dtype:
                return F.rms_norm(x, (x.shape[-1],), self.weight, eps=None)
            # reduced-precision input (autocast): computed in float32, as torch's own fallback
            y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), eps=None)
            return y.to(x.dtype)
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
    """``adaptive_avg_pool`` windows [start, end): output i averages inputs
    ``floor(i·In/Out) … ceil((i+1)·In/Out) − 1``."""
    return [((i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)) for i in range(n_out)]


def _pool_matrix(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i, (a, b) in enumerate(_adaptive_windows(n_in, n_out)):
        m[i, a:b] = 1.0 / (b - a)
    return m.to(device=device, dtype=dtype)


class _Pooler:
    """Rows ``r0:r1`` of ``adaptive_avg_pool2d`` to (ho, wo) of a channels-last (H, W, C) map,
    computed as separable window averages from the input rows they need only: (rows, wo, C)."""

    def __init__(self, x: torch.Tensor, ho: int, wo: int) -> None:
        self.x = x
        self.win = _adaptive_windows(x.shape[0], ho)
        self.ph = _pool_matrix(x.shape[0], ho, x.device, x.dtype)
        self.pw = _pool_matrix(x.shape[1], wo, x.device, x.dtype)

    def __call__(self, r0: int, r1: int) -> torch.Tensor:
        a, b = self.win[r0][0], self.win[r1 - 1][1]
        y = torch.einsum("oh,hwc->owc", self.ph[r0:r1, a:b], self.x[a:b])
        return torch.einsum("pw,owc->opc", self.pw, y)


class _Moments:
    """GroupNorm statistics of channels-last (n, C) batches seen one band at a time.

    Per channel, sums of ``x − K`` and ``(x − K)²`` with a shift K (the channel means of the
    first band, so the sums stay well conditioned) are taken with matrix products (fast on any
    band shape) and accumulated in float64; :meth:`groups` combines the channels of each group.
    """

    def __init__(self, c: int, device) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1 = torch.zeros(c, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(c, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if self.shift is None:
            self.shift = x[: min(n, 4096)].mean(dim=0)
        d = x - self.shift
        ones = x.new_ones(1, n)
        self.s1 += (ones @ d)[0].double()
        self.s2 += (ones @ d.mul_(d))[0].double()
        self.n += n

    def groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (mean, 1/sqrt(var + eps)) over ``GN_GROUPS`` equal channel groups."""
        g, n = GN_GROUPS, self.n
        k = self.shift.double().view(g, -1)
        s1, s2 = self.s1.view(g, -1), self.s2.view(g, -1)
        mean = (k + s1 / n).mean(dim=1)  # per group
        off = k - mean[:, None]  # Σ (x − mean)² = Σ (d + off)² per channel
        ss = (s2 + 2 * off * s1 + n * off * off).sum(dim=1)
        var = ss / (n * k.shape[1])
        return mean.float(), torch.rsqrt(var + GN_EPS).float()


def _group_stats(x: torch.Tensor, bands) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm statistics of a channels-last (pixels, C) map, band by band."""
    mom = _Moments(x.shape[-1], x.device)
    for s, e in bands:
        mom.add(x[s:e])
    return mom.groups()


def _gn_apply(x, mean, rstd, weight=None, bias=None) -> torch.Tensor:
    """GroupNorm of channels-last values (..., C) with known group statistics, as one
    per-channel ``x·scale + shift``."""
    c = x.shape[-1]
    scale = rstd.repeat_interleave(c // GN_GROUPS)
    shift = -mean.repeat_interleave(c // GN_GROUPS) * scale
    if weight is not None:
        scale = scale * weight
        shift = shift * weight + bias
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))


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


# ---------------------------------------------------------------------------------------------
# State dicts and files
# ---------------------------------------------------------------------------------------------


def reference_key_order(config: JafarConfig) -> list[str]:
    """The released state dict's key order for ``config`` (= ``JAFAR.state_dict()``)."""
    return list(JAFAR(config).state_dict())


def config_from_state_dict(
    sd: dict[str, torch.Tensor], source: str = "state dict", num_heads: int | None = None
) -> JafarConfig:
    """Constructor arguments read from the tensor shapes (the head count is in no shape: the
    released models use 4, zsdense's own files record theirs)."""
    try:
        w0 = sd["image_encoder.0.weight"]
        kf = sd["key_features_encoder.0.weight"]
    except KeyError as exc:
        raise WeightsError(
            f"{source}: not a JAFAR state dict (no {exc.args[0]!r}); expected the released "
            f"layout {{'jafar': state_dict}} with image_encoder.*, key_encoder.*, "
            f"query_encoder.*, key_features_encoder.*, cross_decode.*, sft_key.*, rope.freqs"
        ) from None
    if w0.dim() != 4 or kf.dim() != 4:
        raise WeightsError(f"{source}: JAFAR encoder weights must be 4-d conv kernels")
    try:
        return JafarConfig(
            v_dim=int(kf.shape[1]),
            qk_dim=int(w0.shape[0]),
            num_heads=int(num_heads or DEFAULT_HEADS),
            kernel_size=int(w0.shape[-1]),
            input_dim=int(w0.shape[1]),
        )
    except ConfigError as exc:
        raise WeightsError(f"{source}: unusable JAFAR shapes ({exc})") from None


def jafar_from_state_dict(
    sd: dict[str, torch.Tensor],
    source: str = "state dict",
    *,
    num_heads: int | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> JAFAR:
    """A JAFAR module (float32, eval, frozen) with ``sd`` loaded strictly."""
    cfg = config_from_state_dict(sd, source, num_heads)
    model = JAFAR(cfg, chunk_bytes=chunk_bytes)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(want[k].shape)})"
        for k in want
        if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")
        if wrong:
            parts.append(f"wrong shapes {', '.join(wrong[:4])}")
        raise WeightsError(
            f"{source}: does not fit a JAFAR upsampler (qk_dim {cfg.qk_dim}, {cfg.v_dim}-channel "
            f"features, {len(want)} tensors): " + "; ".join(parts)
        )
    model.load_state_dict({k: sd[k].float() for k in want}, strict=True)
    return model.float().eval().requires_grad_(False)


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def read_jafar_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, zsdense metadata or {}) of an upsampler file, never unpickling objects.

    ``.safetensors``: zsdense's own format (metadata JSON under ``"zsdense"``). Anything else:
    ``torch.load(weights_only=True)`` of the released ``{"jafar": state_dict}`` layout (or a
    bare state dict).
    """
    import json

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: upsampler file not found")
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p), device="cpu")
            with safe_open(str(p), framework="pt") as f:
                raw = (f.metadata() or {}).get(META_KEY)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise WeightsError(f"{p}: not a readable safetensors file ({exc})") from None
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            raise WeightsError(f"{p}: its '{META_KEY}' metadata is not JSON") from None
        return sd, meta if isinstance(meta, dict) else {}
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        if "GLOBAL" in text or "weights_only" in text.lower():
            raise WeightsError(
                f"{p}: torch.load(weights_only=True) refused this file: it holds Python objects, "
                f"not only tensors (the reference's training checkpoints model_<N>steps.pth hold "
                f"an omegaconf DictConfig). zsdense does not unpickle such files; in a trusted "
                f"environment extract the weights with torch.save({{'jafar': torch.load(f, "
                f"weights_only=False)['jafar']}}, 'upsampler.pth')"
            ) from None
        raise WeightsError(
            f"{p}: not a readable PyTorch checkpoint ({text.splitlines()[0] if text else exc!r}); "
            f"it is corrupt or incomplete: fetch it again"
        ) from None
    meta: dict = {}
    if isinstance(obj, dict) and STATE_DICT_KEY in obj:
        extra = obj.get(META_KEY)
        if isinstance(extra, dict):
            meta = dict(extra)
        obj = obj[STATE_DICT_KEY]
    if not _is_tensor_dict(obj):
        raise WeightsError(
            f"{p}: not a JAFAR upsampler file: expected {{'jafar': state_dict}} (the released "
            f"layout) or a plain state dict of tensors, found {type(obj).__name__}"
        )
    return dict(obj), meta


def save_jafar(model: JAFAR, path: str | Path, meta: dict | None = None) -> Path:
    """Write an upsampler atomically: ``.safetensors`` with the metadata JSON (backbone, head
    count...), or any other suffix as the released layout ``{"jafar": state_dict}`` exactly
    (``torch.save``; the authors' loaders read it; no metadata)."""
    import json

    from zsdense.io.writers import atomic_path

    p = Path(path)
    sd = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    info = {"format": FORMAT, **model.config.to_json(), **(meta or {})}
    with atomic_path(p) as tmp:
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={META_KEY: json.dumps(info, sort_keys=True)})
        else:
            torch.save({STATE_DICT_KEY: sd}, str(tmp))
    return p


# ---------------------------------------------------------------------------------------------
# Loading for an encoder, and use
# ---------------------------------------------------------------------------------------------


@dataclass
class Upsampler:
    """A loaded JAFAR upsampler and what it was trained on.

    ``backbone``: the features it was trained on (a timm model name for the released files, a
    zsdense encoder id for files zsdense trained; None if the file does not say).
    ``encoder``: the zsdense encoder id (:func:`zsdense.models.jafar_backbone.encoder_id`) whose
    features those are, or None when no zsdense encoder computes them.
    """

    module: JAFAR
    source: str
    backbone: str | None = None
    encoder: str | None = None
    released: bool = False

    @property
    def feature_dim(self) -> int:
        return self.module.config.v_dim

    def to(self, device) -> Upsampler:
        self.module.to(device)
        return self

    def check_encoder(self, encoder, *, allow_other_backbone: bool = False) -> None:
        """WeightsError unless ``encoder`` gives the features this upsampler was trained on.

        The width must match (nothing else could run); the backbone must match where it is
        known, unless ``allow_other_backbone`` (features of another distribution: it runs, the
        result is not what the upsampler was trained for)."""
        from zsdense.models.jafar_backbone import encoder_id, encoder_width

        width, eid = encoder_width(encoder), encoder_id(encoder)
        trained = self.backbone or "an unrecorded backbone"
        if width != self.feature_dim:
            raise WeightsError(
                f"{self.source}: this JAFAR upsampler takes {self.feature_dim}-channel features "
                f"(trained on {trained}); the encoder {eid} gives {width}-channel features. Use "
                f"an upsampler made for this encoder or train one: zsdense train-upsampler DATA "
                f"--backbone NAME --out RUN"
            )
        if allow_other_backbone:
            return
        if self.released and self.encoder is None:
            raise WeightsError(
                f"{self.source}: this upsampler was trained on the features of timm's "
                f"{self.backbone}, which no zsdense encoder computes; {eid} gives features of "
                f"another distribution. Train an upsampler for it (zsdense train-upsampler) or "
                f"allow another backbone explicitly"
            )
        if self.encoder is not None and self.encoder != eid:
            raise WeightsError(
                f"{self.source}: this upsampler was trained on the features of {self.encoder}"
                + (f" (timm {self.backbone})" if self.released else "")
                + f", not of {eid}. Use the upsampler made for this encoder, train one "
                f"(zsdense train-upsampler), or allow another backbone explicitly"
            )

    def __call__(self, image_norm, features, output_size, values=None) -> torch.Tensor:
        return upsample(self, image_norm, features, output_size, values=values)


def _release(name: str):
    from zsdense.models.weights_table import JAFAR as TABLE

    for rel in TABLE:
        if rel.name == name:
            return rel
    return None


def load_jafar(
    spec: str | Path,
    *,
    encoder=None,
    weights_dir: str | None = None,
    download: bool | None = None,
    device: str | torch.device = "cpu",
    allow_other_backbone: bool = False,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> Upsampler:
    """A JAFAR upsampler from a registry name (``jafar-dinov2-small``...: found, downloaded and
    hash-checked like every checkpoint, ``--weights-dir`` / ``--offline`` apply) or a file
    (released ``.pth`` layout or zsdense ``.safetensors``). With ``encoder``, refuse an
    upsampler trained for another width or backbone (:meth:`Upsampler.check_encoder`)."""
    from zsdense.models.weights_table import JAFAR as TABLE

    rel = _release(str(spec))
    if rel is not None:
        from zsdense.models import registry

        path = registry.resolve(rel.name, weights_dir=weights_dir, download=download)
        sd, meta = read_jafar_file(path)
        source = f"{path} ({rel.name})"
        model = jafar_from_state_dict(sd, source, num_heads=DEFAULT_HEADS, chunk_bytes=chunk_bytes)
        if model.config.v_dim != rel.feature_dim:
            raise WeightsError(
                f"{source}: holds an upsampler for {model.config.v_dim}-channel features, but "
                f"{rel.name} is the one for {rel.feature_dim}-channel {rel.backbone} features: "
                f"the file is another checkpoint; replace it"
            )
        from zsdense.models.jafar_backbone import registry_encoder_id

        enc = registry_encoder_id(rel.encoder) if rel.encoder else None
        up = Upsampler(model, source, rel.backbone, enc, released=True)
    else:
        p = Path(spec).expanduser()
        if not p.is_file():
            known = ", ".join(r.name for r in TABLE)
            raise ConfigError(
                f"upsampler {spec!r}: neither a file nor a registered upsampler (known: {known})"
            )
        sd, meta = read_jafar_file(p)
        heads = meta.get("num_heads")
        model = jafar_from_state_dict(sd, str(p), num_heads=heads, chunk_bytes=chunk_bytes)
        up = Upsampler(model, str(p), meta.get("backbone"), meta.get("backbone"))
    up.to(device)
    if encoder is not None:
        up.check_encoder(encoder, allow_other_backbone=allow_other_backbone)
    return up


def upsample(
    upsampler: Upsampler | JAFAR,
    image_norm: torch.Tensor,
    features: torch.Tensor,
    output_size,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """High-resolution features (B, Cv, Ho, Wo) of low-resolution ``features`` (B, Cv, h, w).

    ``image_norm`` (B, 3, H, W) is the image normalised with the encoder's mean/std, the same
    tensor (or the same image at the same size) the encoder computed ``features`` from;
    ``features`` are what the upsampler was trained on
    (:func:`zsdense.models.jafar_backbone.jafar_features`). ``values`` (B, D, h, w): other maps
    on the same grid (a preset's own dense features, projected features, scores) to carry to
    the output size with the attention computed from ``features``. The output is float32 (the
    upsampler's dtype), memory-bounded at any output size.
    """
    module = upsampler.module if isinstance(upsampler, Upsampler) else upsampler
    with torch.no_grad():
        return module.forward_chunked(image_norm, features, output_size, values=values)
