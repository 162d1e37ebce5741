"""E-Attn / D-Attn / maps / smoothing against independent hand computations (tiny models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsdense.dense.attention import (
    dual_attention_heads,
    merge_heads,
    plain_attention,
    qkv_heads,
    self_correlation_attention,
)
from zsdense.dense.crane import crane_maps, dattn_raw, dattn_weights, eattn_dual_path, scale_block
from zsdense.dense.smoothing import gaussian_filter_scipy, gaussian_filter_torch
from zsdense.errors import ConfigError
from zsdense.models.clip import build_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_clip("ViT-B-16")


def _softmax_rows(m: np.ndarray) -> np.ndarray:
    e = np.exp(m - m.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _loop_eattn(clip, x_norm, start, attn_type):
    """Direct per-image, per-head, per-block loop from the spec's formulas (float64, numpy).

    Uses only the raw parameters of the open_clip model (no zsdense helper)."""
    vis = clip.model.visual
    blocks = vis.transformer.resblocks
    with torch.no_grad():
        x = vis.conv1(x_norm)  # (B, C, gh, gw)
        b, c, gh, gw = x.shape
        tok = x.flatten(2).transpose(1, 2)
        tok = torch.cat([vis.class_embedding.expand(b, 1, c), tok], dim=1)
        pe = vis.positional_embedding
        g = int(math.isqrt(pe.shape[0] - 1))
        grid = pe[1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        pe2 = torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, c)])
        o = vis.ln_pre(tok + pe2).double().numpy()
    terms = {"qq+kk+vv": "qkv", "vv": "v", "qq": "q", "kk": "k", "qq+kk": "qk"}

    def ln(mod, a):
        mu = a.mean(-1, keepdims=True)
        var = a.var(-1, keepdims=True)
        w, bb = mod.weight.double().numpy(), mod.bias.double().numpy()
        return (a - mu) / np.sqrt(var + mod.eps) * w + bb

    def mlp(blk, a):
        w1, b1 = blk.mlp.c_fc.weight.double().numpy(), blk.mlp.c_fc.bias.double().numpy()
        w2, b2 = blk.mlp.c_proj.weight.double().numpy(), blk.mlp.c_proj.bias.double().numpy()
        h = a @ w1.T + b1
        h = h / (1 + np.exp(-1.702 * h))  # QuickGELU
        return h @ w2.T + b2

    r = None
    n_heads = blocks[0].attn.num_heads
    for i, blk in enumerate(blocks, start=1):
        w_in = blk.attn.in_proj_weight.double().numpy()
        b_in = blk.attn.in_proj_bias.double().numpy()
        w_out = blk.attn.out_proj.weight.double().numpy()
        b_out = blk.attn.out_proj.bias.double().numpy()
        if i == start:
            r = o.copy()
        new_o = np.empty_like(o)
        new_r = None if r is None else np.empty_like(r)
        for bi in range(o.shape[0]):
            xl = ln(blk.ln_1, o[bi])
            qkv = xl @ w_in.T + b_in
            q, k, v = np.split(qkv, 3, axis=-1)
            d = q.shape[-1] // n_heads
            heads_o, heads_r = [], []
            for h in range(n_heads):
                sl = slice(h * d, (h + 1) * d)
                qh, kh, vh = q[:, sl], k[:, sl], v[:, sl]
                s = d**-0.5
                heads_o.append(_softmax_rows(s * qh @ kh.T) @ vh)
                if r is not None:
                    src = {"q": qh, "k": kh, "v": vh}
                    a = sum(_softmax_rows(s * src[t] @ src[t].T) for t in terms[attn_type])
                    heads_r.append(a @ vh)
            attn = np.concatenate(heads_o, -1) @ w_out.T + b_out
            mid = o[bi] + attn
            new_o[bi] = mid + mlp(blk, ln(blk.ln_2, mid))
            if r is not None:
                new_r[bi] = r[bi] + np.concatenate(heads_r, -1) @ w_out.T + b_out
        o, r = new_o, new_r
    ln_post, proj = vis.ln_post, vis.proj.double().numpy()
    dense = ln(ln_post, r[:, 1:]) @ proj
    glob = ln(ln_post, o[:, 0]) @ proj
    dense /= np.linalg.norm(dense, axis=-1, keepdims=True)
    glob /= np.linalg.norm(glob, axis=-1, keepdims=True)
    return dense, glob


@pytest.mark.parametrize("attn_type", ["qq+kk+vv", "vv", "qq+kk"])
def test_eattn_matches_loop_reference(tiny_clip, attn_type):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4 * 16, 5 * 16)  # 4x5 grid, native grid is 14x14 -> resized pos
    with torch.no_grad():
        out = eattn_dual_path(tiny_clip, x, start_block=3, attn_type=attn_type)
    dense, glob = _loop_eattn(tiny_clip, x, 3, attn_type)
    assert out.dense[0].shape == (2, 20, tiny_clip.embed_dim)
    np.testing.assert_allclose(out.dense[0].numpy(), dense, atol=2e-5)
    np.testing.assert_allclose(out.global_embed.numpy(), glob, atol=2e-5)


def test_dual_path_leaves_original_stream_equal_to_plain_clip(tiny_clip):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)  # native size: open_clip's own forward applies
    with torch.no_grad():
        ref = F.normalize(tiny_clip.model.encode_image(x), dim=-1)
        out = eattn_dual_path(tiny_clip, x, start_block=2)
        out_keep = eattn_dual_path(tiny_clip, x, start_block=4, keep_streams=True)
        plain = tiny_clip.run_blocks(tiny_clip.embed(x, "native"))
    assert torch.allclose(out.global_embed, ref, atol=1e-5)
    assert torch.allclose(out_keep.original[6], plain, atol=1e-4)
    # and the refined stream is really different from the original one
    assert (out_keep.refined[6] - plain).abs().max() > 1e-2


def test_qkv_heads_and_plain_attention_match_the_block(tiny_clip):
    blk = tiny_clip.blocks[1]
    bw = tiny_clip.block(1)
    x = torch.randn(2, 11, tiny_clip.width)
    with torch.no_grad():
        xl = bw.ln_1(x)
        ref = blk.attn(xl, xl, xl, need_weights=False)[0]
        ours = plain_attention(bw, xl)
        q, k, v = qkv_heads(bw, xl)
    assert q.shape == (2, bw.num_heads, 11, bw.head_dim)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.equal(merge_heads(q), F.linear(xl, bw.in_proj_weight, bw.in_proj_bias)[..., :128])


@pytest.mark.parametrize("attn_type", ["qq+kk+vv", "vv", "qq", "kk", "qq+kk", "(q+k+v)^2"])
def test_fused_dual_attention_equals_explicit_weights(attn_type):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 8) * 2 for _ in range(3))
    a = self_correlation_attention(q, k, v, attn_type)
    plain, corr = dual_attention_heads(q, k, v, attn_type)
    assert torch.allclose(corr, a @ v, atol=1e-5)
    assert torch.allclose(plain, torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v, atol=1e-5)
    # explicit formula for one head, from the spec text
    s = 8**-0.5
    qq, kk, vv = q[0, 0].double(), k[0, 0].double(), v[0, 0].double()
    sm = lambda m: torch.softmax(m, -1)  # noqa: E731
    expect = {
        "qq+kk+vv": sm(s * qq @ qq.T) + sm(s * kk @ kk.T) + sm(s * vv @ vv.T),
        "vv": sm(s * vv @ vv.T),
        "qq": sm(s * qq @ qq.T),
        "kk": sm(s * kk @ kk.T),
        "qq+kk": sm(s * qq @ qq.T) + sm(s * kk @ kk.T),
        "(q+k+v)^2": sm(s / 3**0.5 * torch.cat([qq, kk, vv], -1) @ torch.cat([qq, kk, vv], -1).T),
    }[attn_type]
    assert torch.allclose(a[0, 0].double(), expect, atol=1e-6)
    if attn_type == "qq+kk+vv":
        assert torch.allclose(a.sum(-1), torch.full_like(a.sum(-1), 3.0))  # not renormalised


def test_unknown_attention_type_is_config_error():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ConfigError, match="attention type"):
        self_correlation_attention(q, q, q, "qk")


def test_scale_block_relative_rule():
    assert scale_block(6, 24) == 6 and scale_block(24, 24) == 24
    assert scale_block(6, 6) == 2 and scale_block(24, 6) == 6 and scale_block(6, 12) == 3
    assert scale_block(1, 6) == 1


# ---- D-Attn ----------------------------------------------------------------------------------


def test_dattn_weights_hand_computed_batch_and_image_mean():
    # 2 images, C=2, grid 1x3: patches with known directions
    # image 0: patches 0 and 1 similar (cos 0.819): kept with its own mean (threshold 0.771),
    # masked with the batch mean (0.859), raised by image 1's more uniform patches.
    f0 = np.array([[1.0, 0.0], [1.0, 0.7], [0.0, 1.0]])  # (N=3, C)
    f1 = np.array([[1.0, 1.0], [1.0, 0.2], [0.2, 1.0]])
    feats = torch.tensor(np.stack([f0, f1]).transpose(0, 2, 1)[..., None, :], dtype=torch.float32)
    assert feats.shape == (2, 2, 1, 3)

    def cos(f):
        z = f / np.linalg.norm(f, axis=1, keepdims=True)
        return z @ z.T

    s = np.stack([cos(f0), cos(f1)])
    beta, gamma = 1.2, 3.0

    def expected(mean):
        sp = gamma * (s - beta * mean)
        out = np.where(sp < 0, -np.inf, sp)
        e = np.exp(out - out.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    batch = dattn_weights(feats, beta, gamma, mean="batch").numpy()
    np.testing.assert_allclose(batch, expected(s.mean()), atol=1e-6)  # ONE scalar over (B,N,N)
    per = dattn_weights(feats, beta, gamma, mean="image").numpy()
    np.testing.assert_allclose(per, expected(s.mean(axis=(1, 2), keepdims=True)), atol=1e-6)
    # masked entries are exactly zero; image 0 (mean lower than the batch mean) keeps more
    assert (batch[0] == 0).sum() > 0 and np.array_equal(batch == 0, expected(s.mean()) == 0)
    assert per[0, 0, 1] > 0.3 and batch[0, 0, 1] == 0.0
    assert np.isfinite(batch).all() and np.isfinite(per).all()
    # image 0's weights at batch 1 equal its per-image weights
    np.testing.assert_allclose(
        dattn_weights(feats[:1], beta, gamma, mean="batch").numpy()[0], per[0], atol=1e-6
    )


def test_dattn_raw_applies_one_matrix_to_every_head(tiny_clip):
    torch.manual_seed(3)
    x = torch.randn(1, 1 + 6, tiny_clip.width)
    a = torch.softmax(torch.randn(1, 6, 6), -1)
    with torch.no_grad():
        out = dattn_raw(tiny_clip, 5, x, a, (2, 3), (2, 3))
        bw = tiny_clip.block(5)
        v = F.linear(bw.ln_1(x), bw.in_proj_weight, bw.in_proj_bias)[..., 2 * 128 :][:, 1:]
        ref = F.linear(a @ v, bw.out_proj_weight, bw.out_proj_bias)  # same A for all channels
    assert torch.allclose(out, ref, atol=1e-5)


def test_dattn_bad_mean_option():
    with pytest.raises(ConfigError):
        dattn_weights(torch.randn(1, 4, 2, 2), mean="dataset")


# ---- maps, fusion orders, score pooling ------------------------------------------------------


@pytest.mark.parametrize("n_maps", [1, 3])
@pytest.mark.parametrize("soft_mean", [True, False])
def test_crane_maps_of_the_abnormal_channel_alone_are_the_same(n_maps, soft_mean):
    """What the heads ask for (``abnormal_only``): the same anomaly maps and scores, bit for bit,
    without the normal channel's map (soft mean); the hard order needs both and ignores it."""
    g = torch.Generator().manual_seed(n_maps)
    grid, size = (5, 7), (33, 41)
    maps = [F.normalize(torch.randn(2, 35, 16, generator=g), dim=-1) for _ in range(n_maps)]
    text = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    glob = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    kw = dict(grid=grid, size=size, soft_mean=soft_mean, temperature=0.07)
    full = crane_maps(maps, text, glob, **kw)
    alone = crane_maps(maps, text, glob, abnormal_only=True, **kw)
    assert torch.equal(alone.anomaly_map, full.anomaly_map)
    assert torch.equal(alone.anomaly_score, full.anomaly_score)
    assert alone.anomaly_map.shape == (2, *size)
    assert (alone.score_map is None) == soft_mean
    kept = crane_maps(maps, text, glob, abnormal_only=True, keep_steps=True, **kw)
    assert kept.score_map is not None and torch.equal(kept.anomaly_map, full.anomaly_map)


