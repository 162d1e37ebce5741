"""Few-shot scoring through the Segmenter (tiny DINOv2) on a synthetic inspection set, the
reference's per-dataset settings, decisions, and the crane+fewshot fusion rule."""

from __future__ import annotations

import numpy as np
import pytest

from zsdense.errors import ConfigError
from zsdense.tasks import fewshot as fs

SIZE = 112  # 8x8 patch grid at image_size 112


def _texture(seed: int, size: int = SIZE) -> np.ndarray:
    """A periodic textured 'good part' (period 7/14 px, so patches repeat) with sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.2 * np.sin(2 * np.pi * x / 7) * np.cos(2 * np.pi * y / 14)
    img = np.stack([base, 0.9 * base + 0.05, 0.8 * base + 0.1], -1)
    img = img + rng.normal(0, 0.01, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic():
    """3 good parts; test parts: clean, a dark blob, a bright diagonal scratch (with masks)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    goods = [_texture(s) for s in range(3)]
    clean = _texture(10)
    blob_m = (yy - 40) ** 2 + (xx - 70) ** 2 < 100
    blob = _texture(11)
    blob[blob_m] = 0.05
    scratch_m = (np.abs(yy - xx - 10) < 2) & (yy > 60) & (yy < 100)
    scratch = _texture(12)
    scratch[scratch_m] = 1.0
    return goods, [clean, blob, scratch], [None, blob_m, scratch_m]


@pytest.fixture(scope="module")
def opts():
    return fs.FewShotOptions(image_size=SIZE, rotation=False)


@pytest.fixture(scope="module")
def results(tiny_seg, synthetic, opts):
    goods, tests, _ = synthetic
    return fs.run_fewshot(tiny_seg, tests, reference=goods, options=opts)


def test_planted_defects_rank_above_clean(results, synthetic):
    _, tests, masks = synthetic
    clean = results[0]
    for r, m in zip(results[1:], masks[1:]):
        assert r.anomaly_map.shape == (SIZE, SIZE) and r.anomaly_map.dtype == np.float32
        assert r.score > 5 * clean.score  # image level
        inside, outside = r.anomaly_map[m].mean(), r.anomaly_map[~m].mean()
        assert inside > 3 * outside  # pixel level
        peak = np.unravel_index(np.argmax(r.anomaly_map), m.shape)
        near = np.zeros_like(m)
        ys, xs = np.nonzero(m)
        near[max(ys.min() - 8, 0) : ys.max() + 9, max(xs.min() - 8, 0) : xs.max() + 9] = True
        assert near[peak]  # the map peaks on (or right next to) the planted defect
        # the references' own maximum as threshold: the defect is flagged, most of the rest not
        assert r.mask[m].mean() > 0.5 and r.mask[m].mean() > 3 * r.mask[~near].mean()


def test_features_computed_once_per_image(tiny_seg, synthetic, opts):
    goods, tests, _ = synthetic
    ctx = tiny_seg.context(tests[1])
    bank = fs.build_memory(tiny_seg, goods, opts)
    a = fs.run_fewshot(tiny_seg, [ctx], reference=bank, options=opts, threshold=0.5)[0]
    b = fs.run_fewshot(tiny_seg, [ctx], reference=bank, options=opts, threshold=0.5)[0]
    keys = [k for k in ctx.computed if k[0] == "fewshot-features"]
    assert len(keys) == 1 and ctx.computed[keys[0]] == 1
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_default_threshold_from_references(results, tiny_seg, synthetic, opts):
    goods, tests, _ = synthetic
    r = results[0]
    assert r.meta["threshold_source"] == "references"
    bank = fs.build_memory(tiny_seg, goods, opts)
    refs = fs.reference_maps(bank, opts)
    assert len(refs) == 3 and all(m.shape == (SIZE, SIZE) for m, _ in refs)
    assert r.threshold == pytest.approx(max(float(m.max()) for m, _ in refs))
    assert all(m.max() > 0 for m, _ in refs)  # leave-one-out, not the reference against itself
    assert r.meta["fewshot"]["n_shots"] == 3 and r.meta["method"] == "fewshot"
    fixed = fs.run_fewshot(
        tiny_seg, tests[:1], reference=bank, options=opts, threshold=0.2, image_threshold=0.1
    )[0]
    assert fixed.threshold == 0.2 and fixed.meta["threshold_source"] == "fixed"
    assert fixed.label is (fixed.score >= 0.1)
    np.testing.assert_array_equal(fixed.mask, fixed.anomaly_map >= 0.2)


def test_calibrate_with_good_images(tiny_seg, synthetic, opts):
    goods, tests, _ = synthetic
    calib = [_texture(20), _texture(21)]
    r = fs.run_fewshot(tiny_seg, tests[:1], reference=goods, options=opts, calibrate_with=calib)
    own = fs.run_fewshot(tiny_seg, calib, reference=goods, options=opts, threshold=0.5)
    assert r[0].meta["threshold_source"] == "calibrated"
    assert r[0].threshold == pytest.approx(max(float(x.anomaly_map.max()) for x in own))
    assert r[0].image_threshold == pytest.approx(max(x.score for x in own))


