"""Open-vocabulary building blocks against hand-computed cases and loop-based formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsdense.dense import aggregation as ag
from zsdense.dense import lastblock as lb
from zsdense.dense import windows as W
from zsdense.models.clip import BlockWeights

# ---- windows --------------------------------------------------------------------------------


def test_window_boxes_borders_and_shifted_last_window():
    # H=500, crop 224, stride 112: (500-224+111)//112 + 1 = 4 rows; the last window would end
    # at 560 > 500 and is shifted back to start at 276.
    assert W.grid_counts((500, 224), 224, 112) == (4, 1)
    boxes = W.window_boxes((500, 224), 224, 112)
    assert [(b[0], b[2]) for b in boxes] == [(0, 224), (112, 336), (224, 448), (276, 500)]
    assert all((b[1], b[3]) == (0, 224) for b in boxes)
    # smaller than the crop: one window covering the image
    assert W.window_boxes((200, 150), 224, 112) == [(0, 0, 200, 150)]
    # row-major order: rows outer, columns inner
    boxes = W.window_boxes((300, 300), 224, 112)
    assert boxes == [(0, 0, 224, 224), (0, 76, 224, 300), (76, 0, 300, 224), (76, 76, 300, 300)]


def test_pad_amounts_floor_ceil():
    assert W.pad_amounts((200, 201)) == (11, 12, 12, 12)  # w: 23 -> 11/12; h: 24 -> 12/12
    assert W.pad_amounts((224, 336)) == (0, 0, 0, 0)
    assert W.pad_amounts((15, 17), 16) == (7, 8, 0, 1)  # w: 17 -> 32 (15: 7/8); h: 15 -> 16


def test_make_windows_pads_with_zero_and_keeps_content():
    x = torch.arange(3 * 50 * 60, dtype=torch.float32).reshape(1, 3, 50, 60) + 1
    wb = W.make_windows(x, 56, 28)
    assert wb.pads == (0, 0, 3, 3)  # 50 -> 56: 3 top, 3 bottom; width 56 fits
    assert wb.counts == (1, 2)  # (60 - 56 + 27) // 28 + 1
    assert wb.images.shape == (2, 3, 56, 56)
    assert torch.equal(wb.images[0, :, 3:53], x[0, :, :, 0:56])
    assert torch.equal(wb.images[1, :, 3:53], x[0, :, :, 4:60])  # shifted last window
    assert wb.images[:, :, :3].abs().sum() == 0 and wb.images[:, :, 53:].abs().sum() == 0


def test_splice_logits_cuts_padding_and_averages_overlaps():
    # image 10 x 16, crop 10, stride 6 -> windows x [0,10) and [6,16), padded to 12 x 12
    boxes = W.window_boxes((10, 16), 10, 6)
    assert boxes == [(0, 0, 10, 10), (0, 6, 10, 16)]
    pads = W.pad_amounts((10, 10), 4)  # -> (1, 1, 1, 1)
    assert pads == (1, 1, 1, 1)
    lg = torch.full((2, 1, 12, 12), 1e6)  # padding carries a sentinel that must never appear
    lg[0, :, 1:11, 1:11] = 1.0
    lg[1, :, 1:11, 1:11] = 3.0
    out = W.splice_logits(lg, boxes, pads, (10, 16))
    assert out.shape == (1, 10, 16)
    assert torch.all(out[:, :, :6] == 1.0)
    assert torch.all(out[:, :, 6:10] == 2.0)  # overlap: mean of 1 and 3
    assert torch.all(out[:, :, 10:] == 3.0)


def test_splice_logits_upsamples_window_grid():
    boxes, pads = [(0, 0, 8, 8)], (0, 0, 0, 0)
    grid = torch.arange(4.0).reshape(1, 1, 2, 2)
    out = W.splice_logits(grid, boxes, pads, (8, 8))
    ref = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(out, ref)


def test_splice_tokens_hand_case():
    # two 2x2 windows on a 2x3 canvas, overlapping in column 1
    maps = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 4.0)])
    canvas = W.splice_tokens(maps, [[0, 0, 2, 2], [0, 1, 2, 3]], (2, 3))
    assert torch.equal(canvas[0], torch.tensor([[2.0, 3.0, 4.0], [2.0, 3.0, 4.0]]))
    # a VFM grid twice as fine -> ratio 2, canvas twice as fine
    maps2 = torch.stack([torch.full((1, 4, 4), 2.0), torch.full((1, 4, 4), 4.0)])
    c2 = W.splice_tokens(maps2, [[0, 0, 2, 2], [0, 1, 2, 3]], (2, 3))
    assert c2.shape == (1, 4, 6) and torch.equal(c2[0, 0], torch.tensor([2.0, 2, 3, 3, 4, 4]))


def test_trident_resize_rule_examples():
    assert W.trident_resize_hw((448, 597)) == (464, 608)
    assert W.trident_resize_hw((200, 300)) == (336, 336)
    assert W.trident_resize_hw((448, 672)) == (448, 672)
    assert W.trident_resize_hw((240, 320), upscale_small=False) == (240, 320)
    assert W.trident_resize_hw((240, 320)) == (336, 336)


# ---- attention variants vs loops ------------------------------------------------------------


def _block(c=8, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ln1, ln2 = torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
    with torch.no_grad():
        for ln in (ln1, ln2):
            ln.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
            ln.bias.copy_(0.1 * torch.randn(c, generator=g))
    mlp = torch.nn.Sequential(torch.nn.Linear(c, 2 * c), torch.nn.GELU(), torch.nn.Linear(2 * c, c))
    return BlockWeights(
        ln_1=ln1,
        in_proj_weight=torch.randn(3 * c, c, generator=g) * 0.5,
        in_proj_bias=torch.randn(3 * c, generator=g) * 0.1,
        out_proj_weight=torch.randn(c, c, generator=g) * 0.5,
        out_proj_bias=torch.randn(c, generator=g) * 0.1,
        ln_2=ln2,
        mlp=mlp,
        num_heads=heads,
    )


def _loop_qkv(bw, x):
    """q, k, v per head as python lists [head][token] of vectors."""
    c = x.shape[-1]
    d = c // bw.num_heads
    xl = bw.ln_1(x)
    out = []
    for part in range(3):
        w = bw.in_proj_weight[part * c : (part + 1) * c]
        b = bw.in_proj_bias[part * c : (part + 1) * c]
        full = [w @ xl[i] + b for i in range(x.shape[0])]
        out.append([[t[h * d : (h + 1) * d] for t in full] for h in range(bw.num_heads)])
    return out


def _loop_softmax_row(vals):
    m = max(vals)
    e = [math.exp(v - m) if v != float("-inf") else 0.0 for v in vals]
    s = sum(e)
    return [t / s for t in e]


def _loop_attend(bw, rows, v):
    """out_proj(concat_h Σ_j A_h[i][j] v_h[j]) for attention rows[h][i][j]."""
    n = len(rows[0])
    outs = []
    for i in range(n):
        per_head = []
        for h in range(bw.num_heads):
            acc = torch.zeros_like(v[h][0])
            for j in range(len(v[h])):
                acc = acc + rows[h][i][j] * v[h][j]
            per_head.append(acc)
        outs.append(bw.out_proj_weight @ torch.cat(per_head) + bw.out_proj_bias)
    return torch.stack(outs)


def _self_rows(a_list, s, extra=None):
    n = len(a_list)
    return [
        _loop_softmax_row(
            [s * float(a_list[i] @ a_list[j]) + (extra[i][j] if extra else 0.0) for j in range(n)]
        )
        for i in range(n)
    ]


@torch.no_grad()
def test_sclip_clearclip_naclip_vs_loops():
    bw = _block()
    gh, gw = 2, 3
    x = torch.randn(1 + gh * gw, 8, generator=torch.Generator().manual_seed(1))
    q, k, v = _loop_qkv(bw, x)
    s = (8 // 2) ** -0.5
    # SCLIP: softmax(s qq) + softmax(s kk), residual + MLP
    rows = []
    for h in range(2):
        rq, rk = _self_rows(q[h], s), _self_rows(k[h], s)
        rows.append([[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(rq, rk)])
    y = x + _loop_attend(bw, rows, v)
    y = y + bw.mlp(bw.ln_2(y))
    assert torch.allclose(lb.sclip_last_block(bw, x[None])[0], y, atol=1e-5)
    # ClearCLIP: softmax(s qq), no residual, no MLP
    rows = [_self_rows(q[h], s) for h in range(2)]
    assert torch.allclose(
        lb.clearclip_last_block(bw, x[None])[0], _loop_attend(bw, rows, v), atol=1e-5
    )
    # NACLIP: softmax(s kk + Omega), Omega Gaussian over patch coords, zero class row/column
    coords = [(None, None)] + [(i // gw, i % gw) for i in range(gh * gw)]
    omega = [
        [
            0.0
            if (a[0] is None or b[0] is None)
            else math.exp(-((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) / (2 * 5.0**2))
            for b in coords
        ]
        for a in coords
    ]
    rows = [_self_rows(k[h], s, omega) for h in range(2)]
    assert torch.allclose(
        lb.naclip_last_block(bw, x[None], (gh, gw))[0], _loop_attend(bw, rows, v), atol=1e-5
    )
    assert torch.allclose(lb.naclip_omega((gh, gw)), torch.tensor(omega), atol=1e-7)


def _loop_proxy_rows(feats_cn, beta, gamma):
    n = feats_cn.shape[1]
    f = [feats_cn[:, i] / feats_cn[:, i].norm() for i in range(n)]
    S = [[float(f[i] @ f[j]) for j in range(n)] for i in range(n)]
    mean = sum(sum(r) for r in S) / (n * n)
    rows = []
    for i in range(n):
        vals = [gamma * (S[i][j] - beta * mean) for j in range(n)]
        vals = [v if v >= 0 else float("-inf") for v in vals]
        if all(v == float("-inf") for v in vals):  # the guard: keep the diagonal
            vals[i] = 0.0
        rows.append(_loop_softmax_row(vals))
    return rows


@torch.no_grad()
def test_proxyclip_vs_loops_same_and_different_grid():
    bw = _block(seed=3)
    gh, gw = 2, 3
    x = torch.randn(1, 1 + gh * gw, 8, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(1, 6, gh, gw, generator=g) + 1.0  # positive offset: mean cos > 0
    _, _, v = _loop_qkv(bw, x[0])
    rows = _loop_proxy_rows(feats[0].reshape(6, -1), 1.2, 3.0)
    v_patch = [[t for t in v[h][1:]] for h in range(2)]  # class token removed
    ref = _loop_attend(bw, [rows, rows], v_patch)
    got = lb.proxyclip_last_block(bw, x, (gh, gw), feats)[0]
    assert torch.allclose(got, ref, atol=1e-5)
    # VFM grid 4x6: values resized bilinearly per head on the true (h, w) grid
    feats2 = torch.randn(1, 6, 4, 6, generator=g) + 1.0
    rows2 = _loop_proxy_rows(feats2[0].reshape(6, -1), 1.2, 3.0)
    v2 = []
    for h in range(2):
        vh = torch.stack(v_patch[h]).T.reshape(1, -1, gh, gw)
        vh = F.interpolate(vh, size=(4, 6), mode="bilinear", align_corners=False)
        v2.append(list(vh.reshape(vh.shape[1], -1).T))
    ref2 = _loop_attend(bw, [rows2, rows2], v2)
    got2 = lb.proxyclip_last_block(bw, x, (gh, gw), feats2)[0]
    assert torch.allclose(got2, ref2, atol=1e-5)


def test_proxy_attention_guard_keeps_diagonal():
    feats = torch.ones(1, 4, 3, 3)  # all identical: mean(S) = 1 > 1/beta -> every row dead
    a = lb.proxy_attention(feats, 1.2, 3.0)
    assert torch.isfinite(a).all()
    assert torch.allclose(a[0], torch.eye(9))


def test_proxy_attention_batch_vs_window_mean():
    f = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(0)) + 0.5
    a_w = lb.proxy_attention(f, mean_scope="window")
    assert torch.allclose(a_w[1], lb.proxy_attention(f[1:])[0])
    a_b = lb.proxy_attention(f, mean_scope="batch")
    assert not torch.allclose(a_b[1], a_w[1])


# ---- aggregation vs a direct computation ------------------------------------------------------


def _direct_weights(attn, v, cos_fac, refine_neg_cos):
    heads, h, w, d = v.shape
    n = h * w
    vv = v.reshape(heads, n, d).double()
    cos = torch.zeros(heads, n, n, dtype=torch.float64)
    for hh in range(heads):
        for i in range(n):
            for j in range(n):
                cos[hh, i, j] = (vv[hh, i] @ vv[hh, j]) / (vv[hh, i].norm() * vv[hh, j].norm())
    Wm = torch.zeros(n, n, dtype=torch.float64)
    taus = []
    for i in range(n):
        tau = cos_fac * float(cos[:, i, :].mean())
        if not refine_neg_cos and tau < 0:
            tau = 0.6
        tau = min(tau, 0.9)
        taus.append(tau)
        for j in range(n):
            Wm[i, j] = (
                sum(
                    float(attn[hh, i, j]) * (1.0 if cos[hh, i, j] > tau else 0.0)
                    for hh in range(heads)
                )
                / heads
            )
        Wm[i] /= Wm[i].sum()
    return Wm, taus


@pytest.mark.parametrize(
    "cos_fac,neg",
    [
        (1.2, True),
        (1.2, False),
        (3.0, True),
        (0.0, False),
        (-2.0, False),
        (-2.0, True),
        (50.0, True),
    ],
)
def test_aggregation_vs_direct(cos_fac, neg):
    g = torch.Generator().manual_seed(7)
    heads, h, w, d = 2, 3, 4, 5
    attn = torch.softmax(torch.randn(heads, 20, 20, generator=g), dim=-1)[:, :12, :12]  # cropped
    v = torch.randn(heads, h, w, d, generator=g)
    if cos_fac < 0 or cos_fac >= 50:
        v = v + 1.5  # mean cos > 0 on every row: every tau negative (or capped)
    tokens = torch.randn(12, 6, generator=g)
    out, Wm = ag.sam_aggregation(
        tokens, attn, v, cos_fac=cos_fac, refine_neg_cos=neg, chunk_rows=None, return_weights=True
    )
    Wd, taus = _direct_weights(attn, v, cos_fac, neg)
    assert torch.allclose(Wm.double(), Wd, atol=1e-6)
    assert torch.allclose(Wm.sum(-1), torch.ones(12), atol=1e-6)
    assert torch.allclose(out.double(), Wd @ tokens.double(), atol=1e-5)
    if cos_fac == -2.0:  # every tau negative: kept (True) or replaced by 0.6 (False)
        assert all(t == 0.6 for t in taus) if not neg else all(t < 0 for t in taus)
    if cos_fac == 50.0:  # capped at 0.9: only near-identical values survive (the diagonal)
        assert all(t == 0.9 for t in taus)
    # chunked == unchunked
    for chunk in (1, 5, 12):
        out_c, W_c = ag.sam_aggregation(
            tokens,
            attn,
            v,
            cos_fac=cos_fac,
            refine_neg_cos=neg,
            chunk_rows=chunk,
            return_weights=True,
        )
        assert torch.allclose(W_c, Wm, atol=1e-7) and torch.allclose(out_c, out, atol=1e-6)


def test_aggregation_crops_full_grid_without_copy():
    g = torch.Generator().manual_seed(8)
    attn = torch.softmax(torch.randn(2, 36, 36, generator=g), dim=-1)  # full 6x6 grid
    v = torch.randn(2, 6, 6, 4, generator=g)
    tokens = torch.randn(8, 3, generator=g)
    idx = ag.valid_token_index((2, 4), (6, 6))
    assert idx.tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    a = ag.sam_aggregation(tokens, attn, v, valid_hw=(2, 4), chunk_rows=3)
    b = ag.sam_aggregation(tokens, attn[:, idx][:, :, idx], v[:, :2, :4], chunk_rows=None)
    assert torch.allclose(a, b, atol=1e-6)


def test_naclip_omega_cached():
    a = lb.naclip_omega((4, 5))
    b = lb.naclip_omega((4, 5))
    assert torch.equal(a, b) and a.shape == (21, 21)
    assert lb._naclip_omega_cpu.cache_info().hits >= 1


def test_unknown_variant_is_config_error():
    from zsdense.errors import ConfigError

    with pytest.raises(ConfigError):
        lb.proxy_attention(torch.ones(1, 2, 2, 2), mean_scope="image")


_ = np  # numpy used by other tests in this module family


@pytest.mark.parametrize("k", [2, 3, 21, 256, 257])
def test_class_max_is_torchs_max_with_first_classes(k, monkeypatch):
    """The marked maximum gives torch's ``max(dim=0)``: the same scores and the first class
    holding each pixel's maximum (ties between classes), in pieces of pixels too; NaN pixels
    and over 256 classes take torch's own answer."""
    from zsdense.tasks import openvocab as ov

    g = torch.Generator().manual_seed(k)
    s = torch.rand(k, 13, 17, generator=g)
    s[:, 0, :5] = 0.5  # every class ties: class 0
    s[[1, k - 1], 1, 1] = 2.0  # the first of two
    s[k - 1, 2, 2] = 3.0  # the last class alone
    s[:, 3, 3] = torch.arange(k, dtype=torch.float32)  # rising: the last class
    monkeypatch.setattr(ov, "CLASS_MAX_PIXELS", 50)  # 221 pixels in five pieces
    want = s.max(dim=0)
    got_v, got_i = ov.class_max(s)
    assert torch.equal(got_v, want.values) and torch.equal(got_i, want.indices)
    assert got_i.dtype == torch.long and got_i.shape == (13, 17)
    s[k // 2, 4, 4] = float("nan")
    want = s.max(dim=0)
    got_v, got_i = ov.class_max(s)
    assert torch.equal(got_i, want.indices)
    assert torch.equal(torch.nan_to_num(got_v), torch.nan_to_num(want.values))
    assert torch.equal(ov.class_max(s.transpose(1, 2))[1], s.transpose(1, 2).max(dim=0).indices)
