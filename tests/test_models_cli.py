"""``zsdense models list | fetch | verify`` through the real CLI group and console entry."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from zsdense.cli.main import cli
from zsdense.models.registry import CHECKPOINTS


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty HOME and caches, offline: the machine has no weights and cannot download."""
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME", "ZSDENSE_WEIGHTS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ZSDENSE_OFFLINE", "1")
    return tmp_path


def _put(path: Path, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.randn(4, generator=torch.Generator().manual_seed(seed))}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _patch_sha(monkeypatch, name: str, sha: str | None, url: str | None = None) -> None:
    ck = CHECKPOINTS[name]
    spec = dataclasses.replace(ck.files[0], sha256=sha, size=None, url=url or ck.files[0].url)
    monkeypatch.setitem(CHECKPOINTS, name, dataclasses.replace(ck, files=(spec,)))


def test_missing_offline_console_entry_exits_2_without_traceback(tmp_path):
    """The real console entry in a fresh process: one clear error, exit code 2."""
    home, wd = tmp_path / "home", tmp_path / "weights"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ZSDENSE_WEIGHTS", "HF_HUB_CACHE", "XDG_CACHE_HOME", "ZSDENSE_DEBUG")
    }
    env.update(
        ZSDENSE_OFFLINE="1",
        HOME=str(home),
        HF_HOME=str(tmp_path / "hf"),
        TORCH_HOME=str(tmp_path / "torch"),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zsdense.cli.main",
            "models",
            "fetch",
            "sam-vit_b",
            "--weights-dir",
            str(wd),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr
    assert err.startswith("error: ") and "'sam-vit_b'" in err
    for searched in (
        wd / "sam_vit_b_01ec64.pth",
        wd / "sam-vit_b" / "sam_vit_b_01ec64.pth",
        tmp_path / "torch" / "hub" / "checkpoints" / "sam_vit_b_01ec64.pth",
    ):
        assert str(searched) in err
    assert "zsdense models fetch sam-vit_b" in err and "--weights-dir" in err
    assert not wd.exists() or not any(wd.iterdir())


def test_list_shows_presence(env, monkeypatch):
    wd = env / "w"
    _patch_sha(monkeypatch, "sam-vit_b", _put(wd / "sam_vit_b_01ec64.pth"))
    res = CliRunner().invoke(cli, ["models", "list", "--weights-dir", str(wd)])
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln.split() for ln in res.output.splitlines()[2:]}
    assert set(CHECKPOINTS) <= set(lines)
    assert lines["sam-vit_b"][3] == "yes" and lines["sam-vit_b"][-1] == str(
        wd / "sam_vit_b_01ec64.pth"
    )
    assert lines["sam-vit_h"][3] == "no"
    assert lines["dinov2-reg-base"][1:3] == ["dinov2", "facebook/dinov2-with-registers-base"]


def test_verify_ok_unknown_and_mismatch_exit_codes(env, monkeypatch):
    wd = env / "w"
    _patch_sha(monkeypatch, "sam-vit_b", _put(wd / "sam_vit_b_01ec64.pth"))
    _patch_sha(monkeypatch, "sam-vit_l", None)
    _put(wd / "sam_vit_l_0b3195.pth", seed=1)
    runner = CliRunner()
    res = runner.invoke(cli, ["models", "verify", "--weights-dir", str(wd)])
    assert res.exit_code == 0, res.output
    rows = {ln.split()[0]: ln.split() for ln in res.output.splitlines()[2:]}
    assert rows["sam-vit_b"][2] == "ok"
    assert rows["sam-vit_l"][2:4] == ["unknown", "hash"]
    assert "sam-vit_h" not in rows  # missing ones are only listed when named
    # a corrupted file (and a named missing one): exit 2 and the file is left alone
    bad = wd / "sam_vit_b_01ec64.pth"
    bad.write_bytes(bad.read_bytes()[:-3] + b"xyz")
    res = runner.invoke(
        cli, ["models", "verify", "sam-vit_b", "sam-vit_h", "--weights-dir", str(wd)]
    )
    assert res.exit_code == 2
    assert "mismatch" in res.output and "missing" in res.output
    assert "SHA-256" in res.stderr and str(bad) in res.stderr
    assert bad.read_bytes().endswith(b"xyz")


def test_fetch_downloads_into_weights_dir(env, monkeypatch):
    src = env / "published" / "epoch_5.pth"
    sha = _put(src)
    _patch_sha(monkeypatch, "crane-visa", sha, url=src.as_uri())
    monkeypatch.delenv("ZSDENSE_OFFLINE")
    wd = env / "w"
    res = CliRunner().invoke(
        cli, ["models", "fetch", "crane-visa", "--weights-dir", str(wd), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    dest = wd / "trained_on_visa_crane_epoch_5.pth"
    assert dest.read_bytes() == src.read_bytes()
    assert f"crane-visa: {dest} (hash ok)" in res.output


def test_fetch_unknown_name_is_a_usage_error(env):
    from zsdense.errors import ConfigError

    res = CliRunner().invoke(cli, ["models", "fetch", "sam-vit_q"])
    assert isinstance(res.exception, ConfigError) and "sam-vit_b" in str(res.exception)
    assert res.exception.exit_code == 2
