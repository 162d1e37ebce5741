"""``zsdense eval``: metrics, tables and stored predictions with stub heads (TaskSpecs run by
the batch engine), plus an end-to-end run on the tiny models."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import roc_auc_score

from zsdense import metrics as M
from zsdense.cli.eval import eval_group
from zsdense.engine.specs import TaskSpec
from zsdense.eval.anomaly import ANOMALY_METRICS, resize_map, resize_mask
from zsdense.eval.datasets import load_anomaly_mask, read_anomaly
from zsdense.io.writers import write_label_png, write_mask_png


def make_mvtec_mini(root: Path, n_good: int = 3, n_bad: int = 3, size: int = 64) -> Path:
    """One category 'widget': good images and 'scratch' images with square defects."""
    rng = np.random.default_rng(0)
    cat = root / "widget"
    for i in range(n_good):
        p = cat / "test" / "good" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(90, 110, (size, size, 3), dtype=np.uint8)).save(p)
    for i in range(n_bad):
        arr = rng.integers(90, 110, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        y, x = 8 + 12 * i, 10 + 9 * i
        mask[y : y + 10 + 2 * i, x : x + 12] = 255
        arr[mask > 0] = 250
        p = cat / "test" / "scratch" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)
        m = cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png"
        m.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(m)
    return root


def _no_write(result, ctx, stem, params) -> dict:
    return {}


class MaskStub:
    """Anomaly 'head' that looks at the image: bright pixels are the defect. Called with the
    object name, it returns the TaskSpec the engine runs; ``calls`` counts the batches."""

    def __init__(self, invert: bool = False, noise: float = 0.05):
        self.calls = 0
        self.images = 0
        self.invert = invert
        self.noise = noise

    def __call__(self, object_name: str) -> TaskSpec:
        assert object_name == "widget"
        return TaskSpec(name="anomaly", run=self.run, write=_no_write)

    def run(self, ctxs, params):
        self.calls += 1
        self.images += len(ctxs)
        out = []
        for ctx in ctxs:
            arr = ctx.image_u8.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            rng = np.random.default_rng(int(ctx.image_u8.sum()))
            amap = (arr > 200).astype(np.float32) * 0.8 + rng.random(arr.shape) * self.noise
            score = float(amap.max())
            if self.invert:
                amap, score = 1 - amap, -score
            out.append(SimpleNamespace(score=score, anomaly_map=amap.astype(np.float32)))
        return out


def _no_predict(*_args):
    def run(ctxs, params):
        raise AssertionError("stored predictions should have been reused")

    return TaskSpec(name="anomaly", run=run, write=_no_write)


def _invoke(args, task=None):
    obj = {"task": task} if task is not None else None
    return CliRunner().invoke(eval_group, args, obj=obj, catch_exceptions=False)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]


# ============================================================================== anomaly


def test_anomaly_stub_metrics_tables_and_reuse(tmp_path):
    data = make_mvtec_mini(tmp_path / "data")
    out = tmp_path / "out"
    stub = MaskStub()
    r = _invoke(["anomaly", "--data", str(data), "--out", str(out)], stub)
    assert r.exit_code == 0, r.output
    assert stub.calls == 2  # 6 images, default batch size 4
    # papers-like table on stdout: a category row and a mean row
    assert "widget" in r.output and "mean" in r.output and "100.0" in r.output
    # tables
    res = json.loads((out / "metrics_anomaly.json").read_text())
    row = res["rows"][0]
    assert row["category"] == "widget" and row["n_images"] == 6 and row["n_anomalous"] == 3
    assert row["n_failed"] == 0
    assert row["image_auroc"] == 1.0 and row["image_ap"] == 1.0 and row["image_f1_max"] == 1.0
    assert row["pixel_auroc"] == pytest.approx(1.0, abs=1e-6)
    rows = _read_csv(out / "metrics_anomaly.csv")
    assert [x["category"] for x in rows] == ["widget", "mean"]
    assert set(ANOMALY_METRICS) <= set(rows[0])
    assert float(rows[1]["image_auroc"]) == 1.0
    md = (out / "metrics_anomaly.md").read_text()
    assert md.startswith("| category | image_auroc") and "| widget | 100.0 |" in md
    # stored predictions: the engine's manifest, one ok record per image, 518x518 maps
    pred_dir = out / "predictions" / "anomaly"
    recs = _records(pred_dir)
    assert len(recs) == 6 and all(x["status"] == "ok" for x in recs)
    amap = np.load(pred_dir / recs[0]["outputs"]["eval_map"])
    assert amap.shape == (518, 518) and amap.dtype == np.float32
    # pixel metrics equal the exact ones recomputed here from the stored maps (to binning)
    maps, masks = [], []
    for s in read_anomaly(data):
        key = s.image_path.relative_to(data).as_posix()
        entry = next(x for x in recs if x["key"] == key)
        maps.append(np.load(pred_dir / entry["outputs"]["eval_map"]))
        masks.append(
            resize_mask(load_anomaly_mask(s)) if s.mask_path else np.zeros((518, 518), bool)
        )
    maps, masks = np.stack(maps), np.stack(masks)
    assert masks.sum() > 0
    exact = M.pixel_metrics(masks, maps)
    assert abs(row["pixel_auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) < 1e-3
    assert row["aupro"] == pytest.approx(exact["aupro"], abs=1e-9)  # exact in both paths
    assert abs(row["aupro_mvtec"] - exact["aupro_mvtec"]) < 1e-2

    # rerun: predictions reused, other metrics only
    r = _invoke(
        [
            "anomaly",
            "--data",
            str(data),
            "--out",
            str(out),
            "--metrics",
            "image_auroc,pixel_ap",
            "--exact",
        ],
        _no_predict,
    )
    assert r.exit_code == 0, r.output
    res2 = json.loads((out / "metrics_anomaly.json").read_text())
    assert set(res2["mean"]) == {"category", "image_auroc", "pixel_ap"}
    assert res2["rows"][0]["pixel_ap"] == pytest.approx(exact["pixel_ap"], abs=1e-12)

    # --force predicts again: an inverted model scores 0 image AUROC
    inv = MaskStub(invert=True)
    r = _invoke(["anomaly", "--data", str(data), "--out", str(out), "--force"], inv)
    assert r.exit_code == 0 and inv.calls == 2
    res3 = json.loads((out / "metrics_anomaly.json").read_text())
    assert res3["rows"][0]["image_auroc"] == 0.0
    assert res3["rows"][0]["pixel_auroc"] < 0.01
    # --recompute is a deprecated alias of --force
    again = MaskStub()
    r = _invoke(["anomaly", "--data", str(data), "--out", str(out), "--recompute"], again)
    assert r.exit_code == 0 and again.images == 6 and "deprecated" in r.output
    assert json.loads((out / "metrics_anomaly.json").read_text())["rows"][0]["image_auroc"] == 1


def test_anomaly_preset_change_recomputes_and_limit(tmp_path):
    data = make_mvtec_mini(tmp_path / "data", n_good=4, n_bad=4)
    out = tmp_path / "out"
    stub = MaskStub()
    args = ["anomaly", "--data", str(data), "--out", str(out)]
    assert _invoke([*args, "--limit", "4", "--batch-size", "2"], stub).exit_code == 0
    assert stub.calls == 2
    res = json.loads((out / "metrics_anomaly.json").read_text())
    assert res["rows"][0]["n_images"] == 4 and 0 < res["rows"][0]["n_anomalous"] < 4
    stub2 = MaskStub()
    r = _invoke([*args, "--preset", "crane+"], stub2)
    assert r.exit_code == 0 and stub2.calls == 2  # other preset: predictions made again
    assert stub2.images == 8 and "preset" in r.output  # the changed setting is named
    assert len(_records(out / "predictions/anomaly")) == 8


def test_anomaly_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _invoke(
        ["anomaly", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], MaskStub()
    )
    assert r.exit_code == 2 and "cannot tell the dataset layout" in r.output
    data = make_mvtec_mini(tmp_path / "data")
    r = _invoke(
        ["anomaly", "--data", str(data), "--out", str(tmp_path / "o"), "--categories", "nope"],
        MaskStub(),
    )
    assert r.exit_code == 2 and "not found" in r.output
    r = _invoke(
        ["anomaly", "--data", str(data), "--out", str(tmp_path / "o"), "--metrics", "accuracy"],
        MaskStub(),
    )
    assert r.exit_code == 2 and "unknown metric" in r.output
    (tmp_path / "file").write_text("x")
    r = _invoke(["anomaly", "--data", str(data), "--out", str(tmp_path / "file")], MaskStub())
    assert r.exit_code == 2 and "cannot write the predictions" in r.output
    # an unknown preset is a usage error before anything is predicted or written
    stub = MaskStub()
    r = _invoke(
        ["anomaly", "--data", str(data), "--out", str(tmp_path / "p"), "--preset", "foo"], stub
    )
    assert r.exit_code == 2 and "crane+" in r.output and stub.calls == 0
    assert not (tmp_path / "p").exists()
    for cmd in ("openvocab", "refer"):
        r = _invoke([cmd, "--data", str(data), "--out", str(tmp_path / "p"), "--preset", "foo"])
        assert r.exit_code == 2 and "Invalid value for '--preset'" in r.output


def test_anomaly_failed_images_exit_3(tmp_path):
    data = make_mvtec_mini(tmp_path / "data")
    (data / "widget" / "test" / "good" / "009.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    r = _invoke(["anomaly", "--data", str(data), "--out", str(out)], MaskStub())
    assert r.exit_code == 3, r.output
    assert "failed: widget/test/good/009.png" in r.output
    res = json.loads((out / "metrics_anomaly.json").read_text())
    assert res["rows"][0]["n_images"] == 6 and res["rows"][0]["n_failed"] == 1
    assert res["rows"][0]["image_auroc"] == 1.0  # the readable images are still scored
    assert [f["key"] for f in res["failed"]] == ["widget/test/good/009.png"]


def test_anomaly_end_to_end_tiny_models(tmp_path):
    data = make_mvtec_mini(tmp_path / "data")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        eval_group,
        [
            "anomaly",
            "--data",
            str(data),
            "--out",
            str(out),
            "--models",
            "tiny",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "metrics_anomaly.json").read_text())
    row = res["rows"][0]
    for k in ANOMALY_METRICS:
        assert row[k] is None or 0.0 <= row[k] <= 1.0
    assert row["image_auroc"] is not None and row["pixel_auroc"] is not None
    assert res["config"]["models"] == "tiny" and "NOT meaningful" in res["config"]["warning"]
    recs = _records(out / "predictions/anomaly")
    assert len(recs) == 6 and all(x["status"] == "ok" for x in recs)
    # the head's own 518x518 map is what is scored and stored
    assert np.load(out / "predictions/anomaly" / recs[0]["outputs"]["eval_map"]).shape == (
        518,
        518,
    )


# ============================================================================== open vocab


def _seg_set(root: Path, class_file: bool = True) -> list[np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    if class_file:
        (root / "classes.txt").write_text("background\ncat\nsofa\n")
    gts = []
    for i in range(3):
        Image.new("RGB", (8, 6)).save(root / "images" / f"{i}.jpg")
        g = np.zeros((6, 8), np.uint8)
        g[:, 4:] = 1
        g[0] = 255
        Image.fromarray(g).save(root / "labels" / f"{i}.png")
        gts.append(g)
    return gts


class LabelStub:
    """Open-vocab 'head': one extra column of cat and one sofa pixel."""

    def __init__(self, expect: list[str]):
        self.expect = expect
        self.images = 0

    def __call__(self, classes) -> TaskSpec:
        assert [name for name, _syn in classes] == self.expect
        return TaskSpec(name="openvocab", run=self.run, write=self.write)

    def run(self, ctxs, params):
        self.images += len(ctxs)
        out = []
        for _ in ctxs:
            lab = np.zeros((6, 8), np.int64)
            lab[:, 3:] = 1
            lab[5, 0] = 2
            out.append(SimpleNamespace(labels=lab))
        return out

    @staticmethod
    def write(result, ctx, stem, params) -> dict:
        return {"outputs": {"mask": str(write_label_png(f"{stem}.mask.png", result.labels))}}


def test_openvocab_stub(tmp_path):
    root = tmp_path / "seg"
    gts = _seg_set(root)
    out = tmp_path / "out"
    stub = LabelStub(["background", "cat", "sofa"])
    r = _invoke(["openvocab", "--data", str(root), "--out", str(out)], stub)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "metrics_openvocab.json").read_text())
    acc_i = np.zeros(3)
    acc_u = np.zeros(3)
    for g in gts:
        p = np.zeros((6, 8), np.int64)
        p[:, 3:] = 1
        p[5, 0] = 2
        v = g != 255
        for c in range(3):
            acc_i[c] += np.sum((p == c) & (g == c) & v)
            acc_u[c] += np.sum(((p == c) | (g == c)) & v)
    ious = acc_i / acc_u
    assert res["mean"]["iou"] == pytest.approx(ious.mean())
    assert [x["class"] for x in res["rows"]] == ["background", "cat", "sofa"]
    assert res["rows"][2]["iou"] == 0.0
    assert res["summary"]["n_images"] == 3
    assert (out / "predictions/openvocab/0.mask.png").is_file()
    assert stub.images == 3
    r = _invoke(["openvocab", "--data", str(root), "--out", str(out)], stub)
    assert r.exit_code == 0, r.output
    assert stub.images == 3  # reused
    # missing class list is a clear error
    (root / "classes.txt").unlink()
    r = _invoke(["openvocab", "--data", str(root), "--out", str(tmp_path / "o2")], stub)
    assert r.exit_code == 2 and "--classes-file" in r.output


def test_openvocab_shipped_class_list_name(tmp_path):
    root = tmp_path / "seg"
    _seg_set(root, class_file=False)
    voc = (Path(__file__).resolve().parents[1] / "prompts/classes/voc21.txt").read_text()
    names = [
        ln.split(":", 1)[0].split(";", 1)[0].strip()
        for ln in voc.splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert len(names) == 21
    out = tmp_path / "out"
    r = _invoke(
        ["openvocab", "--data", str(root), "--out", str(out), "--classes-file", "voc21"],
        LabelStub(names),
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "metrics_openvocab.json").read_text())
    assert [x["class"] for x in res["rows"]] == names
    assert res["rows"][1]["gt_pixels"] == 3 * 5 * 4  # class 1 = the right half of rows 1..5
    r = _invoke(
        ["openvocab", "--data", str(root), "--out", str(out), "--classes-file", "voc99"],
        LabelStub(names),
    )
    assert r.exit_code == 2 and "voc21" in r.output  # the shipped lists are named


# ============================================================================== referring


def test_refer_stub(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.jpg")
    m = np.zeros((10, 10), np.uint8)
    m[:5] = 255
    Image.fromarray(m).save(tmp_path / "a_gt.png")
    lines = [
        {"image": "a.jpg", "text": t, "mask": "a_gt.png", "id": f"s{n}"}
        for n, t in enumerate(["top half", "top rows", "nothing"])
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    calls = []

    def run(ctxs, params):
        calls.append([p["text"] for p in params])
        assert len({id(c) for c in ctxs}) == 1  # one image, decoded once
        out = []
        for p in params:
            t = p["text"]
            mask = np.zeros((10, 10), bool)
            if t == "top half":
                mask[:5] = True  # IoU 1
            elif t == "top rows":
                mask[:2] = True  # IoU 0.4
            out.append(SimpleNamespace(mask=mask, score=0.5))
        return out

    def write(result, ctx, stem, params):
        return {"outputs": {"mask": str(write_mask_png(f"{stem}.mask.png", result.mask))}}

    def head():
        return TaskSpec(name="refer", run=run, write=write)

    out = tmp_path / "out"
    r = _invoke(["refer", "--data", str(tmp_path / "q.jsonl"), "--out", str(out)], head)
    assert r.exit_code == 0, r.output
    assert calls == [["top half", "top rows", "nothing"]]  # one image, one call
    assert "46.7" in r.output and "33.3" in r.output  # oIoU, prec@0.5 in the printed table
    res = json.loads((out / "metrics_refer.json").read_text())
    assert res["mean"]["oiou"] == pytest.approx((50 + 20) / 150)
    assert res["mean"]["miou"] == pytest.approx((1 + 0.4 + 0) / 3)
    assert res["mean"]["prec@0.5"] == pytest.approx(1 / 3)
    assert [x["id"] for x in res["per_sample"]] == ["s0", "s1", "s2"]
    rows = _read_csv(out / "metrics_refer.csv")
    assert float(rows[0]["oiou"]) == pytest.approx(70 / 150)
    assert (out / "predictions/refer/a.s1.mask.png").is_file()
    r = _invoke(["refer", "--data", str(tmp_path / "q.jsonl"), "--out", str(out)], head)
    assert r.exit_code == 0 and len(calls) == 1  # reused


def test_anomaly_uses_head_map_at_eval_size(tmp_path):
    data = make_mvtec_mini(tmp_path / "data", n_good=1, n_bad=1)
    own = np.random.default_rng(0).random((518, 518)).astype(np.float32)

    def head(object_name):
        def run(ctxs, params):
            return [
                SimpleNamespace(
                    score=0.1, anomaly_map=np.zeros((64, 64), np.float32), model_map=own
                )
                for _ in ctxs
            ]

        return TaskSpec(name="anomaly", run=run, write=_no_write)

    out = tmp_path / "out"
    assert _invoke(["anomaly", "--data", str(data), "--out", str(out)], head).exit_code == 0
    e = _records(out / "predictions/anomaly")[0]
    assert np.array_equal(np.load(out / "predictions/anomaly" / e["outputs"]["eval_map"]), own)
    # without a head map, the full-size map is resized bilinearly to 518
    m = np.zeros((64, 64), np.float32)
    m[:, 32:] = 1
    r = resize_map(m)
    assert r.shape == (518, 518) and r[0, 0] == 0 and r[0, -1] == 1 and 0 < r[0, 259] < 1
    mk = resize_mask(m)
    assert mk.dtype == bool and mk[:, :255].sum() == 0 and mk[:, 263:].all()
