"""The library's seams: methods as a registry, typed options, fail-fast setup, shared decoding.

Everything runs through the console entry point (``zsdense.cli.main.main``) in this process, so a
method registered here is what a plug-in registering it at import time would get.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zsdense.config import OPENVOCAB_PRESETS
from zsdense.dense.methods import METHODS, register_method, unregister_method
from zsdense.errors import ConfigError
from zsdense.options import AnomalyOptions, OpenVocabOptions, ReferOptions

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _main(args, capsys) -> tuple[int, str]:
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out + cap.err


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = (rng.random((40 + 8 * i, 56, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"im{i}.png")
    return d


def _records(out: Path) -> list[dict]:
    p = out / "results.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


# ---- a toy method, registered in the test, through the CLI ----------------------------------

CALLS: list[tuple] = []


def _toy_features(clip, x_norm_bchw, cfg, vfm_fn):
    """Mean-pooled patches of the CLIP's input projected to its text width (a toy, not a model)."""
    CALLS.append(tuple(x_norm_bchw.shape))
    b, _, h, w = x_norm_bchw.shape
    p = clip.patch_size
    pooled = F.avg_pool2d(x_norm_bchw.float(), p)  # (B, 3, h/p, w/p)
    zeros = torch.zeros(1, 1, clip.width, device=x_norm_bchw.device, dtype=clip.dtype)
    d = clip.head(zeros).shape[-1]
    proj = torch.linspace(-1, 1, 3 * d, device=pooled.device).reshape(d, 3)
    f = torch.einsum("dc,bchw->bdhw", proj, pooled)
    return F.normalize(f, dim=1)


@pytest.fixture
def toy_method():
    register_method("toyclip", _toy_features, description="test method", preset={"crop": 224})
    CALLS.clear()
    yield "toyclip"
    unregister_method("toyclip")


def test_toy_method_is_a_cli_choice_and_runs_end_to_end(toy_method, images, tmp_path, capsys):
    code, text = _main(["openvocab", "--help"], capsys)
    assert code == 0 and "toyclip" in text
    code, text = _main(["info", "--methods"], capsys)
    assert code == 0 and "`toyclip`" in text and "test method" in text
    out = tmp_path / "out"
    code, text = _main(
        ["openvocab", images, "--out", out, "--classes", "a, b", "--preset", "toyclip"]
        + ["--models", "tiny", "-q", "--no-overlay"],
        capsys,
    )
    assert code == 0, text
    recs = _records(out)
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs)
    assert {r["meta"]["result"]["method"] for r in recs} == {"toyclip"}
    assert CALLS, "the registered feature function was never called"
    for r in recs:
        lab = np.array(Image.open(out / r["outputs"]["mask"]))
        assert lab.shape == tuple(r["meta"]["image"]["orig_size"]) and lab.max() <= 1


def test_unregistered_method_is_gone_and_unknown_preset_lists_choices(images, tmp_path, capsys):
    assert "toyclip" not in METHODS and "toyclip" not in OPENVOCAB_PRESETS
    code, text = _main(
        ["openvocab", images, "--out", tmp_path / "o", "--classes", "a", "--preset", "toyclip"],
        capsys,
    )
    assert code == 2 and "trident" in text and "sclip" in text
    assert not (tmp_path / "o").exists()


# ---- typed options --------------------------------------------------------------------------


