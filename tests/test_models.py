"""Encoder wrappers on the tiny models: block pieces recompose blocks, grids, SAM capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsdense.models.clip import build_tiny_clip, clip_from_state_dict, preprocess_images
from zsdense.models.dinov2 import build_dinov2
from zsdense.models.sam import build_sam


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip("ViT-B-16")


def _attn_from_pieces(bw, x_bnc):
    """Plain multi-head attention recomputed from the block's weights (independent of open_clip)."""
    b, n, c = x_bnc.shape
    h = bw.num_heads
    d = c // h
    qkv = F.linear(bw.ln_1(x_bnc), bw.in_proj_weight, bw.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)
    out = torch.zeros_like(x_bnc)
    for head in range(h):  # deliberately a loop: an independent computation
        sl = slice(head * d, (head + 1) * d)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) * d**-0.5, dim=-1)
        out[..., sl] = a @ v[..., sl]
    return F.linear(out, bw.out_proj_weight, bw.out_proj_bias)


def test_block_pieces_recompose_every_block(clip):
    torch.manual_seed(0)
    x = clip.embed(clip.normalize(torch.rand(2, 3, 224, 224)), "native")
    for i in range(clip.num_layers):
        bw = clip.block(i)
        mid = x + _attn_from_pieces(bw, x)
        mine = mid + bw.mlp(bw.ln_2(mid))
        theirs = clip.blocks[i](x)
        assert torch.allclose(mine, theirs, atol=1e-5), f"block {i}"
        x = theirs


def test_embed_and_head_equal_open_clip_forward(clip):
    x = clip.normalize(torch.rand(2, 3, 224, 224))
    ours = clip.encode_image_global(x, "native")
    ref = F.normalize(clip.model.encode_image(x), dim=-1)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_forward_layers_matches_sequential_blocks(clip):
    x = clip.embed(clip.normalize(torch.rand(1, 3, 224, 224)), "native")
    got = clip.forward_layers(x, [2, 4])
    ref2 = clip.run_blocks(x, 0, 2)
    ref4 = clip.run_blocks(ref2, 2, 4)
    assert set(got) == {2, 4}
    assert torch.allclose(got[2], ref2) and torch.allclose(got[4], ref4)


