"""MuSc's own outputs (../shared/fixtures/musc) against zsdense's ``musc``.

Tolerances from the fixture README §7.1: 2e-5 on single MSM outputs, 1e-5 on LNAMD features,
patch scores, maps, raw image scores, unit class embeddings and final image scores, 1e-4 on the
low-dimensional RsCIN case and on unnormalised embeddings, 1e-5 × max|tokens| on raw tokens.
Every size, layer, grid, k, set size and case name is read from the files (the MSM fraction
``topmin`` from ``msm.pt``'s recorded call); :func:`test_sizes_follow_a_modified_fixture`
checks the derivations on altered copies (fewer images, other depth and layers).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from fixture_files import load_pt as _load  # tests/helpers

from zsdense.api import Segmenter
from zsdense.dense.crane import REFERENCE_LAYERS, scale_layers
from zsdense.dense.musc_backbones import clip_activation, clip_block_forward, clip_streams
from zsdense.errors import ConfigError
from zsdense.models.clip import OPENAI_MEAN, OPENAI_STD, ClipModel
from zsdense.tasks.anomaly import resolve_preset
from zsdense.tasks.common import model_input
from zsdense.tasks.musc import (
    layer_features,
    min_images,
    musc_patch_scores,
    mutual_scores,
    reference_gt_mask,
    rscin,
    rscin_k_list,
    run_musc,
    topmin_count,
    upsample_aligned,
)

TOL = 1e-5
TOL_MSM = 2e-5
TOL_LOWDIM = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The fixture tensors are tiny: one intra-op thread avoids thread-pool stalls that make
    thousands of small products slow on a shared 2-core machine (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def musc_dir(fixtures_dir):
    return fixtures_dir("musc")


@pytest.fixture(scope="module")
def lnamd_fx(musc_dir):
    return _load(musc_dir, "lnamd.pt")


@pytest.fixture(scope="module")
def msm_fx(musc_dir):
    return _load(musc_dir, "msm.pt")


@pytest.fixture(scope="module")
def topmin(msm_fx):
    """MSM's fraction of the M-1 per-image distances (the reference's ``topmin_max``), as the
    fixture records the call; it is the ``musc`` preset's."""
    m = re.search(r"topmin_max ([0-9.]+)", msm_fx["meta"]["call"])
    assert m, msm_fx["meta"]["call"]
    value = float(m.group(1))
    assert value == resolve_preset("musc").musc_topmin
    return value


@pytest.fixture(scope="module")
def rscin_fx(musc_dir):
    return _load(musc_dir, "rscin.pt")


@pytest.fixture(scope="module")
def pipe(musc_dir):
    return _load(musc_dir, "pipeline.pt")


