"""Ray Data engine: the per-batch callable without Ray, then a local Ray run and a resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsdense.api import Segmenter
from zsdense.engine.local import (
    MANIFEST_NAME,
    items_from_data,
    load_records,
    records_without_timing,
    run_batch,
)
from zsdense.engine.ray_runner import SegmentBatch, decode_item, item_row, ray_available
from zsdense.engine.specs import build_task_specs

TASKS = [{"task": "engine_dummy:spec", "name": "dummy", "fmt": "npy"}]


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (np.random.RandomState(i).rand(20, 28, 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")


def output_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, "report.html", "run_settings.json")
    }


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> the column batch Ray's numpy format hands to ``map_batches``."""
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_segment_batch_without_ray_matches_local_runner(tmp_path):
    make_images(tmp_path / "d", 3)
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    items = items_from_data([tmp_path / "d"])
    rows = [r for it in items for r in decode_item(item_row(it), max_pixels=10**7)]
    assert len(rows) == 4 and [bool(r["error"]) for r in rows] == [True, False, False, False]
    fn = SegmentBatch({"models": "tiny", "device": "cpu"}, TASKS, str(tmp_path / "ray"))
    out = fn(_columns(rows))
    recs = [json.loads(x) for x in out["record"]]
    assert [r["status"] for r in recs] == ["error", "ok", "ok", "ok"]
    assert "broken.png" in recs[0]["error"]
    seg = Segmenter(device="cpu", models="tiny")
    run_batch(seg, items, tmp_path / "local", build_task_specs(seg, TASKS), progress=False)
    local = {r["key"]: r for r in records_without_timing(load_records(tmp_path / "local"))}
    for r in records_without_timing(recs):
        assert r == local[r["key"]]
    assert output_bytes(tmp_path / "ray") == output_bytes(tmp_path / "local")


def test_decode_skips_done_suffixes_and_reports_errors(tmp_path, monkeypatch):
    make_images(tmp_path / "d", 1)
    (it,) = items_from_data([tmp_path / "d"])
    assert decode_item(item_row(it, done_suffixes=[""])) == []
    (row,) = decode_item(item_row(it))
    img = np.frombuffer(row["image"], np.float32).reshape(json.loads(row["shape"]))
    assert img.shape == (20, 28, 3) and 0.0 <= img.min() and img.max() <= 1.0
    (err,) = decode_item(item_row(it), max_pixels=10)
    assert "limit" in err["error"] and err["image"] == b""
    monkeypatch.chdir(tmp_path)  # relative inputs: errors name the file as the user did
    (tmp_path / "z.png").write_bytes(b"")
    (z,) = items_from_data(["z.png"])
    (zrow,) = decode_item(item_row(z))
    assert zrow["error"] == "z.png: file is empty (0 bytes)"


def test_missing_ray_is_a_dependency_error(monkeypatch):
    import builtins

    from zsdense.engine import ray_runner
    from zsdense.errors import DependencyError

    real_import = builtins.__import__

    def fake(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(DependencyError, match=r"zsdense\[ray\]"):
        ray_runner.run_ray([], "x", TASKS)


@pytest.fixture(scope="module")
def local_ray():
    if not ray_available():
        pytest.skip("ray is not installed (extra 'ray')")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def test_ray_run_then_resume_after_partial_run(tmp_path, local_ray):
    from zsdense.engine.ray_runner import run_ray

    make_images(tmp_path / "d", 8)
    (tmp_path / "d" / "zero.png").write_bytes(b"")
    items = items_from_data([tmp_path / "d"])
    seg = Segmenter(device="cpu", models="tiny")
    clean = run_batch(seg, items, tmp_path / "local", build_task_specs(seg, TASKS), progress=False)
    assert clean.exit_code == 3
    kw = dict(
        seg_kwargs={"models": "tiny", "device": "cpu"}, batch_size=2, workers=1, progress=False
    )
    part = run_ray(items[:4], tmp_path / "ray", TASKS, **kw)  # a partial run ...
    assert (part.ok, part.failed) == (4, 0)
    with open(tmp_path / "ray" / MANIFEST_NAME, "ab") as f:  # ... killed mid-line
        f.write(b'{"key": "img0')
    kw["workers"] = 2  # two actors on 2 CPUs must leave room for the decode tasks
    full = run_ray(items, tmp_path / "ray", TASKS, **kw)
    assert (full.skipped, full.ok, full.failed, full.exit_code) == (4, 4, 1, 3)
    assert records_without_timing(load_records(tmp_path / "ray")) == records_without_timing(
        load_records(tmp_path / "local")
    )
    assert output_bytes(tmp_path / "ray") == output_bytes(tmp_path / "local")
    assert not [p for p in (tmp_path / "ray").rglob("*") if ".tmp-" in p.name]
    assert (tmp_path / "ray" / "report.html").is_file()
    # a rerun has nothing to do; like a local rerun it names the failure an earlier run settled
    again = run_ray(items, tmp_path / "ray", TASKS, **kw)
    local_again = run_batch(
        seg, items, tmp_path / "local", build_task_specs(seg, TASKS), progress=False
    )
    assert (again.ok, again.skipped, again.failed) == (0, 9, 1)
    assert again.previous_errors == local_again.previous_errors
    assert len(again.previous_errors) == 1 and "zero" in str(again.previous_errors[0][0])


def test_queries_on_one_image_are_decoded_once_and_share_a_context(tmp_path):
    """Two items (queries) on one file: one image row carries both; one context serves both."""
    from zsdense.io.manifest import WorkItem

    make_images(tmp_path / "d", 1)
    path = tmp_path / "d" / "img000.png"
    items = [
        WorkItem(f"img000.png#{q}", path, Path("img000.png"), params={"text": q}) for q in "ab"
    ]
    row = dict(item_row(items[0]), members=json.dumps([item_row(it) for it in items]))
    rows = decode_item(row, max_pixels=10**7)
    assert len(rows) == 1 and len(json.loads(rows[0]["members"])) == 2
    fn = SegmentBatch({"models": "tiny", "device": "cpu"}, TASKS, str(tmp_path / "ray"))
    recs = [json.loads(x) for x in fn(_columns(rows))["record"]]
    assert [r["key"] for r in recs] == ["img000.png#a", "img000.png#b"]
    assert all(r["status"] == "ok" and r["encoders"] == {"dummy-enc": 1} for r in recs)
