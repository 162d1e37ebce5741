"""JAFAR's layers (parameter names = the released state dict's keys), its configuration and its
rotary-style positional encoding (:mod:`zsdense.dense.jafar`, steps 1, 2 and the attention's
parameters)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsdense.errors import ConfigError

GN_GROUPS = 8
GN_EPS = 1e-5
ROPE_THETA = 100.0
DEFAULT_QK_DIM = 128
DEFAULT_HEADS = 4


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
        return asdict(self)


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