def test_options_validate_once_with_the_valid_names():
    with pytest.raises(ConfigError, match="valid: .*attn_type"):
        AnomalyOptions.from_mapping(preset="crane", atn_type="vv")
    with pytest.raises(ConfigError, match="crane\\+"):
        AnomalyOptions.from_mapping(preset="cranium")
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        AnomalyOptions.from_mapping(image_size=500)
    with pytest.raises(ConfigError, match="calibrate-with"):
        AnomalyOptions.from_mapping(calibrate_percentile=99)
    o = AnomalyOptions.from_mapping({"object": "screw", "eattn_layers": "6,12", "threshold": None})
    assert o.object_name == "screw" and o.threshold is None
    assert o.config().eattn_layers == (6, 12)
    with pytest.raises(ConfigError, match="voc21"):
        OpenVocabOptions.from_mapping(classes="a", dataset="kitti")
    with pytest.raises(ConfigError, match="trident"):
        OpenVocabOptions.from_mapping(classes="a", preset="sclip", sam_refine=True)
    with pytest.raises(ConfigError, match="hybridgl"):
        ReferOptions.from_mapping(preset="nope")


def test_classes_are_parsed_once_into_the_options():
    o = OpenVocabOptions.from_mapping(classes="background: sky; wall, cat, sofa; couch")
    assert o.classes == (
        ("background", ("sky", "wall")),
        ("cat", ("cat",)),
        ("sofa", ("sofa", "couch")),
    )
    assert OpenVocabOptions.from_mapping(classes_file="voc21").classes[0][0] == "background"
    assert (
        OpenVocabOptions.from_mapping(classes=["file:voc21"]).classes[:3]
        == (OpenVocabOptions.from_mapping(classes_file="voc21").classes[:3])
    )
    with pytest.raises(ConfigError, match="256"):
        OpenVocabOptions.from_mapping(classes=[f"c{i}" for i in range(257)])


def test_python_keywords_and_the_typed_object_agree(images):
    from zsdense import Segmenter
    from zsdense.tasks.anomaly import run_anomaly

    seg = Segmenter(models="tiny")
    img = str(next(images.iterdir()))
    a = seg.anomaly(img, preset="crane", object_name="tile", threshold=0.4)
    b = run_anomaly(seg, [seg.context(img)], AnomalyOptions("crane", "tile", threshold=0.4))[0]
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert a.threshold == b.threshold == 0.4
    with pytest.raises(ConfigError, match="not both"):
        run_anomaly(seg, [seg.context(img)], AnomalyOptions(), threshold=0.3)


# ---- setup errors fail fast -----------------------------------------------------------------


@pytest.fixture
def offline_home(tmp_path, monkeypatch) -> Path:
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME", "ZSDENSE_WEIGHTS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ZSDENSE_OFFLINE", "1")
    wd = tmp_path / "weights"
    wd.mkdir()
    return wd


def test_missing_weights_fail_once_before_any_input(
    offline_home, images, tmp_path, capsys, monkeypatch
):
    from zsdense.models.clip import build_tiny_clip
    from zsdense.models.registry import CHECKPOINTS

    out = tmp_path / "out"
    cmd = ["openvocab", images, "--out", out, "--classes", "cat, dog", "--preset", "sclip"]
    cmd += ["--weights-dir", offline_home, "--offline", "-q"]
    code, text = _main(cmd, capsys)
    assert code == 2, text
    assert "ViT-B-16" in text and "Traceback" not in text
    assert text.count("error:") == 1
    assert not (out / "results.jsonl").exists()
    assert not [p for p in out.rglob("*") if p.is_file()] if out.exists() else True

    # the user supplies the checkpoint (here: random weights in OpenAI's file layout)
    sd = build_tiny_clip("ViT-B-16").model.state_dict()
    f = offline_home / "ViT-B-16.pt"
    torch.save({k: v.detach().clone() for k, v in sd.items()}, f)
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    ck = CHECKPOINTS["clip-ViT-B-16-openai"]

    def trust(spec):
        return dataclasses.replace(spec, sha256=sha, size=None) if spec.filename == f.name else spec

    new = dataclasses.replace(
        ck,
        files=tuple(trust(s) for s in ck.files),
        alternates=tuple(trust(s) for s in ck.alternates),
    )
    monkeypatch.setitem(CHECKPOINTS, "clip-ViT-B-16-openai", new)
    code, text = _main(cmd, capsys)  # the same command, no --retry-errors
    assert code == 0, text
    recs = _records(out)
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs)
    # the run records the SHA-256 of the checkpoint it loaded
    assert json.loads((out / "run_settings.json").read_text())["weights"] == {
        "clip/ViT-B-16/openai": sha
    }


