"""Trident on thin images (1×64, 64×1, 3×2000): outputs at the input size, no error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from zsdense.api import Segmenter

THIN = [(1, 64), (64, 1), (3, 2000)]


@pytest.fixture(scope="module")
def seg():
    return Segmenter(device="cpu", models="tiny", precision="fp32")


@pytest.mark.parametrize("hw", THIN)
def test_trident_api_thin_images(seg, hw):
    img = (np.random.RandomState(sum(hw)).rand(*hw, 3) * 255).astype(np.uint8)
    res = seg.open_vocab(img, classes=["cat", "dog"], preset="trident")
    assert res.labels.shape == hw
    assert res.probs.shape == (2, *hw) and np.isfinite(res.probs).all()
    assert min(res.meta["sam_grid"]) >= 1


def test_trident_cli_thin_images_written_at_input_size(tmp_path, capsys):
    from zsdense.cli.main import main

    d = tmp_path / "d"
    d.mkdir()
    for h, w in THIN:
        arr = (np.random.RandomState(h * w).rand(h, w, 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"t{h}x{w}.png")
    out = tmp_path / "o"
    args = ["openvocab", str(d), "--out", str(out), "--classes", "cat, dog"]
    with pytest.raises(SystemExit) as exc:
        main(args + ["--preset", "trident", "--models", "tiny", "-q"])
    assert exc.value.code == 0, capsys.readouterr().err
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in recs) == ["ok"] * 3
    for h, w in THIN:
        with Image.open(out / f"t{h}x{w}.mask.png") as im:
            assert im.size == (w, h)
