"""Prompt training end to end on the tiny models: data order and checks, feature caching,
gradient accumulation, resume bit for bit, checkpoints (safetensors, published layout, the
anomaly command) and the base-model check."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsdense.errors import ConfigError, InputError, ZsdenseError
from zsdense.runtime import Runtime
from zsdense.train.data import epoch_order, load_masks, read_training_set
from zsdense.train.loop import PromptTrainer, TrainOptions
from zsdense.train.recipe import get_recipe
from zsdense.train.step import forward_losses

SIZE = 70  # 5x5 patches of 14: small and fast


def make_set(root: Path, n_good: int = 3, n_bad: int = 3, seed: int = 0, hw=(60, 80)) -> Path:
    """A folder-layout set: good/, crack/ and masks/ (rectangles painted red)."""
    rng = np.random.default_rng(seed)
    for sub in ("good", "crack", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    h, w = hw
    for i in range(n_good):
        a = (rng.random((h, w, 3)) * 80 + 80).astype(np.uint8)
        Image.fromarray(a).save(root / "good" / f"g{i}.png")
    for i in range(n_bad):
        a = (rng.random((h, w, 3)) * 80 + 80).astype(np.uint8)
        m = np.zeros((h, w), np.uint8)
        m[10 + 5 * i : 30 + 5 * i, 20:50] = 255
        a[m > 0] = [200, 30, 30]
        Image.fromarray(a).save(root / "crack" / f"c{i}.png")
        Image.fromarray(m).save(root / "masks" / f"c{i}.png")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_set(tmp_path_factory.mktemp("train") / "data")


def recipe(**kw):
    base = dict(image_size=SIZE, epochs=3, batch_size=4)
    base.update(kw)
    return get_recipe(kw.pop("name", "crane"), **{k: v for k, v in base.items() if k != "name"})


def trainer(data, out, *, resume=False, opts=None, **kw) -> PromptTrainer:
    o = TrainOptions(**(opts or {}))
    rt = Runtime(models="tiny", device="cpu", precision="fp32")
    return PromptTrainer([data], out, recipe(**kw), o, resume=resume, runtime=rt)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- data ----------------------------------------------------------------------------------


def test_epoch_order_is_the_dataloaders():
    from torch.utils.data import DataLoader

    n = 11
    g = torch.Generator().manual_seed(111)
    dl = DataLoader(list(range(n)), batch_size=4, shuffle=True, generator=g)
    ours = torch.Generator().manual_seed(111)
    for _ in range(3):
        ref = [i for b in dl for i in b.tolist()]
        assert epoch_order(ours, n) == ref
    assert torch.equal(g.get_state(), ours.get_state())


def test_mask_transform_bilinear_then_half(tmp_path):
    m = np.zeros((40, 40), np.uint8)
    m[10:21, 10:21] = 1  # any nonzero value counts
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "good" / "a.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "bad" / "b.png")
    Image.fromarray(m).save(tmp_path / "masks" / "b.png")
    items = read_training_set([tmp_path])
    got = load_masks(items, 28)
    ref = Image.fromarray(m * 255).resize((28, 28), Image.BILINEAR)
    ref = (np.asarray(ref, np.float32) / 255 > 0.5).astype(np.float32)
    by_label = {it.label: i for i, it in enumerate(items)}
    assert np.array_equal(got[by_label[1]].numpy(), ref)
    assert got[by_label[0]].sum() == 0 and ref.sum() > 0


def test_bad_input_is_refused_before_any_step(tmp_path):
    only_good = tmp_path / "only_good"
    make_set(only_good, n_bad=0)
    with pytest.raises(ConfigError, match="no anomalous image"):
        trainer(only_good, tmp_path / "r1")
    no_mask = make_set(tmp_path / "no_mask")
    (no_mask / "masks" / "c1.png").unlink()
    with pytest.raises(ConfigError, match="have no mask"):
        trainer(no_mask, tmp_path / "r2")
    wrong = make_set(tmp_path / "wrong_size")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(wrong / "masks" / "c0.png")
    with pytest.raises(InputError, match="masks must have their image's size"):
        trainer(wrong, tmp_path / "r3")
    empty = tmp_path / "empty"
    (empty / "good").mkdir(parents=True)
    with pytest.raises(ZsdenseError):
        trainer(empty, tmp_path / "r4")
    for r in ("r1", "r2", "r3", "r4"):
        assert not (tmp_path / r).exists()  # nothing written, no step taken
    with pytest.raises(ConfigError, match="nothing to resume"):
        trainer(make_set(tmp_path / "ok"), tmp_path / "r5", resume=True)


# ---- caching and accumulation --------------------------------------------------------------


def _step1_grads(tr: PromptTrainer) -> tuple[dict, float]:
    tr.precompute()
    order = epoch_order(torch.Generator().manual_seed(tr.recipe.seed), len(tr.items))
    vb, masks, labels = tr.batch(order[: tr.recipe.batch_size])
    tr.learner.zero_grad()
    t = forward_losses(tr.learner, tr.clip, vb, masks, labels, tr.recipe)
    t.total.backward()
    return {n: p.grad.clone() for n, p in tr.learner.named_parameters()}, float(t.total.detach())


def test_feature_cache_gives_the_same_step1_gradients(dataset, tmp_path):
    cached = trainer(dataset, tmp_path / "a", opts={"cache_features": "on"})
    fresh = trainer(dataset, tmp_path / "b", opts={"cache_features": "off"})
    assert cached.use_cache and not fresh.use_cache
    g1, l1 = _step1_grads(cached)
    g2, l2 = _step1_grads(fresh)
    assert cached._cache is not None and cached._cache.computed == len(cached.items)
    assert fresh._cache is None
    assert abs(l1 - l2) < 1e-6
    for n in g1:
        scale = g2[n].abs().max().item()
        assert scale > 0
        assert (g1[n] - g2[n]).abs().max().item() <= 1e-5 * scale, n


def test_crane_plus_batch_mean_is_never_cached(dataset, tmp_path):
    tr = trainer(dataset, tmp_path / "p", name="crane+", dattn_mean="batch")
    assert not tr.use_cache  # auto: off
    with pytest.raises(ConfigError, match="per-image"):
        trainer(
            dataset,
            tmp_path / "q",
            name="crane+",
            dattn_mean="batch",
            opts={"cache_features": "on"},
        )
    tr = trainer(dataset, tmp_path / "r", name="crane+", epochs=1)
    assert tr.use_cache and tr.setup.use_dattn and tr.setup.counts() == [1, 1]
    hist = tr.run()
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"]["total"])


def test_micro_batches_accumulate_the_same_gradients(dataset, tmp_path):
    from zsdense.train.step import train_step

    full = trainer(dataset, tmp_path / "f")
    micro = trainer(dataset, tmp_path / "m", opts={"micro_batch": 1})
    grads = []
    for tr in (full, micro):
        tr.precompute()
        vb, masks, labels = tr.batch([0, 3, 4, 5])
        opt = torch.optim.SGD(tr.learner.parameters(), lr=0.0)  # keep the parameters
        s, _ = train_step(
            tr.learner,
            opt,
            tr.clip,
            vb,
            masks,
            labels,
            tr.recipe,
            micro_batch=tr.options.micro_batch,
        )
        grads.append(({n: p.grad.clone() for n, p in tr.learner.named_parameters()}, s))
    (g1, s1), (g2, s2) = grads
    assert abs(s1["total"] - s2["total"]) < 1e-5
    for n in g1:
        scale = g1[n].abs().max().item()
        rel = 1e-5 if n.startswith("ctx") else 2e-3  # deep grads: per-image fp16 rounding
        assert (g1[n] - g2[n]).abs().max().item() <= rel * scale, n


# ---- resume ----------------------------------------------------------------------------------


def test_stop_after_epoch_1_and_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    full = trainer(dataset, tmp_path / "full")
    h_full = full.run()
    stopped = trainer(dataset, tmp_path / "cut")
    h1 = stopped.run(on_epoch_end=lambda rec: rec["epoch"] < 1)  # "killed" after epoch 1
    assert len(h1) == 1 and not (tmp_path / "cut" / "epoch_2.safetensors").exists()
    resumed = trainer(dataset, tmp_path / "cut", resume=True)
    assert resumed.start_epoch == 1
    h_res = resumed.run()
    assert [h["loss"] for h in h_res] == [h["loss"] for h in h_full]
    for name in ("epoch_3.safetensors", "state.safetensors", "best.safetensors"):
        a, b = _tensors(tmp_path / "full" / name), _tensors(tmp_path / "cut" / name)
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    log = [json.loads(x) for x in (tmp_path / "cut" / "train.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    # a resume with other settings is refused, naming them
    with pytest.raises(ConfigError, match="lr"):
        trainer(dataset, tmp_path / "cut", resume=True, lr=1e-2)
    # and a second run into the same folder without --resume too
    with pytest.raises(ConfigError, match="--resume"):
        trainer(dataset, tmp_path / "cut")


def test_cli_resume_after_a_shorter_run(dataset, tmp_path):
    from click.testing import CliRunner

    from zsdense.cli.main import cli

    common = ["--models", "tiny", "--image-size", str(SIZE), "--batch-size", "4", "-q"]
    run = CliRunner().invoke
    r = run(
        cli,
        ["train-prompts", str(dataset), "--out", str(tmp_path / "a"), "--epochs", "2"] + common,
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    r = run(
        cli,
        ["train-prompts", str(dataset), "--out", str(tmp_path / "b"), "--epochs", "1"] + common,
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    r = run(
        cli,
        ["train-prompts", str(dataset), "--out", str(tmp_path / "b"), "--epochs", "2", "--resume"]
        + common,
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    a, b = (
        _tensors(tmp_path / "a" / "epoch_2.safetensors"),
        _tensors(tmp_path / "b" / "epoch_2.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_anomaly_command_and_published_layout(dataset, tmp_path):
    from click.testing import CliRunner

    from zsdense.cli.main import cli
    from zsdense.text.anomaly_prompts import learned_text_features, load_learned_prompts
    from zsdense.train.checkpoint import export_published, load_prompts

    out = tmp_path / "run"
    tr = trainer(dataset, out, epochs=2, opts={"val": (str(dataset),)})
    hist = tr.run()
    assert {"image_auroc", "pixel_auroc"} <= set(hist[-1]["val"])
    best = out / "best.safetensors"
    sd, meta = load_prompts(best)
    assert meta["base_model"]["id"] == tr.clip.base_model_id
    assert meta["epoch"] == hist[-1]["best_epoch"]
    assert meta["recipe"]["name"] == "crane" and "loss" in meta["metrics"]
    # our loader reads the safetensors checkpoint
    lp = load_learned_prompts(best)
    assert lp.base_model == tr.clip.base_model_id
    ours = learned_text_features(tr.clip, lp)
    if meta["epoch"] == hist[-1]["epoch"]:
        ref = learned_text_features(tr.clip, tr.learner.to_learned_prompts())
        assert torch.equal(ours, ref)
    # exported to Crane's layout: torch.load(weights_only) -> {'prompt_learner': ...}
    pth = export_published(best, tmp_path / "epoch_5.pth")
    raw = torch.load(pth, weights_only=True)
    assert list(raw) == ["prompt_learner"]
    pl = raw["prompt_learner"]
    assert list(pl)[:8] == [
        "ctx_pos",
        "ctx_neg",
        "tokenized_prompts_pos",
        "tokenized_prompts_neg",
        "token_prefix_pos",
        "token_suffix_pos",
        "token_prefix_neg",
        "token_suffix_neg",
    ]
    assert pl["tokenized_prompts_pos"].dtype == torch.int32
    assert all(torch.equal(pl[k], sd[k].to(pl[k].dtype)) for k in pl)
    published = load_learned_prompts(pth)
    assert torch.equal(learned_text_features(tr.clip, published), ours)
    # the anomaly command uses the trained checkpoint
    r = CliRunner().invoke(
        cli,
        [
            "anomaly",
            str(dataset / "crack"),
            "--out",
            str(tmp_path / "pred"),
            "--models",
            "tiny",
            "--prompts",
            str(best),
            "-q",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "pred" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(x["status"] == "ok" for x in lines)
    for x in lines:  # the learned prompts used are this checkpoint (wherever meta nests it)
        meta_text = json.dumps(x["meta"])
        assert f'"prompt_checkpoint": {json.dumps(str(best))}' in meta_text
        assert '"prompts": "learned"' in meta_text
    # Python: Segmenter(prompts=...) makes it the default of the prompt-based presets
    from zsdense import Segmenter

    img = sorted((dataset / "crack").iterdir())[0]
    seg = Segmenter(models="tiny", prompts=str(best))
    r = seg.anomaly(str(img))
    assert r.meta["prompt_checkpoint"] == str(best) and r.meta["prompts"] == "learned"
    plain = Segmenter(models="tiny").anomaly(str(img))
    assert plain.meta["prompts"] == "ensemble"  # tiny models: the default falls back


def test_exported_layout_matches_cranes_checkpoint(fixtures_dir, tmp_path):
    """Our learner's state dict, saved and exported, has exactly the keys, order, shapes and
    dtypes of the checkpoint Crane's train.py wrote in the fixture."""
    from zsdense.models.clip import clip_from_state_dict
    from zsdense.train.checkpoint import export_published, save_prompts
    from zsdense.train.learner import PromptLearner

    p = fixtures_dir("crane_train") / "train.pt"
    if not p.is_file():
        pytest.skip(f"fixture {p} not found")
    fx = torch.load(p, weights_only=True)
    sd = dict(fx["state_dict"])
    te = fx["token_embedding"]
    w = torch.zeros(list(te["shape"]))
    w[te["ids"]] = te["rows"]
    sd["token_embedding.weight"] = w
    clip = clip_from_state_dict(sd, arch="fx", is_random=True)
    c = fx["cases"]["crane"]
    args = c["train_args"]  # the prompt sizes Crane's train.py ran with
    sizes = {k: int(args[k]) for k in ("n_ctx", "t_n_ctx", "depth")}
    lr = PromptLearner(clip, get_recipe("crane", **sizes))
    lr.load_state_dict(c["checkpoint"]["prompt_learner"])
    save_prompts(tmp_path / "x.safetensors", lr.state_dict(), {"epoch": 3})
    pl = torch.load(
        export_published(tmp_path / "x.safetensors", tmp_path / "x.pth"), weights_only=True
    )["prompt_learner"]
    ref = c["checkpoint"]["prompt_learner"]
    assert list(pl) == list(c["checkpoint_keys"])
    for k in ref:
        assert pl[k].dtype == ref[k].dtype and pl[k].shape == ref[k].shape
        assert torch.equal(pl[k], ref[k])


