"""Crane's own outputs on a tiny random CLIP (../shared/fixtures/crane) vs zsdense's code paths.

Tolerances from the fixtures README §7: 1e-5 on normalised tokens, probabilities, maps and
scores; 1e-4 on logits (×1/0.07) and raw streams; exact equality of the D-Attn zero pattern.

Every size is read from the fixture (:func:`crane_sizes`): the E-Attn blocks and the first one
from ``config``, the patch size from the state dict, grids and image sizes from tensor shapes,
the heads from ``config``, case names and counts by iterating the stored dicts. Regenerated
fixtures (other seeds, widths, depths, grids, batch sizes) need no edit here;
:func:`test_sizes_follow_a_modified_fixture` proves the derivation on altered copies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from fixture_files import load_pt as _load  # tests/helpers

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
# keys of a maps case that are its inputs, not reference outputs
MAPS_INPUTS = ("soft_mean", "patch_tokens", "image_embed")


@dataclass(frozen=True)
class CraneSizes:
    """Everything the tests need to know about the fixtures' shapes and settings."""

    patch: int
    vision_heads: int
    text_heads: int
    last_block: int  # 1-based index of the last CLIP block (= number of blocks)
    start: int  # first E-Attn block (1-based)
    eattn_blocks: tuple[int, ...]  # blocks whose refined stream is stored
    feature_layers: tuple[int, ...]  # requested layers of the as-run / per-layer call
    grid: tuple[int, int]  # patch grid of the input images
    size: tuple[int, int]  # image (and map) size
    temperature: float
    sigma: float
    alpha: float
    dattn_beta: float
    dattn_gamma: float
    dattn_layer: int
    attn_types: tuple[str, ...]
    maps_cases: tuple[str, ...]
    dattn_cases: tuple[str, ...]  # sorted by batch size
    as_run_case: str  # the maps case the `crane` preset reproduces


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def crane_sizes(eattn: dict, maps_fx: dict, dattn_fx: dict) -> CraneSizes:
    """Derive every size, index and name from the three fixture dicts (README §1-§5)."""
    cfg = eattn["config"]
    patch = int(eattn["state_dict"]["visual.conv1.weight"].shape[-1])
    h, w = eattn["images"].shape[-2:]
    grid = (h // patch, w // patch)
    blocks = tuple(int(b) for b in cfg["eattn_blocks"])
    n_blocks = int(eattn["original_stream"].shape[0])
    assert int(cfg["first_eattn_block"]) == blocks[0]
    assert blocks == tuple(range(blocks[0], n_blocks + 1))  # E-Attn runs to the last block
    width = eattn["state_dict"]["visual.conv1.weight"].shape[0]
    assert width == cfg["vision_width"] and n_blocks == cfg["vision_layers"]
    mcfg, dcfg = maps_fx["config"], dattn_fx["config"]
    assert _pair(mcfg["grid"]) == grid and _pair(mcfg["input_size"]) == (h, w)
    by_batch = sorted(dattn_fx["cases"], key=lambda k: dattn_fx["cases"][k]["images"].shape[0])
    # the `crane` preset: Crane's as-run tokens (every entry = the last block) with soft_mean
    as_run = [
        name
        for name, c in maps_fx["cases"].items()
        if c["soft_mean"]
        and c["patch_tokens"].shape == eattn["types"][cfg["attn_types"][0]]["tokens_crane"].shape
        and torch.equal(c["patch_tokens"], eattn["types"][cfg["attn_types"][0]]["tokens_crane"])
    ]
    assert len(as_run) == 1, as_run
    return CraneSizes(
        patch=patch,
        vision_heads=int(cfg["vision_heads"]),
        text_heads=int(cfg["text_heads"]),
        last_block=n_blocks,
        start=blocks[0],
        eattn_blocks=blocks,
        feature_layers=tuple(int(x) for x in eattn["feature_layers"]),
        grid=grid,
        size=(int(h), int(w)),
        temperature=float(mcfg["temperature"]),
        sigma=float(mcfg["sigma"]),
        alpha=float(mcfg["alpha"]),
        dattn_beta=float(dcfg["dattn_beta"]),
        dattn_gamma=float(dcfg["dattn_gamma"]),
        dattn_layer=int(dcfg["dattn_layer"]),
        attn_types=tuple(eattn["types"]),
        maps_cases=tuple(maps_fx["cases"]),
        dattn_cases=tuple(by_batch),
        as_run_case=as_run[0],
    )


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
def sizes(eattn, maps_fx, dattn_fx) -> CraneSizes:
    return crane_sizes(eattn, maps_fx, dattn_fx)


@pytest.fixture(scope="module")
def clip(eattn, sizes):
    return clip_from_state_dict(
        eattn["state_dict"],
        arch="crane-fixture",
        is_random=True,
        vision_heads=sizes.vision_heads,
        text_heads=sizes.text_heads,
    )


def _maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_model_built_from_the_stored_config(clip, eattn, sizes):
    cfg = eattn["config"]
    assert clip.num_layers == sizes.last_block == cfg["vision_layers"]
    assert clip.width == cfg["vision_width"] and clip.patch_size == cfg["patch_size"]
    assert clip.block(0).num_heads == cfg["vision_heads"]
    assert clip.block(0).head_dim == cfg["head_dim"]
    assert clip.embed_dim == cfg["embed_dim"] and clip.native_grid == cfg["native_grid"]


def test_positional_embedding_and_embed(clip, eattn, sizes):
    assert _maxdiff(clip.pos_embed(sizes.grid, "bilinear"), eattn["pos_embed_interpolated"]) < TOL
    with torch.no_grad():
        assert _maxdiff(clip.embed(eattn["images"], "bilinear"), eattn["x_after_ln_pre"]) < TOL_RAW


def test_eattn_tokens_as_run_and_per_layer(clip, eattn, sizes):
    x = eattn["images"]
    assert sizes.attn_types
    for attn_type in sizes.attn_types:
        fx = eattn["types"][attn_type]
        with torch.no_grad():
            as_run = eattn_dual_path(
                clip, x, start_block=sizes.start, attn_type=attn_type, keep_streams=True
            )
            per = eattn_dual_path(
                clip, x, start_block=sizes.start, attn_type=attn_type, layers=sizes.feature_layers
            )
        assert len(as_run.dense) == 1 and as_run.layers == [sizes.last_block]
        assert fx["tokens_crane"].shape[0] == len(sizes.feature_layers)
        for j in range(len(sizes.feature_layers)):
            # Crane's aliased entries all equal the last block's map
            assert _maxdiff(as_run.dense[0], fx["tokens_crane"][j]) < TOL, attn_type
            assert _maxdiff(as_run.dense_raw[0], fx["tokens_crane_unnormalized"][j]) < TOL_RAW
            assert _maxdiff(per.dense[j], fx["tokens_per_layer"][j]) < TOL, (attn_type, j)
            assert _maxdiff(per.dense_raw[j], fx["tokens_per_layer_unnormalized"][j]) < TOL_RAW
        assert fx["refined_stream"].shape[0] == len(sizes.eattn_blocks)
        for j, layer in enumerate(sizes.eattn_blocks):
            assert _maxdiff(as_run.refined[layer], fx["refined_stream"][j]) < TOL_RAW
            assert _maxdiff(as_run.original[layer], eattn["original_stream"][layer - 1]) < TOL_RAW
        assert _maxdiff(as_run.global_embed, eattn["image_embed"]) < TOL
        assert _maxdiff(as_run.global_raw, eattn["image_embed_unnormalized"]) < TOL_RAW
        # the per-layer variant is really different from the as-run one where a requested
        # layer is not the last block (the fixture's point): far above the tolerances
        earlier = [i for i, lay in enumerate(sizes.feature_layers) if lay != sizes.last_block]
        assert earlier, "the fixture requests no layer before the last block"
        assert max(_maxdiff(per.dense[j], as_run.dense[0]) for j in earlier) > 100 * TOL_RAW


def check_maps(maps_fx: dict, sizes: CraneSizes) -> list[str]:
    """Every step of every stored maps case against ``crane_maps``; returns the case names."""
    text = maps_fx["text_features"]
    done = []
    for name, c in maps_fx["cases"].items():
        L, _B, n, _d = c["patch_tokens"].shape
        assert n == sizes.grid[0] * sizes.grid[1], name
        r = crane_maps(
            list(c["patch_tokens"]),
            text,
            c["image_embed"],
            grid=sizes.grid,
            size=tuple(c["anomaly_map"].shape[-2:]),
            soft_mean=c["soft_mean"],
            temperature=sizes.temperature,
            alpha=sizes.alpha,
            keep_steps=True,
        )
        checked = 0
        for key, ref in c.items():
            if key in MAPS_INPUTS:
                continue
            if key == "anomaly_map_smoothed":
                ours = gaussian_filter_torch(r.anomaly_map, sizes.sigma)
                ref_sc = torch.from_numpy(gaussian_filter_scipy(r.anomaly_map.numpy(), sizes.sigma))
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
        assert checked == len(c) - len(MAPS_INPUTS), name  # every stored output was compared
        assert tuple(c["anomaly_map"].shape[-2:]) == sizes.size and L >= 1
        done.append(name)
    return done


def test_maps_every_step(maps_fx, sizes):
    assert check_maps(maps_fx, sizes) == list(sizes.maps_cases) != []


def check_dattn_case(clip, eattn, c: dict, sizes: CraneSizes) -> None:
    """One stored D-Attn batch: A_D, both value sources, the E-Attn map, the DINO input."""
    x = c["images"]
    a = dattn_weights(c["dino_feats"], beta=sizes.dattn_beta, gamma=sizes.dattn_gamma, mean="batch")
    assert _maxdiff(a, c["attn_weights"]) < TOL
    assert torch.equal(a == 0, c["attn_weights"] == 0)
    with torch.no_grad():
        for src, key in (("mid", "dattn_tokens"), ("in", "dattn_tokens_spec")):
            f = crane_features(
                clip,
                x,
                start_block=sizes.start,
                dino_feats_bchw=c["dino_feats"],
                dattn_beta=sizes.dattn_beta,
                dattn_gamma=sizes.dattn_gamma,
                dattn_mean="batch",
                dattn_value_source=src,
            )
            assert f.names == ["dattn", f"eattn{sizes.dattn_layer}"]
            assert _maxdiff(f.maps[0], c[key]) < TOL, src
            assert _maxdiff(f.maps[1], c["eattn_tokens"]) < TOL
            assert _maxdiff(f.global_embed, c["image_embed"]) < TOL
        dp = eattn_dual_path(clip, x, start_block=sizes.start, keep_last_inputs=True)
    assert _maxdiff(dp.last_in, c["o_in"]) < TOL_RAW
    assert _maxdiff(dp.last_mid, c["o_mid"]) < TOL_RAW
    d01 = dino_input_from_clip(x, eattn["openai_mean"], eattn["openai_std"])
    m = torch.tensor(IMAGENET_MEAN)[:, None, None]
    s = torch.tensor(IMAGENET_STD)[:, None, None]
    assert _maxdiff((d01 - m) / s, c["dino_input_seen"]) < TOL


def test_dattn_cases(clip, eattn, dattn_fx, sizes):
    assert sizes.dattn_cases
    for name in sizes.dattn_cases:
        assert sizes.dattn_layer == sizes.last_block, name  # Crane+ uses the last block
        check_dattn_case(clip, eattn, dattn_fx["cases"][name], sizes)


def test_dattn_batch_mean_depends_on_batch_image_mean_does_not(clip, dattn_fx, sizes):
    small, big = sizes.dattn_cases[0], sizes.dattn_cases[-1]
    b1, b2 = dattn_fx["cases"][small], dattn_fx["cases"][big]
    assert b1["images"].shape[0] < b2["images"].shape[0]
    assert torch.equal(b1["images"][0], b2["images"][0])  # the image both batches share
    with torch.no_grad():
        kw = dict(
            start_block=sizes.start,
            dattn_value_source="mid",
            dattn_beta=sizes.dattn_beta,
            dattn_gamma=sizes.dattn_gamma,
        )
        r1 = crane_features(
            clip, b1["images"], dino_feats_bchw=b1["dino_feats"], dattn_mean="image", **kw
        )
        r2 = crane_features(
            clip, b2["images"], dino_feats_bchw=b2["dino_feats"], dattn_mean="image", **kw
        )
    assert _maxdiff(r1.maps[0][0], r2.maps[0][0]) < TOL  # per-image mean: batch-independent
    # Crane's batch mean is not (README §5: up to 0.18 on the fixture), far above tolerance
    assert _maxdiff(b1["dattn_tokens"][0], b2["dattn_tokens"][0]) > 100 * TOL_RAW
    if b1["images"].shape[0] == 1:  # at batch 1 the two means coincide
        assert _maxdiff(r1.maps[0], b1["dattn_tokens"]) < TOL


def test_crane_end_to_end_images_to_maps(clip, eattn, maps_fx, sizes):
    """images -> E-Attn -> maps -> smoothed map and score, as the crane preset runs it."""
    c = maps_fx["cases"][sizes.as_run_case]
    with torch.no_grad():
        f = crane_features(clip, eattn["images"], start_block=sizes.start)
    assert f.grid == sizes.grid
    r = crane_maps(
        f.maps,
        maps_fx["text_features"],
        f.global_embed,
        grid=f.grid,
        size=sizes.size,
        soft_mean=True,
        temperature=sizes.temperature,
        alpha=sizes.alpha,
    )
    assert _maxdiff(r.anomaly_map, c["anomaly_map"]) < TOL
    smoothed = gaussian_filter_torch(r.anomaly_map, sizes.sigma)
    assert _maxdiff(smoothed, c["anomaly_map_smoothed"]) < TOL
    assert _maxdiff(r.anomaly_score, c["anomaly_score"]) < TOL


# ---- the derivation follows the fixture, not constants -------------------------------------


def test_sizes_follow_a_modified_fixture(eattn, maps_fx, dattn_fx, sizes):
    """Altered copies of the fixture dicts (other depth / first block, other image size, fewer
    and renamed cases, other batch sizes and case names, other heads) give the altered sizes,
    and the maps check runs exactly the cases the copy holds."""
    # 1. fewer, renamed maps cases: check_maps follows them (and still matches the references)
    mfx = copy.copy(maps_fx)
    others = [k for k in maps_fx["cases"] if k != sizes.as_run_case]
    keep = [sizes.as_run_case, *others[::2]]
    mfx["cases"] = {f"renamed_{i}": maps_fx["cases"][k] for i, k in enumerate(keep)}
    assert check_maps(mfx, sizes) == [f"renamed_{i}" for i in range(len(keep))]
    changed = crane_sizes(eattn, mfx, dattn_fx)
    assert changed.maps_cases == tuple(mfx["cases"])
    assert changed.as_run_case in mfx["cases"]  # found by content, whatever its name

    # 2. a deeper model starting E-Attn later, a larger non-square image, other heads
    efx = dict(eattn)
    n = sizes.last_block + 2
    efx["original_stream"] = torch.zeros(n, *eattn["original_stream"].shape[1:])
    efx["config"] = dict(
        eattn["config"],
        vision_layers=n,
        first_eattn_block=sizes.start + 1,
        eattn_blocks=list(range(sizes.start + 1, n + 1)),
        vision_heads=sizes.vision_heads * 2,
    )
    efx["feature_layers"] = [sizes.start + 1, n]
    h, w = (sizes.grid[0] + 1) * sizes.patch, (sizes.grid[1] + 2) * sizes.patch
    efx["images"] = torch.zeros(1, 3, h, w)
    mfx2 = dict(maps_fx, config=dict(maps_fx["config"], grid=[h // sizes.patch, w // sizes.patch]))
    mfx2["config"]["input_size"] = [h, w]
    got = crane_sizes(efx, mfx2, dattn_fx)
    assert (got.last_block, got.start) == (n, sizes.start + 1)
    assert got.eattn_blocks == tuple(range(sizes.start + 1, n + 1))
    assert got.feature_layers == (sizes.start + 1, n)
    assert got.grid == (sizes.grid[0] + 1, sizes.grid[1] + 2) and got.size == (h, w)
    assert got.vision_heads == sizes.vision_heads * 2

    # 3. D-Attn cases under other names and batch sizes: ordered by batch, not by name
    dfx = dict(dattn_fx)
    (small, big) = sizes.dattn_cases[0], sizes.dattn_cases[-1]
    dfx["cases"] = {"z_single": dattn_fx["cases"][small], "a_pair": dattn_fx["cases"][big]}
    assert crane_sizes(eattn, maps_fx, dfx).dattn_cases == ("z_single", "a_pair")

    # 4. an inconsistent config is caught, not silently used
    bad = dict(eattn, config=dict(eattn["config"], first_eattn_block=sizes.start + 1))
    with pytest.raises(AssertionError):
        crane_sizes(bad, maps_fx, dattn_fx)
