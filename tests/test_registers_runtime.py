"""``--registers`` as a runtime setting (tiny random models, float32): every preset that reads
CLIP or DINOv2 features gets them, ``off`` is the plain run bit for bit, outputs keep their
sizes, each image of a batch is edited as if alone, a neuron file for another encoder is a setup
error, and what ran is recorded (run settings, result meta, memory banks, resume refusal)."""

from __future__ import annotations

import json
import pickle
import zlib

import numpy as np
import pytest
import torch

from zsdense import models as zmodels
from zsdense.api import Segmenter
from zsdense.config import ANOMALY_PRESETS, OPENVOCAB_PRESETS, REFER_PRESETS, RuntimeConfig
from zsdense.errors import ConfigError
from zsdense.models import registers as R
from zsdense.models.registers_setting import RegisterSetting, served_name
from zsdense.runtime import Runtime
from zsdense.tasks.anomaly_registry import scorer_for

TINY = dict(device="cpu", models="tiny", precision="fp32")
ANOMALY_SIZE = 112  # crane-family input (8x8 grid of the tiny ViT-L/14-336): fast
SHORT_SIDE = 112  # open-vocabulary resize


def _images(n: int, seed: int = 0, h: int = 48, w: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((h, w, 3)).astype(np.float32) for _ in range(n)]


REFS = _images(2, seed=7)  # good references of the few-shot presets


