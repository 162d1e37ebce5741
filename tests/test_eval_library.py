"""``zsdense.eval`` from Python: metric tables on a generated MVTec-layout set with the tiny
models, resume after an interruption and after SIGKILL, set-level heads, folder layouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from zsdense import Segmenter
from zsdense import metrics as M
from zsdense.engine.specs import TaskSpec
from zsdense.errors import ConfigError, WeightsError, ZsdenseError
from zsdense.eval import (
    EvalInterrupted,
    MetricTable,
    evaluate_anomaly,
    evaluate_openvocab,
    evaluate_refer,
)
from zsdense.eval.anomaly import resize_mask
from zsdense.eval.datasets import load_anomaly_mask, read_anomaly


def make_mvtec(root: Path, n_good: int = 4, n_bad: int = 4, size: int = 48) -> Path:
    """One MVTec category 'widget': noisy good images, bright square defects with masks."""
    rng = np.random.default_rng(1)
    cat = root / "widget"
    for i in range(n_good):
        p = cat / "test" / "good" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(80, 120, (size, size, 3), dtype=np.uint8)).save(p)
    for i in range(n_bad):
        arr = rng.integers(80, 120, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[4 + 5 * i : 16 + 5 * i, 6 + 4 * i : 18 + 4 * i] = 255
        arr[mask > 0] = 245
        p = cat / "test" / "crack" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)
        m = cat / "ground_truth" / "crack" / f"{i:03d}_mask.png"
        m.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(m)
    return root


def _records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]


class _Stop(Exception):
    pass


def _stop_after(n: int):
    seen = []

    def hook(record: dict) -> None:
        seen.append(record["key"])
        if len(seen) == n:
            raise _Stop(f"stopped after {n} records")

    return hook, seen


def _tiny() -> Segmenter:
    return Segmenter(models="tiny", device="cpu", precision="fp32", batch_size=2)


def test_evaluate_anomaly_tiny_values_and_resume_after_interruption(tmp_path):
    data = make_mvtec(tmp_path / "data")
    seg = _tiny()
    quiet = dict(progress=False, log=lambda m: None)

    # uninterrupted reference run
    ref_out = tmp_path / "ref"
    ref = evaluate_anomaly(data, ref_out, seg, preset="crane", **quiet)
    assert isinstance(ref, MetricTable)
    row = ref.rows[0]
    assert row["category"] == "widget" and row["n_images"] == 8 and row["n_anomalous"] == 4
    # the table's values are the metrics of the stored predictions, recomputed here
    recs = {r["key"]: r for r in _records(ref_out / "predictions/anomaly")}
    samples = read_anomaly(data)
    keys = [s.image_path.relative_to(data).as_posix() for s in samples]
    labels = [s.label for s in samples]
    scores = [recs[k]["scores"]["score"] for k in keys]
    assert row["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert row["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    maps = np.stack(
        [np.load(ref_out / "predictions/anomaly" / recs[k]["outputs"]["eval_map"]) for k in keys]
    )
    masks = np.stack([resize_mask(load_anomaly_mask(s)) for s in samples])
    assert maps.shape == (8, 518, 518) and masks.any()
    exact = M.pixel_metrics(masks, maps)
    assert row["aupro"] == pytest.approx(exact["aupro"], abs=1e-9)
    assert row["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=2e-3)
    assert ref.mean["image_auroc"] == row["image_auroc"]  # one category: mean = the row
    saved = json.loads((ref_out / "metrics_anomaly.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(ref.to_dict()["rows"]))
    assert "NOT meaningful" in saved["config"]["warning"]

    # interrupted after 3 records (mid-batch: batch size 2), then resumed
    out = tmp_path / "out"
    hook, seen = _stop_after(3)
    with pytest.raises(_Stop):
        evaluate_anomaly(data, out, seg, preset="crane", on_record=hook, **quiet)
    done = _records(out / "predictions/anomaly")
    assert [r["key"] for r in done] == seen and len(done) == 3
    assert not (out / "metrics_anomaly.json").exists()
    mtimes = {
        r["key"]: (out / "predictions/anomaly" / r["outputs"]["eval_map"]).stat().st_mtime_ns
        for r in done
    }
    time.sleep(0.05)
    again: list[str] = []
    resumed = evaluate_anomaly(
        data, out, seg, preset="crane", on_record=lambda r: again.append(r["key"]), **quiet
    )
    assert sorted(again) == sorted(set(keys) - set(seen))  # only the missing 5 predicted
    for r in _records(out / "predictions/anomaly"):
        if r["key"] in mtimes:
            p = out / "predictions/anomaly" / r["outputs"]["eval_map"]
            assert p.stat().st_mtime_ns == mtimes[r["key"]]  # not rewritten
    assert resumed.rows == ref.rows and resumed.mean == ref.mean

    # a metric-only rerun predicts nothing
    none: list[str] = []
    rerun = evaluate_anomaly(
        data, out, seg, preset="crane", metrics=["image_auroc"], on_record=none.append, **quiet
    )
    assert none == [] and rerun.rows[0]["image_auroc"] == ref.rows[0]["image_auroc"]


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from types import SimpleNamespace
    import numpy as np
    from zsdense import Segmenter
    from zsdense.engine.specs import TaskSpec
    from zsdense.eval import evaluate_anomaly

    manifest = Path(sys.argv[2]) / "predictions/anomaly/results.jsonl"
    calls = [0]

    def run(ctxs, params):
        # kill -9 from inside at a fixed point: mid-run, once two records are on disk
        calls[0] += 1
        if calls[0] >= 3:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if manifest.is_file() and len(manifest.read_text().splitlines()) >= 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.01)
        out = []
        for c in ctxs:
            g = c.image.mean(axis=2).astype(np.float32)
            out.append(SimpleNamespace(score=float(g.max()), anomaly_map=g))
        return out

    def head(name):
        return TaskSpec(name="anomaly", run=run, write=lambda *a: {})

    evaluate_anomaly(sys.argv[1], sys.argv[2], Segmenter(models="tiny", batch_size=1),
                     preset="stub", task=head, progress=False)
    """
)


