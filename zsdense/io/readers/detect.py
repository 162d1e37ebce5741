"""Format detection from a file's magic bytes; the extension only breaks ties.

Ties: DICOM without its 128-byte preamble (trusted when the name ends ``.dcm``/``.dicom``) and
gzipped NIfTI (``.nii.gz``, whose inner header is checked). A file whose content contradicts its
extension (a text file named ``.png``) is an :class:`~zsdense.errors.InputError`, as is a missing,
empty or unrecognised file.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

from zsdense.errors import InputError
from zsdense.io.readers.common import EXT_FORMAT, FORMAT_NAMES, SUPPORTED_TEXT

#: Bytes read from the start of a file to recognise it (a NIfTI-2 header needs 544).
HEAD_BYTES = 544


def extension(path: Path) -> str:
    """Lower-case extension, with ``.nii.gz`` as one double suffix."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def sniff(head: bytes) -> str | None:
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
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
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
    """Return ``"png" | "jpeg" | "bmp" | "gif" | "webp" | "tiff" | "dicom" | "nifti"``.

    The answer comes from the file's content. Raises :class:`InputError` for a missing, empty,
    unknown or mislabelled file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not an image file")
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as exc:
        raise InputError(path, f"cannot open file: {exc.strerror or exc}") from exc
    if not head:
        raise InputError(path, "file is empty (0 bytes)")
    ext = extension(path)
    expected = EXT_FORMAT.get(ext)
    fmt = sniff(head)
    if fmt is None and head.startswith(b"\x1f\x8b") and expected == "nifti":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(HEAD_BYTES)
        except (OSError, EOFError) as exc:
            raise InputError(path, f"corrupt gzip-compressed NIfTI file: {exc}") from exc
        fmt = sniff(inner)
        if fmt != "nifti":
            raise InputError(path, "gzip file does not contain a NIfTI-1/NIfTI-2 header")
    if fmt is None and expected == "dicom":
        fmt = "dicom"  # DICOM without the 128-byte preamble: let pydicom try (force=True)
    if fmt is not None:
        return fmt
    if expected is not None:
        raise InputError(
            path,
            f"not a valid {FORMAT_NAMES[expected]} file: its content does not start with a "
            f"{FORMAT_NAMES[expected]} signature (first bytes: {head[:16]!r})",
        )
    raise InputError(
        path,
        f"unsupported file type {ext or '(no extension)'!r} and unrecognised content; "
        f"supported formats: {SUPPORTED_TEXT}",
    )
