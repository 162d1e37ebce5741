"""CLI feel: fast help without torch, ``--json`` summaries, one file mode for every output,
``--volume-maps`` on the task commands (map and mask volumes), thresholds kept in banks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY = ["--models", "tiny", "--precision", "fp32"]
HELP_CMDS = [
    "", "anomaly", "openvocab", "refer", "run", "eval", "eval anomaly", "eval refer", "models",
    "memory", "memory build", "train-prompts", "decide", "export", "export coco",
]  # fmt: skip


def _cli(args, capsys):
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return int(e.value.code or 0), cap.out, cap.err


def test_help_imports_no_torch_and_is_fast(tmp_path):
    code = (
        "import sys, time, io, contextlib\n"
        "t0 = time.perf_counter()\n"
        "from zsdense.cli.main import cli\n"
        "out = {}\n"
        f"for cmd in {HELP_CMDS!r}:\n"
        "    buf = io.StringIO()\n"
        "    t = time.perf_counter()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            cli.main(args=(cmd + ' --help').split(), prog_name='zsdense',"
        " standalone_mode=False)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    out[cmd] = [time.perf_counter() - t, 'Usage:' in buf.getvalue(),"
        " 'torch' in sys.modules]\n"
        "out['total'] = time.perf_counter() - t0\n"
        "import json; print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for cmd in HELP_CMDS:
        secs, usage, torch_loaded = got[cmd]
        assert usage, f"zsdense {cmd} --help printed no usage"
        assert not torch_loaded, f"zsdense {cmd} --help imported torch"
    # the target is 0.5 s per help on an idle machine; this 2-core box is shared, so the test
    # only guards against the 2+ s of importing torch
    print({k: round(v[0], 3) if isinstance(v, list) else round(v, 3) for k, v in got.items()})
    assert got["total"] < 2.0 * len(HELP_CMDS)
    assert got[""][0] < 2.0 and got["anomaly"][0] < 2.0


def test_top_level_help_lines_are_the_commands_own():
    import click

    from zsdense.cli.main import LAZY_COMMANDS, cli, lazy_short_help

    ctx = click.Context(cli)
    for name, spec in LAZY_COMMANDS.items():
        cmd = cli.get_command(ctx, name)
        assert cmd is not None
        for limit in (45, 200):
            assert lazy_short_help(spec, limit) == cmd.get_short_help_str(limit), name
    text = cli.get_help(ctx)
    for name in LAZY_COMMANDS:
        assert f"  {name} " in text


def _img(path: Path, v: int = 100, size=(32, 40)) -> Path:
    a = np.random.default_rng(v).integers(v - 30, v + 30, (*size, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def test_json_summary_on_stdout(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    _img(d / "a.png")
    (d / "bad.png").write_bytes(b"")
    out = tmp_path / "o"
    code, stdout, err = _cli(
        ["anomaly", d, "--out", out, *TINY, "--json", "--threshold", "0.6"], capsys
    )
    assert code == 3
    js = json.loads(stdout)  # stdout holds the JSON object only
    assert js["command"] == "anomaly" and js["exit_code"] == 3
    assert (js["ok"], js["failed"], js["inputs"]) == (1, 1, 2)
    assert js["failures"][0]["key"] == "bad.png" and "empty" in js["failures"][0]["error"]
    assert js["outputs"]["results"].endswith("results.jsonl")
    assert js["outputs"]["report"].endswith("report.html")
    assert js["thresholds"]["anomaly"]["threshold"] == 0.6
    assert js["thresholds"]["anomaly"]["threshold_source"] == "fixed"
    assert "failed: bad.png" in err  # the human summary stays on stderr
    # a rerun names the earlier failure in the JSON too
    code, stdout, _ = _cli(
        ["anomaly", d, "--out", out, *TINY, "--json", "-q", "--threshold", "0.6"], capsys
    )
    js = json.loads(stdout)
    assert js["skipped"] == 2 and js["failures"] == [
        {"key": "bad.png", "error": js["failures"][0]["error"], "earlier_run": True}
    ]


def test_json_summary_of_openvocab_refer_and_run(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    _img(d / "a.png")
    for args, name in (
        (["openvocab", d, "--classes", "cat, sky"], "openvocab"),
        (["refer", d, "--text", "the cat"], "refer"),
        (["run", d, "--task", "anomaly", "--task", "refer", "--text", "the cat"], "run"),
    ):
        out = tmp_path / name
        code, stdout, err = _cli([*args, "--out", out, *TINY, "--json", "-q"], capsys)
        assert code == 0, err
        js = json.loads(stdout)
        assert js["command"] == name and js["ok"] == 1 and js["failures"] == []
        if name == "run":
            assert set(js["thresholds"]) == {"anomaly"}


def _modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_one_file_mode_for_every_output(tmp_path, umask):
    """Masks, maps, manifest, report, settings, thresholds and a memory bank: all 0666 minus
    the umask (a bank used to be 0600 through safetensors)."""
    code = f"""
