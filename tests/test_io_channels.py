"""H×W×C files with C outside {1, 3, 4}: one stated rule (README, input formats).

An H×W×C array saved by ``tifffile.imwrite`` is stored as H pages of W×C pixels; it is read as
one image with C channels (not as H thin images), and channels become RGB by the one rule of
``to_rgb`` (2: the first as grey; 5 and more: the first three), recorded in the metadata. A real
multi-page stack holding the same array shape (pages written one by one, an ImageJ stack, a
shaped file declaring ``ZYX``) is still read page by page.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from zsdense.errors import InputError
from zsdense.io.readers import read_image_records
from zsdense.io.readers.tiff import MAX_ARRAY_CHANNELS

tifffile = pytest.importorskip("tifffile")

H, W = 40, 50


def _array(c: int, h: int = H, w: int = W) -> np.ndarray:
    return (np.random.default_rng(c).random((h, w, c)) * 255).astype(np.uint8)


@pytest.mark.parametrize("c", [2, 5, 8])
def test_hwc_array_file_is_one_image_with_c_channels(tmp_path, c):
    arr = _array(c)
    path = tmp_path / f"c{c}.tif"
    tifffile.imwrite(path, arr)  # the user's one-liner: stored as H pages of W×C
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == H  # (what made it 40 thin images before)
    recs = read_image_records(path)
    assert len(recs) == 1 and recs[0].suffix == ""
    rec = recs[0]
    assert rec.image.shape == (H, W, 3) and rec.meta["orig_size"] == [H, W]
    assert rec.meta["channels"] == c
    if c == 2:  # the first channel as grey, the second dropped (not declared alpha): a warning
        assert rec.meta["channels_used"] == [0]
        for k in range(3):
            np.testing.assert_allclose(rec.image[..., k], arr[..., 0] / 255.0, atol=1e-7)
        assert any("second is dropped" in w for w in rec.meta["warnings"])
    else:  # the first three as RGB
        assert rec.meta["channels_used"] == [0, 1, 2]
        np.testing.assert_allclose(rec.image, arr[..., :3] / 255.0, atol=1e-7)
        assert any(f"{c} channels: only the first 3" in w for w in rec.meta["warnings"])
    assert any(f"{H}×{W}×{c}" in w for w in rec.meta["warnings"])


def _stack_page_by_page(path, arr):
    with tifffile.TiffWriter(path) as tw:
        for page in arr:
            tw.write(page, metadata=None)


def _stack_imagej(path, arr):
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "ZYX"})


def _stack_declared_zyx(path, arr):
    tifffile.imwrite(path, arr, metadata={"axes": "ZYX"})


@pytest.mark.parametrize("write", [_stack_page_by_page, _stack_imagej, _stack_declared_zyx])
@pytest.mark.parametrize("c", [2, 5, 8])
def test_real_stack_of_the_same_array_shape_is_read_as_pages(tmp_path, write, c):
    arr = _array(c)  # (40, 50, c) as 40 pages of 50×c pixels, each a grey image
    path = tmp_path / "stack.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write(path, arr)
    recs = read_image_records(path)
    assert len(recs) == H
    for i in (0, H // 2, H - 1):
        rec = recs[i]
        assert rec.suffix == f".p{i:03d}" and rec.meta["page"] == i
        assert rec.image.shape == (W, c, 3) and rec.meta["channels"] == 1
        np.testing.assert_allclose(rec.image[..., 0], arr[i] / 255.0, atol=1e-7)


def test_declared_channel_axis_and_the_short_axis_rule(tmp_path):
    arr = _array(5)
    tifffile.imwrite(tmp_path / "yxc.tif", arr, metadata={"axes": "YXC"})
    (rec,) = read_image_records(tmp_path / "yxc.tif")
    assert rec.meta["channels"] == 5
    # undeclared, the trailing axis is channels only when it is the short one: 6 pages of 50×7
    few = _array(7, h=6)
    tifffile.imwrite(tmp_path / "few.tif", few)
    recs = read_image_records(tmp_path / "few.tif")
    assert len(recs) == 6 and recs[0].image.shape == (W, 7, 3)
    # and at most MAX_ARRAY_CHANNELS: more are pages when undeclared, an error when declared
    many = MAX_ARRAY_CHANNELS + 1
    tifffile.imwrite(tmp_path / "many.tif", _array(many, h=40, w=60))
    assert len(read_image_records(tmp_path / "many.tif")) == 40
    tifffile.imwrite(tmp_path / "manyc.tif", _array(many, h=40, w=60), metadata={"axes": "YXC"})
    with pytest.raises(InputError, match=f"{many} channels; at most {MAX_ARRAY_CHANNELS}"):
        read_image_records(tmp_path / "manyc.tif")


def test_samples_per_pixel_pages_and_declared_alpha(tmp_path):
    arr = _array(5)
    tifffile.imwrite(tmp_path / "spp.tif", arr, photometric="minisblack", planarconfig="contig")
    (rec,) = read_image_records(tmp_path / "spp.tif")
    assert rec.meta["channels"] == 5 and rec.meta["channels_used"] == [0, 1, 2]
    np.testing.assert_allclose(rec.image, arr[..., :3] / 255.0, atol=1e-7)
    rgba = _array(4)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba)  # RGB + unassociated alpha: dropped silently
    (rec,) = read_image_records(tmp_path / "rgba.tif")
    assert rec.meta["channels"] == 4 and rec.meta["warnings"] == []
    four = np.moveaxis(rgba, -1, 0).copy()  # 4 bands, planar, no alpha declared: a warning
    planar = dict(photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(tmp_path / "bands.tif", four, **planar)
    (rec,) = read_image_records(tmp_path / "bands.tif")
    assert rec.meta["channels"] == 4
    assert any("fourth is dropped" in w for w in rec.meta["warnings"])
