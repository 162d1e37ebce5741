"""Metrics against scikit-learn and brute-force reference implementations written here."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from zsdense import metrics as M

# ---------------------------------------------------------------------------------- references


def ref_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.max(f1[np.isfinite(f1)]))


def ref_aupro_papers(masks, amaps, max_step=200, expect_fpr=0.3):
    """Brute force: explicit loops over thresholds, maps and regions (skimage 8-connectivity)."""
    masks = np.asarray(masks).astype(bool)
    amaps = np.asarray(amaps)
    lo, hi = amaps.min(), amaps.max()
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / max_step):
        binary = amaps > th
        pro = []
        for b, m in zip(binary, masks):
            for region in measure.regionprops(measure.label(m.astype(np.uint8))):
                rr, cc = region.coords[:, 0], region.coords[:, 1]
                pro.append(b[rr, cc].sum() / region.area)
        inverse = ~masks
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros.append(np.mean(pro))
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return auc(f, pros[keep])


def ref_aupro_mvtec(masks, amaps, limit=0.3):
    """Brute force: one threshold per distinct score (map >= t), explicit region loops."""
    masks = np.asarray(masks).astype(bool)
    amaps = np.asarray(amaps, dtype=np.float64)
    regions = []
    for i, m in enumerate(masks):
        for region in measure.regionprops(measure.label(m.astype(np.uint8))):
            regions.append((i, region.coords))
    neg = ~masks
    pts = [(0.0, 0.0)]
    for t in np.unique(amaps)[::-1]:
        b = amaps >= t
        fpr = np.logical_and(b, neg).sum() / neg.sum()
        pro = np.mean([b[i][c[:, 0], c[:, 1]].mean() for i, c in regions])
        pts.append((fpr, pro))
    pts.append((1.0, 1.0))
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    # integrate to `limit` with linear interpolation at the limit
    xs = np.r_[x[x <= limit], limit]
    ys = np.r_[y[x <= limit], np.interp(limit, x, y)]
    return np.trapezoid(ys, xs) / limit if hasattr(np, "trapezoid") else np.trapz(ys, xs) / limit


def ref_miou(preds, labels, k, ignore=255):
    inter = np.zeros(k)
    union = np.zeros(k)
    for p, g in zip(preds, labels):
        for c in range(k):
            valid = g != ignore
            inter[c] += np.sum((p == c) & (g == c) & valid)
            union[c] += np.sum(((p == c) | (g == c)) & valid)
    ious = [inter[c] / union[c] for c in range(k) if union[c] > 0]
    return float(np.mean(ious))


def blob_masks(rng, n=4, h=24, w=24):
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(1, n):  # map 0 stays normal
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, h - 6, 2)
            masks[i, y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = True
    masks[1, 0, 0] = masks[1, 1, 1] = True  # a diagonal pair: one 8-connected region
    return masks


# ---------------------------------------------------------------------------------- image level


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_ap_f1_vs_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 2)  # rounding makes ties
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.f1_max(y, s) == pytest.approx(ref_f1_max(y, s), abs=1e-12)
    im = M.image_metrics(list(y), list(s))
    assert im["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_known_answers():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9])
    assert M.auroc(y, s) == 1.0
    assert M.average_precision(y, s) == 1.0
    assert M.f1_max(y, s) == 1.0
    assert M.auroc(y, -s) == 0.0
    # hand computed: scores 0.9(+) 0.8(-) 0.4(+) 0.1(-): AP = 0.5*1 + 0.5*2/3
    y2, s2 = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.1])
    assert M.average_precision(y2, s2) == pytest.approx(0.5 + 1 / 3)
    assert M.auroc(y2, s2) == pytest.approx(0.75)
    # F1 at t=0.9: P=1, R=.5 -> 2/3; at t=0.4: P=2/3, R=1 -> 0.8
    assert M.f1_max(y2, s2) == pytest.approx(0.8)
    assert np.isnan(M.auroc(np.zeros(4), s))  # one class only


# ---------------------------------------------------------------------------------- pixel level


def test_pixel_binned_vs_exact_auroc():
    rng = np.random.default_rng(0)
    masks = blob_masks(rng, n=6, h=64, w=64)
    maps = np.clip(rng.normal(0.4, 0.15, masks.shape) + 0.25 * masks, 0, 1).astype(np.float32)
    exact = M.pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel()
    assert exact["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-10)
    assert exact["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-10)
    assert exact["pixel_f1_max"] == pytest.approx(ref_f1_max(y, s), abs=1e-10)
    acc = M.PixelAccumulator()  # default bins over [0, 1]
    for m, g in zip(maps, masks):
        acc.update(m, g)
    assert acc.n_maps == 6 and acc.n_clipped == 0
    assert abs(acc.auroc() - exact["pixel_auroc"]) < 1e-3
    assert abs(acc.ap() - exact["pixel_ap"]) < 1e-2
    assert abs(acc.f1_max() - exact["pixel_f1_max"]) < 1e-2
    assert abs(acc.aupro_mvtec() - exact["aupro_mvtec"]) < 1e-2
    # binned metrics are exactly the metrics of the bin-quantised scores
    coarse = M.PixelAccumulator(bins=16)
    for m, g in zip(maps, masks):
        coarse.update(m, g)
    q = np.floor(s.astype(np.float64) * 16).clip(0, 15)
    assert coarse.auroc() == pytest.approx(roc_auc_score(y, q), abs=1e-12)
    assert coarse.ap() == pytest.approx(average_precision_score(y, q), abs=1e-12)
    assert coarse.f1_max() == pytest.approx(ref_f1_max(y, q), abs=1e-12)
    assert abs(coarse.auroc() - exact["pixel_auroc"]) > 1e-4  # coarse bins do lose accuracy


def test_pixel_accumulator_range_and_merge():
    acc = M.PixelAccumulator(bins=8, value_range=(0.0, 1.0))
    acc.update(np.array([[-1.0, 2.0]]), np.array([[False, True]]))
    assert acc.n_clipped == 2 and acc.neg[0] == 1 and acc.pos[7] == 1
    acc.update(np.array([[0.0, 1.0]]), np.array([[False, True]]))  # the range ends are inside
    assert acc.n_clipped == 2 and acc.neg[0] == 2 and acc.pos[7] == 2
    other = M.PixelAccumulator(bins=8)
    other.update(np.array([[0.5, 0.6]]), np.array([[True, False]]))
    acc.merge(other)
    assert acc.pos.sum() == 3 and acc.neg.sum() == 3 and acc.n_maps == 3
    with pytest.raises(ValueError):
        acc.update(np.array([[np.nan]]), np.array([[True]]))
    rt = M.RangeTracker()
    rt.update(np.array([3.0, 5.0]))
    rt.update(np.array([-1.0, 2.0]))
    assert (rt.lo, rt.hi) == (-1.0, 5.0)


@pytest.mark.parametrize("seed", [0, 3])
def test_aupro_both_forms_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng)
    maps = (rng.random(masks.shape) * 0.7 + 0.5 * masks * rng.random(masks.shape)).astype(
        np.float32
    )
    papers = M.aupro_papers(masks, maps)
    mvtec = M.aupro_mvtec(masks, maps)
    assert papers == pytest.approx(ref_aupro_papers(masks, maps), abs=1e-10)
    assert mvtec == pytest.approx(ref_aupro_mvtec(masks, maps), abs=1e-10)
    # the two forms are different numbers on the same data
    assert abs(papers - mvtec) > 1e-3
    # streaming papers' form, in two passes
    rt = M.RangeTracker()
    for m in maps:
        rt.update(m)
    acc = M.AuproAccumulator.from_range(rt.lo, rt.hi)
    for m, g in zip(maps, masks):
        acc.update(m, g)
    assert acc.aupro() == pytest.approx(papers, abs=1e-12)


def test_aupro_perfect_and_hand_case():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[1, 2:5, 2:5] = True
    masks[1, 7:9, 7:9] = True
    perfect = masks.astype(np.float32)
    assert M.aupro_mvtec(masks, perfect) == pytest.approx(1.0)
    # papers' form on a 0/1 map: all thresholds give FPR 0 -> min-max undefined -> NaN
    assert np.isnan(M.aupro_papers(masks, perfect))
    # region-wise averaging: a map that finds only the small region fully has PRO 0.5, not 4/13
    amap = np.zeros((2, 10, 10), dtype=np.float32)
    amap[1, 7:9, 7:9] = 1.0
    amap[0] = np.linspace(0, 0.5, 100).reshape(10, 10)  # some negatives rank above 0
    ths, pro, fpr = M.pro_curve_papers(masks, amap)
    assert pro[-1] == pytest.approx(0.5)
    assert len(ths) in (200, 201)


# ---------------------------------------------------------------------------------- mIoU, oIoU


def test_miou_vs_brute_force_and_mmseg_semantics():
    rng = np.random.default_rng(0)
    k = 5
    preds = [rng.integers(0, k, (16, 16)) for _ in range(4)]
    labels = [rng.integers(0, k - 1, (16, 16)) for _ in range(4)]  # class 4 never labelled
    labels[0][:3] = 255
    preds[1][0, 0] = 200  # out-of-range prediction: dropped (histc semantics)
    assert M.mean_iou(preds, labels, k) == pytest.approx(ref_miou(preds, labels, k), abs=1e-12)
    acc = M.IoUAccumulator(6)  # class 5 absent everywhere -> NaN, ignored by the mean
    for p, g in zip(preds, labels):
        acc.update(p, g)
    assert np.isnan(acc.iou()[5]) and acc.iou()[4] == 0.0
    assert acc.metrics()["miou"] == pytest.approx(ref_miou(preds, labels, 6), abs=1e-12)
    # perfect
    acc = M.IoUAccumulator(3)
    g = np.array([[0, 1], [2, 255]])
    acc.update(np.array([[0, 1], [2, 0]]), g)
    assert acc.metrics() == {"miou": 1.0, "macc": 1.0, "aacc": 1.0}
    # hand case: per-class accumulation differs from averaging per image
    acc = M.IoUAccumulator(2)
    acc.update(np.array([[1, 1, 1, 1]]), np.array([[1, 1, 1, 0]]))  # c1: I=3,U=4; c0: I=0,U=1
    acc.update(np.array([[0, 0, 0, 0]]), np.array([[0, 0, 0, 0]]))  # c0: I=4,U=4
    assert acc.iou()[0] == pytest.approx(4 / 5) and acc.iou()[1] == pytest.approx(3 / 4)


def test_refer_metrics_brute_force():
    rng = np.random.default_rng(1)
    preds = [rng.random((8, 8)) > 0.5 for _ in range(10)]
    gts = [rng.random((8, 8)) > 0.6 for _ in range(10)]
    gts[3][:] = False
    preds[3][:] = False  # empty union -> IoU 0
    preds[4] = gts[4].copy()  # perfect
    m = M.refer_metrics(preds, gts)
    inter = [np.sum(p & g) for p, g in zip(preds, gts)]
    union = [np.sum(p | g) for p, g in zip(preds, gts)]
    ious = [i / u if u else 0.0 for i, u in zip(inter, union)]
    assert m["oiou"] == pytest.approx(sum(inter) / sum(union))
    assert m["miou"] == pytest.approx(np.mean(ious))
    assert m["prec@0.5"] == pytest.approx(np.mean([x >= 0.5 for x in ious]))
    assert m["prec@0.9"] == pytest.approx(0.1)
    assert m["n"] == 10
    # hand case: oIoU weights big objects, mIoU does not
    a = M.ReferAccumulator()
    a.update(np.ones((10, 10), bool), np.ones((10, 10), bool))  # I=U=100
    small = np.zeros((10, 10), bool)
    small[0, 0] = True
    a.update(small, ~small)  # I=0, U=100
    assert a.metrics()["oiou"] == 0.5 and a.metrics()["miou"] == 0.5


def test_regions_are_8_connected():
    g = np.zeros((1, 6, 6), dtype=bool)
    g[0, 0, 0] = g[0, 0, 1] = g[0, 1, 2] = True  # touches only diagonally: one 8-region
    assert M.label_regions(g[0])[1] == 1
    amap = np.zeros((1, 6, 6), dtype=np.float32)
    amap[0, 1, 2] = 1.0
    amap[0, 5, 5] = 0.5
    _, pro, _ = M.pro_curve_papers(g, amap)
    assert pro[0] == pytest.approx(1 / 3)  # 4-connectivity would give mean(0, 1) = 0.5
