"""Issue 18 item 4: ``run_settings.json`` records the precision that ran (``auto`` resolved), the
device type and the CPU capability that decided it; resuming an ``--out`` on a machine where
``auto`` resolves otherwise is refused, naming the precision (like any changed setting)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from zsdense.cli.main import main


@pytest.fixture()
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(d / f"im{i}.png")
    return d


def _run(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return int(exc.value.code or 0), capsys.readouterr().err


def test_auto_is_recorded_resolved_and_a_resume_elsewhere_is_refused(
    data, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    cmd = ["anomaly", data, "--out", out, "--models", "tiny", "-q"]  # --precision auto (default)
    monkeypatch.setenv("ZSDENSE_CPU_BF16", "none")  # a CPU without native bf16: auto -> fp32
    code, err = _run(cmd, capsys)
    assert code == 0, err
    rec = json.loads((out / "run_settings.json").read_text())
    assert rec["precision"] == "fp32"  # what ran, never "auto"
    m = rec["machine"]
    assert m["requested"] == "auto" and m["device_type"] == "cpu"
    assert "cpu_capability" in m and m["cpu_bf16_native"] is False
    line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert line["meta"]["result"]["precision"] == "float32"

    # the same command resumes on the same kind of machine (nothing redone)
    code, err = _run(cmd, capsys)
    assert code == 0, err

    # the same --out on a CPU with native bf16: auto -> bf16, refused before any input
    monkeypatch.setenv("ZSDENSE_CPU_BF16", "native")
    code, err = _run(cmd, capsys)
    assert code == 2
    assert "precision" in err and "'fp32' -> 'bf16'" in err
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2  # nothing was added

    # asking for the recorded precision explicitly resumes there too
    code, err = _run([*cmd, "--precision", "fp32"], capsys)
    assert code == 0, err
