"""Read any supported image file into float RGB in [0, 1] plus JSON-safe metadata.

Why this module exists: every task head wants the same thing, an ``(H, W, 3)`` float32 image in
``[0, 1]``, whatever the file held (8/16-bit PNG, CMYK JPEG, float TIFF, a DICOM series frame, a
NIfTI slice). Doing the conversion once, here, keeps the decisions in one documented place:

* **Format detection** uses the file's magic bytes; the extension only breaks ties (DICOM without
  a preamble, gzipped NIfTI). A file whose content contradicts its extension (a text file named
  ``.png``) is an :class:`~zsdense.errors.InputError`, as is a zero-byte or truncated file.
* **Decompression bombs**: ``max_pixels`` bounds the pixels (voxels, for volumes and multi-frame
  DICOM) decoded from one file. It is checked from the header before any pixel is decoded.
  Pillow's own global limit is lifted only for the duration of the header parse, under a lock, and
  restored afterwards; our limit replaces it.
* **Scaling to [0, 1]** (recorded in ``meta["scaling"]``):

  - ``bool`` -> 0/1; ``uint8`` -> ``/255``; ``uint16`` -> ``/65535``, or ``/(2**bits - 1)`` when a
    TIFF declares fewer bits per sample (10/12/14). 16-bit data is never clipped to 8 bits (we do
    not use Pillow's ``convert("RGB")`` on 16-bit modes; 16-bit RGB PNGs are decoded with OpenCV,
    which keeps all 16 bits).
  - float data already inside ``[0, 1]`` is kept as is; otherwise it is min/max normalised over
    its finite values (NaN -> 0, +inf -> 1, -inf -> 0). Signed and 32-bit integers are min/max
    normalised too. A constant image outside [0, 1] is clipped.
  - DICOM: modality LUT (rescale slope/intercept or Modality LUT Sequence), then the VOI LUT
    Sequence if present, else the first Window Center/Width pair (LINEAR, LINEAR_EXACT or
    SIGMOID), else min/max over all frames of the file. MONOCHROME1 is inverted afterwards.
  - NIfTI: the scaled data (``scl_slope``/``scl_inter`` applied by nibabel) is normalised by the
    min/max of the whole volume, not per slice, so intensities are comparable across slices.

* **Colour**: grayscale is replicated to three channels (``meta["channels"]`` says 1); alpha is
  dropped, as Pillow's ``convert("RGB")`` does, so 8-bit results match the reference pipelines of
  the published methods; palette, CMYK and YCbCr images are converted with Pillow's conversions.
* **EXIF / TIFF orientation** is applied (pixels rotated/flipped to display orientation);
  ``meta["orientation"]`` keeps the tag value. In-memory PIL images given to
  :func:`to_float_rgb` are taken as they are (no EXIF transpose).
* **NIfTI slices** are shown as ``np.rot90(slice)`` (the usual ``imshow(slice.T,
  origin="lower")`` view): output pixel ``(r, c)`` of slice ``k`` along axis ``a`` is voxel index
  ``(c, n1 - 1 - r)`` in the two remaining axes (in their order), with ``k`` on axis ``a``.

Multi-image files give several :class:`ImageRecord`; their ``suffix`` (``".f003"`` for DICOM frame
3, ``".s012"`` for NIfTI slice 12; indices are 0-based, at least 3 digits) is appended to output
stems. Single images have suffix ``""``.
"""

from __future__ import annotations

import gzip
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zsdense.errors import ConfigError, DependencyError, InputError

__all__ = [
    "ImageRecord",
    "SUPPORTED_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "detect_format",
    "iter_image_records",
    "read_image_records",
    "read_image",
    "to_float_rgb",
]

DEFAULT_MAX_PIXELS = 200_000_000

#: Extensions picked up inside folders (lower case). ``.nii.gz`` is matched as a double suffix.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jpe",
    ".bmp",
    ".tif",
    ".tiff",
    ".dcm",
    ".dicom",
    ".nii",
    ".nii.gz",
)