def _maxdiff(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def _patches(tokens_lmtc: torch.Tensor) -> list[torch.Tensor]:
    """(layers, M, 1+N, C) with the class slot at 0 -> per-layer (M, N, C)."""
    return [tokens_lmtc[i][:, 1:] for i in range(tokens_lmtc.shape[0])]


# ---- LNAMD -----------------------------------------------------------------------------------


def test_lnamd_every_r_and_layer(lnamd_fx):
    meta = lnamd_fx["meta"]
    g = int(meta["grid"])
    assert lnamd_fx["tokens"].shape == (meta["layers"], meta["M"], 1 + meta["N"], meta["C"])
    for r in meta["r_list"]:
        want = lnamd_fx["features"][f"r{r}"]  # (M, N, layers, C)
        want_raw = lnamd_fx["features_unnormalized"][f"r{r}"]
        scale = float(want_raw.abs().max())
        for li in range(meta["layers"]):
            tok = lnamd_fx["tokens"][li][:, 1:]
            assert _maxdiff(layer_features(tok, (g, g), r), want[:, :, li]) < TOL, (r, li)
            raw = layer_features(tok, (g, g), r, normalize=False)
            assert _maxdiff(raw, want_raw[:, :, li]) < TOL * scale, (r, li)


def test_lnamd_needs_the_patch_grid(lnamd_fx):
    g = int(lnamd_fx["meta"]["grid"])
    with pytest.raises(ValueError, match="grid"):
        layer_features(lnamd_fx["tokens"][0], (g, g), 1)  # class slot still in: 1+N tokens


# ---- MSM -------------------------------------------------------------------------------------


def test_msm_every_case(msm_fx, topmin):
    check_msm_cases(msm_fx, topmin)


def check_msm_cases(msm_fx: dict, topmin: float) -> None:
    r_list = msm_fx["meta"]["r_list"]
    assert msm_fx["cases"], "no MSM cases stored"
    for c in msm_fx["cases"]:
        m, g = int(c["M"]), int(c["grid"])
        assert topmin_count(m, topmin) == int(c["k"]), c["name"]
        # MSM alone on the stored Z
        assert _maxdiff(mutual_scores(c["Z"], topmin), c["scores_Z"]) < TOL_MSM, c["name"]
        # LNAMD + MSM per (r, layer), layer means and the patch scores, from the raw tokens
        patch, per = musc_patch_scores(
            _patches(c["tokens"]), (g, g), r_list, topmin, keep_per_layer=True
        )
        assert per.shape == c["scores"].shape
        assert _maxdiff(per, c["scores"]) < TOL_MSM, c["name"]
        assert _maxdiff(per.double().mean(dim=1), c["scores_layer_mean"]) < TOL, c["name"]
        assert _maxdiff(patch, c["patch_scores"]) < TOL, c["name"]
        # the stored Z is the normalised LNAMD output of layer Z_layer at r = Z_r
        z = layer_features(c["tokens"][int(c["Z_layer"])][:, 1:], (g, g), int(c["Z_r"]))
        assert _maxdiff(z, c["Z"]) < TOL


def _largest_case(msm_fx):
    return max(msm_fx["cases"], key=lambda c: int(c["M"]))


def test_msm_largest_set_scored_at_once_in_any_slicing(msm_fx, topmin):
    """The largest stored set as one set: however the distance step is streamed
    (tiny matrix-product blocks, the nearest-distance table in slices of one block), the patch
    scores are the reference's."""
    c = _largest_case(msm_fx)
    g = int(c["grid"])
    r_list = msm_fx["meta"]["r_list"]
    n = int(c["N"])
    for block_rows, table_bytes in ((n, 1), (3 * n, 4 * n * int(c["M"]) * 5), (10**6, 1 << 30)):
        patch = musc_patch_scores(
            _patches(c["tokens"]),
            (g, g),
            r_list,
            topmin,
            block_rows=block_rows,
            table_bytes=table_bytes,
        )
        assert _maxdiff(patch, c["patch_scores"]) < TOL, (block_rows, table_bytes)


def test_msm_independent_of_image_order(msm_fx, topmin):
    c = _largest_case(msm_fx)
    g = int(c["grid"])
    perm = torch.randperm(int(c["M"]), generator=torch.Generator().manual_seed(3))
    tokens = [t[perm] for t in _patches(c["tokens"])]
    patch = musc_patch_scores(
        tokens, (g, g), msm_fx["meta"]["r_list"], topmin, block_rows=2 * g * g
    )
    assert _maxdiff(patch, c["patch_scores"][perm]) < TOL


def test_msm_grouping_would_change_scores(msm_fx, topmin):
    """Scoring the largest set as two halves (what the old read-order grouping did) is not the
    reference: the scores move far beyond the tolerance (README §7.2: 1.0e-2)."""
    c = _largest_case(msm_fx)
    g = int(c["grid"])
    half = int(c["M"]) // 2
    toks = _patches(c["tokens"])
    r_list = msm_fx["meta"]["r_list"]
    parts = [
        musc_patch_scores([t[sl] for t in toks], (g, g), r_list, topmin)
        for sl in (slice(0, half), slice(half, None))
    ]
    assert _maxdiff(torch.cat(parts), c["patch_scores"]) > 100 * TOL


def test_too_few_images_is_a_clear_error(msm_fx, topmin):
    """Below the smallest set at which MSM averages a distance (:func:`min_images` of the
    fraction) the reference returns NaN (``meta['M<n>_all_nan']``); we refuse with a
    ConfigError naming the minimum."""
    m = min_images(topmin)
    assert topmin_count(m - 1, topmin) == 0 < topmin_count(m, topmin)
    for key, value in msm_fx["meta"].items():
        hit = re.fullmatch(r"M(\d+)_all_nan", key)
        if hit and value is True:
            assert int(hit.group(1)) < m, key  # the reference's NaN sizes are below the minimum
    assert all(int(c["M"]) >= m for c in msm_fx["cases"])  # every stored set is scorable
    c = max(msm_fx["cases"], key=lambda c: int(c["M"]))
    with pytest.raises(ConfigError, match=f"at least {m} images"):
        mutual_scores(c["Z"][: m - 1], topmin)
    mutual_scores(c["Z"][:m], topmin)  # the minimum itself is fine


# ---- RsCIN -----------------------------------------------------------------------------------


def test_rscin_every_case(rscin_fx):
    assert rscin_fx["cases"]
    for c in rscin_fx["cases"]:
        tol = TOL_LOWDIM if c["kind"] == "lowdim" else TOL
        raw, cls = c["raw_scores"], c["cls_tokens"]
        assert _maxdiff(rscin(raw, cls, rscin_k_list("mvtec_ad")), c["scores_k123"]) < tol
        assert _maxdiff(rscin(raw, cls, rscin_k_list("visa")), c["scores_k189"]) < tol
        for name, want in c["per_k"].items():
            k = int(name[1:])
            assert _maxdiff(rscin(raw, cls, (k,)), want) < tol, (c["name"], k)


def test_rscin_edge_behaviour(rscin_fx):
    assert rscin_k_list("mvtec_ad") == (1, 2, 3) and rscin_k_list("visa") == (1, 8, 9)
    assert rscin_k_list("btad") == (1, 2, 3) and rscin_k_list(None) == (1, 2, 3)
    c = rscin_fx["cases"][0]
    raw, cls = c["raw_scores"], c["cls_tokens"]
    # a 0 in the k-list returns the raw scores, not normalised (meta: ..._returns_raw_unchanged)
    assert rscin_fx["meta"]["k_list_with_0_returns_raw_unchanged"] is True
    assert torch.equal(rscin(raw, cls, (0, 1)), raw.double())
    # k larger than the set: the reference raises a RuntimeError; ours is a ConfigError
    assert "out of range" in rscin_fx["meta"]["M8_with_k189"]
    ks = rscin_k_list("visa")
    need = max(ks)
    big = max(rscin_fx["cases"], key=lambda c: int(c["M"]))
    assert int(big["M"]) >= need
    raw, cls = big["raw_scores"], big["cls_tokens"]
    with pytest.raises(ConfigError, match=f"at least {need} images"):
        rscin(raw[: need - 1], cls[: need - 1], ks)
    assert rscin(raw[:need], cls[:need], ks).shape == (need,)


# ---- the whole pipeline on the tiny random CLIP ---------------------------------------------


def _fixture_clip(pipe, quick_gelu: bool = True) -> ClipModel:
    """open_clip CLIP from ``meta.model_config`` at its native size, fixture weights loaded."""
    import open_clip

    cfg = pipe["meta"]["model_config"]
    model = open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=dict(cfg["vision_cfg"]),
        text_cfg=dict(cfg["text_cfg"]),
        quick_gelu=quick_gelu,
    )
    model.load_state_dict(pipe["state_dict"], strict=True)
    model = model.float().eval().requires_grad_(False)
    return ClipModel(model=model, arch="musc-fixture", is_random=True)


