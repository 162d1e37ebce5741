"""The 8-bit grayscale PNG encoder of the masks (zsdense.io.png): valid files, the same pixels."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from zsdense.io import png
from zsdense.io.png import gray8_png
from zsdense.io.writers import PNG_LEVEL, PNG_MASK_STRATEGY, write_mask_png

RNG = np.random.default_rng(7)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, each CRC checked: a parser that is not Pillow's."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n : i + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        out.append((kind, body))
        i += 12 + n
    assert i == len(data)
    return out


def _decode_by_hand(data: bytes) -> np.ndarray:
    chunks = _chunks(data)
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 0, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()  # every row unfiltered
    return rows[:, 1:]


def _cases() -> list[np.ndarray]:
    smooth = np.cumsum(RNG.random((37, 53)), axis=1)
    return [
        np.zeros((1, 1), np.uint8),
        np.full((1, 17), 255, np.uint8),
        np.full((19, 1), 255, np.uint8),
        np.where(RNG.random((7, 9)) > 0.5, 255, 0).astype(np.uint8),
        np.where(smooth > smooth.mean(), 255, 0).astype(np.uint8),
        RNG.integers(0, 256, (23, 31), dtype=np.uint8),  # any 8-bit values, not only 0/255
        RNG.integers(0, 256, (40, 60), dtype=np.uint8)[::2, 1::3],  # a strided view
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_gray8_png_decodes_to_its_pixels_by_pillow_and_by_hand(case: int) -> None:
    a = _cases()[case]
    data = gray8_png(a)
    np.testing.assert_array_equal(_decode_by_hand(data), a)
    with Image.open(io.BytesIO(data)) as im:
        im.verify()  # Pillow's own checks of the chunks
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (a.shape[1], a.shape[0])
        np.testing.assert_array_equal(np.asarray(im), a)


def test_gray8_png_compresses_large_images_in_blocks_of_rows(monkeypatch) -> None:
    a = np.where(RNG.random((50, 33)) > 0.7, 255, 0).astype(np.uint8)
    whole = gray8_png(a)
    monkeypatch.setattr(png, "ROWS_BYTES", 3 * 34 + 5)  # three rows a block, the last one short
    blocks = gray8_png(a)
    np.testing.assert_array_equal(_decode_by_hand(blocks), a)
    with Image.open(io.BytesIO(blocks)) as im:
        np.testing.assert_array_equal(np.asarray(im), a)
    # one deflate stream either way: the blocks only bound the filtered copy
    assert zlib.decompress(_chunks(blocks)[1][1]) == zlib.decompress(_chunks(whole)[1][1])


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 2), np.uint16), "uint8"),
        (np.zeros((2, 2), bool), "uint8"),
        (np.zeros((2, 2, 1), np.uint8), r"\(H, W\)"),
        (np.zeros((0, 4), np.uint8), "1\\.\\.2147483647 pixels"),
        (np.zeros((4, 0), np.uint8), "got 4x0"),
    ],
)
def test_gray8_png_refuses_what_it_cannot_write(bad: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gray8_png(bad)


def test_mask_png_holds_the_pixels_of_pillows_png(tmp_path) -> None:
    """The mask file is the encoder's (rows unfiltered, zlib's run-length strategy), with the
    pixels Pillow's own PNG writer gives for the same mask."""
    smooth = np.cumsum(RNG.random((48, 64)) - 0.5, axis=0)
    m = smooth > 0.3
    p = write_mask_png(tmp_path / "m.mask.png", m)
    assert p.read_bytes() == gray8_png(
        np.where(m, 255, 0).astype(np.uint8), level=PNG_LEVEL, strategy=PNG_MASK_STRATEGY
    )
    buf = io.BytesIO()
    Image.fromarray(np.where(m, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    with Image.open(p) as ours, Image.open(buf) as pillows:
        assert ours.mode == pillows.mode == "L"
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(pillows))
