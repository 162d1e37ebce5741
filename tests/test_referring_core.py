"""Referring segmentation pieces on hand-made inputs and the tiny models: relation guidance,
ramps, coherence, the masked block and G2L fusion, proposals with the whole-image fallback, and
reuse of per-image work across queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zsdense.config import REFER_PRESETS
from zsdense.dense import maskfeatures as mf
from zsdense.options import ReferOptions
from zsdense.tasks import hybridgl as R

# ---- relation guidance on hand-made boxes --------------------------------------------------------

# three boxes XYWH: 0 left/top small, 1 right/bottom big, 2 middle medium (inside 1's box? no)
BOXES = torch.tensor([[0, 0, 10, 10], [50, 40, 40, 40], [20, 20, 20, 10]])
# centres: 0 (5, 5), 1 (70, 60), 2 (30, 25); areas: 100, 1600, 200
P3 = torch.tensor([0.5, 0.3, 0.2])
Q3 = torch.tensor([0.1, 0.6, 0.3])


def _hand(relation, P, W, U):
    cx = [5.0, 70.0, 30.0]
    cy = [5.0, 60.0, 25.0]
    area = [100.0, 1600.0, 200.0]
    out = []
    for a in torch.topk(P, 3).indices.tolist():
        s = 0.0
        for b in U:
            if relation == "left":
                c = cx[a] < cx[b]
            elif relation == "right":
                c = cx[a] > cx[b]
            elif relation == "up":
                c = cy[a] < cy[b]
            elif relation == "down":
                c = cy[a] > cy[b]
            elif relation == "big":
                c = area[a] > area[b]
            elif relation == "small":
                c = area[a] < area[b]
            else:
                raise AssertionError
            s += float(P[a]) * float(W[b]) * float(c)
        out.append(s)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("relation", ["left", "right", "up", "down", "big", "small"])
def test_relation_guidance_by_hand(relation):
    rel = R.relation_guidance(P3, Q3, BOXES, relation)
    assert rel.T.tolist() == [0, 1, 2]
    assert rel.U.tolist() == [1, 2, 0] and rel.weights == "Q"
    torch.testing.assert_close(rel.R_raw, _hand(relation, P3, Q3, [1, 2, 0]), atol=1e-9, rtol=0)
    torch.testing.assert_close(rel.R, torch.softmax(rel.R_raw.float(), 0))
    # no context chunk: U = T with P weights
    rel2 = R.relation_guidance(P3, None, BOXES, relation)
    assert rel2.weights == "P" and rel2.U.tolist() == [0, 1, 2]
    torch.testing.assert_close(rel2.R_raw, _hand(relation, P3, P3, [0, 1, 2]), atol=1e-9, rtol=0)


def test_relation_right_prefers_the_rightmost():
    rel = R.relation_guidance(P3, Q3, BOXES, "right")
    # box 1 (cx 70) is right of 0 and 2; box 0 is right of nothing
    assert rel.R_raw[1] > 0 and rel.R_raw[0] == 0
    assert int(rel.T[int(torch.argmax(rel.R_raw))]) == 1


def test_relation_none_and_within():
    rel = R.relation_guidance(P3, Q3, BOXES, "none")
    torch.testing.assert_close(rel.R_raw, 3 * P3.double(), atol=1e-9, rtol=0)  # |U|·P_a
    boxes = torch.tensor([[0, 0, 100, 100], [10, 10, 20, 20], [90, 90, 20, 20]])
    rel = R.relation_guidance(P3, Q3, boxes, "within")
    # a=0: inside 1? 400/10000; inside 2: 100/10000; itself 1 -> 0.5*(0.6*0.04+0.3*0.01+0.1*1)
    exp0 = 0.5 * (0.6 * 0.04 + 0.3 * 0.01 + 0.1 * 1.0)
    exp1 = 0.3 * (0.6 * 1.0 + 0.3 * 0.0 + 0.1 * 1.0)
    exp2 = 0.2 * (0.6 * 0.0 + 0.3 * 1.0 + 0.1 * 0.25)
    torch.testing.assert_close(
        rel.R_raw, torch.tensor([exp0, exp1, exp2], dtype=torch.float64), atol=1e-6, rtol=0
    )
    no_self = R.relation_guidance(P3, Q3, boxes, "within", within_self=False)
    torch.testing.assert_close(
        no_self.R_raw,
        torch.tensor([0.5 * 0.027, 0.3 * 0.1, 0.2 * 0.025], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    zero = torch.tensor([[5, 5, 0, 0], [0, 0, 10, 10], [1, 1, 2, 2]])
    assert not torch.isfinite(R.relation_guidance(P3, Q3, zero, "within").R_raw).all()
    assert torch.isfinite(R.relation_guidance(P3, Q3, zero, "within", guard=True).R_raw).all()


def test_unknown_relation_is_config_error():
    from zsdense.errors import ConfigError

    with pytest.raises(ConfigError):
        R.relation_guidance(P3, Q3, BOXES, "beside")


# ---- ramps, heat map, coherence -----------------------------------------------------------------


def test_ramps_four_directions_and_middle():
    H, W = 4, 6
    torch.testing.assert_close(R.direction_ramp("left", H, W)[0], torch.linspace(1, 0, W))
    torch.testing.assert_close(R.direction_ramp("right", H, W)[2], torch.linspace(0, 1, W))
    mid = R.direction_ramp("middle", H, W)[0]
    torch.testing.assert_close(mid, torch.tensor([0.0, 0.5, 1.0, 1.0, 0.5, 0.0]))
    # reference: no vertical ramp
    assert torch.equal(R.direction_ramp("up", H, W), torch.ones(H, W))
    assert torch.equal(R.direction_ramp("down", H, W), torch.ones(H, W))
    up = R.direction_ramp("up", H, W, vertical=True)
    down = R.direction_ramp("down", H, W, vertical=True)
    torch.testing.assert_close(up[:, 3], torch.linspace(1, 0, H))
    torch.testing.assert_close(down[:, 0], torch.linspace(0, 1, H))
    assert torch.equal(R.direction_ramp("none", H, W), torch.ones(H, W))
    assert (up[:, 0] == up[:, -1]).all()  # constant along the width


def test_heat_map_normalisation_and_guard():
    low = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    A = R.heat_map(low, (2, 2), "none")  # same size: min-max then /mean
    exp = torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]])
    torch.testing.assert_close(A, exp / exp.mean())
    A = R.heat_map(low, (2, 2), "right")
    exp2 = exp * torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(A, exp2 / exp2.mean())
    flat = torch.ones(3, 3)
    assert torch.isnan(R.heat_map(flat, (4, 4), "none")).all()  # reference: 0/0
    torch.testing.assert_close(R.heat_map(flat, (4, 4), "none", guard=True), torch.ones(4, 4))


@pytest.mark.parametrize("beta", [1.95, 1.5, 1.8])
def test_coherence_by_hand(beta):
    A = torch.tensor([[4.0, 2.0], [0.0, 2.0]])
    masks = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [1, 1]]], dtype=torch.bool)
    C = R.coherence(A, masks, beta)
    exp = torch.tensor(
        [
            (2 - beta) * 4.0 - beta * (4.0 / 3),
            (2 - beta) * 3.0 - beta * 1.0,
            (2 - beta) * 1.0 - beta * 3.0,
        ]
    )
    torch.testing.assert_close(C, exp)
    assert C[0] > C[2]  # the mask on the heat wins


def test_beta_by_relation_and_whole_image_guard():
    pre = REFER_PRESETS["hybridgl"]
    assert R.beta_for("big", pre) == 1.95 and R.beta_for("small", pre) == 1.5
    assert R.beta_for("left", pre) == 1.8 and R.beta_for("none", pre) == 1.8
    A = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    full = torch.ones(1, 2, 2, dtype=torch.bool)
    assert torch.isnan(R.coherence(A, full, 1.8)).all()  # reference: 0/0 outside
    g = R.coherence(A, full, 1.8, guard=True)
    torch.testing.assert_close(g, torch.tensor([(2 - 1.8) * 1.0 - 1.8 * 1.0]))


def test_final_mix_reference_and_scaled():
    rel = R.relation_guidance(P3, Q3, BOXES, "right")
    C = torch.tensor([-1.0, -0.5, 0.2])
    f = R.final_mix(rel, C, alpha=0.6, mix="reference")
    torch.testing.assert_close(f, 0.4 * rel.R + 0.6 * C[rel.T])
    s = R.final_mix(rel, C, alpha=0.6, mix="scaled")
    r = rel.R_raw.float() / rel.R_raw.float().sum()
    torch.testing.assert_close(s, 0.4 * r + 0.6 * torch.softmax(C[rel.T], 0))
    assert s.sum() == pytest.approx(1.0, abs=1e-6)  # both terms are distributions


# ---- masked block and G2L fusion on the tiny CLIP ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    from zsdense.models.clip import build_tiny_clip

    return build_tiny_clip("ViT-B-16")


def _toy_inputs(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = (torch.rand(96, 128, 3, generator=g) * 255).to(torch.uint8).numpy()
    masks = np.zeros((n, 96, 128), bool)
    masks[0, 10:60, 10:70] = True
    masks[1, 40:90, 60:120] = True
    return img, masks[:n]


def test_block_forward_matches_open_clip_block(tiny_clip):
    x = torch.randn(3, 1 + 16, tiny_clip.width)
    blk = tiny_clip.blocks[2]
    with torch.no_grad():
        torch.testing.assert_close(mf.block_forward(tiny_clip, 2, x), blk(x), atol=1e-5, rtol=0)
        gm = torch.zeros(3, 4, 4)
        gm[0, 0, :2] = 1.0
        gm[1, 2:, 2:] = 0.4
        bias = mf.class_attention_bias(gm, torch.float32)  # (3, 1, 17, 17)
        heads = tiny_clip.block(2).num_heads
        float_mask = bias[:, 0].repeat_interleave(heads, dim=0)  # (3·heads, 17, 17)
        ref = blk(x, attn_mask=float_mask)
        torch.testing.assert_close(mf.block_forward(tiny_clip, 2, x, bias), ref, atol=1e-5, rtol=0)


def test_class_token_sees_only_masked_patches(tiny_clip):
    gm = torch.zeros(1, 4, 4)
    gm[0, 1, 1] = 1.0
    gm[0, 3, 0] = 0.3
    bias = mf.class_attention_bias(gm, torch.float32)
    allowed = {0, 1 + 1 * 4 + 1, 1 + 3 * 4 + 0}
    row = bias[0, 0, 0]
    assert {i for i in range(17) if row[i] == 0} == allowed
    assert torch.isinf(bias[0, 0, 1:]).sum() == 0  # patch queries unrestricted
    boolmask = mf.class_attention_mask(gm, 2)
    assert boolmask.shape == (2, 17, 17) and not boolmask[:, 1:].any()
    # behaviour: changing an unmasked patch's input leaves the class token's output unchanged
    x = torch.randn(1, 17, tiny_clip.width)
    with torch.no_grad():
        y = mf.block_forward(tiny_clip, 5, x, bias)
        x2 = x.clone()
        x2[0, 1 + 0] += 3.0 * torch.randn(tiny_clip.width)  # patch (0, 0): not in the mask
        y2 = mf.block_forward(tiny_clip, 5, x2, bias)
        x3 = x.clone()
        x3[0, 1 + 5] += 3.0 * torch.randn(tiny_clip.width)  # patch (1, 1): in the mask
        y3 = mf.block_forward(tiny_clip, 5, x3, bias)
    torch.testing.assert_close(y2[0, 0], y[0, 0], atol=1e-5, rtol=0)
    assert (y3[0, 0] - y[0, 0]).abs().max() > 1e-3
    # an empty grid mask: the class token attends only to itself
    empty = mf.class_attention_bias(torch.zeros(1, 4, 4), torch.float32)
    assert torch.isinf(empty[0, 0, 0, 1:]).all() and empty[0, 0, 0, 0] == 0


def test_g2l_one_block_against_direct_computation(tiny_clip):
    img, masks = _toy_inputs()
    size = 64
    gv = mf.global_views(img, masks, size)
    lv = mf.local_views(img, masks, size)
    gm = mf.grid_masks(masks, size // 16)
    with torch.no_grad():
        got = mf.hybrid_mask_features(tiny_clip, gv, lv, gm, mode="G2L", fusion_blocks=1)
        L = tiny_clip.num_layers
        xl = tiny_clip.run_blocks(tiny_clip.embed(lv), 0, L - 1)
        xg = tiny_clip.run_blocks(tiny_clip.embed(gv), 0, L - 1)
        m = gm.reshape(2, -1, 1)
        fused = xl + 2.0 * torch.cat([xg[:, :1], m * xg[:, 1:]], dim=1)
        out = tiny_clip.blocks[L - 1](fused)  # the open_clip block itself
        exp = tiny_clip.head(out[:, 0])
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=0)
        # L2G with one block: global stream = block(local + 2·global, class mask)
        got_l2g = mf.hybrid_mask_features(tiny_clip, gv, lv, gm, mode="L2G", fusion_blocks=1)
        heads = tiny_clip.block(L - 1).num_heads
        fm = mf.class_attention_bias(gm, torch.float32)[:, 0].repeat_interleave(heads, 0)
        out2 = tiny_clip.blocks[L - 1](xl + 2.0 * xg, attn_mask=fm)
        torch.testing.assert_close(got_l2g, tiny_clip.head(out2[:, 0]), atol=1e-5, rtol=0)
        # no fusion at all would differ
        plain = tiny_clip.head(tiny_clip.blocks[L - 1](xl)[:, 0])
        assert (plain - got).abs().max() > 1e-3


def test_feature_batches_and_modes(tiny_clip):
    img, masks = _toy_inputs()
    with torch.no_grad():
        a = mf.mask_features(tiny_clip, img, masks, size=64, batch_size=1)
        b = mf.mask_features(tiny_clip, img, masks, size=64, batch_size=8)
        c = mf.mask_features(tiny_clip, img, masks, size=64, mode="G2L&L2G")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert a.shape == (2, tiny_clip.embed_dim) and (a - c).abs().max() > 1e-4
    from zsdense.errors import ConfigError

    with pytest.raises(ConfigError):
        mf.mask_features(tiny_clip, img, masks, size=64, mode="X")
    with pytest.raises(ConfigError):
        mf.mask_features(tiny_clip, img, masks, size=70)


def test_boxes_xywh_like_sam():
    from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh

    _, masks = _toy_inputs()
    masks = np.concatenate([masks, np.zeros((1, 96, 128), bool)])
    ours = mf.masks_to_boxes_xywh(masks)
    xyxy = batched_mask_to_box(torch.as_tensor(masks))
    sam = torch.stack([box_xyxy_to_xywh(b) for b in xyxy]).numpy()
    assert np.array_equal(ours, sam)


# ---- the task on the tiny models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(1)
    img = np.full((96, 128, 3), 90, np.uint8)
    img[10:60, 8:60] = (220, 40, 40)
    img[30:90, 70:124] = (40, 60, 220)
    img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    return img


# the random tiny SAM's masks fail the preset's filters (a whole-image fallback): opened here so
# that real proposals are scored
OPEN_FILTERS = dict(pred_iou_thresh=-1e9, stability_score_thresh=-1e9)


def test_refer_reuses_proposals_and_features(tiny_seg, scene):
    ctx = tiny_seg.context(scene)
    sam = tiny_seg.sam("vit_b")
    calls0 = sam.encoder_calls
    q1, q2 = "the red box on the left", "the blue box on the right"
    r1 = tiny_seg.refer_batch([ctx], [q1], preset="hybridgl+", **OPEN_FILTERS)[0]
    r2 = tiny_seg.refer_batch([ctx], [q2], preset="hybridgl+", **OPEN_FILTERS)[0]
    assert sam.encoder_calls == calls0 + 1  # SAM encoded once for both queries
    assert all(v == 1 for v in ctx.computed.values()), dict(ctx.computed)
    for r in (r1, r2):
        assert r.mask.shape == scene.shape[:2] and r.mask.dtype == bool and r.mask.any()
        assert not r.fallback and r.meta["fallback"] is None and np.isfinite(r.score)
        assert r.meta["random_weights"] is True and r.meta["preset"] == "hybridgl+"
        assert 1 <= len(r.candidates) <= 3
        assert {"index", "box_xywh", "area", "score", "P", "R", "C"} <= set(r.candidates[0])
    assert r1.meta["relation"] == "left" and r2.meta["relation"] == "right"
    assert r2.meta["timing"]["sam_encoder"] < 0.05 and r2.meta["timing"]["clip_views"] < 0.05
    # the reference preset never fires "right"
    r3 = tiny_seg.refer_batch([ctx], [q2], preset="hybridgl", **OPEN_FILTERS)[0]
    assert r3.meta["relation"] == "none" and r3.meta["direction"] == "right"


def test_whole_image_fallback_is_flagged(tiny_seg, scene):
    # thresholds no mask can pass -> the whole image stands in, and says so: fallback True, no
    # score (NaN, not the 1.0 of a lone candidate), no candidates, the reason in meta
    ctx = tiny_seg.context(scene)
    for preset in ("hybridgl", "hybridgl+"):
        r = tiny_seg.refer_batch([ctx], ["the dog"], preset=preset, pred_iou_thresh=2.0)[0]
        assert r.fallback is True
        assert r.meta["fallback"] == "whole-image" and r.meta["proposals"] == 1
        assert "no mask" in r.meta["warning_fallback"]
        assert r.mask.all() and np.isnan(r.score) and r.candidates == []


def test_refine_option_and_bad_options(tiny_seg, scene):
    from zsdense.errors import ConfigError

    r = tiny_seg.refer(scene, "the red box", preset="hybridgl+", refine=True)
    assert isinstance(r.meta["refined"], bool) and r.mask.shape == scene.shape[:2]
    with pytest.raises(ConfigError):
        tiny_seg.refer(scene, "the red box", preset="nope")
    with pytest.raises(ConfigError):
        tiny_seg.refer(scene, "the red box", no_such_option=1)
    with pytest.raises(ConfigError):
        tiny_seg.refer(scene, "   ")


@pytest.mark.parametrize(
    "option, keyword, default, other",
    [
        ("proposal_stability", "stability", "image", "lowres"),
        ("proposal_decoder", "decoder", "auto", "arranged"),
    ],
)
def test_proposal_options_reach_the_generator(
    tiny_seg, scene, monkeypatch, option, keyword, default, other
):
    """``proposal_stability`` and ``proposal_decoder`` (preset fields, ``--proposal-stability``,
    ``--proposal-decoder``): validated up front, passed to the proposal generator, and part of
    the proposals' cache key."""
    from zsdense.errors import ConfigError
    from zsdense.models import sam_proposals as SP
    from zsdense.tasks import hybridgl

    seen = []

    def spy(*args, **kw):
        seen.append(kw.get(keyword))
        return SP.sam_proposals(*args, **kw)

    monkeypatch.setattr(hybridgl, "sam_proposals", spy)
    ctx = tiny_seg.context(scene)
    opened = dict(pred_iou_thresh=-1e9, stability_score_offset=0.02)
    a = tiny_seg.refer_batch([ctx], ["the red box"], **opened)[0]
    b = tiny_seg.refer_batch([ctx], ["the red box"], **{option: other}, **opened)[0]
    assert seen == [default, other]  # two settings: two proposal runs on one context
    assert a.meta["proposals"] >= 1 and b.meta["proposals"] >= 1
    with pytest.raises(ConfigError, match=option):
        tiny_seg.refer(scene, "the red box", **{option: "fast"})


