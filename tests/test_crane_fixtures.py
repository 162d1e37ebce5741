"""Crane's own outputs on a tiny random CLIP (../shared/fixtures/crane) vs zsdense's code paths.

Tolerances from the fixtures README §7: 1e-5 on normalised tokens, probabilities, maps and
scores; 1e-4 on logits (×1/0.07) and raw streams; exact equality of the D-Attn zero pattern.
"""

from __future__ import annotations

import pytest
import torch

from zsdense.dense.crane import (
    crane_features,
    crane_maps,
    dattn_weights,
    dino_input_from_clip,
    eattn_dual_path,
)
from zsdense.dense.smoothing import gaussian_filter_scipy, gaussian_filter_torch
from zsdense.models.clip import clip_from_state_dict
from zsdense.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD

TOL = 1e-5
TOL_RAW = 1e-4
START = 3  # the fixtures' first E-Attn block (eattn_blocks 3..6)


def _load(d, name):
    p = d / name
    if not p.is_file():
        pytest.skip(f"fixture {p} not found")
    return torch.load(p, weights_only=True)


@pytest.fixture(scope="module")
def crane_dir(fixtures_dir):
    return fixtures_dir("crane")


@pytest.fixture(scope="module")
def eattn(crane_dir):
    return _load(crane_dir, "eattn.pt")


@pytest.fixture(scope="module")
def maps_fx(crane_dir):
    return _load(crane_dir, "maps.pt")


@pytest.fixture(scope="module")
def dattn_fx(crane_dir):
    return _load(crane_dir, "dattn.pt")


@pytest.fixture(scope="module")
def clip(eattn):
    return clip_from_state_dict(eattn["state_dict"], arch="crane-fixture", is_random=True)


def _maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_positional_embedding_and_embed(clip, eattn):
    assert _maxdiff(clip.pos_embed((5, 5), "bilinear"), eattn["pos_embed_interpolated"]) < TOL
    with torch.no_grad():
        assert _maxdiff(clip.embed(eattn["images"], "bilinear"), eattn["x_after_ln_pre"]) < TOL_RAW


@pytest.mark.parametrize("attn_type", ["qq+kk+vv", "vv", "qq+kk"])
def test_eattn_tokens_as_run_and_per_layer(clip, eattn, attn_type):
    fx = eattn["types"][attn_type]
    x = eattn["images"]
    with torch.no_grad():
        as_run = eattn_dual_path(clip, x, start_block=START, attn_type=attn_type, keep_streams=True)
        per = eattn_dual_path(
            clip, x, start_block=START, attn_type=attn_type, layers=eattn["feature_layers"]
        )
    assert len(as_run.dense) == 1 and as_run.layers == [6]
    for j in range(3):  # Crane's three aliased entries all equal the last block's map
        assert _maxdiff(as_run.dense[0], fx["tokens_crane"][j]) < TOL
        assert _maxdiff(as_run.dense_raw[0], fx["tokens_crane_unnormalized"][j]) < TOL_RAW
        assert _maxdiff(per.dense[j], fx["tokens_per_layer"][j]) < TOL
        assert _maxdiff(per.dense_raw[j], fx["tokens_per_layer_unnormalized"][j]) < TOL_RAW
    for j, layer in enumerate((3, 4, 5, 6)):
        assert _maxdiff(as_run.refined[layer], fx["refined_stream"][j]) < TOL_RAW
        assert _maxdiff(as_run.original[layer], eattn["original_stream"][layer - 1]) < TOL_RAW
    assert _maxdiff(as_run.global_embed, eattn["image_embed"]) < TOL
    assert _maxdiff(as_run.global_raw, eattn["image_embed_unnormalized"]) < TOL_RAW
    # the per-layer variant is really different from the as-run one (the fixture's point)
    assert _maxdiff(per.dense[0], as_run.dense[0]) > 0.01


