"""Random weights saved in each official checkpoint format load back exactly through the registry.

Formats: OpenAI's CLIP ``ViT-B-16.pt`` (a TorchScript archive, and the plain state-dict variant),
open_clip's ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``, an HF DINOv2
directory (``config.json`` + ``model.safetensors`` from ``save_pretrained``) and SAM's ``.pth``.
Random files cannot match the published SHA-256, so each test registers its file's own hash;
one test checks that the published hash is enforced.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from zsdense.errors import WeightsError
from zsdense.models.registry import CHECKPOINTS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notes


@pytest.fixture
def wd(tmp_path, monkeypatch) -> Path:
    """An empty weights dir; empty HOME and caches; offline (nothing real is found/downloaded)."""
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME", "ZSDENSE_WEIGHTS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ZSDENSE_OFFLINE", "1")
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


def _trust(monkeypatch, name: str, *paths: Path) -> None:
    """Register the SHA-256 of ``paths`` (matched by file name) for checkpoint ``name``."""
    shas = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}

    def fix(spec):
        if spec.filename not in shas:
            return spec
        return dataclasses.replace(spec, sha256=shas[spec.filename], size=None)

    ck = CHECKPOINTS[name]
    new = dataclasses.replace(
        ck,
        files=tuple(fix(s) for s in ck.files),
        alternates=tuple(fix(s) for s in ck.alternates),
    )
    monkeypatch.setitem(CHECKPOINTS, name, new)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


# ---- CLIP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_sd() -> dict[str, torch.Tensor]:
    """A ViT-B/16-family CLIP (open_clip == OpenAI key layout), shrunk so the test stays fast."""
    from zsdense.models.clip import build_tiny_clip

    sd = build_tiny_clip("ViT-B-16").model.state_dict()
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in sd  # OpenAI's key names
    return {k: v.detach().clone() for k, v in sd.items()}


class _Holder(torch.nn.Module):
    """A module tree that only holds tensors, to write a TorchScript archive like OpenAI's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _save_torchscript(sd: dict[str, torch.Tensor], path: Path) -> None:
    root = _Holder()
    for key, val in sd.items():
        *parents, leaf = key.split(".")
        mod = root
        for part in parents:
            if part not in mod._modules:
                mod.add_module(part, _Holder())
            mod = mod._modules[part]
        if val.is_floating_point():
            mod.register_parameter(leaf, torch.nn.Parameter(val.clone(), requires_grad=False))
        else:
            mod.register_buffer(leaf, val.clone())
    # OpenAI's archives also carry these as attributes of the scripted model's state
    root.register_buffer("input_resolution", torch.tensor(224))
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.mark.parametrize("fmt", ["openai-torchscript", "openai-state-dict"])
def test_clip_openai_pt(wd, monkeypatch, clip_sd, fmt):
    from zsdense.models.clip import load_clip

    f = wd / "ViT-B-16.pt"
    if fmt == "openai-torchscript":
        _save_torchscript(clip_sd, f)
    else:
        torch.save(clip_sd, f)
    _trust(monkeypatch, "clip-ViT-B-16-openai", f)
    clip = load_clip("ViT-B-16", weights_dir=str(wd))
    _assert_same(clip.model.state_dict(), clip_sd)


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_clip_open_clip_formats(wd, monkeypatch, clip_sd, filename):
    from safetensors.torch import save_file

    from zsdense.models.clip import load_clip

    f = wd / "clip-ViT-B-16-openai" / filename  # shared file name: under a per-checkpoint folder
    f.parent.mkdir()
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in clip_sd.items()}, str(f))
    else:
        torch.save(clip_sd, f)
    _trust(monkeypatch, "clip-ViT-B-16-openai", f)
    clip = load_clip("ViT-B-16", weights_dir=str(wd))
    _assert_same(clip.model.state_dict(), clip_sd)


def test_clip_published_hash_is_enforced(wd, clip_sd):
    from zsdense.models.clip import load_clip

    f = wd / "ViT-B-16.pt"
    torch.save(clip_sd, f)
    with pytest.raises(WeightsError, match="SHA-256 mismatch.*5806e77c"):
        load_clip("ViT-B-16", weights_dir=str(wd))
    assert f.exists()


# ---- DINOv2 ----------------------------------------------------------------------------------


def test_dinov2_hf_directory(wd, monkeypatch):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from zsdense.models.dinov2 import load_dinov2

    # the published facebook/dinov2-with-registers-base architecture
    cfg = Dinov2WithRegistersConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        patch_size=14,
        image_size=518,
        num_register_tokens=4,
        layerscale_value=1.0,
    )
    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(cfg).eval()
    folder = wd / "dinov2-reg-base"
    model.save_pretrained(str(folder), safe_serialization=True)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    _trust(monkeypatch, "dinov2-reg-base", folder / "model.safetensors")
    dino = load_dinov2("dinov2-reg-base", weights_dir=str(wd))
    assert isinstance(dino.model, Dinov2WithRegistersModel)
    _assert_same(dino.model.state_dict(), model.state_dict())


# ---- SAM -------------------------------------------------------------------------------------


def test_sam_pth(wd, monkeypatch):
    from segment_anything import sam_model_registry

    from zsdense.models.sam import load_sam

    torch.manual_seed(0)
    sd = sam_model_registry["vit_b"]().state_dict()
    f = wd / "sam_vit_b_01ec64.pth"
    torch.save(sd, f)
    _trust(monkeypatch, "sam-vit_b", f)
    sam = load_sam("vit_b", weights_dir=str(wd))
    _assert_same(sam.model.state_dict(), sd)
