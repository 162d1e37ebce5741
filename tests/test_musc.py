"""``musc`` beyond the reference fixtures: the streamed distance table against brute force, the
backbones (CLIP GELU variants, DINOv2 as the hub runs it, DINO v1 refused), options and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsdense.dense.musc_backbones import (
    clip_block_forward,
    dinov2_streams,
    hub_pos_embed,
    resolve_backbone,
)
from zsdense.errors import ConfigError
from zsdense.tasks.anomaly import run_anomaly
from zsdense.tasks.musc import (
    DiskStack,
    min_images,
    musc_patch_scores,
    mutual_scores,
    nearest_distance_table,
    parse_k_list,
    run_musc,
)

SIZE = 224


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _brute_table(z):
    m, n, _ = z.shape
    d = torch.full((m, n, m), float("inf"))
    for i in range(m):
        for j in range(m):
            if i != j:
                d[i, :, j] = torch.cdist(z[i].double(), z[j].double()).min(dim=1).values.float()
    return d


@pytest.mark.parametrize(
    "rows, block_rows", [(None, 8), (None, 1000), (range(2, 5), 8), (range(3, 7), 12)]
)
def test_distance_table_matches_brute_force(rows, block_rows):
    z = _unit(7, 4, 5, seed=1)  # 7 images of 4 patches: blocks of 2 or 3 images, odd slices
    want = _brute_table(z)
    got = nearest_distance_table(z, rows, block_rows=block_rows)
    sel = slice(None) if rows is None else slice(rows[0], rows[-1] + 1)
    assert torch.isinf(got).sum() == got.shape[0] * got.shape[1]  # only i == j
    fin = torch.isfinite(want[sel])
    assert torch.allclose(got[fin], want[sel][fin], atol=2e-6)


def test_mutual_scores_k_and_errors():
    z = _unit(6, 4, 5, seed=2)
    d = _brute_table(z)
    k = int(5 * 0.3)
    want = d.sort(dim=2).values[:, :, :k].mean(dim=2)
    assert torch.allclose(mutual_scores(z, 0.3, block_rows=4, table_bytes=1), want, atol=2e-6)
    assert min_images(0.3) == 5 and min_images(0.5) == 3
    with pytest.raises(ConfigError, match="at least 5 images"):
        mutual_scores(z[:4], 0.3)
    with pytest.raises(ValueError, match="L2-normalised"):
        mutual_scores(2 * z, 0.3)


def test_parse_k_list():
    assert parse_k_list("1,8,9") == (1, 8, 9) and parse_k_list((1, 2)) == (1, 2)
    for bad in ("a,b", "-1,2", ""):
        with pytest.raises(ConfigError, match="musc_k"):
            parse_k_list(bad)


# ---- backbones -----------------------------------------------------------------------------


def test_resolve_backbone_names():
    assert resolve_backbone("clip") == ("clip", None)
    assert resolve_backbone("dinov2_vitl14") == ("dinov2", "dinov2-large")
    assert resolve_backbone("dinov2-reg-base") == ("dinov2", "dinov2-reg-base")
    with pytest.raises(ConfigError, match="DINO v1") as exc:
        resolve_backbone("dino_vitbase8")
    assert "dinov2_vitb14" in str(exc.value)  # says what to use instead
    with pytest.raises(ConfigError, match="unknown musc backbone"):
        resolve_backbone("resnet50")


def test_clip_block_gelu_variants(tiny_seg):
    clip = tiny_seg.clip("ViT-L-14-336")
    blk = clip.blocks[0]
    x = torch.randn(2, 5, clip.width, generator=torch.Generator().manual_seed(0))
    own = blk(x)
    # the model's own activation runs the block itself; the composed QuickGELU path equals it
    assert torch.equal(clip_block_forward(blk, x, "quick_gelu"), own)
    h = blk.ln_2(x + blk.attention(q_x=blk.ln_1(x)))
    fc = blk.mlp.c_fc(h)
    want_quick = x + blk.attention(q_x=blk.ln_1(x)) + blk.mlp.c_proj(fc * torch.sigmoid(1.702 * fc))
    assert torch.allclose(own, want_quick, atol=1e-5)
    gelu = clip_block_forward(blk, x, "gelu")
    want_gelu = x + blk.attention(q_x=blk.ln_1(x)) + blk.mlp.c_proj(F.gelu(fc))
    assert torch.allclose(gelu, want_gelu, atol=1e-5)
    assert (gelu - own).abs().max() > 1e-4


def test_dinov2_streams_match_transformers_at_native_size(tiny_seg):
    dino = tiny_seg.dinov2("dinov2-reg-base")
    m = dino.model
    n_layers = len(m.encoder.layer)
    native = int(m.config.image_size)
    x = torch.randn(1, 3, native, native, generator=torch.Generator().manual_seed(0))
    st = dinov2_streams(dino, x, range(1, n_layers + 1))
    ref = m(pixel_values=x, output_hidden_states=True)
    regs = dino.num_registers
    assert regs > 0
    for i in range(1, n_layers + 1):
        want = m.layernorm(ref.hidden_states[i])[:, 1 + regs :]
        assert torch.allclose(st.patches[i], want, atol=1e-5), i
    assert torch.allclose(st.image_embed, ref.last_hidden_state[:, 0], atol=1e-5)
    g = native // dino.patch_size
    assert st.grid == (g, g) and st.patches[1].shape[1] == g * g


def test_hub_pos_embed_offset(tiny_seg):
    """The hub resizes with scale_factor (g + 0.1) / G; a size-based resize differs."""
    pos = tiny_seg.dinov2("dinov2-base").model.embeddings.position_embeddings
    side = int(round((pos.shape[1] - 1) ** 0.5))
    assert hub_pos_embed(pos, (side, side)) is pos
    g = 16
    out = hub_pos_embed(pos, (g, g))
    assert out.shape == (1, 1 + g * g, pos.shape[-1])
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    by_size = by_size.permute(0, 2, 3, 1).reshape(1, g * g, -1)
    assert (out[:, 1:] - by_size).abs().max() > 1e-3


# ---- the task --------------------------------------------------------------------------------


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


def test_musc_with_a_dinov2_backbone(tiny_seg):
    imgs = _textured(6, blob_index=4, seed=3)
    res = run_anomaly(
        tiny_seg,
        tiny_seg.contexts(imgs),
        preset="musc",
        image_size=SIZE,
        musc_backbone="dinov2_vitb14",
    )
    info = res[0].meta["musc"]
    assert info["backbone"] == "dinov2" and info["arch"] == "tiny-dinov2-base"
    assert info["grid"] == [SIZE // 14, SIZE // 14]
    amap = res[4].anomaly_map
    assert amap[44:68, 52:76].mean() > amap[:30].mean()
    with pytest.raises(ConfigError, match="DINO v1"):
        run_anomaly(
            tiny_seg,
            tiny_seg.contexts(imgs),
            preset="musc",
            image_size=SIZE,
            musc_backbone="dino_vitbase16",
        )


def test_musc_presets_options_and_order(tiny_seg):
    imgs = _textured(6, blob_index=1, seed=4)
    ctxs = tiny_seg.contexts(imgs)  # reused below: the encoder runs once per image and setting
    a = run_anomaly(tiny_seg, ctxs, preset="musc", image_size=SIZE)
    assert a[0].meta["musc"]["act"] == "gelu"  # 224 is not the tiny ViT-L-14-336's 336
    assert a[0].meta["musc"]["k"] == [1, 2, 3] and a[0].meta["preset"] == "musc"
    order = [3, 0, 5, 1, 4, 2]
    b = run_anomaly(
        tiny_seg, tiny_seg.contexts([imgs[i] for i in order]), preset="musc", image_size=SIZE
    )
    for pos, i in enumerate(order):
        np.testing.assert_allclose(b[pos].anomaly_map, a[i].anomaly_map, atol=1e-5)
        assert b[pos].score == pytest.approx(a[i].score, abs=1e-5)
    f = run_anomaly(tiny_seg, ctxs, preset="musc-fixed", image_size=SIZE)
    assert f[0].meta["musc"]["act"] == "quick_gelu" and f[0].meta["preset"] == "musc-fixed"
    assert np.abs(f[1].anomaly_map - a[1].anomaly_map).max() > 1e-4
    # smoothing is an option, off by default
    s = run_anomaly(tiny_seg, ctxs, preset="musc", image_size=SIZE, sigma=4.0)
    assert s[0].meta["musc"]["smoothing_sigma"] == 4.0
    assert np.abs(s[1].anomaly_map - a[1].anomaly_map).max() > 1e-4
    # the VisA k-list needs 9 images; an explicit musc_k overrides the dataset's list
    with pytest.raises(ConfigError, match="at least 9 images"):
        run_anomaly(tiny_seg, ctxs, preset="musc", image_size=SIZE, dataset="visa")
    v = run_anomaly(
        tiny_seg,
        ctxs,
        preset="musc",
        image_size=SIZE,
        dataset="visa",
        musc_k="1,2",
    )
    assert v[0].meta["musc"]["k"] == [1, 2]


# ---- features on disk ----------------------------------------------------------------------


def test_disk_stack_round_trip_and_errors(tmp_path):
    z = _unit(5, 4, 3, seed=5)
    st = DiskStack(tmp_path / "z.f32", z.shape)
    assert (tmp_path / "z.f32").stat().st_size == z.numel() * 4
    st.write(0, z[:2])
    st.write(2, z[2:].numpy())
    assert torch.equal(st.read(1, 4), z[1:4]) and torch.equal(st.read(0, 99), z)
    with pytest.raises(ValueError, match="do not fit"):
        st.write(4, z[:2])
    st.remove()
    assert not (tmp_path / "z.f32").exists()


@pytest.mark.parametrize(
    "block_rows, table_bytes, group_bytes",
    [(8, 1 << 30, 1), (8, 1, 1), (12, 1 << 30, 1 << 20), (1000, 1 << 30, 1)],
)
def test_mutual_scores_from_disk_bit_identical(tmp_path, block_rows, table_bytes, group_bytes):
    """Blocks read from a file (one block per group: every column block re-read) give the same
    bits as the in-memory tensor, in every slicing."""
    z = _unit(9, 4, 6, seed=6)
    st = DiskStack(tmp_path / "z.f32", z.shape)
    st.write(0, z)
    kw = dict(block_rows=block_rows, table_bytes=table_bytes)
    want = mutual_scores(z, 0.3, **kw)
    got = mutual_scores(st, 0.3, group_bytes=group_bytes, **kw)
    assert torch.equal(got, want)
    d_mem = nearest_distance_table(z, range(2, 6), block_rows=block_rows)
    d_disk = nearest_distance_table(st, range(2, 6), block_rows=block_rows, group_bytes=1)
    assert torch.equal(d_disk, d_mem)
    st.write(0, 2 * z[:1])
    with pytest.raises(ValueError, match="L2-normalised"):
        mutual_scores(st, 0.3, group_bytes=group_bytes)


def test_patch_scores_spilled_to_disk_bit_identical_and_cleaned(tmp_path):
    g = torch.Generator().manual_seed(8)
    grid = (3, 4)
    toks = [torch.randn(7, 12, 5, generator=g) * 2 + 1 for _ in range(2)]
    want_patch, want_per = musc_patch_scores(toks, grid, (1, 3), keep_per_layer=True)
    got_patch, got_per = musc_patch_scores(
        toks, grid, (1, 3), keep_per_layer=True, spill_dir=tmp_path, block_rows=12
    )
    assert torch.equal(got_patch, want_patch) and torch.equal(got_per, want_per)
    assert list(tmp_path.iterdir()) == []  # the LNAMD files are removed after each (layer, r)
    stacks = []
    for i, t in enumerate(toks):
        st = DiskStack(tmp_path / f"t{i}.f32", t.shape)
        st.write(0, t)
        stacks.append(st)
    assert torch.equal(musc_patch_scores(stacks, grid, (1, 3), block_rows=12), want_patch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t0.f32", "t1.f32"]


def _musc_dirs(root):
    return [p for p in root.iterdir() if p.name.startswith("zsdense-musc-")]


def test_run_musc_on_disk_bit_identical_to_in_memory_and_removes_files(
    tiny_seg, tmp_path, monkeypatch
):
    from zsdense.tasks import musc as musc_mod
    from zsdense.tasks.anomaly import resolve_preset

    imgs = _textured(6, blob_index=2, seed=9)
    cfg = resolve_preset("musc", image_size=SIZE)
    mem_ctxs = tiny_seg.contexts(imgs)
    maps_mem, scores_mem, info_mem = run_musc(tiny_seg, cfg, mem_ctxs, in_memory=True)
    # a small set, left to choose (the default): its tokens stay in RAM, no directory is made
    made = []
    real_tmp = musc_mod.tempfile.TemporaryDirectory
    monkeypatch.setattr(
        musc_mod.tempfile,
        "TemporaryDirectory",
        lambda *a, **k: made.append(1) or real_tmp(*a, **k),
    )
    ram_ctxs = tiny_seg.contexts(imgs)
    maps_ram, scores_ram, info_ram = run_musc(tiny_seg, cfg, ram_ctxs, cache_dir=tmp_path)
    assert made == [] and _musc_dirs(tmp_path) == []
    assert torch.equal(maps_ram, maps_mem) and torch.equal(scores_ram, scores_mem)
    assert info_ram == info_mem
    # the same set over the size limit, and a set told to spill: both go through files
    for limit, flag in ((0, None), (musc_mod.SPILL_BYTES, False)):
        monkeypatch.setattr(musc_mod, "SPILL_BYTES", limit)
        disk_ctxs = tiny_seg.contexts(imgs)
        maps_disk, scores_disk, info_disk = run_musc(
            tiny_seg, cfg, disk_ctxs, cache_dir=tmp_path, in_memory=flag
        )
        assert torch.equal(maps_disk, maps_mem) and torch.equal(scores_disk, scores_mem)
        assert info_disk == info_mem
    assert len(made) == 2
    monkeypatch.setattr(musc_mod, "SPILL_BYTES", 0)

    # the in-memory run kept the tokens in the contexts, the on-disk run did not
    def has_tokens(c):
        return any(isinstance(k, tuple) and k[0] == "musc-feats" for k in c.cache)

    assert all(has_tokens(c) for c in mem_ctxs) and not any(has_tokens(c) for c in disk_ctxs)
    # tokens already cached (some contexts only) are used as they are. Cached up to a batch
    # boundary, the missing images are encoded in the batches the in-memory run used (same
    # shapes): exact. Cached inside a batch, the rest of that batch is encoded as a smaller
    # batch, whose matrix products MKL may sum in another order (thread split by shape): the
    # RsCIN embeddings move in the last bits (measured max |Δ score| 2.3e-10, maps equal, with 3
    # threads on an AVX-512 CPU; 0 with 2)
    bs = int(tiny_seg.config.batch_size)
    assert 0 < bs < len(imgs) - 1
    for cached, exact in ((bs, True), (bs - 1, False)):
        mixed = mem_ctxs[:cached] + tiny_seg.contexts(imgs[cached:])
        maps_mix, scores_mix, _ = run_musc(tiny_seg, cfg, mixed, cache_dir=tmp_path)
        if exact:
            assert torch.equal(maps_mix, maps_mem) and torch.equal(scores_mix, scores_mem)
        else:
            torch.testing.assert_close(maps_mix, maps_mem, rtol=0, atol=1e-6)
            torch.testing.assert_close(scores_mix, scores_mem, rtol=0, atol=1e-6)
        assert _musc_dirs(tmp_path) == []  # the token files went with their directory

    # an error while scoring: the token files existed, and are removed all the same
    seen = []

    def failing(*args, **kwargs):
        seen.extend(p.name for d in _musc_dirs(tmp_path) for p in d.iterdir())
        raise RuntimeError("boom")

    monkeypatch.setattr(musc_mod, "musc_patch_scores", failing)
    with pytest.raises(RuntimeError, match="boom"):
        run_musc(tiny_seg, cfg, tiny_seg.contexts(imgs), cache_dir=tmp_path)
    assert len(seen) == len(info_mem["layers"]) and all(s.startswith("tokens-") for s in seen)
    assert _musc_dirs(tmp_path) == []


def test_lnamd_sets_layernorm_once_equals_each_r_alone(tmp_path, monkeypatch):
    from zsdense.tasks import musc_scoring as ms

    g = torch.Generator().manual_seed(3)
    grid = (3, 5)
    tok = torch.randn(5, 15, 6, generator=g) * 2 + 0.5
    want = [ms.layer_features(tok, grid, r) for r in (1, 3, 5)]
    calls = []
    real_ln = ms.F.layer_norm
    monkeypatch.setattr(ms.F, "layer_norm", lambda *a, **k: calls.append(1) or real_ln(*a, **k))
    got = ms.lnamd_sets(tok, grid, (1, 3, 5), chunk=2)
    assert len(calls) == 3  # one LayerNorm per chunk of images (5 images, chunks of 2), all r
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    outs = [DiskStack(tmp_path / f"r{r}.f32", tok.shape) for r in (1, 3, 5)]
    assert ms.lnamd_sets(tok, grid, (1, 3, 5), chunk=2, outs=outs) == outs
    assert all(torch.equal(o.read(0, 5), w) for o, w in zip(outs, want))
    with pytest.raises(ValueError, match="2 outputs for 3 values of r"):
        ms.lnamd_sets(tok, grid, (1, 3, 5), outs=outs[:2])
