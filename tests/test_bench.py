"""The benchmark table script runs (tiny models) and its FLOP counting and target rule hold."""

from __future__ import annotations

import os

import pytest
import torch
from bench_scripts import bench_on_path  # tests/helpers


@pytest.fixture(scope="module")
def bench_modules():
    with bench_on_path():
        import bench_all
        import common

        yield common, bench_all


def test_count_flops_matmul_and_cpu_attention(bench_modules):
    common, _ = bench_modules
    a, b = torch.randn(30, 40), torch.randn(40, 50)
    assert common.count_flops(lambda: a @ b) == 2 * 30 * 40 * 50
    q = torch.randn(1, 3, 20, 8)
    # QK^T and AV: 2 * (2 * heads * Nq * Nk * d); the CPU kernel is counted too
    got = common.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert got == 4 * 3 * 20 * 20 * 8


def test_count_flops_fused_multihead_attention_equals_its_unfused_path(bench_modules):
    """``nn.MultiheadAttention``'s fused inference kernel is counted as its decomposed path
    (which torch's counter sees op by op) counts it."""
    common, _ = bench_modules
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        fused = common.count_flops(lambda: mha(x, x, x, need_weights=False))
        unfused = common.count_flops(lambda: mha(x, x, x, need_weights=True))
    assert fused == unfused == 2 * 2 * 10 * 32 * 32 * 4 + 4 * 2 * 10 * 10 * 32


def test_profile_by_op_splits_matrix_from_other_work(bench_modules):
    """Matrix products count as matrix time; element-wise work and Python between operators as
    the rest; the largest other operators are listed."""
    common, _ = bench_modules
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    big = torch.randn(2_000_000)

    def work():
        for _ in range(3):
            a @ b
        (big * 2.0).exp_()

    p = common.profile_by_op(work)
    assert 0 < p["matrix"] < p["wall"]
    assert p["nonmatrix"] == pytest.approx(p["wall"] - p["matrix"])
    names = [n for n, _s, _c in p["top"]]
    assert "aten::mul" in names and "aten::exp_" in names
    assert not any(common.is_matrix_op(n) for n in names)
    assert {n for n, _s, _c in p["top_matrix"]} == {"aten::mm", "aten::matmul"}
    assert common.is_matrix_op("aten::_scaled_dot_product_flash_attention_for_cpu")
    assert common.is_matrix_op("aten::mkldnn_convolution")


def test_target_rule(bench_modules):
    _, bench_all = bench_modules
    assert bench_all.target(dict(ratio=1.10, flop_ratio=1.0)) == "met"
    assert bench_all.target(dict(ratio=1.20, flop_ratio=1.0)) == "met"  # 1.15 + 0.05
    assert bench_all.target(dict(ratio=1.21, flop_ratio=1.12)) == "missed"
    assert bench_all.target(dict(ratio=1.30, flop_ratio=1.40)) == "met (FLOP floor)"
    assert bench_all.target(dict(ratio=1.25, flop_ratio=1.21)) == "met (FLOP floor)"
    assert bench_all.target(dict(ratio=1.27, flop_ratio=1.21)) == "missed"
    assert bench_all.limit(dict(flop_ratio=1.24)) == pytest.approx(1.29)


def test_paired_ratios_median_and_quartiles(bench_modules):
    """Each run's pipeline time over the same run's bare time; median and quartiles (the
    extremes below four pairs); the minima's ratio is another figure."""
    _, bench_all = bench_modules
    pipe = [1.2, 2.6, 1.1, 1.3, 1.5]
    bare = [1.0, 2.0, 1.0, 1.0, 1.0]  # pairs: 1.2, 1.3, 1.1, 1.3, 1.5
    med, q1, q3 = bench_all.paired_ratios(pipe, bare)
    assert (med, q1, q3) == pytest.approx((1.3, 1.2, 1.3))
    assert min(pipe) / min(bare) == pytest.approx(1.1)
    assert bench_all.paired_ratios([3.0, 1.0], [2.0, 1.0]) == pytest.approx((1.25, 1.0, 1.5))
    assert bench_all.paired_ratios([2.0], [1.0]) == (2.0, 2.0, 2.0)
    assert bench_all.paired_cell(dict(paired=(1.234, 1.2, 1.26))) == "1.23 (1.20–1.26)"
    with pytest.raises(ValueError, match="no runs"):
        bench_all.paired_ratios([], [])


