"""DICOM (pydicom, an optional dependency imported only here, when a DICOM file is read).

Scaling: modality LUT (rescale slope/intercept, per frame from the functional groups, or the
Modality LUT Sequence), then the VOI LUT Sequence if present, else the first Window Center/Width
pair (LINEAR, LINEAR_EXACT or SIGMOID), else min/max over all frames of the file. MONOCHROME1 is
inverted afterwards. Colour data is scaled by its stored bits; palette colour uses the LUTs.
A multi-frame file gives one record per frame, suffix ``.fNNN`` (0-based, at least 3 digits);
``max_pixels`` bounds the pixels of all frames together. Only a few identifying-but-not-personal
tags are copied to ``meta`` (no patient data).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from zsdense.errors import DependencyError, InputError
from zsdense.io.readers.common import (
    ImageRecord,
    base_meta,
    check_pixels,
    digits,
    finish,
    scale_array,
)


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


class _Pydicom(NamedTuple):
    """The pydicom functions a read needs (pydicom 3 and 2.x name them in other modules)."""

    dcmread: Callable
    invalid: type[Exception]
    apply_color_lut: Callable
    apply_modality_lut: Callable
    apply_voi: Callable


def read_dicom(path: Path, max_pixels: int | None) -> list[ImageRecord]:
    """Every frame of a DICOM file as a record (one record, suffix ``""``, for one frame)."""
    api = _pydicom()
    ds = _open(path, api)
    _check_size(path, ds, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    arr = _decode(path, ds)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if arr.ndim == (3 if samples > 1 else 2):  # a single frame: add the frame axis
        arr = arr[None]
    warn: list[str] = []
    if photometric == "PALETTE COLOR":
        frames, how = _palette_frames(arr, ds, api)
    elif samples > 1:  # RGB (pydicom converts YBR to RGB when decoding)
        frames, how = _colour_frames(arr, ds, warn)
    else:
        frames, how = _monochrome_frames(arr, ds, api, inverted=photometric == "MONOCHROME1")
    return _records(path, ds, arr, frames, how, warn)


def _pydicom() -> _Pydicom:
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
    return _Pydicom(
        pydicom.dcmread, InvalidDicomError, apply_color_lut, apply_modality_lut, apply_voi
    )


def _open(path: Path, api: _Pydicom) -> Any:
    """The dataset (pixel data read lazily); InputError for a file that holds no image."""
    try:
        ds = api.dcmread(path, defer_size="1 MB", force=True)
    except (api.invalid, OSError, EOFError, ValueError, struct.error) as exc:
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
    return ds


def _check_size(path: Path, ds: Any, max_pixels: int | None) -> None:
    """Rows and Columns present, and the pixels of all frames within ``max_pixels``."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0:
        raise InputError(path, "DICOM file has no valid Rows/Columns")
    check_pixels(path, rows * cols * n_frames, max_pixels, what=f"DICOM ({n_frames} frames)")


def _decode(path: Path, ds: Any) -> np.ndarray:
    """The stored pixel values; InputError naming the transfer syntax (and the decoder plugins
    for a compressed one) when they cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
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


def _palette_frames(arr: np.ndarray, ds: Any, api: _Pydicom) -> tuple[list[np.ndarray], list[str]]:
    """PALETTE COLOR: the colour LUTs applied, scaled by the LUT's bit depth."""
    rgb = np.asarray(api.apply_color_lut(arr, ds))
    desc = ds.get("RedPaletteColorLookupTableDescriptor")
    lut_bits = int(desc[2]) if desc is not None and len(desc) > 2 else 16
    denom = 255.0 if lut_bits <= 8 else 65535.0
    frames = [np.clip(rgb[i].astype(np.float32) / np.float32(denom), 0, 1) for i in range(len(arr))]
    return frames, [f"palette/{int(denom)}"] * len(arr)


def _colour_frames(arr: np.ndarray, ds: Any, warn: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """Colour samples scaled by their stored bits (notes go to ``warn``)."""
    bits_stored = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 8)
    scaled = [scale_array(arr[i], warn, bits=bits_stored) for i in range(len(arr))]
    return [x for x, _ in scaled], [s for _, s in scaled]


