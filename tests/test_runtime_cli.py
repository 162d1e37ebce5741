"""Runtime selection, the Segmenter's laziness, and the CLI skeleton's error policy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import zsdense
from zsdense.config import RuntimeConfig, pick_preset, with_overrides
from zsdense.errors import ConfigError
from zsdense.runtime import auto_precision, autocast, resolve_device, resolve_precision


def test_precision_rules():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == auto_precision(cpu)[0]
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("fp16", torch.device("cuda")) == torch.float16
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        with autocast(cpu, torch.float16):
            pass
    with autocast(cpu, torch.bfloat16):
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == torch.bfloat16


def test_device_rules():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown precision"):
        RuntimeConfig(precision="fp8")
    with pytest.raises(ConfigError, match="unknown device"):
        RuntimeConfig(device="tpu")
    cfg = RuntimeConfig()
    assert with_overrides(cfg, batch_size=8, device=None).batch_size == 8
    with pytest.raises(ConfigError, match="unknown option"):
        with_overrides(cfg, batchsize=8)
    with pytest.raises(ConfigError, match="choose one of: a, b"):
        pick_preset({"a": 1, "b": 2}, "c", "test")


def test_segmenter_is_lazy_and_flags_tiny():
    from zsdense import models
    from zsdense.api import Segmenter

    models.clear_cache()
    seg = Segmenter(device="cpu", models="tiny")
    assert models._CACHE == {}  # nothing loaded at construction
    meta = seg.result_meta()
    assert meta["random_weights"] is True and "not meaningful" in meta["warning"]
    c1 = seg.clip("ViT-B-16")
    assert seg.clip("ViT-B-16") is c1 and c1.is_random
    with pytest.raises(ConfigError, match="unknown model set"):
        Segmenter(models="huge")


def test_cli_version_and_help():
    from zsdense.cli.main import cli

    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and zsdense.__version__ in r.output
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "info" in r.output


def test_cli_info_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "zsdense.cli.main", "info"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "zsdense" in proc.stdout and "torch" in proc.stdout and "weights dirs" in proc.stdout
    assert "torch CPU capability" in proc.stdout and "cpu bf16" in proc.stdout
    assert "(auto on " in proc.stdout


def test_cli_error_policy_no_traceback(tmp_path):
    """A ZsdenseError raised in a command prints one line and exits 2, no traceback."""
    import click

    from zsdense.cli import main as m
    from zsdense.errors import WeightsError

    @click.command()
    def boom():
        raise WeightsError("checkpoint 'x' not found; put it into --weights-dir")

    m.cli.add_command(boom, "boom-test")
    try:
        with pytest.raises(SystemExit) as exc:
            m.main(["boom-test"])
        assert exc.value.code == 2
    finally:
        m.cli.commands.pop("boom-test", None)
    proc = subprocess.run(
        [sys.executable, "-m", "zsdense.cli.main", "no-such-command"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_random_model_set_is_full_size_and_flagged():
    from zsdense import models
    from zsdense.api import Segmenter

    seg = Segmenter(device="cpu", models="random")
    assert seg.random_weights and not seg.tiny
    assert seg.result_meta()["random_weights"] is True
    sam = seg.sam("vit_b")
    assert len(sam.model.image_encoder.blocks) == 12  # the real ViT-B depth, random weights
    models.clear_cache()