def test_bench_all_runs_on_tiny_models(bench_modules, capsys):
    _, bench_all = bench_modules
    rc = bench_all.main(
        ["--quick", "--repeats", "1", "--models", "tiny", "--skip-throughput"]
        + ["--presets", "crane,proxyclip", "--set", "crane.sigma=2"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    rows = [line for line in out if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["crane", "proxyclip"]
    assert len(rows[0].split("|")) == 14  # twelve columns
    assert rows[0].split("|")[12].strip() == "sigma=2" and rows[1].split("|")[12].strip() == ""
    med, spread = rows[0].split("|")[5].strip().split(" ", 1)  # median (low–high)
    lo, hi = (float(v) for v in spread.strip("()").split("–"))
    assert 0 < lo <= float(med) <= hi
    nonmatrix = rows[0].split("|")[9].split()
    assert float(nonmatrix[0]) > 0 and nonmatrix[1].startswith("(")  # pipeline (bare's own)
    assert any(line.startswith("machine: CPU ") and "bf16 " in line for line in out)
    last = out[-1]
    assert last.startswith("ratios: crane=") and " proxyclip=" in last
    assert float(last.split("crane=")[1].split()[0]) > 0


def test_set_adds_a_preset_option_and_names_it(bench_modules):
    from zsdense.errors import ConfigError

    _, bench_all = bench_modules
    cases = {"crane": {"cfg": {"preset": "crane"}}, "hybridgl+": {"cfg": {"preset": "hybridgl+"}}}
    bench_all.apply_settings(
        cases, ["hybridgl+.proposal_decoder=arranged", "crane.sigma=2", "crane.x=[1, 2]"]
    )
    assert cases["hybridgl+"]["cfg"]["proposal_decoder"] == "arranged"
    assert cases["crane"]["cfg"]["sigma"] == 2 and cases["crane"]["cfg"]["x"] == [1, 2]
    assert cases["crane"]["settings"] == ["sigma=2", "x=[1, 2]"]
    for bad in ("crane.sigma", "nope.sigma=2", "sigma=2", "crane.=2"):
        with pytest.raises(ConfigError, match="PRESET.OPTION=VALUE"):
            bench_all.apply_settings(cases, [bad])


def test_throughput_batches_are_parsed_in_order_once(bench_modules):
    import argparse

    _, bench_all = bench_modules
    assert bench_all.parse_batches("1,4,16") == (1, 4, 16)
    assert bench_all.parse_batches("4, 1,4") == (4, 1)
    for bad in ("", "0,4", "a,4", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive batch sizes"):
            bench_all.parse_batches(bad)


def test_device_check_script_dry_run_on_the_cpu(tmp_path):
    """bench/device_check.sh, the prepared GPU check, run on the CPU with tiny models: it
    assembles the package as installed (zsdense.prompts from prompts/), runs both bench_all
    steps and leaves their logs, the throughput at batch 1, 4 and 16 included."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("bash and coreutils' timeout run the device check script")
    root = Path(__file__).resolve().parents[1]
    script = root / "bench" / "device_check.sh"
    if not script.is_file():
        pytest.skip("the source tree's bench/ folder is not here")
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OUT=str(out),
        PYTHON=sys.executable,
        ZSDENSE_CHECK_DEVICE="cpu",
        ZSDENSE_CHECK_MODELS="tiny",
        ZSDENSE_CHECK_PRESETS="crane",
        ZSDENSE_CHECK_THROUGHPUT_IMAGES="2",
        ZSDENSE_CHECK_MIN_SECONDS="0",
        ZSDENSE_CHECK_SECONDS="300",
    )
    res = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path
    )
    log = (out / "device_check.log").read_text() if (out / "device_check.log").exists() else ""
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + log[-3000:]
    env_txt = (out / "env.txt").read_text()
    assert "zsdense " in env_txt and str(root / "zsdense") not in env_txt  # the assembled copy
    auto = (out / "bench_all_auto.txt").read_text()
    head = "| crane through the local engine | batch 1 img/s | batch 4 img/s | batch 16 img/s |"
    assert head in auto
    assert auto.strip().splitlines()[-1].startswith("ratios: crane=")
    fp32 = (out / "bench_all_fp32.txt").read_text()
    assert "| `crane` |" in fp32 and "| fp32 |" in fp32
    assert "done, exit status 0" in log
