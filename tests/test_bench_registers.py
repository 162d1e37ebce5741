"""bench/bench_registers.py runs on the tiny models and prints its table and ratios."""

from __future__ import annotations

import pytest
from bench_scripts import bench_on_path  # tests/helpers


@pytest.fixture(scope="module")
def bench():
    with bench_on_path():
        import bench_registers

        yield bench_registers


def test_hub_like_neurons_follow_the_shipped_shape(bench):
    from zsdense.models import registers as R
    from zsdense.models.clip import build_tiny_clip

    hub = R.DINOV2_L_HUB_NEURONS
    shape = [len(n) for _, n in hub.layers]  # per layer, deepest first
    assert [li for li, _ in hub.layers] == list(range(17, 11, -1))  # below 3/4 of 24 layers
    model = build_tiny_clip("ViT-B-16")
    ns = bench.hub_like_neurons(model)
    top = (3 * model.num_layers) // 4 - 1
    assert [li for li, _ in ns.layers] == list(range(top, max(-1, top - len(shape)), -1))
    assert [len(n) for _, n in ns.layers] == shape[: len(ns.layers)]
    assert ns.encoder == R.encoder_id(model)
    assert bench.hub_like_neurons(model).layers == ns.layers  # seeded


def test_bench_registers_runs_on_tiny_models(bench, capsys):
    rc = bench.main(
        ["--models", "tiny", "--repeats", "1", "--min-seconds", "0", "--presets", "crane,sclip"]
        + ["--find-images", "1", "--find-encoders", "clip:ViT-B-16"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert "load average" in out[0] and "precision fp32" in out[0] and "threads" in out[0]
    rows = [line for line in out if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["crane", "sclip"]
    assert all("clip/ViT-B-16/openai" in r for r in rows)
    find = [line for line in out if line.startswith("| clip ViT-B-16")]
    assert len(find) == 1 and "1 of 1" in find[0]
    last = out[-1]
    assert last.startswith("ratios: crane=") and " sclip=" in last
    assert float(last.split("crane=")[1].split()[0]) > 0