def _monochrome_frames(
    arr: np.ndarray, ds: Any, api: _Pydicom, *, inverted: bool
) -> tuple[list[np.ndarray], list[str]]:
    """Modality LUT, then VOI (LUT sequence, window, else the min/max over every frame of the
    file, so frames stay comparable), then MONOCHROME1's inversion."""
    values: list[np.ndarray] = []
    voi: list[tuple[Any, str]] = []
    for i in range(len(arr)):
        v, mod = _modality(arr[i], ds, i, api)
        values.append(v)
        voi.append((_voi_of_frame(ds, i), mod))
    lo, hi = _file_range(values)
    frames: list[np.ndarray] = []
    how: list[str] = []
    for v, (kind, mod) in zip(values, voi):
        x, desc = _apply_voi(v, kind, ds, lo, hi, api)
        how.append(f"{mod},{desc}")
        if inverted:
            x = 1.0 - x
            how[-1] += ",inverted"
        frames.append(x)
    return frames, how


def _modality(frame: np.ndarray, ds: Any, i: int, api: _Pydicom) -> tuple[np.ndarray, str]:
    """Frame ``i``'s modality output (float64) and how it was made."""
    slope = _first_number(_fg_value(ds, i, "PixelValueTransformationSequence", "RescaleSlope"))
    icpt = _first_number(_fg_value(ds, i, "PixelValueTransformationSequence", "RescaleIntercept"))
    if "ModalityLUTSequence" in ds:
        return np.asarray(api.apply_modality_lut(frame, ds), dtype=np.float64), "modality-lut-seq"
    v = frame.astype(np.float64) * (1.0 if slope is None else slope) + (
        0.0 if icpt is None else icpt
    )
    mod = f"rescale({slope if slope is not None else 1.0:g},"
    mod += f"{icpt if icpt is not None else 0.0:g})"
    return v, mod


def _voi_of_frame(ds: Any, i: int) -> Any:
    """``"lut"`` (VOI LUT Sequence), ``("window", center, width, function)``, or None."""
    center = _first_number(_fg_value(ds, i, "FrameVOILUTSequence", "WindowCenter"))
    width = _first_number(_fg_value(ds, i, "FrameVOILUTSequence", "WindowWidth"))
    func = _fg_value(ds, i, "FrameVOILUTSequence", "VOILUTFunction")
    func = str(func).strip().upper() if func else "LINEAR"
    if "VOILUTSequence" in ds:
        return "lut"
    if center is not None and width is not None and width > 0:
        return ("window", center, width, func)
    return None


def _file_range(values: list[np.ndarray]) -> tuple[float, float]:
    """Min and max of the finite values over every frame ([0, 1] when there is none)."""
    lo, hi = np.inf, -np.inf
    for v in values:
        fin = v[np.isfinite(v)]
        if fin.size:
            lo, hi = min(lo, float(fin.min())), max(hi, float(fin.max()))
    if not np.isfinite(lo):
        lo, hi = 0.0, 1.0
    return lo, hi


def _apply_voi(
    v: np.ndarray, kind: Any, ds: Any, lo: float, hi: float, api: _Pydicom
) -> tuple[np.ndarray, str]:
    """One frame's modality output to float32 [0, 1] by its VOI (see :func:`_voi_of_frame`)."""
    if kind == "lut":
        stored = np.rint(v).astype(np.int64)  # VOI LUT input: modality output
        lut_out = np.asarray(api.apply_voi(stored, ds, index=0), dtype=np.float64)
        lut_data = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        lmin, lmax = float(lut_data.min()), float(lut_data.max())
        x = np.clip((lut_out - lmin) / max(lmax - lmin, 1e-12), 0, 1).astype(np.float32)
        return x, "voi-lut-seq"
    if kind is not None:
        _, c, w, func = kind
        return _window(v, c, w, func), f"window({c:g},{w:g},{func.lower()})"
    x = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    return x.astype(np.float32), f"minmax({lo:g},{hi:g})"


def _records(
    path: Path,
    ds: Any,
    arr: np.ndarray,
    frames: list[np.ndarray],
    how: list[str],
    warn: list[str],
) -> list[ImageRecord]:
    """One record per frame (suffix ``.fNNN`` when the file holds several)."""
    n = len(frames)
    nd = digits(n)
    tags = _dicom_meta(ds)
    records = []
    for i, x in enumerate(frames):
        meta = base_meta(path, "dicom")
        meta.update(tags)
        meta["dtype"] = str(arr.dtype)
        meta["bits"] = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 8)
        meta["frame"] = i if n > 1 else None
        meta["frames_in_file"] = n
        meta["scaling"] = how[i]
        meta["orientation"] = 1
        records.append(finish(x, meta, list(warn), f".f{i:0{nd}d}" if n > 1 else ""))
    return records
