"""``--upsampler bilinear|jafar[:FILE]`` through every face, on the tiny models.

A random-weight JAFAR saved in the released layout (``{"jafar": state_dict}``, no metadata) for
the tiny DINOv2 and the tiny CLIP; a small memory bank (112 px, no rotation, masking on) keeps the
few-shot runs fast. What is checked: the option's validation, ``bilinear`` = the option not
given, ``jafar:FILE`` end to end for ``anomalydino`` and ``sclip`` / ``trident`` (CLI, ``zsdense
run`` TOML, Python), output sizes, the record in the run settings and the result meta, the
refusals at setup (exit 2, no input touched) and on resume, and ``jafar`` alone resolving the
released upsampler through the registry."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from zsdense.errors import ConfigError, WeightsError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FEW = ["--models", "tiny", "--device", "cpu", "--precision", "fp32", "-q", "--no-overlay"]


def _random_jafar_file(path: Path, v_dim: int, seed: int, qk_dim: int = 32) -> Path:
    """A JAFAR for ``v_dim``-channel features with every parameter moved off its init, saved
    in the released layout (4 heads: what a file without metadata is read with)."""
    from zsdense.dense.jafar import JAFAR, JafarConfig
    from zsdense.train.checkpoint import save_jafar

    g = torch.Generator().manual_seed(seed)
    m = JAFAR(JafarConfig(v_dim=v_dim, qk_dim=qk_dim, num_heads=4))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return save_jafar(m, path)


def _rt():
    from zsdense.runtime import Runtime

    return Runtime(models="tiny", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Upsampler files for the tiny encoders (widths read from the models), a mismatched one,
    a memory bank and a test folder."""
    root = tmp_path_factory.mktemp("jafar_option")
    rt = _rt()
    dino_w = int(rt.dinov2("dinov2-small").width)
    clip_w = int(rt.clip("ViT-B-16").width)
    out = {
        "dino": _random_jafar_file(root / "dino.pth", dino_w, 1),
        "clip": _random_jafar_file(root / "clip.pth", clip_w, 2),
        "wrong": _random_jafar_file(root / "wrong.pth", dino_w + 8, 3),
        "dino_width": dino_w,
    }
    from zsdense.io.membank import save_memory
    from zsdense.tasks.fewshot import FewShotOptions, build_memory

    good = [ASSETS / "inspection" / "gravel.png", ASSETS / "inspection" / "brick.png"]
    opts = FewShotOptions(image_size=112, rotation=False, masking=True, mask_threshold=0.0)
    out["bank"] = save_memory(build_memory(rt, [str(p) for p in good], opts), root / "b.zsdmem")
    test = root / "test"
    test.mkdir()
    shutil.copy(ASSETS / "inspection" / "gravel_scratch.png", test / "scratch.png")
    out["test"] = test
    scenes = root / "scenes"
    scenes.mkdir()
    shutil.copy(ASSETS / "scenes" / "chelsea.png", scenes / "chelsea.png")
    out["scenes"] = scenes
    return out


def _main(args, capsys) -> tuple[int, str]:
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out + cap.err


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x]


def _settings(out: Path) -> dict:
    return json.loads((out / "run_settings.json").read_text())


# ---- the option -----------------------------------------------------------------------------


def test_option_is_parsed_and_checked_once(files):
    from zsdense.options import AnomalyOptions, OpenVocabOptions

    o = AnomalyOptions.from_mapping(preset="anomalydino", reference="x")
    assert o.upsampler == "bilinear" and o.upsampler_scale is None and o.upsampler_factor == 2
    o = AnomalyOptions.from_mapping(upsampler=f" JAFAR:{files['dino']}", upsampler_scale="3")
    assert o.upsampler == f"jafar:{files['dino']}" and o.upsampler_factor == 3
    v = OpenVocabOptions.from_mapping(classes="a, b", preset="sclip", upsampler="jafar")
    assert v.upsampler == "jafar" and v.upsampler_factor == 4
    assert OpenVocabOptions.from_mapping(classes="a", upsampler="jafar").upsampler_factor == 2
    bad = [
        (dict(upsampler="nearest"), "unknown upsampler 'nearest'.*bilinear, jafar"),
        (dict(upsampler=f"bilinear:{files['dino']}"), "takes no file"),
        (dict(upsampler="jafar:"), "give a file"),
        (dict(upsampler="jafar:/no/such/file.pth"), "is not a file"),
        (dict(upsampler_scale=2), "applies to a learned upsampler"),
        (dict(upsampler="jafar", upsampler_scale=0), "1..16"),
        (dict(upsampler="jafar", upsampler_scale=2.5), "integer"),
    ]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            AnomalyOptions.from_mapping(**kw)
        with pytest.raises(ConfigError, match=msg):
            OpenVocabOptions.from_mapping(classes="a", **kw)


