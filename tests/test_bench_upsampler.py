"""``bench/bench_upsampler.py`` runs on the tiny models and prints its tables and ratios."""

from __future__ import annotations

import pytest
from bench_scripts import bench_on_path  # tests/helpers


@pytest.fixture(scope="module")
def bench_module():
    with bench_on_path():
        import bench_upsampler

        yield bench_upsampler


def test_bench_upsampler_runs_on_tiny_models(bench_module, capsys):
    rc = bench_module.main(
        ["--models", "tiny", "--quick", "--repeats", "1", "--precisions", "fp32"]
        + ["--presets", "anomalydino,sclip", "--scales", "2"]
    )
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[1].startswith("load average at start: ") and any(
        line.startswith("load average at end: ") for line in out
    )
    enc = [line for line in out if line.startswith("| fp32 | ") and "GFLOP" in line]
    assert [line.split("|")[2].split()[0] for line in enc] == ["DINOv2", "CLIP"]
    assert all(len(line.split("|")) == 9 for line in enc)  # 3 scales after 4 columns
    pre = [line for line in out if line.startswith("| fp32 | ") and "GFLOP" not in line]
    assert [(c.split("|")[2].strip(), c.split("|")[3].strip()) for c in pre] == [
        ("anomalydino", "bilinear"),
        ("anomalydino", "jafar 2×"),
        ("sclip", "bilinear"),
        ("sclip", "jafar 4×"),
    ]
    last = out[-1]
    assert last.startswith("ratios: fp32:DINOv2=") and "fp32:anomalydino:jafar2×=" in last
    assert float(last.split("fp32:sclip:jafar4×=")[1].split()[0]) > 0
