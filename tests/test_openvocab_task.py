"""Open-vocabulary task: classifier, presets, run_open_vocab with tiny models, upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsdense.config import OPENVOCAB_PRESETS, openvocab_preset
from zsdense.dense.upsample import pamr, upsample_scores
from zsdense.errors import ConfigError
from zsdense.tasks import openvocab as ov
from zsdense.text import classifier as tc

CLASSES = "background: sky; wall, cat, sofa; couch"


@pytest.fixture(scope="module")
def shared_ctx(tiny_seg, image):
    """One context for the preset runs: SAM and the dense features are computed once."""
    return tiny_seg.context(image)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    img = np.zeros((90, 120, 3), dtype=np.float32)
    img[:, :60] = (0.2, 0.4, 0.8)
    img[:, 60:] = (0.9, 0.6, 0.1)
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    return np.clip(np.round(img * 255) / 255, 0, 1).astype(np.float32)


# ---- classes --------------------------------------------------------------------------------


def test_parse_classes_syntax():
    got = tc.parse_classes("sky; cloud, cat , sofa;couch")
    assert got == [("sky", ("sky", "cloud")), ("cat", ("cat",)), ("sofa", ("sofa", "couch"))]
    assert tc.parse_classes(CLASSES)[0] == ("background", ("sky", "wall"))
    assert tc.parse_classes(["a; b", ["c", "d"]]) == [("a", ("a", "b")), ("c", ("c", "d"))]
    with pytest.raises(ConfigError):
        tc.parse_classes(" , ;")


def test_shipped_class_files():
    want = {
        "voc21": 21,
        "voc20": 20,
        "context60": 60,
        "context59": 59,
        "coco-object": 81,
        "coco-stuff": 171,
        "cityscapes": 19,
        "ade20k": 150,
    }
    for name, n in want.items():
        classes = tc.load_class_file(name)
        assert len(classes) == n, name
        if name in ("voc21", "context60", "coco-object"):
            assert classes[0][0] == "background" and len(classes[0][1]) > 10
    assert tc.load_class_file("voc21")[1] == ("aeroplane", ("aeroplane",))
    with pytest.raises(ConfigError, match="shipped lists"):
        tc.load_class_file("no-such-list")


def test_class_file_from_path(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# comment\nroad; street\n\ncar\n", encoding="utf-8")
    assert tc.load_class_file(f) == [("road", ("road", "street")), ("car", ("car",))]


def test_templates_are_openai_80():
    assert len(tc.openai_templates()) == 80


def test_classifier_synonym_max_and_cache(tiny_seg):
    clip = tiny_seg.clip("ViT-B-16")
    cache: dict = {}
    clf = tc.build_classifier(clip, tc.parse_classes(CLASSES), cache=cache)
    assert clf.weights.shape == (5, clip.embed_dim)  # sky, wall | cat | sofa, couch
    assert clf.query_class.tolist() == [0, 0, 1, 2, 2]
    assert torch.allclose(clf.weights.norm(dim=-1), torch.ones(5), atol=1e-5)
    # template average: mean of the normalised template embeddings, normalised again
    texts = [t("cat") for t in tc.openai_templates()]
    ref = F.normalize(clip.encode_text(texts).mean(0), dim=-1)
    assert torch.allclose(clf.weights[2], ref, atol=1e-5)
    assert tc.build_classifier(clip, tc.parse_classes(CLASSES), cache=cache) is clf
    cos = torch.randn(5, 5, 6)
    p = clf.class_probs(cos, 40.0)
    sm = torch.softmax(40 * cos, 0)
    assert torch.allclose(p[0], torch.maximum(sm[0], sm[1]))
    assert torch.allclose(p[1], sm[2])
    assert torch.allclose(p[2], torch.maximum(sm[3], sm[4]))


# ---- presets --------------------------------------------------------------------------------


def test_dataset_presets():
    c = openvocab_preset("trident", "cityscapes")
    assert (c.short_side, c.stride, c.cos_fac, c.refine_neg_cos, c.sam_strips) == (
        688,
        224,
        3.0,
        False,
        2,
    )
    c = openvocab_preset("trident", "voc20")
    assert (c.short_side, c.stride, c.prob_thd, c.coarse_thresh, c.cos_fac) == (
        336,
        112,
        0.0,
        0.2,
        0.0,
    )
    assert openvocab_preset("trident", "ade20k").refine_neg_cos is False
    assert openvocab_preset("proxyclip", "cityscapes").crop == 224
    assert openvocab_preset("sclip", "voc21").logit_scale == 65.0
    assert openvocab_preset("naclip", "voc21").whole_image is True
    assert openvocab_preset("trident-fixed").reference_prompts is False
    with pytest.raises(ConfigError):
        openvocab_preset("trident", "kitti")
    with pytest.raises(ConfigError):
        openvocab_preset("nope")
    with pytest.raises(ConfigError):
        openvocab_preset("trident", typo_option=1)


def test_mmseg_resize():
    assert ov.mmseg_resize_hw((375, 500), 336) == (336, 448)
    assert ov.mmseg_resize_hw((100, 3000), 336) == (68, 2048)  # long side capped at 2048


# ---- end to end with tiny models ------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(OPENVOCAB_PRESETS))
def test_run_open_vocab_every_preset(tiny_seg, shared_ctx, preset):
    r = tiny_seg.open_vocab(shared_ctx, classes=CLASSES, preset=preset, short_side=112)
    assert r.labels.shape == (90, 120) and r.labels.dtype == np.int64
    assert r.probs.shape == (3, 90, 120) and r.probs.dtype == np.float32
    assert r.class_names == ["background", "cat", "sofa"]
    assert np.all((r.probs >= 0) & (r.probs <= 1))
    cfg = openvocab_preset(preset)
    want = r.probs.argmax(0)
    want[r.probs.max(0) < cfg.prob_thd] = 0
    assert np.array_equal(r.labels, want)
    assert r.meta["random_weights"] is True and r.meta["preset"] == preset
    assert abs(sum(r.meta["areas"].values()) - 1.0) < 1e-9


def test_trident_sam_once_per_image_with_refine(tiny_seg, image):
    sam = tiny_seg.sam("vit_b")
    ctx = tiny_seg.context(image)
    before = sam.encoder_calls
    r = ov.run_open_vocab(
        tiny_seg,
        [ctx],
        classes=CLASSES,
        preset="trident",
        sam_refine=True,
        coarse_thresh=0.0,
        min_area=1,
        short_side=112,
    )
    assert sam.encoder_calls - before == 1
    assert r[0].meta["sam_prompts"] >= 1
    # same image, another class list: no encoder runs again (dense features cached per image)
    r2 = ov.run_open_vocab(tiny_seg, [ctx], classes="a, b", preset="trident", short_side=112)
    assert sam.encoder_calls - before == 1
    assert r2[0].probs.shape[0] == 2
    assert max(ctx.computed.values()) == 1


def test_sam_refine_only_with_trident(tiny_seg, image):
    with pytest.raises(ConfigError):
        tiny_seg.open_vocab(image, classes=CLASSES, preset="sclip", sam_refine=True)


def test_text_cache_on_segmenter(tiny_seg, image):
    tiny_seg.open_vocab(image, classes="x, y", preset="sclip", short_side=64)
    n = len(tiny_seg.text_cache)
    tiny_seg.open_vocab(image, classes="x, y", preset="clearclip", short_side=64)
    assert len(tiny_seg.text_cache) == n


# ---- upsampling -----------------------------------------------------------------------------


def test_upsample_bilinear_and_jbu():
    s = torch.rand(2, 4, 5)
    out = upsample_scores(s, (16, 20))
    assert torch.allclose(
        out, F.interpolate(s[None], (16, 20), mode="bilinear", align_corners=False)[0]
    )
    guide = torch.zeros(16, 20, 3)
    guide[:, 10:] = 1.0
    const = torch.full((2, 4, 5), 0.3)
    assert torch.allclose(
        upsample_scores(const, (16, 20), "jbu", guide_hwc=guide),
        torch.full((2, 16, 20), 0.3),
        atol=1e-6,
    )
    # a step in the scores aligned with the guide's edge stays sharper than bilinear
    step = torch.zeros(1, 4, 5)
    step[:, :, 3:] = 1.0  # low-res columns 3,4 = image columns 12..19 (approx. the edge at 10)
    guide2 = torch.zeros(16, 20, 3)
    guide2[:, 12:] = 1.0
    j = upsample_scores(step, (16, 20), "jbu", guide_hwc=guide2, sigma_range=0.1)
    b = upsample_scores(step, (16, 20))
    assert float(j[0, :, 11].max()) < 0.01 < 0.3 < float(b[0, :, 11].min())  # bilinear: 0.375
    with pytest.raises(ConfigError):
        upsample_scores(s, (8, 8), "jbu")


def test_pamr_keeps_constant_and_smooths_within_regions():
    img = torch.zeros(1, 3, 32, 32)
    img[..., 16:] = 1.0
    const = torch.full((1, 2, 32, 32), 0.25)
    assert torch.allclose(pamr(img, const, num_iter=3, dilations=(1, 2)), const, atol=1e-6)
    m = torch.rand(1, 1, 32, 32)
    out = pamr(img, m, num_iter=10, dilations=(1, 2))
    assert out[..., :16].std() < m[..., :16].std()


def test_trident_cityscapes_two_sam_strips(tiny_seg, shared_ctx):
    from zsdense.dense.aggregation import sam_valid_hw

    r = tiny_seg.open_vocab(
        shared_ctx, classes=CLASSES, preset="trident", dataset="cityscapes", short_side=112
    )
    assert r.labels.shape == (90, 120)
    # each half (90 x 60) is encoded by SAM on its own: grid = h x (w_left + w_right)
    sam = tiny_seg.sam("vit_b")
    halves = [shared_ctx.cache[("sam-strip", sam.arch, 2, i)] for i in range(2)]
    grids = [sam_valid_hw(st.input_size) for st in halves]
    assert r.meta["sam_grid"] == [grids[0][0], grids[0][1] + grids[1][1]]
