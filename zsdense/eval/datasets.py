"""Readers of evaluation datasets: which image goes with which ground truth.

Readers only list files and decode ground truth; they never run a model. Three families:

- Anomaly (:func:`read_anomaly`): MVTec AD layout, VisA's ``split_csv/1cls.csv``, and a plain
  folder layout (its mask folders are never taken for test images). Each yields
  :class:`AnomalySample` (image, mask or None, label 0/1, category, defect).
- Semantic segmentation (:func:`read_segmentation`): a generic ``images/`` + ``labels/`` (or
  ``masks/``) layout and the mmseg conventions of VOC, Pascal Context, COCO-Object, ADE20K and
  Cityscapes. Labels are read raw (palette indices of a ``P`` PNG, never RGB), with
  ``reduce_zero_label`` (0 -> 255, others -1) where the benchmark uses it (ADE20K, Context-59).
- Referring segmentation (:func:`read_referring`): JSONL lines
  ``{"image", "text", "mask" | "rle" | "polygon", "id"}`` and RefCOCO/+/g's ``refs(*).p``
  pickle (loaded with :mod:`zsdense.safe_pickle`) with COCO ``instances.json``.

Layouts are detected automatically (``layout="auto"``); when nothing matches, a
:class:`~zsdense.errors.ConfigError` says which layouts were tried and what they look like.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from zsdense.errors import ConfigError, InputError
from zsdense.eval.protocols import (
    ANOMALY_LAYOUT_CHOICES,
    ANOMALY_LAYOUTS,
    REFER_LAYOUT_CHOICES,
    REFER_LAYOUTS,
)
from zsdense.io.writers import rle_to_mask
from zsdense.safe_pickle import safe_load_path

__all__ = [
    "IMAGE_EXTS",
    "AnomalySample",
    "ANOMALY_LAYOUTS",
    "detect_anomaly_layout",
    "read_anomaly",
    "read_mvtec",
    "read_visa",
    "read_anomaly_folder",
    "MASK_DIRS",
    "load_anomaly_mask",
    "SegSample",
    "SegDataset",
    "SEG_LAYOUTS",
    "SEG_LAYOUT_CHOICES",
    "ANOMALY_LAYOUT_CHOICES",
    "REFER_LAYOUT_CHOICES",
    "detect_seg_layout",
    "read_segmentation",
    "read_class_file",
    "class_display_name",
    "load_label",
    "reduce_zero_label",
    "ReferSample",
    "REFER_LAYOUTS",
    "detect_refer_layout",
    "read_referring",
    "read_refer_jsonl",
    "read_refcoco",
    "decode_rle",
    "polygons_to_mask",
]

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def _images_in(folder: Path, recursive: bool = True) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _with_stem(folder: Path, stem: str) -> Path | None:
    """The image file ``folder/stem.<any image ext>``, if one exists."""
    if not folder.is_dir():
        return None
    for ext in (".png", ".PNG", ".tif", ".tiff", ".bmp", ".jpg", ".JPG", ".jpeg"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


# ================================================================================== anomaly


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
            for img in _images_in(defect_dir, recursive=False):
                mask = None
                if not normal:
                    mask = _with_stem(gt_dir, f"{img.stem}_mask") or _with_stem(gt_dir, img.stem)
                samples.append(AnomalySample(img, mask, 0 if normal else 1, cat_dir.name, defect))
    if not samples:
        raise ConfigError(f"no MVTec test images under {root} (<category>/test/<defect>/*.png)")
    return _select(samples, categories, root)


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
        normal = row["label"].strip().lower() in ("normal", "0", "good")
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
            and r["label"].strip().lower() in ("normal", "0", "good")
        )
    for cand in (root / category / "train" / "good", root / "train" / "good"):
        if cand.is_dir():
            return sorted(_images_in(cand, recursive=False))
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
            if _with_stem(path.parent, path.stem[: -len(suf)]) is not None:
                return True
    return False


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
        for img in _images_in(sub):
            if any(part.lower() in MASK_DIRS for part in img.relative_to(sub).parts[:-1]):
                continue  # e.g. scratch/ground_truth/<n>.png
            if _is_sibling_mask(img):
                continue
            mask = None
            if not normal:
                rel_dir = img.parent.relative_to(root)
                folders = [
                    f
                    for m in mask_roots
                    for f in (m / rel_dir, m / rel_dir.relative_to(sub.name), m)
                ]
                folders += [img.parent / d for d in MASK_DIRS if (img.parent / d).is_dir()]
                folders.append(img.parent)
                for folder in folders:
                    stems = [f"{img.stem}{suf}" for suf in _MASK_SUFFIXES]
                    if folder != img.parent:
                        stems.insert(0, img.stem)
                    mask = next(filter(None, (_with_stem(folder, st) for st in stems)), None)
                    if mask is not None:
                        break
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
            with Image.open(sample.image_path) as im:
                size_hw = (im.height, im.width)
        return np.zeros(size_hw, dtype=np.float32)
    try:
        with Image.open(sample.mask_path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "P", "1") else im)
    except OSError as exc:
        raise InputError(sample.mask_path, f"cannot read the mask ({exc})") from None
    return (arr > 0).astype(np.float32)


# ================================================================================== segmentation


@dataclass(frozen=True)
class SegSample:
    """One image with its label PNG (``label_path`` None when unlabelled)."""

    image_path: Path
    label_path: Path | None
    id: str


@dataclass
class SegDataset:
    """A semantic segmentation split: samples, label convention and (when known) class names."""

    layout: str
    samples: list[SegSample]
    reduce_zero_label: bool = False
    ignore_index: int = 255
    class_names: list[str] | None = None
    class_file: Path | None = None


@dataclass(frozen=True)
class _SegConvention:
    images: str  # folder of images, relative to the root; {split} is substituted
    labels: str
    img_suffix: str
    label_suffix: str
    reduce_zero_label: bool
    split_file: str | None = None  # list of ids, relative to the root
    descend: tuple[str, ...] = ()  # subfolders the root may need to descend into
    split_names: dict[str, str] = field(default_factory=dict)
    class_lists: tuple[str, ...] = ()  # prompt class files to look for, in order


SEG_LAYOUTS: dict[str, _SegConvention] = {
    "voc": _SegConvention(
        "JPEGImages",
        "SegmentationClass",
        ".jpg",
        ".png",
        False,
        "ImageSets/Segmentation/{split}.txt",
        ("VOC2012", "VOCdevkit/VOC2012"),
        class_lists=("voc21",),
    ),
    "voc20": _SegConvention(
        "JPEGImages",
        "SegmentationClass",
        ".jpg",
        ".png",
        True,
        "ImageSets/Segmentation/{split}.txt",
        ("VOC2012", "VOCdevkit/VOC2012"),
        class_lists=("voc20",),
    ),
    "context": _SegConvention(
        "JPEGImages",
        "SegmentationClassContext",
        ".jpg",
        ".png",
        False,
        "ImageSets/SegmentationContext/{split}.txt",
        ("VOC2010", "VOCdevkit/VOC2010"),
        class_lists=("context60",),
    ),
    "context59": _SegConvention(
        "JPEGImages",
        "SegmentationClassContext",
        ".jpg",
        ".png",
        True,
        "ImageSets/SegmentationContext/{split}.txt",
        ("VOC2010", "VOCdevkit/VOC2010"),
        class_lists=("context59",),
    ),
    "coco-object": _SegConvention(
        "images/{split}",
        "annotations/{split}",
        ".jpg",
        "_instanceTrainIds.png",
        False,
        split_names={"val": "val2017", "train": "train2017"},
        class_lists=("coco-object",),
    ),
    "ade20k": _SegConvention(
        "images/{split}",
        "annotations/{split}",
        ".jpg",
        ".png",
        True,
        descend=("ADEChallengeData2016",),
        split_names={"val": "validation", "train": "training"},
        class_lists=("ade20k",),
    ),
    "cityscapes": _SegConvention(
        "leftImg8bit/{split}",
        "gtFine/{split}",
        "_leftImg8bit.png",
        "_gtFine_labelTrainIds.png",
        False,
        class_lists=("cityscapes",),
    ),
}
SEG_LAYOUT_CHOICES = ("auto", "generic", *SEG_LAYOUTS)  # what layout= / --layout accept


def _descend(root: Path, conv: _SegConvention) -> Path:
    for sub in conv.descend:
        if (root / sub).is_dir():
            return root / sub
    return root


def _seg_dirs(root: Path, conv: _SegConvention, split: str) -> tuple[Path, Path, Path]:
    root = _descend(root, conv)
    s = conv.split_names.get(split, split)
    return root, root / conv.images.format(split=s), root / conv.labels.format(split=s)


def detect_seg_layout(root: str | Path, split: str = "val") -> str:
    """The first segmentation convention whose folders exist under ``root``, else ``generic``
    when ``images/`` + ``labels/`` (or ``masks/``) exist, else a ConfigError."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"dataset root {root} is not a folder")
    for name in ("context", "voc", "cityscapes", "ade20k", "coco-object"):
        conv = SEG_LAYOUTS[name]
        _, img_dir, lab_dir = _seg_dirs(root, conv, split)
        if img_dir.is_dir() and lab_dir.is_dir():
            return name
    if (root / "images").is_dir() and ((root / "labels").is_dir() or (root / "masks").is_dir()):
        return "generic"
    raise ConfigError(
        f"cannot tell the segmentation layout of {root} (split {split!r}): expected one of "
        "VOC (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt), Pascal Context "
        "(SegmentationClassContext/), ADE20K (images/validation, annotations/validation), "
        "COCO-Object (images/val2017, annotations/val2017/*_instanceTrainIds.png), Cityscapes "
        "(leftImg8bit/<split>, gtFine/<split>) or generic (images/, labels/ with the same stems); "
        "pass --layout"
    )


