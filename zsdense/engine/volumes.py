"""Write per-slice float maps of NIfTI inputs back as NIfTI volumes with the input's affine.

Why: a radiologist's viewer overlays a map on the scan only when it shares the scan's voxel grid
and affine. After a run, for each NIfTI input whose slices are all ``ok`` in the manifest, the
slice maps (``.map.tiff`` / ``.map.npy``, one per slice) are read back from disk (so slices done
by an earlier, interrupted run count too), un-rotated from the display view the reader used
(``np.rot90`` of the voxel slice) and stacked along the slicing axis:
``<stem>.map.nii.gz`` (one task) or ``<stem>.<task>.map.nii.gz``. A ``(K, H, W)`` map (class
probabilities) gives a 4D volume ``(X, Y, Z, K)``. The slice masks are stacked the same way into
``<stem>[.<task>].mask.nii.gz`` (uint8: 0/1 for a binary mask, the class index for a label map),
so the decision can be overlaid on the scan as a segmentation. The files are gzip-compressed
with a fixed timestamp, so the same maps give the same bytes, and written atomically.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Sequence

import numpy as np

from zsdense.errors import DependencyError
from zsdense.io.manifest import MANIFEST_NAME, Manifest, out_stem
from zsdense.io.writers import atomic_path


def _read_map(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    import tifffile

    return tifffile.imread(path)


def _read_mask(path: Path) -> np.ndarray:
    """A mask PNG as uint8: a palette (label) PNG keeps its class indices, a 0/255 mask -> 0/1."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
        if im.mode == "P":
            return arr.astype(np.uint8)
    return (arr > 0).astype(np.uint8)


def _maps_by_task(outputs: dict, kind: str = "map") -> dict[str | None, str]:
    """``{"map": p}`` -> ``{None: p}``; ``{task: {"map": p}}`` -> ``{task: p}`` (``kind``:
    the output, ``map`` or ``mask``)."""
    found: dict[str | None, str] = {}
    if isinstance(outputs.get(kind), str):
        found[None] = outputs[kind]
    for k, v in outputs.items():
        if isinstance(v, dict) and isinstance(v.get(kind), str):
            found[k] = v[kind]
    return found


def slice_to_voxels(map_hw: np.ndarray) -> np.ndarray:
    """Inverse of the reader's display view: ``(H, W[, ...])`` -> the voxel slice ``(n0, n1)``."""
    return np.rot90(map_hw, k=-1, axes=(0, 1))


def volume_from_slices(
    slices: dict[int, np.ndarray], shape: Sequence[int], axis: int, dtype=np.float32
) -> np.ndarray:
    """Stack display-view slice maps (index -> ``(H, W)`` or ``(K, H, W)``) into the volume."""
    first = next(iter(slices.values()))
    extra = () if first.ndim == 2 else (first.shape[0],)
    vol = np.zeros(tuple(shape[:3]) + extra, dtype=dtype)
    for k, m in slices.items():
        m = np.asarray(m, dtype=dtype)
        if m.ndim == 3:
            m = np.moveaxis(m, 0, -1)  # (H, W, K)
        sl = slice_to_voxels(m)
        index = [slice(None)] * 3
        index[axis] = k
        vol[tuple(index)] = sl
    return vol


def write_nifti_gz(
    path: Path, vol: np.ndarray, affine: np.ndarray, like=None, dtype=np.float32
) -> Path:
    """Write ``vol`` as a gzipped NIfTI-1 with ``affine`` (units/qform copied from ``like``)."""
    try:
        import nibabel
    except ImportError as exc:
        raise DependencyError("nibabel", "medical", "writing NIfTI volume maps") from exc

    header = None
    if like is not None:
        header = like.header.copy()
        header.set_data_dtype(dtype)
    img = nibabel.Nifti1Image(vol.astype(dtype), affine, header=header)
    img.header.set_data_dtype(dtype)
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    raw = img.to_bytes()
    data = gzip.compress(raw, compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_volume_maps(out_dir: str | Path, items: Sequence, masks_only: bool = False) -> list[Path]:
    """For every NIfTI item with all slices ok, write its map volume(s) and mask volume(s);
    returns the paths. ``masks_only``: the mask volumes only (``zsdense decide``)."""

    out_dir = Path(out_dir)
    records = Manifest(out_dir / MANIFEST_NAME).load().values()
    by_item: dict[str, list[dict]] = {}
    for r in records:
        if (r.get("meta", {}).get("image", {}) or {}).get("format") == "nifti":
            by_item.setdefault(str(r.get("item")), []).append(r)
    written: list[Path] = []
    kinds = (("mask", _read_mask, np.uint8),)
    if not masks_only:
        kinds = (("map", _read_map, np.float32),) + kinds
    for it in items:
        recs = by_item.get(it.key)
        if not recs:
            continue
        expected = max(int(r.get("item_records", 1) or 1) for r in recs)
        if len(recs) < expected or any(r.get("status") != "ok" for r in recs):
            continue
        meta0 = recs[0]["meta"]["image"]
        axis = meta0.get("axis")
        shape = meta0.get("volume_shape")
        if axis is None or not shape or len(shape) != 3:
            continue  # a 2D NIfTI: its single map is already the result
        try:
            import nibabel

            like = nibabel.load(str(it.path))
            affine = np.asarray(like.affine, dtype=float)
        except Exception:  # the input moved: fall back to the affine kept in the manifest
            like = None
            affine = np.asarray(meta0.get("affine") or np.eye(4), dtype=float)
        for kind, read, dtype in kinds:
            tasks = _maps_by_task(recs[0].get("outputs", {}), kind)
            for task in tasks:
                slices: dict[int, np.ndarray] = {}
                for r in recs:
                    p = _maps_by_task(r.get("outputs", {}), kind).get(task)
                    k = r["meta"]["image"].get("slice")
                    if p is None or k is None:
                        break
                    slices[int(k)] = read(out_dir / p)
                else:
                    vol = volume_from_slices(slices, shape, int(axis), dtype)
                    stem = out_stem(out_dir, it, "", task)
                    path = Path(f"{stem}.{kind}.nii.gz")
                    written.append(write_nifti_gz(path, vol, affine, like, dtype))
    return written