def test_pos_embed_modes_keep_class_slot_and_resize(clip):
    pe = clip.model.visual.positional_embedding
    for mode in ("bilinear", "bicubic", "bicubic-scale"):
        out = clip.pos_embed((20, 17), mode)
        assert out.shape == (1 + 20 * 17, clip.width)
        assert torch.equal(out[0], pe[0])
    # bilinear resize to the native grid is the identity; a cached value is reused
    assert torch.equal(clip.pos_embed((14, 14), "bilinear"), pe)
    assert clip.pos_embed((20, 17), "bilinear") is clip.pos_embed((20, 17), "bilinear")
    # hand check of the bilinear rule: F.interpolate(size, align_corners=False)
    g = pe[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(g, size=(20, 17), mode="bilinear", align_corners=False)
    assert torch.allclose(
        clip.pos_embed((20, 17), "bilinear")[1:], ref.permute(0, 2, 3, 1).reshape(340, -1)
    )


def test_any_input_size_runs(clip):
    x = clip.normalize(torch.rand(1, 3, 160, 240))
    tokens = clip.run_blocks(clip.embed(x, "bicubic-scale"))
    assert tokens.shape == (1, 1 + 10 * 15, clip.width)


def test_tiny_is_deterministic_and_flagged():
    a, b = build_tiny_clip("ViT-L-14-336"), build_tiny_clip("ViT-L-14-336")
    assert a.is_random and a.patch_size == 14 and a.native_grid == 24
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_state_dict_roundtrip_builds_same_model(clip):
    sd = clip.model.state_dict()
    other = clip_from_state_dict(dict(sd))
    x = clip.normalize(torch.rand(1, 3, 224, 224))
    assert torch.allclose(
        other.encode_image_global(x, "native"), clip.encode_image_global(x, "native"), atol=1e-6
    )


def test_text_encoder_uses_real_tokenizer(clip):
    t = clip.encode_text(["a photo of a cat.", "a photo of a dog."])
    assert t.shape == (2, clip.embed_dim)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(t[0], t[1])


def test_preprocess_matches_pil_bicubic_on_8bit():
    from PIL import Image

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = preprocess_images([u8.astype(np.float32) / 255.0], (16, 24))
    ref = np.asarray(Image.fromarray(u8).resize((24, 16), Image.BICUBIC), np.float32) / 255.0
    assert out.shape == (1, 3, 16, 24)
    assert np.allclose(out[0].numpy().transpose(1, 2, 0), ref, atol=1e-6)


def test_preprocess_keeps_16bit_precision():
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    img = np.repeat(ramp[..., None], 3, axis=2) * (1000 / 65535)  # not 8-bit representable
    out = preprocess_images([img], 64, interpolation="bilinear")
    assert len(np.unique(out.numpy())) > 1000


def test_dinov2_tiny_patch_features_any_grid():
    d = build_dinov2("dinov2-reg-base", tiny=True)
    assert d.num_registers == 4 and d.patch_size == 14
    x = torch.rand(2, 3, 70, 98)
    f = d.patch_features(d.normalize(x))
    assert f.shape == (2, d.width, 5, 7)
    # features are the last_hidden_state patches (after the final LayerNorm), row-major
    t = d.tokens(d.normalize(x))
    assert torch.allclose(f[1, :, 2, 3], t[1, 1 + 4 + 2 * 7 + 3])
    g = d.features_on_grid(torch.rand(1, 3, 50, 50), (6, 6))
    assert g.shape == (1, d.width, 6, 6)


def test_sam_capture_matches_block_output_and_reuse():
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos  # noqa: F401

    sam = build_sam("vit_b", tiny=True)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    blk = sam.model.image_encoder.blocks[-1]
    seen = {}
    h = blk.attn.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    try:
        state = sam.encode(img, capture_last_attn=True)
    finally:
        h.remove()
    heads, n, _ = state.last_attn.shape
    assert (heads, n) == (2, 64 * 64)
    assert torch.allclose(state.last_attn.sum(-1), torch.ones(heads, n), atol=1e-4)
    # A · v, merged over heads and projected, must equal the attention module's own output
    gh, gw = state.last_v.shape[1:3]
    av = state.last_attn @ state.last_v.reshape(heads, n, -1)  # (heads, N, d)
    merged = av.reshape(heads, gh, gw, -1).permute(1, 2, 0, 3).reshape(1, gh, gw, -1)
    assert torch.allclose(blk.attn.proj(merged), seen["out"], atol=1e-4)
    assert state.embedding.shape == (1, 256, 64, 64) and state.input_size == (768, 1024)
    assert sam.encoder_calls == 1
    pred = sam.predictor_for(state)
    masks, ious, _ = pred.predict(point_coords=np.array([[60, 45]]), point_labels=np.array([1]))
    assert masks.shape == (3, 90, 120) and sam.encoder_calls == 1


def test_sam_capture_is_the_blocks_own_attention():
    """Capturing keeps what the last block computes (one pass): the embedding is bit-identical
    to an encode without capture, the attention equals a recomputation from the block's input,
    and the block's forward is the class's again afterwards."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    sam = build_sam("vit_b", tiny=True)
    img = np.random.default_rng(3).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    blk = sam.model.image_encoder.blocks[-1]
    seen = {}
    calls = []
    h = blk.norm1.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o))
    h2 = blk.attn.qkv.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with_capture = sam.encode(img, capture_last_attn=True)
    finally:
        h.remove()
        h2.remove()
    assert len(calls) == 1  # the projections ran once: nothing recomputed
    plain = sam.encode(img)
    assert torch.equal(with_capture.embedding, plain.embedding)
    assert plain.last_attn is None and "forward" not in vars(blk.attn)
    x = seen["x"]
    b, gh, gw, _ = x.shape
    m = blk.attn
    qkv = m.qkv(x).reshape(b, gh * gw, 3, m.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * m.num_heads, gh * gw, -1).unbind(0)
    logits = add_decomposed_rel_pos(
        (q * m.scale) @ k.transpose(-2, -1), q, m.rel_pos_h, m.rel_pos_w, (gh, gw), (gh, gw)
    )
    torch.testing.assert_close(with_capture.last_attn, logits.softmax(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(with_capture.last_v, v.reshape(m.num_heads, gh, gw, -1))
    assert sam.encoder_calls == 2


def test_context_computes_sam_once():
    from zsdense.context import ImageContext

    sam = build_sam("vit_b", tiny=True)
    ctx = ImageContext(image=np.random.default_rng(1).random((40, 50, 3), dtype=np.float32))
    s1 = ctx.sam_state(sam)
    s2 = ctx.sam_state(sam)
    assert s1 is s2 and ctx.computed[("sam", sam.arch)] == 1
    s3 = ctx.sam_state(sam, capture_last_attn=True)  # needs the attention: recomputed once
    assert s3.last_attn is not None and ctx.sam_state(sam) is s3
    assert ctx.computed[("sam", sam.arch)] == 2


def test_state_dict_with_other_head_counts_needs_them_given():
    """Head counts are in no tensor shape: a CLIP built with 4 vision heads of 32 and 2 text heads
    of 32 (not OpenAI's width // 64) loads back exactly only when they are given."""
    import open_clip

    from zsdense.errors import ConfigError

    torch.manual_seed(0)
    ref = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=2, width=128, patch_size=16, image_size=64, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1),
        quick_gelu=True,
    ).eval()
    for name, p in ref.named_parameters():  # break the symmetry between heads
        if name.endswith("in_proj_bias"):
            p.data.add_(0.3 * torch.randn_like(p))
    sd = ref.state_dict()
    x = torch.randn(1, 3, 64, 64)
    tok = open_clip.get_tokenizer("ViT-B-16")(["a cat"])
    with torch.no_grad():
        want_img, want_txt = ref.encode_image(x), ref.encode_text(tok)
        got = clip_from_state_dict(sd, vision_heads=4, text_heads=2)
        assert got.block(0).num_heads == 4
        torch.testing.assert_close(got.model.encode_image(x), want_img, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.model.encode_text(tok), want_txt, rtol=0, atol=1e-6)
        default = clip_from_state_dict(sd)  # OpenAI's rule: 128 // 64 = 2 vision heads
        assert default.block(0).num_heads == 2
        assert (default.model.encode_image(x) - want_img).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="do not divide"):
        clip_from_state_dict(sd, vision_heads=3)