import os, sys
os.umask({umask:#o})
from pathlib import Path
from zsdense.cli.main import main
d = Path({str(tmp_path)!r}) / "d"
for args in (
    ["anomaly", str(d), "--out", str(d.parent / "out"), "--models", "tiny", "-q",
     "--calibrate-with", str(d)],
    ["memory", "build", str(d), "--out", str(d.parent / "bank.zsdmem"), "--models", "tiny",
     "--thresholds", str(d.parent / "out" / "thresholds.json")],
):
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, (args, e.code)
"""
    d = tmp_path / "d"
    d.mkdir()
    _img(d / "a.png")
    _img(d / "b.png", 90)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    want = 0o666 & ~umask
    modes = _modes(tmp_path / "out")
    modes["bank.zsdmem"] = stat.S_IMODE((tmp_path / "bank.zsdmem").stat().st_mode)
    for name in ("results.jsonl", "report.html", "run_settings.json", "thresholds.json"):
        assert name in modes
    assert any(n.endswith(".map.tiff") for n in modes)
    assert any(n.endswith(".mask.png") for n in modes)
    wrong = {n: oct(m) for n, m in modes.items() if m != want}
    assert not wrong, f"expected {oct(want)}: {wrong}"


def test_atomic_writer_applies_the_mode(tmp_path):
    from zsdense.io.writers import atomic_path, output_mode

    old = os.umask(0o027)
    try:
        assert output_mode() == 0o640
        with atomic_path(tmp_path / "x.bin") as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors does
            os.close(fd)
        assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_bank_keeps_thresholds_and_anomaly_uses_them(tmp_path, capsys):
    d = tmp_path / "good"
    d.mkdir()
    for i in range(2):
        _img(d / f"g{i}.png", 90 + 5 * i)
    th = tmp_path / "th.json"
    th.write_text(json.dumps({
        "format": "zsdense-thresholds", "format_version": 1, "threshold": 0.123,
        "image_threshold": 0.456, "source": "calibrated",
        "belongs_to": {"preset": "anomalydino", "models": "tiny"},
    }))  # fmt: skip
    bank = tmp_path / "b.zsdmem"
    code, _, err = _cli(["memory", "build", d, "--out", bank, *TINY, "--thresholds", th], capsys)
    assert code == 0, err
    out = tmp_path / "o"
    code, _, err = _cli(
        ["anomaly", d / "g0.png", "--out", out, *TINY, "--preset", "anomalydino",
         "--reference", bank, "-q"], capsys)  # fmt: skip
    assert code == 0, err
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert rec["scores"]["threshold"] == 0.123 and rec["scores"]["image_threshold"] == 0.456


def test_volume_maps_on_the_anomaly_command(tmp_path, capsys):
    nib = pytest.importorskip("nibabel", reason="the medical extra writes NIfTI volumes")
    rng = np.random.RandomState(0)
    vol = (rng.rand(20, 18, 3) * 100).astype(np.float32)
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    d = tmp_path / "d"
    d.mkdir()
    nib.save(nib.Nifti1Image(vol, affine), d / "scan.nii.gz")
    out = tmp_path / "o"
    code, stdout, err = _cli(
        ["anomaly", d, "--out", out, *TINY, "-q", "--volume-maps", "--json", "--threshold",
         "0.5"], capsys)  # fmt: skip
    assert code == 0, err
    js = json.loads(stdout)
    assert any(p.endswith("scan.map.nii.gz") for p in js["outputs"]["extra"])
    maps = nib.load(out / "scan.map.nii.gz")
    masks = nib.load(out / "scan.mask.nii.gz")
    np.testing.assert_allclose(masks.affine, affine)
    m = np.asarray(maps.dataobj)
    k = np.asarray(masks.dataobj)
    assert m.shape == k.shape == vol.shape and k.dtype == np.uint8
    assert np.array_equal(k, (m >= 0.5).astype(np.uint8))  # the mask volume is the decision
    # decide rewrites the mask volume with the new threshold
    t = float(np.quantile(m, 0.7))
    code, _, err = _cli(["decide", out, "--threshold", t, "-q"], capsys)
    assert code == 0, err
    k2 = np.asarray(nib.load(out / "scan.mask.nii.gz").dataobj)
    assert np.array_equal(k2, (m >= np.float32(t)).astype(np.uint8))
