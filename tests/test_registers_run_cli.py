"""``--registers`` on the command line (tiny models, fp32): ``off`` reproduces the run without
the option byte for byte, ``on`` keeps every output's size and is recorded, a resume with
another register setting is refused, a neuron file for another encoder stops the run before
any input (exit 2), and ``zsdense run``'s ``[run]`` table takes the setting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsdense.cli.main import main
from zsdense.config import RuntimeConfig
from zsdense.models import registers as R
from zsdense.runtime import Runtime

BASE = ["--models", "tiny", "--precision", "fp32", "-q", "--format", "npy", "--no-overlay"]
CRANE = ["--preset", "crane", "--image-size", "112"]
CLIP_LABEL = "clip/ViT-L-14-336/openai"


def _zsdense(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return int(exc.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 64), (40, 40), (56, 30)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d


def _neurons(model) -> R.NeuronSet:
    a = R._Adapter(model)
    layers = {1: [3, a.mlp_dim // 2], a.num_layers - 1: [5]}
    return R.NeuronSet(layers=tuple(layers.items()), encoder=R.encoder_id(model), provenance="t")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("neurons")
    rt = Runtime(RuntimeConfig(device="cpu", models="tiny", precision="fp32"))
    return {
        "clip": _neurons(rt.clip("ViT-L-14-336")).save(d / "clip.json"),
        "dino": _neurons(rt.dinov2("dinov2-small")).save(d / "dino.json"),
    }


def _records(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("timing", None)
        r.pop("seconds", None)
    return sorted(recs, key=lambda r: r["key"])


def _maps(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(out.glob("*.npy"))}


def test_off_is_the_run_without_the_option_and_on_keeps_sizes(data, files, tmp_path, capsys):
    outs = {k: tmp_path / k for k in ("plain", "off", "on")}
    code, err = _zsdense(["anomaly", data, "--out", outs["plain"], *CRANE, *BASE], capsys)
    assert code == 0, err
    code, err = _zsdense(
        ["anomaly", data, "--out", outs["off"], *CRANE, *BASE, "--registers", "off"], capsys
    )
    assert code == 0, err
    plain, off = _maps(outs["plain"]), _maps(outs["off"])
    assert plain.keys() == off.keys() and plain
    for k in plain:
        assert plain[k].tobytes() == off[k].tobytes(), k  # bit for bit
    for name in ("0.mask.png", "1.mask.png", "2.mask.png"):
        assert (outs["plain"] / name).read_bytes() == (outs["off"] / name).read_bytes()
    assert _records(outs["plain"]) == _records(outs["off"])
    s_plain = json.loads((outs["plain"] / "run_settings.json").read_text())
    s_off = json.loads((outs["off"] / "run_settings.json").read_text())
    assert s_plain == s_off and "registers" not in s_off and "registers_applied" not in s_off

    args = ["anomaly", data, "--out", outs["on"], *CRANE, *BASE, "--registers", files["clip"]]
    code, err = _zsdense(args, capsys)
    assert code == 0, err
    on = _maps(outs["on"])
    assert on.keys() == plain.keys()
    changed = False
    for k in plain:
        assert on[k].shape == plain[k].shape and on[k].dtype == plain[k].dtype, k
        changed |= not np.array_equal(on[k], plain[k])
    assert changed
    with Image.open(outs["on"] / "2.mask.png") as m:
        assert m.size == (30, 56)
    s_on = json.loads((outs["on"] / "run_settings.json").read_text())
    fp = R.load_neurons(files["clip"]).fingerprint
    assert s_on["registers"]["neurons"][0]["fingerprint"] == fp
    applied = s_on["registers_applied"][CLIP_LABEL]
    assert applied["registers"] == "on" and applied["fingerprint"] == fp
    assert applied["neurons_from"] == str(Path(files["clip"]).resolve())
    assert applied["num_registers"] == 1 and applied["mode"] == "zero"
    rec = _records(outs["on"])[0]
    assert rec["meta"]["result"]["registers"][CLIP_LABEL]["fingerprint"] == fp

    # resume: the same setting resumes; another one (or none) is refused
    code, err = _zsdense(args, capsys)
    assert code == 0, err
    code, err = _zsdense(args + ["--registers-count", "2"], capsys)
    assert code == 2 and "other settings" in err and "registers" in err
    code, err = _zsdense(["anomaly", data, "--out", outs["on"], *CRANE, *BASE], capsys)
    assert code == 2 and "registers" in err
    code, err = _zsdense(
        ["anomaly", data, "--out", outs["off"], *CRANE, *BASE, "--registers", "auto"], capsys
    )
    assert code == 2 and "registers" in err


def test_a_file_for_another_encoder_stops_before_any_input(data, files, tmp_path, capsys):
    out = tmp_path / "bad"
    code, err = _zsdense(
        ["anomaly", data, "--out", out, *CRANE, *BASE, "--registers", files["dino"]], capsys
    )
    assert code == 2
    assert "dinov2 tiny-dinov2-small" in err and "does not use" in err
    assert not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_text()
    assert not list(out.glob("*.npy"))
    code, err = _zsdense(
        ["anomaly", data, "--out", out, *CRANE, *BASE, "--registers", tmp_path / "nope.json"],
        capsys,
    )
    assert code == 2 and "cannot read the register-neuron file" in err


def test_run_table_and_combined_files(data, files, tmp_path, capsys):
    """``[run] registers`` (a list: one file per encoder) applies to crane+'s CLIP and to the
    open-vocabulary task's DINOv2-free CLIP of another architecture left plain."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"""[run]
registers = ["{files["clip"]}", "auto"]
registers_mode = "mean"

[anomaly]
preset = "crane"
image_size = 112

[openvocab]
preset = "sclip"
classes = ["cat", "sofa"]
short_side = 64
"""
    )
    out = tmp_path / "run"
    code, err = _zsdense(["run", data, "--out", out, "--config", cfg, *BASE], capsys)
    assert code == 0, err
    s = json.loads((out / "run_settings.json").read_text())
    assert s["registers"]["mode"] == "mean" and s["registers"]["neurons"][1] == "auto"
    applied = s["registers_applied"]
    assert applied[CLIP_LABEL]["registers"] == "on" and applied[CLIP_LABEL]["mode"] == "mean"
    assert applied["clip/ViT-B-16/openai"]["registers"] == "none"
    assert "no shipped neuron list" in applied["clip/ViT-B-16/openai"]["why"]
    # the command line wins over the table
    out2 = tmp_path / "run2"
    code, err = _zsdense(
        ["run", data, "--out", out2, "--config", cfg, *BASE, "--registers", "off"], capsys
    )
    assert code == 0, err
    assert "registers" not in json.loads((out2 / "run_settings.json").read_text())


@pytest.mark.parametrize(
    "command,has",
    [
        (["anomaly"], True),
        (["openvocab"], True),
        (["refer"], True),
        (["run"], True),
        (["eval", "anomaly"], True),
        (["memory", "build"], True),
        (["train-prompts"], False),
        (["train-upsampler"], False),
        (["registers", "find"], False),
        (["registers", "check"], False),
    ],
)
def test_which_commands_take_the_options(command, has, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert not exc.value.code
    out = capsys.readouterr().out
    for opt in ("--registers ", "--registers-count", "--registers-mode", "--registers-batch"):
        assert (opt in out) == has, (command, opt)
