"""Local batch runner: overlap, batching, error isolation, resume, kill-and-resume, SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from engine_dummy import spec as dummy_spec
from PIL import Image

from zsdense.api import Segmenter
from zsdense.context import ImageContext
from zsdense.engine.local import (
    MANIFEST_NAME,
    TaskSpec,
    WorkItem,
    clean_orphan_temp_files,
    items_from_data,
    load_records,
    out_stem,
    records_without_timing,
    run_batch,
)


def make_images(folder: Path, n: int, size=(24, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = (np.random.RandomState(i).rand(size[0], size[1], 3) * 255).astype(np.uint8)
        p = folder / f"img{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture()
def seg():
    return Segmenter(device="cpu", models="tiny", precision="fp32", batch_size=4)


def cli(args, cwd, **kw):
    return subprocess.run(
        [sys.executable, "-m", "zsdense.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def output_bytes(root: Path) -> dict[str, bytes]:
    skip = {MANIFEST_NAME, "report.html"}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


# ---- batching and overlap ----------------------------------------------------------------


def test_reads_overlap_compute_and_images_are_batched(tmp_path, seg):
    """Decoding of batch b+1 runs while batch b computes: wall time < read + compute time."""
    items = [
        WorkItem(key=f"k{i}", path=tmp_path / f"k{i}", rel=Path(f"k{i}.png")) for i in range(8)
    ]
    read_s, run_s = 0.3, 0.15
    sizes = []

    def reader(item, max_pixels):
        time.sleep(read_s)
        return [("", ImageContext(image=np.zeros((4, 4, 3), np.float32), meta={}))]

    def run(ctxs, params):
        sizes.append(len(ctxs))
        time.sleep(run_s * len(ctxs))
        return [0.0] * len(ctxs)

    def write(res, ctx, stem, params):
        return {"outputs": {}, "scores": {"v": res}}

    t0 = time.perf_counter()
    summary = run_batch(
        seg,
        items,
        tmp_path / "out",
        [TaskSpec("t", run, write)],
        batch_size=2,
        read_workers=2,
        reader=reader,
        progress=False,
        report=False,
    )
    wall = time.perf_counter() - t0
    assert sizes == [2, 2, 2, 2]
    assert summary.ok == 8 and summary.exit_code == 0
    serial = 8 * read_s / 2 + 8 * run_s  # reads two at a time, but never during compute
    # serial 2.4 s; overlapped: first batch's read (0.3) + 4 x max(read, compute) (1.2) = 1.5
    assert wall < serial - 0.5, (wall, serial)
    assert summary.stage_seconds["read"] == pytest.approx(8 * read_s, rel=0.5)
    # the main thread barely waited for decoding after the first batch
    assert summary.stage_seconds["wait-read"] < 0.3 + 0.3  # first batch + scheduling slack


def test_summary_progress_lines_and_stage_times(tmp_path, seg, capsys):
    make_images(tmp_path / "d", 5)
    items = items_from_data([tmp_path / "d"])
    summary = run_batch(
        seg,
        items,
        tmp_path / "out",
        [dummy_spec(name="dummy")],
        batch_size=2,
        progress=True,
        progress_interval=0.0,
    )
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "inputs" in ln and "ETA" in ln]
    assert len(lines) == 3  # one line per batch (interval 0): 2, 4, 5 of 5
    assert "5/5 inputs (100%)" in lines[-1]
    assert {"read", "wait-read", "dummy", "write"} <= set(summary.stage_seconds)
    text = summary.format()
    assert "5 ok, 0 failed, 0 skipped" in text and "write" in text
    assert (tmp_path / "out" / "report.html").is_file()


def test_failing_batch_retried_one_image_at_a_time(tmp_path, seg):
    make_images(tmp_path / "d", 5)
    items = items_from_data([tmp_path / "d"])
    # fail_batch: any batch of >1 image raises (simulated OOM): every image still succeeds
    s = run_batch(
        seg,
        items,
        tmp_path / "o1",
        [dummy_spec(name="d", fail_batch=True)],
        batch_size=4,
        progress=False,
    )
    assert (s.ok, s.failed) == (5, 0)
    # one bad image only fails itself
    s = run_batch(
        seg,
        items,
        tmp_path / "o2",
        [dummy_spec(name="d", fail="img002")],
        batch_size=4,
        progress=False,
    )
    assert (s.ok, s.failed, s.exit_code) == (4, 1, 3)
    recs = {r["key"]: r for r in load_records(tmp_path / "o2")}
    assert recs["img002.png"]["status"] == "error"
    assert "refusing img002.png" in recs["img002.png"]["error"]
    assert all(recs[f"img00{i}.png"]["status"] == "ok" for i in (0, 1, 3, 4))


def test_out_stem_mirrors_tree_and_handles_nifti_and_collisions(tmp_path):
    from pathlib import PurePosixPath

    it = WorkItem(key="a/b/vol.nii.gz", path=Path("x"), rel=PurePosixPath("a/b/vol.nii.gz"))
    assert out_stem(tmp_path, it, ".s003", "anomaly") == tmp_path / "a/b/vol.s003.anomaly"
    q = WorkItem(key="c.png#q7", path=Path("c.png"), rel=PurePosixPath("c.png"))
    assert out_stem(tmp_path, q) == tmp_path / "c.q7"
    d = tmp_path / "d"
    make_images(d, 1)
    Image.new("RGB", (8, 8)).save(d / "img000.jpg")
    items = items_from_data([d])
    stems = {out_stem(tmp_path, i).name for i in items}
    assert len(stems) == 2  # x.png and x.jpg do not overwrite each other


# ---- resume ------------------------------------------------------------------------------


def test_resume_skips_complete_redoes_missing_force_and_retry(tmp_path, seg):
    make_images(tmp_path / "d", 4)
    (tmp_path / "d" / "bad.png").write_bytes(b"not a png at all")
    items = items_from_data([tmp_path / "d"])
    out = tmp_path / "out"
    calls = []

    def counting(**kw):
        sp = dummy_spec(name="d", **kw)
        inner = sp.run

        def run(ctxs, params):
            calls.extend(Path(c.meta["source"]).name for c in ctxs)
            return inner(ctxs, params)

        return TaskSpec(sp.name, run, sp.write)

    s1 = run_batch(seg, items, out, [counting()], progress=False)
    assert (s1.ok, s1.failed, s1.exit_code) == (4, 1, 3)
    mtime = (out / "img000.mask.png").stat().st_mtime_ns
    calls.clear()
    s2 = run_batch(seg, items, out, [counting()], progress=False)
    assert calls == [] and s2.skipped == 5 and s2.failed == 1 and s2.exit_code == 3
    assert (out / "img000.mask.png").stat().st_mtime_ns == mtime
    (out / "img002.map.npy").unlink()  # an output went missing: only that input is redone
    s3 = run_batch(seg, items, out, [counting()], progress=False)
    assert calls == ["img002.png"] and s3.ok == 1
    calls.clear()
    (tmp_path / "d" / "bad.png").unlink()
    make_images(tmp_path / "tmp", 1)[0].rename(tmp_path / "d" / "bad.png")
    s4 = run_batch(seg, items, out, [counting()], progress=False, retry_errors=True)
    assert calls == ["bad.png"] and s4.exit_code == 0
    calls.clear()
    s5 = run_batch(seg, items, out, [counting()], progress=False, force=True)
    assert sorted(calls) == sorted(p.path.name for p in items) and s5.ok == 5
    lines = (out / MANIFEST_NAME).read_text().splitlines()
    assert len(lines) == 5  # compacted: one line per image
    assert [json.loads(x)["key"] for x in lines] == [i.key for i in items]


def test_torn_manifest_line_and_orphan_temp_files(tmp_path, seg):
    make_images(tmp_path / "d", 3)
    items = items_from_data([tmp_path / "d"])
    out = tmp_path / "out"
    run_batch(seg, items, out, [dummy_spec(name="d")], progress=False)
    clean = records_without_timing(load_records(out))
    man = out / MANIFEST_NAME
    lines = man.read_text().splitlines(keepends=True)
    man.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # torn last line
    orphan = out / ".img002.mask.tmp-999999999-deadbeef.png"
    orphan.write_bytes(b"half")
    (out / "img002.mask.png").unlink()
    s = run_batch(seg, items, out, [dummy_spec(name="d")], progress=False)
    assert s.ok == 1 and s.skipped == 2
    assert records_without_timing(load_records(out)) == clean
    assert temp_files(out) == []
    for ln in man.read_text().splitlines():
        json.loads(ln)  # every line is whole JSON again
    live = out / f".x.tmp-{os.getpid()}-0123abcd.png"  # a live writer's temp file is kept
    live.write_bytes(b"x")
    assert clean_orphan_temp_files(out) == 0 and live.exists()


# ---- error isolation over a mixed folder (CLI) -------------------------------------------


def test_mixed_folder_one_line_per_input_exit_3(tmp_path):
    d = tmp_path / "mixed"
    make_images(d, 3)
    good = (d / "img000.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a jpeg")
    Image.new("L", (1200, 1000)).save(d / "huge.png")  # over --max-pixels below
    ico = tmp_path / "icon.ico"
    Image.new("RGB", (8, 8)).save(ico)  # named directly: an unsupported format (GIF is read now)
    r = cli(
        [
            "run",
            "mixed",
            "icon.ico",
            "--out",
            "out",
            "--task",
            "engine_dummy:spec,name=dummy",
            "--models",
            "tiny",
            "--max-pixels",
            "1000000",
            "-q",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 3, r.stderr
    recs = [json.loads(x) for x in (tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()]
    keys = [x["key"] for x in recs]
    assert sorted(keys) == sorted(
        [
            "img000.png",
            "img001.png",
            "img002.png",
            "truncated.png",
            "zero.png",
            "text.jpg",
            "huge.png",
            "icon.ico",
        ]
    )
    status = {x["key"]: (x["status"], x.get("error") or "") for x in recs}
    assert [k for k, v in status.items() if v[0] == "ok"] == [
        "img000.png",
        "img001.png",
        "img002.png",
    ]
    assert "empty" in status["zero.png"][1]
    assert "limit" in status["huge.png"][1]
    assert "unsupported" in status["icon.ico"][1]
    assert "3 ok, 5 failed" in r.stderr
    assert "report.html" in os.listdir(tmp_path / "out")


def test_usage_errors_exit_2(tmp_path):
    r = cli(["run", "nothing-here", "--out", "out", "--task", "anomaly"], cwd=tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    make_images(tmp_path / "d", 1)
    r = cli(["run", "d", "--out", "out"], cwd=tmp_path)
    assert r.returncode == 2 and "no task" in r.stderr
    r = cli(["run", "d", "--out", "out", "--task", "bogus"], cwd=tmp_path)
    assert r.returncode == 2 and "unknown task" in r.stderr


# ---- kill and resume ---------------------------------------------------------------------


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_at_several_points_then_resume_equals_clean_run(tmp_path):
    make_images(tmp_path / "data", 32)
    args = [
        "run",
        "data",
        "--task",
        "engine_dummy:spec,name=dummy,sleep=0.02",
        "--models",
        "tiny",
        "--batch-size",
        "4",
        "-q",
    ]
    r = cli(args + ["--out", "clean"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    clean = tmp_path / "clean"
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for kill_at in (0, 3, 11, 22):  # manifest lines present when SIGKILL arrives (0: startup)
        p = subprocess.Popen(
            [sys.executable, "-m", "zsdense.cli.main", *args, "--out", "out"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while _count_lines(out / MANIFEST_NAME) < kill_at and p.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        if kill_at == 0:
            time.sleep(0.3)
        p.send_signal(signal.SIGKILL)
        p.wait()
        # a crash can also tear the last manifest line: simulate one on the second kill
        if kill_at == 3 and (out / MANIFEST_NAME).exists():
            with open(out / MANIFEST_NAME, "ab") as f:
                f.write(b'{"key": "img0')
    r = cli(args + ["--out", "out"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert records_without_timing(load_records(out)) == records_without_timing(load_records(clean))
    assert output_bytes(out) == output_bytes(clean)
    assert len((out / MANIFEST_NAME).read_text().splitlines()) == 32
    assert temp_files(out) == []


def test_sigint_finishes_batch_exits_130_and_resumes(tmp_path):
    make_images(tmp_path / "data", 12)
    args = [
        "run",
        "data",
        "--out",
        "out",
        "--task",
        "engine_dummy:spec,name=dummy,sleep=0.1,hold=go",
        "--models",
        "tiny",
        "--batch-size",
        "3",
        "-q",
    ]
    p = subprocess.Popen(
        [sys.executable, "-m", "zsdense.cli.main", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    man = tmp_path / "out" / MANIFEST_NAME
    deadline = time.monotonic() + 60
    while _count_lines(man) < 1:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)  # batch 2 is held until `go` exists: the run is mid-way
    time.sleep(0.2)
    (tmp_path / "go").touch()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "rerun the same command to resume" in err
    n = len(man.read_text().splitlines())
    assert n % 3 == 0 and 3 <= n < 12  # whole batches only
    r = cli([a for a in args if a != "-q"], cwd=tmp_path)  # -q: no summary on success
    assert r.returncode == 0 and f"{n} skipped" in r.stderr
    assert len(man.read_text().splitlines()) == 12


def test_sigint_handler_restored_after_run(tmp_path, seg):
    make_images(tmp_path / "d", 1)
    before = signal.getsignal(signal.SIGINT)
    run_batch(
        seg, items_from_data([tmp_path / "d"]), tmp_path / "o", [dummy_spec()], progress=False
    )
    assert signal.getsignal(signal.SIGINT) is before
    assert threading.active_count() >= 1


def test_progress_bar_with_eta_on_a_terminal():
    import io

    from zsdense.engine.local import _Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    p = _Progress(4, True, stream=stream)
    assert p.bar is not None  # a terminal gets a tqdm bar (elapsed<remaining = ETA)
    p.update(2)
    p.update(2, failed=1)
    p.close()
    text = stream.getvalue()
    assert "4/4" in text and "<" in text and "failed=1" in text
    plain = io.StringIO()
    q = _Progress(4, True, interval=3600, stream=plain)
    q.update(1)
    q.update(3)
    assert plain.getvalue().count("ETA") == 1  # throttled; the final line always printed


def _event_task(log: list, wait_s: float = 1.0):
    """A task whose first write waits (bounded) for the second batch to start computing, and
    whose second batch waits (bounded) for a write to happen while it computes."""
    batches = []
    computing, written = threading.Event(), threading.Event()

    def run(ctxs, params):
        batches.append(len(ctxs))
        if len(batches) == 2:
            computing.set()
            log.append(("overlapped", written.wait(timeout=wait_s)))
        return [float(c.image.mean()) for c in ctxs]

    def write(res, ctx, stem, params):
        computing.wait(timeout=wait_s)
        log.append(("write", threading.current_thread().name))
        if computing.is_set():
            written.set()
        return {"outputs": {}, "scores": {"v": res}}

    return TaskSpec("t", run, write)


@pytest.mark.parametrize("overlap", [True, False])
def test_writes_overlap_the_next_batch(seg, tmp_path, overlap):
    """``overlap_writes``: a batch's outputs are written in one writer thread while the next
    batch computes; every record is in the manifest when run_batch returns. Off: the writes
    run in the calling thread before the next batch starts."""
    make_images(tmp_path / "in", 6)
    log: list = []
    summary = run_batch(
        seg,
        items_from_data([tmp_path / "in"]),
        tmp_path / "out",
        [_event_task(log)],
        batch_size=2,
        progress=False,
        report=False,
        overlap_writes=overlap,
    )
    assert summary.ok == 6 and len(load_records(tmp_path / "out")) == 6
    writers = {name for kind, name in log if kind == "write"}
    assert ("overlapped", overlap) in log
    if overlap:
        assert len(writers) == 1 and next(iter(writers)).startswith("zsdense-write")
    else:
        assert writers == {threading.current_thread().name}


def test_an_error_in_the_writer_thread_is_raised(seg, tmp_path):
    """What the writer thread raises outside a task's write (here the record callback) stops
    the run with that error; the records written before it stay in the manifest."""
    make_images(tmp_path / "in", 6)

    class Boom(Exception):
        pass

    seen = []

    def on_record(rec):
        seen.append(rec["key"])
        if len(seen) == 3:
            raise Boom("manifest callback failed")

    with pytest.raises(Boom):
        run_batch(
            seg,
            items_from_data([tmp_path / "in"]),
            tmp_path / "out",
            [_event_task([], 0.0)],
            batch_size=2,
            progress=False,
            report=False,
            on_record=on_record,
        )
    assert len(load_records(tmp_path / "out")) == 3
