"""SIGTERM like SIGINT (exit 143, manifest + report, resume hint), -q, documented exit codes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zsdense.cli.main import cli
from zsdense.engine.local import MANIFEST_NAME


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (np.random.RandomState(i).rand(16, 20, 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigterm_finishes_batch_writes_report_exits_143_and_resumes(tmp_path):
    make_images(tmp_path / "data", 12)
    args = [
        "run", "data", "--out", "out", "--task", "engine_dummy:spec,name=dummy,sleep=0.1,hold=go",
        "--models", "tiny", "--batch-size", "3", "-q",
    ]  # fmt: skip
    p = subprocess.Popen(
        [sys.executable, "-m", "zsdense.cli.main", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    man = tmp_path / "out" / MANIFEST_NAME
    deadline = time.monotonic() + 60
    while _lines(man) < 1:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)  # batch 2 is held until `go` exists: the run is mid-way
    time.sleep(0.2)
    (tmp_path / "go").touch()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "termination signal received" in err
    assert "rerun the same command to resume" in err  # printed even with -q
    assert (tmp_path / "out" / "report.html").exists()
    n = len(man.read_text().splitlines())
    assert n % 3 == 0 and 3 <= n < 12  # whole batches only
    r = subprocess.run(
        [sys.executable, "-m", "zsdense.cli.main", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # -q: nothing on success
    assert len(man.read_text().splitlines()) == 12


def test_quiet_prints_failures_only(tmp_path):
    make_images(tmp_path / "d", 2)
    (tmp_path / "d" / "bad.png").write_bytes(b"not a png")
    base = ["run", "d", "--task", "engine_dummy:spec,name=dummy", "--models", "tiny", "-q"]
    r = subprocess.run(
        [sys.executable, "-m", "zsdense.cli.main", *base, "--out", "o"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3
    assert "2 ok, 1 failed" in r.stderr and "failed: bad.png" in r.stderr


@pytest.mark.parametrize("command", ["anomaly", "openvocab", "refer", "run"])
def test_help_lists_every_exit_code(command):
    res = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for code in ("0 all ok", "2 usage", "3 some", "130 interrupted", "143 terminated"):
        assert code in text, (command, code)


def test_models_verify_documents_exit_2():
    res = CliRunner().invoke(cli, ["models", "verify", "--help"], terminal_width=200)
    assert "2 a file differs" in " ".join(res.output.split())
