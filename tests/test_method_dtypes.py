"""The method contract's dtypes: a third-party-style method, written as a plug-in would be (fp32
tensors of its own handed to the library's CLIP entry points), runs under fp32 and bf16 and
gives float32 outputs; bf16 stays close to fp32. bf16 on the CPU runs on any CPU (emulated, so
slower, where the CPU lacks native bf16): nothing here depends on which CPU runs it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsdense.dense.methods import register_method, unregister_method

SEEN: list[dict] = []


def _plugin_features(clip, x_norm_bchw, cfg, vfm_fn):
    """Last-block tokens through the head, with fp32 tensors of its own mixed in (a learned-free
    'adapter' and an fp32 copy of the tokens), returning float32 features."""
    SEEN.append({"x": x_norm_bchw.dtype, "clip": clip.dtype})
    tokens = clip.run_blocks(clip.embed(x_norm_bchw))  # model dtype
    adapter = torch.linspace(0.5, 1.5, clip.width)  # fp32, the plug-in's own tensor
    mixed = tokens.float() * adapter  # fp32 tokens handed back to the (maybe bf16) model
    again = clip.run_blocks(mixed, clip.num_layers - 1)  # the last block once more, fp32 input
    feats = clip.head(again[:, 1:])  # fp32 input to ln_post / proj
    b, n, d = feats.shape
    gh, gw = (s // clip.patch_size for s in x_norm_bchw.shape[-2:])
    f = feats.float().transpose(1, 2).reshape(b, d, gh, gw)
    return F.normalize(f, dim=1)


def _plugin_features_model_dtype(clip, x_norm_bchw, cfg, vfm_fn):
    """The same method returning its features in the model's dtype (bf16 under bf16)."""
    return _plugin_features(clip, x_norm_bchw, cfg, vfm_fn).to(clip.dtype)


@pytest.fixture(scope="module")
def plugins():
    names = {"plugin32": _plugin_features, "pluginmd": _plugin_features_model_dtype}
    for name, fn in names.items():
        register_method(name, fn, description="test plug-in", preset={"crop": 224})
    yield list(names)
    for name in names:
        unregister_method(name)


@pytest.fixture(scope="module")
def segs():
    from zsdense.api import Segmenter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 forced on a CPU without native bf16 warns
        out = {p: Segmenter(device="cpu", models="tiny", precision=p) for p in ("fp32", "bf16")}
        for s in out.values():
            _ = s.dtype
    return out


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(4)
    return (rng.random((40, 56, 3)) * 255).astype(np.uint8)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["plugin32", "pluginmd"])
def test_plugin_method_runs_under_fp32_and_bf16(plugins, segs, image, method):
    out = {}
    for precision, seg in segs.items():
        SEEN.clear()
        r = seg.open_vocab(image, classes=["cat", "dog", "sky"], preset=method)
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert SEEN and all(s["x"] == torch.float32 and s["clip"] == want for s in SEEN)
        assert r.meta["precision"] == str(want).replace("torch.", "")
        assert r.probs.dtype == np.float32 and r.labels.dtype == np.int64
        assert r.labels.shape == image.shape[:2] and r.probs.shape == (3, *image.shape[:2])
        assert np.isfinite(r.probs).all()
        out[precision] = r
    # bf16 against fp32: the README's bound for the open-vocabulary presets (probabilities
    # within 0.08); measured here 0.013 for both (98.7 % of the labels equal)
    assert np.abs(out["bf16"].probs - out["fp32"].probs).max() < 0.08


def test_library_entry_points_cast_to_the_model_dtype(segs):
    clip = segs["bf16"].clip("ViT-B-16")
    assert clip.dtype == torch.bfloat16
    x = torch.randn(1, 5, clip.width)  # fp32
    with segs["bf16"].autocast():
        assert clip.head(x).dtype == torch.bfloat16
        assert clip.run_blocks(x, clip.num_layers - 1).dtype == torch.bfloat16
        assert clip.forward_layers(x, [1])[1].dtype == torch.bfloat16
