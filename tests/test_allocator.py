"""``--allocator tuned|system`` (``RuntimeConfig.allocator``, ``zsdense.runtime.tune_allocator``):
glibc's malloc tuned so that large freed blocks are reused instead of being returned to the
kernel and page-faulted in again; left alone where the user tuned it already or it is not glibc;
recorded in ``run_settings.json`` (never compared: a resume with the other setting goes on)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from zsdense import runtime as R
from zsdense.config import RuntimeConfig
from zsdense.errors import ConfigError

INT_MAX = (1 << 31) - 1


@pytest.fixture()
def fresh(monkeypatch):
    """A process where no runtime asked for an allocator yet, with a recording mallopt that
    accepts thresholds up to ``limit[0]`` (the real malloc is not touched)."""
    calls: list[tuple[int, int]] = []
    limit = [INT_MAX]

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1 if value <= limit[0] else 0

    monkeypatch.setattr(R, "_allocator", None)
    monkeypatch.setattr(R, "_mallopt", lambda: mallopt)
    monkeypatch.setattr(R.sys, "platform", "linux")
    monkeypatch.setattr(R.platform, "libc_ver", lambda: ("glibc", "2.36"))
    for key in (*R.MALLOC_ENV, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(key, raising=False)
    return calls, limit


def test_tuned_raises_both_thresholds_once_and_system_does_not_undo_it(fresh):
    calls, _ = fresh
    assert R.allocator_state().mode == "system" and not R.allocator_state().applied
    state = R.tune_allocator("tuned")
    assert state.applied and state.mode == "tuned" and "2048 MiB" in state.detail
    assert calls == [(R.M_MMAP_THRESHOLD, INT_MAX), (R.M_TRIM_THRESHOLD, INT_MAX)]
    assert R.tune_allocator("tuned") is state and R.tune_allocator("system") is state
    assert len(calls) == 2  # process-wide, once
    assert R.allocator_state() is state


def test_a_refused_threshold_falls_back_to_the_next_size(fresh):
    calls, limit = fresh
    limit[0] = 1 << 30
    state = R.tune_allocator("tuned")
    assert state.applied and "1024 MiB" in state.detail
    assert calls == [
        (R.M_MMAP_THRESHOLD, INT_MAX),
        (R.M_MMAP_THRESHOLD, 1 << 30),
        (R.M_TRIM_THRESHOLD, 1 << 30),
    ]


def test_every_threshold_refused_leaves_the_defaults(fresh):
    calls, limit = fresh
    limit[0] = 0
    state = R.tune_allocator("tuned")
    assert not state.applied and state.mode == "system" and "mallopt refused" in state.detail
    assert all(param == R.M_MMAP_THRESHOLD for param, _ in calls)  # the trim left alone


@pytest.mark.parametrize(
    ("env", "value", "said"),
    [
        ("MALLOC_TRIM_THRESHOLD_", "1000", "MALLOC_TRIM_THRESHOLD_"),
        ("MALLOC_MMAP_THRESHOLD_", "1000", "MALLOC_MMAP_THRESHOLD_"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000", "GLIBC_TUNABLES"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc"),
        ("LD_PRELOAD", "/opt/libtcmalloc_minimal.so.4", "tcmalloc"),
    ],
)
def test_an_allocator_the_user_tuned_is_left_alone(fresh, monkeypatch, env, value, said):
    calls, _ = fresh
    monkeypatch.setenv(env, value)
    state = R.tune_allocator("tuned")
    assert not state.applied and state.mode == "system" and said in state.detail
    assert calls == []


def test_not_glibc_or_not_linux_is_left_alone(fresh, monkeypatch):
    calls, _ = fresh
    monkeypatch.setattr(R.platform, "libc_ver", lambda: ("", ""))
    state = R.tune_allocator("tuned")
    assert not state.applied and "not glibc" in state.detail
    monkeypatch.setattr(R, "_allocator", None)
    monkeypatch.setattr(R.sys, "platform", "darwin")
    state = R.tune_allocator("tuned")
    assert not state.applied and "not Linux (darwin)" in state.detail
    assert calls == []


def test_system_changes_nothing_and_unknown_settings_are_refused(fresh):
    calls, _ = fresh
    state = R.tune_allocator("system")
    assert not state.applied and state.detail == "the C library's defaults" and calls == []
    assert R.tune_allocator("tuned").applied  # asked later, tuned still applies
    with pytest.raises(ConfigError, match="unknown allocator 'jemalloc'.*tuned, system"):
        R.tune_allocator("jemalloc")
    with pytest.raises(ConfigError, match="unknown allocator"):
        RuntimeConfig(allocator="fast")


def test_a_runtime_applies_its_setting_and_records_the_process_state(fresh):
    calls, _ = fresh
    rt = R.Runtime(models="tiny", device="cpu", precision="fp32", allocator="system")
    assert calls == [] and rt.precision_record()["allocator"] == "the C library's defaults"
    rt = R.Runtime(models="tiny", device="cpu", precision="fp32")  # tuned, the default
    assert len(calls) == 2
    assert rt.precision_record()["allocator"].startswith("glibc malloc: blocks up to")


def test_the_cli_option_reaches_the_record_and_a_resume_ignores_it(fresh, tmp_path, capsys):
    from zsdense.cli.main import main

    calls, _ = fresh
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(data / "a.png")

    def run(out, *extra) -> None:
        cmd = ["anomaly", str(data), "--out", str(out), "--models", "tiny", "-q", *extra]
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--precision", "fp32"])
        assert int(exc.value.code or 0) == 0, capsys.readouterr().err

    run(tmp_path / "one", "--allocator", "system")
    run(tmp_path / "two")  # tuned, the default
    for out, want in ((tmp_path / "one", "the C library's defaults"), (tmp_path / "two", "glibc")):
        rec = json.loads((out / "run_settings.json").read_text())
        assert rec["machine"]["allocator"].startswith(want)
    assert len(calls) == 2  # the second run applied it
    run(tmp_path / "one")  # the other setting resumes the first run: nothing redone
    assert len((tmp_path / "one" / "results.jsonl").read_text().splitlines()) == 1


def test_ray_actors_and_the_run_table_get_the_setting():
    from zsdense.cli.run import RUN_TABLE_KEYS, _seg_kwargs

    assert "allocator" in RUN_TABLE_KEYS
    assert _seg_kwargs({"allocator": "system", "models": "tiny"})["allocator"] == "system"


KEPT = """
import sys, torch
from zsdense.runtime import tune_allocator


def rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


state = tune_allocator(sys.argv[1])
x = torch.empty(64 << 20, dtype=torch.uint8)
x.fill_(1)
held = rss_mb()
del x
print(state.applied, held - rss_mb())
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the allocator is tuned on Linux with glibc only",
)
def test_tuned_keeps_a_freed_block_where_the_defaults_return_it(tmp_path):
    """A 64 MiB tensor written and freed in a fresh interpreter: with the C library's defaults
    its pages go back to the kernel at once (the next one is faulted in anew); tuned, they stay
    with the process for reuse. (Whether a later request reuses them depends on where the
    heap's other blocks landed: a loop of such tensors faulted in 5 of 6 rounds in one process,
    none after the first in another; README, "The memory allocator".)"""
    env = {k: v for k, v in os.environ.items() if k not in (*R.MALLOC_ENV, "GLIBC_TUNABLES")}
    env.pop("LD_PRELOAD", None)
    got = {}
    for setting in ("tuned", "system"):
        out = subprocess.run(
            [sys.executable, "-c", KEPT, setting],
            capture_output=True, text=True, env=env, cwd=tmp_path, check=True, timeout=120,
        )  # fmt: skip
        applied, released = out.stdout.split()
        got[setting] = (applied == "True", float(released))
    assert got["tuned"][0] and got["tuned"][1] < 8, got  # MB handed back on free
    assert not got["system"][0] and got["system"][1] > 56, got


def test_info_says_what_a_run_will_do(fresh, monkeypatch, capsys):
    from zsdense.cli.main import main

    assert R.allocator_plan().startswith("runs tune glibc's malloc")
    with pytest.raises(SystemExit):
        main(["info"])
    assert "allocator    runs tune glibc's malloc" in capsys.readouterr().out
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1")
    assert R.allocator_plan() == (
        "runs keep the C library's defaults (the environment sets MALLOC_TOP_PAD_)"
    )
    R.tune_allocator("system")
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    R.tune_allocator("tuned")  # once applied, info says how
    with pytest.raises(SystemExit):
        main(["info"])
    assert "allocator    glibc malloc: blocks up to 2048 MiB" in capsys.readouterr().out