def test_maps_every_step(maps_fx):
    text = maps_fx["text_features"]
    assert len(maps_fx["cases"]) == 6
    for name, c in maps_fx["cases"].items():
        r = crane_maps(
            list(c["patch_tokens"]),
            text,
            c["image_embed"],
            grid=(5, 5),
            size=(70, 70),
            soft_mean=c["soft_mean"],
            temperature=0.07,
            keep_steps=True,
        )
        checked = 0
        for key, ref in c.items():
            if key in ("soft_mean", "patch_tokens", "image_embed"):
                continue
            if key == "anomaly_map_smoothed":
                ours = gaussian_filter_torch(r.anomaly_map, 4.0)
                ref_sc = torch.from_numpy(gaussian_filter_scipy(r.anomaly_map.numpy(), 4.0))
                assert _maxdiff(ref_sc, ref) < TOL, name
            elif hasattr(r, key):
                ours = getattr(r, key)
            else:
                assert key in r.steps, f"{name}: step {key} missing"
                ours = r.steps[key]
            tol = TOL_RAW if "logits" in key else TOL
            assert ours.shape == ref.shape, (name, key)
            assert _maxdiff(ours, ref) < tol, (name, key, _maxdiff(ours, ref))
            checked += 1
        assert checked >= 13


@pytest.mark.parametrize("case", ["b1", "b2"])
def test_dattn_cases(clip, eattn, dattn_fx, case):
    c = dattn_fx["cases"][case]
    x = c["images"]
    a = dattn_weights(c["dino_feats"], beta=1.2, gamma=3.0, mean="batch")
    assert _maxdiff(a, c["attn_weights"]) < TOL
    assert torch.equal(a == 0, c["attn_weights"] == 0)
    with torch.no_grad():
        for src, key in (("mid", "dattn_tokens"), ("in", "dattn_tokens_spec")):
            f = crane_features(
                clip,
                x,
                start_block=START,
                dino_feats_bchw=c["dino_feats"],
                dattn_mean="batch",
                dattn_value_source=src,
            )
            assert f.names == ["dattn", "eattn6"]
            assert _maxdiff(f.maps[0], c[key]) < TOL, (case, src)
            assert _maxdiff(f.maps[1], c["eattn_tokens"]) < TOL
            assert _maxdiff(f.global_embed, c["image_embed"]) < TOL
        dp = eattn_dual_path(clip, x, start_block=START, keep_last_inputs=True)
    assert _maxdiff(dp.last_in, c["o_in"]) < TOL_RAW
    assert _maxdiff(dp.last_mid, c["o_mid"]) < TOL_RAW
    d01 = dino_input_from_clip(x, eattn["openai_mean"], eattn["openai_std"])
    m = torch.tensor(IMAGENET_MEAN)[:, None, None]
    s = torch.tensor(IMAGENET_STD)[:, None, None]
    assert _maxdiff((d01 - m) / s, c["dino_input_seen"]) < TOL


def test_dattn_batch_mean_depends_on_batch_image_mean_does_not(clip, dattn_fx):
    b1, b2 = dattn_fx["cases"]["b1"], dattn_fx["cases"]["b2"]
    with torch.no_grad():
        kw = dict(start_block=START, dattn_value_source="mid")
        r1 = crane_features(
            clip, b1["images"], dino_feats_bchw=b1["dino_feats"], dattn_mean="image", **kw
        )
        r2 = crane_features(
            clip, b2["images"], dino_feats_bchw=b2["dino_feats"], dattn_mean="image", **kw
        )
    assert _maxdiff(r1.maps[0][0], r2.maps[0][0]) < TOL  # per-image mean: batch-independent
    assert _maxdiff(b1["dattn_tokens"][0], b2["dattn_tokens"][0]) > 0.05  # Crane's is not
    # at batch 1 the two means coincide
    assert _maxdiff(r1.maps[0], b1["dattn_tokens"]) < TOL


def test_crane_end_to_end_images_to_maps(clip, eattn, maps_fx):
    """images -> E-Attn -> maps -> smoothed map and score, as the crane preset runs it."""
    c = maps_fx["cases"]["crane_as_run_soft_mean_true"]
    with torch.no_grad():
        f = crane_features(clip, eattn["images"], start_block=START)
    r = crane_maps(
        f.maps, maps_fx["text_features"], f.global_embed, grid=f.grid, size=(70, 70), soft_mean=True
    )
    assert _maxdiff(r.anomaly_map, c["anomaly_map"]) < TOL
    assert _maxdiff(gaussian_filter_torch(r.anomaly_map, 4.0), c["anomaly_map_smoothed"]) < TOL
    assert _maxdiff(r.anomaly_score, c["anomaly_score"]) < TOL
