"""The benchmark table script runs (tiny models) and its FLOP counting and target rule hold."""

from __future__ import annotations

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
    assert len(rows[0].split("|")) == 13  # eleven columns
    assert rows[0].split("|")[11].strip() == "sigma=2" and rows[1].split("|")[11].strip() == ""
    nonmatrix = rows[0].split("|")[8].split()
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
