"""JAFAR against the authors' own code (../shared/fixtures/jafar, README first).

Every case, size, seed and shape is read from the fixture files; tolerances are the README's
§7: 1e-5 absolute for outputs, intermediates and features, 1e-6 for losses, 1e-3 relative for
gradients, 5e-6 for parameters after a step (the key bias ``in_proj_bias[C:2C]``, driven by
rounding noise, within lr·steps), AdamW moments 1e-6. Float32 throughout.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fixture_files import SCALAR_KERNEL_TOL, scalar_kernels  # tests/helpers
from fixture_files import load_pt as _load

from zsdense.dense.jafar import (
    JAFAR,
    JafarConfig,
    jafar_from_state_dict,
    load_jafar,
    read_jafar_file,
    rope_init,
)
from zsdense.errors import ConfigError

TOL = 1e-5
LOSS_TOL = 1e-6
GRAD_REL = 1e-3
PARAM_TOL = 5e-6
MOMENT_TOL = 1e-6


@pytest.fixture(scope="module")
def fdir(fixtures_dir):
    return fixtures_dir("jafar")


@pytest.fixture(scope="module")
def model_pt(fdir):
    return _load(fdir, "model.pt")


@pytest.fixture(scope="module")
def forward_pt(fdir):
    return _load(fdir, "forward.pt")


@pytest.fixture(scope="module")
def backbone_pt(fdir):
    return _load(fdir, "backbone.pt")


@pytest.fixture(scope="module")
def train_pt(fdir):
    return _load(fdir, "train.pt")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(model_pt) -> JafarConfig:
    kw = model_pt["config"]["jafar_kwargs"]
    return JafarConfig(
        v_dim=kw["v_dim"],
        qk_dim=kw["qk_dim"],
        num_heads=kw["num_heads"],
        kernel_size=kw["kernel_size"],
        input_dim=kw["input_dim"],
    )


@pytest.fixture(scope="module")
def jafar(model_pt):
    model = JAFAR(_config(model_pt))
    model.load_state_dict(model_pt["jafar_state_dict"], strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def dino(model_pt, backbone_pt):
    """The fixture's tiny timm DINOv2 as a transformers Dinov2Model (timm -> HF key map)."""
    from zsdense.models.dinov2 import dinov2_from_hub_state_dict

    sd = dict(model_pt["backbone_state_dict"])
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])  # unused; HF has one
    hf = backbone_pt["hf_dinov2"]["config"]
    return dinov2_from_hub_state_dict(
        sd,
        name="jafar-fixture-dinov2",
        img_size=hf["image_size"],
        patch_size=hf["patch_size"],
        num_heads=hf["num_attention_heads"],
        mlp_ratio=hf["intermediate_size"] / hf["hidden_size"],
        layer_norm_eps=hf["layer_norm_eps"],
        is_random=True,
    )


