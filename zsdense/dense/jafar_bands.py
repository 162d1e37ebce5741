"""Banded pieces of JAFAR's memory-bounded path (``JAFAR.forward_chunked`` in
:mod:`zsdense.dense.jafar_model`): ``adaptive_avg_pool2d`` windows computed from the rows they
need, and GroupNorm statistics gathered band by band then applied as one per-channel affine map.
"""

from __future__ import annotations

import torch

from zsdense.dense.jafar_layers import GN_EPS, GN_GROUPS


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