class _FixtureSegmenter(Segmenter):
    """A Segmenter whose CLIP is the fixture's model (injected, nothing downloaded)."""

    def __init__(self, clip: ClipModel, batch_size: int) -> None:
        super().__init__(device="cpu", models="tiny", precision="fp32", batch_size=batch_size)
        self._clip = clip

    def clip(self, arch: str, pretrained: str = "openai") -> ClipModel:
        return self._clip


def layers_for(features_list, n_blocks: int) -> tuple[int, ...]:
    """The presets write blocks for a 24-block model and scale them to the model's depth
    (:func:`scale_layers`): a 24-block list that lands on exactly ``features_list`` (the
    fixture's 1-based blocks, the reference's 0-based config + 1)."""
    layers_24 = []
    for b in features_list:
        hits = [v for v in range(1, REFERENCE_LAYERS + 1) if scale_layers((v,), n_blocks) == (b,)]
        assert hits, (b, n_blocks)
        layers_24.append(hits[0])
    assert scale_layers(layers_24, n_blocks) == tuple(int(b) for b in features_list)
    return tuple(layers_24)


def _cfg(pipe, preset: str = "musc"):
    meta = pipe["meta"]
    n_blocks = int(meta["model_config"]["vision_cfg"]["layers"])
    layers_24 = layers_for(meta["features_list"], n_blocks)
    return resolve_preset(
        preset,
        image_size=int(meta["img_resize"]),
        musc_layers=layers_24,
        musc_r=tuple(meta["r_list"]),
    )


