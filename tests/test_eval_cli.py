"""``zsdense eval``: metrics, tables and stored predictions with stub predictors, plus an
end-to-end run on the tiny models once the anomaly head exists."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import roc_auc_score

from zsdense import metrics as M


def _load_eval_module():
    try:
        return importlib.import_module("zsdense.cli.eval")
    except ImportError:  # cli/ not yet a package in this checkout: load the file directly
        path = Path(__file__).resolve().parents[1] / "cli" / "eval.py"
        spec = importlib.util.spec_from_file_location("zsdense_cli_eval", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


E = _load_eval_module()


def _anomaly_head_available() -> bool:
    try:
        importlib.import_module("zsdense.tasks.anomaly")
        return True
    except Exception:
        return False


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


class MaskStub:
    """Anomaly 'model' that looks at the image: bright pixels are the defect."""

    def __init__(self, invert: bool = False, noise: float = 0.05):
        self.calls = 0
        self.invert = invert
        self.noise = noise

    def __call__(self, paths, object_name):
        assert object_name == "widget"
        self.calls += 1
        out = []
        for p in paths:
            arr = np.asarray(Image.open(p).convert("L"), dtype=np.float32)
            rng = np.random.default_rng(abs(hash(Path(p).name)) % 2**32)
            amap = (arr > 200).astype(np.float32) * 0.8 + rng.random(arr.shape) * self.noise
            score = float(amap.max())
            if self.invert:
                amap, score = 1 - amap, -score
            out.append(SimpleNamespace(score=score, anomaly_map=amap.astype(np.float32), meta={}))
        return out


def _no_predict(paths, object_name):
    raise AssertionError("stored predictions should have been reused")


def _invoke(args, predictor=None):
    obj = {"predictor": predictor} if predictor is not None else None
    return CliRunner().invoke(E.eval_group, args, obj=obj, catch_exceptions=False)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
    assert row["image_auroc"] == 1.0 and row["image_ap"] == 1.0 and row["image_f1_max"] == 1.0
    assert row["pixel_auroc"] == pytest.approx(1.0, abs=1e-6)
    rows = _read_csv(out / "metrics_anomaly.csv")
    assert [x["category"] for x in rows] == ["widget", "mean"]
    assert set(E.ANOMALY_METRICS) <= set(rows[0])
    assert float(rows[1]["image_auroc"]) == 1.0
    # stored predictions: 518x518 maps + manifest
    pred_dir = out / "predictions" / "anomaly"
    lines = (pred_dir / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 6
    e = json.loads(lines[0])
    amap = np.load(pred_dir / e["file"])
    assert amap.shape == (518, 518) and amap.dtype == np.float32
    # pixel metrics equal the exact ones recomputed here from the stored maps (to binning)
    maps, masks = [], []
    from zsdense.datasets import load_anomaly_mask, read_anomaly

    for s in read_anomaly(data):
        key = s.image_path.relative_to(data).as_posix()
        entry = next(json.loads(x) for x in lines if json.loads(x)["key"] == key)
        maps.append(np.load(pred_dir / entry["file"]))
        masks.append(
            E.resize_mask(load_anomaly_mask(s)) if s.mask_path else np.zeros((518, 518), bool)
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

    # --recompute forces prediction: an inverted model scores 0 image AUROC
    inv = MaskStub(invert=True)
    r = _invoke(["anomaly", "--data", str(data), "--out", str(out), "--recompute"], inv)
    assert r.exit_code == 0 and inv.calls == 2
    res3 = json.loads((out / "metrics_anomaly.json").read_text())
    assert res3["rows"][0]["image_auroc"] == 0.0
    assert res3["rows"][0]["pixel_auroc"] < 0.01


def test_anomaly_preset_change_recomputes_and_limit(tmp_path):
    data = make_mvtec_mini(tmp_path / "data", n_good=4, n_bad=4)
    out = tmp_path / "out"
    stub = MaskStub()
    assert (
        _invoke(
            [
                "anomaly",
                "--data",
                str(data),
                "--out",
                str(out),
                "--limit",
                "4",
                "--batch-size",
                "2",
            ],
            stub,
        ).exit_code
        == 0
    )
    assert stub.calls == 2
    res = json.loads((out / "metrics_anomaly.json").read_text())
    assert res["rows"][0]["n_images"] == 4 and 0 < res["rows"][0]["n_anomalous"] < 4
    stub2 = MaskStub()
    r = _invoke(["anomaly", "--data", str(data), "--out", str(out), "--preset", "crane+"], stub2)
    assert r.exit_code == 0 and stub2.calls == 2  # other preset: predictions made again
    assert len((out / "predictions/anomaly/manifest.jsonl").read_text().splitlines()) == 8


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


@pytest.mark.skipif(
    not _anomaly_head_available(),
    reason="zsdense.tasks.anomaly not importable yet (anomaly head in progress)",
)
def test_anomaly_end_to_end_tiny_models(tmp_path):
    data = make_mvtec_mini(tmp_path / "data")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        E.eval_group,
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
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "metrics_anomaly.json").read_text())
    row = res["rows"][0]
    for k in E.ANOMALY_METRICS:
        assert row[k] is None or 0.0 <= row[k] <= 1.0
    assert row["image_auroc"] is not None and row["pixel_auroc"] is not None
    assert res["config"]["models"] == "tiny"
    assert len((out / "predictions/anomaly/manifest.jsonl").read_text().splitlines()) == 6


# ============================================================================== open vocab


def test_openvocab_stub(tmp_path):
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("background\ncat\nsofa\n")
    gts = []
    for i in range(3):
        Image.new("RGB", (8, 6)).save(root / "images" / f"{i}.jpg")
        g = np.zeros((6, 8), np.uint8)
        g[:, 4:] = 1
        g[0] = 255
        Image.fromarray(g).save(root / "labels" / f"{i}.png")
        gts.append(g)

    def predictor(paths, classes):
        assert classes == ["background", "cat", "sofa"]
        out = []
        for _ in paths:
            lab = np.zeros((6, 8), np.int64)
            lab[:, 3:] = 1  # one extra column of cat
            lab[5, 0] = 2  # one sofa pixel
            out.append(SimpleNamespace(labels=lab))
        return out

    out = tmp_path / "out"
    r = _invoke(["openvocab", "--data", str(root), "--out", str(out)], predictor)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "metrics_openvocab.json").read_text())
    # per image (rows 1..5): bg I=3-1(sofa at row5)... counted by brute force:
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
    assert (out / "predictions/openvocab/0.png").is_file()
    r = _invoke(["openvocab", "--data", str(root), "--out", str(out)], _no_predict)
    assert r.exit_code == 0, r.output
    # missing class list is a clear error
    (root / "classes.txt").unlink()
    r = _invoke(["openvocab", "--data", str(root), "--out", str(tmp_path / "o2")], predictor)
    assert r.exit_code == 2 and "--classes-file" in r.output


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

    def predictor(image, texts):
        calls.append(texts)
        out = []
        for t in texts:
            p = np.zeros((10, 10), bool)
            if t == "top half":
                p[:5] = True  # IoU 1
            elif t == "top rows":
                p[:2] = True  # IoU 0.4
            out.append(SimpleNamespace(mask=p, score=0.5))
        return out

    out = tmp_path / "out"
    r = _invoke(["refer", "--data", str(tmp_path / "q.jsonl"), "--out", str(out)], predictor)
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


def test_anomaly_uses_head_map_at_eval_size(tmp_path):
    data = make_mvtec_mini(tmp_path / "data", n_good=1, n_bad=1)
    own = np.random.default_rng(0).random((518, 518)).astype(np.float32)

    def predictor(paths, object_name):
        return [
            SimpleNamespace(score=0.1, anomaly_map=np.zeros((64, 64), np.float32), model_map=own)
            for _ in paths
        ]

    out = tmp_path / "out"
    assert _invoke(["anomaly", "--data", str(data), "--out", str(out)], predictor).exit_code == 0
    e = json.loads((out / "predictions/anomaly/manifest.jsonl").read_text().splitlines()[0])
    assert np.array_equal(np.load(out / "predictions/anomaly" / e["file"]), own)
    # without a head map, the full-size map is resized bilinearly to 518
    m = np.zeros((64, 64), np.float32)
    m[:, 32:] = 1
    r = E.resize_map(m)
    assert r.shape == (518, 518) and r[0, 0] == 0 and r[0, -1] == 1 and 0 < r[0, 259] < 1
    mk = E.resize_mask(m)
    assert mk.dtype == bool and mk[:, :255].sum() == 0 and mk[:, 263:].all()
