"""The reduced-precision (bf16) paths below the heads: each stays within its stated tolerance of
float32, and float32 itself is untouched (the exact path the fixtures are matched on).

Everything here is tiny, so it also runs (slower, emulated) on CPUs without native bf16.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

BF16 = torch.bfloat16


def _bf16_autocast():
    return torch.autocast("cpu", dtype=BF16)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


# ---- nearest neighbours (few-shot kNN) ------------------------------------------------------


@pytest.fixture(scope="module")
def bank():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(40, 64, generator=g)
    rows = _unit(
        centres[torch.randint(0, 40, (3000,), generator=g)]
        + 0.6 * torch.randn(3000, 64, generator=g)
    )
    queries = _unit(
        centres[torch.randint(0, 40, (300,), generator=g)] + 0.6 * torch.randn(300, 64, generator=g)
    )
    queries[:30] = _unit(torch.randn(30, 64, generator=g))  # far from everything ("anomalous")
    return queries, [rows[:1700], rows[1700:]]


def _exact(queries, blocks):
    rows = torch.cat(blocks).double()
    d = torch.cdist(queries.double(), rows).square()
    return d.min(dim=1).values, d


def test_knn_bf16_search_within_tolerance_and_refined(bank):
    from zsdense.dense.knn import knn_search

    q, blocks = bank
    with _bf16_autocast():
        d, i = knn_search(q, blocks, 1, budget_bytes=64 << 10)  # small blocks: many steps
    best, full = _exact(q, blocks)
    chosen = full.gather(1, i).squeeze(1)
    # the returned distance is the exact (float32) distance to the returned row ...
    assert torch.allclose(d.squeeze(1).double(), chosen, atol=1e-5)
    # ... and that row is the nearest to within bf16 ranking (2^-9 of the distance, measured
    # 0.5 % at most; asserted at 2 %)
    assert torch.all(chosen <= best * 1.02 + 1e-6)
    d32, i32 = knn_search(q, blocks, 1)
    assert (i == i32).float().mean() > 0.8
    assert not torch.equal(i, i32) or not torch.equal(d, d32)  # bf16 really ran


def test_knn_float32_is_exact_inside_autocast_and_for_raw_features(bank):
    from zsdense.dense.knn import knn_search

    q, blocks = bank
    ref = knn_search(q, blocks, 3)
    with _bf16_autocast():
        forced = knn_search(q, blocks, 3, dtype=torch.float32)
        raw = knn_search(q * 20.0, [b * 20.0 for b in blocks], 3)  # |m|² = 400: not normalised
    assert torch.equal(forced[0], ref[0]) and torch.equal(forced[1], ref[1])
    ref_raw = knn_search(q * 20.0, [b * 20.0 for b in blocks], 3)
    assert torch.equal(raw[0], ref_raw[0]) and torch.equal(raw[1], ref_raw[1])


def test_knn_bf16_copy_made_once_per_block_and_renewed_after_change(bank):
    from zsdense.dense import knn

    q, blocks = bank
    block = blocks[0].clone()
    with _bf16_autocast():
        knn.knn_search(q, [block], 1)
        first = knn._CAST_CACHE[(id(block), BF16)][2]
        knn.knn_search(q, [block], 1)
        assert knn._CAST_CACHE[(id(block), BF16)][2] is first  # reused
        block.mul_(-1.0)  # modified in place: a new copy
        knn.knn_search(q, [block], 1)
        assert knn._CAST_CACHE[(id(block), BF16)][2] is not first
    key = (id(block), BF16)
    del block
    assert key not in knn._CAST_CACHE  # dropped with its block


def test_unit_similarity_float32_is_the_plain_product_and_bf16_close():
    from zsdense.dense.knn import unit_distance, unit_similarity

    g = torch.Generator().manual_seed(1)
    a = _unit(torch.randn(50, 32, generator=g))
    b = _unit(a[:40] + 0.1 * torch.randn(40, 32, generator=g))
    s = unit_similarity(a, b, torch.float32)
    assert torch.equal(s, a @ b.t())
    assert torch.equal(unit_distance(s, torch.float32), (2.0 - 2.0 * s).clamp_min(0.0).sqrt())
    t = unit_similarity(a.to(BF16), b.to(BF16), BF16)
    exact = torch.cdist(a.double(), b.double())
    got = unit_distance(t, BF16)
    assert got.dtype == torch.float32
    # close pairs keep their distance to ~1e-2 (the shifted product: s − 1 near 0)
    near = exact < 0.5
    assert near.any()
    assert (got.double() - exact)[near].abs().max() < 0.02


def test_musc_distances_in_bf16_close_to_float32():
    from zsdense.tasks.musc import mutual_scores

    g = torch.Generator().manual_seed(2)
    z = _unit(torch.randn(6, 49, 32, generator=g) + torch.randn(1, 49, 32, generator=g))
    ref = mutual_scores(z)
    with _bf16_autocast():
        got = mutual_scores(z)
    assert got.dtype == torch.float32
    assert not torch.equal(got, ref)
    assert (got - ref).abs().max() < 0.01 * ref.abs().max()


# ---- E-Attn on the CPU in bf16 ----------------------------------------------------------------


@pytest.mark.parametrize("attn_type", ["qq+kk+vv", "(q+k+v)^2", "vv"])
def test_dual_attention_bf16_materialised_close_to_float64(attn_type):
    from zsdense.dense.attention import dual_attention_heads

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))
    ref_p, ref_c = dual_attention_heads(q.double(), k.double(), v.double(), attn_type)
    p, c = dual_attention_heads(q.to(BF16), k.to(BF16), v.to(BF16), attn_type)
    assert p.dtype == c.dtype == BF16
    # bf16 keeps 8 bits: outputs of magnitude ~3 within a few of their last places
    assert (p.double() - ref_p).abs().max() < 0.05 * ref_p.abs().max()
    assert (c.double() - ref_c).abs().max() < 0.05 * ref_c.abs().max()
    _, c_only = dual_attention_heads(
        q.to(BF16), k.to(BF16), v.to(BF16), attn_type, with_plain=False
    )
    assert torch.equal(c_only, c)


def test_dual_attention_plain_rows_only_in_the_materialised_path():
    """bf16 on the CPU computes only the requested rows of the plain attention (Crane's last
    block reads its class token); float32 returns every row, the same bits as without."""
    from zsdense.dense.attention import dual_attention_heads

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 29, 16, generator=g) for _ in range(3))
    full_p, full_c = dual_attention_heads(q.to(BF16), k.to(BF16), v.to(BF16))
    p, c = dual_attention_heads(q.to(BF16), k.to(BF16), v.to(BF16), plain_rows=1)
    assert p.shape == (2, 3, 1, 16) and torch.equal(c, full_c)
    ref_p, _ = dual_attention_heads(q.double(), k.double(), v.double())
    assert (p.double() - ref_p[:, :, :1]).abs().max() < 0.05 * ref_p.abs().max()
    assert (p.float() - full_p[:, :, :1].float()).abs().max() < 0.02
    p32, c32 = dual_attention_heads(q, k, v, plain_rows=1)
    want_p, want_c = dual_attention_heads(q, k, v)
    assert torch.equal(p32, want_p) and torch.equal(c32, want_c)


def test_dual_attention_chunking_does_not_change_the_result(monkeypatch):
    """Whole heads per chunk, one head per chunk, and blocks of rows of one head agree."""
    from zsdense.dense import attention as A

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 50, 8, generator=g).to(BF16) for _ in range(3))
    outs = []
    for budget in (1 << 20, 50 * 50 * 2, 20 * 50 * 2):  # all slices / one slice / 20 rows
        monkeypatch.setattr(A, "ATTN_CHUNK_BYTES", budget)
        outs.append(A.dual_attention_heads(q, k, v))
    for p, c in outs[1:]:
        assert (p.float() - outs[0][0].float()).abs().max() < 0.02
        assert (c.float() - outs[0][1].float()).abs().max() < 0.05


def test_dual_attention_float32_keeps_the_fused_kernel(monkeypatch):
    from zsdense.dense import attention as A

    called = []
    monkeypatch.setattr(A, "_dual_attention_materialised", lambda *a: called.append(1))
    q = torch.randn(1, 2, 10, 8)
    A.dual_attention_heads(q, q, q)
    assert not called


def _tiny_clip_pair():
    """A tiny CLIP in float32 and a bf16 copy of the same weights."""
    import copy

    from zsdense.models.clip import build_tiny_clip

    c32 = build_tiny_clip("ViT-B-16")
    c16 = copy.deepcopy(c32)
    c16.model.to(BF16)
    c16.clear_caches()
    return c32, c16


def test_eattn_bf16_refined_stream_projected_once(monkeypatch):
    """bf16 on the CPU, as run: the refined stream's per-block output projections become one
    product (``ClipModel.stacked_out_proj``, asked once a forward); it stays as close to
    float32 as the per-block sums (closer: one rounding instead of one a block). float32, the
    per-layer variant and the kept streams add block by block, as before."""
    from zsdense.dense import crane

    c32, c16 = _tiny_clip_pair()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 48, 64, generator=g)
    start = crane.scale_block(6, c32.num_layers)
    asked = []
    for clip in (c32, c16):
        spy = lambda a, b, real=clip.stacked_out_proj: asked.append(a) or real(a, b)
        monkeypatch.setattr(clip, "stacked_out_proj", spy)
    with torch.inference_mode():
        ref = crane.eattn_dual_path(c32, x, start_block=start)
        assert asked == []  # float32: block by block
        one = crane.eattn_dual_path(c16, x.to(BF16), start_block=start)
        assert asked == [start - 1]
        monkeypatch.setattr(crane, "MATERIALISE_DTYPES", ())  # the per-block sums in bf16
        per_block = crane.eattn_dual_path(c16, x.to(BF16), start_block=start)
        assert asked == [start - 1]
    want = ref.dense_raw[0]
    scale = want.abs().max()
    err_one = (one.dense_raw[0].float() - want).abs()
    err_blocks = (per_block.dense_raw[0].float() - want).abs()
    assert one.dense_raw[0].dtype == BF16 and one.dense_raw[0].shape == want.shape
    assert err_one.max() < 0.03 * scale and err_blocks.max() < 0.03 * scale
    assert err_one.mean() <= 1.5 * err_blocks.mean()
    assert torch.equal(one.global_raw, per_block.global_raw)  # the original stream: untouched
    monkeypatch.undo()
    with torch.inference_mode():  # the per-layer variant reads the stream between blocks
        last = c16.num_layers
        layered = crane.eattn_dual_path(c16, x.to(BF16), start_block=start, layers=(start, last))
    assert layered.layers == [start, last]
    assert (layered.dense_raw[1].float() - want).abs().max() < 0.03 * scale


def test_eattn_bf16_heads_packed_by_one_copy_with_the_same_bits(monkeypatch):
    """bf16 on the CPU: each E-Attn block lays q, k, v out head-major by one copy
    (``qkv_heads_packed``: the same values as ``qkv_heads``' strided views, each contiguous), so
    the materialised attention copies nothing; the dual path's outputs are the same bits as with
    the strided views. float32 (the fused kernel) keeps ``qkv_heads``."""
    from zsdense.dense import attention, crane

    c32, c16 = _tiny_clip_pair()
    g = torch.Generator().manual_seed(9)
    tokens = torch.randn(2, 7, c16.block(0).in_proj_weight.shape[1], generator=g).to(BF16)
    with torch.inference_mode():
        strided = attention.qkv_heads(c16.block(0), tokens)
        packed = attention.qkv_heads_packed(c16.block(0), tokens)
    for a, b in zip(strided, packed):
        assert b.is_contiguous() and not a.is_contiguous()
        assert b.shape == a.shape and torch.equal(a, b)

    x = torch.randn(2, 3, 48, 64, generator=g)
    start = crane.scale_block(6, c16.num_layers)
    calls = []
    real = attention.qkv_heads_packed
    monkeypatch.setattr(crane, "qkv_heads_packed", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        crane.eattn_dual_path(c32, x, start_block=start)
        assert calls == []  # float32: the strided views, as ever
        for kw in ({}, {"keep_last_inputs": True}, {"layers": (start, c16.num_layers)}):
            got = crane.eattn_dual_path(c16, x.to(BF16), start_block=start, **kw)
            with monkeypatch.context() as m:
                m.setattr(crane, "qkv_heads_packed", attention.qkv_heads)
                want = crane.eattn_dual_path(c16, x.to(BF16), start_block=start, **kw)
            assert all(torch.equal(a, b) for a, b in zip(got.dense_raw, want.dense_raw))
            assert torch.equal(got.global_raw, want.global_raw)
    assert len(calls) == 3 * (c16.num_layers - start + 1)


def test_stacked_out_proj_is_the_sum_of_the_blocks_projections():
    """``Σ_j out_proj_j(x_j)`` = one product with the projections side by side; the pair is
    cached and rebuilt after a weight changes (in place) or the model changes dtype."""
    from zsdense.dense.attention import out_proj
    from zsdense.models.clip import build_tiny_clip

    c64 = build_tiny_clip("ViT-B-16")
    c64.model.double()
    c64.clear_caches()
    first, last = 1, c64.num_layers
    width = c64.width
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(2, 5, width, generator=g, dtype=torch.float64) for _ in range(first, last)]
    weight, bias = c64.stacked_out_proj(first, last)
    assert weight.shape == (width, width * (last - first)) and bias.shape == (width,)
    want = sum(out_proj(c64.block(i), x) for i, x in zip(range(first, last), xs))
    got = F.linear(torch.cat(xs, dim=-1), weight, bias)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert c64.stacked_out_proj(first, last)[0] is weight  # cached
    with torch.no_grad():
        c64.block(first).out_proj_weight.mul_(2.0)
    again, _ = c64.stacked_out_proj(first, last)
    assert again is not weight and torch.equal(again[:, :width], 2.0 * weight[:, :width])
    c64.model.float()
    w32, b32 = c64.stacked_out_proj(first, last)
    assert w32.dtype == b32.dtype == torch.float32


# ---- SAM mask decoder in bf16 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sams():
    from zsdense.models import _cast
    from zsdense.models.sam import build_sam

    return build_sam("vit_b", tiny=True), _cast(build_sam("vit_b", tiny=True), BF16)


def _prompts(n: int = 8):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 2, generator=g) * 1000, torch.ones(n, 1, dtype=torch.int)


def test_decoder_for_float32_is_the_model_and_bf16_a_cached_copy(tiny_sams):
    from zsdense.models.sam_proposals import ReducedDecoderSam, decoder_for

    s32, s16 = tiny_sams
    assert decoder_for(s32) is s32.model
    red = decoder_for(s16)
    assert isinstance(red, ReducedDecoderSam) and decoder_for(s16) is red
    assert red.mask_decoder.iou_token.weight.dtype == BF16
    assert s16.model.mask_decoder.iou_token.weight.dtype == torch.float32  # predictors' own


def test_reduced_decoding_is_the_same_model_rearranged(tiny_sams):
    """decode_points_reduced on a float32 copy of the decoder equals the reference-order
    decode_points up to float rounding: the rearrangement changes no arithmetic."""
    from zsdense.models import sam_proposals as SP

    s32, _ = tiny_sams
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    coords, labels = _prompts()
    m32 = SP.ReducedDecoderSam(s32.model, torch.float32)
    side = SP.decoder_image_side(m32, emb)
    ref_low, ref_iou = SP.decode_points(
        s32.model, SP.decoder_image_side(s32.model, emb), coords, labels
    )
    low, iou = SP.decode_points_reduced(m32, side, coords, labels)
    assert low.shape == ref_low.shape and iou.shape == ref_iou.shape
    assert torch.allclose(low, ref_low, atol=1e-4 * ref_low.abs().max())
    assert torch.allclose(iou, ref_iou, atol=1e-5)


def test_reduced_decoding_in_bf16_close_to_float32(tiny_sams):
    from zsdense.models import sam_proposals as SP

    s32, s16 = tiny_sams
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    coords, labels = _prompts()
    ref_low, ref_iou = SP.decode_points(
        s32.model, SP.decoder_image_side(s32.model, emb), coords, labels
    )
    with _bf16_autocast():
        red = SP.decoder_for(s16)
        low, iou = SP.decode_in_chunks(red, SP.decoder_image_side(red, emb), coords, labels)
    assert low.dtype == BF16
    scale = float(ref_low.abs().max())
    assert (low.float() - ref_low).abs().max() < 0.03 * scale
    assert (iou.float() - ref_iou).abs().max() < 0.01
    assert ((low.float() > 0) == (ref_low > 0)).float().mean() > 0.99


@pytest.mark.parametrize("shared", [False, True])
def test_folded_attentions_equal_sams_attention_in_float64(tiny_sams, shared):
    """The reduced decoder's two folded attentions are SAM's ``Attention`` rearranged: in
    float64 they equal the module's forward on the same inputs (tokens to a prompt's own image
    side; image to tokens from the image rows, or from block 0's projected shared queries)."""
    import copy

    from zsdense.models import sam_decoder_reduced as R

    s32, _ = tiny_sams
    layer = copy.deepcopy(s32.model.mask_decoder.transformer.layers[0]).double()
    g = torch.Generator().manual_seed(11)
    b, t, hw = 3, 7, 50
    c = layer.cross_attn_token_to_image.q_proj.in_features
    for attn in (layer.cross_attn_token_to_image, layer.cross_attn_image_to_token):
        for p in attn.parameters():  # non-zero biases: each one's path is exercised
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    tok_q, tok_v = (torch.randn(b, t, c, generator=g, dtype=torch.float64) for _ in range(2))
    k_pe, keys = (torch.randn(b, hw, c, generator=g, dtype=torch.float64) for _ in range(2))
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    ref = t2i(q=tok_q, k=k_pe, v=keys)
    got = R._tokens_to_image_folded(t2i, t2i.q_proj(tok_q), k_pe, keys)
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=0, atol=1e-10)
    img = k_pe[:1] if shared else k_pe
    ref = i2t(q=img, k=tok_q, v=tok_v)  # (B, HW, C): the shared image queries broadcast
    iq = i2t.q_proj(img) if shared else img
    got = R._image_to_tokens_folded(i2t, iq, i2t.k_proj(tok_q), i2t.v_proj(tok_v), shared)
    assert got.shape == (b, hw, c)
    assert torch.allclose(got, ref.expand(b, -1, -1), rtol=0, atol=1e-10)


