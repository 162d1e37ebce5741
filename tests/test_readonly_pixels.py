"""Decoded pixels are often read-only (Pillow's buffer): the paths that hand them to torch must
not make torch warn that writing to them is undefined (it warns once per process, so each case
runs in a fresh interpreter with warnings as errors)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "clip_uint8_resize": """
from zsdense.models.clip import _torch_resize_u8
out = _torch_resize_u8(u8, (24, 20), "bicubic")
assert out.shape == (3, 24, 20) and out.dtype == np.float32
np.testing.assert_array_equal(_torch_resize_u8(u8.copy(), (24, 20), "bicubic"), out)
""",
    "mask_views": """
import torch
from zsdense.dense.maskfeatures import global_views, normalise_imagenet
masks = np.zeros((2, 32, 40), bool); masks[0, 4:20, 5:30] = True
views = global_views(u8, masks, 16)
assert views.shape == (2, 3, 16, 16)
assert torch.equal(views, global_views(u8.copy(), masks, 16))
assert normalise_imagenet(u8).shape == (3, 32, 40)
""",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_read_only_pixels_reach_torch_without_a_warning(name, tmp_path):
    code = (
        "import numpy as np\n"
        "from PIL import Image\n"
        "rgb = (np.random.RandomState(0).rand(32, 40, 3) * 255).astype(np.uint8)\n"
        "u8 = np.asarray(Image.fromarray(rgb))  # read-only, as Pillow hands its pixels out\n"
        "u8.setflags(write=False)  # (whatever this Pillow does)\n"
        + CASES[name]
    )
    res = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # the installed package, not the source tree
    )
    assert res.returncode == 0, res.stderr[-3000:]