def _contexts(seg, pipe, order=None):
    imgs = pipe["raw_images"].numpy().astype(np.uint8)
    order = range(len(imgs)) if order is None else order
    return seg.contexts([imgs[i] for i in order])


@pytest.fixture(scope="module")
def fixture_clip(pipe):
    return _fixture_clip(pipe)


def test_pipeline_pos_embed_input_tokens_and_embeddings(pipe, fixture_clip):
    meta = pipe["meta"]
    clip = fixture_clip
    g, s = int(meta["grid"]), int(meta["img_resize"])
    assert clip.native_grid == int(meta["native_grid"]) and clip.patch_size == meta["patch_size"]
    # bicubic, no antialias, class slot kept
    assert _maxdiff(clip.pos_embed((g, g), "bicubic"), pipe["pos_embed_resized"]) < TOL
    assert tuple(meta["openai_mean"]) == pytest.approx(OPENAI_MEAN)
    assert tuple(meta["openai_std"]) == pytest.approx(OPENAI_STD)
    seg = _FixtureSegmenter(clip, int(pipe["meta"]["batch_size"]))
    x = clip.normalize(model_input(_contexts(seg, pipe), s, "cpu"))
    assert _maxdiff(x, pipe["images"]) < TOL
    # as run: the checkpoint is rebuilt with erf GELU off its native size
    assert meta["act_layer"] == "GELU"
    act = clip_activation(clip, s, "as-run")
    assert act == "gelu" and clip_activation(clip, clip.native_size, "as-run") == "quick_gelu"
    st = clip_streams(clip, pipe["images"], meta["features_list"], act=act)
    tok = pipe["tokens"]
    scale = float(tok.abs().max())
    for li, block in enumerate(meta["features_list"]):
        assert _maxdiff(st.patches[block], tok[li][:, 1:]) < TOL * scale, block
    assert st.grid == (g, g)
    assert _maxdiff(st.image_embed, pipe["cls_tokens"]) < TOL
    x = clip.embed(pipe["images"], "bicubic")
    for blk in clip.blocks:
        x = clip_block_forward(blk, x, act)
    assert _maxdiff(clip.head(x[:, 0]), pipe["image_embed_unnormalized"]) < TOL_LOWDIM
    # QuickGELU (musc-fixed) moves the tokens far beyond the tolerance (README §6.6)
    q = clip_streams(clip, pipe["images"], meta["features_list"], act="quick_gelu")
    assert _maxdiff(q.patches[meta["features_list"][-1]], tok[-1][:, 1:]) > 100 * TOL * scale


