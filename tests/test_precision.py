"""Reduced precision: bf16 weights + autocast run every head and stay close to fp32, per preset
within the tolerance the README documents (the ``TOL`` table below)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zsdense.api import Segmenter


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.random((64, 80, 3), dtype=np.float32)


def test_bf16_casts_encoder_weights_and_keeps_fp32_cache_apart():
    s32 = Segmenter(device="cpu", models="tiny", precision="fp32")
    s16 = Segmenter(device="cpu", models="tiny", precision="bf16")
    c32, c16 = s32.clip("ViT-B-16"), s16.clip("ViT-B-16")
    assert c32 is not c16
    assert c32.dtype == torch.float32 and c16.dtype == torch.bfloat16
    sam16 = s16.sam("vit_b")
    assert sam16.model.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert sam16.model.mask_decoder.iou_prediction_head.layers[0].weight.dtype == torch.float32
    state = sam16.encode(np.zeros((32, 32, 3), np.uint8), capture_last_attn=True)
    assert state.embedding.dtype == torch.float32 and state.last_v.dtype == torch.float32
    assert state.last_attn.dtype == torch.bfloat16  # kept as computed (read a chunk at a time)


def test_bf16_anomaly_and_openvocab_close_to_fp32(image):
    s32 = Segmenter(device="cpu", models="tiny", precision="fp32")
    s16 = Segmenter(device="cpu", models="tiny", precision="bf16")
    a32, a16 = s32.anomaly(image, preset="crane"), s16.anomaly(image, preset="crane")
    assert a16.anomaly_map.dtype == np.float32
    assert np.abs(a32.anomaly_map - a16.anomaly_map).max() < 5e-3
    assert abs(a32.score - a16.score) < 5e-3
    classes = ["cat", "sofa", "background"]
    o32 = s32.open_vocab(image, classes=classes, preset="sclip")
    o16 = s16.open_vocab(image, classes=classes, preset="sclip")
    assert o16.probs.dtype == np.float32
    assert np.abs(o32.probs - o16.probs).max() < 0.1
    assert (o32.labels == o16.labels).mean() > 0.8


# ---- per preset: the documented bf16 tolerance (README "Devices and precision") -------------
# Measured on the tiny models (CPU, bf16 weights + autocast against fp32) and asserted with
# about 2-3x headroom: L2-normalised dense tokens (max |d|), maps / probabilities (max |d|),
# image scores (|d|), label agreement (fraction of pixels).
TOL = {
    "dense_tokens": 0.015,
    "anomaly_map": 5e-3,
    "anomaly_score": 5e-3,
    "openvocab_probs": 0.08,
    "openvocab_labels": 0.85,
    "refer_scores": 0.05,
    # few-shot (kNN in bf16, refined in float32): relative to the map's maximum / the score
    "fewshot_map_rel": 0.02,
    "fewshot_score_rel": 0.01,
    # SAM proposals from the bf16 decoder (same image embedding): predicted IoUs, and the
    # fraction of pixels on which a proposal's mask agrees with float32's (mean and median over
    # the proposals; random tiny SAM: the previous bf16 path, float32 decoder weights under
    # autocast, measured 0.951 / 0.9956 there)
    "proposal_iou_pred": 0.01,
    "proposal_pixels_mean": 0.92,
    "proposal_pixels_median": 0.99,
}


@pytest.fixture(scope="module")
def segs():
    return (
        Segmenter(device="cpu", models="tiny", precision="fp32"),
        Segmenter(device="cpu", models="tiny", precision="bf16"),
    )


@pytest.mark.parametrize("variant", ["sclip", "clearclip", "naclip"])
def test_bf16_dense_tokens_per_variant(segs, image, variant):
    import torch.nn.functional as F

    from zsdense.dense.lastblock import dense_clip_features
    from zsdense.models.clip import preprocess_images

    out = []
    for s in segs:
        c = s.clip("ViT-B-16")
        x = preprocess_images([image], size=(224, 224), device=c.device)
        with s.autocast():
            f = dense_clip_features(c, c.normalize(x), variant)[0]
        out.append(F.normalize(f.float(), dim=0))
    assert (out[0] - out[1]).abs().max() < TOL["dense_tokens"]
    assert not torch.equal(out[0], out[1])  # bf16 really ran


@pytest.mark.parametrize("preset", ["crane", "crane+"])
def test_bf16_anomaly_per_preset(segs, image, preset):
    a, b = (s.anomaly(image, preset=preset) for s in segs)
    assert np.abs(a.anomaly_map - b.anomaly_map).max() < TOL["anomaly_map"]
    assert abs(a.score - b.score) < TOL["anomaly_score"]


def test_bf16_musc(segs):
    """Five different images: maps within the map tolerance; the image score is the map max
    min-max normalised over the set, so it is compared against the set's spread."""
    rng = np.random.default_rng(5)
    imgs = [rng.random((64, 80, 3), dtype=np.float32) for _ in range(5)]
    a, b = (s.anomaly_batch(imgs, preset="musc") for s in segs)
    for x, y in zip(a, b):
        assert np.abs(x.anomaly_map - y.anomaly_map).max() < TOL["anomaly_map"]
    raw_a = np.array([x.anomaly_map.max() for x in a])
    raw_b = np.array([y.anomaly_map.max() for y in b])
    assert np.abs(raw_a - raw_b).max() < TOL["anomaly_score"]