def test_one_shot_without_rotation_has_no_reference_scale(tiny_seg, synthetic, opts):
    goods, tests, _ = synthetic
    r = fs.run_fewshot(tiny_seg, tests[:1], reference=goods[:1], options=opts)[0]
    assert r.meta["threshold_source"] == "default" and "threshold_note" in r.meta
    # with rotations the single reference is compared with its own rotated copies
    rot = fs.FewShotOptions(image_size=SIZE, rotation=True, rot_angles=(0, 90))
    r = fs.run_fewshot(tiny_seg, tests[:1], reference=goods[:1], options=rot)[0]
    assert r.meta["threshold_source"] == "references"


def test_shots_option_uses_the_first_images(tiny_seg, synthetic, opts):
    from dataclasses import replace

    goods, _, _ = synthetic
    bank = fs.build_memory(tiny_seg, goods, replace(opts, shots=2))
    assert bank.n_shots == 2


def test_preprocess_table():
    assert fs.preprocess_settings("agnostic", "mvtec", "screw") == (True, True)
    assert fs.preprocess_settings("agnostic", "MVTec", "bottle") == (False, True)
    assert fs.preprocess_settings("informed", "mvtec", "hazelnut") == (True, True)
    assert fs.preprocess_settings("informed", "mvtec", "pill") == (True, False)
    assert fs.preprocess_settings("masking_only", "mvtec", "capsule") == (True, False)
    assert fs.preprocess_settings("agnostic_no_mask", "mvtec", "capsule") == (False, True)
    assert fs.preprocess_settings("agnostic", "visa", "pcb1") == (True, True)
    assert fs.preprocess_settings("informed", "visa", "pcb1") == (True, False)
    assert fs.preprocess_settings("force_mask_no_rotation", None, None) == (True, False)
    assert fs.preprocess_settings("agnostic", None, "widget") == (False, True)
    o = fs.options_for("metal nut", "mvtec", shots=4)
    assert (o.masking, o.rotation, o.shots) == (False, True, 4)
    with pytest.raises(ConfigError, match="preprocess"):
        fs.preprocess_settings("clever", "mvtec", "screw")
    with pytest.raises(ConfigError, match="unknown few-shot option"):
        fs.options_for(None, None, knn_k=3)
    with pytest.raises(ConfigError, match="knn_metric"):
        fs.options_for(None, None, knn_metric="cosine")


def test_select_references_as_the_reference_draws():
    files = [f"{i:03d}.png" for i in (5, 0, 3, 1, 4, 2, 6)]
    assert fs.select_references(files, 2, 0) == ["000.png", "001.png"]
    assert fs.select_references(files, 2, 2) == ["004.png", "005.png"]
    assert fs.select_references(files, 4, 1) == ["004.png", "005.png", "006.png"]  # short block
    assert fs.select_references(files, -1) == sorted(files)
    with pytest.raises(ConfigError, match="needs more than"):
        fs.select_references(files, 4, 2)


def test_mean_top1p_rule():
    d = np.arange(1000, dtype=np.float64)
    assert fs.mean_top1p(d) == pytest.approx(np.mean(np.arange(990, 1000)))  # top 10 of 1000
    assert fs.mean_top1p(np.array([0.1, 0.7, 0.2])) == pytest.approx(0.7)  # N < 100: the max
    assert fs.mean_top1p(np.r_[np.zeros(195), [5, 4, 3, 2, 1]]) == pytest.approx(4.5)


# ---- fusion ----------------------------------------------------------------------------------


def test_fusion_rule_hand_computed():
    crane = fs.MapStats(mean=0.2, high=0.6, n_images=2)  # scale 0.4
    few = fs.MapStats(mean=0.01, high=0.05, n_images=2)  # scale 0.04
    c = np.array([[0.2, 0.6], [1.0, 0.2]])
    f = np.array([[0.01, 0.05], [0.01, 0.13]])
    # normalised: crane [[0, 1], [2, 0]], few-shot [[0, 1], [0, 3]]
    np.testing.assert_allclose(fs.fuse_maps(c, f, crane, few), [[0, 1], [1, 1.5]], atol=1e-6)
    np.testing.assert_allclose(fs.fuse_maps(c, f, crane, few, rule="max"), [[0, 1], [2, 3]])
    np.testing.assert_allclose(
        fs.fuse_maps(c, f, crane, few, weight=0.25), [[0, 1], [1.5, 0.75]], atol=1e-6
    )
    assert fs.fuse_scores(0.4, 0.09, crane, few) == pytest.approx(0.5 * 0.5 + 0.5 * 2.0)
    assert fs.fuse_scores(0.4, 0.09, crane, few, rule="max") == pytest.approx(2.0)
    s = fs.map_stats([np.array([[0.0, 1.0]]), np.array([[2.0, 1.0]])])
    assert (s.mean, s.high, s.n_images) == (1.0, 2.0, 2)
    with pytest.raises(ConfigError, match="fusion rule"):
        fs.fuse_maps(c, f, crane, few, rule="median")
    with pytest.raises(ConfigError, match="weight"):
        fs.fuse_maps(c, f, crane, few, weight=2)


