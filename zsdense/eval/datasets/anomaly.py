"""Anomaly test sets: MVTec AD, VisA's ``split_csv/1cls.csv`` and a plain folder layout.

Each reader yields :class:`AnomalySample` (image, mask or None, label 0/1, category, defect);
the folder layout never takes its mask folders for test images.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zsdense.errors import ConfigError, InputError
from zsdense.eval.datasets.files import image_size_hw, images_in, read_mask, with_stem
from zsdense.eval.protocols import ANOMALY_LAYOUT_CHOICES


@dataclass(frozen=True)
class AnomalySample:
    """One test image of an anomaly benchmark. ``mask_path`` None means an all-normal mask for
    a normal image, and "no pixel ground truth" for an anomalous one."""

    image_path: Path
    mask_path: Path | None
    label: int  # 0 normal, 1 anomalous
    category: str
    defect: str  # "good" for normal images


def _mvtec_categories(root: Path) -> list[Path]:
    if (root / "test").is_dir():  # root is one category
        return [root]
    return sorted(c for c in root.iterdir() if c.is_dir() and (c / "test").is_dir())


def detect_anomaly_layout(root: str | Path) -> str:
    """``visa`` (``split_csv/1cls.csv``), ``mvtec`` (``[<cat>/]test/<defect>/``) or ``folder``
    (``good/`` + other folders); ConfigError if none matches."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"dataset root {root} is not a folder")
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if _mvtec_categories(root):
        return "mvtec"
    if (root / "good").is_dir():
        return "folder"
    raise ConfigError(
        f"cannot tell the dataset layout of {root}: expected MVTec "
        "(<category>/test/<defect>/*.png, masks in <category>/ground_truth/<defect>/*_mask.png), "
        "VisA (split_csv/1cls.csv) or a plain folder (good/ plus one folder per defect, optional "
        "masks/ or ground_truth/); pass --layout to choose one"
    )


def _select(
    samples: list[AnomalySample], categories: Sequence[str] | None, root: Path
) -> list[AnomalySample]:
    if not categories:
        return samples
    have = sorted({s.category for s in samples})
    missing = [c for c in categories if c not in have]
    if missing:
        raise ConfigError(f"categories {missing} not found under {root}; available: {have}")
    wanted = set(categories)
    return [s for s in samples if s.category in wanted]


def read_mvtec(root: str | Path, categories: Sequence[str] | None = None) -> list[AnomalySample]:
    """MVTec AD layout: ``<root>/<cat>/test/<defect>/<n>.png`` (``good`` is normal), masks
    ``<root>/<cat>/ground_truth/<defect>/<n>_mask.png`` (``<n>.png`` also accepted). ``root``
    may also be one category folder."""
    root = Path(root)
    samples: list[AnomalySample] = []
    for cat_dir in _mvtec_categories(root):
        for defect_dir in sorted(d for d in (cat_dir / "test").iterdir() if d.is_dir()):
            defect = defect_dir.name
            normal = defect == "good"
            gt_dir = cat_dir / "ground_truth" / defect
            for img in images_in(defect_dir, recursive=False):
                mask = None
                if not normal:
                    mask = with_stem(gt_dir, f"{img.stem}_mask") or with_stem(gt_dir, img.stem)
                samples.append(AnomalySample(img, mask, 0 if normal else 1, cat_dir.name, defect))
    if not samples:
        raise ConfigError(f"no MVTec test images under {root} (<category>/test/<defect>/*.png)")
    return _select(samples, categories, root)


def _is_normal(label: str) -> bool:
    """A VisA split row's label that means a normal image."""
    return label.strip().lower() in ("normal", "0", "good")


def read_visa(
    root: str | Path, categories: Sequence[str] | None = None, split_csv: str = "split_csv/1cls.csv"
) -> list[AnomalySample]:
    """VisA: rows of ``split_csv`` (columns object, split, label, image, mask; paths relative to
    ``root``) whose split is ``test``. Label ``normal``/``0`` is normal, anything else is not."""
    root = Path(root)
    csv_path = root / split_csv
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise InputError(csv_path, f"cannot read the VisA split file ({exc.strerror})") from None
    need = {"object", "split", "label", "image", "mask"}
    if rows and not need <= set(rows[0]):
        raise InputError(csv_path, f"expected columns {sorted(need)}, found {sorted(rows[0])}")
    samples = []
    for row in rows:
        if row["split"].strip() != "test":
            continue
        normal = _is_normal(row["label"])
        mask = row["mask"].strip()
        samples.append(
            AnomalySample(
                image_path=root / row["image"].strip(),
                mask_path=(root / mask) if mask and not normal else None,
                label=0 if normal else 1,
                category=row["object"].strip(),
                defect="good" if normal else "anomaly",
            )
        )
    if not samples:
        raise ConfigError(f"{csv_path} has no rows with split == test")
    return _select(samples, categories, root)


