"""``--precision auto``: bf16 only where the device runs it natively; a forced emulated bf16
warns once; the per-machine probe is cached; ``zsdense info`` says what auto picks and why."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from zsdense import runtime
from zsdense.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture
def cpu_flags(monkeypatch, tmp_path):
    """Set what the CPU reports: ``set_flags(torch=..., proc=...)`` (None: that source cannot
    tell). The per-process detection cache, the once-only warning and the probe cache dir are
    reset around each test."""
    monkeypatch.setenv("ZSDENSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(runtime.CPU_BF16_ENV, raising=False)  # a run playing the other CPU kind
    monkeypatch.setattr(runtime.torch.backends.mkldnn, "is_available", lambda: True)
    runtime._cpu_bf16_support_cached.cache_clear()
    monkeypatch.setattr(runtime, "_WARNED", set())

    def set_flags(torch_flags=None, proc_flags=None):
        monkeypatch.setattr(runtime, "_torch_cpu_flags", lambda: torch_flags)
        monkeypatch.setattr(runtime, "_proc_cpu_flags", lambda: proc_flags)
        runtime._cpu_bf16_support_cached.cache_clear()

    yield set_flags
    runtime._cpu_bf16_support_cached.cache_clear()


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_flags):
    cpu_flags(torch_flags=set())  # e.g. AMD EPYC: AVX2 only
    dtype, why = runtime.auto_precision(CPU)
    assert dtype == torch.float32 and "no native bf16" in why
    assert runtime.resolve_precision("auto", CPU) == torch.float32


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_flags, flag):
    cpu_flags(torch_flags={flag})
    assert runtime.resolve_precision("auto", CPU) == torch.bfloat16
    sup = runtime.cpu_bf16_support()
    assert sup.native and sup.source == "torch cpuinfo" and flag in sup.detail


def test_proc_cpuinfo_answers_where_torch_cannot(cpu_flags):
    cpu_flags(torch_flags=None, proc_flags={"fp", "asimd", "bf16"})  # Linux on Arm (Graviton3)
    assert runtime.resolve_precision("auto", CPU) == torch.bfloat16
    assert runtime.cpu_bf16_support().source == "/proc/cpuinfo"
    cpu_flags(torch_flags=None, proc_flags={"fp", "asimd"})
    assert runtime.resolve_precision("auto", CPU) == torch.float32


@pytest.mark.parametrize("value, native", [("native", True), ("none", False), ("NONE", False)])
def test_environment_overrides_what_the_cpu_says(cpu_flags, monkeypatch, value, native, tmp_path):
    """$ZSDENSE_CPU_BF16 answers before the flags (both ways), in this process and in a
    subprocess (how tests and CI play a CPU of the other kind)."""
    import subprocess
    import sys

    cpu_flags(torch_flags=set() if native else {"amx_bf16"})  # the CPU says the opposite
    monkeypatch.setenv(runtime.CPU_BF16_ENV, value)
    sup = runtime.cpu_bf16_support()
    assert sup.native is native and sup.source == "$ZSDENSE_CPU_BF16"
    want = torch.bfloat16 if native else torch.float32
    assert runtime.resolve_precision("auto", CPU) == want
    code = "import torch, zsdense.runtime as r; print(r.auto_precision(torch.device('cpu'))[0])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == str(want)
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "")  # empty: ask the CPU again
    assert runtime.cpu_bf16_support().native is not native
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "avx512")
    with pytest.raises(ConfigError, match="native, none"):
        runtime.cpu_bf16_support()


def test_proc_cpuinfo_parser(monkeypatch, tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\n")
    real = runtime.Path
    monkeypatch.setattr(runtime, "Path", lambda p: f if p == "/proc/cpuinfo" else real(p))
    assert runtime._proc_cpu_flags() == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    f.write_text("processor\t: 0\n")
    assert runtime._proc_cpu_flags() is None


def test_probe_runs_once_per_machine_and_is_cached(cpu_flags, monkeypatch, tmp_path):
    cpu_flags(torch_flags=None, proc_flags=None)  # nothing can tell: measure
    calls = []

    def fake_probe(*a, **k):
        calls.append(1)
        return 0.4  # bf16 2.5x faster: native

    monkeypatch.setattr(runtime, "probe_bf16_slowdown", fake_probe)
    sup = runtime.cpu_bf16_support()
    assert sup.native and sup.source == "probe" and sup.slowdown == pytest.approx(0.4)
    cache = tmp_path / "cache" / runtime.PROBE_CACHE_FILE
    assert json.loads(cache.read_text()) == {runtime._probe_key(): 0.4}
    runtime._cpu_bf16_support_cached.cache_clear()  # a new process on the same machine
    sup2 = runtime.cpu_bf16_support()
    assert sup2.source == "probe (cached)" and sup2.native and len(calls) == 1
    assert runtime.resolve_precision("auto", CPU) == torch.bfloat16
    # another machine's entry in the same file does not count
    cache.write_text(json.dumps({"other-machine": 0.4}))
    monkeypatch.setattr(runtime, "probe_bf16_slowdown", lambda *a, **k: 9.0)
    runtime._cpu_bf16_support_cached.cache_clear()
    sup3 = runtime.cpu_bf16_support()
    assert not sup3.native and sup3.slowdown == 9.0
    assert set(json.loads(cache.read_text())) == {"other-machine", runtime._probe_key()}


def test_real_probe_returns_a_positive_ratio():
    r = runtime.probe_bf16_slowdown(size=64, repeats=1)
    assert r > 0 and r == r  # finite, not NaN


def test_forced_bf16_without_native_support_warns_once(cpu_flags):
    cpu_flags(torch_flags=set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runtime.resolve_precision("bf16", CPU) == torch.bfloat16
        assert runtime.resolve_precision("bf16", CPU) == torch.bfloat16
        runtime.resolve_precision("auto", CPU)
    ours = [w for w in caught if issubclass(w.category, runtime.PrecisionWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "11x slower" in msg and "--precision auto or fp32" in msg


def test_forced_bf16_warning_quotes_the_measured_slowdown(cpu_flags, monkeypatch):
    cpu_flags(torch_flags=None, proc_flags=None)
    monkeypatch.setattr(runtime, "probe_bf16_slowdown", lambda *a, **k: 23.4)
    with pytest.warns(runtime.PrecisionWarning, match=r"measured here.*23\.4x the fp32 time"):
        runtime.resolve_precision("bf16", CPU)


def test_forced_bf16_with_native_support_is_silent(cpu_flags):
    cpu_flags(torch_flags={"amx_bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.resolve_precision("bf16", CPU) == torch.bfloat16


def test_cuda_auto_and_bad_names(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.resolve_precision("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.resolve_precision("auto", cuda) == torch.float16
    assert runtime.auto_precision(torch.device("mps"))[0] == torch.float32
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        runtime.resolve_precision("fp8", CPU)


def test_segmenter_uses_auto_and_warns_once_for_forced_bf16(cpu_flags):
    from zsdense.api import Segmenter

    cpu_flags(torch_flags=set())
    assert Segmenter(device="cpu", models="tiny").dtype == torch.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert Segmenter(device="cpu", models="tiny", precision="bf16").dtype == torch.bfloat16
    assert sum(issubclass(w.category, runtime.PrecisionWarning) for w in caught) == 1
    cpu_flags(torch_flags={"avx512_bf16"})
    assert Segmenter(device="cpu", models="tiny").dtype == torch.bfloat16


@pytest.mark.parametrize("flags, dtype", [(set(), "float32"), ({"amx_bf16"}, "bfloat16")])
def test_info_prints_capability_and_the_auto_choice(cpu_flags, monkeypatch, flags, dtype):
    from zsdense.cli.main import cli

    cpu_flags(torch_flags=flags)
    monkeypatch.setattr(runtime, "resolve_device", lambda d="auto": CPU)
    r = CliRunner().invoke(cli, ["info"])
    assert r.exit_code == 0, r.output
    assert f"torch CPU capability {runtime.cpu_capability()}" in r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("precision"))
    assert line.startswith(f"precision    {dtype} (auto on cpu: CPU ")
    bf16_line = next(ln for ln in r.output.splitlines() if ln.startswith("cpu bf16"))
    assert ("not native" in bf16_line) == (dtype == "float32")
