"""Trident's SAM-guided global aggregation of a spliced token canvas.

SAM's last encoder block gives attention probabilities ``A_h`` (heads × N × N, softmaxed over
SAM's whole 64×64 grid) and values ``V_h``. On the valid token box ``h_s × w_s`` of the image
(top-left crop, rows **not** renormalised):

    c_h(i, j) = cos(V_h,i, V_h,j)
    τ_i = cos_fac · mean_{h,j} c_h(i, j);  if not refine_neg_cos: τ_i < 0 → 0.6
    τ_i = min(τ_i, 0.9)
    Ã_h(i, j) = A_h(i, j) · [c_h(i, j) > τ_i]
    W = mean_h Ã_h, each row divided by its sum;  aggregated = W · tokens

``W`` has N² entries (≈ 9.4 M for 48 × 64, times the heads for the intermediate terms), so it is
computed in row chunks when ``chunk_rows`` is given; chunked and unchunked results are equal
(each row only depends on its own chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAU_CAP = 0.9
NEG_TAU_VALUE = 0.6


def sam_valid_hw(input_size: tuple[int, int], patch: int = 16) -> tuple[int, int]:
    """Valid SAM token box ``floor(h/16) × floor(w/16)`` of the resized (unpadded) SAM input."""
    return int(input_size[0]) // patch, int(input_size[1]) // patch


def valid_token_index(valid_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """Row-major indices of the top-left ``valid_hw`` box in a ``grid_hw`` token grid."""
    hs, ws = valid_hw
    rows = torch.arange(hs).view(-1, 1) * int(grid_hw[1])
    return (rows + torch.arange(ws).view(1, -1)).reshape(-1)


def _weights_rows(
    attn_rows: torch.Tensor,  # (H, r, N), any float dtype (read by the float32 product)
    cos_rows: torch.Tensor,  # (H, r, N), overwritten (used as the mask buffer)
    cos_fac: float,
    refine_neg_cos: bool,
    tau_cap: float,
    neg_tau_value: float,
) -> torch.Tensor:
    tau = cos_fac * cos_rows.mean(dim=(0, 2))  # (r,)
    if not refine_neg_cos:
        tau = torch.where(tau < 0.0, torch.full_like(tau, neg_tau_value), tau)
    tau = torch.clamp(tau, max=tau_cap)
    m = cos_rows.gt_(tau[None, :, None])  # in place: 1.0 where c > tau (strict), else 0.0
    w = m.mul_(attn_rows).mean(dim=0)  # (r, N)
    return w / w.sum(dim=-1, keepdim=True)


def sam_aggregation(
    tokens_nc: torch.Tensor,
    sam_attn: torch.Tensor,
    sam_v: torch.Tensor,
    *,
    cos_fac: float = 1.2,
    refine_neg_cos: bool = True,
    valid_hw: tuple[int, int] | None = None,
    chunk_rows: int | None = 1024,
    tau_cap: float = TAU_CAP,
    neg_tau_value: float = NEG_TAU_VALUE,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``W · tokens`` (N, C) for tokens on the valid SAM grid (N = h_s·w_s, row-major).

    ``sam_attn`` (heads, Nf, Nf) and ``sam_v`` (heads, gh, gw, d) cover SAM's full grid (or an
    already cropped one); ``valid_hw`` (default: the whole grid) selects the top-left box
    without copying the full attention. ``chunk_rows`` bounds memory to heads × chunk × N.
    ``return_weights`` also returns W (N, N) (tests; memory N²).
    """
    heads, gh, gw, d = sam_v.shape
    hs, ws = (gh, gw) if valid_hw is None else (int(valid_hw[0]), int(valid_hw[1]))
    n = hs * ws
    if tokens_nc.shape[0] != n:
        raise ValueError(f"{tokens_nc.shape[0]} tokens for a {hs}x{ws} SAM grid")
    full = (hs, ws) == (gh, gw)
    # the attention as (H, gh, gw, gh, gw): a top-left crop is a strided view, copied per chunk
    attn5 = None if full else sam_attn.view(heads, gh, gw, gh, gw)
    vn = F.normalize(sam_v[:, :hs, :ws].reshape(heads, n, d).float(), dim=-1)  # (H, N, d)
    tokens = tokens_nc.to(torch.float32)
    step = n if not chunk_rows else max(1, int(chunk_rows))
    if attn5 is not None:
        step = max(1, step // ws) * ws  # whole SAM rows per chunk
    outs, ws_ = [], []
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        if attn5 is None:
            a = sam_attn[:, r0:r1]
        else:
            a = attn5[:, r0 // ws : r1 // ws, :ws, :hs, :ws].reshape(heads, r1 - r0, n)
        cos = vn[:, r0:r1] @ vn.transpose(1, 2)  # (H, r, N)
        # the attention as stored (bf16 in reduced precision): the in-place float32 product
        # in _weights_rows reads it directly, exactly as a float32 copy would (no copy)
        w = _weights_rows(a, cos, cos_fac, refine_neg_cos, tau_cap, neg_tau_value)
        outs.append(w @ tokens)
        if return_weights:
            ws_.append(w)
    out = torch.cat(outs, dim=0).to(tokens_nc.dtype)
    if return_weights:
        return out, torch.cat(ws_, dim=0)
    return out


def canvas_to_grid(canvas_dhw: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Canvas (D, Hc, Wc) resized bilinearly to ``grid_hw`` -> tokens (h·w, D) row-major."""
    g = canvas_dhw
    if tuple(g.shape[-2:]) != tuple(grid_hw):
        g = F.interpolate(g[None], size=tuple(grid_hw), mode="bilinear", align_corners=False)[0]
    return g.flatten(1).transpose(0, 1)


def aggregate_canvas(
    canvas_dhw: torch.Tensor,
    sam_parts: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]],
    *,
    cos_fac: float = 1.2,
    refine_neg_cos: bool = True,
    chunk_rows: int | None = 1024,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Aggregate a canvas with one or more vertical strips' SAM attention.

    ``sam_parts``: per strip ``(attn, v, valid_hw)``. With k strips the canvas is split along
    its width at ``i·Wc // k`` (Cityscapes: 2 halves at ``Wc // 2``), each strip resized to its
    own SAM grid and aggregated with its own W; the strips are concatenated along the width.
    Returns tokens (h·W_total, D) row-major and the output grid (h, W_total).
    """
    k = len(sam_parts)
    wc = canvas_dhw.shape[-1]
    bounds = [i * wc // k for i in range(k)] + [wc]
    grids = []
    for i, (attn, v, valid) in enumerate(sam_parts):
        if valid is None:
            valid = (v.shape[1], v.shape[2])
        part = canvas_dhw[..., bounds[i] : bounds[i + 1]]
        toks = canvas_to_grid(part, valid)
        agg = sam_aggregation(
            toks,
            attn,
            v,
            cos_fac=cos_fac,
            refine_neg_cos=refine_neg_cos,
            valid_hw=valid,
            chunk_rows=chunk_rows,
        )
        grids.append(agg.transpose(0, 1).reshape(-1, valid[0], valid[1]))
    if len({g.shape[1] for g in grids}) != 1:
        raise ValueError("SAM strips have different heights")
    grid = torch.cat(grids, dim=-1)  # (D, h, W)
    return grid.flatten(1).transpose(0, 1), (grid.shape[1], grid.shape[2])
