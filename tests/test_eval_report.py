"""Evaluation you can see: F1-optimal thresholds (the arg-max of F1-max) saved and reused, and
report_anomaly.html with curves per category (matplotlib, optional), the table and the worst
false positive / false negative strips."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from zsdense import Segmenter
from zsdense import metrics as M
from zsdense.eval import evaluate_anomaly
from zsdense.eval.anomaly import resize_mask
from zsdense.eval.datasets import load_anomaly_mask, read_anomaly
from zsdense.eval.report import WORST_K, render_anomaly_report
from zsdense.io.thresholds import pick, read_thresholds


def make_mvtec(root: Path, n_good: int = 3, n_bad: int = 3, size: int = 40) -> Path:
    rng = np.random.default_rng(11)
    for cat in ("widget",):
        for i in range(n_good):
            p = root / cat / "test" / "good" / f"{i:03d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(80, 120, (size, size, 3), dtype=np.uint8)).save(p)
        for i in range(n_bad):
            a = rng.integers(80, 120, (size, size, 3), dtype=np.uint8)
            m = np.zeros((size, size), np.uint8)
            m[4 + 4 * i : 16 + 4 * i, 6 + 3 * i : 18 + 3 * i] = 255
            a[m > 0] = 245
            p = root / cat / "test" / "crack" / f"{i:03d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p)
            q = root / cat / "ground_truth" / "crack" / f"{i:03d}_mask.png"
            q.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(q)
    return root


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_threshold_is_the_arg_max(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.4 * y, 2)  # ties on purpose
    f1, t = M.f1_max_threshold(y, s)
    assert f1 == pytest.approx(M.f1_max(y, s), abs=1e-12)
    assert f1_score(y, s >= t) == pytest.approx(f1, abs=1e-12)
    # no other threshold does better
    best = max(f1_score(y, s >= u) for u in np.unique(s))
    assert f1 == pytest.approx(best, abs=1e-12)
    assert M.f1_max_threshold(np.zeros(5), np.arange(5.0)) == (pytest.approx(float("nan"),
                                                                nan_ok=True), None)  # fmt: skip


def test_binned_f1_threshold_is_a_bin_edge_reaching_the_binned_f1():
    rng = np.random.default_rng(0)
    acc = M.PixelAccumulator(bins=256)
    maps, masks = [], []
    for _ in range(3):
        m = rng.random((40, 40)) > 0.85
        a = np.clip(rng.random((40, 40)) * 0.8 + 0.25 * m, 0, 1).astype(np.float32)
        acc.update(a, m)
        maps.append(a)
        masks.append(m)
    f1, t = acc.f1_max_threshold()
    assert f1 == pytest.approx(acc.f1_max(), abs=1e-12)
    assert t * 256 == pytest.approx(round(t * 256), abs=1e-9)  # a bin edge of [0, 1]
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert f1_score(y, s >= t) == pytest.approx(f1, abs=1e-9)
    cv = acc.curves()
    assert cv["fpr"][-1] == pytest.approx(1.0) and cv["tpr"][-1] == pytest.approx(1.0)
    assert len(cv["pro"]) == len(cv["pro_fpr"]) == len(cv["thresholds"])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrep")
    data = make_mvtec(root / "data")
    out = root / "out"
    seg = Segmenter(models="tiny", device="cpu", precision="fp32", batch_size=3)
    table = evaluate_anomaly(data, out, seg, preset="crane", progress=False, log=lambda m: None)
    return data, out, table


def _records(folder: Path) -> dict[str, dict]:
    recs = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    return {r["key"]: r for r in recs}


def test_eval_saves_the_f1_optimal_thresholds(evaluated):
    data, out, table = evaluated
    th = read_thresholds(out / "thresholds.json")
    assert th.source == "eval-f1-max" and set(th.categories) == {"widget"}
    assert th.belongs_to["preset"] == "crane" and th.belongs_to["models"] == "tiny"
    entry = th.categories["widget"]
    assert (th.threshold, th.image_threshold) == (entry["threshold"], entry["image_threshold"])
    assert table.extra["f1_thresholds"]["widget"]["threshold"] == entry["threshold"]
    row = table.rows[0]
    assert entry["image_f1_max"] == pytest.approx(row["image_f1_max"], abs=1e-12)
    assert entry["pixel_f1_max"] == pytest.approx(row["pixel_f1_max"], abs=1e-12)
    # the thresholds reach those F1 on the stored predictions
    recs = _records(out / "predictions" / "anomaly")
    samples = read_anomaly(data)
    keys = [s.image_path.relative_to(data).as_posix() for s in samples]
    labels = [s.label for s in samples]
    scores = np.array([recs[k]["scores"]["score"] for k in keys])
    assert f1_score(labels, scores >= entry["image_threshold"]) == pytest.approx(
        row["image_f1_max"], abs=1e-12
    )
    maps = np.stack([np.load(out / "predictions/anomaly" / recs[k]["outputs"]["eval_map"])
                     for k in keys])  # fmt: skip
    masks = np.stack([resize_mask(load_anomaly_mask(s)) for s in samples])
    got = f1_score(masks.ravel(), (maps >= entry["threshold"]).ravel())
    # the binned F1 puts a pixel in a bin with float64 arithmetic; `map >= t` compares in the
    # maps' float32: pixels within rounding of the bin edge may land on the other side
    edge = np.abs(maps.astype(np.float64) - entry["threshold"]) < 1e-6
    assert abs(got - row["pixel_f1_max"]) <= 4 * edge.sum() / max(masks.sum(), 1) + 1e-12
    assert pick(th, "widget")[:2] == (entry["threshold"], entry["image_threshold"])


def test_eval_report_has_curves_table_and_strips(evaluated):
    pytest.importorskip("matplotlib", reason="the [plots] extra draws the curves")
    _data, out, table = evaluated
    text = (out / "report_anomaly.html").read_text(encoding="utf-8")
    assert not re.search(r"https?://", text) and "<script src" not in text
    assert "alt='ROC, PR and PRO curves of widget'" in text
    png = re.search(r"alt='ROC, PR and PRO curves of widget' src='data:image/png;base64,", text)
    assert png
    assert "<th>pixel thr @F1</th>" in text and f"{100 * table.rows[0]['image_auroc']:.1f}" in text
    th = table.extra["f1_thresholds"]["widget"]
    n_fp = sum(1 for k, r in _records(out / "predictions/anomaly").items()
               if "/good/" in k and r["scores"]["score"] >= th["image_threshold"])  # fmt: skip
    assert "Worst false positives at the image threshold" in text
    m = re.search(r"Worst false positives at the image threshold \S+ \((\d+) in all", text)
    assert m and int(m.group(1)) == n_fp
    strips = re.findall(r"<div class='strip'><img alt='strip' src='data:image/png;base64,", text)
    # worst false positives and negatives, else the closest good / anomalous images
    recs = _records(out / "predictions/anomaly")
    n_good = sum("/good/" in k for k in recs)
    n_bad = len(recs) - n_good
    n_fn = sum(1 for k, r in recs.items()
               if "/good/" not in k and r["scores"]["score"] < th["image_threshold"])  # fmt: skip
    assert len(strips) == min(WORST_K, n_fp or n_good) + min(WORST_K, n_fn or n_bad)
    if not n_fp:
        assert "no false positive; the highest-scored good images" in text


def test_eval_report_without_matplotlib_says_how(evaluated, monkeypatch):
    _data, out, table = evaluated
    from zsdense.eval import report as rep

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    data = {"widget": {"thresholds": table.extra["f1_thresholds"]["widget"], "curves": {}}}
    text = render_anomaly_report(table, data, 518)
    assert "pip install 'zsdense[plots]'" in text and "curves of widget" not in text
    assert "<th>image thr @F1</th>" in text
    assert rep._plot({}, "x") is None


def test_eval_thresholds_feed_anomaly_and_decide(evaluated, tmp_path, capsys):
    from zsdense.cli.main import main

    data, out, _ = evaluated
    th = read_thresholds(out / "thresholds.json").categories["widget"]
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["anomaly", str(data / "widget" / "test" / "crack"), "--out", str(run), "--models",
              "tiny", "--precision", "fp32", "-q", "--object", "widget", "--thresholds",
              str(out / "thresholds.json")])  # fmt: skip
    assert e.value.code == 0, capsys.readouterr().err
    for r in _records(run).values():
        assert r["scores"]["threshold"] == th["threshold"]
        assert r["scores"]["image_threshold"] == th["image_threshold"]
    # decide accepts the same file (the run's object picks the category)
    with pytest.raises(SystemExit) as e:
        main(["decide", str(run), "--thresholds", str(out / "thresholds.json"), "-q"])
    assert e.value.code == 0


def test_eval_cli_prints_thresholds_and_report(tmp_path):
    from click.testing import CliRunner

    from zsdense.cli.eval import eval_group

    data = make_mvtec(tmp_path / "data", n_good=2, n_bad=2, size=28)
    out = tmp_path / "out"
    args = ["anomaly", "--data", str(data), "--out", str(out), *["--models", "tiny"]]
    r = CliRunner().invoke(eval_group, [*args, "--precision", "fp32", "-q"])
    assert r.exit_code == 0, r.output
    assert "F1-optimal thresholds [widget]" in r.output
    assert f"thresholds saved: {out / 'thresholds.json'}" in r.output
    assert f"report: {out / 'report_anomaly.html'}" in r.output
