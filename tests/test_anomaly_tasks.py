"""run_anomaly end to end with the tiny models: presets, decisions, musc, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from zsdense.errors import ConfigError
from zsdense.tasks.anomaly import AnomalyResult, calibrate_threshold, parse_layers, run_anomaly
from zsdense.tasks.musc import mutual_scores, rscin

SIZE = 224  # model input for the tiny runs (16x16 grid) to keep the tests fast


def _images(n, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((h, w, 3)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("preset", ["crane", "crane+"])
def test_crane_presets_tiny_end_to_end(tiny_seg, preset):
    imgs = _images(2)
    res = run_anomaly(
        tiny_seg,
        tiny_seg.contexts(imgs),
        object_name="screw",
        preset=preset,
        image_size=SIZE,
        threshold=0.55,
        image_threshold=0.5,
        keep_model_map=True,
    )
    assert len(res) == 2 and all(isinstance(r, AnomalyResult) for r in res)
    for r in res:
        assert r.anomaly_map.shape == (48, 64) and r.anomaly_map.dtype == np.float32
        assert r.model_map.shape == (SIZE, SIZE)
        assert np.isfinite(r.anomaly_map).all() and 0 <= r.anomaly_map.min() <= 1
        assert np.array_equal(r.mask, r.anomaly_map >= 0.55)
        assert r.label == (r.score >= 0.5) and 0.0 <= r.score <= 1.0
        assert r.meta["threshold"] == 0.55 and r.meta["threshold_source"] == "fixed"
        # tiny text width 64: learned prompts cannot apply -> ensemble, recorded
        assert r.meta["prompts"] == "ensemble" and "prompts_note" in r.meta
        assert r.meta["random_weights"] is True
        json.dumps(r.meta)
    if preset == "crane+":
        assert res[0].meta["eattn"]["map_names"] == ["dattn", "eattn6"]
        assert res[0].meta["soft_mean"] is False and res[0].meta["dattn_mean"] == "image"
    else:
        assert res[0].meta["soft_mean"] is True


def test_result_does_not_depend_on_batch_neighbours(tiny_seg):
    imgs = _images(3, seed=1)
    a = run_anomaly(tiny_seg, tiny_seg.contexts(imgs), preset="crane+", image_size=SIZE)
    b = run_anomaly(tiny_seg, tiny_seg.contexts(imgs[:1]), preset="crane+", image_size=SIZE)
    np.testing.assert_allclose(a[0].anomaly_map, b[0].anomaly_map, atol=1e-5)
    assert abs(a[0].score - b[0].score) < 1e-5


def test_default_threshold_and_calibration(tiny_seg, tmp_path):
    from PIL import Image

    good = _images(2, seed=2)
    for i, g in enumerate(good):
        Image.fromarray((g * 255).astype(np.uint8)).save(tmp_path / f"good{i}.png")
    test_imgs = _images(2, seed=3)
    r0 = run_anomaly(tiny_seg, tiny_seg.contexts(test_imgs), image_size=SIZE)[0]
    assert r0.threshold == 0.5 and r0.meta["threshold_source"] == "default"
    assert r0.label is None and r0.image_threshold is None
    goods = run_anomaly(
        tiny_seg,
        tiny_seg.contexts([tmp_path / "good0.png", tmp_path / "good1.png"]),
        image_size=SIZE,
    )
    res = run_anomaly(
        tiny_seg, tiny_seg.contexts(test_imgs), image_size=SIZE, calibrate_with=str(tmp_path)
    )
    expect = max(float(g.anomaly_map.max()) for g in goods)
    assert abs(res[0].threshold - expect) < 1e-6
    assert res[0].meta["threshold_source"] == "calibrated"
    assert abs(res[0].image_threshold - max(g.score for g in goods)) < 1e-6
    assert np.array_equal(res[0].mask, res[0].anomaly_map >= res[0].threshold)
    pct = run_anomaly(
        tiny_seg,
        tiny_seg.contexts(test_imgs),
        image_size=SIZE,
        calibrate_with=str(tmp_path),
        calibrate_percentile=50,
    )
    allpix = np.concatenate([g.anomaly_map.ravel() for g in goods])
    assert abs(pct[0].threshold - float(np.percentile(allpix, 50))) < 1e-6


def test_calibrate_threshold_rules():
    vals = [np.array([0.1, 0.5]), np.array([0.2, 0.9])]
    assert calibrate_threshold(vals) == pytest.approx(0.9)
    assert calibrate_threshold(vals, 50) == pytest.approx(0.35)
    with pytest.raises(ConfigError):
        calibrate_threshold(vals, 120)


def test_options_validation(tiny_seg):
    ctxs = tiny_seg.contexts(_images(1))
    with pytest.raises(ConfigError, match="preset"):
        run_anomaly(tiny_seg, ctxs, preset="nope")
    with pytest.raises(ConfigError, match="unknown option"):
        run_anomaly(tiny_seg, ctxs, preset="crane", not_an_option=1)
    with pytest.raises(ConfigError, match="domain"):
        run_anomaly(tiny_seg, ctxs, domain="space")
    with pytest.raises(ConfigError, match="dattn"):
        run_anomaly(tiny_seg, ctxs, preset="crane+", dattn_mean="dataset")
    assert parse_layers("6,12,18,24") == (6, 12, 18, 24) and parse_layers("as-run") is None
    with pytest.raises(ConfigError):
        parse_layers("six")


def test_explicit_learned_prompts_on_tiny_is_clear_error(tiny_seg, shared_dir):
    ck = shared_dir / "data" / "crane" / "trained_on_visa_crane_epoch_5.pth"
    if not ck.is_file():
        pytest.skip(f"{ck} not found")
    with pytest.raises(ConfigError, match="text tower"):
        run_anomaly(tiny_seg, tiny_seg.contexts(_images(1)), prompts=str(ck), image_size=SIZE)


def test_per_layer_option_changes_maps(tiny_seg):
    imgs = _images(1, seed=4)
    a = run_anomaly(tiny_seg, tiny_seg.contexts(imgs), image_size=SIZE)[0]
    b = run_anomaly(tiny_seg, tiny_seg.contexts(imgs), image_size=SIZE, eattn_layers="6,12,18,24")[
        0
    ]
    assert b.meta["eattn"]["layers"] == [2, 3, 5, 6]  # scaled to the 6-block tiny model
    assert np.abs(a.anomaly_map - b.anomaly_map).max() > 1e-4


# ---- musc --------------------------------------------------------------------------------


def _textured(n, blob_index, size=112, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.25 * np.sin(xx / 3.0)[..., None] * np.array([1.0, 0.8, 0.6])
    imgs = []
    for i in range(n):
        im = base + 0.03 * rng.standard_normal((size, size, 3))
        if i == blob_index:
            im[40:72, 48:80] = [0.95, 0.1, 0.1]
        imgs.append(np.clip(im, 0, 1).astype(np.float32))
    return imgs


def test_musc_planted_blob_scores_highest(tiny_seg):
    imgs = _textured(6, blob_index=2)
    res = run_anomaly(tiny_seg, tiny_seg.contexts(imgs), preset="musc", image_size=SIZE)
    amap = res[2].anomaly_map
    inside = amap[44:68, 52:76].mean()
    outside = np.concatenate([amap[:30].ravel(), amap[85:].ravel()]).mean()
    assert inside > 1.5 * outside
    assert int(np.argmax([r.score for r in res])) == 2
    assert res[2].meta["musc"]["scored_as"] == "one set" and res[2].meta["musc"]["n_images"] == 6
    assert res[2].meta["sigma"] == 0.0  # musc as run: no smoothing
    assert res[2].meta["threshold_note"]


def test_musc_needs_five_images(tiny_seg):
    with pytest.raises(ConfigError, match="at least 5"):
        run_anomaly(tiny_seg, tiny_seg.contexts(_textured(4, 0)), preset="musc", image_size=SIZE)


def test_musc_building_blocks():
    # mutual scores: the odd one out of identical images gets the larger distance
    z = torch.nn.functional.normalize(torch.ones(4, 3, 2), dim=-1)
    z[1, 0] = torch.tensor([1.0, 0.0])
    s = mutual_scores(z, topmin=0.34)  # k = int(3 * 0.34) = 1: the nearest other image
    assert s.shape == (4, 3)
    d = float(torch.dist(z[1, 0], z[0, 0]))
    assert s[1, 0].item() == pytest.approx(d, abs=1e-3) and s[1, 1].item() < 1e-3
    assert s[0].max() < 1e-3  # a normal patch has an exact match in another image
    emb = torch.eye(3)
    sc = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(rscin(sc, emb, (1,)).float(), sc)  # k = 1: min-max normalised itself


# ---- CLI ---------------------------------------------------------------------------------


def _inputs(assets_dir, tmp_path):
    src = assets_dir / "inspection"
    data = tmp_path / "data"
    if src.is_dir() and any(src.glob("*.png")):
        shutil.copytree(src, data)
    else:  # assets not there yet: generate a few images
        from PIL import Image

        data.mkdir()
        for i, im in enumerate(_textured(3, 1, size=96)):
            Image.fromarray((im * 255).astype(np.uint8)).save(data / f"part{i}.png")
    return data


def test_cli_end_to_end_with_corrupt_file(assets_dir, tmp_path):
    import tifffile
    from click.testing import CliRunner
    from PIL import Image

    from zsdense.cli.main import cli

    data = _inputs(assets_dir, tmp_path)
    good = sorted(p for p in data.rglob("*.png"))
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        [
            "anomaly",
            str(data),
            "--out",
            str(out),
            "--models",
            "tiny",
            "--image-size",
            str(SIZE),
            "--device",
            "cpu",
            "--threshold",
            "0.6",
            "-q",
        ],
    )
    assert res.exit_code == 3, res.output  # some input failed, the others succeeded
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by_input = {line["rel"]: line for line in lines}
    assert by_input["broken.png"]["status"] == "error" and by_input["broken.png"]["error"]
    for p in good:
        rel = p.relative_to(data).as_posix()
        line = by_input[rel]
        assert line["status"] == "ok", line
        stem = out / rel[: -len(".png")]
        mask = np.asarray(Image.open(f"{stem}.mask.png"))
        amap = tifffile.imread(f"{stem}.map.tiff")
        h, w = np.asarray(Image.open(p)).shape[:2]
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert amap.shape == (h, w) and amap.dtype == np.float32
        assert np.array_equal(mask == 255, amap >= 0.6)
        assert (out / f"{rel[:-4]}.overlay.jpg").is_file()
        assert line["scores"]["threshold"] == 0.6
        assert line["scores"]["threshold_source"] == "fixed"
        assert 0 <= line["scores"]["score"] <= 1
        assert line["meta"]["result"]["random_weights"] is True
    assert len(lines) == len(good) + 1


def test_cli_usage_errors(tmp_path, capsys):
    from zsdense.cli.main import main

    (tmp_path / "a.png").write_bytes(b"")
    base = ["anomaly", str(tmp_path), "--out", str(tmp_path / "o"), "--models", "tiny"]
    for extra, expect in (
        (["--calibrate-percentile", "99"], "calibrate-with"),
        (["--eattn-layers", "x,y"], "eattn-layers"),
        (["--image-size", "100"], "multiple"),
        (["--preset", "musc"], "at least 5"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2
        assert expect in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.jsonl").exists()  # nothing ran


def test_segmenter_api_and_medical_domain(tiny_seg):
    img = (np.random.default_rng(5).random((40, 30, 3)) * 255).astype(np.uint8)
    r = tiny_seg.anomaly(
        img, object_name="bottle", preset="crane+", domain="medical", image_size=SIZE
    )
    assert isinstance(r, AnomalyResult) and r.anomaly_map.shape == (40, 30)
    assert r.meta["soft_mean"] is True and r.meta["domain"] == "medical"
    assert "crane+-mvtec-epoch1" in r.meta["prompts_note"]


def test_cli_musc_whole_set(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from zsdense.cli.main import cli

    data = tmp_path / "lot"
    data.mkdir()
    for i, im in enumerate(_textured(5, blob_index=3, size=112)):
        Image.fromarray((im * 255).astype(np.uint8)).save(data / f"p{i}.png")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        [
            "anomaly",
            str(data),
            "--out",
            str(out),
            "--models",
            "tiny",
            "--preset",
            "musc",
            "--image-size",
            str(SIZE),
            "--threshold",
            "0.2",
            "--format",
            "npy",
            "--no-overlay",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(ln["status"] == "ok" for ln in lines)
    scores = {ln["rel"]: ln["scores"]["score"] for ln in lines}
    assert max(scores, key=scores.get) == "p3.png"
    amap = np.load(out / "p3.map.npy")
    assert amap.shape == (112, 112) and amap.dtype == np.float32