def test_pipeline_scores_maps_from_tokens(pipe, topmin):
    meta = pipe["meta"]
    g, s = int(meta["grid"]), int(meta["img_resize"])
    patch, per = musc_patch_scores(
        _patches(pipe["tokens"]), (g, g), meta["r_list"], topmin, keep_per_layer=True
    )
    assert _maxdiff(per, pipe["msm_scores"]) < TOL_MSM
    assert _maxdiff(patch, pipe["patch_scores"]) < TOL
    maps = upsample_aligned(patch, (g, g), s)
    assert _maxdiff(maps, pipe["anomaly_maps"]) < TOL
    raw = maps.flatten(1).amax(dim=1)
    assert _maxdiff(raw, pipe["raw_image_scores"]) < TOL
    for ds in ("mvtec", "visa"):
        ks = pipe[ds]["k_list"]
        assert list(rscin_k_list("mvtec_ad" if ds == "mvtec" else ds)) == list(ks)
        assert _maxdiff(rscin(raw, pipe["cls_tokens"], ks), pipe[ds]["image_scores"]) < TOL


@pytest.mark.parametrize("dataset", ["mvtec", "visa"])
def test_pipeline_end_to_end_from_raw_images(pipe, fixture_clip, dataset):
    """run_musc from the raw uint8 images: maps and final image scores of the reference run."""
    seg = _FixtureSegmenter(fixture_clip, int(pipe["meta"]["batch_size"]))
    cfg = _cfg(pipe)
    maps, scores, info = run_musc(seg, cfg, _contexts(seg, pipe), dataset=dataset)
    assert maps.shape == pipe["anomaly_maps"].shape
    assert _maxdiff(maps, pipe["anomaly_maps"]) < TOL
    assert _maxdiff(scores, pipe[dataset]["image_scores"]) < TOL
    assert info["k"] == list(pipe[dataset]["k_list"]) and info["act"] == "gelu"
    assert info["layers"] == list(pipe["meta"]["features_list"])
    assert info["n_images"] == int(pipe["meta"]["M"]) and info["smoothing_sigma"] == 0.0


def test_pipeline_shuffled_file_order_gives_the_same_per_image_results(pipe, fixture_clip):
    seg = _FixtureSegmenter(fixture_clip, int(pipe["meta"]["batch_size"]))
    cfg = _cfg(pipe)
    m = int(pipe["meta"]["M"])
    order = torch.randperm(m, generator=torch.Generator().manual_seed(7)).tolist()
    maps, scores, _ = run_musc(seg, cfg, _contexts(seg, pipe, order), dataset="mvtec")
    assert _maxdiff(maps, pipe["anomaly_maps"][order]) < TOL
    assert _maxdiff(scores, pipe["mvtec"]["image_scores"][order]) < TOL


def test_pipeline_musc_fixed_uses_quick_gelu(pipe, fixture_clip):
    seg = _FixtureSegmenter(fixture_clip, int(pipe["meta"]["batch_size"]))
    maps, _, info = run_musc(seg, _cfg(pipe, "musc-fixed"), _contexts(seg, pipe), dataset="mvtec")
    assert info["act"] == "quick_gelu"
    d = _maxdiff(maps, pipe["anomaly_maps"])
    assert d > 100 * TOL  # README §7.2: QuickGELU moves patch scores by ~2e-3


def test_pipeline_divide_run_is_not_what_musc_does(pipe):
    """The stored divide_num=2 run differs from the one-set run: zsdense scores one set."""
    div = pipe["divide"]
    order = list(div["order"])
    assert sorted(order) == list(range(int(pipe["meta"]["M"])))
    assert _maxdiff(div["tokens"], pipe["tokens"][:, order]) == 0.0
    assert _maxdiff(div["patch_scores"], pipe["patch_scores"][order]) > 100 * TOL


def test_pipeline_mask_binarisation_per_dataset(pipe):
    """The reference's evaluation masks: MVTec keeps only pixels at 255 after the bilinear
    resize, VisA every nonzero pixel (README §6.7); exact equality."""
    s = int(pipe["meta"]["img_resize"])
    for ds in ("mvtec", "visa"):
        got = torch.stack([reference_gt_mask(m.numpy(), s, ds) for m in pipe["raw_masks"]])
        assert torch.equal(got, pipe[ds]["gt_px"].bool()), ds
    mv, vi = pipe["mvtec"]["gt_px"].sum(), pipe["visa"]["gt_px"].sum()
    assert mv < vi  # the two rules differ on the same masks


