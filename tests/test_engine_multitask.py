"""One pass, several tasks: configs, the shared encoder pass, ``zsdense run``, ``run_tasks``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from engine_dummy import spec as dummy_spec
from PIL import Image

from zsdense.api import Segmenter
from zsdense.engine.local import items_from_data, load_records, run_batch
from zsdense.engine.specs import (
    TaskSpec,
    build_task_specs,
    parse_task_option,
    run_tasks,
    tasks_from_mapping,
)
from zsdense.errors import ConfigError


def make_images(folder: Path, n: int, size=(24, 32)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (np.random.RandomState(i).rand(size[0], size[1], 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")


@pytest.fixture()
def seg():
    return Segmenter(device="cpu", models="tiny", precision="fp32", batch_size=4)


# ---- configs -------------------------------------------------------------------------------


def test_toml_schema_and_task_options(tmp_path):
    import tomllib

    text = """
[run]
batch_size = 8
[anomaly]
preset = "crane"
object = "screw"
[openvocab]
preset = "trident"
classes = ["cat", "sofa", "background"]
[refer]
text = "the cup left of the laptop"
[[task]]
task = "engine_dummy:spec"
name = "dummy"
sleep = 0.0
"""
    tasks, run = tasks_from_mapping(tomllib.loads(text))
    assert run == {"batch_size": 8}
    assert tasks == [
        {"task": "anomaly", "preset": "crane", "object": "screw"},
        {"task": "openvocab", "preset": "trident", "classes": ["cat", "sofa", "background"]},
        {"task": "refer", "text": "the cup left of the laptop"},
        {"task": "engine_dummy:spec", "name": "dummy", "sleep": 0.0},
    ]
    with pytest.raises(ConfigError, match="unknown table"):
        tasks_from_mapping({"anomly": {}})
    with pytest.raises(ConfigError, match="used twice"):
        tasks_from_mapping({"task": [{"task": "anomaly"}], "anomaly": {}})
    assert parse_task_option("anomaly:crane+") == {"task": "anomaly", "preset": "crane+"}
    # ',' separates the options, '|' list items, ';' joins synonyms (as in --classes)
    assert parse_task_option("openvocab,classes=cat;kitten|sofa") == {
        "task": "openvocab",
        "classes": ["cat;kitten", "sofa"],
    }
    assert parse_task_option("openvocab,classes=cat;kitten") == {
        "task": "openvocab",
        "classes": "cat;kitten",
    }
    assert parse_task_option("pkg.mod:fn,x=1") == {"task": "pkg.mod:fn", "x": "1"}
    with pytest.raises(ConfigError):
        parse_task_option("segment-everything")


def test_build_specs_rejects_duplicates_and_missing_options(seg):
    with pytest.raises(ConfigError, match="given twice"):
        build_task_specs(seg, [{"task": "engine_dummy:spec", "name": "a"}] * 2)
    with pytest.raises(ConfigError, match="needs classes"):
        build_task_specs(seg, [{"task": "openvocab"}])
    with pytest.raises(ConfigError, match="cannot import"):
        build_task_specs(seg, ["no_such_module_xyz:make"])


# ---- the shared pass ---------------------------------------------------------------------


def test_two_tasks_share_one_context_per_image(tmp_path, seg):
    """Two heads asking for the same encoder output: computed once per image, not twice."""
    make_images(tmp_path / "d", 5)
    items = items_from_data([tmp_path / "d"])
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def tracked(name):
        sp = dummy_spec(name=name, encoder="shared-enc")

        def run(ctxs, params):
            seen[name].extend(id(c) for c in ctxs)
            return sp.run(ctxs, params)

        return TaskSpec(name, run, sp.write)

    s = run_batch(seg, items, tmp_path / "out", [tracked("a"), tracked("b")], progress=False)
    assert s.ok == 5
    assert seen["a"] == seen["b"]  # the very same ImageContext objects reach both heads
    for rec in load_records(tmp_path / "out"):
        assert rec["encoders"] == {"shared-enc": 1}
        assert set(rec["outputs"]) == {"a", "b"}  # nested per task
        stem = Path(rec["key"]).stem
        assert rec["outputs"]["a"]["mask"] == f"{stem}.a.mask.png"
        assert (tmp_path / "out" / rec["outputs"]["b"]["map"]).is_file()
    # control: two separate single-task runs compute the encoder once each (2 per image)
    s1 = run_batch(seg, items, tmp_path / "o1", [tracked("a")], progress=False)
    s2 = run_batch(seg, items, tmp_path / "o2", [tracked("b")], progress=False)
    assert s1.ok == s2.ok == 5
    n = sum(r["encoders"]["shared-enc"] for d in ("o1", "o2") for r in load_records(tmp_path / d))
    assert n == 10


def test_real_tiny_heads_share_sam_and_every_encoder_once(tmp_path, seg):
    """openvocab (Trident, uses SAM) + refer (HybridGL, uses SAM) on one image: every cached
    encoder output computed once, SAM's image encoder called once."""
    pytest.importorskip("zsdense.tasks.openvocab")
    pytest.importorskip("zsdense.tasks.referring")
    (tmp_path / "d").mkdir()
    Image.fromarray((np.random.RandomState(3).rand(48, 64, 3) * 255).astype(np.uint8)).save(
        tmp_path / "d" / "scene.png"
    )
    items = items_from_data([tmp_path / "d"])
    specs = build_task_specs(
        seg,
        [
            {"task": "openvocab", "classes": ["cat", "sofa", "background"], "save_probs": True},
            {"task": "refer", "text": "the cat on the left"},
        ],
        fmt="npy",
    )
    sam = seg.sam("vit_b")
    before = sam.encoder_calls
    s = run_batch(seg, items, tmp_path / "out", specs, progress=False)
    assert s.ok == 1, s.errors
    assert sam.encoder_calls - before == 1
    (rec,) = load_records(tmp_path / "out")
    assert rec["encoders"] and all(v == 1 for v in rec["encoders"].values()), rec["encoders"]
    assert any(k.startswith("sam/") for k in rec["encoders"])
    out = tmp_path / "out"
    assert (out / "scene.openvocab.mask.png").is_file()
    assert np.load(out / "scene.openvocab.map.npy").shape == (3, 48, 64)
    mask = np.asarray(Image.open(out / "scene.refer.mask.png"))
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}
    # the random tiny SAM finds no mask here: the refer task's whole-image stand-in is a
    # visible fallback of the record (and of the run's summary), with no score
    assert rec["fallback"] is True and rec["fallback_reason"].startswith("refer: ")
    assert rec["scores"]["refer"]["score"] is None and s.fallbacks == 1
    assert "1 of them fallbacks" in s.format()
    # built by the refer command's own TaskSpec builder: same scores as `zsdense refer`
    assert rec["scores"]["refer"]["text"] == "the cat on the left"