def test_a_checkpoint_for_another_base_model_is_refused(dataset, tmp_path):
    from zsdense.text.anomaly_prompts import check_text_tower, load_learned_prompts

    tr = trainer(dataset, tmp_path / "run", epochs=1)
    tr.run()
    lp = load_learned_prompts(tmp_path / "run" / "best.safetensors")
    check_text_tower(tr.clip, lp)  # its own base model: fine
    other = replace(tr.clip, arch="ViT-L-14-336", is_random=False)
    with pytest.raises(ConfigError, match="base model"):
        check_text_tower(other, lp)
    same_id = replace(tr.clip, weights_sha256="0" * 64)
    lp2 = replace(lp, base_sha256="1" * 64)
    with pytest.raises(ConfigError, match="SHA-256"):
        check_text_tower(same_id, lp2)


def test_dice_batch_of_one_defect_only_on_request():
    from zsdense.train.losses import dice_loss

    torch.manual_seed(0)
    x = torch.rand(1, 8, 8)
    m = (torch.rand(1, 8, 8) > 0.7).float()
    fixed = dice_loss(x, m)
    ref = 1 - (2 * (x * m).sum() + 1) / (x.sum() + m.sum() + 1)
    assert torch.allclose(fixed, ref)
    rows = dice_loss(x, m, squeeze_rows=True)
    ref_rows = 1 - ((2 * (x[0] * m[0]).sum(1) + 1) / (x[0].sum(1) + m[0].sum(1) + 1)).mean()
    assert torch.allclose(rows, ref_rows) and abs(float(rows - fixed)) > 1e-3
    x2, m2 = torch.cat([x, x]), torch.cat([m, m])
    assert torch.equal(dice_loss(x2, m2, squeeze_rows=True), dice_loss(x2, m2))