# ---- the derivations follow the fixture, not constants ---------------------------------------


def test_sizes_follow_a_modified_fixture(msm_fx, pipe, fixture_clip, topmin):
    """Altered copies, their expected values recomputed with our own code where the reference's
    cannot be: an MSM case cut to fewer images (its own k), preset layers for other depths,
    and the whole pipeline on a shallower copy of the model with fewer images and fewer
    feature layers (the preset path picks exactly the copy's layers and image count)."""
    # 1. an MSM case with fewer images: k and every check follow the copy's M
    c = _largest_case(msm_fx)
    g, m = int(c["grid"]), int(c["M"])
    cut = max(min_images(topmin), m // 2)
    assert cut < m
    r_list = msm_fx["meta"]["r_list"]
    toks = c["tokens"][:, :cut]
    patch, per = musc_patch_scores(_patches(toks), (g, g), r_list, topmin, keep_per_layer=True)
    small = dict(
        c,
        name=f"{c['name']}_cut{cut}",
        M=cut,
        k=topmin_count(cut, topmin),
        tokens=toks,
        Z=c["Z"][:cut],
        scores_Z=mutual_scores(c["Z"][:cut], topmin),
        scores=per,
        scores_layer_mean=per.double().mean(dim=1),
        patch_scores=patch,
    )
    check_msm_cases(dict(msm_fx, cases=[small]), topmin)
    with pytest.raises(AssertionError):  # the cut case's scores are not the full set's
        check_msm_cases(
            dict(msm_fx, cases=[dict(small, patch_scores=c["patch_scores"][:cut])]), topmin
        )

    # 2. preset layers (written for 24 blocks) that land on a given list at other depths,
    # including depths where the plain b*24//depth rounds onto the wrong block
    for n_blocks, blocks in ((6, (2, 4, 6)), (17, (2, 7, 12, 17)), (20, (4, 9, 19)), (24, (6, 24))):
        assert scale_layers(layers_for(blocks, n_blocks), n_blocks) == blocks

    # 3. the pipeline on a shallower model (its first half of the blocks), fewer images
    meta = pipe["meta"]
    depth = int(meta["model_config"]["vision_cfg"]["layers"]) // 2
    layers = [int(b) for b in meta["features_list"] if int(b) <= depth]
    assert layers and depth < int(meta["model_config"]["vision_cfg"]["layers"])
    n_img = max(min_images(topmin), max(rscin_k_list("mvtec_ad")), int(meta["M"]) * 2 // 3)
    assert n_img < int(meta["M"])
    pre = "visual.transformer.resblocks."
    sd = {
        k: v
        for k, v in pipe["state_dict"].items()
        if not k.startswith(pre) or int(k[len(pre) :].split(".")[0]) < depth
    }
    vision_cfg = dict(meta["model_config"]["vision_cfg"], layers=depth)
    mod = dict(
        pipe,
        state_dict=sd,
        raw_images=pipe["raw_images"][:n_img],
        images=pipe["images"][:n_img],
        meta=dict(
            meta,
            M=n_img,
            features_list=layers,
            model_config=dict(meta["model_config"], vision_cfg=vision_cfg),
        ),
    )
    clip = _fixture_clip(mod)
    assert clip.num_layers == depth
    seg = _FixtureSegmenter(clip, int(meta["batch_size"]))
    maps, _, info = run_musc(seg, _cfg(mod), _contexts(seg, mod), dataset="mvtec")
    assert info["layers"] == layers and info["n_images"] == n_img
    s = int(meta["img_resize"])
    st = clip_streams(clip, mod["images"], layers, act=clip_activation(clip, s, "as-run"))
    want = musc_patch_scores([st.patches[b] for b in layers], st.grid, meta["r_list"], topmin)
    assert _maxdiff(maps, upsample_aligned(want, st.grid, s)) < TOL
