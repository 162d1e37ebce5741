"""Referring segmentation test sets: JSONL lines ``{"image", "text", "mask" | "rle" |
"polygon", "id"}`` and RefCOCO/+/g's ``refs(*).p`` pickle (loaded with
:mod:`zsdense.safe_pickle`) with COCO ``instances.json``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from zsdense.errors import ConfigError, InputError
from zsdense.eval.datasets.files import image_size_hw, read_mask
from zsdense.eval.protocols import REFER_LAYOUT_CHOICES
from zsdense.io.writers import rle_to_mask
from zsdense.safe_pickle import safe_load_path


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
            return read_mask(self.mask_path)
        if self.rle is not None:
            return decode_rle(self.rle)
        if self.polygons is not None:
            if size_hw is None:
                size_hw = image_size_hw(self.image_path)
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


def _refs_pickle(root: Path, split_by: str | None) -> Path:
    """``refs(<split_by>).p``; without ``split_by``: unc, umd, google, else the first found."""
    if split_by is None:
        split_by = next((s for s in _REFS_ORDER if (root / f"refs({s}).p").is_file()), None)
        if split_by is None:
            found = sorted(p.name for p in root.glob("refs(*).p"))
            if not found:
                raise ConfigError(f"no refs(*).p annotation pickle in {root}")
            split_by = found[0][5:-3]
    return root / f"refs({split_by}).p"


def _ground_truth(ann: dict, im: dict) -> tuple[dict | None, list | None]:
    """(rle, polygons) of a COCO annotation: a crowd RLE (uncompressed counts are lists, the
    size then comes from the image) or polygons."""
    seg = ann.get("segmentation")
    h, w = int(im["height"]), int(im["width"])
    if isinstance(seg, dict):
        return (seg if "size" in seg else {"size": [h, w], "counts": seg.get("counts")}), None
    return None, seg


def read_refcoco(
    root: str | Path,
    split: str = "val",
    split_by: str | None = None,
    images_dir: str | Path | None = None,
) -> list[ReferSample]:
    """RefCOCO / RefCOCO+ / RefCOCOg: ``refs(<split_by>).p`` + ``instances.json`` in ``root``;
    one sample per sentence of every ref in ``split``; masks from the COCO annotation."""
    root = Path(root)
    refs_path = _refs_pickle(root, split_by)
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
        rle, polys = _ground_truth(ann, im)
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
