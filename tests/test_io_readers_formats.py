"""The readers package: TIFF stacks as one record per page, GIF / WebP, array validation of the
Python API, and the isolation of the medical dependencies in their modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import zsdense.io.readers as readers_pkg
from zsdense.errors import ImageArrayError, InputError
from zsdense.io import read_image as io_read_image
from zsdense.io.readers import (
    SUPPORTED_EXTENSIONS,
    detect_format,
    iter_image_records,
    read_image,
    read_image_records,
    to_float_rgb,
)

RNG = np.random.default_rng(7)


def _stack(path: Path, pages: list[np.ndarray], **kw) -> Path:
    tifffile = pytest.importorskip("tifffile")
    with tifffile.TiffWriter(path) as tw:
        for page in pages:
            tw.write(page, **kw)
    return path


# ---------------------------------------------------------------------------------- TIFF pages


def test_tiff_stack_one_record_per_page_with_suffix_and_meta(tmp_path: Path) -> None:
    pages = [RNG.integers(0, 65536, (5, 6), dtype=np.uint16) for _ in range(3)]
    recs = read_image_records(_stack(tmp_path / "s.tif", pages, photometric="minisblack"))
    assert [r.suffix for r in recs] == [".p000", ".p001", ".p002"]
    for i, (rec, page) in enumerate(zip(recs, pages)):
        np.testing.assert_array_equal(rec.image[..., 1], page.astype(np.float32) / 65535.0)
        assert rec.meta["page"] == i and rec.meta["pages_in_file"] == 3
        assert rec.meta["scaling"] == "/65535" and rec.meta["orig_size"] == [5, 6]
        assert not any("only the first" in w for w in rec.meta["warnings"])
    # the key order of the meta is the manifest's (the engine used to append "page" last)
    assert list(recs[1].meta)[-1] == "page"
    assert list(recs[0].meta).index("pages_in_file") < list(recs[0].meta).index("scaling")
    assert read_image(tmp_path / "s.tif").suffix == ".p000"


def test_tiff_stack_suffix_width_grows_past_1000_pages(tmp_path: Path) -> None:
    pages = [np.full((2, 3), i % 256, np.uint8) for i in range(1001)]
    recs = list(iter_image_records(_stack(tmp_path / "big.tif", pages)))
    assert recs[0].suffix == ".p0000" and recs[-1].suffix == ".p1000"
    assert float(recs[300].image[0, 0, 0]) == pytest.approx(300 % 256 / 255.0)


def test_tiff_stack_pages_decoded_by_the_rules_of_the_first(tmp_path: Path) -> None:
    """MINISWHITE, RGB and orientation apply to every page, not only page 0."""
    a = [np.array([[0, 255], [128, 64]], np.uint8) + i for i in range(2)]
    recs = read_image_records(_stack(tmp_path / "w.tif", a, photometric="miniswhite"))
    for rec, page in zip(recs, a):
        np.testing.assert_allclose(rec.image[..., 0], 1 - page / 255.0, atol=1e-7)
        assert rec.meta["scaling"] == "/255,inverted"
    rot = _stack(tmp_path / "o.tif", a, photometric="minisblack", extratags=[(274, 3, 1, 3, True)])
    for rec, page in zip(read_image_records(rot), a):
        np.testing.assert_allclose(rec.image[..., 0], page[::-1, ::-1] / 255.0, atol=1e-7)
    rgb = [RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8) for _ in range(2)]
    recs = read_image_records(_stack(tmp_path / "c.tif", rgb, photometric="rgb"))
    np.testing.assert_allclose(recs[1].image, rgb[1] / 255.0, atol=1e-7)
    assert recs[1].meta["channels"] == 3


def test_tiff_float_stack_scaled_per_page(tmp_path: Path) -> None:
    pages = [np.array([[0.0, 2.0], [4.0, 8.0]], np.float32), np.array([[0.25, 0.5]], np.float32)]
    pages[1] = np.array([[0.25, 0.5], [0.75, 1.0]], np.float32)
    recs = read_image_records(_stack(tmp_path / "f.tif", pages, photometric="minisblack"))
    np.testing.assert_allclose(recs[0].image[..., 0], pages[0] / 8.0)
    assert recs[0].meta["scaling"] == "minmax"
    np.testing.assert_array_equal(recs[1].image[..., 0], pages[1])
    assert recs[1].meta["scaling"] == "float-identity"


def test_tiff_pages_of_different_shapes_keep_the_first(tmp_path: Path) -> None:
    pages = [np.zeros((8, 8), np.uint8), np.full((4, 4), 255, np.uint8)]
    recs = read_image_records(_stack(tmp_path / "m.tif", pages, photometric="minisblack"))
    assert len(recs) == 1 and recs[0].suffix == ""
    assert recs[0].meta["pages_in_file"] == 2 and "page" not in recs[0].meta
    assert any("2 pages; only the first" in w for w in recs[0].meta["warnings"])


def test_tiff_stack_max_pixels_counts_every_page(tmp_path: Path) -> None:
    path = _stack(tmp_path / "s.tif", [np.zeros((10, 10), np.uint8)] * 4)
    assert len(read_image_records(path, max_pixels=400)) == 4
    with pytest.raises(InputError, match="TIFF stack has 400 pixels, more than the limit of 399"):
        read_image_records(path, max_pixels=399)


# ---------------------------------------------------------------------------------- GIF / WebP


def test_gif_first_frame_only_with_a_warning(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 5), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert detect_format(tmp_path / "a.gif") == "gif"
    recs = read_image_records(tmp_path / "a.gif")
    assert len(recs) == 1 and recs[0].suffix == ""
    np.testing.assert_array_equal(recs[0].image[2, 3], [1.0, 0.0, 0.0])
    assert recs[0].meta["format"] == "gif" and recs[0].meta["frames_in_file"] == 3
    assert any("3 frames; only the first" in w for w in recs[0].meta["warnings"])

    pal = RNG.integers(0, 256, (7, 9), dtype=np.uint8)
    img = Image.fromarray(pal, "L")
    img.save(tmp_path / "gray.gif")
    rec = read_image(tmp_path / "gray.gif")
    with Image.open(tmp_path / "gray.gif") as gif:
        want = np.asarray(gif.convert("RGB")) / 255.0
    np.testing.assert_allclose(rec.image, want, atol=1e-7)
    assert "frames_in_file" not in rec.meta


def test_webp_lossless_exact_and_alpha_dropped(tmp_path: Path) -> None:
    from PIL import features

    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    rgba = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "x.webp", lossless=True)
    assert detect_format(tmp_path / "x.webp") == "webp"
    rec = io_read_image(tmp_path / "x.webp")
    np.testing.assert_allclose(rec.image, rgba[..., :3] / 255.0, atol=1e-7)
    assert rec.meta["format"] == "webp" and rec.meta["orig_size"] == [9, 11]


def test_new_formats_listed_and_mislabelled_refused(tmp_path: Path) -> None:
    assert ".gif" in SUPPORTED_EXTENSIONS and ".webp" in SUPPORTED_EXTENSIONS
    (tmp_path / "fake.webp").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + b"\x00" * 20)
    with pytest.raises(InputError, match="not a valid WebP file"):
        read_image(tmp_path / "fake.webp")
    (tmp_path / "fake.gif").write_text("GIF? no")
    with pytest.raises(InputError, match="not a valid GIF file"):
        read_image(tmp_path / "fake.gif")


# ---------------------------------------------------------------------------------- arrays


@pytest.mark.parametrize(
    "arr,match",
    [
        (np.zeros((0, 5), np.uint8), "empty image"),
        (np.zeros((5, 0), np.uint8), "empty image"),
        (np.zeros((0, 0), np.float32), "empty image"),
        (np.zeros((0, 4, 3), np.uint8), "empty image"),
        (np.zeros((4, 5, 7), np.uint8), "unsupported channel count 7"),
        (np.zeros((4, 5, 5), np.float32), "unsupported channel count 5"),
        (np.zeros((4, 5, 0), np.uint8), "unsupported channel count 0"),
        (np.zeros((3, 8, 8), np.uint8), "count 8 .* looks channel-first"),
        (np.zeros((2, 3, 4, 3), np.uint8), "got an array of shape"),
        (np.zeros(5, np.uint8), "got an array of shape"),
        (np.zeros((4, 4), np.complex64), "unsupported array dtype complex64"),
        (np.full((4, 4), None, object), "unsupported array dtype object"),
        (np.full((4, 4), "a"), "unsupported array dtype <U1"),
    ],
)
def test_to_float_rgb_refuses_unusable_arrays(arr: np.ndarray, match: str) -> None:
    with pytest.raises(ImageArrayError, match=match) as ei:
        to_float_rgb(arr)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, InputError)


def test_to_float_rgb_accepted_shapes_dtypes_and_non_finite() -> None:
    la = np.stack([np.array([[0, 51], [102, 255]], np.uint8), np.zeros((2, 2), np.uint8)], -1)
    img, meta = to_float_rgb(la)  # gray + alpha: alpha dropped, like an LA PNG
    np.testing.assert_allclose(img[..., 2], la[..., 0] / 255.0)
    assert meta["channels"] == 2
    one = np.array([[[0.5]]], np.float16)
    assert to_float_rgb(one)[0].shape == (1, 1, 3) and to_float_rgb(one)[0][0, 0, 1] == 0.5
    i32 = np.array([[-10, 0], [10, 30]], np.int32)
    np.testing.assert_allclose(to_float_rgb(i32)[0][..., 0], (i32 + 10) / 40.0)
    nan = np.array([[np.nan, 2.0], [np.inf, -np.inf]], np.float64)
    np.testing.assert_array_equal(to_float_rgb(nan)[0][..., 0], [[0.0, 1.0], [1.0, 0.0]])
    assert to_float_rgb(np.full((2, 2), np.nan))[0].max() == 0.0
    with pytest.raises(ImageArrayError, match="empty image: PIL image"):
        to_float_rgb(Image.new("RGB", (0, 4)))
    with pytest.raises(TypeError):
        to_float_rgb([[1, 2], [3, 4]])


# ---------------------------------------------------------------------------------- structure


def test_medical_dependencies_imported_only_in_their_modules(tmp_path) -> None:
    root = Path(readers_pkg.__file__).parent
    where: dict[str, set[str]] = {"pydicom": set(), "nibabel": set()}
    for py in root.glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top in where:
                    where[top].add(py.name)
    assert where == {"pydicom": {"dicom.py"}, "nibabel": {"nifti.py"}}
    code = "import sys, zsdense.io; print('pydicom' in sys.modules, 'nibabel' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.split() == ["False", "False"]


def test_to_float_rgb_of_a_stack_path_says_only_the_first_is_used(tmp_path: Path) -> None:
    pages = [np.full((3, 4), v, np.uint8) for v in (10, 20)]
    img, meta = to_float_rgb(_stack(tmp_path / "s.tif", pages))
    assert float(img[0, 0, 0]) == pytest.approx(10 / 255) and meta["page"] == 0
    assert any("only the first (.p000)" in w for w in meta["warnings"])
    Image.fromarray(pages[0]).save(tmp_path / "one.png")
    assert not to_float_rgb(tmp_path / "one.png")[1]["warnings"]