def test_fusion_orders_and_score_pooling_on_hand_made_tokens():
    t = 0.07
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # logits = tokens / t
    # 2 maps, 1 image, grid 1x2 (upsampling to 1x2 is the identity)
    p = torch.tensor(
        [
            [[[0.6, 0.8], [1.0, 0.0]]],
            [[[1.0, 0.0], [0.28, 0.96]]],
        ]
    )  # (L=2, B=1, N=2, D=2), unit rows
    g = torch.tensor([[0.0, 1.0]])
    soft = crane_maps(list(p), text, g, grid=(1, 2), size=(1, 2), soft_mean=True, temperature=t)
    hard = crane_maps(list(p), text, g, grid=(1, 2), size=(1, 2), soft_mean=False, temperature=t)
    lg = p.numpy() / t  # (L, 1, N, 2)

    def sm(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    exp_soft = sm(lg).mean(0)[..., 1]  # softmax per map, then mean
    exp_hard = sm(lg.mean(0))[..., 1]  # mean of logits, then softmax
    np.testing.assert_allclose(soft.anomaly_map.numpy().reshape(1, 2), exp_soft, atol=1e-6)
    np.testing.assert_allclose(hard.anomaly_map.numpy().reshape(1, 2), exp_hard, atol=1e-6)
    assert not np.allclose(exp_soft, exp_hard)  # the orders really differ here
    # score pooling (same for both orders)
    pbar = p.numpy().mean(0)[0]  # (N, D)
    w = sm(lg.mean(0)[0])[:, 1]
    c = (pbar * w[:, None]).sum(0)
    c /= np.linalg.norm(c)
    f = 0.5 * c + 0.5 * g.numpy()[0]
    f /= np.linalg.norm(f)
    score = sm(f @ text.numpy().T / t)[1]
    for r in (soft, hard):
        assert r.anomaly_score.shape == (1,)
        assert abs(float(r.anomaly_score[0]) - score) < 1e-6
        np.testing.assert_allclose(r.sbp_weights.numpy()[0], w, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 37, 50), (1, 518, 518), (3, 5, 6), (1, 1, 9)])
