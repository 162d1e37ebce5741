"""Open-vocabulary core vs the reference fixtures in ../shared/fixtures/trident (README there).

Tolerances (README): 1e-5 for token/feature tensors, 1e-6 for W / attention / splices / prompts,
exact equality for integer outputs (window grids, pads, label maps, component masks).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from zsdense.config import openvocab_preset
from zsdense.dense import aggregation as ag
from zsdense.dense import lastblock as lb
from zsdense.dense import windows as W
from zsdense.models.clip import OPENAI_MEAN, OPENAI_STD, ClipModel
from zsdense.tasks import openvocab as ov

TOK = 1e-5
EXACT = 1e-6


def _load(fixtures_dir, name: str) -> dict:
    return torch.load(fixtures_dir("trident") / name, weights_only=True)


def _tiny_clip(state_dict) -> ClipModel:
    from open_clip.transformer import QuickGELU, VisionTransformer

    vt = VisionTransformer(
        image_size=64,
        patch_size=16,
        width=128,
        layers=4,
        heads=2,
        mlp_ratio=4.0,
        output_dim=64,
        act_layer=QuickGELU,
    ).eval()
    vt.load_state_dict(state_dict, strict=True)
    return ClipModel(model=types.SimpleNamespace(visual=vt), arch="fixture-tiny")


def _close(a, b, atol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"max |diff| {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def proxy(fixtures_dir):
    d = _load(fixtures_dir, "proxy_attn.pt")
    return d, _tiny_clip(d["state_dict"])


# ---- fixture 1: last-block variants ---------------------------------------------------------


def test_pos_embed_interp(proxy):
    d, clip = proxy
    _close(clip.pos_embed((7, 7), lb.POS_MODE), d["pos_embed_interp_7x7"], EXACT)
    _close(clip.pos_embed((7, 5), lb.POS_MODE), d["pos_embed_interp_7x5"], EXACT)


@pytest.mark.parametrize("name", ["dino_b8_14x14", "same_grid_7x7", "dinov2_b14_8x8"])
def test_proxyclip_last_block(proxy, name):
    d, clip = proxy
    ref, feats = d["proxyclip"][name], d["vfm_feats"][name]
    with torch.no_grad():
        x, grid = lb.clip_last_block_input(clip, d["image_112x112"])
        _close(x[0], ref["x_last_block_in_LND"][:, 0], TOK)
        _close(lb.proxy_attention(feats, d["beta"], d["gamma"])[0], ref["attn"], EXACT)
        t = lb.proxy_clip_tokens(clip, d["image_112x112"], feats, beta=d["beta"], gamma=d["gamma"])
        _close(t[0], ref["tokens_pre_ln_post"], TOK)
        _close(clip.head(t[0]), ref["tokens"], TOK)
        _close(F.normalize(clip.head(t[0]), dim=-1), ref["tokens_normalized"], TOK)
        _close(t[0], d["trident_custom_attn"][name]["tokens_pre_ln_post"], TOK)


def test_trident_batch_mean_vs_window_mean(proxy):
    d, clip = proxy
    imgs = torch.cat([d["image_112x112"], d["image_112x112_b"]])
    feats = torch.cat([d["vfm_feats"]["dino_b8_14x14"], d["vfm_feats_b_14x14"]])
    with torch.no_grad():
        tb = lb.proxy_clip_tokens(clip, imgs, feats, mean_scope="batch")
        tw = lb.proxy_clip_tokens(clip, imgs, feats, mean_scope="window")
    tri = d["trident_custom_attn"]
    _close(tb, tri["batch2_dino_b8_14x14"]["tokens_pre_ln_post"], TOK)
    b2 = tri["batch2_dino_b8_14x14"]
    _close(F.normalize(clip.head(tb), dim=-1), b2["tokens_normalized"], TOK)
    _close(tw[1], tri["single_b_dino_b8_14x14"]["tokens_pre_ln_post"], TOK)


def test_proxyclip_nonsquare_does_not_reproduce_reference_bug(proxy):
    d, clip = proxy
    with torch.no_grad():
        t = lb.proxy_clip_tokens(clip, d["image_112x80"], d["vfm_feats_112x80_14x10"])
    assert t.shape[1] == 140
    bug = d["proxyclip_nonsquare_REFERENCE_BUG"]["tokens_pre_ln_post"]
    assert (t[0] - bug).abs().max() > 0.05  # the reference swaps H/W; we use the true grid


@pytest.mark.parametrize("key,img", [("112x112", "image_112x112"), ("112x80", "image_112x80")])
@pytest.mark.parametrize("variant", ["sclip", "clearclip", "naclip"])
def test_clip_only_baselines(proxy, key, img, variant):
    d, clip = proxy
    with torch.no_grad():
        f = lb.dense_clip_features(clip, d[img], variant)
    _close(f.flatten(2)[0].T, d["baselines"][key][variant], TOK)


def test_naclip_omega(proxy):
    d, _ = proxy
    _close(lb.naclip_omega((7, 7)), d["baselines"]["naclip_omega_7x7"], EXACT)
    _close(lb.naclip_omega((7, 5)), d["baselines"]["naclip_omega_7x5"], EXACT)


# ---- fixture 2: windows ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def windows_fx(fixtures_dir):
    return _load(fixtures_dir, "windows.pt")


def test_trident_resize_rule(windows_fx):
    for e in windows_fx["preprocess_image"]:
        got = W.trident_resize_hw(e["in_hw"], 16, 336, upscale_small=False)
        assert list(got) == e["out_hw"], e
    # the fix: sides that are multiples of 16 but below the crop are raised to it
    assert W.trident_resize_hw((240, 320), 16, 336) == (336, 336)
    ex = windows_fx["preprocess_image_example"]
    _close(W.trident_resize(ex["input"]), ex["output"], EXACT)


def test_pad_56(windows_fx):
    for e in windows_fx["compute_padsize_56"]:
        assert list(W.pad_amounts(e["hw"])) == e["pad_lrtb"], e


def test_window_grids(windows_fx):
    for e in windows_fx["get_windowed_imgs"]:
        wb = W.make_windows(torch.zeros(1, 3, *e["img_hw"]), 336, e["stride"])
        assert list(wb.counts) == e["win_sizes"]
        assert torch.equal(wb.patch_locs(16), e["patch_locs"]), e["img_hw"]
        assert torch.equal(torch.tensor([wb.pads] * len(wb.boxes)), e["paddings_lrtb"])
        assert list(wb.images.shape) == e["batched_shape"]
        if "image" in e:
            wb = W.make_windows(e["image"], 336, e["stride"])
            assert torch.equal(wb.images, e["batched"])


def test_token_splice(windows_fx):
    for name, e in windows_fx["splice"].items():
        H, Wd = e["img_hw"]
        canvas = W.splice_tokens(e["window_tokens"], e["patch_locs"], (H // 16, Wd // 16))
        _close(canvas, e["canvas"], EXACT)
        assert W.splice_ratio(e["window_tokens"].shape[-2:], (21, 21))[0] == e["ratio"], name


def test_proxyclip_logit_splice(windows_fx):
    for _name, e in windows_fx["proxyclip_forward_slide"].items():
        boxes = W.window_boxes(e["img_hw"], e["crop"], e["stride"])
        y1, x1, y2, x2 = boxes[0]
        pads = W.pad_amounts((y2 - y1, x2 - x1))
        assert [[y2 - y1 + pads[2] + pads[3], x2 - x1 + pads[0] + pads[1]]] * len(boxes) == [
            list(p) for p in e["padded_window_hw"]
        ]
        out = W.splice_logits(e["window_grid_logits"], boxes, pads, e["img_hw"])
        out = F.interpolate(out[None], size=e["ori_shape"], mode="bilinear", align_corners=False)
        _close(out[0], e["output"], EXACT)


# ---- fixture 3: SAM aggregation -------------------------------------------------------------


@pytest.fixture(scope="module")
def agg_fx(fixtures_dir):
    d = _load(fixtures_dir, "sam_aggregation.pt")
    return d, _tiny_clip(d["state_dict"])


def test_sam_aggregation_all_cases(agg_fx):
    d, clip = agg_fx
    n_checked = 0
    with torch.no_grad():
        for _name, c in d["cases"].items():
            h, w = c["sam_v"].shape[1:3]
            toks = ag.canvas_to_grid(c["canvas"], (h, w))
            for _k, r in c["results"].items():
                for chunk in (None, 13):
                    out, Wm = ag.sam_aggregation(
                        toks,
                        c["sam_attn"],
                        c["sam_v"],
                        cos_fac=r["cos_fac"],
                        refine_neg_cos=r["refine_neg_cos"],
                        chunk_rows=chunk,
                        return_weights=True,
                    )
                    _close(Wm, r["W"], EXACT)
                    _close(out, r["aggregated_pre_ln_post"], TOK)
                    t = clip.head(out)
                    _close(t, r["tokens"], TOK)
                    _close(F.normalize(t, dim=-1), r["tokens_normalized"], TOK)
                    n_checked += 1
    assert n_checked == 4 * 6 * 2


def test_sam_aggregation_cityscapes_strips(agg_fx):
    d, _ = agg_fx
    c = d["cityscapes_two_halves"]
    parts = [(c["sam_attn"][i], c["sam_v"][i], None) for i in range(2)]
    out, grid = ag.aggregate_canvas(
        c["canvas"], parts, cos_fac=c["cos_fac"], refine_neg_cos=c["refine_neg_cos"]
    )
    assert list(grid) == c["out_grid"]
    _close(out, c["aggregated_pre_ln_post"], TOK)


def test_sam_crop(agg_fx):
    d, _ = agg_fx
    for e in d["sam_crop"]:
        valid = ag.sam_valid_hw(e["sam_input_size"])
        assert list(valid) == e["valid_hw"]
        idx = ag.valid_token_index(valid, (64, 64))
        assert torch.equal(idx, e["kept_token_index"])
        assert torch.equal(idx, e["kept_v_index"])


# ---- fixture 4: refinement ------------------------------------------------------------------


@pytest.fixture(scope="module")
def refine_fx(fixtures_dir):
    return _load(fixtures_dir, "refine.pt")


class _Classifier:
    def __init__(self, query_class, k):
        from zsdense.text.classifier import TextClassifier

        self.clf = TextClassifier(
            torch.zeros(len(query_class), 1),
            query_class,
            tuple((f"c{i}", (f"c{i}",)) for i in range(k)),
        )


@pytest.mark.parametrize("scenario", ["A_cls2_fails", "B_cls1_partial", "C_coarse0"])
def test_refinement_with_stub_sam(refine_fx, scenario):
    d = refine_fx
    s = d["scenarios"][scenario]
    clf = _Classifier(d["query_idx"], d["num_classes"]).clf
    probs, labels = ov.coarse_decision(clf, d["cos_logits"][0], d["logit_scale"], s["prob_thd"])
    _close(probs, s["coarse_probs"], EXACT)
    assert torch.equal(labels, s["coarse_pred"][0])

    ph, lh = ov.half_res_inputs(probs, labels, s["coarse_thresh"])
    _close(ph, s["split_inputs"]["probs_half"], EXACT)
    onehot = s["split_inputs"]["onehot"]
    for c in range(onehot.shape[0]):
        want = onehot[c] > 0
        got = (lh == c) if c < d["num_classes"] else (lh == -1)
        assert torch.equal(got, want), c

    prompts = ov.component_prompts(ph, lh, s["coarse_thresh"], d["minimal_area"])
    assert [p.cls for p in prompts] == s["sam_call_classes"]
    for p in prompts:
        ref = s["components"][p.cls]
        assert torch.equal(p.masks, ref["masks"].bool())
        _close(p.boxes_xyxy, ref["boxes_xyxy_halfres"], 0)
        assert torch.equal(p.points_xy, ref["points_xy_halfres"])
        _close(p.mean_prob, ref["mean_prob"], EXACT)

    calls = iter(s["sam_calls"])
    seen = []

    def stub(point_coords, point_labels, boxes, mask_input):
        call = next(calls)
        _close(point_coords, call["point_coords"], EXACT)
        _close(point_labels, call["point_labels"], 0)
        _close(boxes, call["boxes"], EXACT)
        assert list(mask_input.shape) == call["mask_input_shape"]
        _close(mask_input, call["mask_input"], EXACT)
        seen.append(1)
        return call["low_res_logits"], call["iou_predictions"]

    out = ov.sam_refine(
        probs,
        labels,
        stub,
        input_size=tuple(d["sam_input_size"]),
        sam_original_size=tuple(d["sam_image_hw"]),
        coarse_thresh=s["coarse_thresh"],
        min_area=d["minimal_area"],
        iou_thresh=d["sam_iou_thresh"],
        mask_coef=d["sam_mask_coff"],
        reference_prompts=True,
    )
    assert len(seen) == len(s["sam_calls"])
    assert torch.equal(out.labels, s["refined_pred"][0])
    _close(out.probs, s["refined_logits"], EXACT)
    _close(out.kept_boxes_xyxy, s["combined_boxes_fullres"], 0)


def test_sam_mask_postprocess(refine_fx):
    d = refine_fx
    for call in d["scenarios"]["A_cls2_fails"]["sam_calls"]:
        m = ov.postprocess_low_res(
            call["low_res_logits"],
            tuple(d["sam_input_size"]),
            tuple(d["sam_image_hw"]),
            tuple(d["sam_image_hw"]),
        )
        assert torch.equal(m > 0, call["masks"][:, 0])


def test_tiny_sam_decoder_3d_dense_prompt(refine_fx):
    """The real SamPredictor with Trident's 3-D dense prompt reproduces the reference; the
    (B,1,256,256) form gives the 'batched4d' numbers."""
    from segment_anything import SamPredictor
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    t = refine_fx["tiny_sam_decoder"]
    enc = torch.nn.Module()
    enc.img_size = 1024
    sam = Sam(
        image_encoder=enc,
        prompt_encoder=PromptEncoder(
            embed_dim=32,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
    ).eval()
    sam.load_state_dict(t["state_dict"], strict=False)
    pred = SamPredictor(sam)
    pred.features = t["features"]
    pred.original_size = tuple(t["original_size"])
    pred.input_size = tuple(t["input_size"])
    pred.is_image_set = True
    call = refine_fx["scenarios"]["A_cls2_fails"]["sam_calls"][1]
    decode = ov.predictor_decoder(pred)
    k = call["boxes"].shape[0]
    with torch.no_grad():
        low, iou = decode(
            call["point_coords"], call["point_labels"], call["boxes"], call["mask_input"]
        )
        # logits of magnitude ~10: compare relatively
        torch.testing.assert_close(low, t["ref"]["low_res_logits"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(iou, t["ref"]["iou_predictions"], rtol=1e-4, atol=1e-5)
        low4, iou4 = decode(
            call["point_coords"],
            call["point_labels"],
            call["boxes"],
            call["mask_input"][None].expand(k, 1, -1, -1),
        )
        torch.testing.assert_close(low4, t["batched4d"]["low_res_logits"], rtol=1e-4, atol=1e-4)
        assert (low4 - low).abs().max() > 0.1  # the 3-D form really differs


# ---- extra: Trident end to end --------------------------------------------------------------


def test_trident_end_to_end(fixtures_dir):
    d = _load(fixtures_dir, "trident_e2e.pt")
    clip = _tiny_clip(d["state_dict"])
    sd = d["vfm_state_dict"]
    conv = torch.nn.Conv2d(3, 96, 16, 16)
    conv.load_state_dict({"weight": sd["proj.weight"], "bias": sd["proj.bias"]})
    norm = torch.nn.LayerNorm(96)
    norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
    cm, cs = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    im = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
    istd = torch.tensor((0.229, 0.224, 0.225))[:, None, None]

    def vfm(x):
        f = conv(((x * cs + cm) - im) / istd)
        return norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    attn = torch.softmax(d["sam_q"] @ d["sam_k"].transpose(1, 2) / 8**0.5, dim=-1)
    valid = ag.sam_valid_hw(d["sam_input_size"])
    parts = [(attn, d["sam_last_v"], valid)]
    with torch.no_grad():
        for _k, c in d["cases"].items():
            cfg = openvocab_preset(
                "trident",
                cos_fac=c["cos_fac"],
                refine_neg_cos=c["refine_neg_cos"],
                crop=d["slide_crop"],
                stride=d["slide_stride"],
                chunk_rows=500,
            )
            maps, wb, hw = ov.trident_window_tokens(clip, vfm, d["src_img"], cfg)
            assert hw == (368, 480) and len(wb.boxes) == 4
            _close(maps.flatten(2).permute(2, 0, 1), c["custom_attn_tokens_LBD"], TOK)
            feats, grid = ov.trident_features(clip, vfm, d["src_img"], parts, cfg)
            assert grid == (48, 64)
            low = (feats @ d["query_features"].T).T.reshape(-1, *grid)
            out = F.interpolate(low[None], size=d["orig_hw"], mode="bilinear", align_corners=False)[
                0
            ]
            _close(out, c["logits"], TOK)