def _maxdiff(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# ---- the module and its state dict ---------------------------------------------------------------


def test_state_dict_keys_order_and_full_size_layout(model_pt):
    cfg = _config(model_pt)
    sd = JAFAR(cfg).state_dict()
    assert list(sd) == list(model_pt["param_names"]) == list(model_pt["jafar_state_dict"])
    assert not model_pt["buffer_names"]
    for k, v in model_pt["jafar_state_dict"].items():
        assert tuple(sd[k].shape) == tuple(v.shape), k
    # the released layout (qk 128, Cv 384): same keys, same shapes
    v_dim = dict(model_pt["full_size_layout"])["key_features_encoder.0.weight"][1]
    full = JAFAR(JafarConfig(v_dim=v_dim)).state_dict()
    assert [[k, list(v.shape)] for k, v in full.items()] == [
        [k, list(s)] for k, s in model_pt["full_size_layout"]
    ]


def test_rope_init_matches(model_pt):
    qk = model_pt["config"]["jafar_kwargs"]["qk_dim"]
    assert _maxdiff(rope_init(qk), model_pt["rope_freqs_init"]) < 1e-6


def test_release_format_file_loads_strictly(fdir, model_pt):
    path = fdir / "jafar_release_format.pth"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["jafar"] and len(raw["jafar"]) == len(model_pt["param_names"])
    sd, meta = read_jafar_file(path)
    assert meta == {}
    assert all(torch.equal(sd[k], v) for k, v in model_pt["jafar_state_dict"].items())
    up = load_jafar(path)
    assert up.module.config == _config(model_pt)
    assert up.backbone is None and up.encoder is None
    for k, v in up.module.state_dict().items():
        assert torch.equal(v, model_pt["jafar_state_dict"][k]), k
    chk = model_pt["released_checkpoint_check"]
    assert chk["strict_load_ok"] and chk["n_tensors"] == len(model_pt["param_names"])


# ---- the forward ---------------------------------------------------------------------------------


def _cases(forward_pt):
    cases = forward_pt["cases"]
    assert cases, "no forward cases in the fixture"
    return cases


def test_forward_every_case_and_intermediate(forward_pt, jafar):
    """The whole-tensor path: outputs and every stored intermediate of every case."""
    bad = []
    for name, case in _cases(forward_pt).items():
        trace: dict = {}
        with torch.no_grad():
            out = jafar.forward_reference(
                case["image"], case["features"], tuple(case["output_size"]), trace=trace
            )
        assert tuple(out.shape[-2:]) == tuple(case["output_size"]), name
        d = _maxdiff(out, case["output"])
        if d > TOL:
            bad.append(f"{name} output {d:.2e}")
        for key, ref in case.get("intermediates", {}).items():
            assert key in trace, f"{name}: intermediate {key} not computed"
            d = _maxdiff(trace[key], ref)
            if d > TOL:
                bad.append(f"{name} {key} {d:.2e}")
    assert not bad, "; ".join(bad)


def test_chunked_forward_every_case(forward_pt, jafar):
    """The memory-bounded path gives the same outputs, with one chunk and with many."""
    bad = []
    for budget in (None, 1 << 16):
        jafar.chunk_bytes = budget
        try:
            for name, case in _cases(forward_pt).items():
                size = tuple(case["output_size"])
                out = jafar.forward_chunked(case["image"], case["features"], size)
                d = _maxdiff(out, case["output"])
                if d > TOL:
                    bad.append(f"{name} (chunk {budget}) {d:.2e}")
        finally:
            jafar.chunk_bytes = 64 << 20
    assert not bad, "; ".join(bad)
    # forward() without gradients runs the chunked path
    case = next(iter(_cases(forward_pt).values()))
    with torch.no_grad():
        out = jafar(case["image"], case["features"], tuple(case["output_size"]))
    assert _maxdiff(out, case["output"]) < TOL


def test_attention_rows_are_convex_combinations(forward_pt, jafar):
    for name, case in _cases(forward_pt).items():
        attn = case.get("intermediates", {}).get("attn")
        if attn is None:
            continue
        trace: dict = {}
        with torch.no_grad():
            jafar.forward_reference(
                case["image"], case["features"], tuple(case["output_size"]), trace=trace
            )
        rows = trace["attn"].sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5), name


def test_wrong_feature_width_is_refused(forward_pt, jafar):
    case = next(iter(_cases(forward_pt).values()))
    feats = case["features"][:, :-1]
    with pytest.raises(ConfigError, match="channel features"):
        jafar(case["image"], feats, tuple(case["output_size"]))


# ---- the backbone features -----------------------------------------------------------------------


def test_backbone_features_every_size(backbone_pt, dino):
    """DINOv2 features as JAFAR's timm wrapper computes them (antialiased bicubic resize),
    through transformers' Dinov2Model; the model as shipped differs where the grid changes."""
    from zsdense.models.jafar_backbone import jafar_features

    cases = backbone_pt["cases"]
    assert cases
    plain = backbone_pt["hf_dinov2"]["max_abs_diff_plain"]
    for name, case in cases.items():
        feats = jafar_features(dino, case["image"])
        assert tuple(feats.shape[-2:]) == tuple(case["grid"]), name
        assert _maxdiff(feats, case["features"]) < TOL, name
        pos = dino.model.embeddings.position_embeddings
        hub = dataclasses.replace(dino, hub_interpolate_offset=0.0, hub_interpolate_antialias=True)
        assert _maxdiff(hub.hub_pos_embed(tuple(case["grid"])), case["pos_embed_resampled"]) < TOL
        assert pos is dino.model.embeddings.position_embeddings
        shipped = dino.patch_features(case["image"], pos_interp="transformers")
        assert abs(_maxdiff(shipped, case["features"]) - plain[name]["features"]) < 1e-4, name
    # the shared wrapper is untouched
    assert dino.pos_interp == "hub" and dino.hub_interpolate_antialias is False
    assert dino.hub_interpolate_offset != 0.0