def test_proposals_equal_segment_anything_generator(tiny_seg, scene):
    """Our point-grid loop over a bound predictor gives the same masks and boxes as
    ``SamAutomaticMaskGenerator`` (which re-encodes the image: allowed in a test only)."""
    from segment_anything import SamAutomaticMaskGenerator

    sam = tiny_seg.sam("vit_b")
    ctx = tiny_seg.context(scene)
    state = ctx.sam_state(sam)
    opts = {"pred_iou_thresh": -1e9, "stability_score_thresh": -1e9, "min_mask_region_area": 200}
    cfg = ReferOptions.from_mapping(preset="hybridgl", **opts).config()
    ours = R.sam_proposals(sam, state, cfg, points_per_side=2)
    gen = SamAutomaticMaskGenerator(
        sam.model,
        points_per_side=2,
        pred_iou_thresh=-1e9,
        stability_score_thresh=-1e9,
        box_nms_thresh=0.7,
        min_mask_region_area=200,
    )
    anns = gen.generate(scene)
    assert len(anns) == ours.masks.shape[0] >= 1
    theirs = {(tuple(int(v) for v in a["bbox"]), a["segmentation"].tobytes()) for a in anns}
    mine = {
        (tuple(int(v) for v in b), m.numpy().tobytes()) for b, m in zip(ours.boxes_xywh, ours.masks)
    }
    assert mine == theirs


def test_truncated_text_encoder_equals_open_clip(tiny_clip):
    tok = tiny_clip.tokenize(["the red cup on the left", "cup", "a photo of the table " * 5])
    with torch.no_grad():
        full = tiny_clip.model.encode_text(tok)
        ours = R.encode_text_raw(tiny_clip, tok)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=0)
    cache: dict = {}
    e = R.raw_text_embeddings(cache, tiny_clip, ["cup", "cup"])
    assert len(cache) == 1 and torch.equal(e[0], e[1])
