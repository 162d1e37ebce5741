"""``zsdense registers find | check`` on the tiny models: the file, the report, the summary, and
the refusal of a neuron file made for another encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from zsdense.cli.main import cli, main
from zsdense.errors import ConfigError
from zsdense.models import get_clip
from zsdense.models import registers as R
from zsdense.models import registers_find as RF

RUNTIME = ["--models", "tiny", "--precision", "fp32", "--device", "cpu", "--batch-size", "2"]
SMALL = ["--resize", "64", "--crop", "64"]  # 4x4 patches of the tiny ViT-B/16: fast


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five images in three formats (8-bit PNG, 16-bit TIFF, JPEG) and a file zsdense skips."""
    d = tmp_path_factory.mktemp("ttr_data")
    rng = np.random.default_rng(0)
    for i in range(3):
        a = (rng.random((60 + 9 * i, 80, 3)) * 255).astype(np.uint8)
        a[8:30, 12:44] = (240, 30 * i, 20)
        Image.fromarray(a).save(d / f"img{i}.png")
    Image.fromarray((rng.random((70, 70)) * 65535).astype(np.uint16)).save(d / "deep.tif")
    Image.fromarray((rng.random((50, 90, 3)) * 255).astype(np.uint8)).save(d / "photo.jpg")
    (d / "notes.txt").write_text("not an image")
    return d


def _detect_max_norms(data) -> list[float]:
    """Largest detect-layer token norm of each image, through the library (the same model the
    CLI loads: the per-process cache)."""
    from zsdense.io import list_inputs, read_image

    clip = get_clip("ViT-B-16", models="tiny", device="cpu", dtype=torch.float32)
    prep = dict(RF.search_preprocessing(clip), resize=64, crop=64)
    x = torch.stack(
        [RF.preprocess_for_search(read_image(it.path).image, **prep) for it in list_inputs(data)]
    )
    det = RF.PRESETS["clip"].detect_outliers_layer
    return RF.record_activations(clip, x, acts=False).norms[det].amax(dim=1).tolist()


def test_find_writes_neurons_report_and_summary(data, tmp_path):
    maxes = sorted(_detect_max_norms(data))
    thr = (maxes[1] + maxes[2]) / 2  # some images with outliers, some without
    used = sum(m > thr for m in maxes)
    out = tmp_path / "neurons.json"
    args = ["registers", "find", str(data), "--encoder", "ViT-B-16", "--out", str(out)]
    args += ["--threshold", f"{thr}", "--top-k", "4", "--highest-layer", "3", "-q", *RUNTIME]
    args += ["--check-images", "2", *SMALL]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    text = res.output
    assert f"images: {len(maxes)} read, {used} with outliers (used)" in text
    assert f"{len(maxes) - used} without (skipped)" in text
    assert "tokens above the threshold per block output: L0" in text
    assert "chosen neurons (4;" in text and "without -> with 1 register(s)" in text
    clip = get_clip("ViT-B-16", models="tiny", device="cpu", dtype=torch.float32)
    ns = R.load_neurons(out, clip)
    assert ns.count == 4 and all(layer <= 3 for layer in ns.neurons)
    assert ns.encoder.name == "tiny-ViT-B-16" and ns.encoder.random_weights
    rules = json.loads(out.read_text())["rules"]
    assert rules["register_norm_threshold"] == pytest.approx(thr)
    assert rules["images_used"] == used and rules["apply_sparsity_filter"] is True
    assert rules["detect_outliers_layer"] == RF.PRESETS["clip"].detect_outliers_layer
    report = out.with_suffix(".html").read_text()
    assert report.startswith("<!doctype html>") and report.count("<svg") == 2
    assert "<script" not in report and "http" not in report.replace("http://www.w3.org", "")

    # no overwrite without --force
    again = CliRunner().invoke(cli, args)
    assert isinstance(again.exception, ConfigError) and "--force" in str(again.exception)

    # the same file for the same encoder: accepted, with the before/after norms
    ok = CliRunner().invoke(
        cli,
        ["registers", "check", str(out), str(data), "--encoder", "ViT-B-16", "--max-images", "2"]
        + RUNTIME,
        catch_exceptions=False,
    )
    assert ok.exit_code == 0 and "4 neurons" in ok.output and "without -> with" in ok.output


def test_a_file_for_another_encoder_is_refused(data, tmp_path, capsys):
    clip = get_clip("ViT-B-16", models="tiny", device="cpu", dtype=torch.float32)
    p = R.NeuronSet(layers=((0, (1, 2)),), encoder=R.encoder_id(clip), provenance="test").save(
        tmp_path / "clip.json"
    )
    for encoder in ("dinov2-small", "ViT-B-32"):
        with pytest.raises(SystemExit) as exc:
            main(["registers", "check", str(p), "--encoder", encoder, *RUNTIME])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and "cannot be used with" in err and "Traceback" not in err
        assert f"--encoder {encoder}" in err  # says how to make one


def test_find_on_dinov2_and_nothing_to_find(data, tmp_path):
    out = tmp_path / "dino.json"
    base = ["registers", "find", str(data), "--encoder", "dinov2-small", "-q", *RUNTIME]
    base += ["--resize", "64", "--crop", "56", "--check-images", "1"]
    res = CliRunner().invoke(cli, [*base, "--out", str(out), "--threshold", "0", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    ns = R.NeuronSet.load(out)
    assert ns.encoder.family == "dinov2" and ns.count == 3
    assert ns.rules["detect_outliers_layer"] == RF.PRESETS["dinov2"].detect_outliers_layer
    assert ns.rules["preprocess"]["crop"] == 56
    high = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "x.json"), "--threshold", "1e9"])
    assert isinstance(high.exception, ConfigError)
    assert "nothing to find" in str(high.exception) and not (tmp_path / "x.json").exists()


def test_auto_has_no_clip_list(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["registers", "check", "auto", "--encoder", "ViT-B-16", *RUNTIME])
    assert exc.value.code == 2
    assert "none for CLIP" in capsys.readouterr().err