def test_sigkill_after_epoch_1_of_3_then_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    """A real kill -9 of `zsdense train-prompts` once epoch 1 is saved; `--resume` finishes the
    3 epochs and every tensor equals an uninterrupted 3-epoch run's."""
    import os
    import signal
    import subprocess
    import sys

    common = ["--models", "tiny", "--image-size", str(SIZE), "--batch-size", "4", "-q"]
    cmd = [sys.executable, "-m", "zsdense.cli.main", "train-prompts", str(dataset)]
    env = dict(os.environ)
    full = subprocess.run(
        cmd + ["--out", str(tmp_path / "full"), "--epochs", "3"] + common,
        env=env,
        cwd=tmp_path,  # not the source tree: `-m` must import the installed package
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert full.returncode == 0, full.stderr
    killed = tmp_path / "killed"
    # The kill comes from inside, at a fixed point: right after epoch 1's resume state is on
    # disk (a kill from the test after it saw the file raced the epochs: on a fast machine the
    # run was past epoch 3 before the signal landed).
    kill_after_epoch_1 = (
        "import os, signal, sys\n"
        "import zsdense.train.loop as loop\n"
        "from zsdense.cli.main import main\n"
        "saved = loop.save_state\n"
        "def save_then_die(*a, **k):\n"
        "    saved(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "loop.save_state = save_then_die\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", kill_after_epoch_1, "train-prompts", str(dataset)]
        + ["--out", str(killed), "--epochs", "3"]
        + common,
        env=env,
        cwd=tmp_path,  # not the source tree: `-c` must import the installed package
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (killed / "state.safetensors").is_file() and (killed / "epoch_1.safetensors").is_file()
    assert not (killed / "epoch_2.safetensors").is_file()
    res = subprocess.run(
        cmd + ["--out", str(killed), "--epochs", "3", "--resume"] + common,
        env=env,
        cwd=tmp_path,  # not the source tree: `-m` must import the installed package
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    a = _tensors(tmp_path / "full" / "epoch_3.safetensors")
    b = _tensors(killed / "epoch_3.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
