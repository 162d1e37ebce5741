"""Full-size architectures (random weights) through every head: ``pytest -m slow``.

These check that the real model shapes (ViT-L/14-336 at 518, ViT-B/16 windows, DINOv2-reg-base,
SAM ViT-B with its 64x64 grid) run end to end; the tiny models cover the numbers. Minutes on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seg():
    from zsdense import models
    from zsdense.api import Segmenter

    yield Segmenter(device="cpu", models="random", precision="fp32")
    models.clear_cache()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).random((120, 160, 3), dtype=np.float32)


def test_crane_plus_full_size(seg, image):
    r = seg.anomaly(image, preset="crane+", prompts="ensemble")
    assert r.anomaly_map.shape == (120, 160) and np.isfinite(r.anomaly_map).all()
    assert 0.0 <= r.score <= 1.0 and r.meta["random_weights"] is True


def test_trident_full_size_encodes_sam_once(seg, image):
    sam = seg.sam("vit_b")
    before = sam.encoder_calls
    r = seg.open_vocab(
        image, classes=["cat", "sofa", "background"], preset="trident", sam_refine=True
    )
    assert r.labels.shape == (120, 160) and r.probs.shape == (3, 120, 160)
    assert sam.encoder_calls - before == 1


def test_hybridgl_full_size(seg, image):
    r = seg.refer(image, "the object on the left")
    assert r.mask.shape == (120, 160) and r.mask.dtype == bool and np.isfinite(r.score)