_EXT_FORMAT = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".jpe": "jpeg",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
}

_FORMAT_NAMES = {
    "png": "PNG",
    "jpeg": "JPEG",
    "bmp": "BMP",
    "tiff": "TIFF",
    "dicom": "DICOM",
    "nifti": "NIfTI",
}

_SUPPORTED_TEXT = "PNG, JPEG, BMP, TIFF (8/16-bit, float), DICOM (.dcm) and NIfTI (.nii, .nii.gz)"


@dataclass
class ImageRecord:
    """One image decoded from a file.

    ``image`` is ``(H, W, 3)`` float32 in ``[0, 1]``; ``meta`` is JSON-serialisable (source, format,
    dtype, bits, orig_size ``[H, W]``, frame, slice, scaling, channels, warnings, ...); ``suffix``
    is ``""`` for single-image files, else e.g. ``".f003"`` / ``".s012"``.
    """

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    meta: dict = field(default_factory=dict)
    suffix: str = ""


# ----------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------


def _extension(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _sniff(head: bytes) -> str | None:
    """Format from the first bytes of a file, or None."""
    # DICOM first: its 128-byte preamble may itself hold a TIFF header (dual-format files).
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 348:
        for endian in "<>":
            (size,) = struct.unpack(endian + "i", head[:4])
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return "nifti"
            if size == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
                return "nifti"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    return None


def detect_format(path: str | Path) -> str:
    """Return ``"png" | "jpeg" | "bmp" | "tiff" | "dicom" | "nifti"`` from the file's content.

    Raises :class:`InputError` for a missing, empty, unknown or mislabelled file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not an image file")
    try:
        with open(path, "rb") as f:
            head = f.read(544)
    except OSError as exc:
        raise InputError(path, f"cannot open file: {exc.strerror or exc}") from exc
    if not head:
        raise InputError(path, "file is empty (0 bytes)")
    ext = _extension(path)
    expected = _EXT_FORMAT.get(ext)
    fmt = _sniff(head)
    if fmt is None and head.startswith(b"\x1f\x8b") and expected == "nifti":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(544)
        except (OSError, EOFError) as exc:
            raise InputError(path, f"corrupt gzip-compressed NIfTI file: {exc}") from exc
        fmt = _sniff(inner)
        if fmt != "nifti":
            raise InputError(path, "gzip file does not contain a NIfTI-1/NIfTI-2 header")
    if fmt is None and expected == "dicom":
        fmt = "dicom"  # DICOM without the 128-byte preamble: let pydicom try (force=True)
    if fmt is not None:
        return fmt
    if expected is not None:
        raise InputError(
            path,
            f"not a valid {_FORMAT_NAMES[expected]} file: its content does not start with a "
            f"{_FORMAT_NAMES[expected]} signature (first bytes: {head[:16]!r})",
        )
    raise InputError(
        path,
        f"unsupported file type {ext or '(no extension)'!r} and unrecognised content; "
        f"supported formats: {_SUPPORTED_TEXT}",
    )


# ----------------------------------------------------------------------------------------------
# Scaling helpers
# ----------------------------------------------------------------------------------------------


def _minmax(x: np.ndarray, warn: list[str], what: str) -> np.ndarray:
    """Min/max normalise the finite values of ``x`` to [0, 1]; NaN -> 0, +inf -> 1, -inf -> 0."""
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        warn.append(f"{what}: {int((~finite).sum())} non-finite values (NaN -> 0, +inf -> 1)")
    if not finite.any():
        return np.zeros(x.shape, np.float32)
    vals = x[finite]
    lo, hi = float(vals.min()), float(vals.max())
    if hi > lo:
        out = (x - np.float32(lo)) / np.float32(hi - lo)
    else:
        out = np.clip(x, 0.0, 1.0)
    out = np.where(np.isposinf(x), np.float32(1.0), out)
    out = np.where(np.isnan(x) | np.isneginf(x), np.float32(0.0), out)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _scale_array(
    arr: np.ndarray, warn: list[str], bits: int | None = None
) -> tuple[np.ndarray, str]:
    """Scale an integer/float/bool array to float32 [0, 1]; return it and a scaling description."""
    dt = arr.dtype
    if dt == np.bool_:
        return arr.astype(np.float32), "bool"
    if dt == np.uint8:
        if bits is not None and 1 <= bits < 8:
            return arr.astype(np.float32) / np.float32(2**bits - 1), f"/{2**bits - 1}"
        return arr.astype(np.float32) / np.float32(255.0), "/255"
    if dt == np.uint16:
        denom = 65535 if bits is None or not 8 < bits < 16 else 2**bits - 1
        out = arr.astype(np.float32) / np.float32(denom)
        if denom != 65535 and arr.size and int(arr.max()) > denom:
            warn.append(f"values exceed the declared {bits} bits; clipped to 1")
            out = np.minimum(out, 1.0)
        return out, f"/{denom}"
    if np.issubdtype(dt, np.floating):
        x = arr.astype(np.float32, copy=False)
        finite = np.isfinite(x)
        if finite.all() and x.size and float(x.min()) >= 0.0 and float(x.max()) <= 1.0:
            return x, "float-identity"
        if finite.all() and not x.size:
            return x, "float-identity"
        return _minmax(x, warn, "float data outside [0, 1]"), "minmax"
    if np.issubdtype(dt, np.integer):
        return _minmax(arr.astype(np.float64), warn, "integer data"), "minmax"
    raise TypeError(f"unsupported array dtype {dt}")


def _to_rgb(x: np.ndarray, warn: list[str]) -> tuple[np.ndarray, int]:
    """(H, W) / (H, W, C) float -> (H, W, 3) float32; return it and the source channel count."""
    if x.ndim == 2:
        ch = 1
        x = x[:, :, None]
    elif x.ndim == 3:
        ch = x.shape[2]
    else:
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {x.shape}")
    if ch == 1:
        rgb = np.repeat(x, 3, axis=2)
    elif ch == 2:  # gray + alpha: alpha dropped
        rgb = np.repeat(x[:, :, :1], 3, axis=2)
    elif ch in (3, 4):
        rgb = x[:, :, :3]
    else:
        warn.append(f"{ch} channels: only the first 3 are used as RGB")
        rgb = x[:, :, :3]
    return np.ascontiguousarray(rgb, dtype=np.float32), ch


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF/TIFF orientation tag (1..8) so pixels are in display orientation."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return np.swapaxes(arr, 0, 1)
    if orientation == 6:
        return np.rot90(arr, k=-1)
    if orientation == 7:
        return np.swapaxes(arr, 0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(arr, k=1)
    return arr


def _check_pixels(path: Path, n: int, max_pixels: int | None, what: str = "image") -> None:
    if max_pixels is not None and n > max_pixels:
        raise InputError(
            path,
            f"{what} has {n:,} pixels, more than the limit of {max_pixels:,} (a possible "
            "decompression bomb); raise the max_pixels limit if the file is trusted",
        )


def _base_meta(path: Path | None, fmt: str) -> dict[str, Any]:
    return {
        "source": str(path) if path is not None else None,
        "format": fmt,
        "frame": None,
        "slice": None,
    }


def _finish(arr_float: np.ndarray, meta: dict, warn: list[str], suffix: str = "") -> ImageRecord:
    rgb, ch = _to_rgb(arr_float, warn)
    meta["channels"] = ch
    meta["orig_size"] = [int(rgb.shape[0]), int(rgb.shape[1])]
    meta["warnings"] = list(warn)
    return ImageRecord(image=rgb, meta=meta, suffix=suffix)


# ----------------------------------------------------------------------------------------------
# Pillow (PNG, JPEG, BMP, TIFF fallback)
# ----------------------------------------------------------------------------------------------

_PIL_LOCK = threading.Lock()
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}


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
            raise InputError(path, f"cannot read {_FORMAT_NAMES[fmt]} header: {exc}") from exc
    w, h = im.size
    try:
        _check_pixels(path, int(w) * int(h), max_pixels)
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
        raise InputError(path, f"cannot decode {_FORMAT_NAMES[fmt]} data: {msg}") from exc


def _pil_orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not make an otherwise fine image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _pil_to_float(im: Image.Image, warn: list[str], meta: dict) -> tuple[np.ndarray, str]:
    """Decoded PIL image -> (H, W[, C]) float32 in [0, 1] and the scaling used (no clipping)."""
    mode = im.mode
    meta["mode"] = mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im).astype(np.uint16)
        meta["dtype"], meta["bits"] = "uint16", 16
        return _scale_array(arr, warn)
    if mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            meta["dtype"], meta["bits"] = "uint16", 16
            return _scale_array(arr.astype(np.uint16), warn)
        meta["dtype"], meta["bits"] = "int32", 32
        return _scale_array(arr.astype(np.int32), warn)
    if mode == "F":
        meta["dtype"], meta["bits"] = "float32", 32
        return _scale_array(np.asarray(im, dtype=np.float32), warn)
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
    return _scale_array(np.ascontiguousarray(arr), warn)


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


def _read_pil_file(path: Path, fmt: str, max_pixels: int | None) -> ImageRecord:
    im = _open_pil(path, fmt, max_pixels)
    warn: list[str] = []
    meta = _base_meta(path, fmt)
    try:
        orientation = 1
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
            x, scaling = _scale_array(arr16, warn)
        else:
            x, scaling = _pil_to_float(im, warn, meta)
        if getattr(im, "n_frames", 1) > 1:
            meta["frames_in_file"] = int(im.n_frames)
            warn.append(f"file holds {im.n_frames} frames; only the first is used")
    finally:
        im.close()
    meta["scaling"] = scaling
    meta["orientation"] = orientation
    x = _orient(x, orientation)
    return _finish(x, meta, warn)


# ----------------------------------------------------------------------------------------------
# TIFF (tifffile first: 16-bit RGB, float, many samples; Pillow as fallback)
# ----------------------------------------------------------------------------------------------


def _read_tiff(path: Path, max_pixels: int | None) -> ImageRecord:
    try:
        import tifffile
    except ImportError:  # core dependency, but keep a working path through Pillow
        return _read_pil_file(path, "tiff", max_pixels)

    warn: list[str] = []
    meta = _base_meta(path, "tiff")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error...
        raise InputError(path, f"cannot read TIFF header: {exc}") from exc
    with tif:
        if not len(tif.pages):
            raise InputError(path, "TIFF file holds no image")
        page = tif.pages.first
        h, w = int(page.imagelength), int(page.imagewidth)
        _check_pixels(path, h * w * max(1, int(page.imagedepth)), max_pixels)
        n_pages = len(tif.pages)
        photometric = int(page.photometric)
        bps = page.bitspersample
        bits = int(bps[0] if isinstance(bps, tuple) else bps)
        orientation = 1
        tag = page.tags.get("Orientation")
        if tag is not None:
            try:
                orientation = int(tag.value)
            except (TypeError, ValueError):
                orientation = 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = page.asarray()
            colormap = page.colormap if photometric == 3 else None
            axes = page.axes
        except Exception as exc:  # missing codec (LZW, JPEG without imagecodecs), corrupt strips
            try:
                rec = _read_pil_file(path, "tiff", max_pixels)
            except InputError as exc2:
                raise InputError(
                    path, f"cannot decode TIFF data: {exc} (Pillow: {exc2.problem})"
                ) from exc
            rec.meta["warnings"].append(f"decoded with Pillow (tifffile: {exc})")
            if bits > 8 and rec.meta.get("bits") == 8:
                rec.meta["warnings"].append(
                    f"{bits}-bit samples reduced to 8 bits by Pillow; install 'imagecodecs' "
                    "to read this TIFF at full precision"
                )
            return rec
    if photometric not in (0, 1, 2, 3, 5):  # YCbCr, CIELab, ...: let Pillow convert
        return _read_pil_file(path, "tiff", max_pixels)

    # Bring samples last: axes like "YX", "YXS", "SYX" (planar), possibly with "Z" (depth).
    if "Z" in axes:
        arr = np.take(arr, 0, axis=axes.index("Z"))
        axes = axes.replace("Z", "")
        warn.append("3D TIFF page: only the first depth plane is used")
    if "S" in axes and axes.index("S") != len(axes) - 1:
        arr = np.moveaxis(arr, axes.index("S"), -1)
    meta["dtype"] = str(arr.dtype)
    meta["bits"] = bits
    meta["photometric"] = int(photometric)
    if photometric == 3 and colormap is not None:  # palette: (3, 2**bits) uint16 colour map
        cmap = np.asarray(colormap, dtype=np.float64)
        denom = 65535.0 if cmap.max() > 255 else 255.0
        x = (cmap[:, arr.astype(np.intp)] / denom).transpose(1, 2, 0).astype(np.float32)
        scaling = f"palette/{int(denom)}"
    else:
        if arr.dtype == np.bool_ or bits == 1:
            x, scaling = arr.astype(np.float32), "bool"
        else:
            x, scaling = _scale_array(arr, warn, bits=bits)
        if photometric == 0:  # MINISWHITE
            x = 1.0 - x
            scaling += ",inverted"
        elif photometric == 5:  # SEPARATED (CMYK, inkset 1)
            if x.ndim == 3 and x.shape[2] >= 4:
                k = x[:, :, 3:4]
                x = (1.0 - x[:, :, :3]) * (1.0 - k)
                scaling += ",cmyk"
            else:
                warn.append("SEPARATED TIFF without 4 inks: read as plain samples")
    if n_pages > 1:
        meta["pages_in_file"] = n_pages
        warn.append(f"file holds {n_pages} pages; only the first is used")
    meta["scaling"] = scaling
    meta["orientation"] = orientation
    x = _orient(x.astype(np.float32, copy=False), orientation)
    return _finish(x, meta, warn)


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def _digits(n: int) -> int:
    return max(3, len(str(max(n - 1, 0))))


def _fg_value(ds: Any, frame: int, group: str, attr: str) -> Any:
    """Attribute from per-frame, then shared functional groups, then the top level (or None)."""
    for seq_name, idx in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        seq = ds.get(seq_name)
        if seq is not None and 0 <= idx < len(seq):
            grp = seq[idx].get(group)
            if grp is not None and len(grp) and attr in grp[0]:
                return grp[0][attr].value
    if attr in ds:
        return ds[attr].value
    return None


def _first_number(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        if not len(v):
            return None
        v = v[0]
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1] (LINEAR, LINEAR_EXACT, SIGMOID)."""
    x = x.astype(np.float64, copy=False)
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = (x - center) / width + 0.5
    else:  # LINEAR; width >= 1 is required by the standard
        w1 = max(width - 1.0, 1e-6)
        y = (x - (center - 0.5)) / w1 + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def _dicom_meta(ds: Any) -> dict[str, Any]:
    """A few identifying-but-not-personal tags (no patient data)."""
    out: dict[str, Any] = {}
    for key in ("SOPInstanceUID", "SeriesInstanceUID", "Modality", "PhotometricInterpretation"):
        v = ds.get(key)
        if v is not None:
            out[key] = str(v)
    spacing = _fg_value(ds, 0, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is not None:
        try:
            out["PixelSpacing"] = [float(s) for s in spacing]
        except (TypeError, ValueError):
            pass
    for key in ("BitsAllocated", "BitsStored", "PixelRepresentation", "Rows", "Columns"):
        v = ds.get(key)
        if v is not None:
            out[key] = int(v)
    return out


def _read_dicom(path: Path, max_pixels: int | None) -> list[ImageRecord]:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise DependencyError("pydicom", "medical", "reading DICOM") from exc
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import (  # type: ignore[no-redef]
            apply_color_lut,
            apply_modality_lut,
            apply_voi,
        )

    try:
        ds = pydicom.dcmread(path, defer_size="1 MB", force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as exc:
        raise InputError(path, f"not a readable DICOM file: {exc}") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        with open(path, "rb") as f:
            has_magic = f.read(132)[128:132] == b"DICM"
        if not has_magic:
            raise InputError(
                path, "not a valid DICOM file: no 'DICM' signature and no pixel data found"
            )
        sop = ds.get("SOPClassUID")
        kind = f" (SOP class {sop.name})" if sop is not None and hasattr(sop, "name") else ""
        raise InputError(
            path, f"DICOM file holds no pixel data{kind}; it is not an image (or is truncated)"
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0:
        raise InputError(path, "DICOM file has no valid Rows/Columns")
    _check_pixels(path, rows * cols * n_frames, max_pixels, what=f"DICOM ({n_frames} frames)")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, truncated pixel data, ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        tsname = getattr(ts, "name", str(ts)) if ts is not None else "unknown"
        hint = ""
        if ts is not None and getattr(ts, "is_compressed", False):
            hint = (
                "; compressed DICOM needs a decoder plugin, e.g. "
                "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
            )
        raise InputError(
            path, f"cannot decode DICOM pixel data (transfer syntax {tsname}): {exc}{hint}"
        ) from exc

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    color = samples > 1 or photometric == "PALETTE COLOR"
    if arr.ndim == (3 if samples > 1 else 2):  # a single frame: add the frame axis
        arr = arr[None]
    n = arr.shape[0]
    tags = _dicom_meta(ds)
    base_warn: list[str] = []

    frames: list[np.ndarray] = []
    how: list[str] = []
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(arr, ds))
        desc = ds.get("RedPaletteColorLookupTableDescriptor")
        lut_bits = int(desc[2]) if desc is not None and len(desc) > 2 else 16
        denom = 255.0 if lut_bits <= 8 else 65535.0
        for i in range(n):
            frames.append(np.clip(rgb[i].astype(np.float32) / np.float32(denom), 0, 1))
            how.append(f"palette/{int(denom)}")
    elif color:  # RGB (pydicom converts YBR to RGB when decoding)
        bits_stored = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 8)
        for i in range(n):
            x, s = _scale_array(arr[i], base_warn, bits=bits_stored)
            frames.append(x)
            how.append(s)
    else:
        values: list[np.ndarray] = []
        voi: list[tuple[str, Any]] = []
        for i in range(n):
            slope = _first_number(
                _fg_value(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
            )
            icpt = _first_number(
                _fg_value(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
            )
            if "ModalityLUTSequence" in ds:
                v = np.asarray(apply_modality_lut(arr[i], ds), dtype=np.float64)
                mod = "modality-lut-seq"
            else:
                v = arr[i].astype(np.float64) * (1.0 if slope is None else slope) + (
                    0.0 if icpt is None else icpt
                )
                mod = f"rescale({slope if slope is not None else 1.0:g},"
                mod += f"{icpt if icpt is not None else 0.0:g})"
            values.append(v)
            center = _first_number(_fg_value(ds, i, "FrameVOILUTSequence", "WindowCenter"))
            width = _first_number(_fg_value(ds, i, "FrameVOILUTSequence", "WindowWidth"))
            func = _fg_value(ds, i, "FrameVOILUTSequence", "VOILUTFunction")
            func = str(func).strip().upper() if func else "LINEAR"
            if "VOILUTSequence" in ds:
                voi.append(("lut", mod))
            elif center is not None and width is not None and width > 0:
                voi.append((("window", center, width, func), mod))
            else:
                voi.append((None, mod))
        lo, hi = np.inf, -np.inf  # min/max over every frame of the file
        for v in values:
            fin = v[np.isfinite(v)]
            if fin.size:
                lo, hi = min(lo, float(fin.min())), max(hi, float(fin.max()))
        if not np.isfinite(lo):
            lo, hi = 0.0, 1.0
        for i in range(n):
            kind, mod = voi[i]
            if kind == "lut":
                stored = np.rint(values[i]).astype(np.int64)  # VOI LUT input: modality output
                lut_out = np.asarray(apply_voi(stored, ds, index=0), dtype=np.float64)
                lut_data = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
                lmin, lmax = float(lut_data.min()), float(lut_data.max())
                x = np.clip((lut_out - lmin) / max(lmax - lmin, 1e-12), 0, 1).astype(np.float32)
                how.append(f"{mod},voi-lut-seq")
            elif kind is not None:
                _, c, w, func = kind
                x = _window(values[i], c, w, func)
                how.append(f"{mod},window({c:g},{w:g},{func.lower()})")
            else:
                x = (
                    np.clip((values[i] - lo) / (hi - lo), 0, 1)
                    if hi > lo
                    else np.zeros_like(values[i])
                )
                x = x.astype(np.float32)
                how.append(f"{mod},minmax({lo:g},{hi:g})")
            if photometric == "MONOCHROME1":
                x = 1.0 - x
                how[-1] += ",inverted"
            frames.append(x)

    digits = _digits(n)
    records = []
    for i, x in enumerate(frames):
        meta = _base_meta(path, "dicom")
        meta.update(tags)
        meta["dtype"] = str(arr.dtype)
        meta["bits"] = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 8)
        meta["frame"] = i if n > 1 else None
        meta["frames_in_file"] = n
        meta["scaling"] = how[i]
        meta["orientation"] = 1
        records.append(_finish(x, meta, list(base_warn), f".f{i:0{digits}d}" if n > 1 else ""))
    return records


# ----------------------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------------------


def _iter_nifti(path: Path, max_pixels: int | None, axis: int) -> Iterator[ImageRecord]:
    try:
        import nibabel
    except ImportError as exc:
        raise DependencyError("nibabel", "medical", "reading NIfTI") from exc
    try:
        img = nibabel.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, ...
        raise InputError(path, f"not a readable NIfTI file: {exc}") from exc
    warn: list[str] = []
    if len(shape) > 3:
        extra = shape[3:]
        if int(np.prod(extra)) > 1:
            warn.append(f"4D+ volume {shape}: only the first volume is used")
        shape = shape[:3]
    if len(shape) < 2 or 0 in shape:
        raise InputError(path, f"NIfTI volume has unusable shape {tuple(img.shape)}")
    _check_pixels(path, int(np.prod(shape)), max_pixels, what=f"NIfTI volume {shape}")
    ndim3 = len(shape) == 3
    if ndim3:
        if not -3 <= axis <= 2:
            raise ConfigError(f"nifti_axis must be one of -3..2 for a 3D volume, got {axis}")
        ax = axis % 3
    else:
        ax = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataobj = img.dataobj
            if len(img.shape) > 3:
                data = np.asarray(
                    dataobj[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)], dtype=np.float32
                )
            else:
                data = np.asarray(dataobj, dtype=np.float32)
    except Exception as exc:  # truncated data, unsupported dtype (RGB24), gzip errors
        raise InputError(path, f"cannot read NIfTI voxel data: {exc}") from exc
    if data.ndim != len(shape):
        data = data.reshape(shape)
    finite = np.isfinite(data)
    if not finite.all():
        warn.append(f"{int((~finite).sum())} non-finite voxels set to 0")
        data = np.where(finite, data, np.float32(0.0))
    lo = float(data.min()) if data.size else 0.0
    hi = float(data.max()) if data.size else 1.0
    scale = np.float32(1.0 / (hi - lo)) if hi > lo else np.float32(0.0)
    try:
        affine = np.asarray(img.affine, dtype=float).tolist()
    except Exception:
        affine = None
    try:
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    except Exception:
        zooms = None
    orig_dtype = str(img.get_data_dtype())
    common = {
        "dtype": orig_dtype,
        "bits": int(np.dtype(orig_dtype).itemsize * 8) if orig_dtype != "object" else None,
        "affine": affine,
        "axis": ax,
        "volume_shape": list(shape),
        "zooms": zooms,
        "scaling": f"volume-minmax({lo:g},{hi:g})",
        "display": "rot90",
        "orientation": 1,
    }
    if not ndim3:
        meta = _base_meta(path, "nifti")
        meta.update(common)
        yield _finish(np.rot90((data - lo) * scale), meta, warn)
        return
    n = shape[ax]
    digits = _digits(n)
    for k in range(n):
        sl = np.take(data, k, axis=ax)  # (n0, n1) in the order of the remaining axes
        x = np.rot90((sl - np.float32(lo)) * scale).astype(np.float32)
        meta = _base_meta(path, "nifti")
        meta.update(common)
        meta["slice"] = k
        yield _finish(x, meta, list(warn), f".s{k:0{digits}d}")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def iter_image_records(
    path: str | Path,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    nifti_axis: int = -1,
) -> Iterator[ImageRecord]:
    """Yield every image in ``path`` (one per DICOM frame / NIfTI slice), decoding lazily.

    For volumes only one slice's RGB copy exists at a time, which keeps memory at the size of the
    volume itself. Errors (unreadable file, too many pixels) are raised on the first ``next()``.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt in ("png", "jpeg", "bmp"):
        yield _read_pil_file(path, fmt, max_pixels)
    elif fmt == "tiff":
        yield _read_tiff(path, max_pixels)
    elif fmt == "dicom":
        yield from _read_dicom(path, max_pixels)
    elif fmt == "nifti":
        yield from _iter_nifti(path, max_pixels, nifti_axis)
    else:  # pragma: no cover - detect_format returns only the formats above
        raise InputError(path, f"unsupported format {fmt!r}")


def read_image_records(
    path: str | Path,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    nifti_axis: int = -1,
) -> list[ImageRecord]:
    """All images in ``path`` as a list (see :func:`iter_image_records`)."""
    records = list(iter_image_records(path, max_pixels=max_pixels, nifti_axis=nifti_axis))
    if not records:
        raise InputError(path, "file holds no image")
    return records


def read_image(path: str | Path, **kw: Any) -> ImageRecord:
    """The first (or only) image of ``path``; raises :class:`InputError` if it holds none."""
    for rec in iter_image_records(path, **kw):
        return rec
    raise InputError(path, "file holds no image")


def to_float_rgb(
    obj: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, dict]:
    """Path | PIL.Image | ndarray (HxW, HxWx1/3/4; uint8, uint16, float, bool) -> (H,W,3) [0,1].

    Returns the float32 image and its metadata dict (same keys as :class:`ImageRecord.meta`).
    Scaling follows the module rules (uint16 ``/65535``, float outside [0, 1] min/max normalised).
    """
    if isinstance(obj, (str, Path)):
        rec = read_image(obj, max_pixels=max_pixels)
        return rec.image, rec.meta
    warn: list[str] = []
    if isinstance(obj, Image.Image):
        meta = _base_meta(None, "pil")
        _check_pixels(Path("<PIL image>"), obj.size[0] * obj.size[1], max_pixels)
        x, scaling = _pil_to_float(obj, warn, meta)
        meta["scaling"] = scaling
        rec = _finish(x, meta, warn)
        return rec.image, rec.meta
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        if arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4) and arr.shape[0] in (1, 3, 4):
            raise ValueError(
                f"array of shape {arr.shape} looks channel-first; pass (H, W, C) (HxWx3)"
            )
        if arr.ndim not in (2, 3):
            raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {arr.shape}")
        meta = _base_meta(None, "array")
        meta["dtype"] = str(arr.dtype)
        meta["bits"] = int(arr.dtype.itemsize * 8) if arr.dtype != np.bool_ else 1
        x, scaling = _scale_array(arr, warn)
        meta["scaling"] = scaling
        rec = _finish(x, meta, warn)
        return rec.image, rec.meta
    raise TypeError(
        f"cannot make an image from {type(obj).__name__}: pass a path, a PIL image or an "
        "(H, W) / (H, W, 3) numpy array"
    )
