"""Read back the float maps a run saved (``<stem>.map.tiff`` / ``<stem>.map.npy``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_map(path: str | Path) -> np.ndarray:
    """A saved float map (``.npy`` or ``.tiff``; (H, W) or (K, H, W)) as float32."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32, copy=False)
    import tifffile

    return np.asarray(tifffile.imread(path), dtype=np.float32)
