"""NIfTI (nibabel, an optional dependency imported only here, when a NIfTI file is read).

The scaled data (``scl_slope``/``scl_inter`` applied by nibabel) is normalised by the min/max of
the whole volume, not per slice, so intensities are comparable across slices; non-finite voxels
become 0. A 3D volume gives one record per slice along ``nifti_axis`` (suffix ``.sNNN``); a 4D+
volume uses its first volume. Slices are shown as ``np.rot90(slice)`` (the usual
``imshow(slice.T, origin="lower")`` view): output pixel ``(r, c)`` of slice ``k`` along axis ``a``
is voxel index ``(c, n1 - 1 - r)`` in the two remaining axes (in their order), with ``k`` on axis
``a``. Slices are produced lazily, so only one slice's RGB copy exists at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from zsdense.errors import ConfigError, DependencyError, InputError
from zsdense.io.readers.common import ImageRecord, base_meta, check_pixels, digits, finish


def iter_nifti(path: Path, max_pixels: int | None, axis: int) -> Iterator[ImageRecord]:
    """Yield the slices of a NIfTI volume along ``axis`` (a 2D image gives one record)."""
    img, shape = _load(path)
    warn: list[str] = []
    shape = _volume_shape(path, img, shape, warn)
    check_pixels(path, int(np.prod(shape)), max_pixels, what=f"NIfTI volume {shape}")
    ax = _slice_axis(shape, axis)
    data = _finite(_voxels(path, img, shape), warn)
    lo = float(data.min()) if data.size else 0.0
    hi = float(data.max()) if data.size else 1.0
    scale = np.float32(1.0 / (hi - lo)) if hi > lo else np.float32(0.0)
    common = _volume_meta(img, shape, ax, lo, hi)
    if ax is None:
        meta = base_meta(path, "nifti")
        meta.update(common)
        yield finish(np.rot90((data - lo) * scale), meta, warn)
        return
    n = shape[ax]
    nd = digits(n)
    for k in range(n):
        sl = np.take(data, k, axis=ax)  # (n0, n1) in the order of the remaining axes
        x = np.rot90((sl - np.float32(lo)) * scale).astype(np.float32)
        meta = base_meta(path, "nifti")
        meta.update(common)
        meta["slice"] = k
        yield finish(x, meta, list(warn), f".s{k:0{nd}d}")


def _load(path: Path) -> tuple[Any, tuple[int, ...]]:
    """The nibabel image (header read, voxels not yet) and its shape."""
    try:
        import nibabel
    except ImportError as exc:
        raise DependencyError("nibabel", "medical", "reading NIfTI") from exc
    try:
        img = nibabel.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, ...
        raise InputError(path, f"not a readable NIfTI file: {exc}") from exc
    return img, shape


def _volume_shape(path: Path, img: Any, shape: tuple[int, ...], warn: list[str]) -> tuple[int, ...]:
    """The 2D or 3D shape that is read (a 4D+ volume: its first volume, said in ``warn``)."""
    if len(shape) > 3:
        extra = shape[3:]
        if int(np.prod(extra)) > 1:
            warn.append(f"4D+ volume {shape}: only the first volume is used")
        shape = shape[:3]
    if len(shape) < 2 or 0 in shape:
        raise InputError(path, f"NIfTI volume has unusable shape {tuple(img.shape)}")
    return shape


def _slice_axis(shape: tuple[int, ...], axis: int) -> int | None:
    """The slicing axis of a 3D volume (0..2); None for a 2D image."""
    if len(shape) != 3:
        return None
    if not -3 <= axis <= 2:
        raise ConfigError(f"nifti_axis must be one of -3..2 for a 3D volume, got {axis}")
    return axis % 3


def _voxels(path: Path, img: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The scaled voxel data (``scl_slope``/``scl_inter`` applied) as float32 of ``shape``."""
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
    return data.reshape(shape) if data.ndim != len(shape) else data


def _finite(data: np.ndarray, warn: list[str]) -> np.ndarray:
    """Non-finite voxels set to 0 (how many, said in ``warn``)."""
    finite = np.isfinite(data)
    if finite.all():
        return data
    warn.append(f"{int((~finite).sum())} non-finite voxels set to 0")
    return np.where(finite, data, np.float32(0.0))


def _volume_meta(
    img: Any, shape: tuple[int, ...], ax: int | None, lo: float, hi: float
) -> dict[str, Any]:
    """What every slice's meta says about its volume (dtype, affine, zooms, scaling, ...)."""
    try:
        affine = np.asarray(img.affine, dtype=float).tolist()
    except Exception:
        affine = None
    try:
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    except Exception:
        zooms = None
    orig_dtype = str(img.get_data_dtype())
    return {
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
