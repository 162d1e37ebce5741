"""Defects as instances: connected components with box, area and map statistics, in the Python
results, the manifest lines and ``to_supervision()``."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label as sk_label
from skimage.measure import regionprops

from zsdense.errors import DependencyError
from zsdense.io.instances import (
    MANIFEST_MAX_INSTANCES,
    instance_masks,
    label_map_instances,
    manifest_instances,
    mask_instances,
    to_supervision,
    whole_mask_instance,
)


def _blobs(seed: int = 0, shape=(40, 52), n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, bool)
    for _ in range(n):
        y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        h, w = rng.integers(1, 7, size=2)
        m[y : y + h, x : x + w] = True
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: one 8-connected component
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_instances_match_skimage_regions(seed):
    m = _blobs(seed)
    score = np.random.default_rng(seed + 10).random(m.shape).astype(np.float32)
    got = mask_instances(m, score)
    lab = sk_label(m, connectivity=2)
    props = regionprops(lab)
    assert len(got) == len(props) == lab.max()
    areas = [g["area"] for g in got]
    assert areas == sorted(areas, reverse=True)
    assert [g["id"] for g in got] == list(range(1, len(got) + 1))
    want = {}
    for p in props:
        y0, x0, y1, x1 = p.bbox
        sel = lab == p.label
        want[(x0, y0, x1 - x0, y1 - y0, int(p.area))] = (score[sel].max(), score[sel].mean())
    for g in got:
        key = (*g["box_xywh"], g["area"])
        assert key in want
        assert g["score_max"] == pytest.approx(want[key][0], rel=1e-6)
        assert g["score_mean"] == pytest.approx(want[key][1], rel=1e-6)
    masks = instance_masks(m, got)
    assert sum(x.sum() for x in masks) == m.sum()
    assert np.array_equal(np.logical_or.reduce(masks), m)
    for g, x in zip(got, masks):
        assert x.sum() == g["area"]
        ys, xs = np.nonzero(x)
        assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == g[
            "box_xywh"
        ]


def test_empty_mask_and_no_score_map():
    assert mask_instances(np.zeros((5, 5), bool)) == []
    m = np.zeros((5, 5), bool)
    m[1:3, 1:4] = True
    (inst,) = mask_instances(m)
    assert inst == {"id": 1, "box_xywh": [1, 1, 3, 2], "area": 6}


def test_label_map_instances_per_class():
    lab = np.zeros((20, 20), np.int64)
    lab[2:5, 2:5] = 1
    lab[10:12, 10:15] = 1
    lab[15:18, 0:3] = 2
    probs = np.random.default_rng(0).random((3, 20, 20)).astype(np.float32)
    got = label_map_instances(lab, ["bg", "cat", "cup"], probs)
    classes = [g["class"] for g in got]
    assert classes.count("cat") == 2 and classes.count("cup") == 1 and classes.count("bg") == 1
    assert [g["id"] for g in got] == list(range(1, len(got) + 1))
    cup = next(g for g in got if g["class"] == "cup")
    assert cup["class_index"] == 2 and cup["area"] == 9
    assert cup["score_mean"] == pytest.approx(float(probs[2][lab == 2].mean()), rel=1e-6)
    masks = instance_masks(lab, got)
    for g, x in zip(got, masks):
        assert x.sum() == g["area"] and (lab[x] == g["class_index"]).all()
    no_bg = label_map_instances(lab, ["bg", "cat", "cup"], skip=[0])
    assert all(g["class"] != "bg" for g in no_bg) and len(no_bg) == len(got) - 1


def test_whole_mask_instance_is_one_box_over_all_pieces():
    m = np.zeros((10, 10), bool)
    m[1, 1] = m[8, 6] = True
    (inst,) = whole_mask_instance(m, 0.25)
    assert inst["box_xywh"] == [1, 1, 6, 8] and inst["area"] == 2
    assert inst["score_max"] == inst["score_mean"] == 0.25
    assert whole_mask_instance(np.zeros((3, 3), bool)) == []
    (x,) = instance_masks(m, [inst], whole=True)
    assert np.array_equal(x, m)


def test_manifest_keeps_the_largest():
    insts = [{"id": i, "area": 1000 - i} for i in range(1, MANIFEST_MAX_INSTANCES + 6)]
    kept, total = manifest_instances(insts)
    assert len(kept) == MANIFEST_MAX_INSTANCES and total == len(insts)
    assert manifest_instances(insts[:3]) == (insts[:3], None)


class _FakeDetections:
    def __init__(self, xyxy, mask=None, confidence=None, class_id=None, data=None):
        n = len(xyxy)
        for v in (mask, confidence, class_id, *(data or {}).values()):
            assert v is None or len(v) == n
        self.xyxy, self.mask, self.confidence, self.class_id = xyxy, mask, confidence, class_id
        self.data = data or {}


@pytest.fixture
def fake_supervision(monkeypatch):
    mod = types.ModuleType("supervision")
    mod.Detections = _FakeDetections
    monkeypatch.setitem(sys.modules, "supervision", mod)
    return mod


def test_to_supervision_boxes_masks_confidence(fake_supervision):
    m = _blobs(3)
    score = np.random.default_rng(3).random(m.shape)
    insts = mask_instances(m, score)
    det = to_supervision(insts, instance_masks(m, insts), m.shape)
    assert det.xyxy.shape == (len(insts), 4) and det.mask.shape == (len(insts), *m.shape)
    for row, g in zip(det.xyxy, insts):
        x, y, w, h = g["box_xywh"]
        assert list(row) == [x, y, x + w, y + h]
    assert np.allclose(det.confidence, [g["score_max"] for g in insts])
    assert list(det.data["class_name"]) == ["anomaly"] * len(insts)
    empty = to_supervision([], [], (4, 5))
    assert empty.mask.shape == (0, 4, 5)


def test_to_supervision_names_the_extra_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "supervision", None)  # import fails
    with pytest.raises(DependencyError, match=r"zsdense\[supervision\]"):
        to_supervision([], [], (2, 2))


def test_real_supervision_if_installed():
    sv = pytest.importorskip("supervision", reason="the [supervision] extra is not installed")
    m = _blobs(4)
    insts = mask_instances(m, m.astype(float))
    det = to_supervision(insts, instance_masks(m, insts), m.shape)
    assert isinstance(det, sv.Detections) and len(det) == len(insts)


# ---- through the heads and the engine ----------------------------------------------------


def _image(path, size=40, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
    a[8:20, 10:22] = 250
    Image.fromarray(a).save(path)
    return path


def test_anomaly_result_and_manifest_carry_the_instances(tmp_path, tiny_seg, fake_supervision):
    from zsdense.cli.main import main

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        _image(data / f"p{i}.png", seed=i)
    r = tiny_seg.anomaly(str(data / "p0.png"), threshold=0.0)  # everything is a defect
    assert len(r.instances) == 1 and r.instances[0]["area"] == r.mask.size
    r = tiny_seg.anomaly(str(data / "p0.png"))
    thr = float(np.quantile(r.anomaly_map, 0.9))
    r = tiny_seg.anomaly(str(data / "p0.png"), threshold=thr)
    assert sum(g["area"] for g in r.instances) == int(r.mask.sum()) > 0
    assert max(g["score_max"] for g in r.instances) == pytest.approx(float(r.anomaly_map.max()))
    det = r.to_supervision()
    assert np.array_equal(np.logical_or.reduce(det.mask), r.mask)

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["anomaly", str(data), "--out", str(out), "--models", "tiny", "--precision",
              "fp32", "--threshold", str(thr), "-q"])  # fmt: skip
    assert e.value.code == 0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for rec in recs:
        mask = np.asarray(Image.open(out / rec["outputs"]["mask"])) > 0
        assert sum(g["area"] for g in rec["instances"]) == int(mask.sum())
        assert set(rec["scores"]) == {
            "score", "label", "threshold", "threshold_source", "image_threshold", "defect_area",
        }  # fmt: skip  - the existing keys are unchanged


def test_openvocab_and_refer_results_carry_instances(tmp_path, tiny_seg, fake_supervision):
    img = _image(tmp_path / "s.png", size=48)
    ov = tiny_seg.open_vocab(str(img), classes=["cat", "cup", "sky"])
    assert sum(g["area"] for g in ov.instances) == ov.labels.size
    assert {g["class"] for g in ov.instances} == {ov.class_names[k] for k in np.unique(ov.labels)}
    det = ov.to_supervision()
    assert sorted(set(det.class_id.tolist())) == sorted(np.unique(ov.labels).tolist())
    rf = tiny_seg.refer(str(img), "the bright square")
    assert len(rf.instances) == (1 if rf.mask.any() else 0)
    if rf.mask.any():
        assert rf.instances[0]["area"] == int(rf.mask.sum())
        conf = float(rf.to_supervision().confidence[0])  # NaN for a fallback (no score)
        assert conf == pytest.approx(rf.score, rel=1e-6, nan_ok=True)


def test_component_statistics_equal_ndimage_on_many_specks():
    """The per-component max and mean (computed without sorting every pixel) equal
    ``scipy.ndimage.maximum`` / ``mean`` exactly, on a map with dozens of components."""
    from scipy import ndimage

    from zsdense.io import instances as I

    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:120, 0:160]
    score = (np.sin(x / 5) * np.cos(y / 7) + rng.random((120, 160)) * 0.5).astype(np.float32)
    mask = score > 0.6
    lab, n = I.label_components(mask)
    assert n > 50
    order = I._ordered(np.bincount(lab.ravel(), minlength=n + 1)[1:])
    assert np.array_equal(I._components(lab, n)[2], ndimage.sum(mask, lab, np.arange(1, n + 1)))
    for a, b in zip(I._components(lab, n), I._components(lab, n, mask)):  # the mask's scan
        assert np.array_equal(a, b)
    got = I.mask_instances(mask, score)
    assert I.mask_instances(np.where(mask, 255, 0).astype(np.uint8), score) == got
    idx = np.arange(1, n + 1)
    s64 = score.astype(np.float64)
    assert [g["score_max"] for g in got] == list(
        np.asarray(ndimage.maximum(s64, lab, idx))[order - 1]
    )
    assert [g["score_mean"] for g in got] == list(
        np.asarray(ndimage.mean(s64, lab, idx))[order - 1]
    )
