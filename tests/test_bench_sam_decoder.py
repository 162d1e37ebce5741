"""``bench/bench_sam_decoder.py`` runs on the tiny SAM and prints its table and ratios."""

from __future__ import annotations

from bench_scripts import bench_on_path  # tests/helpers


def test_bench_sam_decoder_runs_on_the_tiny_sam(capsys):
    with bench_on_path():
        import bench_sam_decoder

        rc = bench_sam_decoder.main(
            ["--models", "tiny", "--repeats", "1", "--points-per-side", "2"]
        )
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert "4 single-point prompts" in out[0]
    rows = {line.split("|")[1].strip(): line.split("|") for line in out if line.startswith("| ")}
    assert set(rows) == {"path", "fp32", "fp32 arranged", "bf16 reference order", "bf16 arranged"}
    assert float(rows["fp32"][5]) == 0.0  # the reference against itself
    assert 0.0 < float(rows["fp32 arranged"][5]) < 1e-4  # the same model, other last bits
    flops = {k: float(r[4]) for k, r in rows.items() if k != "path"}
    assert flops["bf16 arranged"] < flops["bf16 reference order"] == flops["fp32"]
    assert flops["fp32 arranged"] == flops["bf16 arranged"]
    for k in ("bf16 reference order", "bf16 arranged"):
        assert 0.0 < float(rows[k][5]) < 0.05 and float(rows[k][6]) > 0.99
    last = out[-1]
    assert last.startswith("ratios: fp32=1.000 fp32_arranged=") and "bf16_arranged=" in last