def test_decoder_image_side_is_row_major(tiny_sams):
    """The image side every batch adds its first update to is row-major in both precisions
    (a channel-strided side made each bf16 batch's ``keys + update`` 16× slower); the float32
    side holds the same values as the reference's view."""
    from zsdense.models import sam_proposals as SP

    s32, s16 = tiny_sams
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(8))
    red = SP.decoder_for(s16)
    side = SP.decoder_image_side(red, emb)
    exact = SP.decoder_image_side(s32.model, emb)
    assert side.keys.dtype == BF16 and exact.keys.dtype == torch.float32
    for sd in (side, exact):
        assert sd.keys.is_contiguous() and sd.key_pe.is_contiguous()
    no_mask = s32.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    assert torch.equal(exact.keys, (emb + no_mask).flatten(2).transpose(1, 2))
    no_mask16 = (s.model.prompt_encoder.no_mask_embed.weight for s in (s16, s32))
    if torch.equal(*no_mask16):  # the same tiny weights: the same values, cast
        assert torch.equal(side.keys, exact.keys.to(BF16))


@pytest.mark.parametrize("hw", [(96, 128), (240, 320), (480, 640), (512, 512), (700, 300)])
def test_composite_upsampling_matches_the_two_resizes(tiny_sams, hw):
    """``postprocess_masks``' two bilinear resizes composed into one (reduced precision, images
    of at most half SAM's input pixels): the same logits up to float32 weight rounding."""
    from segment_anything.utils.transforms import ResizeLongestSide

    from zsdense.models import sam_proposals as SP

    s32, s16 = tiny_sams
    red = SP.decoder_for(s16)
    size = int(red.image_encoder.img_size)
    input_size = ResizeLongestSide(size).get_preprocess_shape(hw[0], hw[1], size)
    g = torch.Generator().manual_seed(hw[0])
    low = (torch.randn(5, size // 4, size // 4, generator=g) * 4).to(BF16)
    up = SP.composite_upsampler(red, low.shape[-2:], input_size, hw)
    assert SP.composite_upsampler(s32.model, low.shape[-2:], input_size, hw) is None  # exact path
    ref = SP.upsample_logits(red, low[:, None].float(), input_size, hw)[:, 0]
    if 2 * hw[0] * hw[1] > input_size[0] * input_size[1]:
        assert up is None
        return
    out = up(low)
    assert out.shape == ref.shape == (5, *hw) and out.dtype == torch.float32
    assert (out - ref).abs().max() < 1e-4 * float(ref.abs().max())
    near = ref.abs() < 1e-3 * float(ref.abs().max())
    assert torch.equal((out > 0)[~near], (ref > 0)[~near])


def test_prompt_encoder_positional_features_stay_float32(tiny_sams):
    from zsdense.models.sam_proposals import decoder_for

    s32, s16 = tiny_sams
    coords, labels = _prompts(4)
    with _bf16_autocast():
        sparse, dense = decoder_for(s16).prompt_encoder(points=(coords, labels))
        pe = decoder_for(s16).prompt_encoder.get_dense_pe()
    ref_sparse, _ = s32.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    assert sparse.dtype == BF16 and pe.dtype == torch.float32
    # only the final cast to bf16 (2^-9 relative), not bf16 sin/cos arguments (~0.1 off)
    assert (sparse.float() - ref_sparse).abs().max() <= 2**-8 * ref_sparse.abs().max()
    assert torch.equal(pe, s32.model.prompt_encoder.get_dense_pe())


# ---- per-image work outside the models: the same outputs, less work --------------------------


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_reduced_input_resize_close_to_pil_and_exact_untouched(interpolation):
    """``exact=False`` (reduced-precision models) resizes 8-bit images with torch's uint8
    kernel: within 2/255 of PIL's values on under 2 % of the pixels, down and up; ``exact=True``
    (float32) is PIL itself; images that are not 8-bit keep PIL's float path either way."""
    from PIL import Image

    from zsdense.models.clip import preprocess_images
    from zsdense.tasks.common import exact_inputs

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:160]
    base = np.stack([np.sin(xx / 7), np.cos(yy / 5), np.sin((xx + yy) / 9)], -1) * 0.4 + 0.5
    u8 = np.round((base + rng.random((120, 160, 3)) * 0.1).clip(0, 1) * 255).astype(np.uint8)
    img = u8.astype(np.float32) / np.float32(255)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    for hw in [(56, 56), (224, 200)]:
        pil = np.asarray(Image.fromarray(u8).resize(hw[::-1], resample), dtype=np.float32) / 255
        want = torch.from_numpy(pil.transpose(2, 0, 1))
        exact = preprocess_images([img], hw, interpolation=interpolation)[0]
        assert torch.equal(exact, want)
        fast = preprocess_images([img], hw, interpolation=interpolation, exact=False)[0]
        diff = (fast - want).abs()
        assert diff.max() <= 2 / 255 + 1e-7 and (diff > 0).float().mean() < 0.02, hw
    grey16 = (img * 0.999 + 1e-4).astype(np.float32)  # not 8-bit representable: PIL's float path
    assert torch.equal(
        preprocess_images([grey16], (56, 56), exact=False), preprocess_images([grey16], (56, 56))
    )

    class M:
        dtype = torch.bfloat16

    assert exact_inputs(object()) and not exact_inputs(M())


def test_close_to_rounded_decides_like_allclose():
    from zsdense.models.clip import _close_to_rounded

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (20, 30, 3)).astype(np.float32)
    cases = [
        u8 / 255.0,  # decoded 8-bit
        rng.random((20, 30, 3), dtype=np.float32),  # float data
        (u8 + 0.002) / 255.0,  # just outside atol: decided by allclose itself
        np.where(u8 > 250, np.nan, u8 / 255.0).astype(np.float32),
        np.zeros((0, 4, 3), np.float32),
    ]
    for img in cases:
        x = img * 255.0
        r = np.round(x)
        assert _close_to_rounded(r, x) == bool(np.allclose(r, x, atol=1e-3))