def test_backbone_refuses_sides_not_multiple_of_the_patch(backbone_pt, dino):
    from zsdense.models.jafar_backbone import jafar_features

    text = backbone_pt["refused_sizes"]["not_multiple"]
    h, w = (int(v) for v in text.split(":")[0].split("x"))
    with pytest.raises(ConfigError, match="multiples of the patch size"):
        jafar_features(dino, torch.zeros(1, 3, h, w))


# ---- the training step ---------------------------------------------------------------------------


def _recipe(train_pt):
    from zsdense.train.jafar import JafarRecipe

    cfg = train_pt["config"]["resolved"]
    pg = train_pt["config"]["optimizer_param_group"]
    return JafarRecipe(
        img_size=cfg["img_size"],
        batch_size=cfg["train_batch_size"],
        qk_dim=cfg["model"]["qk_dim"],
        num_heads=cfg["model"]["num_heads"],
        kernel_size=cfg["model"]["kernel_size"],
        lr=pg["lr"],
        betas=tuple(pg["betas"]),
        eps=pg["eps"],
        weight_decay=pg["weight_decay"],
        uhr_size=train_pt["steps"][0]["uhr_output_size"][0],
        reg_weight=train_pt["steps"][0]["loss"]["jafar_reg_weight"],
    )


def test_data_transform(train_pt, dino):
    from zsdense.train.jafar import transform_image

    r = _recipe(train_pt)
    src = train_pt["data"]["step0_source_images_uint8"]
    x = torch.stack([transform_image(a.numpy() / 255.0, r.img_size) for a in src])
    assert _maxdiff(dino.normalize(x), train_pt["steps"][0]["image_batch"]) == 0.0


def test_random_draws_from_the_step_seeds(train_pt):
    """Generators seeded like the reference's global RNGs give its draws exactly."""
    from zsdense.train.jafar import draw_step, lr_size

    r = _recipe(train_pt)
    for st in train_pt["steps"]:
        dr = draw_step(
            r,
            st["image_batch"].shape,
            torch.Generator().manual_seed(st["seed"]),
            np.random.RandomState(st["seed"]),
        )
        assert dr.factor == st["downscale_factor"]
        assert (dr.rand_blur, dr.rand_noise) == (st["rand_blur"], st["rand_noise"])
        assert (dr.blur_sigma is not None) == st["blur"] and dr.blur_sigma == st["blur_sigma"]
        assert (dr.noise is not None) == st["noise"]
        if dr.noise is not None:
            # exact with torch's vectorised normal_ (the fixture's); its scalar kernel
            # (ATEN_CPU_CAPABILITY=default) computes Box–Muller in another order
            tol = SCALAR_KERNEL_TOL if scalar_kernels() else 0.0
            assert dr.noise.shape == st["noise_tensor"].shape
            assert _maxdiff(dr.noise, st["noise_tensor"]) <= tol
        patch = train_pt["steps"][0]["image_batch"].shape[-1] // st["hr_feats"].shape[-1]
        assert [lr_size(r.img_size, dr.factor, patch)] * 2 == list(st["lr_image_hw"])


