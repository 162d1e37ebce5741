"""Text side of anomaly segmentation: prompt ensembles and Crane's learned-prompt checkpoints."""

from __future__ import annotations

import pytest
import torch

from zsdense.errors import ConfigError, WeightsError
from zsdense.text.anomaly_prompts import (
    check_text_tower,
    ensemble_prompts,
    ensemble_text_features,
    learned_prompts_from_state_dict,
    learned_text_features,
    load_ensembles,
    load_learned_prompts,
)

CKPTS = ("trained_on_visa_crane_epoch_5.pth", "trained_on_mvtec_cranep_epoch_5.pth")


@pytest.fixture(scope="module")
def crane_data(shared_dir):
    d = shared_dir / "data" / "crane"
    if not all((d / c).is_file() for c in CKPTS):
        pytest.skip(f"Crane checkpoints not found under {d}")
    return d


@pytest.fixture(scope="module")
def l14_text_clip():
    """ViT-L-14-336's real text tower (width 768, 12 blocks) with random weights; the vision
    tower is shrunk to keep the test fast (it is not used)."""
    import open_clip

    from zsdense.models.clip import ClipModel

    cfg = open_clip.get_model_config("ViT-L-14-336")
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = open_clip.CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=dict(layers=1, width=64, patch_size=14, image_size=28, head_width=64),
            text_cfg=cfg["text_cfg"],
            quick_gelu=True,
        )
    finally:
        torch.random.set_rng_state(state)
    model = model.float().eval().requires_grad_(False)
    return ClipModel(model=model, arch="ViT-L-14-336-text-random", is_random=True)


def test_ensemble_file_and_prompts():
    table = load_ensembles()
    assert {"april-gan", "winclip"} <= set(table)
    normal, abnormal = ensemble_prompts("metal nut", "april-gan")
    assert len(normal) == 7 * 35 and len(abnormal) == 5 * 35
    assert "a bad photo of a flawless metal nut." in normal
    assert "a bad photo of a damaged metal nut." in abnormal
    n2, _ = ensemble_prompts(None)
    assert "a photo of the object." in n2
    with pytest.raises(ConfigError, match="ensemble"):
        ensemble_prompts("x", "nope")


def test_ensemble_text_features_tiny():
    from zsdense.models.clip import build_tiny_clip

    clip = build_tiny_clip("ViT-B-16")
    t = ensemble_text_features(clip, "screw")
    assert t.shape == (2, clip.embed_dim)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    # = normalised mean of normalised prompt embeddings
    normal, _ = ensemble_prompts("screw")
    ref = torch.nn.functional.normalize(clip.encode_text(normal).mean(0), dim=-1)
    assert torch.allclose(t[0], ref, atol=1e-6)


@pytest.mark.parametrize("name", CKPTS)
def test_real_checkpoints_load_and_give_text_vectors(crane_data, l14_text_clip, name):
    lp = load_learned_prompts(crane_data / name)
    assert lp.prompts.shape == (2, 77, 768)
    assert len(lp.deep) == 8 and all(d.shape == (4, 768) for d in lp.deep)
    assert lp.num_learned == 43_008
    assert lp.eot.tolist() == [15, 16]  # "X*12 object." / "X*12 damaged object."
    t = learned_text_features(l14_text_clip, lp)
    assert t.shape == (2, 768)
    assert torch.isfinite(t).all()
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (t[0] - t[1]).abs().max() > 1e-3  # normal != abnormal
    # deep prompts are really inserted (the fp16 rounding changes the numbers slightly)
    no_round = learned_text_features(l14_text_clip, lp, deep_fp16=False)
    assert 0 < (no_round - t).abs().max() < 1e-2


def test_wrong_shape_checkpoint_is_weights_error(crane_data, l14_text_clip):
    from zsdense.models.registry import load_state_dict_file

    sd = dict(load_state_dict_file(crane_data / CKPTS[0]))
    bad = dict(sd, ctx_pos=torch.zeros(1, 1, 12, 512))
    with pytest.raises(WeightsError, match="width"):
        learned_prompts_from_state_dict(bad, "bad.pth")
    bad = dict(sd, **{"compound_prompts_text.3": torch.zeros(4, 100)})
    with pytest.raises(WeightsError, match="compound_prompts_text.3"):
        learned_prompts_from_state_dict(bad, "bad.pth")
    bad = {k: v for k, v in sd.items() if k != "ctx_neg"}
    with pytest.raises(WeightsError, match="ctx_neg"):
        learned_prompts_from_state_dict(bad, "bad.pth")
    bad = dict(sd, token_suffix_pos=sd["token_suffix_pos"][:, :, :10])
    with pytest.raises(WeightsError, match="length"):
        learned_prompts_from_state_dict(bad, "bad.pth")


def test_checkpoint_on_a_narrow_text_tower_is_config_error(crane_data):
    from zsdense.models.clip import build_tiny_clip

    lp = load_learned_prompts(crane_data / CKPTS[0])
    with pytest.raises(ConfigError, match="ensemble"):
        check_text_tower(build_tiny_clip("ViT-L-14-336"), lp)


def test_pickle_checkpoint_is_refused(tmp_path):
    import pickle

    p = tmp_path / "evil.pth"

    with open(p, "wb") as f:  # a pickled non-tensor object (collections.Counter)
        pickle.dump({"prompt_learner": __import__("collections").Counter(a=1)}, f)
    with pytest.raises(WeightsError):
        load_learned_prompts(p)


def test_user_ensemble_json_file(tmp_path):
    import json

    from zsdense.text.anomaly_prompts import load_ensemble_file

    p = tmp_path / "mine.json"
    p.write_text(
        json.dumps(
            {
                "normal_states": ["good {}"],
                "abnormal_states": ["cracked {}"],
                "templates": ["a photo of a {}.", "{}"],
            }
        )
    )
    normal, abnormal = ensemble_prompts("tile", str(p))
    assert normal == ["a photo of a good tile.", "good tile"]
    assert abnormal == ["a photo of a cracked tile.", "cracked tile"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"normal_states": []}))
    with pytest.raises(ConfigError, match="ensemble file"):
        load_ensemble_file(bad)


def test_learned_prompts_through_registry_and_protocol(crane_data, l14_text_clip):
    """The preset picks the papers' checkpoint (VisA-trained on MVTec data), the registry finds
    it in the weights dir (SHA-256 checked), and the text vectors are cached per Segmenter."""
    from zsdense.api import Segmenter
    from zsdense.tasks.anomaly import choose_checkpoint, resolve_preset, text_features

    cfg = resolve_preset("crane")
    assert choose_checkpoint(cfg, "industrial", "mvtec") == "crane-visa"
    assert choose_checkpoint(cfg, "industrial", "visa") == "crane-mvtec"
    cp = resolve_preset("crane+")
    assert choose_checkpoint(cp, "industrial", None) == "crane+-mvtec"
    assert choose_checkpoint(cp, "medical", None) == "crane+-mvtec-epoch1"
    seg = Segmenter(device="cpu", models="tiny", weights_dir=str(crane_data), download=False)
    t, meta = text_features(seg, l14_text_clip, cfg, "screw", dataset="mvtec")
    assert meta["prompts"] == "learned" and meta["prompt_checkpoint"] == "crane-visa"
    ref = learned_text_features(l14_text_clip, load_learned_prompts(crane_data / CKPTS[0]))
    assert torch.allclose(t, ref, atol=1e-6)
    t2, _ = text_features(seg, l14_text_clip, cfg, "screw", dataset="mvtec")
    assert t2 is t  # cached
