"""Read any supported image file into float RGB in [0, 1] plus JSON-safe metadata.

Why this package exists: every task head wants the same thing, an ``(H, W, 3)`` float32 image in
``[0, 1]``, whatever the file held (8/16-bit PNG, CMYK JPEG, float TIFF, a DICOM series frame, a
NIfTI slice). The conversion rules live in :mod:`~zsdense.io.readers.common`; each format has its
own module (:mod:`.pil` for PNG/JPEG/BMP/GIF/WebP, :mod:`.tiff`, :mod:`.dicom`, :mod:`.nifti`;
pydicom and nibabel are imported only in theirs, when such a file is read), and this module
dispatches on the format found by :func:`detect_format`.

* **Format detection** uses the file's magic bytes; the extension only breaks ties (DICOM without
  a preamble, gzipped NIfTI). A file whose content contradicts its extension (a text file named
  ``.png``) is an :class:`~zsdense.errors.InputError`, as is a zero-byte or truncated file.
* **Decompression bombs**: ``max_pixels`` bounds the pixels (voxels, for volumes, multi-frame
  DICOM and TIFF stacks) decoded from one file. It is checked from the header before any pixel is
  decoded. Pillow's own global limit is lifted only for the duration of the header parse, under a
  lock, and restored afterwards; our limit replaces it.
* **Scaling to [0, 1]** (recorded in ``meta["scaling"]``):

  - ``bool`` -> 0/1; ``uint8`` -> ``/255``; ``uint16`` -> ``/65535``, or ``/(2**bits - 1)`` when a
    TIFF declares fewer bits per sample (10/12/14). 16-bit data is never clipped to 8 bits (we do
    not use Pillow's ``convert("RGB")`` on 16-bit modes; 16-bit RGB PNGs are decoded with OpenCV,
    which keeps all 16 bits).
  - float data already inside ``[0, 1]`` is kept as is; otherwise it is min/max normalised over
    its finite values (NaN -> 0, +inf -> 1, -inf -> 0). Signed and 32-bit integers are min/max
    normalised too. A constant image outside [0, 1] is clipped.
  - DICOM: modality LUT, VOI LUT / window, else min/max over all frames (see :mod:`.dicom`).
  - NIfTI: min/max of the whole volume, not per slice (see :mod:`.nifti`).

* **Colour**: grayscale is replicated to three channels (``meta["channels"]`` says 1); alpha is
  dropped, as Pillow's ``convert("RGB")`` does, so 8-bit results match the reference pipelines of
  the published methods; palette, CMYK and YCbCr images are converted with Pillow's conversions.
* **EXIF / TIFF orientation** is applied (pixels rotated/flipped to display orientation);
  ``meta["orientation"]`` keeps the tag value. In-memory PIL images given to
  :func:`to_float_rgb` are taken as they are (no EXIF transpose).
* **GIF / WebP**: the first frame only (an animation is one picture); ``meta["frames_in_file"]``
  and a warning say when there were more.

Multi-image files give several :class:`ImageRecord`; their ``suffix`` (``".f003"`` for DICOM frame
3, ``".s012"`` for NIfTI slice 12, ``".p001"`` for page 1 of a TIFF stack; indices are 0-based, at
least 3 digits) is appended to output stems. Single images have suffix ``""``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zsdense.errors import ImageArrayError, InputError
from zsdense.io.readers.common import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    SUPPORTED_TEXT,
    ImageRecord,
    base_meta,
    check_pixels,
    finish,
    scale_array,
)
from zsdense.io.readers.detect import detect_format
from zsdense.io.readers.dicom import read_dicom
from zsdense.io.readers.nifti import iter_nifti
from zsdense.io.readers.pil import pil_to_float, read_pil_file
from zsdense.io.readers.tiff import iter_tiff

# Names kept from the single-module reader (used by zsdense.io.inputs and the tests).
_SUPPORTED_TEXT = SUPPORTED_TEXT
_scale_array = scale_array

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

#: Formats read by Pillow (one record: the first frame).
_PIL_FORMATS = ("png", "jpeg", "bmp", "gif", "webp")


def iter_image_records(
    path: str | Path,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    nifti_axis: int = -1,
) -> Iterator[ImageRecord]:
    """Yield every image in ``path`` (one per DICOM frame / NIfTI slice / TIFF stack page).

    Decoding is lazy for volumes and TIFF stacks: only one slice's or page's RGB copy exists at a
    time. Errors (unreadable file, too many pixels) are raised on the first ``next()``.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt in _PIL_FORMATS:
        yield read_pil_file(path, fmt, max_pixels)
    elif fmt == "tiff":
        yield from iter_tiff(path, max_pixels)
    elif fmt == "dicom":
        yield from read_dicom(path, max_pixels)
    elif fmt == "nifti":
        yield from iter_nifti(path, max_pixels, nifti_axis)
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