def test_three_optimiser_steps(train_pt, model_pt, dino):
    """train.py's step, chained from the initial weights, replaying the recorded draws."""
    from zsdense.models.jafar_backbone import jafar_features
    from zsdense.train.jafar import StepDraws, make_optimizer, train_step

    r = _recipe(train_pt)
    model = JAFAR(_config(model_pt))
    model.load_state_dict(model_pt["jafar_state_dict"], strict=True)
    model.train()
    opt = make_optimizer(model, r)
    group = opt.param_groups[0]
    ref_group = train_pt["config"]["optimizer_param_group"]
    for k in ("lr", "eps", "weight_decay", "amsgrad", "maximize"):
        assert group[k] == ref_group[k], k
    assert list(group["betas"]) == list(ref_group["betas"])
    names = list(train_pt["config"]["param_names"])
    assert [n for n, _ in model.named_parameters()] == names
    c = model.config.qk_dim
    first = train_pt["steps"][0]
    patch = first["image_batch"].shape[-1] // first["hr_feats"].shape[-1]
    sub = train_pt["config"]["uhr_stride"]
    for i, st in enumerate(train_pt["steps"]):
        draws = StepDraws(
            st["downscale_factor"],
            st["rand_blur"],
            st["rand_noise"],
            st["blur_sigma"],
            st["noise_tensor"],
        )
        out = train_step(
            model,
            opt,
            lambda x: jafar_features(dino, x),
            st["image_batch"].clone(),
            draws,
            r,
            patch_size=patch,
            record=True,
        )
        rec = out["record"]
        assert rec["lr_image_hw"] == list(st["lr_image_hw"]), i
        for key in (
            "low_res_batch",
            "hr_feats",
            "lr_feats",
            "jafar_image",
            "jafar_hr_feats",
            "noised_batch",
            "target_input",
        ):
            assert _maxdiff(rec[key], st[key]) < TOL, (i, key)
        assert _maxdiff(rec["pred_uhr"][..., ::sub, ::sub], st["pred_uhr_sub"]) < TOL
        assert _maxdiff(rec["target_uhr"][..., ::sub, ::sub], st["target_uhr_sub"]) < TOL
        k = st["pred_uhr_corner"].shape[-1]
        assert _maxdiff(rec["pred_uhr"][..., :k, :k], st["pred_uhr_corner"]) < TOL
        assert _maxdiff(rec["target_uhr"][..., :k, :k], st["target_uhr_corner"]) < TOL
        assert _maxdiff(rec["pred_uhr"].mean((-2, -1)), st["pred_uhr_mean_hw"]) < TOL
        assert _maxdiff(rec["target_uhr"].mean((-2, -1)), st["target_uhr_mean_hw"]) < TOL
        for mine, ref in (("hr", "jafar_hr"), ("reg", "jafar_reg_unscaled")):
            for term in ("total", "cosine", "mse"):
                assert abs(out[mine][term] - st["loss"][ref][term]) < LOSS_TOL, (i, ref, term)
        for n, p in model.named_parameters():
            g = st["grads"][n]
            if g is None:
                assert p.grad is None, (i, n)
                assert p not in opt.state, (i, n)
                continue
            rel = _maxdiff(p.grad, g) / max(float(g.abs().max()), 1e-30)
            assert rel < GRAD_REL, (i, n, rel)
            after = st["params_after"][n]
            d = (p.detach() - after).abs()
            if n.endswith("attention.in_proj_bias"):  # the key bias: rounding-noise gradient
                assert float(d[c : 2 * c].max()) < r.lr * (i + 1), (i, n)
                d = torch.cat([d[:c], d[2 * c :]])
            assert float(d.max()) < PARAM_TOL, (i, n, float(d.max()))
            state = opt.state[p]
            ref_state = st["opt_state_after"][n]
            assert float(state["step"]) == float(ref_state["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                dm = (state[key] - ref_state[key]).abs()
                if n.endswith("attention.in_proj_bias") and key == "exp_avg":
                    dm = torch.cat([dm[:c], dm[2 * c :]])
                assert float(dm.max()) < MOMENT_TOL, (i, n, key)
        for n, p in model.named_parameters():  # unused parameters never move
            if st["grads"][n] is None:
                assert torch.equal(p.detach(), model_pt["jafar_state_dict"][n]), n


def test_checkpoint_layout_of_the_reference_trainer(train_pt, model_pt):
    """The released layout is {"jafar": state_dict}; the reference's training checkpoints
    hold more (and need weights_only=False): zsdense writes the former."""
    for info in train_pt["checkpoints"].values():
        assert "jafar" in info["top_level_keys"]
        assert info["jafar_keys_equal_model_pt"]
    assert jafar_from_state_dict(model_pt["jafar_state_dict"]).config == _config(model_pt)
