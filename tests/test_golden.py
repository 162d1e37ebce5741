"""Golden outputs: the bundled assets through every task on the tiny models give the outputs
recorded before the library restructuring (``tests/golden/*.json``, made by
``tests/golden/summarize.py`` from the code of the previous release).

**The goldens are fp32 numbers** (recorded on a CPU without native bf16, where ``--precision
auto`` is fp32): every run here pins ``--precision fp32``, so they hold on any CPU. Maps, masks
and scores are compared with tolerances (a CPU with other float kernels may move the last bits);
on the machine that recorded them the files were byte-identical, which the test reports when it
is not the case. ``auto`` is tested apart with the CPU's answer mocked both ways: fp32 on a CPU
without native bf16 (the goldens again), bf16 on one with it (within the bf16 tolerance of the
README's "Devices and precision" table).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
GOLDEN = Path(__file__).resolve().parent / "golden"

spec = importlib.util.spec_from_file_location("golden_summarize", GOLDEN / "summarize.py")
summarize_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize_mod)

A = ASSETS
GOLDEN_PRECISION = "fp32"  # what tests/golden/*.json were recorded at
CASES = {
    "anomaly-crane": ["anomaly", A / "inspection", A / "medical", "--preset", "crane"],
    "anomaly-craneplus": [
        "anomaly", A / "inspection", A / "medical", "--preset", "crane+", "--format", "npy",
    ],
    "ov-sclip": ["openvocab", A / "scenes", "--preset", "sclip", "--classes-file", "voc21"],
    "ov-proxyclip": [
        "openvocab", A / "scenes", "--preset", "proxyclip", "--classes", "cat, person, cup",
        "--format", "rle",
    ],
    "refer": ["refer", A / "scenes", "--text", "the cup left of the laptop"],
}  # fmt: skip


def _close(a, b, tol: float, where: str, problems: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            problems.append(f"{where}: keys {sorted(a)} != {sorted(b)}")
        for k in set(a) & set(b):
            _close(a[k], b[k], tol, f"{where}.{k}", problems)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            problems.append(f"{where}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, tol, f"{where}[{i}]", problems)
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        if not math.isclose(a, b, rel_tol=tol, abs_tol=tol):
            problems.append(f"{where}: {a} != {b}")
    elif a != b:
        problems.append(f"{where}: {a!r} != {b!r}")


def _run(name: str, out: Path, precision: str, capsys) -> list[dict]:
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(
            [str(a) for a in CASES[name]]
            + ["--out", str(out), "--models", "tiny", "-q", "--precision", precision]
        )
    text = capsys.readouterr().err
    assert exc.value.code == 0, text
    return summarize_mod.summarize(out)


def _recorded_precision(out: Path) -> set[str]:
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {r["meta"]["result"]["precision"] for r in recs}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bundled_assets_give_the_golden_outputs(name, tmp_path, capsys):
    if name.startswith("anomaly"):
        pytest.importorskip("pydicom", reason="the medical extra reads assets/medical/*.dcm")
    out = tmp_path / name
    got = _run(name, out, GOLDEN_PRECISION, capsys)
    assert _recorded_precision(out) == {"float32"}
    _compare(name, got)


def _compare(name: str, got: list[dict]) -> None:
    want = json.loads((GOLDEN / f"{name}.json").read_text())
    assert [r["key"] for r in got] == [r["key"] for r in want]
    problems: list[str] = []
    identical = 0
    for g, w in zip(got, want):
        key = w["key"]
        assert g["status"] == w["status"] == "ok", key
        _close(g["scores"], w["scores"], 1e-4, f"{key} scores", problems)
        assert set(g["files"]) == set(w["files"]), key
        for kind, wf in w["files"].items():
            gf = g["files"][kind]
            assert gf["name"] == wf["name"]
            identical += gf["sha256"] == wf["sha256"]
            if "shape" not in wf:
                continue  # overlays (JPEG) and RLE JSON: compared through the masks and maps
            assert gf["shape"] == wf["shape"], f"{key} {kind}"
            n = math.prod(wf["shape"])
            if kind == "mask":  # a pixel on a threshold may flip on another CPU
                assert abs(gf["nonzero"] - wf["nonzero"]) <= max(2, 1e-3 * n), f"{key} mask"
                assert abs(gf["sum"] - wf["sum"]) <= 255 * max(2, 1e-3 * n), f"{key} mask"
            else:
                _close(gf["q"], wf["q"], 1e-4, f"{key} {kind} quantiles", problems)
                _close(gf["sum"] / n, wf["sum"] / n, 1e-4, f"{key} {kind} mean", problems)
    assert not problems, "\n".join(problems[:20])
    total = sum(len(w["files"]) for w in want)
    if identical != total:
        print(f"{name}: {identical}/{total} files byte-identical (values within tolerance)")


@pytest.mark.parametrize("native", [False, True], ids=["cpu-without-bf16", "cpu-with-bf16"])
def test_auto_precision_follows_the_cpu(native, tmp_path, capsys, monkeypatch):
    """``--precision auto`` (the default) with the CPU's bf16 answer mocked, whatever CPU runs
    the test: without native bf16 it is fp32 and gives the goldens; with it, bf16, and the
    scores and maps stay within the README's bf16 bound for crane (5e-3) while the recorded
    precision says bf16."""
    pytest.importorskip("pydicom", reason="the medical extra reads assets/medical/*.dcm")
    import torch

    from zsdense import runtime

    answer = runtime.CpuBf16Support(native=native, source="test", detail="mocked")
    monkeypatch.delenv(runtime.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda **kw: answer)
    monkeypatch.setattr(runtime, "_WARNED", set())
    want_dtype = torch.bfloat16 if native else torch.float32
    assert runtime.auto_precision(torch.device("cpu"))[0] == want_dtype
    assert runtime.resolve_precision("auto", torch.device("cpu")) == want_dtype
    name = "anomaly-crane"
    out = tmp_path / name
    got = _run(name, out, "auto", capsys)
    assert _recorded_precision(out) == {str(want_dtype).replace("torch.", "")}
    if not native:
        _compare(name, got)
        return
    want = json.loads((GOLDEN / f"{name}.json").read_text())
    assert [r["key"] for r in got] == [r["key"] for r in want]
    problems: list[str] = []
    for g, w in zip(got, want):
        _close(g["scores"]["score"], w["scores"]["score"], 5e-3, f"{w['key']} score", problems)
        _close(g["files"]["map"]["q"], w["files"]["map"]["q"], 5e-3, f"{w['key']} map", problems)
    assert not problems, "\n".join(problems)
