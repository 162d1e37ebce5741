"""Memory of large images: ``--tile`` bounds the run by the image's own arrays, and writing the
maps and overlays of a large image does not multiply it.

The RSS test runs ``zsdense anomaly --models tiny --tile`` in a subprocess: first on a small
image (the interpreter, torch and the models: the process's base), then on a 3000×2000 photo;
the growth of the peak RSS over the base must stay under :data:`RSS_FACTOR` times the photo's
float32 RGB array (untiled the same photo adds about 6×: the whole-image model input, its
resize, the map at the input size and its resize back; README "Large images").
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from zsdense.io import writers as W

BIG_HW = (2000, 3000)
RSS_FACTOR = 3.5  # peak growth over the base, in units of the photo's float32 RGB array

CHILD = r"""
import json, resource, sys
from pathlib import Path
from zsdense.cli.main import main

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

small, big, out, extra = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
def run(path, name):
    args = ["anomaly", path, "--out", str(out / name), "--models", "tiny", "-q", *extra]
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, e.code
run(small, "small")
base = peak_mb()
run(big, "big")
print(json.dumps({"base_mb": base, "peak_mb": peak_mb()}))
"""


def _photo(path, hw) -> None:
    """A gradient with a little structure (decodes like a photo; small PNG)."""
    h, w = hw
    y = np.arange(h)[:, None]
    x = np.arange(w)[None, :]
    base = ((x + y) * 255 // (w + h)).astype(np.uint8)
    Image.fromarray(np.stack([base, base[:, ::-1], (base // 2) + 64], axis=-1)).save(
        path, compress_level=1
    )


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's unit")
def test_tiled_run_peak_rss_is_bounded_by_the_image(tmp_path):
    _photo(tmp_path / "small.png", (128, 128))
    _photo(tmp_path / "big.png", BIG_HW)
    extra = ["--tile", "1400:200", "--image-size", "56", "--precision", "fp32", "--format", "npy"]
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "small.png"),
            str(tmp_path / "big.png"),
            str(tmp_path / "out"),
            json.dumps(extra),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the source tree: its zsdense/ would shadow the installed package
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    image_mb = BIG_HW[0] * BIG_HW[1] * 3 * 4 / 2**20
    growth = got["peak_mb"] - got["base_mb"]
    assert growth < RSS_FACTOR * image_mb, (growth, image_mb, got)
    rec = json.loads((tmp_path / "out" / "big" / "results.jsonl").read_text().splitlines()[-1])
    assert rec["status"] == "ok" and rec["meta"]["result"]["tiling"]["tiles"] > 1
    assert np.load(tmp_path / "out" / "big" / "big.map.npy").shape == BIG_HW


# ---- writers -------------------------------------------------------------------------------------


def _overlay_inputs(hw, seed=0):
    rng = np.random.RandomState(seed)
    img = rng.rand(*hw, 3).astype(np.float32)
    heat = rng.rand(*hw).astype(np.float32)
    heat[0, :5] = np.nan
    return img, heat


@pytest.mark.parametrize(
    "kind", ["heat+mask+caption", "gray+small-heat", "labels+legend+caption", "float64+mask"]
)
def test_overlay_strips_give_the_same_file(tmp_path, monkeypatch, kind):
    """The overlay is blended in strips of rows: any strip height writes the same bytes."""
    hw = (161, 203)
    img, heat = _overlay_inputs(hw)
    kw: dict = {
        "heat+mask+caption": dict(image=img, heat=heat, mask=heat > 0.8, caption="score 0.5"),
        "gray+small-heat": dict(image=img[..., 0], heat=heat[::3, ::2], vmin=0.1),
        "labels+legend+caption": dict(
            image=img,
            labels=(np.nan_to_num(heat) * 40).astype(np.uint8),
            class_names=[f"class {i}" for i in range(40)],
            mask=heat > 0.5,
            caption="labels",
        ),
        "float64+mask": dict(image=img.astype(np.float64) * 1.3, mask=heat[::2, ::2] > 0.7),
    }[kind]
    files = []
    for rows in (hw[0], 7, 1):  # one strip, strips of 7 rows, one row at a time
        monkeypatch.setattr(W, "OVERLAY_STRIP_VALUES", rows * 3 * hw[1])
        p = W.write_overlay_jpg(tmp_path / f"{rows}.jpg", **kw)
        files.append(p.read_bytes())
    assert files[0] == files[1] == files[2]
    with Image.open(tmp_path / "7.jpg") as im:
        assert im.size[0] == hw[1] and im.size[1] >= hw[0]


def test_writing_a_large_result_does_not_multiply_memory(tmp_path):
    """Map (TIFF), mask and overlay of a 1500×2000 result: the extra memory numpy allocates
    while writing stays under one float32 RGB copy of the image (it was ~5 before strips)."""
    hw = (1500, 2000)
    img, heat = _overlay_inputs(hw, 1)
    heat = np.nan_to_num(heat)
    image_bytes = img.nbytes
    tracemalloc.start()
    try:
        W.write_outputs(
            tmp_path / "r",
            img,
            fmt="tiff",
            mask=heat > 0.9,
            float_map=heat,
            heat=heat,
            caption="anomaly score 0.9",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < image_bytes, peak / image_bytes
    assert (tmp_path / "r.overlay.jpg").is_file() and (tmp_path / "r.map.tiff").is_file()
