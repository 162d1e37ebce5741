"""Semantic segmentation splits: a generic ``images/`` + ``labels/`` (or ``masks/``) layout and
the mmseg conventions of VOC, Pascal Context, COCO-Object, ADE20K and Cityscapes.

Labels are read raw (palette indices of a ``P`` PNG, never RGB), with ``reduce_zero_label``
(0 -> 255, others -1) where the benchmark uses it (ADE20K, Context-59).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from zsdense.errors import ConfigError, InputError
from zsdense.eval.datasets.files import images_in, with_stem


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


def _voc(labels: str, split_lists: str, year: str, reduce: bool, classes: str) -> _SegConvention:
    """A Pascal VOC folder (VOC, Pascal Context): ``JPEGImages/``, the label folder, the split's
    id list in ``ImageSets/<split_lists>/``, possibly under ``VOCdevkit/VOC<year>``."""
    return _SegConvention(
        "JPEGImages",
        labels,
        ".jpg",
        ".png",
        reduce,
        f"ImageSets/{split_lists}/{{split}}.txt",
        (f"VOC{year}", f"VOCdevkit/VOC{year}"),
        class_lists=(classes,),
    )


def _images_annotations(
    label_suffix: str, reduce: bool, split_names: dict[str, str], classes: str, **kw: tuple
) -> _SegConvention:
    """``images/<split>`` + ``annotations/<split>`` (COCO-Object, ADE20K)."""
    return _SegConvention(
        "images/{split}",
        "annotations/{split}",
        ".jpg",
        label_suffix,
        reduce,
        split_names=split_names,
        class_lists=(classes,),
        **kw,
    )


SEG_LAYOUTS: dict[str, _SegConvention] = {
    "voc": _voc("SegmentationClass", "Segmentation", "2012", False, "voc21"),
    "voc20": _voc("SegmentationClass", "Segmentation", "2012", True, "voc20"),
    "context": _voc("SegmentationClassContext", "SegmentationContext", "2010", False, "context60"),
    "context59": _voc("SegmentationClassContext", "SegmentationContext", "2010", True, "context59"),
    "coco-object": _images_annotations(
        "_instanceTrainIds.png", False, {"val": "val2017", "train": "train2017"}, "coco-object"
    ),
    "ade20k": _images_annotations(
        ".png",
        True,
        {"val": "validation", "train": "training"},
        "ade20k",
        descend=("ADEChallengeData2016",),
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
    for img in images_in(img_dir):
        rel = img.relative_to(img_dir).with_suffix("")
        lab = with_stem(lab_dir / rel.parent, rel.name)
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


def _read_convention(root: Path, layout: str, split: str) -> SegDataset:
    """A split in one of the :data:`SEG_LAYOUTS` conventions (its id list when it has one, else
    every image of the split's folder), with the convention's shipped class list."""
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
    return SegDataset(
        layout,
        samples,
        conv.reduce_zero_label,
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
        ds = _read_convention(root, layout, split)
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
