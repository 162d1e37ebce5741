"""The JAFAR upsampler as a library piece: chunked == whole-tensor path, files, registry entries,
refusals, and the backbone features of zsdense's CLIP. No reference fixture needed (random
weights); float32, one thread."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from zsdense.dense.jafar import (
    JAFAR,
    STATE_DICT_KEY,
    JafarConfig,
    Upsampler,
    load_jafar,
    read_jafar_file,
    reference_key_order,
    upsample,
)
from zsdense.errors import ConfigError, WeightsError
from zsdense.train.checkpoint import save_jafar


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_jafar(seed: int = 0, **kw) -> JAFAR:
    """A JAFAR with every parameter perturbed away from its init (norms, biases, RoPE)."""
    g = torch.Generator().manual_seed(seed)
    cfg = JafarConfig(**{"v_dim": 24, "qk_dim": 16, "num_heads": 2, **kw})
    m = JAFAR(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval().requires_grad_(False)


def _inputs(seed, b, hw, grid, v):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 3, *hw, generator=g)
    feats = torch.randn(b, v, *grid, generator=g)
    return img, feats


CASES = [  # (image hw, feature grid, output hw)
    ((28, 42), (2, 3), (36, 50)),  # beyond the image
    ((40, 40), (5, 5), (3, 4)),  # below the feature grid
    ((33, 47), (3, 4), (17, 29)),  # non-square, fractional ratios
]


@pytest.mark.parametrize("kw", [{}, {"v_dim": 16}, {"kernel_size": 3}, {"num_heads": 4}])
def test_chunked_equals_whole_tensor_path(kw):
    m = _random_jafar(**kw)
    for i, (hw, grid, out_hw) in enumerate(CASES):
        img, feats = _inputs(i, 2, hw, grid, m.config.v_dim)
        ref = m.forward_reference(img, feats, out_hw)
        for budget in (None, 1 << 12, 1 << 20):
            m.chunk_bytes = budget
            out = m.forward_chunked(img, feats, out_hw)
            assert out.shape == ref.shape == (2, m.config.v_dim, *out_hw)
            assert float((out - ref).abs().max()) < 1e-5, (kw, hw, budget)


def test_small_budget_really_splits_the_work():
    m = _random_jafar()
    m.chunk_bytes = 1 << 12
    plan = m.chunk_plan((33, 47), (3, 4), (17, 29))
    assert plan["image_rows"] < 33 and plan["output_rows"] < 17 and plan["query_chunk"] < 17 * 29
    m.chunk_bytes = None
    assert m.chunk_plan((33, 47), (3, 4), (17, 29))["output_rows"] == 17


def test_memory_plan_for_large_outputs():
    """From a 32x32 grid to 448² and 1024²: no attention block larger than the budget, and the
    whole attention (what the reference path holds) would be far larger."""
    m = JAFAR(JafarConfig(v_dim=384))
    c, heads = m.config.qk_dim, m.config.num_heads
    for side in (448, 1024):
        plan = m.chunk_plan((448, 448), (32, 32), (side, side))
        scores = plan["query_chunk"] * heads * 32 * 32 * 4
        band = plan["output_rows"] * side * c * 4
        assert scores <= m.chunk_bytes and band <= m.chunk_bytes
        assert heads * side * side * 32 * 32 * 4 > 20 * m.chunk_bytes


def test_packed_layout_when_value_and_key_widths_agree(tmp_path):
    m = _random_jafar(v_dim=16, num_heads=4)  # the released layout implies 4 heads
    keys = list(m.state_dict())
    assert "cross_decode.cross_attn.attention.in_proj_weight" in keys
    assert not any(k.endswith("q_proj_weight") for k in keys)
    p = save_jafar(m, tmp_path / "packed.pth")
    up = load_jafar(p)
    img, feats = _inputs(0, 1, (28, 28), (2, 2), 16)
    assert torch.equal(up(img, feats, (8, 8)), upsample(m, img, feats, (8, 8)))


def test_gradients_flow_in_the_whole_tensor_path():
    m = _random_jafar().requires_grad_(True).train()
    img, feats = _inputs(0, 1, (28, 28), (2, 2), 24)
    out = m(img, feats, (6, 6))  # grad enabled: the whole-tensor path
    out.square().mean().backward()
    dead = {
        "cross_decode.cross_attn.norm_v.weight",
        "cross_decode.cross_attn.attention.v_proj_weight",
        "cross_decode.cross_attn.attention.out_proj.weight",
        "cross_decode.cross_attn.attention.out_proj.bias",
    }
    for n, p in m.named_parameters():
        assert (p.grad is None) == (n in dead), n


# ---- files ---------------------------------------------------------------------------------------


def test_release_layout_roundtrip(tmp_path):
    """Random weights in the released {"jafar": state_dict} layout: what torch.save of the
    authors' module gives, loaded with weights_only=True."""
    m = _random_jafar(v_dim=48, qk_dim=32, num_heads=4)
    p = save_jafar(m, tmp_path / "up.pth")
    raw = torch.load(p, weights_only=True)
    assert list(raw) == [STATE_DICT_KEY]
    assert list(raw["jafar"]) == reference_key_order(m.config)
    assert len(raw["jafar"]) == 65
    # the authors' own way of writing it loads the same
    torch.save({"jafar": m.state_dict()}, tmp_path / "theirs.pth")
    a, b = load_jafar(p), load_jafar(tmp_path / "theirs.pth")
    img, feats = _inputs(1, 1, (42, 28), (3, 2), 48)
    assert torch.equal(a(img, feats, (12, 8)), b(img, feats, (12, 8)))
    assert torch.equal(a(img, feats, (12, 8)), upsample(m, img, feats, (12, 8)))
    # a bare state dict is accepted too
    torch.save(m.state_dict(), tmp_path / "bare.pt")
    assert load_jafar(tmp_path / "bare.pt").module.config == m.config


