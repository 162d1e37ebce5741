"""What every format reader shares: the record type, the format table, scaling to [0, 1], RGB
conversion, orientation and the decompression-bomb check.

Why one module: the conversion rules (documented in :mod:`zsdense.io.readers`) must be the same
whatever the file held, so each format module decodes its pixels and hands them to the helpers
here. Nothing in this module imports an optional dependency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zsdense.errors import InputError

DEFAULT_MAX_PIXELS = 200_000_000

#: Extensions picked up inside folders (lower case). ``.nii.gz`` is matched as a double suffix.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jpe",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".dcm",
    ".dicom",
    ".nii",
    ".nii.gz",
)

#: The format an extension promises (used to name a mislabelled file's expected format).
EXT_FORMAT = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".jpe": "jpeg",
    ".bmp": "bmp",
    ".gif": "gif",
    ".webp": "webp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
}

FORMAT_NAMES = {
    "png": "PNG",
    "jpeg": "JPEG",
    "bmp": "BMP",
    "gif": "GIF",
    "webp": "WebP",
    "tiff": "TIFF",
    "dicom": "DICOM",
    "nifti": "NIfTI",
}

SUPPORTED_TEXT = (
    "PNG, JPEG, BMP, GIF and WebP (first frame), TIFF (8/16-bit, float; one image per page), "
    "DICOM (.dcm) and NIfTI (.nii, .nii.gz)"
)


@dataclass
class ImageRecord:
    """One image decoded from a file.

    ``image`` is ``(H, W, 3)`` float32 in ``[0, 1]``; ``meta`` is JSON-serialisable (source, format,
    dtype, bits, orig_size ``[H, W]``, frame, slice, page, scaling, channels, warnings, ...);
    ``suffix`` is ``""`` for single-image files, else e.g. ``".f003"`` / ``".s012"`` / ``".p001"``.
    """

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    meta: dict = field(default_factory=dict)
    suffix: str = ""
    # (H, W, 3) uint8 with image == u8 / 255 (an 8-bit source), else None: handed to the image
    # context, whose 8-bit paths (SAM, PIL resizes) need not recover it from the floats
    u8: np.ndarray | None = field(default=None, repr=False)


def digits(n: int) -> int:
    """Zero-padded width of the index suffixes of a file holding ``n`` images (at least 3)."""
    return max(3, len(str(max(n - 1, 0))))


def minmax(x: np.ndarray, warn: list[str], what: str) -> np.ndarray:
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


def scale_array(
    arr: np.ndarray, warn: list[str], bits: int | None = None
) -> tuple[np.ndarray, str]:
    """Scale an integer/float/bool array to float32 [0, 1]; return it and a scaling description.

    ``bits`` is the declared bits per sample (TIFF, DICOM): 10/12/14-bit data in ``uint16`` is
    divided by ``2**bits - 1`` instead of 65535. Raises :class:`TypeError` for other dtypes
    (complex, object, strings), which callers turn into their own errors.
    """
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
        return minmax(x, warn, "float data outside [0, 1]"), "minmax"
    if np.issubdtype(dt, np.integer):
        return minmax(arr.astype(np.float64), warn, "integer data"), "minmax"
    raise TypeError(f"unsupported array dtype {dt}")


def to_rgb(
    x: np.ndarray, warn: list[str], *, alpha: bool = True, dtype: Any = np.float32
) -> tuple[np.ndarray, int]:
    """(H, W) / (H, W, C) float -> (H, W, 3) ``dtype``; return it and the source channel count.

    One rule for every format (:data:`CHANNEL_RULE`): 1 channel is replicated; 2 keep the first
    as grey; 3 are RGB; 4 keep the first three as RGB; 5 and more keep the first three as RGB.
    ``alpha``: the extra channel of 2 (grey + alpha) or 4 (RGBA) is declared alpha (PNG modes,
    a TIFF's ExtraSamples), dropped silently; otherwise (a 2- or 4-band TIFF, an H×W×C array
    file) a warning says what was dropped. 5 and more always warn.
    """
    if x.ndim == 2:
        ch = 1
        x = x[:, :, None]
    elif x.ndim == 3:
        ch = x.shape[2]
    else:
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {x.shape}")
    if ch == 1:
        rgb = np.repeat(x, 3, axis=2)
    elif ch == 2:  # gray + alpha, or two bands: the first as grey
        rgb = np.repeat(x[:, :, :1], 3, axis=2)
        if not alpha:
            warn.append("2 channels: the first is used as grey, the second is dropped")
    elif ch in (3, 4):
        rgb = x[:, :, :3]
        if ch == 4 and not alpha:
            warn.append("4 channels: the first 3 are used as RGB, the fourth is dropped")
    else:
        warn.append(f"{ch} channels: only the first 3 are used as RGB")
        rgb = x[:, :, :3]
    return np.ascontiguousarray(rgb, dtype=dtype), ch


#: How a file's channels become RGB (README, "input formats"; recorded as meta channels_used).
CHANNEL_RULE = "1: grey; 2: first as grey; 3: RGB; 4 and more: first 3 as RGB"


def channels_used(ch: int) -> list[int]:
    """The source channels an image of ``ch`` channels is read from (:func:`to_rgb`)."""
    return [0] if ch <= 2 else [0, 1, 2]


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
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


def check_pixels(path: Path, n: int, max_pixels: int | None, what: str = "image") -> None:
    """Refuse ``n`` pixels above ``max_pixels`` (checked from headers, before decoding)."""
    if max_pixels is not None and n > max_pixels:
        raise InputError(
            path,
            f"{what} has {n:,} pixels, more than the limit of {max_pixels:,} (a possible "
            "decompression bomb); raise the max_pixels limit if the file is trusted",
        )


def base_meta(path: Path | None, fmt: str) -> dict[str, Any]:
    """The first keys of every record's meta (their order is kept in the manifest)."""
    return {
        "source": str(path) if path is not None else None,
        "format": fmt,
        "frame": None,
        "slice": None,
    }


def finish(
    arr_float: np.ndarray,
    meta: dict,
    warn: list[str],
    suffix: str = "",
    *,
    alpha: bool = True,
    u8: np.ndarray | None = None,
) -> ImageRecord:
    """Scaled pixels -> an :class:`ImageRecord` with ``channels``, ``channels_used``,
    ``orig_size``, ``warnings`` (``alpha``: see :func:`to_rgb`). ``u8``: the uint8 pixels
    ``arr_float`` was divided from (``/255``), given the same channel rule as the record's
    ``u8``."""
    rgb, ch = to_rgb(arr_float, warn, alpha=alpha)
    meta["channels"] = ch
    meta["channels_used"] = channels_used(ch)
    meta["orig_size"] = [int(rgb.shape[0]), int(rgb.shape[1])]
    meta["warnings"] = list(warn)
    rgb_u8 = None if u8 is None else to_rgb(u8, [], alpha=alpha, dtype=np.uint8)[0]
    return ImageRecord(image=rgb, meta=meta, suffix=suffix, u8=rgb_u8)