def test_crane_fewshot_end_to_end(tiny_seg, synthetic, opts, results, tmp_path):
    goods, tests, masks = synthetic
    fused = fs.run_crane_fewshot(
        tiny_seg, tests, reference=goods, options=opts, crane_preset="crane"
    )
    assert [r.meta["method"] for r in fused] == ["crane+fewshot"] * 3
    for r, m in zip(fused[1:], masks[1:]):
        assert r.anomaly_map.shape == (SIZE, SIZE)
        assert r.anomaly_map[m].mean() > r.anomaly_map[~m].mean()
        assert r.score > fused[0].score
        assert r.threshold == fs.FUSED_THRESHOLD
    st = fused[0].meta["fusion"]
    # the few-shot part of the fused map is the few-shot map normalised by its reference stats
    few_stats = fs.MapStats(**{k: st["fewshot_stats"][k] for k in ("mean", "high", "n_images")})
    crane_stats = fs.MapStats(**{k: st["crane_stats"][k] for k in ("mean", "high", "n_images")})
    assert st["fewshot_score"] == pytest.approx(results[1 - 1].score)
    expect = fs.fuse_scores(st["crane_score"], st["fewshot_score"], crane_stats, few_stats)
    assert fused[0].score == pytest.approx(expect)
    # from a bank: Crane's statistics stored at build time give the same fused maps
    bank = fs.build_memory(tiny_seg, goods, opts)
    fs.add_crane_stats(tiny_seg, bank, goods, "crane")
    from zsdense.io.membank import load_memory, save_memory

    loaded = load_memory(save_memory(bank, tmp_path / "b.zsdmem"))
    again = fs.run_crane_fewshot(tiny_seg, tests, reference=loaded, crane_preset="crane")
    for a, b in zip(fused, again):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
    with pytest.raises(ConfigError, match="Crane's statistics"):
        fs.run_crane_fewshot(tiny_seg, tests[:1], reference=loaded, crane_preset="crane+")


def test_fusion_where_it_helps_and_where_it_does_not():
    """The rule on synthetic maps with known ground truth (pixel AUROC).

    Complementary methods (Crane sees the blob, few-shot the scratch, each on its own scale)
    -> the fused map beats both. One method perfect and the other blind -> fusion is below the
    perfect one (averaging in noise costs), though above the blind one.
    """
    from zsdense.metrics import auroc

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    blob = (yy - 20) ** 2 + (xx - 20) ** 2 < 30
    scratch = (np.abs(yy - xx) < 1.5) & (yy > 35) & (yy < 60)
    gt = blob | scratch

    def crane_like(seen, n=1):  # probabilities around 0.3 (noisy), defects it sees at 0.7
        return [
            np.clip(0.3 + 0.1 * rng.standard_normal((64, 64)) + 0.4 * seen, 0, 1) for _ in range(n)
        ]

    def few_like(seen, n=1):  # 1 - cos distances around 0.02, defects it sees at 0.2
        return [np.abs(0.02 + 0.01 * rng.standard_normal((64, 64))) + 0.18 * seen for _ in range(n)]

    none = np.zeros((64, 64))
    c_stats = fs.map_stats(crane_like(none, 3))
    f_stats = fs.map_stats(few_like(none, 3))
    c = crane_like(blob.astype(float))[0]
    f = few_like(scratch.astype(float))[0]
    fused = fs.fuse_maps(c, f, c_stats, f_stats)
    a_c, a_f, a_fused = (
        auroc(gt.ravel(), c.ravel()),
        auroc(gt.ravel(), f.ravel()),
        auroc(gt.ravel(), fused.ravel()),
    )
    assert a_fused > max(a_c, a_f) + 0.05
    # without the per-method scale (raw average) the few-shot part is drowned by Crane's scale
    raw = auroc(gt.ravel(), (0.5 * c + 0.5 * f).ravel())
    assert a_fused > raw

    c = crane_like(gt.astype(float))[0]  # Crane sees everything
    f = few_like(none)[0]  # few-shot sees nothing
    fused = fs.fuse_maps(c, f, c_stats, f_stats)
    a_c, a_f, a_fused = (
        auroc(gt.ravel(), c.ravel()),
        auroc(gt.ravel(), f.ravel()),
        auroc(gt.ravel(), fused.ravel()),
    )
    assert a_f < a_fused < a_c


def test_cli_bank_presets_are_the_fewshot_presets():
    """`zsdense memory build --preset` offers config.FEWSHOT_PRESET_NAMES (config loads no torch
    for --help): it must name exactly the few-shot presets."""
    from zsdense.config import FEWSHOT_PRESET_NAMES, KNN_METRICS
    from zsdense.tasks.fewshot.options import FEWSHOT_PRESETS, FewShotOptions

    assert tuple(FEWSHOT_PRESETS) == FEWSHOT_PRESET_NAMES
    assert FewShotOptions().knn_metric in KNN_METRICS