def test_safetensors_keeps_backbone_and_heads(tmp_path):
    m = _random_jafar(num_heads=4)
    p = save_jafar(m, tmp_path / "up.safetensors", {"backbone": "dinov2:dinov2-small"})
    sd, meta = read_jafar_file(p)
    assert meta["backbone"] == "dinov2:dinov2-small" and meta["num_heads"] == 4
    up = load_jafar(p)
    assert up.module.config == m.config and up.encoder == "dinov2:dinov2-small"


def test_files_that_are_not_upsamplers_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        read_jafar_file(tmp_path / "missing.pth")
    torch.save({"jafar": {"a.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="other.pth: not a JAFAR state dict"):
        load_jafar(tmp_path / "other.pth")
    # a checkpoint holding Python objects (like the reference's training checkpoints)
    torch.save({"jafar": {}, "cfg": argparse.Namespace(lr=2e-4)}, tmp_path / "train.pth")
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_jafar(tmp_path / "train.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        load_jafar(tmp_path / "junk.pth")
    m = _random_jafar()
    sd = dict(m.state_dict())
    sd["sft_key.beta.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save({"jafar": sd}, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match="wrong shapes sft_key.beta.weight"):
        load_jafar(tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match="jafar-dinov2-small"):
        load_jafar("no-such-upsampler")


# ---- registry ------------------------------------------------------------------------------------


def test_registry_entries():
    from zsdense.models.registry import CHECKPOINTS
    from zsdense.models.weights_table import JAFAR as TABLE
    from zsdense.models.weights_table import JAFAR_RELEASE_URL

    names = {r.name for r in TABLE}
    assert {"jafar-dinov2-small", "jafar-dinov2-base", "jafar-dino-b16"} <= names
    assert any("clip" in n for n in names)
    for rel in TABLE:
        ck = CHECKPOINTS[rel.name]
        assert ck.kind == "upsampler" and ck.arch == rel.backbone
        (spec,) = ck.files
        assert spec.url == f"{JAFAR_RELEASE_URL}/{rel.filename}"
        assert rel.filename.startswith(rel.backbone.split(".")[0])
    by = {r.name: r for r in TABLE}
    # the file names decide: the DINO ViT-B/16 one is vit_base_patch16_224.dino.pth
    assert by["jafar-dino-b16"].filename == "vit_base_patch16_224.dino.pth"
    assert by["jafar-dino-b16"].backbone == "vit_base_patch16_224.dino"
    # the CLIP upsampler belongs to an ImageNet-fine-tuned CLIP that zsdense does not load
    clip = next(r for r in TABLE if "clip" in r.name)
    assert clip.backbone.endswith("laion2b_ft_in12k_in1k") and clip.encoder is None
    assert by["jafar-dinov2-small"].encoder == "dinov2-small"
    assert by["jafar-dinov2-base"].feature_dim == 768


def test_registry_lookup_offline_and_weights_dir(tmp_path, monkeypatch):
    from zsdense.models.weights_table import JAFAR as TABLE

    monkeypatch.setenv("ZSDENSE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ZSDENSE_WEIGHTS", raising=False)
    rel = next(r for r in TABLE if r.name == "jafar-dinov2-small")
    with pytest.raises(WeightsError, match="not available"):
        load_jafar(rel.name, weights_dir=tmp_path / "w")
    # a small random upsampler of the right width, where --weights-dir points
    m = _random_jafar(v_dim=rel.feature_dim, num_heads=4)
    save_jafar(m, tmp_path / "w" / rel.name / rel.filename)
    up = load_jafar(rel.name, weights_dir=tmp_path / "w")
    assert up.released and up.backbone == rel.backbone and up.encoder == "dinov2:dinov2-small"
    assert up.module.config == m.config
    # a file of another width under that name is another checkpoint
    save_jafar(_random_jafar(v_dim=48), tmp_path / "w2" / rel.filename)
    with pytest.raises(WeightsError, match="another checkpoint"):
        load_jafar(rel.name, weights_dir=tmp_path / "w2")


def test_encoder_checks():
    from zsdense.models import get_clip, get_dinov2
    from zsdense.models.jafar_backbone import encoder_id

    dino = get_dinov2("dinov2-small", models="tiny")
    clip = get_clip("ViT-B-16", models="tiny")
    m = _random_jafar(v_dim=dino.width)
    up = Upsampler(m, "up.safetensors", encoder_id(dino), encoder_id(dino))
    up.check_encoder(dino)
    with pytest.raises(WeightsError, match=f"up.safetensors.*{dino.width}-channel"):
        Upsampler(_random_jafar(v_dim=clip.width), "up.safetensors").check_encoder(dino)
    # same width, other backbone
    other = dataclasses.replace(dino, name="tiny-dinov2-reg-small")
    with pytest.raises(WeightsError, match="trained on the features of dinov2:tiny-dinov2-small"):
        up.check_encoder(other)
    up.check_encoder(other, allow_other_backbone=True)
    # a released upsampler whose backbone no zsdense encoder computes
    rel = Upsampler(m, "clip.pth", "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k", None, True)
    with pytest.raises(WeightsError, match="no zsdense encoder computes"):
        rel.check_encoder(dino)
    # the width is never waived
    with pytest.raises(WeightsError, match="channel features"):
        Upsampler(_random_jafar(v_dim=8), "x").check_encoder(dino, allow_other_backbone=True)


def test_registry_encoder_ids_match_the_loaded_encoders():
    from zsdense.models import get_clip, get_dinov2
    from zsdense.models.jafar_backbone import encoder_id, registry_encoder_id

    dino = dataclasses.replace(
        get_dinov2("dinov2-small", models="tiny"), name="dinov2-small", is_random=False
    )
    assert encoder_id(dino) == registry_encoder_id("dinov2-small") == "dinov2:dinov2-small"
    clip = dataclasses.replace(
        get_clip("ViT-B-16", models="tiny"),
        arch="ViT-B-16",
        is_random=False,
        weights_name="clip-ViT-B-16-openai",
    )
    assert encoder_id(clip) == registry_encoder_id("clip-ViT-B-16-openai")
    assert "random weights" in encoder_id(get_dinov2("dinov2-small", models="tiny"))


# ---- CLIP features ------------------------------------------------------------------------------


def test_clip_features_are_open_clips_output_tokens():
    """ln_post on every token, class token dropped, before proj; on another grid the position
    embeddings are resized timm's way (bicubic, antialias) -- here checked against open_clip's
    own forward with that embedding swapped in."""
    import copy

    from zsdense.models import get_clip
    from zsdense.models.jafar_backbone import jafar_features, resample_pos_embed

    clip = get_clip("ViT-B-16", models="tiny")
    g, p = clip.native_grid, clip.patch_size
    visual = copy.deepcopy(clip.model.visual)
    visual.output_tokens = True
    torch.manual_seed(0)
    for gh, gw in ((g, g), (g - 3, g + 2), (4, 6)):
        x = torch.randn(2, 3, gh * p, gw * p)
        feats = jafar_features(clip, x)
        assert feats.shape == (2, clip.width, gh, gw)
        pe = clip.model.visual.positional_embedding
        if (gh, gw) != (g, g):
            pe = torch.cat([pe[:1], resample_pos_embed(pe[1:], (g, g), (gh, gw))])
        with torch.no_grad():
            visual.positional_embedding.data = pe.clone()
            _, tokens = visual(x)
        ref = tokens.transpose(1, 2).reshape(2, -1, gh, gw)
        assert float((feats - ref).abs().max()) < 1e-5, (gh, gw)
    with pytest.raises(ConfigError, match="multiples of the patch size"):
        jafar_features(clip, torch.zeros(1, 3, p * 2 + 1, p * 2))


def test_upsample_api_on_encoder_features():
    """What a preset does: encoder features of a normalised image, then JAFAR to the image
    size; bf16 features come back float32."""
    from zsdense.models import get_dinov2
    from zsdense.models.jafar_backbone import jafar_features

    dino = get_dinov2("dinov2-small", models="tiny")
    up = Upsampler(_random_jafar(v_dim=dino.width), "x")
    x = dino.normalize(torch.rand(1, 3, 56, 70))
    lo = jafar_features(dino, x)
    hi = up(x, lo.to(torch.bfloat16), (56, 70))
    assert hi.shape == (1, dino.width, 56, 70) and hi.dtype == torch.float32
    # each output vector is a convex combination of the input vectors: inside their range
    assert bool((hi <= lo.amax(dim=(2, 3))[..., None, None] + 1e-2).all())


def test_values_carry_the_same_attention():
    """``values``: the attention from the features applied to other maps on the same grid; a
    per-pixel linear map commutes with the upsampling."""
    m = _random_jafar()
    img, feats = _inputs(3, 2, (30, 44), (3, 4), 24)
    proj = torch.randn(24, 7, generator=torch.Generator().manual_seed(1))
    vals = torch.einsum("bchw,cd->bdhw", feats, proj)
    hi = upsample(m, img, feats, (15, 22))
    hv = upsample(m, img, feats, (15, 22), values=vals)
    assert hv.shape == (2, 7, 15, 22)
    assert torch.allclose(hv, torch.einsum("bchw,cd->bdhw", hi, proj), atol=1e-5)
    assert torch.equal(upsample(m, img, feats, (15, 22), values=feats), hi)
    with pytest.raises(ConfigError, match="feature grid"):
        upsample(m, img, feats, (15, 22), values=vals[..., :2])