def test_presets_without_dense_features_refuse_an_upsampler(files):
    from zsdense.options import AnomalyOptions
    from zsdense.tasks.anomaly_methods import check_options

    for preset in ("crane", "crane+fewshot"):
        opts = AnomalyOptions.from_mapping(
            preset=preset, upsampler=f"jafar:{files['dino']}", reference=str(files["bank"])
        )
        with pytest.raises(ConfigError, match="presets that take one: anomalydino"):
            check_options(opts)


# ---- anomalydino ------------------------------------------------------------------------------


def test_anomalydino_python_bilinear_is_the_default_and_jafar_refines(files):
    from zsdense import Segmenter

    seg = Segmenter(models="tiny", device="cpu", precision="fp32")
    img = str(files["test"] / "scratch.png")
    ref = str(files["bank"])
    plain = seg.anomaly(img, preset="anomalydino", reference=ref)
    named = seg.anomaly(img, preset="anomalydino", reference=ref, upsampler="bilinear")
    assert np.array_equal(plain.anomaly_map, named.anomaly_map) and plain.score == named.score
    assert plain.meta["upsampler"] == {"upsampler": "bilinear"}
    low = plain.meta["fewshot"]["grid"]
    for scale in (2, 3):
        up = seg.anomaly(
            img,
            preset="anomalydino",
            reference=ref,
            upsampler=f"jafar:{files['dino']}",
            upsampler_scale=scale,
        )
        assert up.anomaly_map.shape == plain.anomaly_map.shape == (256, 256)
        fs = up.meta["fewshot"]
        assert fs["feature_grid"] == low and fs["grid"] == [scale * low[0], scale * low[1]]
        # the mask is decided on the patch grid and repeated onto the finer cells
        assert fs["kept_patches"] == scale * scale * plain.meta["fewshot"]["kept_patches"]
        rec = up.meta["upsampler"]
        assert rec["upsampler"] == "jafar" and rec["scale"] == scale
        assert rec["file"] == str(files["dino"]) and len(rec["sha256"]) == 64
        assert rec["encoder"].startswith("dinov2:") and rec["precision"] == "fp32"
        assert not np.allclose(up.anomaly_map, plain.anomaly_map)
        assert np.isfinite(up.anomaly_map).all() and np.isfinite(up.score)