def _gray_head(counter: list):
    def run(ctxs, params):
        counter.extend(ctxs)
        return [
            SimpleNamespace(
                score=float(c.image.mean(axis=2).max()),
                anomaly_map=c.image.mean(axis=2).astype(np.float32),
            )
            for c in ctxs
        ]

    return lambda name: TaskSpec(name="anomaly", run=run, write=lambda *a: {})


def test_sigkill_mid_run_then_resume(tmp_path):
    data = make_mvtec(tmp_path / "data")
    out = tmp_path / "out"
    script = tmp_path / "run_eval.py"
    script.write_text(_KILL_SCRIPT)
    manifest = out / "predictions/anomaly/results.jsonl"
    proc = subprocess.run(
        [sys.executable, str(script), str(data), str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    lines = manifest.read_text().splitlines()
    assert 2 <= len(lines) < 8 and not (out / "metrics_anomaly.json").exists()
    done = set()
    for x in lines:
        try:
            done.add(json.loads(x)["key"])
        except ValueError:  # a line torn by the kill: the engine drops it too
            pass
    seg = Segmenter(models="tiny", batch_size=1)
    predicted: list = []
    table = evaluate_anomaly(
        data,
        out,
        seg,
        preset="stub",
        task=_gray_head(predicted),
        progress=False,
        log=lambda m: None,
    )
    assert len(predicted) == 8 - len(done)  # the killed run's images are not predicted again
    ref_counter: list = []
    ref = evaluate_anomaly(
        data,
        tmp_path / "ref",
        seg,
        preset="stub",
        task=_gray_head(ref_counter),
        progress=False,
        log=lambda m: None,
    )
    assert len(ref_counter) == 8
    assert table.rows == ref.rows  # identical metrics
    assert table.rows[0]["image_auroc"] == 1.0  # bright defects: the gray max separates them


def test_set_level_head_predicts_the_whole_category_again(tmp_path):
    data = make_mvtec(tmp_path / "data")
    seg = Segmenter(models="tiny", batch_size=2)
    calls: list[int] = []

    def head(name):
        def run(ctxs, params):
            calls.append(len(ctxs))
            g = [c.image.mean(axis=2).astype(np.float32) for c in ctxs]
            mean = float(np.mean([x.max() for x in g]))  # depends on the whole set
            return [SimpleNamespace(score=float(x.max()) - mean, anomaly_map=x) for x in g]

        return TaskSpec(name="anomaly", run=run, write=lambda *a: {}, group="all")

    quiet = dict(progress=False, log=lambda m: None)
    hook, seen = _stop_after(2)
    with pytest.raises(_Stop):
        evaluate_anomaly(
            data, tmp_path / "o", seg, preset="set", task=head, on_record=hook, **quiet
        )
    assert calls == [8]  # one set
    table = evaluate_anomaly(data, tmp_path / "o", seg, preset="set", task=head, **quiet)
    assert calls == [8, 8]  # a partly stored set is predicted again as a whole
    evaluate_anomaly(data, tmp_path / "o", seg, preset="set", task=head, **quiet)
    assert calls == [8, 8]  # complete: reused
    # another --limit changes the set: predicted again
    evaluate_anomaly(data, tmp_path / "o", seg, preset="set", task=head, limit=4, **quiet)
    assert calls == [8, 8, 4]
    assert table.rows[0]["n_images"] == 8


def test_folder_set_with_and_without_masks(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "bolt"
    for i in range(3):
        p = root / "good" / f"g{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(80, 120, (32, 32, 3), dtype=np.uint8)).save(p)
        arr = rng.integers(80, 120, (32, 32, 3), dtype=np.uint8)
        arr[4 + 6 * i : 12 + 6 * i, 8:20] = 240
        p = root / "bent" / f"b{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)
    seg = Segmenter(models="tiny", batch_size=4)

    # no masks: image metrics, pixel metrics None (not NaN), said once
    logs: list[str] = []
    seen: list = []
    t = evaluate_anomaly(
        root,
        tmp_path / "o1",
        seg,
        preset="stub",
        task=_gray_head(seen),
        progress=False,
        log=logs.append,
    )
    row = t.rows[0]
    assert row["n_images"] == 6 and row["image_auroc"] == 1.0
    assert all(row.get(k) is None for k in ("pixel_auroc", "pixel_ap", "aupro"))
    assert t.mean["pixel_auroc"] is None
    said = [m for m in logs if "pixel metrics need ground-truth masks" in m]
    assert len(said) == 1 and t.notes == said
    saved = json.loads((tmp_path / "o1" / "metrics_anomaly.json").read_text())
    assert saved["rows"][0]["image_auroc"] == 1.0 and saved["mean"]["pixel_auroc"] is None
    assert "NaN" not in (tmp_path / "o1" / "metrics_anomaly.json").read_text()

    # MVTec-style ground_truth/ masks in the folder layout: used as masks, never as images
    for i in range(3):
        m = np.zeros((32, 32), np.uint8)
        m[4 + 6 * i : 12 + 6 * i, 8:20] = 255
        p = root / "ground_truth" / "bent" / f"b{i}_mask.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(p)
    seen.clear()
    t = evaluate_anomaly(
        root,
        tmp_path / "o2",
        seg,
        preset="stub",
        task=_gray_head(seen),
        progress=False,
        log=lambda m: None,
    )
    row = t.rows[0]
    assert len(seen) == 6 and row["n_images"] == 6 and row["n_anomalous"] == 3
    assert row["pixel_auroc"] == pytest.approx(1.0, abs=1e-3) and not t.notes


def test_missing_weights_is_a_setup_error_and_the_rerun_predicts_everything(tmp_path):
    data = make_mvtec(tmp_path / "data", n_good=2, n_bad=2)
    seg = Segmenter(models="tiny", batch_size=2)
    quiet = dict(progress=False, log=lambda m: None)

    def offline(name):
        def run(ctxs, params):
            raise WeightsError("checkpoint ViT-L-14-336.pt not found offline; pass --weights-dir")

        return TaskSpec(name="anomaly", run=run, write=lambda *a: {})

    with pytest.raises(ZsdenseError, match="no input could be predicted: checkpoint") as err:
        evaluate_anomaly(data, tmp_path / "o", seg, preset="stub", task=offline, **quiet)
    assert err.value.exit_code == 2
    assert not (tmp_path / "o" / "metrics_anomaly.json").exists()
    seen: list = []
    table = evaluate_anomaly(
        data, tmp_path / "o", seg, preset="stub", task=_gray_head(seen), **quiet
    )
    assert len(seen) == 4 and table.rows[0]["n_failed"] == 0 and not table.failed


def test_openvocab_and_refer_through_the_real_heads_tiny(tmp_path):
    """The heads ``zsdense openvocab`` / ``zsdense refer`` run (tiny models) store their label
    maps and masks, and the tables are the metrics of those stored predictions."""
    rng = np.random.default_rng(7)
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("background\ncat\n")
    gts = {}
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.jpg"
        )
        g = np.zeros((40, 56), np.uint8)
        g[:, 28:] = 1
        Image.fromarray(g).save(root / "labels" / f"{i}.png")
        gts[f"{i}.jpg"] = g
    seg = Segmenter(models="tiny", device="cpu", precision="fp32")
    quiet = dict(progress=False, log=lambda m: None)
    t = evaluate_openvocab(root, tmp_path / "o", seg, preset="sclip", **quiet)
    acc = M.IoUAccumulator(2)
    for rec in _records(tmp_path / "o/predictions/openvocab"):
        pred = np.asarray(Image.open(tmp_path / "o/predictions/openvocab" / rec["outputs"]["mask"]))
        acc.update(pred.astype(np.int64), gts[rec["key"]].astype(np.int64))
    assert [r["class"] for r in t.rows] == ["background", "cat"]
    assert t.mean["iou"] == pytest.approx(acc.metrics()["miou"], abs=1e-12)
    assert t.extra["summary"]["n_images"] == 2

    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    m = np.zeros((48, 64), np.uint8)
    m[:24] = 255
    Image.fromarray(m).save(tmp_path / "a_gt.png")
    lines = [
        {"image": "a.jpg", "text": text, "mask": "a_gt.png", "id": f"s{n}"}
        for n, text in enumerate(["the cat on the left", "a dog"])
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    t = evaluate_refer(tmp_path / "q.jsonl", tmp_path / "r", seg, **quiet)
    recs = {r["key"]: r for r in _records(tmp_path / "r/predictions/refer")}
    assert sorted(recs) == ["a.jpg#s0", "a.jpg#s1"]
    assert recs["a.jpg#s0"]["scores"]["text"] == "the cat on the left"
    ref = M.ReferAccumulator()
    for key in ("a.jpg#s0", "a.jpg#s1"):
        pred = np.asarray(
            Image.open(tmp_path / "r/predictions/refer" / recs[key]["outputs"]["mask"])
        )
        ref.update(pred > 0, m > 0)
    assert t.mean["oiou"] == pytest.approx(ref.metrics()["oiou"], abs=1e-12)
    assert [x["id"] for x in t.extra["per_sample"]] == ["s0", "s1"]
    # fallbacks (no SAM mask: the whole image) are scored, and counted in a note
    fb = [recs[k]["fallback"] for k in ("a.jpg#s0", "a.jpg#s1")]
    assert [x["fallback"] for x in t.extra["per_sample"]] == fb
    note = f"{sum(fb)} of 2 expression(s) got the method's fallback"
    assert any(note in n for n in t.notes) == any(fb)


def test_ctrl_c_finishes_the_batch_then_raises_eval_interrupted(tmp_path):
    data = make_mvtec(tmp_path / "data")
    seg = Segmenter(models="tiny", batch_size=2)
    quiet = dict(progress=False, log=lambda m: None)
    seen: list = []
    # whatever the process had (Python's default handler; SIG_IGN when started in the
    # background by a shell): the engine must put it back
    before = signal.getsignal(signal.SIGINT)

    def ctrl_c_once(record: dict) -> None:
        if not seen:
            os.kill(os.getpid(), signal.SIGINT)  # the engine's handler: finish this batch
        seen.append(record["key"])

    with pytest.raises(EvalInterrupted, match="rerun the same command") as err:
        evaluate_anomaly(
            data,
            tmp_path / "o",
            seg,
            preset="stub",
            task=_gray_head([]),
            on_record=ctrl_c_once,
            **quiet,
        )
    # the first record is written (in the writer thread) while the second batch computes:
    # that batch, the current one, is finished and written, nothing more is started
    assert err.value.exit_code == 130 and len(seen) == 4
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    rest: list = []
    table = evaluate_anomaly(
        data, tmp_path / "o", seg, preset="stub", task=_gray_head(rest), **quiet
    )
    assert len(rest) == 4 and table.rows[0]["n_images"] == 8


def test_few_shot_evaluation_draws_references_from_train_good(tmp_path):
    """``anomalydino`` with shots/seed: references are ``sorted(train/good)[seed·n:(seed+1)·n]``;
    another seed draws other references and stores other predictions."""
    from zsdense.eval import evaluate_anomaly

    root = make_mvtec(tmp_path / "mv", n_good=2, n_bad=2, size=56)
    rng = np.random.default_rng(5)
    train = root / "widget" / "train" / "good"
    train.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(80, 120, (56, 56, 3), dtype=np.uint8)).save(
            train / f"{i:03d}.png"
        )
    seg = Segmenter(models="tiny")
    kw = dict(preset="anomalydino", progress=False, log=lambda m: None)
    t0 = evaluate_anomaly(root, tmp_path / "e0", seg, shots=2, seed=0, **kw)
    t1 = evaluate_anomaly(root, tmp_path / "e1", seg, shots=2, seed=1, **kw)
    from zsdense.tasks.fewshot import select_references

    pool = sorted(train.iterdir())
    assert select_references(pool, 2, 0) == pool[:2]
    assert select_references(pool, 2, 1) == pool[2:]
    assert t0.config["shots"] == 2 and t1.config["seed"] == 1
    # other references, other predictions
    assert t0.rows[0]["image_auroc"] != t1.rows[0]["image_auroc"] or t0.rows != t1.rows
    p0 = _records(tmp_path / "e0" / "predictions" / "anomaly")
    p1 = _records(tmp_path / "e1" / "predictions" / "anomaly")
    assert [r["scores"]["score"] for r in p0] != [r["scores"]["score"] for r in p1]
    assert t0.rows[0]["n_images"] == t1.rows[0]["n_images"] == 4
    with pytest.raises(ConfigError, match="seed 2 with 2 shots"):
        evaluate_anomaly(root, tmp_path / "e2", seg, shots=2, seed=2, **kw)