def test_run_tasks_api_shares_the_context(seg):
    img = (np.random.RandomState(1).rand(20, 30, 3) * 255).astype(np.uint8)
    ctx = seg.context(img)
    res = run_tasks(
        seg,
        ctx,
        [
            {"task": "engine_dummy:spec", "name": "one", "encoder": "e"},
            {"task": "engine_dummy:spec", "name": "two", "encoder": "e"},
        ],
    )
    assert set(res) == {"one", "two"}
    assert ctx.computed[("e",)] == 1
    np.testing.assert_array_equal(res["one"]["map"], res["two"]["map"])
    with pytest.raises(ConfigError, match="twice"):
        run_tasks(seg, img, ["engine_dummy:spec", "engine_dummy:spec"])


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_run_with_config_file(tmp_path):
    make_images(tmp_path / "d", 3)
    (tmp_path / "run.toml").write_text(
        "[run]\nbatch_size = 2\n"
        '[[task]]\ntask = "engine_dummy:spec"\nname = "a"\nencoder = "e"\n'
        '[[task]]\ntask = "engine_dummy:spec"\nname = "b"\nencoder = "e"\n'
        'fmt = "npy"\n'
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "zsdense.cli.main",
            "run",
            "d",
            "--out",
            "out",
            "--config",
            "run.toml",
            "--models",
            "tiny",
            "-q",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(x["encoders"] == {"e": 1} for x in recs)
    assert (tmp_path / "out" / "img000.a.map.tiff").is_file()  # --format default
    assert (tmp_path / "out" / "img000.b.map.npy").is_file()  # per-task override
    r = subprocess.run(
        [sys.executable, "-m", "zsdense.cli.main", "run", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--config" in r.stdout and "--engine" in r.stdout and "3 some inputs" in r.stdout


def test_queries_on_one_image_decode_once_and_share_encoders(tmp_path, seg):
    """Referring-style items (same file, several queries) in one batch share one context."""
    from zsdense.engine.local import WorkItem, read_units

    make_images(tmp_path / "d", 1)
    path = tmp_path / "d" / "img000.png"
    items = [
        WorkItem(
            key=f"img000.png#q{i}",
            path=path,
            rel=Path("img000.png"),
            params={"text": f"thing {i}", "id": f"q{i}"},
        )
        for i in range(3)
    ]
    reads = []

    def reader(item, max_pixels):
        reads.append(item.key)
        return read_units(item, max_pixels)

    ctx_ids = []
    sp = dummy_spec(name="d")

    def run(ctxs, params):
        ctx_ids.extend(id(c) for c in ctxs)
        return sp.run(ctxs, params)

    s = run_batch(
        seg,
        items,
        tmp_path / "out",
        [TaskSpec("d", run, sp.write)],
        batch_size=4,
        reader=reader,
        progress=False,
    )
    assert s.ok == 3 and len(reads) == 1 and len(set(ctx_ids)) == 1
    recs = load_records(tmp_path / "out")
    assert [r["key"] for r in recs] == [f"img000.png#q{i}" for i in range(3)]
    assert all(r["encoders"] == {"dummy-enc": 1} for r in recs)
    assert (tmp_path / "out" / "img000.q2.mask.png").is_file()


def test_refer_given_before_openvocab_still_encodes_sam_once(seg):
    """Task order must not matter: the head needing SAM's attention runs first."""
    pytest.importorskip("zsdense.tasks.openvocab")
    pytest.importorskip("zsdense.tasks.referring")
    img = (np.random.RandomState(5).rand(40, 56, 3) * 255).astype(np.uint8)
    ctx = seg.context(img)
    sam = seg.sam("vit_b")
    before = sam.encoder_calls
    res = run_tasks(
        seg,
        ctx,
        [
            {"task": "refer", "text": "the cat on the left"},
            {"task": "openvocab", "classes": ["cat", "sofa"]},
        ],
    )
    assert list(res) == ["refer", "openvocab"]  # results keep the order asked for
    assert sam.encoder_calls - before == 1
    assert res["refer"].mask.shape == (40, 56) and res["openvocab"].labels.shape == (40, 56)
