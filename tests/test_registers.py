"""Test-time registers inside zsdense's own encoder paths (tiny random models, float32 unless
stated): off is bit-identical, on keeps every output's size, each image of a batch is treated as
if alone, bf16 works, and neuron files are refused for another encoder."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from zsdense.dense import crane, lastblock, maskfeatures, musc_backbones
from zsdense.errors import ConfigError
from zsdense.models import registers as R
from zsdense.models import registers_find as RF
from zsdense.models.clip import build_tiny_clip
from zsdense.models.dinov2 import build_dinov2

B = 4


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip("ViT-B-16")


@pytest.fixture(scope="module")
def dino():
    return build_dinov2("dinov2-small", tiny=True)


@pytest.fixture(scope="module")
def dino_reg():
    return build_dinov2("dinov2-reg-small", tiny=True)


def _x(seed: int, size: int) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _neurons(model) -> dict[int, list[int]]:
    a = R._Adapter(model)
    k = a.mlp_dim
    return {0: [1, k // 3, k - 2], a.num_layers - 1: [7, k // 2]}


def clip_paths(clip, x, vfm):
    """Every zsdense path that runs the CLIP blocks, as {name: tensor}."""
    out = {}
    f = crane.crane_features(clip, x, start_block=2)
    out["crane"] = torch.stack(f.maps)
    out["crane_global"] = f.global_embed
    f = crane.crane_features(clip, x, start_block=2, dino_feats_bchw=vfm)
    out["crane+"] = torch.stack(f.maps)
    dp = crane.eattn_dual_path(clip, x, start_block=3, layers=(4, 6), keep_streams=True)
    out["eattn_layers"] = torch.stack(dp.dense_raw)
    out["eattn_streams"] = torch.stack([dp.refined[6], dp.original[5]])
    for v in ("sclip", "clearclip", "naclip"):
        out[v] = lastblock.dense_clip_features(clip, x, v)
    out["proxyclip"] = lastblock.proxy_clip_tokens(clip, x, vfm)
    for act in ("gelu", "quick_gelu"):
        st = musc_backbones.clip_streams(clip, x, [2, 5], act=act)
        out[f"musc_{act}"] = torch.stack([st.patches[2], st.patches[5]])
        out[f"musc_{act}_embed"] = st.image_embed
    g = x.shape[-1] // clip.patch_size
    masks = (torch.arange(g * g).reshape(g, g) % 3 == 0).float().expand(B, g, g)
    for mode in maskfeatures.FUSION_MODES:
        out[f"hybrid_{mode}"] = maskfeatures.hybrid_mask_features(
            clip, x, x.flip(-1), masks, mode=mode, fusion_blocks=2
        )
    out["global"] = clip.encode_image_global(x)
    return out


def dino_paths(dino, x):
    out = {
        "tokens": dino.tokens(x, pos_interp="transformers"),
        "tokens_hub": dino.tokens(x, pos_interp="hub"),
        "patch_features": dino.patch_features(x),
        "features_on_grid": dino.features_on_grid(x.sigmoid(), (3, 3)),
    }
    st = musc_backbones.dinov2_streams(dino, x, [1, 2])
    out["musc_dinov2"] = torch.stack([st.patches[1], st.patches[2]])
    out["musc_dinov2_embed"] = st.image_embed
    return out


@pytest.fixture(scope="module")
def clip_inputs():
    return _x(0, 64), torch.randn(B, 16, 4, 4, generator=torch.Generator().manual_seed(1))


def _all_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---- off is the plain model, bit for bit ------------------------------------------------------


def test_clip_paths_off_and_after_removal_are_bit_identical(clip, clip_inputs):
    x, vfm = clip_inputs
    plain = clip_paths(clip, x, vfm)
    with R.registers_applied(clip, R.RegisterSpec(neurons=_neurons(clip), num_registers=0)):
        _all_equal(plain, clip_paths(clip, x, vfm))
    with R.registers_applied(clip, R.RegisterSpec(neurons=_neurons(clip), num_registers=2)):
        on = clip_paths(clip, x, vfm)
    assert clip._registers is None and clip.extra_tokens == 0
    _all_equal(plain, clip_paths(clip, x, vfm))
    for k, v in plain.items():  # the registers reach every path and change nothing's size
        assert on[k].shape == v.shape, k
        assert not torch.equal(on[k], v), k


@pytest.mark.parametrize("name", ["dinov2-small", "dinov2-reg-small"])
def test_dino_paths_off_and_after_removal_are_bit_identical(name, dino, dino_reg):
    model = dino if name == "dinov2-small" else dino_reg
    x = _x(2, 56)
    plain = dino_paths(model, x)
    with R.registers_applied(model, R.RegisterSpec(neurons=_neurons(model), num_registers=0)):
        _all_equal(plain, dino_paths(model, x))
    for layout in R.LAYOUTS:
        spec = R.RegisterSpec(neurons=_neurons(model), num_registers=2, layout=layout)
        with R.registers_applied(model, spec):
            on = dino_paths(model, x)
        for k, v in plain.items():
            assert on[k].shape == v.shape, (k, layout)
            assert not torch.equal(on[k], v), (k, layout)
    assert model._registers is None
    _all_equal(plain, dino_paths(model, x))


def test_open_clip_forward_gets_the_registers_too(clip):
    """The token hook sits on open_clip's own patch_dropout: its forward sees the registers."""
    x = _x(3, 224)[:2]
    spec = R.RegisterSpec(neurons=_neurons(clip), num_registers=1)
    with R.registers_applied(clip, spec):
        ours = clip.head(clip.run_blocks(clip.embed(x, "native"))[:, 0])
        theirs = clip.model.encode_image(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- batches: each image as if alone -----------------------------------------------------------


def test_clip_batch_equals_single_images(clip, clip_inputs):
    x, vfm = clip_inputs
    spec = R.RegisterSpec(neurons=_neurons(clip), num_registers=2, mode="mean")
    with R.registers_applied(clip, spec):
        batch = crane.crane_features(clip, x, start_block=2, dino_feats_bchw=vfm)
        singles = [
            crane.crane_features(clip, x[i : i + 1], start_block=2, dino_feats_bchw=vfm[i : i + 1])
            for i in range(B)
        ]
        sclip = lastblock.dense_clip_features(clip, x, "sclip")
        sclip1 = [lastblock.dense_clip_features(clip, x[i : i + 1], "sclip") for i in range(B)]
    for i in range(B):
        for m_b, m_1 in zip(batch.maps, singles[i].maps):
            torch.testing.assert_close(m_b[i : i + 1], m_1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sclip[i : i + 1], sclip1[i], atol=1e-5, rtol=1e-5)
    # the reference's behaviour: only image 0 edited, the others differ from their own runs
    ref = R.RegisterSpec(neurons=_neurons(clip), num_registers=2, mode="mean", batch="reference")
    with R.registers_applied(clip, ref):
        rb = crane.crane_features(clip, x, start_block=2, dino_feats_bchw=vfm)
    torch.testing.assert_close(rb.maps[1][:1], batch.maps[1][:1], atol=1e-5, rtol=1e-5)
    assert (rb.maps[1][1:] - batch.maps[1][1:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["dinov2-small", "dinov2-reg-small"])
def test_dino_batch_equals_single_images(name, dino, dino_reg):
    model = dino if name == "dinov2-small" else dino_reg
    x = _x(4, 56)
    spec = R.RegisterSpec(neurons=_neurons(model), num_registers=3, scale=(1.5, 1.0, -0.5))
    with R.registers_applied(model, spec):
        batch = model.patch_features(x)
        for i in range(B):
            one = model.patch_features(x[i : i + 1])
            torch.testing.assert_close(batch[i : i + 1], one, atol=1e-5, rtol=1e-5)


# ---- the edit inside zsdense's hooks ------------------------------------------------------------


def _columns(model, spec, run):
    """Activation columns of each chosen layer before and after the edit, during ``run()``
    (full sequences only: Crane's last block runs its MLP on the class token alone)."""
    a = R._Adapter(model)
    cols: dict = {}
    hooks = []

    def keep(layer, idx, slot):
        def hook(module, inputs, out):
            if out.shape[1] > 1:
                cols[(layer, slot)] = out[:, :, list(idx)].clone()

        return hook

    for layer, idx in spec.layers:  # registered before the edit: what the edit receives
        hooks.append(a.acts[layer].register_forward_hook(keep(layer, idx, "pre")))
    try:
        with R.registers_applied(model, spec):
            for layer, idx in spec.layers:
                hooks.append(a.acts[layer].register_forward_hook(keep(layer, idx, "post")))
            run()
    finally:
        for h in hooks:
            h.remove()
    return cols


def test_trained_registers_are_kept_and_never_edited(dino_reg):
    """layout='append': [CLS, 4 trained registers, patches, R test-time registers]; the edit
    writes the test-time registers and zeroes the patches only."""
    x = _x(5, 56)
    spec = R.RegisterSpec(neurons=_neurons(dino_reg), num_registers=2)
    cols = _columns(dino_reg, spec, lambda: dino_reg.tokens(x))
    n = dino_reg.num_registers
    for layer, _ in spec.layers:
        pre, post = cols[(layer, "pre")], cols[(layer, "post")]
        assert pre.shape[1] == 1 + n + (56 // 14) ** 2 + 2
        assert torch.equal(pre[:, : 1 + n], post[:, : 1 + n])  # CLS and trained registers
        assert (post[:, 1 + n : -2] == 0).all()
        m = R.sign_max(pre)
        assert torch.equal(post[:, -2:], m[:, None, None].expand(-1, 2, pre.shape[-1]))


def test_reference_layout_reuses_the_trained_registers(dino_reg):
    x = _x(6, 56)
    spec = R.RegisterSpec(neurons=_neurons(dino_reg), num_registers=1, layout="reference")
    cols = _columns(dino_reg, spec, lambda: dino_reg.tokens(x))
    n = dino_reg.num_registers
    for layer, _ in spec.layers:
        pre, post = cols[(layer, "pre")], cols[(layer, "post")]
        assert pre.shape[1] == 1 + (56 // 14) ** 2 + n  # nothing appended
        assert (post[:, 1:-1] == 0).all()  # the 3 other trained registers edited as patches
    with pytest.raises(ConfigError, match="at most 4"):
        R.attach_registers(dino_reg, R.RegisterSpec(num_registers=5, layout="reference"))


def test_musc_foreign_activation_gets_the_edit(clip):
    """MuSc runs OpenAI weights with erf GELU at other sizes, composing the MLP by hand: the
    register edit hooked on the block's own activation module still applies."""
    x = _x(7, 64)
    neurons = _neurons(clip)
    outs = {}
    for key, ns in (("edit", neurons), ("noedit", {})):
        with R.registers_applied(clip, R.RegisterSpec(neurons=ns, num_registers=1)):
            outs[key] = musc_backbones.clip_streams(clip, x, [1], act="gelu").patches[1]
    assert not torch.equal(outs["edit"], outs["noedit"])
    h = torch.randn(2, 9, R._Adapter(clip).mlp_dim)
    assert torch.equal(R.edit_activation(clip.blocks[0].mlp.gelu, h.clone()), h)  # detached
    with R.registers_applied(clip, R.RegisterSpec(neurons=neurons, num_registers=1)):
        e = R.edit_activation(clip.blocks[0].mlp.gelu, h.clone())
    idx = neurons[0]
    assert (e[:, 1:-1, idx] == 0).all() and torch.equal(e[:, 0], h[:, 0])


def test_bf16(clip, dino):
    """bf16 weights: the hooks keep bf16, the register value is the bf16 sign_max, and the maps
    stay close to float32."""
    import copy

    x, vfm = _x(8, 64), torch.randn(B, 16, 4, 4, generator=torch.Generator().manual_seed(9))
    c16 = copy.deepcopy(clip)
    c16.model.to(torch.bfloat16)
    c16._pos_cache.clear()
    spec = R.RegisterSpec(neurons=_neurons(clip), num_registers=2, mode="only_outliers")
    cols = _columns(c16, spec, lambda: c16.run_blocks(c16.embed(x)))
    for layer, _ in spec.layers:
        pre, post = cols[(layer, "pre")], cols[(layer, "post")]
        assert pre.dtype == post.dtype == torch.bfloat16
        m = R.sign_max(pre)
        assert m.dtype == torch.bfloat16
        assert torch.equal(post[:, -2:], m[:, None, None].expand(-1, 2, pre.shape[-1]))
    with R.registers_applied(c16, spec):
        f16 = crane.crane_features(c16, x, start_block=2, dino_feats_bchw=vfm)
    with R.registers_applied(clip, spec):
        f32 = crane.crane_features(clip, x, start_block=2, dino_feats_bchw=vfm)
    for a, b in zip(f16.maps, f32.maps):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert F.cosine_similarity(a.float(), b, dim=-1).min() > 0.95
    d16 = copy.deepcopy(dino)
    d16.model.to(torch.bfloat16)
    spec = R.RegisterSpec(neurons=_neurons(dino), num_registers=1, mode="mean")
    with R.registers_applied(d16, spec):
        p16 = d16.patch_features(_x(10, 56))
    with R.registers_applied(dino, spec):
        p32 = dino.patch_features(_x(10, 56))
    assert p16.dtype == torch.bfloat16 and p16.shape == p32.shape
    assert F.cosine_similarity(p16.float(), p32, dim=1).min() > 0.95


def test_gradients_flow_through_an_edited_activation(clip):
    """Training paths may run the image side with autograd on: the edit must not break it."""
    x = _x(11, 64)[:1].requires_grad_(True)
    with R.registers_applied(clip, R.RegisterSpec(neurons=_neurons(clip), num_registers=1)):
        y = clip.head(clip.run_blocks(clip.embed(x))[:, 0]).sum()
    y.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- neuron sets: files, identity, refusal ------------------------------------------------------


def _set_for(model, neurons=None) -> R.NeuronSet:
    return R.NeuronSet(
        layers=tuple((neurons or _neurons(model)).items()),
        encoder=R.encoder_id(model),
        rules={"register_norm_threshold": 1.0},
        scores=((0, 1, 2.5),),
        provenance="test",
    )


def test_neuron_set_json_roundtrip(clip, tmp_path):
    ns = _set_for(clip)
    p = ns.save(tmp_path / "neurons.json")
    back = R.load_neurons(p, clip)
    assert back == ns and back.neurons == _neurons(clip)
    d = json.loads(p.read_text())
    assert d["encoder"]["name"] == "tiny-ViT-B-16" and d["encoder"]["weights_sha256"] is None
    assert d["encoder"]["random_weights"] is True
    with pytest.raises(AttributeError):
        ns.layers = ()  # frozen
    assert back.fingerprint == ns.fingerprint
    other = _set_for(clip, {0: [1, 2]})
    assert other.fingerprint != ns.fingerprint
    spec = R.RegisterSpec(neurons=ns, num_registers=2, mode="mean")
    rec = spec.record()
    assert rec["fingerprint"] == ns.fingerprint and rec["neurons"] == ns.count
    assert json.loads(json.dumps(rec)) == rec
    assert spec.key == R.RegisterSpec(neurons=back, num_registers=2, mode="mean").key
    assert spec.key != R.RegisterSpec(neurons=ns, num_registers=1, mode="mean").key


def test_neuron_set_for_another_encoder_is_refused(clip, dino, tmp_path):
    p = _set_for(clip).save(tmp_path / "neurons.json")
    with pytest.raises(ConfigError, match="cannot be used with dinov2"):
        R.load_neurons(p, dino)
    with pytest.raises(ConfigError, match="registers find"):
        R.attach_registers(dino, R.RegisterSpec(neurons=_set_for(clip), num_registers=1))
    other = build_tiny_clip("ViT-B-32")
    with pytest.raises(ConfigError, match="another model"):
        R.resolve_neurons(other, str(p))
    ident = R.encoder_id(clip)
    real = R.EncoderId("clip", ident.name, "a" * 64, False, ident.num_layers, ident.mlp_dim)
    assert "random" in ident.mismatch(real)
    assert "SHA-256" in real.mismatch(R.EncoderId(**{**real.__dict__, "weights_sha256": "b" * 64}))
    assert real.mismatch(R.EncoderId(**{**real.__dict__, "weights_sha256": None})) is None


def test_bad_neuron_files_and_specs(clip, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        R.load_neurons(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="not a zsdense register-neuron file"):
        R.load_neurons(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        R.load_neurons(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="outside"):
        _set_for(clip, {clip.num_layers: [0]})
    with pytest.raises(ConfigError, match="outside"):
        R.attach_registers(clip, R.RegisterSpec(neurons={0: [10**6]}))
    with pytest.raises(ConfigError, match="register mode"):
        R.RegisterSpec(mode="max")
    with pytest.raises(ConfigError, match="one value per register"):
        R.RegisterSpec(num_registers=2, scale=(1.0,))
    with pytest.raises(ConfigError, match="batch behaviour"):
        R.RegisterSpec(batch="all")
    with pytest.raises(ConfigError, match=">= 0"):
        R.RegisterSpec(num_registers=-1)
    with R.registers_applied(clip, R.RegisterSpec(neurons={0: [1]})):
        with pytest.raises(ConfigError, match="already attached"):
            R.attach_registers(clip, R.RegisterSpec(neurons={0: [1]}))
    assert clip._registers is None


def test_swiglu_dinov2_is_refused():
    giant = build_dinov2("dinov2-giant", tiny=True)
    with pytest.raises(ConfigError, match="SwiGLU"):
        R.attach_registers(giant, R.RegisterSpec(neurons={0: [1]}))


def test_resolve_and_shipped(clip, dino, tmp_path):
    assert R.resolve_neurons(clip, "off") is None and R.resolve_neurons(clip, None) is None
    assert R.resolve_neurons(clip, "auto") is None  # no CLIP list is shipped
    assert (
        R.resolve_neurons(dino, "auto") is None
    )  # random weights: the DINOv2-L list is not theirs
    ns = _set_for(clip)
    assert R.resolve_neurons(clip, ns) is ns
    assert R.resolve_neurons(clip, ns.save(tmp_path / "n.json")) == ns
    hub = R.DINOV2_L_HUB_NEURONS
    assert hub.encoder.mismatch(hub.encoder) is None
    assert hub.registers["num_registers"] == 1 and hub.registers["mode"] == "zero"


def test_search_runs_streaming_on_a_tiny_model(clip):
    """The search on the tiny CLIP: images in batches, a threshold inside the norm range."""
    imgs = list(_x(12, 64)) + list(_x(13, 64))
    rec = RF.record_activations(clip, torch.stack(imgs))
    thr = float(rec.norms[-1].flatten().quantile(0.9))
    st = RF.SearchSettings(register_norm_threshold=thr, highest_layer=3, top_k=5)
    res = RF.find_register_neurons(clip, iter(imgs), st, batch_size=3)
    assert res.n_seen == len(imgs) and 0 < res.n_used <= len(imgs)
    assert res.neurons.count == 5 and all(layer <= 3 for layer, _, _ in res.selected)
    one = RF.find_register_neurons(clip, imgs, st, batch_size=1)
    assert [o.outliers for o in one.outcomes] == [o.outliers for o in res.outcomes]
    torch.testing.assert_close(one.mean_scores, res.mean_scores, atol=1e-5, rtol=1e-5)
    check = RF.norms_with_registers(
        clip, imgs[:3], R.RegisterSpec(neurons=res.neurons, num_registers=1), st
    )
    assert check.before.size == check.after.size and check.registers.size == 3