def test_anomalydino_tiles_take_the_upsampler(files, monkeypatch, tmp_path):
    """--tile and --upsampler together: every tile is scored through the upsampler (against
    the tiled references' memory) and the stitched result records both."""
    from PIL import Image

    from zsdense import Segmenter
    from zsdense.methods import anomalydino
    from zsdense.tasks import tiling
    from zsdense.tasks.fewshot.options import options_for

    def small(o):  # a small edge without rotations: fast on the tiny DINOv2
        return options_for(o.object_name, o.dataset, shots=o.shots, image_size=56, rotation=False)

    monkeypatch.setattr(anomalydino, "fewshot_options", small)
    good = tmp_path / "good"
    good.mkdir()
    for name in ("gravel.png", "brick.png"):
        shutil.copy(ASSETS / "inspection" / name, good / name)
    img = str(files["test"] / "scratch.png")
    with Image.open(img) as im:
        w, h = im.size
    spec = tiling.parse_tile(max(h, w) // 2)
    seg = Segmenter(models="tiny", device="cpu", precision="fp32")
    kw = dict(preset="anomalydino", reference=str(good), tile=spec.text())
    plain = seg.anomaly(img, **kw)
    up = seg.anomaly(img, upsampler=f"jafar:{files['dino']}", upsampler_scale=2, **kw)
    n_tiles = len(tiling.tile_boxes((h, w), spec))
    assert n_tiles > 1 and up.meta["tiling"]["tiles"] == plain.meta["tiling"]["tiles"] == n_tiles
    assert up.meta["upsampler"]["upsampler"] == "jafar" and up.meta["upsampler"]["scale"] == 2
    assert plain.meta["upsampler"] == {"upsampler": "bilinear"}
    assert up.anomaly_map.shape == plain.anomaly_map.shape == (h, w)
    assert np.isfinite(up.anomaly_map).all() and np.isfinite(up.score)
    assert not np.allclose(up.anomaly_map, plain.anomaly_map)


def test_upsampled_features_are_jafar_on_the_scorers_features(files):
    """The cells compared with the memory are JAFAR(image as the scorer prepared it, the
    encoder's JAFAR features) applied to the scorer's own patch features."""
    from zsdense.dense.jafar import load_jafar, upsample
    from zsdense.dense.upsamplers import load_upsampler
    from zsdense.models.jafar_backbone import jafar_features
    from zsdense.tasks.fewshot import FewShotOptions, extract_features, prepare_image
    from zsdense.tasks.fewshot.scoring import upsampled_features

    rt = _rt()
    dino = rt.dinov2("dinov2-small")
    up = load_upsampler(rt, f"jafar:{files['dino']}", dino)
    assert load_upsampler(rt, f"jafar:{files['dino']}", dino) is up  # once per runtime
    img = rt.context(str(files["test"] / "scratch.png")).image_u8
    opts = FewShotOptions(image_size=112)
    ((f, grid),) = extract_features(dino, [img], opts.image_size)
    fu, gu = upsampled_features(dino, up, img, f, grid, opts, 2)
    x, _ = prepare_image(img, opts.image_size, dino.patch_size)
    ref = upsample(
        load_jafar(files["dino"]),
        x[None],
        jafar_features(dino, x[None]),
        (2 * grid[0], 2 * grid[1]),
        values=f.t().reshape(1, -1, *grid),
    )
    assert gu == (2 * grid[0], 2 * grid[1])
    assert torch.allclose(fu, ref[0].flatten(1).t(), atol=1e-5)


def test_by_scale_pads_sides_off_the_patch_grid(files):
    from zsdense.dense.upsamplers import load_upsampler

    rt = _rt()
    clip = rt.clip("ViT-B-16")
    up = load_upsampler(rt, f"jafar:{files['clip']}", clip)
    p = clip.patch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 3 * p + 5, 2 * p, generator=g)  # 3.3 x 2 patches
    vals = torch.randn(1, 7, 4, 2, generator=g)
    out = up.by_scale(x, vals, 3)
    assert out.shape == (1, 7, -(-(3 * p + 5) * 3 // p), 6)
    padded = torch.nn.functional.pad(x, (0, 0, 0, p - 5))
    full = up.apply(padded, vals, (12, 6))
    assert torch.equal(out, full[..., : out.shape[-2], :])


def test_anomaly_cli_run_toml_settings_and_resume(files, tmp_path, capsys):
    bank, test, dino = files["bank"], files["test"], files["dino"]
    base = ["anomaly", test, "--preset", "anomalydino", "--reference", bank, *FEW]
    code, text = _main([*base, "--out", tmp_path / "a", "--upsampler", f"jafar:{dino}"], capsys)
    assert code == 0, text
    (rec,) = _records(tmp_path / "a")
    assert rec["status"] == "ok" and rec["meta"]["result"]["upsampler"]["upsampler"] == "jafar"
    task = _settings(tmp_path / "a")["tasks"]["anomaly"]
    assert task["upsampler"] == f"jafar:{dino}" and task["upsampler_scale"] is None
    # zsdense run with a TOML: the same option, the same scores
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'[anomaly]\npreset = "anomalydino"\nreference = "{bank}"\nupsampler = "jafar:{dino}"\n'
    )
    code, text = _main(["run", test, "--config", toml, "--out", tmp_path / "r", *FEW], capsys)
    assert code == 0, text
    (rec_r,) = _records(tmp_path / "r")
    assert rec_r["scores"]["score"] == pytest.approx(rec["scores"]["score"], rel=1e-6)
    assert _settings(tmp_path / "r")["tasks"]["anomaly"]["upsampler"] == f"jafar:{dino}"
    # resuming with another upsampler (or scale) mixes settings: refused
    for other in (
        ["--upsampler", "bilinear"],
        ["--upsampler", f"jafar:{dino}", "--upsampler-scale", "3"],
    ):
        code, text = _main([*base, "--out", tmp_path / "a", *other], capsys)
        assert code == 2 and "other settings" in text and "upsampler" in text, text
    code, text = _main([*base, "--out", tmp_path / "a", "--upsampler", f"jafar:{dino}"], capsys)
    assert code == 0, text  # the same settings resume (nothing to do)


def test_mismatched_files_are_refused_at_setup(files, tmp_path, capsys):
    from zsdense.dense.jafar import JAFAR, JafarConfig
    from zsdense.train.checkpoint import save_jafar

    base = ["anomaly", files["test"], "--preset", "anomalydino", "--reference", files["bank"]]
    code, text = _main(
        [*base, *FEW, "--out", tmp_path / "w", "--upsampler", f"jafar:{files['wrong']}"], capsys
    )
    w = files["dino_width"]
    assert code == 2 and f"takes {w + 8}-channel features" in text and f"{w}-channel" in text
    assert not (tmp_path / "w" / "results.jsonl").exists() or not _records(tmp_path / "w")
    # a zsdense file that records another backbone, of the right width
    other = tmp_path / "other.safetensors"
    m = JAFAR(JafarConfig(v_dim=w, qk_dim=16, num_heads=2))
    save_jafar(m, other, {"backbone": "dinov2:dinov2-base"})
    code, text = _main(
        [*base, *FEW, "--out", tmp_path / "o", "--upsampler", f"jafar:{other}"], capsys
    )
    assert code == 2 and "trained on the features of dinov2:dinov2-base" in text, text
    # the CLIP upsampler given to the DINOv2 preset: another width
    code, text = _main(
        [*base, *FEW, "--out", tmp_path / "c", "--upsampler", f"jafar:{files['clip']}"], capsys
    )
    assert code == 2 and "channel features" in text, text
    # the released upsamplers fit real weights only
    code, text = _main([*base, *FEW, "--out", tmp_path / "t", "--upsampler", "jafar"], capsys)
    assert code == 2 and "random weights" in text and "train-upsampler" in text, text


# ---- open vocabulary --------------------------------------------------------------------------


def test_openvocab_cli_and_python(files, tmp_path, capsys):
    from zsdense import Segmenter

    args = ["openvocab", files["scenes"], "--classes", "cat, grass, sky", "--preset", "sclip"]
    args += [*FEW, "--short-side", "112", "--save-probs", "--format", "npy"]
    code, text = _main([*args, "--out", tmp_path / "b"], capsys)
    assert code == 0, text
    code, text = _main(
        [*args, "--out", tmp_path / "j", "--upsampler", f"jafar:{files['clip']}"], capsys
    )
    assert code == 0, text
    (b,), (j,) = _records(tmp_path / "b"), _records(tmp_path / "j")
    assert b["meta"]["result"]["upsampler"] == {"upsampler": "bilinear"}
    jrec = j["meta"]["result"]["upsampler"]
    assert jrec["scale"] == 4 and jrec["upsampler"] == "jafar"
    pb = np.load(tmp_path / "b" / b["outputs"]["map"])
    pj = np.load(tmp_path / "j" / j["outputs"]["map"])
    h, w = _rt().context(str(files["scenes"] / "chelsea.png")).size
    assert pb.shape == pj.shape == (3, h, w)
    assert not np.allclose(pb, pj)
    assert _settings(tmp_path / "j")["tasks"]["openvocab"]["upsampler"] == f"jafar:{files['clip']}"
    # Python: the same numbers; trident (window tokens upsampled before the SAM aggregation)
    seg = Segmenter(models="tiny", device="cpu", precision="fp32")
    img = str(files["scenes"] / "chelsea.png")
    r = seg.open_vocab(img, "cat, grass, sky", preset="sclip", short_side=112,
                       upsampler=f"jafar:{files['clip']}")  # fmt: skip
    assert np.allclose(r.probs, pj, atol=1e-6)
    t = seg.open_vocab(img, "cat, grass, sky", preset="trident", short_side=112,
                       upsampler=f"jafar:{files['clip']}", upsampler_scale=2)  # fmt: skip
    assert t.probs.shape == (3, h, w) and t.meta["upsampler"]["scale"] == 2
    # the DINOv2 file does not fit the CLIP: refused at setup, exit 2
    code, text = _main(
        [*args, "--out", tmp_path / "x", "--upsampler", f"jafar:{files['dino']}"], capsys
    )
    assert code == 2 and "channel features" in text, text
    code, text = _main([*args, "--out", tmp_path / "y", "--upsampler", "jafar"], capsys)
    assert code == 2 and "random weights" in text, text


# ---- jafar alone: the released upsampler through the registry ----------------------------------


def _as_real(model, name: str):
    """The tiny encoder presented as the real-weights one ``name`` (no download here)."""
    if hasattr(model, "is_random"):
        return dataclasses.replace(model, name=name, is_random=False)
    return model


def test_jafar_alone_resolves_the_released_file(tmp_path, monkeypatch):
    from zsdense.dense.upsamplers import load_upsampler, released_upsampler_for
    from zsdense.models.dinov2 import build_dinov2
    from zsdense.models.weights_table import JAFAR as TABLE
    from zsdense.runtime import Runtime

    monkeypatch.setenv("ZSDENSE_OFFLINE", "1")
    rel = next(r for r in TABLE if r.encoder == "dinov2-small")
    dino = _as_real(build_dinov2("dinov2-small", tiny=True), "dinov2-small")
    assert released_upsampler_for(dino) == rel.name
    rt = Runtime(models="default", device="cpu", precision="fp32", weights_dir=str(tmp_path))
    with pytest.raises(WeightsError, match=rel.filename):  # offline and absent: named
        load_upsampler(rt, "jafar", dino)
    # found in --weights-dir: loaded, checked against the encoder (the table says 384
    # channels; this file is the tiny model's width, so it is refused as another checkpoint)
    _random_jafar_file(tmp_path / rel.filename, int(dino.width), 4)
    with pytest.raises(WeightsError, match=f"{rel.feature_dim}-channel"):
        load_upsampler(rt, "jafar", dino)
    # the CLIP: no released upsampler fits OpenAI's CLIP, and the message says why
    clip = _rt().clip("ViT-B-16")
    clip = dataclasses.replace(clip, is_random=False, weights_name="clip-ViT-B-16-openai")
    with pytest.raises(ConfigError, match="fine-tuned on ImageNet.*train-upsampler"):
        released_upsampler_for(clip)


@pytest.mark.slow
def test_jafar_alone_loads_a_full_width_release(tmp_path, monkeypatch):
    """A file of the released shape (qk 128, 384 channels) in --weights-dir under the released
    name is loaded for a ViT-S/14-shaped DINOv2 and upsamples its features."""
    from zsdense.dense.upsamplers import load_upsampler
    from zsdense.models.dinov2 import build_dinov2
    from zsdense.models.weights_table import JAFAR as TABLE
    from zsdense.runtime import Runtime

    monkeypatch.setenv("ZSDENSE_OFFLINE", "1")
    rel = next(r for r in TABLE if r.encoder == "dinov2-small")
    dino = _as_real(build_dinov2("dinov2-small"), "dinov2-small")
    _random_jafar_file(tmp_path / rel.filename, rel.feature_dim, 5, qk_dim=128)
    rt = Runtime(models="default", device="cpu", precision="fp32", weights_dir=str(tmp_path))
    up = load_upsampler(rt, "jafar", dino)
    assert up.record["release"] == rel.name and up.record["trained_on"] == rel.backbone
    x = torch.randn(1, 3, 56, 56)
    out = up.by_scale(x, torch.randn(1, 5, 4, 4), 2)
    assert out.shape == (1, 5, 8, 8)
