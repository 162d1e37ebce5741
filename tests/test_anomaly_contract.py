"""One contract for anomaly scorers: the registry, decisions made once outside the scorers,
run-level work done once, setup errors before the first input, progress for long phases.

Tiny models, small images; the counts of encoder passes are read from what the test builds
(reference and image counts, the few-shot rotations recorded in each result's meta).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsdense.errors import ConfigError
from zsdense.tasks import thresholds as T

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "inspection"
SIZE = 112  # Crane's input size on the tiny models (multiple of 14)
TINY = ["--models", "tiny", "--precision", "fp32", "--device", "cpu"]


def _save(img: Image.Image, path: Path, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").resize((size, size), Image.BILINEAR).save(path)
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """good/ (2 references), calib/ (2 known-good images), test/ (3 images), lot/ (5 images,
    one with a bright blob) and lot3/ (3 images) at 64x64."""
    root = tmp_path_factory.mktemp("parts")
    gravel = Image.open(ASSETS / "gravel.png")
    w, h = gravel.size
    crops = [gravel.crop((x, y, x + w // 2, y + h // 2)) for x in (0, w // 2) for y in (0, h // 2)]
    _save(crops[0], root / "good" / "g1.png")
    _save(crops[1], root / "good" / "g2.png")
    _save(crops[2], root / "calib" / "c1.png")
    _save(crops[3], root / "calib" / "c2.png")
    _save(Image.open(ASSETS / "gravel_scratch.png"), root / "test" / "a_scratch.png")
    _save(Image.open(ASSETS / "grass.png"), root / "test" / "b_grass.png")
    _save(Image.open(ASSETS / "brick.png"), root / "test" / "c_brick.png")
    for i in range(5):
        im = np.asarray(crops[i % 4].convert("RGB").resize((64, 64))).copy()
        if i == 3:
            im[20:36, 24:40] = 255
        _save(Image.fromarray(im), root / "lot" / f"p{i}.png")
    (root / "lot3").mkdir()
    for i in range(3):
        shutil.copy(root / "lot" / f"p{i}.png", root / "lot3")
    return root


def _invoke(args, capsys) -> tuple[int, str, str]:
    """``zsdense ARGS`` in this process with the console entry's error policy."""
    from zsdense.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out, cap.err


@pytest.fixture
def cli(capsys):
    """``cli(args) -> (exit code, stdout, stderr)``."""
    return lambda args: _invoke(args, capsys)