@pytest.mark.parametrize(
    "preset",
    ["proxyclip", "sclip", "clearclip", "naclip", pytest.param("trident", marks=pytest.mark.slow)],
)
def test_bf16_openvocab_per_preset(segs, image, preset):
    classes = ["cat", "sofa", "background"]
    a, b = (s.open_vocab(image, classes=classes, preset=preset) for s in segs)
    assert b.probs.dtype == np.float32
    assert np.abs(a.probs - b.probs).max() < TOL["openvocab_probs"]
    assert (a.labels == b.labels).mean() > TOL["openvocab_labels"]


@pytest.mark.parametrize("preset", ["hybridgl", "hybridgl+"])
def test_bf16_refer_per_preset(segs, image, preset):
    """Proposals come from SAM's fp32 decoder over a bf16 encoder: the candidates' scores stay
    within the tolerance for the masks both runs share. The IoU / stability filters are opened
    so that real SAM masks (not the whole-image fallback) are scored on the random tiny SAM."""
    opened = dict(pred_iou_thresh=-1e9, stability_score_thresh=-1e9)
    a, b = (s.refer(image, "the cat on the left", preset=preset, **opened) for s in segs)
    assert not a.meta["fallback"] and not b.meta["fallback"]
    assert abs(a.score - b.score) < TOL["refer_scores"]
    cb = {repr(c["box_xywh"]): c for c in b.candidates}
    shared = [(c, cb[repr(c["box_xywh"])]) for c in a.candidates if repr(c["box_xywh"]) in cb]
    assert shared
    for x, y in shared:
        for key in ("P", "C"):
            assert abs(x[key] - y[key]) < TOL["refer_scores"], key


def test_bf16_fewshot_anomalydino(segs, image):
    """AnomalyDINO: DINOv2 in bf16 and its nearest-neighbour search in bf16 (the bank's bf16
    copy; distances of the chosen neighbours refined in float32)."""
    rng = np.random.default_rng(3)

    def u8(a):
        return (np.round(np.clip(a, 0, 1) * 255) / 255).astype(np.float32)

    refs = [u8(image + 0.05 * rng.standard_normal(image.shape)) for _ in range(3)]
    tests = [u8(image), u8(image + 0.3 * (rng.random(image.shape) > 0.97))]
    a, b = (s.anomaly_batch(tests, preset="anomalydino", reference=refs) for s in segs)
    for x, y in zip(a, b):
        assert y.anomaly_map.dtype == np.float32
        top = float(np.abs(x.anomaly_map).max())
        assert np.abs(x.anomaly_map - y.anomaly_map).max() < TOL["fewshot_map_rel"] * top
        assert abs(x.score - y.score) < TOL["fewshot_score_rel"] * abs(x.score)


def test_bf16_sam_proposals_from_the_bf16_decoder(segs):
    """hybridgl+'s proposals: the same float32 image embedding decoded by SAM's float32
    decoder and by the bf16 one (random tiny SAM: its logits are noise around the threshold,
    the hardest case for agreement)."""
    from dataclasses import replace

    from zsdense.config import REFER_PRESETS, with_overrides

    cfg = with_overrides(
        REFER_PRESETS["hybridgl+"], pred_iou_thresh=-1e9, stability_score_thresh=-1e9
    )
    rng = np.random.default_rng(0)
    img = (np.kron(rng.random((6, 8, 3)), np.ones((16, 16, 1))) * 255).astype(np.uint8)
    s32, s16 = (s.sam("vit_b") for s in segs)
    st = s32.encode(img)
    every = dict(box_nms_thresh=1.0, min_mask_region_area=0)
    with segs[0].autocast():
        a = s32.proposals(st, cfg, **every)
    with segs[1].autocast():
        b = s16.proposals(replace(st), cfg, **every)
    assert a.masks.shape == b.masks.shape and a.masks.shape[0] > 1
    assert (a.iou_preds - b.iou_preds).abs().max() < TOL["proposal_iou_pred"]
    agree = (a.masks == b.masks).flatten(1).float().mean(dim=1)
    assert agree.mean() > TOL["proposal_pixels_mean"]
    assert agree.median() > TOL["proposal_pixels_median"]
    assert not torch.equal(a.iou_preds, b.iou_preds)  # bf16 really ran
