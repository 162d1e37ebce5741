"""``--tile SIZE[:OVERLAP]``: tiles through any batch scorer, maps stitched, score = max over tiles.

Geometry and blending are checked on their own; the registry wrapper with a scorer whose map is
its input (so the stitched map must be the image itself); exactness of a tile covering the whole
image on the tiny models at fp32 (crane, crane+, anomalydino, crane+fewshot); references tiled
at the test tiles' scale with leave-one-picture-out statistics; options, CLI and refusals.
Sizes, counts and boxes are computed from what each test builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsdense.config import AnomalyPreset
from zsdense.errors import ConfigError
from zsdense.options import AnomalyOptions, TileSpec, parse_tile
from zsdense.tasks import anomaly_methods, tiling
from zsdense.tasks.anomaly_registry import (
    AnomalyScorer,
    RawScore,
    register_anomaly_preset,
    register_scorer,
    unregister,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "inspection"
SIZE = 112  # Crane's input size on the tiny models (fast)
TINY = ["--models", "tiny", "--precision", "fp32", "--device", "cpu"]


def _asset(name: str, hw: tuple[int, int] | None = None) -> np.ndarray:
    img = Image.open(ASSETS / name).convert("RGB")
    if hw is not None:
        img = img.resize((hw[1], hw[0]), Image.BILINEAR)
    return np.asarray(img)


# ---- geometry and blending ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 50, 64, 65, 100, 111, 200, 257])
@pytest.mark.parametrize("size,overlap", [(64, 0), (64, 8), (64, 31), (17, 5)])
def test_tile_starts_cover_the_axis(length, size, overlap):
    spec = TileSpec(size, overlap)
    starts = tiling.tile_starts(length, spec)
    t = min(size, length)
    assert starts[0] == 0 and starts[-1] + t == length  # first at 0, last on the edge
    assert starts == sorted(set(starts))
    for a, b in zip(starts, starts[1:]):
        assert b - a <= spec.stride  # consecutive tiles share at least OVERLAP pixels
    assert all(b - a == spec.stride for a, b in zip(starts[:-2], starts[1:-1]))
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + t] += 1
    assert covered.min() >= 1
    weights, total = tiling.axis_weights(length, spec)
    assert len(weights) == len(starts) and all(w.shape == (t,) for w in weights)
    assert total.min() > 0
    if len(starts) == 1:
        assert np.all(weights[0] == 1)  # one tile: weight 1 everywhere (exactness)


def test_weights_cross_fade_over_the_nominal_overlap():
    spec = TileSpec(64, 16)
    length = 64 + 2 * spec.stride  # three tiles at the nominal stride: overlaps of exactly 16
    starts = tiling.tile_starts(length, spec)
    assert starts == [0, spec.stride, 2 * spec.stride]
    _, total = tiling.axis_weights(length, spec)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)  # a partition of unity
    w, _ = tiling.axis_weights(length, spec)
    assert w[0][0] == 1 and w[0][-1] == pytest.approx(0.5 / 16)  # image edge 1, inner ramp
    assert w[1][0] == pytest.approx(0.5 / 16) and w[1][32] == 1


@pytest.mark.parametrize("hw", [(150, 210), (40, 90), (30, 20), (128, 128)])
def test_stitching_puts_every_tile_back_in_place(hw):
    """Tile maps cut from one smooth field stitch back to the field; the score is the max."""
    spec = TileSpec(64, 12)
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    field = np.sin(yy / 17.0) + np.cos(xx / 11.0)
    st = tiling.Stitcher(hw, spec)
    scores = []
    for k, (y0, x0, y1, x1) in enumerate(st.boxes):
        s = float(k % 5) + 0.25 * k
        scores.append(s)
        st.add(k, RawScore(field[y0:y1, x0:x1].copy(), s, {"k": k}))
    raw = st.result({"size": spec.size})
    assert raw.anomaly_map.shape == hw and raw.anomaly_map.dtype == np.float32
    np.testing.assert_allclose(raw.anomaly_map, field, atol=2e-6)
    best = int(np.argmax(scores))
    assert raw.score == max(scores) and raw.meta["k"] == best
    assert raw.meta["tiling"]["score_tile"] == list(st.boxes[best])
    assert raw.meta["tiling"]["tiles"] == len(st.boxes)


def test_a_wrong_tile_map_shape_is_refused():
    st = tiling.Stitcher((100, 100), TileSpec(64, 8))
    with pytest.raises(ConfigError, match="maps at their input's size"):
        st.add(0, RawScore(np.zeros((10, 10), np.float32), 0.0))


# ---- the option ----------------------------------------------------------------------------------


def test_parse_tile_and_the_options():
    assert parse_tile("512:64") == TileSpec(512, 64)
    assert parse_tile(" 518 ") == TileSpec(518, 518 // 8)  # default overlap: an eighth
    assert parse_tile(256) == TileSpec(256, 32) and parse_tile((100, 0)) == TileSpec(100, 0)
    assert parse_tile(None) is None
    for bad in ("512:256", "512:-1", "abc", "0", "512:64:1", True, 3.5):
        with pytest.raises(ConfigError, match="--tile"):
            parse_tile(bad)
    o = AnomalyOptions.from_mapping({"tile": "512"}, preset="crane")
    assert o.tile == "512:64"  # canonical, recorded as such in the run settings
    assert AnomalyOptions.from_mapping({"tile": [300, 20]}).tile == "300:20"  # TOML list
    with pytest.raises(ConfigError, match="OVERLAP"):
        AnomalyOptions(tile="100:50")


def test_tile_checks_against_the_scorer(tmp_path):
    with pytest.raises(ConfigError, match="patch size"):
        anomaly_methods.check_options(AnomalyOptions(preset="crane", tile="10:0"))
    with pytest.raises(ConfigError, match="score each other"):
        anomaly_methods.check_options(AnomalyOptions(preset="musc", tile="256"))
    bank = tmp_path / "good.zsdmem"
    with pytest.raises(ConfigError, match="memory bank"):
        anomaly_methods.check_options(
            AnomalyOptions(preset="anomalydino", reference=str(bank), tile="256")
        )
    assert tiling.encoder_patch("clip/ViT-B-16") == 16
    assert tiling.encoder_patch("dinov2/dinov2-small") == 14
    sc = anomaly_methods.check_options(AnomalyOptions(preset="crane", tile="256:32"))
    assert sc.group == "batch" and "tile 256:32" in sc.name


# ---- the wrapper through the registry contract ---------------------------------------------------


ECHO_CALLS: list[int] = []


@pytest.fixture
def echo():
    """A scorer whose map is its input's red channel and whose score is its mean."""

    def run(rt, ctxs, opts, state):
        ECHO_CALLS.append(len(ctxs))
        return [
            RawScore(c.image[..., 0].copy(), float(c.image[..., 0].mean()), {"hw": list(c.size)})
            for c in ctxs
        ]

    register_scorer(
        AnomalyScorer(name="tile-echo", prepare=lambda rt, o: None, run=run), replace=True
    )
    register_anomaly_preset(AnomalyPreset(name="tile-echo", method="tile-echo"), replace=True)
    ECHO_CALLS.clear()
    yield "tile-echo"
    unregister("tile-echo")


