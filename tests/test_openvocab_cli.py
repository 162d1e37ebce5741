"""``zsdense openvocab`` end to end on the bundled assets with random-weight tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

PRESETS = ["trident", "trident-fixed", "proxyclip", "sclip", "clearclip", "naclip"]


@pytest.fixture(scope="module")
def data_dir(assets_dir, tmp_path_factory) -> Path:
    """One small scene image from assets/scenes (generated if the assets are missing)."""
    d = tmp_path_factory.mktemp("ov_data")
    scenes_dir = assets_dir / "scenes"
    scenes = sorted(scenes_dir.glob("*.png")) if scenes_dir.is_dir() else []
    if scenes:
        shutil.copy(scenes[0], d / scenes[0].name)
    else:
        rng = np.random.default_rng(0)
        Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(d / "gen.png")
    return d


def _run(args):
    from zsdense.cli.main import cli

    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("preset", PRESETS)
def test_cli_every_preset(data_dir, tmp_path, preset):
    out = tmp_path / "out"
    args = [
        "openvocab",
        str(data_dir),
        "--out",
        str(out),
        "--classes",
        "background: sky; wall, cat, sofa; couch",
        "--preset",
        preset,
        "--models",
        "tiny",
        "--device",
        "cpu",
        "--short-side",
        "112",
        "--save-probs",
        "--format",
        "npy",
        "-q",
    ]
    if preset == "trident":
        args.append("--sam-refine")
    res = _run(args)
    assert res.exit_code == 0, res.output
    (rec,) = _records(out)
    assert rec["status"] == "ok"
    stem = Path(rec["outputs"]["mask"]).name[: -len(".mask.png")]
    with Image.open(out / rec["outputs"]["mask"]) as mask:
        labels, mode = np.asarray(mask), mask.mode
    with Image.open(next(data_dir.iterdir())) as img:
        size = img.size
    assert labels.shape == (size[1], size[0]) and labels.max() < 3
    assert mode == "P"  # palette label PNG
    probs = np.load(out / f"{stem}.map.npy")
    assert probs.shape == (3, *labels.shape) and probs.dtype == np.float32
    assert (out / f"{stem}.overlay.jpg").is_file()
    area = rec["scores"]["area"]
    assert set(rec["scores"]["classes_present"]) == set(area)
    assert abs(sum(area.values()) - 1.0) < 1e-4
    counts = np.bincount(labels.ravel(), minlength=3) / labels.size
    names = ["background", "cat", "sofa"]
    for i, c in enumerate(counts):
        assert (names[i] in area) == (c > 0)
    assert rec["meta"]["result"]["random_weights"] is True


def test_cli_assets_folder_class_file(assets_dir, tmp_path):
    scenes = assets_dir / "scenes"
    if not scenes.is_dir() or not any(scenes.glob("*.png")):
        pytest.skip(f"no scene images in {scenes}")
    out = tmp_path / "out"
    res = _run(
        [
            "openvocab",
            str(scenes),
            "--out",
            str(out),
            "--classes-file",
            "voc21",
            "--dataset-preset",
            "voc21",
            "--preset",
            "sclip",
            "--models",
            "tiny",
            "--device",
            "cpu",
            "--short-side",
            "112",
            "-q",
        ]
    )
    assert res.exit_code == 0, res.output
    recs = _records(out)
    assert len(recs) == len(list(scenes.glob("*.png"))) and all(r["status"] == "ok" for r in recs)
    assert not list(out.rglob("*.map.*"))  # probabilities only with --save-probs
    assert len(recs[0]["meta"]["result"]["class_names"]) == 21


def _main(args, capsys) -> tuple[int, str]:
    """The console entry point (its error policy: message, no traceback, exit code)."""
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out + cap.err


def test_cli_usage_errors(data_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    code, text = _main(["openvocab", str(data_dir), *out], capsys)
    assert code == 2 and "--classes" in text
    code, _ = _main(
        ["openvocab", str(data_dir), *out, "--classes", "a", "--classes-file", "voc21"], capsys
    )
    assert code == 2
    code, text = _main(
        ["openvocab", str(data_dir), *out, "--classes-file", "nope-list", "--models", "tiny"],
        capsys,
    )
    assert code == 2 and "shipped lists" in text and "Traceback" not in text
    code, text = _main(
        [
            "openvocab",
            str(data_dir),
            *out,
            "--classes",
            "a, b",
            "--preset",
            "sclip",
            "--sam-refine",
            "--models",
            "tiny",
        ],
        capsys,
    )
    assert code == 2 and "trident" in text
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_cli_help_documents_class_syntax():
    from zsdense.cli.main import cli

    r = CliRunner().invoke(cli, ["openvocab", "--help"])
    assert r.exit_code == 0
    assert 'synonyms of one class by ";"' in r.output and "--dataset-preset" in r.output