def test_unwritable_out_is_a_setup_error(images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = _main(
        ["anomaly", images, "--out", blocker / "sub", "--models", "tiny", "-q"], capsys
    )
    assert code == 2 and "output folder" in text


# ---- queries share decoding through the engine ----------------------------------------------


def test_queries_on_one_image_share_decode_and_sam(images, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    names = sorted(p.name for p in images.iterdir())
    lines = []
    for i, t in enumerate(["the left one", "a thing", "the right one", "the top one"]):
        lines.append({"image": f"imgs/{names[0]}", "text": t, "id": f"a{i}"})
        lines.append({"image": f"imgs/{names[1]}", "text": t, "id": f"b{i}"})
    q.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    code, text = _main(
        ["refer", "--queries", q, "--out", out, "--models", "tiny", "-q", "--batch-size", "1"],
        capsys,
    )
    assert code == 0, text
    recs = _records(out)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs)
    for r in recs:  # every query of an image saw one SAM encoding and one proposal pass
        sam = {k: v for k, v in r["encoders"].items() if k.startswith("sam/")}
        props = {k: v for k, v in r["encoders"].items() if k.startswith("refer-proposals")}
        assert sam and set(sam.values()) == {1}, r["encoders"]
        assert props and set(props.values()) == {1}, r["encoders"]


# ---- a rerun never mixes two settings -------------------------------------------------------


def test_rerun_with_other_settings_is_refused_unless_forced(images, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["anomaly", images, "--out", out, "--models", "tiny", "-q", "--no-overlay"]
    code, text = _main(base + ["--threshold", "0.5"], capsys)
    assert code == 0, text
    first = {r["key"]: r for r in _records(out)}
    mask = out / first["im0.png"]["outputs"]["mask"]
    before = mask.read_bytes()

    code, text = _main(base + ["--threshold", "0.55"], capsys)  # another threshold
    assert code == 2 and "threshold: 0.5 -> 0.55" in text and "--force" in text
    assert mask.read_bytes() == before

    loud = [a for a in base if a != "-q"]  # -q prints no summary on success
    code, text = _main(loud + ["--threshold", "0.5"], capsys)  # the same settings: resume
    assert code == 0 and "0 ok, 0 failed, 3 skipped" in text

    code, text = _main(base + ["--threshold", "0.55", "--force"], capsys)
    assert code == 0, text
    again = {r["key"]: r for r in _records(out)}
    assert {r["scores"]["threshold"] for r in again.values()} == {0.55}
    fracs = [r["scores"]["defect_area"] for r in again.values()]
    assert fracs != [r["scores"]["defect_area"] for r in first.values()]


def test_the_weights_a_run_loaded_are_recorded(images, tmp_path, capsys):
    from zsdense.api import Segmenter
    from zsdense.engine.local import items_from_data, run_batch
    from zsdense.engine.specs import build_task_specs

    seg = Segmenter(models="tiny")
    seg.sam("vit_b")  # used before the run: not part of its record
    out = tmp_path / "o"
    specs = build_task_specs(seg, [{"task": "openvocab", "preset": "sclip", "classes": "a, b"}])
    run_batch(seg, items_from_data([images]), out, specs, progress=False)
    rec = json.loads((out / "run_settings.json").read_text())
    assert rec["weights"] == {"clip/ViT-B-16/openai": None}  # random weights: no hash
    specs = build_task_specs(seg, [{"task": "openvocab", "preset": "sclip", "classes": "a, b"}])
    s = run_batch(seg, items_from_data([images]), out, specs, progress=False)
    assert s.ok == 0 and s.skipped == 3  # the same settings resume