def train_good_images(root: str | Path, layout: str, category: str) -> list[Path]:
    """The normal training images of one category (the pool few-shot references are drawn
    from): MVTec ``<cat>/train/good/*``, VisA split rows ``train`` + ``normal``, a folder set's
    ``train/good`` (or ``<cat>/train/good``) when it has one."""
    root = Path(root)
    if layout == "visa":
        csv_path = root / "split_csv" / "1cls.csv"
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return sorted(
            root / r["image"].strip()
            for r in rows
            if r["object"].strip() == category
            and r["split"].strip() == "train"
            and _is_normal(r["label"])
        )
    for cand in (root / category / "train" / "good", root / "train" / "good"):
        if cand.is_dir():
            return sorted(images_in(cand, recursive=False))
    raise ConfigError(
        f"few-shot evaluation draws references from the good training images, but there is no "
        f"{root / category / 'train' / 'good'} (nor {root / 'train' / 'good'})"
    )


MASK_DIRS = ("masks", "mask", "ground_truth", "gt")  # never test images in the folder layout
_MASK_SUFFIXES = ("_mask", "_gt")


def _is_sibling_mask(path: Path) -> bool:
    """``<n>_mask.png`` (or ``<n>_gt.png``) next to an image ``<n>.*``: a mask, not a test image."""
    for suf in _MASK_SUFFIXES:
        if path.stem.endswith(suf) and len(path.stem) > len(suf):
            if with_stem(path.parent, path.stem[: -len(suf)]) is not None:
                return True
    return False


def _folder_mask(img: Path, root: Path, sub: Path, mask_roots: list[Path]) -> Path | None:
    """The mask of an anomalous image of the folder layout, where :func:`read_anomaly_folder`
    says it may lie (mask folders first, then beside the image), else None."""
    rel_dir = img.parent.relative_to(root)
    folders = [f for m in mask_roots for f in (m / rel_dir, m / rel_dir.relative_to(sub.name), m)]
    folders += [img.parent / d for d in MASK_DIRS if (img.parent / d).is_dir()]
    folders.append(img.parent)
    for folder in folders:
        stems = [f"{img.stem}{suf}" for suf in _MASK_SUFFIXES]
        if folder != img.parent:
            stems.insert(0, img.stem)
        mask = next(filter(None, (with_stem(folder, st) for st in stems)), None)
        if mask is not None:
            return mask
    return None


def read_anomaly_folder(root: str | Path, category: str | None = None) -> list[AnomalySample]:
    """Plain folder layout of one category: ``good/`` is normal, every other folder holds
    anomalous images (subfolders allowed). Mask folders (``masks/``, ``mask/``,
    ``ground_truth/``, ``gt/``) are never read as test images, nor is ``<n>_mask.png`` lying next
    to its image ``<n>.png``. Masks, optional, are found with the image's stem (``<n>.png`` or
    ``<n>_mask.png``) in a mask folder, mirroring the image's subfolders
    (``masks/<defect>/<n>.png``) or flat (``masks/<n>.png``), in a mask folder beside the
    image (``<defect>/ground_truth/<n>.png``), or next to the image (``<n>_mask.png``)."""
    root = Path(root)
    cat = category or root.name
    mask_roots = [root / d for d in MASK_DIRS if (root / d).is_dir()]
    samples = []
    subs = sorted(d for d in root.iterdir() if d.is_dir() and d.name.lower() not in MASK_DIRS)
    for sub in subs:
        normal = sub.name == "good"
        for img in images_in(sub):
            if any(part.lower() in MASK_DIRS for part in img.relative_to(sub).parts[:-1]):
                continue  # e.g. scratch/ground_truth/<n>.png
            if _is_sibling_mask(img):
                continue
            mask = None if normal else _folder_mask(img, root, sub, mask_roots)
            samples.append(AnomalySample(img, mask, 0 if normal else 1, cat, sub.name))
    if not any(s.label == 0 for s in samples):
        raise ConfigError(f"{root}: the folder layout needs normal images in {root / 'good'}")
    return samples


def read_anomaly(
    root: str | Path, layout: str = "auto", categories: Sequence[str] | None = None
) -> list[AnomalySample]:
    """Read an anomaly test set in ``layout`` (``auto``, ``mvtec``, ``visa``, ``folder``)."""
    root = Path(root)
    if layout == "auto":
        layout = detect_anomaly_layout(root)
    if layout == "mvtec":
        return read_mvtec(root, categories)
    if layout == "visa":
        return read_visa(root, categories)
    if layout == "folder":
        return _select(read_anomaly_folder(root), categories, root)
    raise ConfigError(
        f"unknown anomaly layout {layout!r}; use one of {', '.join(ANOMALY_LAYOUT_CHOICES)}"
    )


def load_anomaly_mask(sample: AnomalySample, size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask as (H, W) float32 in [0, 1] (any nonzero pixel is 1, as the
    benchmarks' masks are 0/255); zeros of ``size_hw`` when the sample has no mask."""
    if sample.mask_path is None:
        if size_hw is None:
            size_hw = image_size_hw(sample.image_path)
        return np.zeros(size_hw, dtype=np.float32)
    return read_mask(sample.mask_path).astype(np.float32)