#: Channel counts accepted for in-memory arrays: gray, gray + alpha, RGB, RGBA.
_ARRAY_CHANNELS = (1, 2, 3, 4)
_ARRAY_SHAPES = "(H, W) gray or (H, W, C) with C = 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA)"


def _check_array(arr: np.ndarray) -> None:
    """Refuse arrays the scaling rules cannot turn into an image, with a message saying why."""
    kind = arr.dtype.kind
    if kind not in "buif":  # complex, object, strings, bytes, datetimes, structured
        raise ImageArrayError(
            f"unsupported array dtype {arr.dtype}: pass bool, integer (uint8, uint16, ...) or "
            "float pixel values"
        )
    if arr.ndim not in (2, 3):
        raise ImageArrayError(f"expected {_ARRAY_SHAPES}, got an array of shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageArrayError(f"empty image: array of shape {arr.shape} has no pixels")
    if arr.ndim == 3 and arr.shape[2] not in _ARRAY_CHANNELS:
        hint = ""
        if arr.shape[0] in _ARRAY_CHANNELS and arr.shape[0] != 2:
            hint = "; it looks channel-first: pass (H, W, C), e.g. arr.transpose(1, 2, 0)"
        raise ImageArrayError(
            f"unsupported channel count {arr.shape[2]} (array of shape {arr.shape}); "
            f"expected {_ARRAY_SHAPES}{hint}"
        )


def to_float_rgb(
    obj: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, dict]:
    """Path | PIL.Image | array -> the ``(H, W, 3)`` float32 image in [0, 1] and its metadata.

    Arrays: ``(H, W)`` or ``(H, W, C)`` with C = 1 (gray), 2 (gray + alpha; alpha dropped, as for
    an LA PNG), 3 (RGB) or 4 (RGBA; alpha dropped); dtype bool (0/1), unsigned / signed integers or
    floats. Scaling follows the package rules (``uint8 /255``, ``uint16 /65535``, float inside
    [0, 1] kept, other floats and signed integers min/max normalised with NaN -> 0, +inf -> 1,
    -inf -> 0). Refused with :class:`~zsdense.errors.ImageArrayError` (an ``InputError`` that is
    also a ``ValueError``): empty arrays (a zero height or width), other channel counts (e.g.
    HxWx7), channel-first arrays (3xHxW), other ranks, and complex / object / string dtypes;
    likewise an empty PIL image. Anything else (a number, a list of lists) is a ``TypeError``.
    Paths are read with :func:`read_image` (the first image of the file; a warning in the
    metadata says when the file holds more). The metadata has the same keys as
    :class:`ImageRecord.meta`.
    """
    if isinstance(obj, (str, Path)):
        rec = read_image(obj, max_pixels=max_pixels)
        if rec.suffix:  # a frame / slice / page of a multi-image file
            rec.meta["warnings"].append(
                f"the file holds several images; only the first ({rec.suffix}) is used "
                "(read_image_records gives them all)"
            )
        return rec.image, rec.meta
    warn: list[str] = []
    if isinstance(obj, Image.Image):
        if obj.size[0] == 0 or obj.size[1] == 0:
            raise ImageArrayError(f"empty image: PIL image of size {obj.size} has no pixels")
        meta = base_meta(None, "pil")
        check_pixels(Path("<PIL image>"), obj.size[0] * obj.size[1], max_pixels)
        x, scaling = pil_to_float(obj, warn, meta)
        meta["scaling"] = scaling
        rec = finish(x, meta, warn)
        return rec.image, rec.meta
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        _check_array(arr)
        meta = base_meta(None, "array")
        meta["dtype"] = str(arr.dtype)
        meta["bits"] = int(arr.dtype.itemsize * 8) if arr.dtype != np.bool_ else 1
        x, scaling = scale_array(arr, warn)
        meta["scaling"] = scaling
        rec = finish(x, meta, warn)
        return rec.image, rec.meta
    raise TypeError(
        f"cannot make an image from {type(obj).__name__}: pass a path, a PIL image or an "
        "(H, W) / (H, W, 3) numpy array"
    )
