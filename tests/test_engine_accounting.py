"""Every input path accounted for in the manifest; ``--out`` inside DATA never read as input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from zsdense.engine.local import MANIFEST_NAME, RunSummary, items_from_data

TASK = "engine_dummy:spec,name=dummy"


def cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "zsdense.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _img(path: Path, seed: int, fmt: str | None = None) -> None:
    arr = (np.random.RandomState(seed).rand(16, 20, 3) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / MANIFEST_NAME).read_text().splitlines()]


def hostile_corpus(root: Path) -> dict[str, str]:
    """A folder of mixed paths -> {rel path: expected status}."""
    (root / "sub").mkdir(parents=True)
    _img(root / "a.png", 0)
    _img(root / "sub" / "b.jpg", 1)
    _img(root / "anim.gif", 2, "GIF")
    _img(root / "pic.webp", 3, "WEBP")
    _img(root / ".hidden.png", 4)
    (root / "README").write_text("not an image, no extension")
    (root / "notes.txt").write_text("text")
    return {
        "a.png": "ok",
        "sub/b.jpg": "ok",
        "anim.gif": "ok",
        "pic.webp": "ok",
        ".hidden.png": "skipped",
        "README": "skipped",
        "notes.txt": "skipped",
    }


def test_every_path_of_a_hostile_corpus_has_one_manifest_line(tmp_path):
    expected = hostile_corpus(tmp_path / "data")
    args = ["run", "data", "--out", "out", "--task", TASK, "--models", "tiny"]
    r = cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    recs = records(tmp_path / "out")
    got = {x["key"]: x["status"] for x in recs}
    assert got == expected
    assert len(recs) == len(expected)
    reasons = {x["key"]: x.get("reason", "") for x in recs if x["status"] == "skipped"}
    assert "hidden" in reasons[".hidden.png"]
    assert "extension" in reasons["README"]
    assert "'.txt'" in reasons["notes.txt"]
    # progress line and summary count input files; skipped paths are not failures
    assert "4 input(s) -> 4 image record(s): 4 ok, 0 failed" in r.stderr
    assert "3 path(s) not processed" in r.stderr
    assert "3 not processed" in (tmp_path / "out" / "report.html").read_text()
    # a rerun adds no line and still accounts for every path
    r = cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()) == len(expected)
    assert "4 input(s) -> 4 image record(s): 0 ok, 0 failed, 4 skipped (already done)" in r.stderr
    assert "3 path(s) not processed" in r.stderr


def test_out_inside_data_run_twice_never_reads_outputs(tmp_path):
    data = tmp_path / "nest"
    data.mkdir()
    for i in range(3):
        _img(data / f"im{i}.png", i)
    args = ["run", "nest", "--out", "nest/res", "--task", TASK, "--models", "tiny"]
    for run in range(2):
        r = cli(args, tmp_path)
        assert r.returncode == 0, r.stderr
        # said once, when the output folder exists and hides files
        assert r.stderr.count("(the output folder)") == run
        keys = [x["key"] for x in records(data / "res")]
        assert sorted(keys) == ["im0.png", "im1.png", "im2.png"]
    written = [p for p in (data / "res").rglob("*") if p.is_file()]
    assert written and not (data / "res" / "res").exists()
    assert not any(".mask.mask" in p.name for p in written)


def test_items_from_data_keeps_skipped_and_excluded(tmp_path):
    expected = hostile_corpus(tmp_path / "d")
    (tmp_path / "d" / "o").mkdir()
    _img(tmp_path / "d" / "o" / "old.png", 9)
    items = items_from_data([tmp_path / "d"], exclude=[tmp_path / "d" / "o"])
    assert sorted(it.key for it in items) == sorted(k for k, v in expected.items() if v == "ok")
    assert sorted(str(s.rel) for s in items.skipped) == sorted(
        k for k, v in expected.items() if v == "skipped"
    )
    assert [Path(p) for p in items.excluded] == [tmp_path / "d" / "o"]


def test_summary_names_the_units():
    s = RunSummary(total=6, ok=5, failed=1, skipped=2, inputs=7, not_processed=3)
    text = s.format()
    assert text.startswith("7 input(s) -> 8 image record(s): 5 ok, 1 failed, 2 skipped")
    assert "3 path(s) not processed" in text
    assert s.exit_code == 3
    assert RunSummary(ok=1, inputs=1, not_processed=4).exit_code == 0


def test_default_max_pixels_refuses_a_huge_image_before_decoding(tmp_path):
    from zsdense.config import MAX_PIXELS

    d = tmp_path / "d"
    d.mkdir()
    side = int(MAX_PIXELS**0.5) + 2  # just over the default
    Image.new("L", (side, side)).save(d / "huge.png")
    _img(d / "small.png", 0)
    r = cli(["run", "d", "--out", "o", "--task", TASK, "--models", "tiny", "-q"], tmp_path)
    assert r.returncode == 3, r.stderr
    status = {x["key"]: (x["status"], x.get("error") or "") for x in records(tmp_path / "o")}
    assert status["small.png"][0] == "ok"
    assert status["huge.png"][0] == "error" and "limit" in status["huge.png"][1]
    assert MAX_PIXELS <= 25_000_000  # the documented default (README: memory)


def test_summary_counts_settled_failures_once():
    # a rerun: 2 ok and 1 failed image settled earlier, nothing new
    s = RunSummary(total=0, ok=0, failed=1, skipped=3, inputs=3)
    assert s.format().startswith("3 input(s) -> 3 image record(s): 0 ok, 1 failed, 3 skipped")