def _records(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---- decisions: one pure function and a small record -----------------------------------------


def test_decide_and_the_thresholds_record():
    amap = np.array([[0.1, 0.6], [0.5, 0.2]], dtype=np.float32)
    th = T.Thresholds(pixel=0.5, pixel_source="fixed", image=0.3, image_source="calibrated")
    mask, label = T.decide(amap, 0.35, th)
    np.testing.assert_array_equal(mask, amap >= 0.5)
    assert label is True
    assert T.decide(amap, 0.2, th)[1] is False
    assert T.decide(amap, 0.9, T.Thresholds(pixel=0.5))[1] is None  # no image threshold
    rec = json.loads(json.dumps(th.to_dict()))  # JSON-serialisable
    assert T.Thresholds.from_dict(rec) == th
    with pytest.raises(ConfigError, match="unknown threshold field"):
        T.Thresholds.from_dict({**rec, "pixl": 1})
    meta = th.meta()
    assert (meta["threshold"], meta["threshold_source"]) == (0.5, "fixed")
    assert (meta["image_threshold"], meta["image_threshold_source"]) == (0.3, "calibrated")
    # a label that the mask does not show is explained
    assert T.decision_note(np.zeros((2, 2), bool), True) and T.decision_note(mask, True) is None


def test_threshold_precedence():
    maps = [np.array([0.2, 0.7]), np.array([0.4])]
    calls = []

    def calibrate():
        calls.append(1)
        return maps, [0.1, 0.3]

    fixed = T.resolve_thresholds(threshold=0.9, image_threshold=0.8, calibrate=calibrate)
    assert (fixed.pixel, fixed.pixel_source, fixed.image, fixed.image_source) == (
        0.9,
        "fixed",
        0.8,
        "fixed",
    )
    assert not calls and fixed.calibration is None  # nothing missing: no calibration pass
    cal = T.resolve_thresholds(threshold=0.9, calibrate=calibrate)
    assert (cal.pixel_source, cal.image, cal.image_source) == ("fixed", 0.3, "calibrated")
    pct = T.resolve_thresholds(calibrate=calibrate, percentile=50)
    assert pct.pixel == pytest.approx(np.percentile([0.2, 0.7, 0.4], 50))
    assert pct.calibration == {"n_images": 2, "rule": "percentile 50"}
    d = T.resolve_thresholds(default=lambda: T.Default(1.25, "references", "why"))
    assert (d.pixel, d.pixel_source, d.note, d.image) == (1.25, "references", "why", None)
    assert T.resolve_thresholds().pixel == 0.5  # the probability default


# ---- a third-party scorer through the CLI -------------------------------------------------------


@pytest.fixture
def plugin():
    import anomaly_plugin  # tests/helpers: registers the scorer and preset `colordist`

    from zsdense.tasks import anomaly_registry

    anomaly_registry.register_scorer(anomaly_plugin.SCORER, replace=True)
    anomaly_registry.register_anomaly_preset(anomaly_plugin.PRESET, replace=True)
    yield anomaly_plugin
    anomaly_registry.unregister("colordist")


def test_plugin_scorer_runs_from_the_cli(plugin, parts, tmp_path, cli):
    from zsdense.options import AnomalyOptions
    from zsdense.runtime import Runtime

    out = tmp_path / "out"
    before = len(plugin.PREPARED)
    code, _, err = cli(
        ["anomaly", parts / "test", "--out", out, "--preset", "colordist", "-q", "--batch-size", 1]
        + ["--reference", parts / "good", "--calibrate-with", parts / "calib" / "*.png"]
        + ["--format", "npy", "--no-overlay"]
        + TINY
    )
    assert code == 0, err
    recs = _records(out)
    assert len(recs) == len(list((parts / "test").iterdir())) and all(
        r["status"] == "ok" for r in recs
    )
    # prepared once for the run (three batches of one), with both references
    assert plugin.PREPARED[before:] == [len(list((parts / "good").iterdir()))]
    # thresholds were calibrated by zsdense with the plug-in's own maps of the good images
    opts = AnomalyOptions.from_mapping(preset="colordist", reference=str(parts / "good"))
    rt = Runtime(models="tiny", device="cpu", precision="fp32")
    state = plugin.prepare(rt, opts)
    calib = plugin.run(rt, rt.contexts(sorted((parts / "calib").iterdir())), opts, state)
    for r in recs:
        s = r["scores"]
        assert s["threshold_source"] == "calibrated" and s["label"] is not None
        assert s["threshold"] == pytest.approx(max(float(c.anomaly_map.max()) for c in calib))
        assert s["image_threshold"] == pytest.approx(max(c.score for c in calib))
        amap = np.load(out / r["outputs"]["map"])
        mask = np.asarray(Image.open(out / r["outputs"]["mask"])) > 0
        np.testing.assert_array_equal(mask, amap >= s["threshold"])
        assert s["label"] == (s["score"] >= s["image_threshold"])
        assert r["meta"]["result"]["method"] == "colordist"
    # without references it still runs (optional), with the default threshold
    code, _, err = cli(
        ["anomaly", parts / "test", "--out", tmp_path / "o2", "--preset", "colordist", "-q"] + TINY
    )
    assert code == 0, err
    assert {r["scores"]["threshold_source"] for r in _records(tmp_path / "o2")} == {"default"}


def test_registry_declarations_replace_method_checks():
    from zsdense.options import AnomalyOptions
    from zsdense.tasks import anomaly_methods, anomaly_registry

    sc = anomaly_registry.scorers()
    assert sc["musc"].group == "all" and sc["crane"].group == "batch"
    assert sc["anomalydino"].references == "required" and sc["crane"].references == "none"
    assert sc["crane+fewshot"].uses_prompts and not sc["anomalydino"].uses_prompts
    musc = AnomalyOptions.from_mapping(preset="musc")
    with pytest.raises(ConfigError, match="at least 5"):
        anomaly_methods.check_set_size(musc, 3)
    with pytest.raises(ConfigError, match="already registered"):
        anomaly_registry.register_scorer(
            anomaly_registry.AnomalyScorer(name="crane", prepare=print, run=print)
        )
    from zsdense.config import AnomalyPreset

    with pytest.raises(ConfigError, match="unknown anomaly scorer .nope."):
        anomaly_registry.register_anomaly_preset(AnomalyPreset(name="x", method="nope"))


# ---- crane+fewshot honours the calibration --------------------------------------------------


def test_crane_fewshot_calibrates(tiny_seg, parts):
    good, calib = str(parts / "good"), str(parts / "calib")
    tests = sorted((parts / "test").iterdir())
    kw = dict(preset="crane+fewshot", reference=good, image_size=SIZE)
    res = tiny_seg.anomaly_batch(tests, calibrate_with=calib, **kw)
    own = tiny_seg.anomaly_batch(sorted((parts / "calib").iterdir()), **kw)
    for r in res:
        assert r.meta["threshold_source"] == "calibrated"
        assert r.meta["image_threshold_source"] == "calibrated"
        assert r.threshold == pytest.approx(max(float(o.anomaly_map.max()) for o in own))
        assert r.image_threshold == pytest.approx(max(o.score for o in own))
        np.testing.assert_array_equal(r.mask, r.anomaly_map >= r.threshold)
    pct = tiny_seg.anomaly_batch(tests[:1], calibrate_with=calib, calibrate_percentile=90, **kw)
    allpix = np.concatenate([o.anomaly_map.ravel() for o in own])
    assert pct[0].threshold == pytest.approx(float(np.percentile(allpix, 90)), rel=1e-6)
    assert pct[0].meta["calibration"] == {"n_images": len(own), "rule": "percentile 90"}
    assert own[0].meta["threshold_source"] == "default" and own[0].threshold == 1.0


# ---- run-level work once: count the encoders' image passes ---------------------------------


@contextlib.contextmanager
def count_passes(rt, clip_arch: str, dino_names: list[str]):
    """Images through CLIP's and each DINOv2's patch embedding while the block runs (the
    runtime's cached models: a CLI run with the same settings uses the same ones)."""
    counts: Counter = Counter()
    handles = []

    def hook(name):
        return lambda mod, inp, out: counts.update({name: int(inp[0].shape[0])})

    clip = rt.clip(clip_arch)
    handles.append(clip.model.visual.conv1.register_forward_hook(hook("clip")))
    for name in dino_names:
        emb = rt.dinov2(name).model.embeddings.patch_embeddings
        handles.append(emb.register_forward_hook(hook(name)))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _fused_models():
    from zsdense.config import ANOMALY_PRESETS
    from zsdense.tasks.fewshot import FewShotOptions

    crane = ANOMALY_PRESETS["crane+"]
    return crane.clip_arch, crane.dino_name, FewShotOptions().model


def test_crane_fewshot_run_of_several_batches_passes_references_once(parts, tmp_path, cli):
    from zsdense.runtime import Runtime

    clip_arch, dattn_dino, few_dino = _fused_models()
    rt = Runtime(models="tiny", device="cpu", precision="fp32")
    n_ref = len(list((parts / "good").iterdir()))
    n_test = len(list((parts / "test").iterdir()))
    out = tmp_path / "fused"
    with count_passes(rt, clip_arch, [dattn_dino, few_dino]) as counts:
        code, _, err = cli(
            ["anomaly", parts / "test", "--out", out, "--preset", "crane+fewshot", "-q"]
            + ["--reference", parts / "good", "--batch-size", 1, "--image-size", SIZE]
            + TINY
        )
    assert code == 0, err
    recs = _records(out)
    assert len(recs) == n_test
    n_angles = len(recs[0]["meta"]["result"]["fewshot"]["rot_angles"])
    # Crane+ (CLIP and its D-Attn DINOv2) on each reference once and on each test image once;
    # the few-shot DINOv2 on every rotation of each reference once and on each test image once
    assert counts["clip"] == n_ref + n_test
    assert counts[dattn_dino] == n_ref + n_test
    assert counts[few_dino] == n_ref * n_angles + n_test


def test_successive_python_calls_reuse_the_run_level_work(parts):
    from zsdense import Segmenter

    clip_arch, dattn_dino, few_dino = _fused_models()
    seg = Segmenter(models="tiny", device="cpu", precision="fp32")
    good, calib = str(parts / "good"), str(parts / "calib")
    tests = sorted((parts / "test").iterdir())
    n_ref, n_cal = len(list((parts / "good").iterdir())), len(list((parts / "calib").iterdir()))
    with count_passes(seg.runtime, clip_arch, [dattn_dino, few_dino]) as counts:
        fused = [
            seg.anomaly(t, preset="crane+fewshot", reference=good, image_size=SIZE) for t in tests
        ]
    n_angles = len(fused[0].meta["fewshot"]["rot_angles"])
    assert counts["clip"] == counts[dattn_dino] == n_ref + len(tests)
    assert counts[few_dino] == n_ref * n_angles + len(tests)
    with count_passes(seg.runtime, clip_arch, [few_dino]) as counts:
        few = [
            seg.anomaly(t, preset="anomalydino", reference=good, calibrate_with=calib)
            for t in tests
        ]
    # the memory was built by the crane+fewshot calls above (same references and settings):
    # only the calibration images (once) and the test images remain
    assert counts[few_dino] == n_cal + len(tests) and counts["clip"] == 0
    assert len({r.threshold for r in few}) == 1 and few[0].meta["threshold_source"] == "calibrated"


# ---- setup errors: one message, exit 2, before the first input --------------------------------


def _bank(cli, parts, tmp_path, *extra) -> Path:
    bank = tmp_path / "bank.zsdmem"
    code, _, err = cli(["memory", "build", parts / "good", "--out", bank, "--force", *extra] + TINY)
    assert code == 0, err
    return bank


@pytest.mark.parametrize(
    "case", ["bank-without-crane-stats", "shots-above-references", "musc-calibration", "object"]
)
def test_setup_errors_before_the_first_input(case, parts, tmp_path, monkeypatch, cli):
    from zsdense.engine import local

    read = []
    real = local.read_units
    monkeypatch.setattr(local, "read_units", lambda *a, **k: read.append(a) or real(*a, **k))
    data, args, expect = parts / "test", [], ""
    if case == "bank-without-crane-stats":
        args = ["--preset", "crane+fewshot", "--reference", _bank(cli, parts, tmp_path)]
        expect = "Crane's statistics"
    elif case == "shots-above-references":
        args = ["--preset", "anomalydino", "--reference", parts / "good", "--shots", 10]
        expect = "--shots 10: only 2 reference image(s)"
    elif case == "musc-calibration":
        data = parts / "lot"
        args = ["--preset", "musc", "--calibrate-with", parts / "lot3", "--image-size", SIZE]
        expect = "calibration set has 3 image(s)"
    else:
        bank = _bank(cli, parts, tmp_path, "--crane-preset", "crane+", "--object", "brick")
        args = ["--preset", "crane+fewshot", "--reference", bank, "--object", "screw"]
        expect = "made for --object 'brick'"
    out = tmp_path / "out"
    code, _, err = cli(["anomaly", data, "--out", out, "--image-size", SIZE, *args] + TINY)
    assert code == 2, err
    assert expect in err and err.count("error:") == 1, err
    assert not read and not _records(out)  # no input was read, no record written


def test_bank_crane_stats_for_another_object(tiny_seg, parts, monkeypatch):
    """The prompt ensemble names the object: statistics made for another one are refused.
    Learned prompts are object-agnostic: the stored statistics apply, the result says so."""
    from zsdense.options import AnomalyOptions
    from zsdense.tasks import crane_head
    from zsdense.tasks import fewshot as fs
    from zsdense.tasks.fewshot import fusion

    good = str(parts / "good")
    bank = fs.build_memory(tiny_seg, good, fs.FewShotOptions(rotation=False))
    fs.add_crane_stats(tiny_seg, bank, good, "crane", "brick", {"image_size": SIZE})
    assert bank.extra["crane_stats"]["crane"]["object"] == "brick"
    copts = AnomalyOptions.from_mapping(preset="crane", object_name="screw", image_size=SIZE)
    with pytest.raises(ConfigError, match="made for --object 'brick'"):
        fusion.stored_crane_stats(tiny_seg.runtime, bank, copts)  # tiny: the ensemble
    monkeypatch.setattr(crane_head, "options_text", lambda rt, o: (None, {"prompts": "learned"}))
    stats, notes = fusion.stored_crane_stats(tiny_seg.runtime, bank, copts)
    assert stats.n_images == bank.n_shots and "object-agnostic" in notes["crane_stats_note"]


# ---- progress ------------------------------------------------------------------------------------


def test_phases_show_progress_before_the_run_and_failed_counts_agree(parts, tmp_path, cli):
    data = tmp_path / "data"
    shutil.copytree(parts / "test", data)
    (data / "z_broken.png").write_bytes(b"not a png")  # fails in the last batch
    out = tmp_path / "out"
    code, _, err = cli(
        ["anomaly", data, "--out", out, "--preset", "crane+fewshot", "--image-size", SIZE]
        + ["--reference", parts / "good", "--calibrate-with", parts / "calib" / "*.png"]
        + ["--batch-size", 1]
        + TINY
    )
    assert code == 3, err
    lines = [ln for ln in err.splitlines() if ln.startswith("zsdense: ")]
    first_run_line = next(i for i, ln in enumerate(lines) if " inputs (" in ln)
    phases = " ".join(lines[:first_run_line])
    for label in ("memory of good references", "on the good references", "calibration"):
        assert f"{label}: " in phases, err
    n_cal = len(list((parts / "calib").iterdir()))
    assert f"calibration: {n_cal}/{n_cal}" in phases
    summary = next(ln for ln in err.splitlines() if " failed, " in ln and "ok" in ln)
    failed = int(summary.split(" ok, ")[1].split(" failed")[0])
    run_lines = [ln for ln in lines if " inputs (" in ln]
    assert failed == 1 and f"{failed} failed" in run_lines[-1], err


def test_memory_build_shows_progress(parts, tmp_path, cli):
    n = len(list((parts / "good").iterdir()))
    code, _, err = cli(["memory", "build", parts / "good", "--out", tmp_path / "b.zsdmem"] + TINY)
    assert code == 0, err
    assert f"memory of good references: {n}/{n}" in err


def test_calibrate_with_a_glob_equals_the_folder(parts, tmp_path, cli):
    got = {}
    for name, source in (("dir", parts / "calib"), ("glob", parts / "calib" / "*.png")):
        out = tmp_path / name
        code, _, err = cli(
            ["anomaly", parts / "test", "--out", out, "--image-size", SIZE, "-q"]
            + ["--calibrate-with", source]
            + TINY
        )
        assert code == 0, err
        got[name] = [
            (r["scores"]["threshold"], r["scores"]["threshold_source"]) for r in _records(out)
        ]
    assert got["dir"] == got["glob"] and got["dir"][0][1] == "calibrated"
    code, _, err = cli(
        ["anomaly", parts / "test", "--out", tmp_path / "x", "--calibrate-with", parts / "*.tif"]
        + TINY
    )
    assert code == 2 and "--calibrate-with" in err


# ---- lesser points -----------------------------------------------------------------------------


def test_anomalydino_records_its_score_rule_and_disagreements(tiny_seg, parts):
    res = tiny_seg.anomaly_batch(
        sorted((parts / "test").iterdir()),
        preset="anomalydino",
        reference=str(parts / "good"),
        calibrate_with=str(parts / "calib"),
    )
    for r in res:
        assert "top 1%" in r.meta["fewshot"]["score_rule"]
        disagree = r.label != bool(r.mask.any())
        assert ("decision_note" in r.meta) == disagree


def test_train_prompts_refuses_the_sizes_anomaly_refuses(tmp_path, cli):
    errs = []
    for cmd in (["anomaly", ASSETS], ["train-prompts", ASSETS]):
        code, _, err = cli([*cmd, "--out", tmp_path / cmd[0], "--image-size", 500] + TINY)
        assert code == 2, err
        errs.append(err.strip().splitlines()[-1])
    assert errs[0] == errs[1] and "multiple of the patch size 14" in errs[0]


def test_prompts_trained_at_another_size_get_a_note(tiny_seg, tmp_path):
    import torch
    from safetensors.torch import save_file

    from zsdense.tasks.crane_head import trained_size_note

    ck = tmp_path / "best.safetensors"
    meta = {"zsdense": json.dumps({"format": "zsdense-prompts/1", "recipe": {"image_size": 224}})}
    save_file({"x": torch.zeros(1)}, str(ck), metadata=meta)
    note = trained_size_note(tiny_seg.runtime, str(ck), 518)
    assert "224" in note and "518" in note
    assert trained_size_note(tiny_seg.runtime, str(ck), 224) is None
