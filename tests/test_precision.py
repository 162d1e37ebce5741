"""Reduced precision: bf16 weights + autocast run every head and stay close to fp32."""

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
    assert state.embedding.dtype == torch.float32 and state.last_attn.dtype == torch.float32


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