def read_class_file(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the class file {p}: {exc.strerror}") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise ConfigError(f"the class file {p} lists no class (expected one name per line)")
    return names


def _packaged_class_file(candidates: Iterable[str]) -> Path | None:
    """A class list shipped in ``zsdense.prompts`` as ``classes/<candidate>.txt``."""
    try:
        base = resources.files("zsdense.prompts")
    except (ModuleNotFoundError, TypeError):
        return None
    for name in candidates:
        for f in (base / "classes" / f"{name}.txt", base / f"{name}.txt"):
            if f.is_file():
                return Path(str(f))
    return None


def class_display_name(line: str) -> str:
    """The display name of a class-file line (``name: a; b`` -> ``name``, ``a; b`` -> ``a``)."""
    if ":" in line:
        return line.split(":", 1)[0].strip()
    return line.split(";", 1)[0].strip()


def _paired(
    img_dir: Path, lab_dir: Path, img_suffix: str, label_suffix: str, ids: list[str] | None
) -> list[SegSample]:
    samples = []
    if ids is not None:
        for i in ids:
            img = img_dir / f"{i}{img_suffix}"
            if not img.is_file():
                raise InputError(img, "listed in the split file but missing")
            lab = lab_dir / f"{i}{label_suffix}"
            samples.append(SegSample(img, lab if lab.is_file() else None, i))
        return samples
    for img in sorted(img_dir.rglob(f"*{img_suffix}")):
        rel = img.relative_to(img_dir).as_posix()
        i = rel[: -len(img_suffix)]
        lab = lab_dir / f"{i}{label_suffix}"
        samples.append(SegSample(img, lab if lab.is_file() else None, i))
    return samples


def _read_generic_seg(root: Path) -> SegDataset:
    img_dir = root / "images"
    lab_dir = root / "labels" if (root / "labels").is_dir() else root / "masks"
    samples = []
    for img in _images_in(img_dir):
        rel = img.relative_to(img_dir).with_suffix("")
        lab = _with_stem(lab_dir / rel.parent, rel.name)
        samples.append(SegSample(img, lab, rel.as_posix()))
    class_file = next(
        (root / n for n in ("classes.txt", "class_names.txt") if (root / n).is_file()), None
    )
    return SegDataset(
        "generic",
        samples,
        class_file=class_file,
        class_names=read_class_file(class_file) if class_file else None,
    )


def read_segmentation(
    root: str | Path,
    layout: str = "auto",
    split: str = "val",
    reduce_zero_label: bool | None = None,
) -> SegDataset:
    """Read a segmentation split. ``reduce_zero_label`` None keeps the convention's default."""
    root = Path(root)
    if layout == "auto":
        layout = detect_seg_layout(root, split)
    if layout == "generic":
        ds = _read_generic_seg(root)
    elif layout in SEG_LAYOUTS:
        conv = SEG_LAYOUTS[layout]
        base, img_dir, lab_dir = _seg_dirs(root, conv, split)
        if not img_dir.is_dir():
            raise ConfigError(f"{layout} layout: image folder {img_dir} not found")
        ids = None
        if conv.split_file:
            sf = base / conv.split_file.format(split=split)
            if sf.is_file():
                ids = [ln.strip() for ln in sf.read_text().splitlines() if ln.strip()]
        samples = _paired(img_dir, lab_dir, conv.img_suffix, conv.label_suffix, ids)
        class_file = _packaged_class_file(conv.class_lists)
        ds = SegDataset(
            layout,
            samples,
            conv.reduce_zero_label,
            class_file=class_file,
            class_names=read_class_file(class_file) if class_file else None,
        )
    else:
        raise ConfigError(
            f"unknown segmentation layout {layout!r}; use one of {', '.join(SEG_LAYOUT_CHOICES)}"
        )
    if not ds.samples:
        raise ConfigError(f"no images found for the {layout} layout under {root}")
    if reduce_zero_label is not None:
        ds.reduce_zero_label = reduce_zero_label
    return ds


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 (``other``) becomes ``ignore_index``, every other label -1."""
    out = label.astype(np.int64) - 1
    out[label == 0] = ignore_index
    out[label == ignore_index] = ignore_index
    return out


def load_label(path: str | Path, reduce_zero: bool = False, ignore_index: int = 255) -> np.ndarray:
    """A label PNG as (H, W) int64 raw values (palette indices of a ``P`` image, never colours)."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            if im.mode in ("RGB", "RGBA"):
                raise InputError(
                    p,
                    "label images must hold class indices (mode L, P or I), "
                    f"not colours (mode {im.mode})",
                )
            arr = np.asarray(im).astype(np.int64)
    except OSError as exc:
        raise InputError(p, f"cannot read the label image ({exc})") from None
    if arr.ndim != 2:
        raise InputError(p, f"label image must be 2-D, got shape {arr.shape}")
    return reduce_zero_label(arr, ignore_index) if reduce_zero else arr


# ================================================================================== referring




@dataclass(frozen=True)
class ReferSample:
    """One (image, expression) pair; the ground truth is a mask PNG path, a COCO RLE dict or
    COCO polygons (decoded by :meth:`load_mask`)."""

    image_path: Path
    text: str
    id: str
    mask_path: Path | None = None
    rle: dict | None = None
    polygons: list | None = None

    def load_mask(self, size_hw: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) bool ground-truth mask. ``size_hw`` (else the image's size) is needed for
        polygons."""
        if self.mask_path is not None:
            try:
                with Image.open(self.mask_path) as im:
                    arr = np.asarray(im.convert("L") if im.mode not in ("L", "P", "1") else im)
            except OSError as exc:
                raise InputError(self.mask_path, f"cannot read the mask ({exc})") from None
            return arr > 0
        if self.rle is not None:
            return decode_rle(self.rle)
        if self.polygons is not None:
            if size_hw is None:
                with Image.open(self.image_path) as im:
                    size_hw = (im.height, im.width)
            return polygons_to_mask(self.polygons, *size_hw)
        raise InputError(self.id, "sample has no ground-truth mask")


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE (``{"size": [h, w], "counts": str | bytes | list}``) as an (H, W) bool mask."""
    try:
        return np.asarray(rle_to_mask(rle)).astype(bool)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError("rle", f"malformed COCO RLE ({exc})") from None


def polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """COCO polygons (list of flat [x1, y1, x2, y2, ...] lists, or one such list) filled into an
    (H, W) bool mask. Uses pycocotools' rasteriser when installed (identical to the reference
    annotations), else PIL's polygon fill (may differ on boundary pixels)."""
    if polygons and isinstance(polygons[0], (int, float)):
        polygons = [polygons]
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        mask_utils = None
    if mask_utils is not None:
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    img = Image.new("L", (width, height), 0)
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    for poly in polygons:
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
        if len(pts) >= 3:
            draw.polygon(pts, fill=1, outline=1)
    return np.asarray(img) > 0


def detect_refer_layout(root: str | Path) -> str:
    """``jsonl`` (a .jsonl file, or a folder with exactly one) or ``refcoco`` (``refs(*).p``)."""
    root = Path(root)
    if root.is_file() and root.suffix == ".jsonl":
        return "jsonl"
    if root.is_dir():
        if list(root.glob("refs(*).p")):
            return "refcoco"
        if len(list(root.glob("*.jsonl"))) == 1:
            return "jsonl"
    raise ConfigError(
        f"cannot tell the referring layout of {root}: expected a .jsonl file of "
        '{"image", "text", "mask"|"rle"|"polygon", "id"} lines, or a RefCOCO folder with '
        "refs(unc).p and instances.json; pass --layout"
    )


def read_refer_jsonl(path: str | Path) -> list[ReferSample]:
    """JSONL, one sample a line; relative paths are relative to the file's folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.jsonl"))
        if len(found) != 1:
            raise ConfigError(f"{path}: expected exactly one .jsonl file, found {len(found)}")
        path = found[0]
    base = path.parent
    samples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            image, text = d["image"], d["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(
                path, f"line {n}: expected a JSON object with image and text ({exc})"
            ) from None
        if not any(k in d for k in ("mask", "rle", "polygon")):
            raise InputError(path, f"line {n}: no ground truth (give mask, rle or polygon)")
        samples.append(
            ReferSample(
                image_path=base / image,
                text=str(text),
                id=str(d.get("id", n)),
                mask_path=(base / d["mask"]) if d.get("mask") else None,
                rle=d.get("rle"),
                polygons=d.get("polygon"),
            )
        )
    return samples


_REFS_ORDER = ("unc", "umd", "google")


def _find_images_dir(root: Path, file_name: str, images_dir: Path | None) -> Path:
    candidates = (
        [images_dir]
        if images_dir
        else [
            root / "images",
            root / "train2014",
            root / "images" / "train2014",
            root.parent / "images" / "mscoco" / "images" / "train2014",
            root.parent / "images" / "train2014",
            root.parent / "train2014",
            root.parent / "images",
        ]
    )
    for c in candidates:
        if c is not None and (c / file_name).is_file():
            return c
    raise ConfigError(
        f"cannot find the COCO image {file_name} for {root}; tried "
        f"{', '.join(str(c) for c in candidates if c)}; pass --images DIR (the train2014 folder)"
    )


def read_refcoco(
    root: str | Path,
    split: str = "val",
    split_by: str | None = None,
    images_dir: str | Path | None = None,
) -> list[ReferSample]:
    """RefCOCO / RefCOCO+ / RefCOCOg: ``refs(<split_by>).p`` + ``instances.json`` in ``root``;
    one sample per sentence of every ref in ``split``; masks from the COCO annotation."""
    root = Path(root)
    if split_by is None:
        split_by = next((s for s in _REFS_ORDER if (root / f"refs({s}).p").is_file()), None)
        if split_by is None:
            found = sorted(p.name for p in root.glob("refs(*).p"))
            if not found:
                raise ConfigError(f"no refs(*).p annotation pickle in {root}")
            split_by = found[0][5:-3]
    refs_path = root / f"refs({split_by}).p"
    refs = safe_load_path(refs_path)
    inst_path = root / "instances.json"
    try:
        inst = json.loads(inst_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(inst_path, f"cannot read COCO instances ({exc})") from None
    if not isinstance(refs, list):
        raise InputError(refs_path, "expected a list of refs")
    anns = {a["id"]: a for a in inst.get("annotations", [])}
    images = {im["id"]: im for im in inst.get("images", [])}
    samples = []
    img_dir: Path | None = Path(images_dir) if images_dir else None
    for ref in refs:
        if not isinstance(ref, dict) or ref.get("split") != split:
            continue
        ann = anns.get(ref.get("ann_id"))
        im = images.get(ref.get("image_id"))
        if ann is None or im is None:
            raise InputError(
                refs_path, f"ref {ref.get('ref_id')}: annotation or image not in {inst_path.name}"
            )
        if img_dir is None or not (img_dir / im["file_name"]).is_file():
            img_dir = _find_images_dir(root, im["file_name"], img_dir)
        seg = ann.get("segmentation")
        h, w = int(im["height"]), int(im["width"])
        rle = None
        polys = None
        if isinstance(seg, dict):  # RLE (crowd); uncompressed counts are lists
            rle = seg if "size" in seg else {"size": [h, w], "counts": seg.get("counts")}
        else:
            polys = seg
        for sent in ref.get("sentences", []):
            text = sent.get("sent") or sent.get("raw") or ""
            samples.append(
                ReferSample(
                    image_path=img_dir / im["file_name"],
                    text=str(text),
                    id=f"{ref.get('ref_id')}_{sent.get('sent_id')}",
                    rle=rle,
                    polygons=polys,
                )
            )
    if not samples:
        raise ConfigError(f"{refs_path}: no refs with split == {split!r}")
    return samples


def read_referring(
    root: str | Path, layout: str = "auto", split: str = "val", images_dir: str | Path | None = None
) -> list[ReferSample]:
    """Read a referring test set in ``layout`` (``auto``, ``jsonl``, ``refcoco``)."""
    root = Path(root)
    if layout == "auto":
        layout = detect_refer_layout(root)
    if layout == "jsonl":
        return read_refer_jsonl(root)
    if layout == "refcoco":
        return read_refcoco(root, split=split, images_dir=images_dir)
    raise ConfigError(
        f"unknown referring layout {layout!r}; use one of {', '.join(REFER_LAYOUT_CHOICES)}"
    )