def _neurons_for(model) -> R.NeuronSet:
    """A neuron set for ``model`` with neurons in its first, middle and last layers."""
    a = R._Adapter(model)
    k, n = a.mlp_dim, a.num_layers
    layers = {0: [1, k // 3], n // 2: [7], n - 1: [k - 2, 5]}
    return R.NeuronSet(layers=tuple(layers.items()), encoder=R.encoder_id(model), provenance="t")


def _feature_encoders(rt) -> dict[str, object]:
    """The CLIP / DINOv2 models a runtime served (label -> model)."""
    return {k: m for k, m in rt._models_used.items() if k.split("/")[0] in ("clip", "dinov2")}


# ---- every preset ----------------------------------------------------------------------------


def _small_bank(seg: Segmenter, refs):
    """A memory of ``refs`` at 112 px without rotations, built once per runtime (so with its
    register setting)."""
    from zsdense.tasks import fewshot as fs

    opts = fs.options_for(None, None, image_size=112, rotation=False)
    return seg.runtime.memo(
        ("test-bank", id(refs[0])), lambda: fs.build_memory(seg.runtime, refs, opts)
    )


def _run(seg: Segmenter, family: str, preset: str, imgs) -> list:
    if family == "anomaly":
        cfg = ANOMALY_PRESETS[preset]
        sc = scorer_for(preset)
        # no object name: AnomalyDINO would mask a named object's background, and on random
        # weights that can be every patch (a constant map)
        kw: dict = {"image_size": ANOMALY_SIZE}
        if sc.references == "required":
            kw["reference"] = REFS
            if "bank" in sc.reference_kinds and "crane" not in preset:  # small and quick
                kw["reference"] = _small_bank(seg, kw["reference"])
        n = max(len(imgs), int(sc.min_images(cfg)))
        batch = imgs + _images(n - len(imgs), seed=9) if n > len(imgs) else imgs
        return seg.anomaly_batch(batch, preset=preset, **kw)[: len(imgs)]
    if family == "openvocab":
        return seg.open_vocab_batch(imgs, classes="cat, sofa", preset=preset, short_side=SHORT_SIDE)
    # SAM's thresholds opened: the tiny SAM's masks would all be filtered out (a whole-image
    # fallback whose scores do not depend on the CLIP features)
    loose = dict(
        pred_iou_thresh=-100.0,
        stability_score_thresh=-100.0,
        min_mask_region_area=0,
        tiny_points_per_side=2,
        box_nms_thresh=1.0,
    )
    return seg.refer_batch(imgs, ["the cat on the left"] * len(imgs), preset=preset, **loose)


def _floats(family: str, r) -> dict[str, np.ndarray]:
    if family == "anomaly":
        return {"map": np.asarray(r.anomaly_map), "score": np.asarray(r.score)}
    if family == "openvocab":
        return {"probs": np.asarray(r.probs), "labels": np.asarray(r.labels)}
    terms = [float(c[k]) for c in r.candidates for k in ("score", "P", "R", "C") if k in c]
    return {"mask": np.asarray(r.mask), "score": np.asarray([r.score, *terms], dtype=np.float64)}


PRESETS = [
    *(("anomaly", p) for p in sorted(ANOMALY_PRESETS)),
    *(("openvocab", p) for p in sorted(OPENVOCAB_PRESETS)),
    *(("refer", p) for p in sorted(REFER_PRESETS)),
]


@pytest.mark.parametrize("family,preset", PRESETS, ids=[f"{f}-{p}" for f, p in PRESETS])
def test_every_preset_gets_registers_and_off_is_the_plain_run(family, preset, tmp_path):
    imgs = _images(1, seed=zlib.crc32(preset.encode()) % 1000)
    plain = Segmenter(**TINY)
    base = _run(plain, family, preset, imgs)
    served = _feature_encoders(plain.runtime)
    if not served:
        pytest.skip(f"{preset} reads no CLIP / DINOv2 features")
    off = Segmenter(**TINY, registers="off")
    for a, b in zip(base, _run(off, family, preset, imgs)):
        for k, v in _floats(family, a).items():
            assert np.array_equal(v, _floats(family, b)[k], equal_nan=True), (preset, k)  # bits
    files = []
    for label, model in served.items():
        p = tmp_path / (label.replace("/", "_") + ".json")
        _neurons_for(model).save(p)
        files.append(str(p))
    on = Segmenter(**TINY, registers=files)
    got = _run(on, family, preset, imgs)
    changed = False
    for a, b in zip(base, got):
        fa, fb = _floats(family, a), _floats(family, b)
        for k in fa:
            assert fa[k].shape == fb[k].shape, (preset, k)  # the registers never reach an output
            changed |= not np.array_equal(fa[k], fb[k], equal_nan=True)
        regs = b.meta.get("registers") or b.meta.get("result", {}).get("registers")
        assert regs is not None, b.meta.keys()
        assert set(regs) >= set(served)
        for label in served:
            assert regs[label]["num_registers"] == 1 and regs[label]["mode"] == "zero"
    assert changed, f"{preset}: registers on changed no output"
    for label, model in _feature_encoders(on.runtime).items():
        assert model._registers is not None, label
        assert served[label]._registers is None  # the plain, shared model is never hooked
    for label, model in on.runtime._models_used.items():
        if label.startswith("sam/"):
            assert getattr(model, "_registers", None) is None  # SAM untouched


# ---- batches ---------------------------------------------------------------------------------


def _files_for(seg: Segmenter, tmp_path) -> list[str]:
    files = []
    for label, model in _feature_encoders(seg.runtime).items():
        p = tmp_path / f"{label.replace('/', '_')}.json"
        _neurons_for(model).save(p)
        files.append(str(p))
    return files


@pytest.mark.parametrize("preset", ["crane+", "anomalydino"])
def test_batch_of_four_equals_four_single_runs(preset, tmp_path):
    """Per-image edits: a batch of 4 through the encoders gives each image's single run (the
    reference code edits only batch item 0; zsdense fixes it by default)."""
    imgs = _images(4, seed=3)
    plain = Segmenter(**TINY, batch_size=4)
    _run(plain, "anomaly", preset, imgs[:1])
    seg = Segmenter(**TINY, batch_size=4, registers=_files_for(plain, tmp_path))
    seg.runtime.text_cache = plain.runtime.text_cache  # text embeddings do not see registers
    batch = _run(seg, "anomaly", preset, imgs)
    for i, im in enumerate(imgs):
        one = _run(seg, "anomaly", preset, [im])[0]
        np.testing.assert_allclose(batch[i].anomaly_map, one.anomaly_map, atol=2e-5)


def test_reference_batch_edits_only_the_first_image(tmp_path):
    """``--registers-batch reference`` reproduces the reference's defect: image 0 of a batch is
    edited as alone, the others get the tokens but no edit (no memory bank here: with one, the
    references' rotations, batched, would be affected as well)."""
    imgs = _images(4, seed=3)
    plain = Segmenter(**TINY, batch_size=4)
    _run(plain, "anomaly", "crane+", imgs[:1])
    files = _files_for(plain, tmp_path)
    per = Segmenter(**TINY, batch_size=4, registers=files, registers_mode="mean")
    ref = Segmenter(
        **TINY, batch_size=4, registers=files, registers_mode="mean", registers_batch="reference"
    )
    for s in (per, ref):
        s.runtime.text_cache = plain.runtime.text_cache
    rbatch = _run(ref, "anomaly", "crane+", imgs)
    singles = [_run(per, "anomaly", "crane+", [im])[0] for im in imgs]
    np.testing.assert_allclose(rbatch[0].anomaly_map, singles[0].anomaly_map, atol=2e-5)
    worst = max(np.abs(rbatch[i].anomaly_map - singles[i].anomaly_map).max() for i in (1, 2, 3))
    assert worst > 1e-4
    assert rbatch[0].meta["registers"]["clip/ViT-L-14-336/openai"]["batch"] == "reference"


# ---- resolution: which encoder gets what -------------------------------------------------------


@pytest.mark.parametrize(
    "kind,name,models",
    [
        ("clip", "ViT-B-16", "tiny"),
        ("dinov2", "dinov2-small", "tiny"),
        ("dinov2", "dinov2-reg-small", "tiny"),
    ],
)
def test_served_name_is_the_loaded_encoders_name(kind, name, models):
    rt = Runtime(RuntimeConfig(**{**TINY, "models": models}))
    model = rt.model(kind, name)
    assert R.encoder_id(model).name == served_name(kind, name, models)


def test_served_name_of_the_other_model_sets():
    assert served_name("clip", "ViT-B-16", "default") == "clip-ViT-B-16-openai"
    assert served_name("clip", "ViT-B-16", "random") == "ViT-B-16"
    assert served_name("dinov2", "dinov2-large", "default") == "dinov2-large"
    assert served_name("dinov2", "dinov2-large", "random") == "dinov2-large"


def test_auto_picks_the_shipped_list_only_for_real_dinov2_large():
    st = RegisterSetting.from_config(RuntimeConfig(registers="auto"))
    hub = st.match("dinov2", "dinov2-large", "default")
    assert hub is not None and hub.neurons is R.DINOV2_L_HUB_NEURONS and hub.source == "auto"
    spec = st.spec(hub)
    assert spec.num_registers == 1 and spec.mode == "zero" and spec.batch == "per-image"
    assert st.match("dinov2", "dinov2-large", "tiny") is None
    assert st.match("dinov2", "dinov2-large", "random") is None
    assert st.match("dinov2", "dinov2-base", "default") is None
    assert st.match("clip", "ViT-L-14", "default") is None  # no CLIP list is shipped
    assert st.match("sam", "vit_b", "default") is None
    st2 = RegisterSetting.from_config(
        RuntimeConfig(registers="auto", registers_count=3, registers_mode="mean")
    )
    spec = st2.spec(st2.match("dinov2", "dinov2-large", "default"))
    assert spec.num_registers == 3 and spec.mode == "mean"


def test_auto_on_tiny_is_off_and_says_why():
    imgs = _images(1, seed=4)
    plain = Segmenter(**TINY).anomaly_batch(imgs, preset="crane", image_size=ANOMALY_SIZE)
    seg = Segmenter(**TINY, registers="auto")
    auto = seg.anomaly_batch(imgs, preset="crane", image_size=ANOMALY_SIZE)
    assert np.array_equal(plain[0].anomaly_map, auto[0].anomaly_map)
    assert auto[0].meta["registers"] == {"clip/ViT-L-14-336/openai": "none"}
    rec = seg.runtime.registers_applied()
    assert rec["clip/ViT-L-14-336/openai"]["registers"] == "none"
    assert "no shipped neuron list" in rec["clip/ViT-L-14-336/openai"]["why"]
    assert seg.runtime.registers_settings()["neurons"] == ["auto"]


def test_hooked_models_are_cached_per_setting(tmp_path):
    zmodels.clear_cache()
    plain = Runtime(RuntimeConfig(**TINY)).clip("ViT-B-16")
    p = _neurons_for(plain).save(tmp_path / "n.json")
    a = Runtime(RuntimeConfig(**TINY, registers=str(p))).clip("ViT-B-16")
    b = Runtime(RuntimeConfig(**TINY, registers=[str(p)])).clip("ViT-B-16")
    c = Runtime(RuntimeConfig(**TINY, registers=str(p), registers_count=2)).clip("ViT-B-16")
    off = Runtime(RuntimeConfig(**TINY, registers="off")).clip("ViT-B-16")
    assert a is b and a is not c and a is not plain and off is plain
    assert plain._registers is None and a.extra_tokens == 1 and c.extra_tokens == 2
    for n, m in a.model.named_parameters():  # the same weights (the tiny seed), hooks aside
        assert torch.equal(m, dict(plain.model.named_parameters())[n])
    zero = Runtime(RuntimeConfig(**TINY, registers=str(p), registers_count=0))
    assert zero.clip("ViT-B-16") is plain and not zero.registers_on


def test_neuron_set_objects_and_pickling(tmp_path):
    plain = Runtime(RuntimeConfig(**TINY)).clip("ViT-B-16")
    ns = _neurons_for(plain)
    back = pickle.loads(pickle.dumps(ns))
    assert back == ns and back.fingerprint == ns.fingerprint
    cfg = RuntimeConfig(**TINY, registers=ns)
    assert pickle.loads(pickle.dumps(cfg)).registers == ns  # Ray actors receive the config
    seg = Segmenter(**TINY, registers=ns)
    assert seg.clip("ViT-B-16")._registers.spec.neurons.fingerprint == ns.fingerprint


def test_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        Runtime(RuntimeConfig(**TINY, registers=str(tmp_path / "missing.json")))
    with pytest.raises(ConfigError, match="cannot be combined"):
        RuntimeConfig(registers=["off", "auto"])
    with pytest.raises(ConfigError, match="register mode"):
        RuntimeConfig(registers="auto", registers_mode="max")
    with pytest.raises(ConfigError, match="batch behaviour"):
        RuntimeConfig(registers="auto", registers_batch="all")
    with pytest.raises(ConfigError, match=">= 0"):
        RuntimeConfig(registers="auto", registers_count=-1)
    plain = Runtime(RuntimeConfig(**TINY)).clip("ViT-B-16")
    a = _neurons_for(plain).save(tmp_path / "a.json")
    b = _neurons_for(plain).save(tmp_path / "b.json")
    with pytest.raises(ConfigError, match="one neuron list per encoder"):
        Runtime(RuntimeConfig(**TINY, registers=[str(a), str(b)]))


def test_a_file_for_another_encoder_is_refused(tmp_path):
    other = Runtime(RuntimeConfig(**TINY)).clip("ViT-B-16")
    p = _neurons_for(other).save(tmp_path / "b16.json")
    rt = Runtime(RuntimeConfig(**TINY, registers=str(p)))
    rt.clip("ViT-L-14-336")  # crane's encoder: no file for it, runs plain
    with pytest.raises(
        ConfigError, match="found for clip tiny-ViT-B-16 .*cannot be used with clip"
    ):
        rt.check_registers_used()
    dino = Runtime(RuntimeConfig(**TINY)).dinov2("dinov2-small")
    q = _neurons_for(dino).save(tmp_path / "dino.json")
    rt = Runtime(RuntimeConfig(**TINY, registers=str(q)))
    rt.clip("ViT-L-14-336")
    with pytest.raises(ConfigError, match="which this run does not use"):
        rt.check_registers_used()
    # the same name on other weights: refused when the model loads
    ident = R.encoder_id(dino)
    forged = R.NeuronSet(
        layers=((0, (1,)),),
        encoder=R.EncoderId(**{**ident.__dict__, "num_layers": ident.num_layers + 1}),
    )
    with pytest.raises(ConfigError, match="another shape"):
        Runtime(RuntimeConfig(**TINY, registers=forged)).dinov2("dinov2-small")


# ---- contexts, banks ---------------------------------------------------------------------------


def test_a_context_never_mixes_register_settings(tmp_path):
    img = _images(1, seed=5)[0]
    plain = Segmenter(**TINY)
    ctx = plain.context(img)
    a = plain.open_vocab(ctx, classes="cat, sofa", preset="sclip", short_side=SHORT_SIDE)
    p = _neurons_for(plain.clip("ViT-B-16")).save(tmp_path / "n.json")
    on = Segmenter(**TINY, registers=str(p))
    b = on.open_vocab(ctx, classes="cat, sofa", preset="sclip", short_side=SHORT_SIDE)
    fresh = on.open_vocab(img, classes="cat, sofa", preset="sclip", short_side=SHORT_SIDE)
    assert np.array_equal(b.probs, fresh.probs) and not np.array_equal(a.probs, b.probs)
    again = plain.open_vocab(ctx, classes="cat, sofa", preset="sclip", short_side=SHORT_SIDE)
    assert np.array_equal(again.probs, a.probs)


def test_memory_bank_records_the_registers(tmp_path):
    from zsdense.tasks import fewshot as fs

    refs = _images(2, seed=6)
    plain = Runtime(RuntimeConfig(**TINY))
    opts = fs.options_for(None, None)
    p = _neurons_for(plain.dinov2(opts.model)).save(tmp_path / "d.json")
    on = Runtime(RuntimeConfig(**TINY, registers=str(p)))
    bank = fs.build_memory(on, refs, opts)
    assert bank.model["registers"]["fingerprint"] == R.load_neurons(p).fingerprint
    fs.check_bank(bank, opts, on.dinov2(opts.model))
    with pytest.raises(ConfigError, match=r"test-time registers: bank \d+ neurons"):
        fs.check_bank(bank, opts, plain.dinov2(opts.model))
    plain_bank = fs.build_memory(plain, refs, opts)
    assert "registers" not in plain_bank.model  # off: the bank as before
    with pytest.raises(ConfigError, match="bank off"):
        fs.check_bank(plain_bank, opts, on.dinov2(opts.model))


def test_jafar_clip_features_get_the_registers(tmp_path):
    from zsdense.models.jafar_backbone import jafar_features

    plain = Runtime(RuntimeConfig(**TINY)).clip("ViT-B-16")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = jafar_features(plain, x)
    with R.registers_applied(plain, R.RegisterSpec(neurons=_neurons_for(plain), num_registers=2)):
        b = jafar_features(plain, x)
    assert a.shape == b.shape and not torch.equal(a, b)
    assert torch.equal(a, jafar_features(plain, x))


def test_segmenter_helpers_take_the_register_options():
    from zsdense.api import _split_kwargs

    seg, rest = _split_kwargs({"registers": "auto", "registers_count": 2, "threshold": 0.3})
    assert seg == {"registers": "auto", "registers_count": 2} and rest == {"threshold": 0.3}
    assert json.loads(json.dumps(Segmenter(**TINY, registers="auto").runtime.registers_settings()))


def test_evaluation_settings_record_the_registers(tmp_path):
    from zsdense.eval.common import registers_entry, runtime_settings

    assert registers_entry(Runtime(RuntimeConfig(**TINY))) == {}
    assert registers_entry(Runtime(RuntimeConfig(**TINY, registers="off"))) == {}
    rec = registers_entry(Runtime(RuntimeConfig(**TINY, registers="auto", registers_mode="mean")))
    assert rec == {
        "registers": {"neurons": ["auto"], "count": None, "mode": "mean", "batch": "per-image"}
    }
    # every protocol's recorded settings (eval.common.runtime_settings) carry it; off adds none
    on = Runtime(RuntimeConfig(**TINY, registers="auto", registers_mode="mean"))
    assert runtime_settings(on)["registers"] == rec["registers"]
    assert "registers" not in runtime_settings(Runtime(RuntimeConfig(**TINY)))
