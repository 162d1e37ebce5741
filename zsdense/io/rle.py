"""COCO run-length encoding of binary masks, byte-identical to pycocotools' compressed RLE.

``{"size": [H, W], "counts": str}``: alternating run lengths (zeros first) of the column-major
flattening, each count written as the delta against the count two back in 5-bit groups
(LEB128-like, offset by 48 into printable ASCII).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zsdense.io.atomic import write_json

__all__ = ["as_mask", "mask_to_rle", "rle_to_mask", "write_rle_json"]


def as_mask(mask: np.ndarray) -> np.ndarray:
    """A ``(H, W)`` mask as bool (non-bool: ``!= 0``); ValueError for another shape."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    return m if m.dtype == np.bool_ else m != 0


def _runs(mask: np.ndarray) -> list[int]:
    """Alternating run lengths (zeros first) of the column-major flattening of ``mask``."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs.insert(0, 0)
    return [int(r) for r in runs]


def _counts_to_string(counts: Sequence[int]) -> str:
    """COCO's compressed counts string (delta against the count two back, 5-bit LEB128-like)."""
    chars: list[str] = []
    for i, c in enumerate(counts):
        x = int(c)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            chars.append(chr(ch + 48))
    return "".join(chars)


def _string_to_counts(s: str | bytes) -> list[int]:
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("truncated RLE counts string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def mask_to_rle(mask: np.ndarray) -> dict:
    """Binary mask ``(H, W)`` -> COCO compressed RLE ``{"size": [H, W], "counts": str}``.

    Identical to ``pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))`` with the
    counts decoded to ``str`` (so it is JSON-ready).
    """
    m = as_mask(mask)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": _counts_to_string(_runs(m))}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed ``str``/``bytes`` counts, or uncompressed list counts) -> bool
    ``(H, W)``."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = list(counts) if isinstance(counts, (list, tuple)) else _string_to_counts(counts)
    if sum(runs) != h * w:
        raise ValueError(f"RLE counts sum to {sum(runs)}, expected {h * w} for size [{h}, {w}]")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((h, w), order="F")


def write_rle_json(path: str | Path, obj: Any) -> Path:
    """Write an RLE dict (or any structure holding RLEs) as strict JSON, atomically."""
    return write_json(path, obj, indent=None)