def test_tiles_stream_in_batches_and_stitch_back(tiny_seg, echo):
    rng = np.random.RandomState(0)
    images = [rng.rand(*hw, 3).astype(np.float32) for hw in [(150, 230), (40, 300), (50, 60)]]
    spec = TileSpec(64, 16)
    n_tiles = [len(tiling.tile_boxes(im.shape[:2], spec)) for im in images]
    res = tiny_seg.anomaly_batch(images, preset=echo, tile=spec.text(), batch_size=3)
    assert sum(ECHO_CALLS) == sum(n_tiles) and max(ECHO_CALLS) <= 3  # streamed, 3 at a time
    assert len(ECHO_CALLS) == -(-sum(n_tiles) // 3)  # batches filled across images
    for im, r, n in zip(images, res, n_tiles):
        np.testing.assert_allclose(r.anomaly_map, im[..., 0], atol=2e-6)  # back in place
        boxes = tiling.tile_boxes(im.shape[:2], spec)
        means = [im[y0:y1, x0:x1, 0].mean() for y0, x0, y1, x1 in boxes]
        assert r.score == pytest.approx(max(means), abs=1e-6)
        t = r.meta["tiling"]
        assert t["tiles"] == n and t["score_tile"] == list(boxes[int(np.argmax(means))])
        assert r.meta["hw"] == [min(64, im.shape[0]), min(64, im.shape[1])]
    # the image smaller than a tile is its own single tile: the map is the scorer's, as is
    small = res[2]
    assert small.meta["tiling"]["tiles"] == 1 and np.array_equal(
        small.anomaly_map, images[2][..., 0]
    )


def test_calibration_images_are_tiled_the_same_way(tiny_seg, echo, tmp_path):
    rng = np.random.RandomState(1)
    good = (rng.rand(90, 140, 3) * 255).astype(np.uint8)
    Image.fromarray(good).save(tmp_path / "good.png")
    test = rng.rand(70, 70, 3).astype(np.float32)
    r = tiny_seg.anomaly(test, preset=echo, tile="64:8", calibrate_with=str(tmp_path / "good.png"))
    ref = tiny_seg.anomaly(good, preset=echo, tile="64:8")  # the good image scored alone, tiled
    assert r.meta["threshold_source"] == "calibrated"
    assert r.threshold == pytest.approx(float(ref.anomaly_map.max()), abs=1e-7)
    assert r.image_threshold == pytest.approx(ref.score, abs=1e-7)


# ---- a tile covering the whole image is the untiled run, exactly ---------------------------------


@pytest.mark.parametrize("preset", ["crane", "crane+"])
def test_whole_image_tile_reproduces_zero_shot_exactly(tiny_seg, preset):
    img = _asset("gravel_scratch.png", (96, 128))
    a = tiny_seg.anomaly(img, preset=preset, image_size=SIZE, keep_model_map=True)
    b = tiny_seg.anomaly(img, preset=preset, image_size=SIZE, keep_model_map=True, tile=128)
    assert np.array_equal(a.anomaly_map, b.anomaly_map) and a.score == b.score
    assert np.array_equal(a.model_map, b.model_map) and np.array_equal(a.mask, b.mask)
    assert b.meta["tiling"]["tiles"] == 1 and "tiling" not in a.meta
    c = tiny_seg.anomaly(img, preset=preset, image_size=SIZE, tile="64:8")  # real tiles
    assert c.meta["tiling"]["tiles"] == 2 * 3 and c.model_map is None
    assert c.anomaly_map.shape == img.shape[:2] and np.isfinite(c.anomaly_map).all()


@pytest.fixture
def small_fewshot(monkeypatch):
    """Few-shot at a 56-px smaller edge without rotations (fast on the tiny DINOv2)."""
    from zsdense.methods import anomalydino
    from zsdense.tasks.fewshot.options import options_for

    def opts(o):
        return options_for(o.object_name, o.dataset, shots=o.shots, image_size=56, rotation=False)

    monkeypatch.setattr(anomalydino, "fewshot_options", opts)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    """Three good 96x96 references (crops of the gravel texture)."""
    root = tmp_path_factory.mktemp("good")
    g = Image.open(ASSETS / "gravel.png").convert("RGB")
    w, h = g.size
    for i, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2)]):
        g.crop((x, y, x + w // 2, y + h // 2)).resize((96, 96), Image.BILINEAR).save(
            root / f"g{i}.png"
        )
    return root


@pytest.mark.parametrize("preset", ["anomalydino", "crane+fewshot"])
def test_whole_image_tile_reproduces_fewshot_exactly(tiny_seg, small_fewshot, good_dir, preset):
    img = _asset("gravel_scratch.png", (80, 96))
    kw = dict(preset=preset, reference=str(good_dir), shots=2, image_size=SIZE)
    a = tiny_seg.anomaly(img, **kw)
    b = tiny_seg.anomaly(img, tile=96, **kw)  # the references (96x96) are one tile each too
    assert np.array_equal(a.anomaly_map, b.anomaly_map) and a.score == b.score
    assert (a.threshold, a.meta["threshold_source"]) == (b.threshold, b.meta["threshold_source"])
    assert b.meta["tiling"]["reference_tiles"] == b.meta["tiling"]["reference_images"] == 2


# ---- few-shot references are tiled at the test tiles' scale --------------------------------------


def test_reference_tiles_make_the_memory(tiny_seg, small_fewshot, good_dir, monkeypatch):
    from zsdense.tasks.fewshot.scoring import reference_maps

    spec = TileSpec(64, 16)
    refs = sorted(good_dir.glob("*.png"))
    sizes = []
    for p in refs:
        with Image.open(p) as im:
            sizes.append(im.size[::-1])
    per_ref = [len(tiling.tile_boxes(hw, spec)) for hw in sizes]
    opts = AnomalyOptions(preset="anomalydino", reference=str(good_dir), shots=2, tile="64:16")
    prep = anomaly_methods.prepare(tiny_seg.runtime, opts)
    bank = prep.state.state.bank
    assert bank.n_shots == sum(per_ref[:2])  # --shots picks whole images, then their tiles
    groups = bank.extra["groups"]
    assert groups == [g for g, n in enumerate(per_ref[:2]) for _ in range(n)]
    assert prep.state.opts.shots is None and prep.state.info == {
        "reference_images": 2,
        "reference_tiles": sum(per_ref[:2]),
    }
    # a reference tile and a test tile of the same pixels give the same features: a test image
    # that is a reference scores (almost) zero everywhere
    img = np.asarray(Image.open(refs[0]).convert("RGB"))
    r = anomaly_methods.run(tiny_seg.runtime, [img], opts, prep)[0]
    assert r.meta["tiling"]["tiles"] == per_ref[0]
    assert float(np.abs(r.anomaly_map).max()) < 1e-4 and abs(r.score) < 1e-4
    # leave-one-out statistics leave out the whole picture of a tile
    import zsdense.tasks.fewshot.scoring as scoring

    rows = [f.shape[0] for f in bank.features]
    seen = []
    real = scoring.patch_distances

    def spy(features, mask, memory, options):
        seen.append(sum(m.shape[0] for m in memory))
        return real(features, mask, memory, options)

    bank._cache.clear()
    monkeypatch.setattr(scoring, "patch_distances", spy)
    reference_maps(bank, prep.state.state.options)
    want = [sum(n for n, g in zip(rows, groups) if g != groups[i]) for i in range(len(rows))]
    assert seen == want


# ---- CLI -----------------------------------------------------------------------------------------


def _invoke(args, capsys):
    from zsdense.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out, cap.err


def test_cli_tile_records_settings_and_meta(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_asset("gravel_scratch.png", (90, 150))).save(src / "a.png")
    out = tmp_path / "out"
    code, _, err = _invoke(
        ["anomaly", src, "--out", out, "--tile", "64", "--image-size", SIZE, "-q", *TINY], capsys
    )
    assert code == 0, err
    settings = json.loads((out / "run_settings.json").read_text())
    assert json.dumps(settings).count('"tile": "64:8"') == 1
    rec = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()][-1]
    assert rec["status"] == "ok"
    t = rec["meta"]["result"]["tiling"]
    assert set(rec["encoders"].values()) == {t["tiles"]}  # one encoder pass per tile
    assert (t["size"], t["overlap"], t["tiles"]) == (
        64,
        8,
        len(tiling.tile_boxes((90, 150), TileSpec(64, 8))),
    )
    import tifffile

    assert tifffile.imread(out / "a.map.tiff").shape == (90, 150)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--preset", "musc", "--tile", "256"], "score each other"),
        (["--tile", "256:200"], "OVERLAP"),
        (["--tile", "8"], "patch size"),
    ],
)
def test_cli_refusals_exit_2_before_any_input(tmp_path, capsys, args, match):
    code, _, err = _invoke(
        ["anomaly", tmp_path / "nothing-here", "--out", tmp_path / "o", *args, *TINY], capsys
    )
    assert code == 2 and match in err


