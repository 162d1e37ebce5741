"""Training a JAFAR upsampler on the tiny models: learning (held-out loss below bilinear's),
resume bit for bit, refused settings, exports, and the ``train-upsampler`` command.

Float32 pinned; small images (56 px, 4×4 target grid), a 28² regulariser and qk_dim 32 keep
every run to seconds. The step itself is checked against the reference in
``test_jafar_fixtures.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsdense.errors import ConfigError, InputError, WeightsError

FAST = dict(img_size=56, uhr_size=28, qk_dim=32, batch_size=2, val_images=6)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """24 unlabelled 96×96 PNGs: flat background and overlapping coloured rectangles."""
    root = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    for i in range(24):
        im = np.zeros((96, 96, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, 80, 2)
            h, w = rng.integers(16, 60, 2)
            im[y : y + h, x : x + w] = rng.integers(0, 255, 3)
        Image.fromarray(im).save(root / f"{i:02d}.png")
    (root / "notes.txt").write_text("not an image")  # skipped by the listing
    return root


def _runtime(precision="fp32"):
    from zsdense.runtime import Runtime

    return Runtime(device="cpu", models="tiny", precision=precision)


def _trainer(data, out, backbone="dinov2-small", resume=False, options=None, runtime=None, **kw):
    from zsdense.train.jafar import JafarRecipe, UpsamplerOptions, UpsamplerTrainer

    recipe = JafarRecipe(**{**FAST, **kw})
    opts = options or UpsamplerOptions(save_every=2, val_every=2)
    rt = runtime or _runtime()
    return UpsamplerTrainer([data], out, backbone, recipe, opts, resume=resume, runtime=rt)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_short_run_beats_bilinear_on_held_out_images(images, tmp_path):
    """30 steps on the tiny DINOv2: JAFAR's held-out loss goes from above bilinear upsampling's
    (random init) to below it."""
    from zsdense.train.jafar import UpsamplerOptions

    opts = UpsamplerOptions(save_every=1000, val_every=1000)
    tr = _trainer(images, tmp_path / "run", options=opts, steps=30, lr=1e-3)
    assert len(tr.val_items) == FAST["val_images"] and len(tr.train_items) == 24 - 6
    hist = tr.run()
    first, last = hist[0]["val"], hist[-1]["val"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 30
    assert first["bilinear"] == last["bilinear"]  # fixed held-out draws
    assert first["jafar"] > first["bilinear"]
    assert last["jafar"] < last["bilinear"], last
    assert last["ratio"] < first["ratio"]
    log = [json.loads(x) for x in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 30]


def test_interrupted_run_resumes_bit_for_bit(images, tmp_path):
    full = _trainer(images, tmp_path / "full", steps=4)
    full.run()
    cut = _trainer(images, tmp_path / "cut", steps=4)
    cut.run(stop_after=1)  # stopped after step 1: that step is saved
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["train_images"] == 18
    resumed = _trainer(images, tmp_path / "cut", steps=4, resume=True)
    assert resumed.step == 1
    resumed.run()
    for name in ("state.safetensors", "upsampler.safetensors"):
        a, b = _tensors(tmp_path / "full" / name), _tensors(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    la = (tmp_path / "full" / "train.jsonl").read_text()
    lb = (tmp_path / "cut" / "train.jsonl").read_text()
    assert la == lb
    # a stop request between steps (Ctrl-C in the command) saves the last completed step
    flags = iter([False, True])
    stopped = _trainer(images, tmp_path / "stop", steps=4)
    stopped.run(should_stop=lambda: next(flags))
    assert _trainer(images, tmp_path / "stop", steps=4, resume=True).step == 1


def test_resume_refuses_changed_settings(images, tmp_path):
    _trainer(images, tmp_path / "run", steps=2).run()
    with pytest.raises(ConfigError, match="lr"):
        _trainer(images, tmp_path / "run", steps=4, resume=True, lr=1e-2)
    with pytest.raises(ConfigError, match="backbone"):
        _trainer(images, tmp_path / "run", steps=4, resume=True, backbone="dinov2-base")
    with pytest.raises(ConfigError, match="--resume"):
        _trainer(images, tmp_path / "run", steps=4)
    with pytest.raises(ConfigError, match="nothing to resume"):
        _trainer(images, tmp_path / "none", steps=4, resume=True)
    # more steps is not another setting
    assert _trainer(images, tmp_path / "run", steps=3, resume=True).step == 2


def test_data_errors(tmp_path, images):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no supported image files"):
        _trainer(tmp_path / "empty", tmp_path / "run", steps=1)
    with pytest.raises(ConfigError, match="at least 7"):
        one = tmp_path / "one"
        one.mkdir()
        (one / "a.png").write_bytes((images / "00.png").read_bytes())
        _trainer(one, tmp_path / "run", steps=1)
    with pytest.raises(ConfigError, match="not a DINOv2 or CLIP"):
        _trainer(images, tmp_path / "run", backbone="sam-vit_b", steps=1)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        _trainer(images, tmp_path / "run", steps=1, img_size=50)


def test_exports_load_back_for_their_encoder_only(images, tmp_path):
    from zsdense.dense.jafar import load_jafar, reference_key_order
    from zsdense.models import get_clip

    tr = _trainer(images, tmp_path / "run", steps=1)
    tr.run()
    pth = tr.export(tmp_path / "up.pth")
    raw = torch.load(pth, weights_only=True)
    assert list(raw) == ["jafar"]
    assert list(raw["jafar"]) == reference_key_order(tr.model.config)
    assert len(raw["jafar"]) == 65
    for k, v in tr.model.state_dict().items():
        assert torch.equal(raw["jafar"][k], v), k
    own = load_jafar(tmp_path / "run" / "upsampler.safetensors", encoder=tr.encoder)
    assert own.encoder == tr.backbone_id and own.module.config == tr.model.config
    with pytest.raises(WeightsError, match="channel features"):
        load_jafar(
            tmp_path / "run" / "upsampler.safetensors", encoder=get_clip("ViT-B-16", models="tiny")
        )
    # the released layout carries no backbone: only the width is checked
    assert load_jafar(pth, encoder=tr.encoder).backbone is None


def test_clip_backbone_trains(images, tmp_path):
    tr = _trainer(images, tmp_path / "clip", backbone="ViT-B-16", steps=2, img_size=64, uhr_size=32)
    assert tr.backbone_id.startswith("clip:") and tr.patch == 16
    hist = tr.run()
    assert hist[-1]["step"] == 2 and np.isfinite(hist[-1]["loss"]["total"])


def test_bf16_autocast_step_runs(images, tmp_path):
    from zsdense.train.jafar import UpsamplerOptions

    opts = UpsamplerOptions(save_every=10, val_every=10)
    tr = _trainer(images, tmp_path / "bf16", options=opts, runtime=_runtime("bf16"), steps=1)
    assert tr.precision == "bf16" and tr.settings["precision"] == "bf16"
    hist = tr.run()
    assert np.isfinite(hist[-1]["loss"]["total"])
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())


def _cli(args):
    from click.testing import CliRunner

    from zsdense.cli.main import cli

    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _cli_args(images, out, steps):
    return [
        "train-upsampler", str(images), "--backbone", "dinov2-small", "--out", str(out),
        "--steps", str(steps), "--img-size", "56", "--uhr-size", "28", "--qk-dim", "32",
        "--val-images", "6", "--batch-size", "2", "--save-every", "2", "--val-every", "2",
        "--models", "tiny", "--precision", "fp32", "--device", "cpu", "-q",
    ]  # fmt: skip


def test_cli_resume_after_a_shorter_run_and_export(images, tmp_path):
    r = _cli(_cli_args(images, tmp_path / "a", 4) + ["--export", str(tmp_path / "a.pth")])
    assert r.exit_code == 0, r.output
    assert "held-out loss JAFAR" in r.output and (tmp_path / "a.pth").is_file()
    r = _cli(_cli_args(images, tmp_path / "b", 2))
    assert r.exit_code == 0, r.output
    r = _cli(_cli_args(images, tmp_path / "b", 4) + ["--resume"])
    assert r.exit_code == 0, r.output
    a = _tensors(tmp_path / "a" / "upsampler.safetensors")
    b = _tensors(tmp_path / "b" / "upsampler.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw = torch.load(tmp_path / "a.pth", weights_only=True)
    assert all(torch.equal(raw["jafar"][k], a[k]) for k in a)
    # the same folder without --resume is refused with a clear message
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(_cli_args(images, tmp_path / "b", 4))
    assert exc.value.code == 2


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(images, tmp_path):
    """A real kill -9 of `zsdense train-upsampler` once a state is saved; --resume finishes and
    every tensor equals an uninterrupted run's."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "zsdense.cli.main"]
    full = subprocess.run(
        cmd + _cli_args(images, tmp_path / "full", 6),
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert full.returncode == 0, full.stderr
    killed = tmp_path / "killed"
    # killed from inside right after the first saved state (at step 2 of 6): a kill from the
    # test once it saw the file raced the remaining steps on a fast machine
    kill_after_first_save = (
        "import os, signal, sys\n"
        "from zsdense.train.jafar import UpsamplerTrainer as T\n"
        "from zsdense.cli.main import main\n"
        "saved = T.save\n"
        "def save_then_die(self):\n"
        "    saved(self)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "T.save = save_then_die\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", kill_after_first_save] + _cli_args(images, killed, 6),
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (killed / "state.safetensors").is_file()
    res = subprocess.run(
        cmd + _cli_args(images, killed, 6) + ["--resume"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    a = _tensors(tmp_path / "full" / "state.safetensors")
    b = _tensors(killed / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_longer_run_beats_bilinear_on_the_tiny_clip(images, tmp_path):
    from zsdense.train.jafar import UpsamplerOptions

    opts = UpsamplerOptions(save_every=1000, val_every=1000)
    tr = _trainer(
        images,
        tmp_path / "clip",
        backbone="ViT-B-16",
        options=opts,
        steps=60,
        lr=1e-3,
        img_size=96,
        uhr_size=48,
    )
    hist = tr.run()
    assert hist[-1]["val"]["jafar"] < hist[-1]["val"]["bilinear"], hist[-1]
