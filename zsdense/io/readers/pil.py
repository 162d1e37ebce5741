"""Pillow formats: PNG, JPEG, BMP, GIF, WebP (and TIFFs that tifffile cannot decode).

* Pillow's global pixel limit is lifted only while a header is parsed, under a lock, and restored
  afterwards; ``max_pixels`` (checked from the header, before decoding) replaces it.
* 16-bit colour PNGs are decoded with OpenCV, which keeps all 16 bits (Pillow would reduce them
  to 8); 16-bit grayscale is read by Pillow at full precision.
* EXIF orientation is applied; alpha is dropped as ``convert("RGB")`` does; palette, CMYK and
  YCbCr images use Pillow's conversions.
* Multi-frame files (animated GIF / WebP, multi-frame JPEG-MPO): **only the first frame** is read,
  with ``meta["frames_in_file"]`` and a warning; an animation is one picture, not an image set
  (multi-page TIFF stacks, which are image sets, give one record per page: see ``tiff``).
"""

from __future__ import annotations

import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from zsdense.errors import InputError
from zsdense.io.readers.common import (
    FORMAT_NAMES,
    ImageRecord,
    base_meta,
    check_pixels,
    finish,
    orient,
    scale_array,
)

_PIL_LOCK = threading.Lock()
_PIL_FORMAT = {
    "png": "PNG",
    "jpeg": "JPEG",
    "bmp": "BMP",
    "gif": "GIF",
    "webp": "WEBP",
    "tiff": "TIFF",
}


@contextmanager
def _pil_bomb_check_lifted() -> Iterator[None]:
    """Lift Pillow's global pixel limit while a header is parsed; ``max_pixels`` replaces it."""
    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _open_pil(path: Path, fmt: str, max_pixels: int | None) -> Image.Image:
    with _pil_bomb_check_lifted():
        try:
            im = Image.open(path, formats=[_PIL_FORMAT[fmt]])
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(path, f"cannot read {FORMAT_NAMES[fmt]} header: {exc}") from exc
    w, h = im.size
    try:
        check_pixels(path, int(w) * int(h), max_pixels)
    except InputError:
        im.close()
        raise
    return im


def _load_pil(im: Image.Image, path: Path, fmt: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            im.load()
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        msg = str(exc)
        if "truncated" in msg:
            msg = f"file is truncated or corrupt ({msg})"
        raise InputError(path, f"cannot decode {FORMAT_NAMES[fmt]} data: {msg}") from exc


def _pil_orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not make an otherwise fine image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def pil_to_float(im: Image.Image, warn: list[str], meta: dict) -> tuple[np.ndarray, str]:
    """PIL image -> (H, W[, C]) float32 in [0, 1] and the scaling used (no clipping)."""
    return scale_array(pil_pixels(im, meta), warn)


def pil_pixels(im: Image.Image, meta: dict) -> np.ndarray:
    """PIL image -> its (H, W[, C]) pixel array before scaling (uint8 for 8-bit modes, alpha
    dropped; uint16 / int32 / float32 for the 16-bit, ``I`` and ``F`` modes)."""
    mode = im.mode
    meta["mode"] = mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        meta["dtype"], meta["bits"] = "uint16", 16
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            meta["dtype"], meta["bits"] = "uint16", 16
            return arr.astype(np.uint16)
        meta["dtype"], meta["bits"] = "int32", 32
        return arr.astype(np.int32)
    if mode == "F":
        meta["dtype"], meta["bits"] = "float32", 32
        return np.asarray(im, dtype=np.float32)
    meta["dtype"] = "bool" if mode == "1" else "uint8"
    meta["bits"] = 1 if mode == "1" else 8
    if mode in ("L", "RGB"):
        arr = np.asarray(im)
    elif mode == "RGBA":
        meta["has_alpha"] = True
        arr = np.asarray(im)[:, :, :3]
    elif mode == "LA":
        meta["has_alpha"] = True
        arr = np.asarray(im)[:, :, 0]
    elif mode == "1":
        arr = np.asarray(im.convert("L"))
    else:  # P, PA, CMYK, YCbCr, LAB, HSV, RGBX, La, RGBa, ...
        has_alpha = "A" in mode or "a" in mode or "transparency" in im.info
        if has_alpha:
            meta["has_alpha"] = True
        try:
            conv = im.convert("RGBA" if has_alpha else "RGB")
        except (ValueError, OSError) as exc:
            raise InputError(
                meta["source"], f"cannot convert Pillow mode {mode!r} to RGB: {exc}"
            ) from exc
        arr = np.asarray(conv)[:, :, :3]
    return np.ascontiguousarray(arr)


def _png_ihdr(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26:
        return 8, 0
    return head[24], head[25]


def _read_png16_color(path: Path, warn: list[str]) -> np.ndarray | None:
    """16-bit RGB(A)/GA PNG -> (H, W, 3|4) uint16 RGB(A) via OpenCV, or None if unavailable."""
    try:
        import cv2
    except ImportError:
        warn.append("opencv not installed: 16-bit colour PNG read with 8-bit precision")
        return None
    buf = np.fromfile(path, dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InputError(path, "cannot decode 16-bit PNG data: file is truncated or corrupt")
    if arr.dtype != np.uint16:
        return None
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]
    return np.ascontiguousarray(arr)


def read_pil_file(path: Path, fmt: str, max_pixels: int | None) -> ImageRecord:
    """Decode the first frame of a Pillow-readable file into a record (see the module rules)."""
    im = _open_pil(path, fmt, max_pixels)
    warn: list[str] = []
    meta = base_meta(path, fmt)
    try:
        orientation = 1
        u8 = None
        _load_pil(im, path, fmt)
        orientation = _pil_orientation(im)
        arr16 = None
        if fmt == "png":
            depth, ctype = _png_ihdr(path)
            if depth == 16 and ctype in (2, 4, 6):
                arr16 = _read_png16_color(path, warn)
        if arr16 is not None:
            meta["mode"] = im.mode
            meta["dtype"], meta["bits"] = "uint16", 16
            if arr16.ndim == 3 and arr16.shape[2] in (2, 4):
                meta["has_alpha"] = True
                arr16 = arr16[:, :, :-1]
            x, scaling = scale_array(arr16, warn)
        else:
            raw = pil_pixels(im, meta)
            x, scaling = scale_array(raw, warn)
            if raw.dtype == np.uint8 and scaling == "/255":
                u8 = raw  # x is exactly raw / 255: the picture the models' 8-bit paths want
        if getattr(im, "n_frames", 1) > 1:
            meta["frames_in_file"] = int(im.n_frames)
            warn.append(f"file holds {im.n_frames} frames; only the first is used")
    finally:
        im.close()
    meta["scaling"] = scaling
    meta["orientation"] = orientation
    x = orient(x, orientation)
    return finish(x, meta, warn, u8=None if u8 is None else orient(u8, orientation))