def test_run_toml_takes_tile(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_asset("brick.png", (70, 100))).save(src / "b.png")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[anomaly]\npreset = "crane"\ntile = "64:16"\nimage_size = {SIZE}\n')
    out = tmp_path / "out"
    code, _, err = _invoke(["run", src, "--config", cfg, "--out", out, "-q", *TINY], capsys)
    assert code == 0, err
    rec = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()][-1]
    t = rec["meta"]["result"]["tiling"]
    assert (t["size"], t["overlap"]) == (64, 16)
    assert t["tiles"] == len(tiling.tile_boxes((70, 100), TileSpec(64, 16)))


def test_open_vocab_presets_work_at_their_own_scale():
    """README: open-vocabulary presets resize a 6000x4000 photo to their short side (their
    windows then tile that), so --tile is not offered there."""
    from zsdense.config import OPENVOCAB_PRESETS
    from zsdense.tasks.openvocab import mmseg_resize_hw

    for p in OPENVOCAB_PRESETS.values():
        h, w = mmseg_resize_hw((4000, 6000), p.short_side, p.max_long_side)
        assert min(h, w) == p.short_side and max(h, w) <= p.max_long_side
    p = OPENVOCAB_PRESETS["proxyclip"]
    assert mmseg_resize_hw((4000, 6000), p.short_side, p.max_long_side) == (336, 504)