def test_jet_colors_in_place_equals_the_formula():
    from zsdense.io.writers import jet_colors

    x = np.linspace(-0.2, 1.2, 257, dtype=np.float32).reshape(1, 257)
    xc = np.clip(x, 0.0, 1.0)
    want = np.stack([np.clip(1.5 - np.abs(4.0 * xc - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], -1)
    assert np.array_equal(jet_colors(x), want)
    assert jet_colors(np.float32(0.5)).shape == (3,)


def test_float_maps_are_written_uncompressed_unless_asked(tmp_path):
    import tifffile

    from zsdense.io.writers import write_map_tiff

    a = np.random.default_rng(0).random((2, 30, 40)).astype(np.float32)
    plain = write_map_tiff(tmp_path / "a.map.tiff", a)
    zipped = write_map_tiff(tmp_path / "b.map.tiff", a, compression="zlib")
    for path, want in ((plain, 1), (zipped, 8)):  # TIFF compression tags: none, deflate
        with tifffile.TiffFile(path) as tf:
            assert int(tf.pages[0].compression) == want
        assert np.array_equal(tifffile.imread(path), a)
    assert math.isclose(plain.stat().st_size, a.nbytes, rel_tol=0.05)


@pytest.mark.parametrize("exact", [True, False])
def test_model_input_makes_the_8bit_picture_once_for_every_head(exact, monkeypatch):
    """model_input rounds an 8-bit-representable image once per context (``exact_u8``) and
    leaves it as ``image_u8`` for SAM and the other heads; the model input is unchanged."""
    from zsdense.context import ImageContext
    from zsdense.models.clip import eight_bit, preprocess_images
    from zsdense.tasks.common import model_input

    rng = np.random.default_rng(4)
    u8 = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    photo = ImageContext(image=u8.astype(np.float32) / np.float32(255.0))
    floats = ImageContext(image=rng.random((60, 80, 3), dtype=np.float32))  # not 8-bit
    from zsdense.models import clip as clip_mod

    calls: list = []
    real = clip_mod.eight_bit
    monkeypatch.setattr(clip_mod, "eight_bit", lambda im: calls.append(1) or real(im))
    x = model_input([photo, floats], 32, "cpu", exact=exact)
    assert len(calls) == 2  # once per image, the float one included
    monkeypatch.setattr(clip_mod, "eight_bit", real)
    ref = preprocess_images([photo.image, floats.image], 32, exact=exact)
    assert torch.equal(x, ref)
    assert np.array_equal(photo.cache["_u8"], u8) and photo.exact_u8 is photo.image_u8
    assert floats.exact_u8 is None and eight_bit(floats.image) is None
    assert "_u8" not in floats.cache  # image_u8 of a float image: its own rounding, on demand
    assert np.array_equal(floats.image_u8, np.round(floats.image * 255.0).astype(np.uint8))
