"""The weights registry: entries, resolution order, hash checks, downloads, safe loading."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import pytest
import torch

from zsdense.errors import ConfigError, WeightsError
from zsdense.models import registry
from zsdense.models.registry import CHECKPOINTS

REQUIRED = [
    "clip-ViT-B-16-openai",
    "clip-ViT-L-14-336-openai",
    "dinov2-base",
    "dinov2-reg-base",
    "dinov2-reg-small",
    "dinov2-reg-large",
    "dinov2-giant",
    "dinov2-reg-giant",
    "sam-vit_b",
    "sam-vit_l",
    "sam-vit_h",
    "crane-visa",
    "crane-mvtec",
    "crane+-visa",
    "crane+-mvtec",
    "crane+-mvtec-epoch1",
]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty HOME / caches, no weights dir, offline: nothing real is found or downloaded."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME", "ZSDENSE_WEIGHTS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ZSDENSE_OFFLINE", "1")
    return tmp_path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _with_file(monkeypatch, name: str, **changes) -> registry.Checkpoint:
    """Replace the first file spec of ``name`` (e.g. its sha256) for one test."""
    ck = CHECKPOINTS[name]
    spec = dataclasses.replace(ck.files[0], **changes)
    new = dataclasses.replace(ck, files=(spec, *ck.files[1:]))
    monkeypatch.setitem(CHECKPOINTS, name, new)
    return new


def _save_sd(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


# ---- entries ---------------------------------------------------------------------------------


def test_required_names_and_well_formed_entries():
    for name in REQUIRED:
        assert name in CHECKPOINTS, name
    for name, ck in CHECKPOINTS.items():
        assert ck.name == name
        assert ck.kind in {"clip", "dinov2", "sam", "prompts", "upsampler"}
        assert ck.files and ck.license
        for spec in (*ck.files, *ck.alternates):
            assert spec.url.startswith("https://"), spec
            assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256), spec
    # OpenAI's URLs carry the file's SHA-256 as their folder name.
    for name in ("clip-ViT-B-16-openai", "clip-ViT-L-14-336-openai"):
        openai = [a for a in CHECKPOINTS[name].alternates if "openaipublic" in a.url]
        assert len(openai) == 1 and openai[0].url.split("/")[-2] == openai[0].sha256
    # open_clip 3.x downloads OpenAI weights from these timm hub repos.
    assert CHECKPOINTS["clip-ViT-B-16-openai"].hub_id == "timm/vit_base_patch16_clip_224.openai"
    assert CHECKPOINTS["clip-ViT-L-14-336-openai"].files[0].url == (
        "https://huggingface.co/timm/vit_large_patch14_clip_336.openai/resolve/main/"
        "open_clip_model.safetensors"
    )
    assert [f.filename for f in CHECKPOINTS["dinov2-reg-base"].files] == [
        "config.json",
        "model.safetensors",
    ]
    assert CHECKPOINTS["sam-vit_b"].files[0].url.endswith("/segment_anything/sam_vit_b_01ec64.pth")


DINOV2_SIZES = ("small", "base", "large", "giant")


@pytest.mark.parametrize("size", DINOV2_SIZES)
@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_entries_every_size_with_and_without_registers(size, registers):
    """ViT-S/B/L/G, with and without registers, as HF directories loaded through transformers."""
    from zsdense.models.dinov2 import DINOV2_MODELS

    name = f"dinov2-{'reg-' if registers else ''}{size}"
    repo = f"facebook/dinov2-{'with-registers-' if registers else ''}{size}"
    ck = CHECKPOINTS[name]
    assert (ck.kind, ck.arch, ck.hub_id) == ("dinov2", repo, repo)
    assert [f.filename for f in ck.files] == ["config.json", "model.safetensors"]
    assert [f.url for f in ck.files] == [
        f"https://huggingface.co/{repo}/resolve/main/config.json",
        f"https://huggingface.co/{repo}/resolve/main/model.safetensors",
    ]
    assert ck.description == f"DINOv2 ViT-{size[0].upper()}/14" + (
        " with registers" if registers else ""
    )
    assert DINOV2_MODELS[name] == repo  # the builders read the same table


def test_table_is_data_and_registry_reexports_it():
    """The weights table holds no logic (no os / network / torch imports) and is the object the
    registry serves; ``load_state_dict_file`` lives apart and is re-exported."""
    import ast
    import inspect

    from zsdense.models import weights_load, weights_table

    tree = ast.parse(inspect.getsource(weights_table))
    imported = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert imported <= {"__future__", "dataclasses", "zsdense"}, imported
    assert registry.CHECKPOINTS is weights_table.CHECKPOINTS
    assert registry.get_checkpoint is weights_table.get_checkpoint
    assert registry.load_state_dict_file is weights_load.load_state_dict_file
    assert weights_table.build_checkpoints() == CHECKPOINTS
    n_rows = sum(
        len(t)
        for t in (
            weights_table.OPENAI_CLIP,
            weights_table.DINOV2,
            weights_table.SAM,
            weights_table.CRANE,
            weights_table.JAFAR,
        )
    )
    assert len(CHECKPOINTS) == n_rows


def test_unknown_name_lists_known_ones():
    with pytest.raises(ConfigError, match="known:.*sam-vit_b"):
        registry.get_checkpoint("sam-vit_x")


def test_weights_dirs_order(monkeypatch, tmp_path):
    monkeypatch.setenv("ZSDENSE_WEIGHTS", f"{tmp_path / 'e1'}{os.pathsep}{tmp_path / 'e2'}")
    assert registry.weights_dirs(tmp_path / "x") == [
        tmp_path / "x",
        tmp_path / "e1",
        tmp_path / "e2",
    ]
    monkeypatch.delenv("ZSDENSE_WEIGHTS")
    assert registry.weights_dirs(None) == []


def test_offline_flags(monkeypatch):
    for var in ("ZSDENSE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert not registry.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert registry.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("ZSDENSE_OFFLINE", "true")
    assert registry.is_offline()


# ---- resolution --------------------------------------------------------------------------


def test_resolve_flat_and_per_name_layouts(env, monkeypatch):
    wd = env / "w"
    f = wd / "sam_vit_b_01ec64.pth"
    _save_sd(f)
    _with_file(monkeypatch, "sam-vit_b", sha256=_sha(f), size=None)
    assert registry.resolve("sam-vit_b", weights_dir=wd) == f
    f2 = wd / "sam-vit_b" / "sam_vit_b_01ec64.pth"
    f2.parent.mkdir()
    f2.write_bytes(f.read_bytes())
    assert registry.resolve("sam-vit_b", weights_dir=wd) == f2  # <dir>/<name>/ first


def test_weights_dir_beats_caches_and_env_dir_is_used(env, monkeypatch):
    cached = registry.torch_hub_checkpoints() / "sam_vit_b_01ec64.pth"
    _save_sd(cached)
    _with_file(monkeypatch, "sam-vit_b", sha256=None, size=None)
    assert registry.resolve("sam-vit_b") == cached
    mine = env / "w" / "sam_vit_b_01ec64.pth"
    _save_sd(mine, seed=1)
    monkeypatch.setenv("ZSDENSE_WEIGHTS", str(env / "w"))
    assert registry.resolve("sam-vit_b") == mine


def test_hf_cache_layout(env, monkeypatch):
    root = env / "hf" / "hub" / "models--facebook--dinov2-with-registers-base"
    snap = root / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"x")
    assert registry.resolve("dinov2-reg-base") == snap
    # a shared name like config.json is never taken from a flat weights dir
    (env / "w").mkdir()
    (env / "w" / "config.json").write_text("{}")
    (env / "w" / "model.safetensors").write_bytes(b"x")
    assert registry.resolve("dinov2-reg-base", weights_dir=env / "w") == snap


def test_openai_alternate_in_open_clip_cache(env):
    f = Path(os.environ["HOME"]) / ".cache" / "clip" / "ViT-B-16.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"not the real one")
    # found, but its hash is not OpenAI's: an error, and the file is left alone
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        registry.resolve("clip-ViT-B-16-openai")
    assert f.read_bytes() == b"not the real one"


def test_wrong_hash_in_weights_dir_is_an_error_and_file_untouched(env):
    f = env / "w" / "sam_vit_b_01ec64.pth"
    _save_sd(f)
    before = (f.read_bytes(), f.stat().st_mtime_ns)
    with pytest.raises(WeightsError) as ei:
        registry.resolve("sam-vit_b", weights_dir=env / "w", download=True)
    msg = str(ei.value)
    assert str(f) in msg and "sam-vit_b" in msg and "left as it is" in msg
    assert (f.read_bytes(), f.stat().st_mtime_ns) == before


def test_wrong_sha_with_right_size_is_an_error(env, monkeypatch):
    f = env / "w" / "sam_vit_b_01ec64.pth"
    _save_sd(f)
    _with_file(monkeypatch, "sam-vit_b", size=f.stat().st_size)
    with pytest.raises(WeightsError, match="SHA-256 mismatch.*expected ec2df627"):
        registry.resolve("sam-vit_b", weights_dir=env / "w")


def test_missing_offline_names_everything(env):
    wd = env / "w"
    with pytest.raises(WeightsError) as ei:
        registry.resolve("sam-vit_b", weights_dir=wd)
    msg = str(ei.value)
    assert "'sam-vit_b'" in msg and "downloads are off" in msg
    for p in (
        wd / "sam_vit_b_01ec64.pth",
        wd / "sam-vit_b" / "sam_vit_b_01ec64.pth",
        registry.torch_hub_checkpoints() / "sam_vit_b_01ec64.pth",
    ):
        assert str(p) in msg
    assert "zsdense models fetch sam-vit_b" in msg and "--weights-dir" in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    with pytest.raises(WeightsError, match="not allowed"):
        registry.resolve("dinov2-reg-base", download=False)


# ---- downloads (file:// URLs stand in for the network) -----------------------------------------


def test_download_verifies_and_renames(env, monkeypatch):
    src = env / "src" / "x.pth"
    _save_sd(src)
    _with_file(monkeypatch, "crane-visa", url=src.as_uri(), sha256=_sha(src))
    got = registry.resolve("crane-visa", weights_dir=env / "w", download=True, progress=False)
    assert got == env / "w" / "trained_on_visa_crane_epoch_5.pth"
    assert got.read_bytes() == src.read_bytes()
    assert not list((env / "w").glob("*.part"))
    # without a weights dir, non-HF downloads go to TORCH_HOME/hub/checkpoints
    got2 = registry.resolve("crane-visa", download=True, progress=False)
    assert got2 == registry.torch_hub_checkpoints() / "trained_on_visa_crane_epoch_5.pth"


def test_download_with_wrong_hash_leaves_nothing(env, monkeypatch):
    src = env / "src" / "x.pth"
    _save_sd(src)
    _with_file(monkeypatch, "crane-visa", url=src.as_uri(), sha256="0" * 64)
    with pytest.raises(WeightsError, match="does not match the registry.*Nothing was saved"):
        registry.resolve("crane-visa", weights_dir=env / "w", download=True, progress=False)
    assert list((env / "w").iterdir()) == []


def test_download_failure_is_a_clear_error(env, monkeypatch):
    _with_file(monkeypatch, "crane-visa", url=(env / "nope.pth").as_uri())
    with pytest.raises(WeightsError) as ei:
        registry.resolve("crane-visa", weights_dir=env / "w", download=True, progress=False)
    msg = str(ei.value)
    assert "download failed" in msg and "nope.pth" in msg and "Looked in" in msg
    assert list((env / "w").glob("*.part")) == []


# ---- verify ------------------------------------------------------------------------------


def test_verify_statuses(env, monkeypatch):
    wd = env / "w"
    good = wd / "sam_vit_l_0b3195.pth"
    _save_sd(good)
    _with_file(monkeypatch, "sam-vit_l", sha256=_sha(good))
    _save_sd(wd / "sam_vit_h_4b8939.pth")  # wrong size and hash
    snap = wd / "dinov2-reg-small"
    snap.mkdir()
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"x")
    res = {(r.name, r.filename): r for r in registry.verify(weights_dir=wd)}
    assert res[("sam-vit_l", "sam_vit_l_0b3195.pth")].status == "ok"
    assert res[("sam-vit_h", "sam_vit_h_4b8939.pth")].status == "mismatch"
    assert not res[("sam-vit_h", "sam_vit_h_4b8939.pth")].ok
    assert res[("dinov2-reg-small", "model.safetensors")].status == "unknown hash"
    assert res[("sam-vit_b", "sam_vit_b_01ec64.pth")].status == "missing"
    assert res[("sam-vit_b", "sam_vit_b_01ec64.pth")].path is None


def test_sha256_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert registry.sha256_file(f) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# ---- the published Crane files (real format, real hashes) ---------------------------------------


def test_crane_published_files(shared_dir, env):
    crane = shared_dir / "data" / "crane"
    if not crane.is_dir():
        pytest.skip(f"../shared fixtures not found: {crane}")
    for name, fn in (
        ("crane-visa", "trained_on_visa_crane_epoch_5.pth"),
        ("crane+-mvtec", "trained_on_mvtec_cranep_epoch_5.pth"),
    ):
        path = registry.resolve(name, weights_dir=crane)
        assert path == crane / fn
        assert [r.status for r in registry.verify(name, weights_dir=crane)] == ["ok"]
        sd = registry.load_state_dict_file(path)  # unwraps {"prompt_learner": {...}}
        assert sd["ctx_pos"].shape == (1, 1, 12, 768)
        assert sd["tokenized_prompts_neg"].shape == (1, 1, 77)
        assert len([k for k in sd if k.startswith("compound_prompts_text.")]) == 8


# ---- load_state_dict_file --------------------------------------------------------------------


class _NotATensor:
    pass


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_load_formats(tmp_path):
    from safetensors.torch import save_file

    sd = _save_sd(tmp_path / "plain.pth")
    got = registry.load_state_dict_file(tmp_path / "plain.pth")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        tmp_path / "wrapped.pt",
    )
    got = registry.load_state_dict_file(tmp_path / "wrapped.pt")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    save_file(sd, str(tmp_path / "m.safetensors"))
    got = registry.load_state_dict_file(tmp_path / "m.safetensors")
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    # TorchScript archive (the format of OpenAI's original CLIP .pt files)
    lin = torch.nn.Linear(4, 3)
    torch.jit.save(torch.jit.script(lin), str(tmp_path / "jit.pt"))
    got = registry.load_state_dict_file(tmp_path / "jit.pt")
    assert set(got) == {"weight", "bias"} and torch.equal(got["weight"], lin.weight.detach())


def test_load_refuses_pickled_objects_and_junk(tmp_path):
    torch.save({"w": torch.zeros(2), "obj": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="evil.pth.*weights_only"):
        registry.load_state_dict_file(tmp_path / "evil.pth")
    torch.save({"w": torch.zeros(2), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match="mixed.pth.*not a plain dict of tensors"):
        registry.load_state_dict_file(tmp_path / "mixed.pth")
    (tmp_path / "junk.pth").write_bytes(os.urandom(100))
    with pytest.raises(WeightsError, match="junk.pth.*corrupt"):
        registry.load_state_dict_file(tmp_path / "junk.pth")
    good = tmp_path / "m.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(100)}, str(good))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-50])
    with pytest.raises(WeightsError, match="cut.safetensors.*corrupt"):
        registry.load_state_dict_file(tmp_path / "cut.safetensors")
    _save_sd(tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:-200])
    with pytest.raises(WeightsError, match="cut.pth"):
        registry.load_state_dict_file(tmp_path / "cut.pth")


def test_hash_remembered_across_processes_until_the_file_changes(env, monkeypatch):
    import json

    monkeypatch.setattr(registry, "_HASH_DB_MIN_BYTES", 0)
    monkeypatch.setattr(registry, "_HASH_CACHE", {})
    f = env / "big.bin"
    f.write_bytes(b"abc")
    real = registry.sha256_file(f)
    db_path = Path(os.environ["HOME"]) / ".cache" / "zsdense" / "sha256.json"
    db = json.loads(db_path.read_text())
    assert db[str(f.resolve())][2] == real
    # a new process (empty in-memory cache) trusts the remembered entry...
    db[str(f.resolve())][2] = "f" * 64
    db_path.write_text(json.dumps(db))
    monkeypatch.setattr(registry, "_HASH_CACHE", {})
    assert registry.sha256_file(f) == "f" * 64
    # ...but not once the file was rewritten
    f.write_bytes(b"abd")
    os.utime(f, ns=(1, 1))
    monkeypatch.setattr(registry, "_HASH_CACHE", {})
    assert registry.sha256_file(f) == hashlib.sha256(b"abd").hexdigest()