def test_torch_gaussian_equals_scipy(shape):
    rng = np.random.default_rng(0)
    x = rng.random(shape).astype(np.float32)
    ours = gaussian_filter_torch(torch.from_numpy(x), 4.0).numpy()
    ref = gaussian_filter_scipy(x, 4.0)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # and torch's own 'reflect' padding would NOT match (the spec's warning)
    if shape[-1] > 17 and shape[-2] > 17:
        from scipy.ndimage import gaussian_filter

        assert np.abs(gaussian_filter(x[0], 4.0, mode="mirror") - ref[0]).max() > 1e-4


def _gaussian_conv2d(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """The filter as two single-channel conv2d passes (the implementation before the tap sums)."""
    import torch.nn.functional as F

    from zsdense.dense.smoothing import _symmetric_pad_index, gaussian_kernel1d

    w = torch.as_tensor(gaussian_kernel1d(sigma), dtype=maps.dtype)
    r = (w.numel() - 1) // 2
    h, wd = maps.shape[-2:]
    x = maps.reshape(-1, 1, h, wd)
    x = F.conv2d(x.index_select(2, _symmetric_pad_index(h, r)), w.view(1, 1, -1, 1))
    x = F.conv2d(x.index_select(3, _symmetric_pad_index(wd, r)), w.view(1, 1, 1, -1))
    return x.reshape(maps.shape)


@pytest.mark.parametrize("sigma", [4.0, 1.5, 0.6])
@pytest.mark.parametrize("shape", [(4, 64, 80), (2, 3, 40), (1, 30, 2)])
def test_gaussian_tap_sums_equal_conv2d(shape, sigma):
    """The tap-by-tap sums give the conv2d passes' values (to float32 rounding), at sizes
    smaller than the kernel too, with leading axes kept."""
    x = torch.from_numpy(np.random.default_rng(1).random(shape).astype(np.float32))
    ours = gaussian_filter_torch(x, sigma)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, _gaussian_conv2d(x, sigma), atol=1e-6, rtol=0)
    batched = gaussian_filter_torch(x.reshape(1, *shape), sigma).reshape(shape)
    torch.testing.assert_close(batched, ours, atol=0, rtol=0)
