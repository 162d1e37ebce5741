"""What the dataset readers of every family share: finding image files and reading masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from zsdense.errors import InputError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def images_in(folder: Path, recursive: bool = True) -> list[Path]:
    """The image files in ``folder`` (and below it when ``recursive``), sorted."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def with_stem(folder: Path, stem: str) -> Path | None:
    """The image file ``folder/stem.<any image ext>``, if one exists."""
    if not folder.is_dir():
        return None
    for ext in (".png", ".PNG", ".tif", ".tiff", ".bmp", ".jpg", ".JPG", ".jpeg"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def image_size_hw(path: Path) -> tuple[int, int]:
    """(height, width) of an image file."""
    with Image.open(path) as im:
        return (im.height, im.width)


def read_mask(path: Path) -> np.ndarray:
    """A ground-truth mask image as (H, W) bool: any nonzero pixel is set (the benchmarks'
    masks are 0/255); a colour image is read as grey."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "P", "1") else im)
    except OSError as exc:
        raise InputError(path, f"cannot read the mask ({exc})") from None
    return arr > 0
