"""Few-shot memory banks on disk: round trip, refusal for another model/settings, damaged files,
and ``zsdense memory build | info`` through the CLI group."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zsdense.errors import ConfigError, InputError
from zsdense.io.membank import FORMAT_VERSION, HEADER_KEY, load_memory, read_header, save_memory
from zsdense.tasks import fewshot as fs

SIZE = 56  # 4x4 patch grid: fast on the tiny model


def _texture(seed: int, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.2 * np.sin(2 * np.pi * x / 7) * np.cos(2 * np.pi * y / 14)
    img = np.stack([base, 0.9 * base + 0.05, 0.8 * base + 0.1], -1)
    img = img + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def goods():
    return [_texture(s) for s in range(3)]


@pytest.fixture(scope="module")
def tests_imgs():
    a = _texture(10)
    a[10:20, 30:42] = 0
    return [a, _texture(11)]


@pytest.fixture(scope="module")
def opts():
    return fs.FewShotOptions(image_size=SIZE, rotation=True, rot_angles=(0, 90, 180))


@pytest.fixture(scope="module")
def bank(tiny_seg, goods, opts):
    return fs.build_memory(tiny_seg, goods, opts)


def test_bank_contents(bank, tiny_seg, opts):
    dino = tiny_seg.dinov2(opts.model)
    assert bank.n_shots == 3
    assert bank.n_rows == 3 * 3 * 16  # shots x angles x patches (no masking)
    assert bank.settings["rot_angles"] == [0, 90, 180]
    assert bank.settings["pos_interp"] == "hub"  # DINOv2 without registers
    assert bank.model["weights_sha256"] == dino.weights_sha256()
    assert len(bank.model["weights_sha256"]) == 64
    src = bank.all_source().numpy()
    assert src[:, 0].tolist() == sorted(src[:, 0].tolist())  # reference, then angle, then patch
    norms = np.linalg.norm(bank.features[0].numpy(), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # L2_normalized memory


def test_round_trip_identical_maps(tmp_path, bank, tiny_seg, goods, tests_imgs, opts):
    path = save_memory(bank, tmp_path / "bank.zsdmem")
    header = read_header(path)
    assert header["format_version"] == FORMAT_VERSION
    assert header["settings"] == bank.settings and header["model"] == bank.model
    loaded = load_memory(path)
    for a, b in zip(loaded.features, bank.features):
        assert a.dtype == b.dtype and bool((a == b).all())
    direct = fs.run_fewshot(tiny_seg, tests_imgs, reference=goods, options=opts)
    from_mem = fs.run_fewshot(tiny_seg, tests_imgs, reference=bank, options=opts)
    from_disk = fs.run_fewshot(tiny_seg, tests_imgs, reference=str(path))  # options from bank
    for a, b, c in zip(direct, from_mem, from_disk):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        np.testing.assert_array_equal(a.anomaly_map, c.anomaly_map)
        assert a.score == b.score == c.score
        assert a.anomaly_map.shape == (SIZE, SIZE) and a.anomaly_map.dtype == np.float32
    # the planted dark rectangle scores above the clean test image
    assert direct[0].score > direct[1].score


def test_other_model_or_settings_refused(bank, tiny_seg, tests_imgs, opts):
    with pytest.raises(ConfigError, match="another model or other settings.*model"):
        fs.run_fewshot(
            tiny_seg, tests_imgs[:1], reference=bank, options=replace(opts, model="dinov2-base")
        )
    with pytest.raises(ConfigError, match="image_size"):
        fs.run_fewshot(
            tiny_seg, tests_imgs[:1], reference=bank, options=replace(opts, image_size=70)
        )
    with pytest.raises(ConfigError, match="rot_angles"):
        fs.run_fewshot(
            tiny_seg, tests_imgs[:1], reference=bank, options=replace(opts, rotation=False)
        )
    forged = replace(bank, model={**bank.model, "weights_sha256": "0" * 64})
    with pytest.raises(ConfigError, match="model weights"):
        fs.run_fewshot(tiny_seg, tests_imgs[:1], reference=forged, options=opts)
    # test-time options (k, sigma, masking of test images) are free to change
    r = fs.run_fewshot(
        tiny_seg, tests_imgs[:1], reference=bank, options=replace(opts, knn_neighbors=2, sigma=2)
    )
    assert r[0].meta["fewshot"]["knn_neighbors"] == 2


def test_shots_from_a_bigger_bank(bank, tiny_seg, goods, tests_imgs, opts):
    two = fs.run_fewshot(tiny_seg, tests_imgs[:1], reference=bank, options=replace(opts, shots=2))
    built = fs.run_fewshot(tiny_seg, tests_imgs[:1], reference=goods[:2], options=opts)
    np.testing.assert_array_equal(two[0].anomaly_map, built[0].anomaly_map)
    assert two[0].meta["fewshot"]["n_shots"] == 2
    with pytest.raises(ConfigError, match="holds only 3"):
        fs.run_fewshot(tiny_seg, tests_imgs[:1], reference=bank, options=replace(opts, shots=5))


def test_damaged_files_are_clear_errors(tmp_path, bank):
    good = save_memory(bank, tmp_path / "ok.zsdmem")
    data = good.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    # a flipped byte in the tensor payload: caught by the checksum, never a silent change
    flipped = bytearray(data)
    flipped[8 + header_len + 100] ^= 0xFF
    p = tmp_path / "flipped.zsdmem"
    p.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match="corrupted"):
        load_memory(p)
    # truncated
    p = tmp_path / "short.zsdmem"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="damaged or truncated|cannot be read"):
        load_memory(p)
    # not a safetensors file at all
    p = tmp_path / "junk.zsdmem"
    p.write_bytes(b"\x00\x01junk" * 10)
    with pytest.raises(InputError, match="memory bank"):
        load_memory(p)
    with pytest.raises(InputError, match="not found"):
        load_memory(tmp_path / "missing.zsdmem")


def test_foreign_or_future_files_refused(tmp_path, bank):
    import torch
    from safetensors.torch import save_file

    p = tmp_path / "plain.zsdmem"
    save_file({"x": torch.zeros(2)}, str(p))
    with pytest.raises(InputError, match="not a zsdense memory bank"):
        load_memory(p)
    p = tmp_path / "future.zsdmem"
    header = {"format": "zsdense-membank", "format_version": FORMAT_VERSION + 1}
    save_file({"x": torch.zeros(2)}, str(p), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(InputError, match="format version"):
        load_memory(p)


def _write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")


def test_cli_memory_build_and_info(tmp_path, goods, tests_imgs, tiny_seg, opts):
    from zsdense.cli.main import cli

    _write_pngs(tmp_path / "good", goods)
    out = tmp_path / "bank.zsdmem"
    args = ["memory", "build", str(tmp_path / "good"), "--out", str(out), "--models", "tiny"]
    args += ["--device", "cpu", "--precision", "fp32", "--image-size", str(SIZE), "--shots", "2"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary, _ = json.JSONDecoder().raw_decode(res.output[res.output.index("{") :])
    assert summary["n_shots"] == 2 and summary["settings"]["image_size"] == SIZE
    assert summary["n_rows"] == 2 * 8 * 16  # 8 rotations by default
    bank = load_memory(out)
    assert [n.rsplit("/", 1)[-1] for n in bank.names] == ["000.png", "001.png"]
    # the bank scores like building from the same files
    files = [str(tmp_path / "good" / f"{i:03d}.png") for i in range(2)]
    o = fs.options_from_bank(bank)
    a = fs.run_fewshot(tiny_seg, tests_imgs[:1], reference=files, options=o)
    b = fs.run_fewshot(tiny_seg, tests_imgs[:1], reference=out)
    np.testing.assert_array_equal(a[0].anomaly_map, b[0].anomaly_map)
    # existing file without --force
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and "exists" in str(res.exception)
    res = CliRunner().invoke(cli, ["memory", "info", str(out)], catch_exceptions=False)
    info, _ = json.JSONDecoder().raw_decode(res.output[res.output.index("{") :])
    assert res.exit_code == 0 and info["n_shots"] == 2
