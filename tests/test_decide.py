"""``zsdense decide``: re-derive masks, overlays, manifest lines and report from saved maps, with
no model; the decision recorded so that resume and the changed-settings refusal stay true;
thresholds saved for reuse (``thresholds.json``, ``--thresholds``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from zsdense.engine.decide import PENDING_KEY, calibrate_values, decide
from zsdense.io.instances import mask_instances
from zsdense.io.thresholds import read_thresholds

TINY = ["--models", "tiny", "--precision", "fp32"]


def _data(root: Path, n_good: int = 3, n_bad: int = 2, size: int = 40) -> Path:
    rng = np.random.default_rng(7)
    for sub, n in (("good", n_good), ("bad", n_bad)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(70, 120, (size, size + 4 * i, 3), dtype=np.uint8)
            if sub == "bad":
                a[5 + 3 * i : 18 + 3 * i, 8:20] = 240
            Image.fromarray(a).save(root / sub / f"{sub}{i}.png")
    return root


def _cli(args: list, capsys=None) -> tuple[int, str, str]:
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    if capsys is not None:
        cap = capsys.readouterr()
        return int(e.value.code or 0), cap.out, cap.err
    return int(e.value.code or 0), "", ""


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _ok(out: Path) -> list[dict]:
    return [r for r in _records(out) if r["status"] == "ok"]


def _map(out: Path, rec: dict) -> np.ndarray:
    p = out / rec["outputs"]["map"]
    return np.load(p) if p.suffix == ".npy" else tifffile.imread(p)


def _mask(out: Path, rec: dict) -> np.ndarray:
    return np.asarray(Image.open(out / rec["outputs"]["mask"])) > 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny anomaly run with tiff maps (shared; tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("decide")
    data = _data(root / "data")
    out = root / "out"
    code, _, err = _cli(["anomaly", data, "--out", out, *TINY, "-q"])
    assert code == 0, err
    return data, out


def _copy(run_dir, tmp_path) -> tuple[Path, Path]:
    import shutil

    data, out = run_dir
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    # the manifest names inputs by absolute path: the data folder stays where it is
    return data, dst


def _quantile_threshold(out: Path, q: float = 0.8) -> float:
    maps = np.concatenate([_map(out, r).ravel() for r in _ok(out)])
    return float(np.quantile(maps, q))


def test_decide_rule_is_map_ge_threshold_and_score_ge_image_threshold():
    m = np.array([[0.1, 0.5], [0.49, 0.9]], np.float32)
    mask, label = decide(m, 0.7, 0.5, 0.7)
    assert mask.tolist() == [[False, True], [False, True]] and label is True
    assert decide(m, 0.69, 0.5, 0.7)[1] is False
    assert decide(m, 0.69, 0.5, None)[1] is None
    assert calibrate_values([m, np.array([2.0])]) == 2.0
    assert calibrate_values([m], 50) == pytest.approx(float(np.percentile(m, 50)))


def test_decide_without_a_model_matches_a_fresh_run(run_dir, tmp_path):
    data, out = _copy(run_dir, tmp_path)
    thr = _quantile_threshold(out)
    before = {r["key"]: r for r in _ok(out)}
    overlay_bytes = {k: (out / r["outputs"]["overlay"]).read_bytes() for k, r in before.items()}
    # a separate interpreter: proves that decide imports no torch (so loads no model)
    code = (
        "import sys, time; from zsdense.cli.main import main\n"
        "t = time.perf_counter()\n"
        "try:\n"
        f"    main(['decide', {str(out)!r}, '--threshold', {thr!r}, '--image-threshold', '0.5',"
        " '--json', '-q'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'decide imported torch'\n"
        "print('SECONDS', time.perf_counter() - t, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["decided"] == len(before) and summary["failed"] == 0
    assert summary["thresholds"]["threshold"] == thr
    assert summary["thresholds"]["previous"]["threshold"] == 0.5  # the run's default

    after = {r["key"]: r for r in _ok(out)}
    assert list(after) == list(before)
    for key, rec in after.items():
        amap = _map(out, rec)
        mask = _mask(out, rec)
        assert np.array_equal(mask, amap >= thr), key
        s = rec["scores"]
        assert list(s) == list(before[key]["scores"])  # same keys, same order
        assert s["threshold"] == thr and s["threshold_source"] == "fixed"
        assert s["image_threshold"] == 0.5 and s["label"] == (s["score"] >= 0.5)
        assert s["defect_area"] == round(float(mask.mean()), 6)
        assert rec["instances"] == json.loads(json.dumps(mask_instances(mask, amap)))
        assert rec["meta"]["result"]["decided"]["previous"]["threshold"] == 0.5
        if s["defect_area"] != before[key]["scores"]["defect_area"]:  # another outline
            assert (out / rec["outputs"]["overlay"]).read_bytes() != overlay_bytes[key]

    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["tasks"]["anomaly"]["threshold"] == thr
    assert settings["tasks"]["anomaly"]["image_threshold"] == 0.5
    assert settings["decided"]["threshold"] == thr and PENDING_KEY not in settings
    th = read_thresholds(out / "thresholds.json")
    assert (th.threshold, th.image_threshold, th.source) == (thr, 0.5, "decide")
    assert th.belongs_to["preset"] == "crane" and th.belongs_to["models"] == "tiny"
    assert "zsdense decide" in (out / "report.html").read_text()

    # a fresh run with the decided thresholds writes the same files and decisions
    fresh = tmp_path / "fresh"
    rc, _, err = _cli(["anomaly", data, "--out", fresh, *TINY, "-q", "--threshold", thr,
                       "--image-threshold", "0.5"])  # fmt: skip
    assert rc == 0, err
    for rec in _ok(fresh):
        d = after[rec["key"]]
        assert rec["scores"] == d["scores"] and rec["instances"] == d["instances"]
        assert (fresh / rec["outputs"]["mask"]).read_bytes() == (
            out / d["outputs"]["mask"]
        ).read_bytes()
        assert (fresh / rec["outputs"]["overlay"]).read_bytes() == (
            out / d["outputs"]["overlay"]
        ).read_bytes()


def test_resume_after_decide_refuses_old_thresholds_and_resumes_decided(run_dir, tmp_path, capsys):
    data, out = _copy(run_dir, tmp_path)
    thr = _quantile_threshold(out, 0.9)
    assert _cli(["decide", out, "--threshold", thr, "-q"], capsys)[0] == 0
    decided = _records(out)

    code, _, err = _cli(["anomaly", data, "--out", out, *TINY, "-q"], capsys)
    assert code == 2
    assert "re-decided by `zsdense decide`" in err and f"--threshold {thr!r}" in err
    assert _records(out) == decided  # refused before touching anything

    code, _, err = _cli(["anomaly", data, "--out", out, *TINY, "--threshold", thr], capsys)
    assert code == 0, err
    assert "skipped" in err and _records(out)[0]["scores"] == decided[0]["scores"]

    # a new input joins the folder with the decided threshold
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(data / "good" / "zz_new.png")
    try:
        code, _, err = _cli(
            ["anomaly", data, "--out", out, *TINY, "--thresholds", out / "thresholds.json"],
            capsys,
        )
        assert code == 0, err
        new = next(r for r in _records(out) if r["key"].endswith("zz_new.png"))
        assert new["scores"]["threshold"] == thr
        assert np.array_equal(_mask(out, new), _map(out, new) >= thr)
    finally:
        (data / "good" / "zz_new.png").unlink()


def test_interrupted_decide_is_refused_until_rerun(run_dir, tmp_path, capsys):
    data, out = _copy(run_dir, tmp_path)
    sp = out / "run_settings.json"
    s = json.loads(sp.read_text())
    s[PENDING_KEY] = {"task": "anomaly", "threshold": 0.3, "command": "zsdense decide X"}
    sp.write_text(json.dumps(s))
    code, _, err = _cli(["anomaly", data, "--out", out, *TINY, "-q"], capsys)
    assert code == 2 and "was interrupted" in err and "zsdense decide X" in err
    assert _cli(["decide", out, "--threshold", "0.3", "-q"], capsys)[0] == 0
    assert PENDING_KEY not in json.loads(sp.read_text())


def test_image_threshold_only_keeps_masks(run_dir, tmp_path, capsys):
    _data_dir, out = _copy(run_dir, tmp_path)
    masks = {r["key"]: (out / r["outputs"]["mask"]).read_bytes() for r in _ok(out)}
    scores = sorted(r["scores"]["score"] for r in _ok(out))
    ith = (scores[1] + scores[2]) / 2
    code, stdout, _ = _cli(["decide", out, "--image-threshold", ith, "--json", "-q"], capsys)
    assert code == 0
    js = json.loads(stdout)
    assert js["changed_masks"] == 0 and js["anomalous"] == sum(s >= ith for s in scores)
    for r in _ok(out):
        assert (out / r["outputs"]["mask"]).read_bytes() == masks[r["key"]]
        assert r["scores"]["threshold"] == 0.5 and r["scores"]["label"] == (
            r["scores"]["score"] >= ith
        )
        assert r["scores"]["threshold_source"] == "default"  # the kept value keeps its source
    # only the image threshold became an option: the run resumes with just that option
    tset = json.loads((out / "run_settings.json").read_text())["tasks"]["anomaly"]
    assert tset["threshold"] is None and tset["image_threshold"] == ith
    assert js["resume_options"] == f"--image-threshold {ith!r}"
    code, _, err = _cli(["anomaly", _data_dir, "--out", out, *TINY, "--image-threshold", ith],
                        capsys)  # fmt: skip
    assert code == 0 and "skipped" in err, err


def test_calibrate_with_good_inputs_of_the_run(run_dir, tmp_path, capsys):
    data, out = _copy(run_dir, tmp_path)
    good = [r for r in _ok(out) if r["key"].startswith("good/")]
    want_thr = max(float(_map(out, r).max()) for r in good)
    want_ithr = max(r["scores"]["score"] for r in good)
    code, stdout, err = _cli(
        ["decide", out, "--calibrate-with", data / "good", "--json", "-q"], capsys
    )
    assert code == 0, err
    js = json.loads(stdout)
    assert js["thresholds"]["threshold"] == pytest.approx(want_thr, rel=1e-7)
    assert js["thresholds"]["image_threshold"] == pytest.approx(want_ithr, rel=1e-12)
    assert js["calibration"]["n_images"] == len(good)
    for r in _ok(out):
        assert r["scores"]["threshold_source"] == "calibrated"
        assert r["scores"]["label"] == (r["scores"]["score"] >= js["thresholds"]["image_threshold"])
    # max over the good maps: only the good pixels at that max are in a good image's mask
    assert sum(int(_mask(out, r).sum()) for r in good) >= 1
    for r in good:
        assert np.array_equal(_mask(out, r), _map(out, r) >= js["thresholds"]["threshold"])
    th = read_thresholds(out / "thresholds.json")
    assert th.source == "calibrated" and th.detail["calibration"]["n_images"] == len(good)

    other = tmp_path / "unseen"
    _data(other, n_good=1, n_bad=0)
    code, _, err = _cli(["decide", out, "--calibrate-with", other / "good", "-q"], capsys)
    assert code == 2 and "not inputs of the run" in err and "zsdense anomaly GOOD" in err


def test_format_none_and_bad_folders_are_clear_errors(tmp_path, capsys, run_dir):
    data, _ = run_dir
    out = tmp_path / "nomaps"
    assert _cli(["anomaly", data / "bad", "--out", out, *TINY, "-q", "--format", "none"])[0] == 0
    code, _, err = _cli(["decide", out, "--threshold", "0.4"], capsys)
    assert code == 2 and "--format none" in err and "no float maps" in err
    code, _, err = _cli(["decide", tmp_path, "--threshold", "0.4"], capsys)
    assert code == 2 and "not the output folder" in err
    _, out2 = _copy(run_dir, tmp_path)
    code, _, err = _cli(["decide", out2], capsys)
    assert code == 2 and "nothing to decide" in err


def test_calibrated_run_saves_thresholds_and_anomaly_reuses_them(run_dir, tmp_path, capsys):
    data, _ = run_dir
    out = tmp_path / "cal"
    code, _, err = _cli(
        ["anomaly", data / "bad", "--out", out, *TINY, "-q", "--calibrate-with", data / "good"],
        capsys,
    )
    assert code == 0, err
    th = read_thresholds(out / "thresholds.json")
    rec = _ok(out)[0]
    assert th.source == "calibrated"
    assert th.threshold == rec["scores"]["threshold"]
    assert th.image_threshold == rec["scores"]["image_threshold"]
    assert th.detail["calibration"]["n_images"] == 3

    out2 = tmp_path / "reuse"
    code, _, err = _cli(
        ["anomaly", data / "bad", "--out", out2, *TINY, "-q", "--thresholds",
         out / "thresholds.json"], capsys)  # fmt: skip
    assert code == 0, err
    for r in _ok(out2):
        assert r["scores"]["threshold"] == th.threshold
        assert r["scores"]["image_threshold"] == th.image_threshold

    bad = tmp_path / "other.json"
    d = json.loads((out / "thresholds.json").read_text())
    d["belongs_to"]["preset"] = "musc"
    bad.write_text(json.dumps(d))
    code, _, err = _cli(
        ["anomaly", data / "bad", "--out", tmp_path / "x", *TINY, "--thresholds", bad], capsys
    )
    assert code == 2 and "other settings" in err and "preset" in err


def test_decide_is_fast(run_dir, tmp_path, capsys):
    """Seconds, not model time: a loose bound on this shared 2-core machine."""
    _d, out = _copy(run_dir, tmp_path)
    t0 = time.perf_counter()
    assert _cli(["decide", out, "--threshold", "0.6", "-q", "--no-overlay"], capsys)[0] == 0
    assert time.perf_counter() - t0 < 30
    assert all("overlay" not in r["outputs"] for r in _ok(out))  # removed: would be stale


def test_decide_one_task_of_a_multitask_run(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(50, 200, (30, 34, 3), np.uint8)).save(
        d / "a.png"
    )
    out = tmp_path / "o"
    code, _, err = _cli(["run", d, "--out", out, *TINY, "-q", "--task", "anomaly", "--task",
                         "engine_dummy:spec,name=dummy,fmt=npy"], capsys)  # fmt: skip
    assert code == 0, err
    before = _records(out)[0]
    amap = tifffile.imread(out / before["outputs"]["anomaly"]["map"])
    t = float(np.quantile(amap, 0.5))
    code, stdout, err = _cli(["decide", out, "--threshold", t, "--json", "-q"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["task"] == "anomaly"
    rec = _records(out)[0]
    mask = np.asarray(Image.open(out / rec["outputs"]["anomaly"]["mask"])) > 0
    assert np.array_equal(mask, amap >= t)
    assert rec["scores"]["anomaly"]["threshold"] == t
    assert rec["scores"]["dummy"] == before["scores"]["dummy"]  # the other task is untouched
    assert rec["outputs"]["dummy"] == before["outputs"]["dummy"]
    assert rec["instances"]["anomaly"] == json.loads(json.dumps(mask_instances(mask, amap)))
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["tasks"]["anomaly"]["threshold"] == t
    text = (out / "report.html").read_text()
    assert "--task anomaly" in text or '"task":"anomaly"' in text
