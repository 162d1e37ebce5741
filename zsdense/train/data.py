"""The training set: which images and masks, checked before any step, loaded as Crane does.

Crane trains on the auxiliary set's **test split**, every class pooled, normal and anomalous
images together (``dataset.py:151``); the readers of :mod:`zsdense.eval.datasets` list exactly those
files for MVTec, VisA and a plain folder (``good/`` + defect folders + ``masks/``).

Transforms (``utils/transform.py``, ``aug_rate`` 0, no augmentation): the image is resized
bicubically (PIL) to S×S, RGB, then CLIP-normalised; the mask is ``(mask > 0)`` as 0/255,
resized bilinearly (PIL, torchvision's default) and thresholded at 0.5; normal images get an
all-zero mask. The epoch order is what ``DataLoader(shuffle=True, generator=seeded)`` draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from zsdense.errors import ConfigError, InputError

# The dataset readers are the evaluation package's (one reader per layout for both).
from zsdense.eval.datasets import AnomalySample, load_anomaly_mask, read_anomaly


@dataclass(frozen=True)
class TrainItem:
    """One training image: path, mask path (None for a normal image) and label (1 anomalous)."""

    image: Path
    mask: Path | None
    label: int

    @classmethod
    def from_sample(cls, s: AnomalySample) -> TrainItem:
        return cls(Path(s.image_path), None if s.mask_path is None else Path(s.mask_path), s.label)


def read_training_set(
    roots: Sequence[str | Path], layout: str = "auto", categories: Sequence[str] | None = None
) -> list[TrainItem]:
    """Every test-split image under each root (MVTec / VisA / folder layouts), in reader order."""
    if not roots:
        raise ConfigError("no training data given: pass a dataset folder")
    items: list[TrainItem] = []
    for root in roots:
        items.extend(TrainItem.from_sample(s) for s in read_anomaly(root, layout, categories))
    return items


def _size(path: Path, what: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the {what} ({exc})") from None


def check_training_set(items: Sequence[TrainItem], where: str = "training data") -> dict:
    """ConfigError/InputError for a set that cannot train, before any step: no image, no
    anomalous image, an anomalous image without a mask, or a mask of another size than its
    image. Returns counts for the log."""
    if not items:
        raise ConfigError(f"{where}: no images found")
    n_abn = sum(1 for it in items if it.label == 1)
    if n_abn == 0:
        raise ConfigError(
            f"{where}: no anomalous image among {len(items)}: prompt training needs defect "
            f"images with pixel masks (folder layout: good/ plus one folder per defect, masks/)"
        )
    no_mask = [it.image for it in items if it.label == 1 and it.mask is None]
    if no_mask:
        shown = ", ".join(str(p) for p in no_mask[:3])
        raise ConfigError(
            f"{where}: {len(no_mask)} anomalous image(s) have no mask (e.g. {shown}); the "
            f"segmentation losses need one per anomalous image (same stem under masks/, or "
            f"MVTec's ground_truth/<defect>/<n>_mask.png)"
        )
    for it in items:
        if it.mask is None:
            continue
        hw_img = _size(it.image, "image")
        hw_mask = _size(it.mask, "mask")
        if hw_img != hw_mask:
            raise InputError(
                it.mask,
                f"mask is {hw_mask[1]}x{hw_mask[0]} but its image {it.image} is "
                f"{hw_img[1]}x{hw_img[0]}; masks must have their image's size",
            )
    return {"images": len(items), "anomalous": n_abn, "normal": len(items) - n_abn}


def load_images(items: Sequence[TrainItem], size: int) -> torch.Tensor:
    """[0, 1] RGB batch (B, 3, S, S): PIL bicubic resize of the whole image (no crop)."""
    from zsdense.io.readers import to_float_rgb
    from zsdense.models.clip import preprocess_images

    imgs = [to_float_rgb(it.image)[0] for it in items]
    return preprocess_images(imgs, size)


def load_masks(items: Sequence[TrainItem], size: int) -> torch.Tensor:
    """Binary masks (B, S, S) float32: ``(mask > 0)`` as 0/255, PIL bilinear resize, > 0.5."""
    out = np.zeros((len(items), size, size), dtype=np.float32)
    for i, it in enumerate(items):
        if it.mask is None:
            continue
        sample = AnomalySample(it.image, it.mask, it.label, "", "")
        m = (load_anomaly_mask(sample) > 0).astype(np.uint8) * 255
        r = Image.fromarray(m, mode="L").resize((size, size), Image.BILINEAR)
        out[i] = (np.asarray(r, dtype=np.float32) / 255.0 > 0.5).astype(np.float32)
    return torch.from_numpy(out)


def epoch_order(generator: torch.Generator, n: int) -> list[int]:
    """The index order of one epoch, as ``DataLoader(shuffle=True, generator=g)`` draws it: the
    iterator first draws its base seed, the sampler a permutation, and an exhausted sampler one
    more (empty-slice) permutation. Advances ``generator`` exactly as the DataLoader does."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator).tolist()
    torch.randperm(n, generator=generator)
    return order


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """``drop_last=False`` batches of ``order``."""
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def data_fingerprint(items: Sequence[TrainItem]) -> str:
    """SHA-256 of the (image, mask, label) list: a resume must see the same set."""
    import hashlib

    h = hashlib.sha256()
    for it in items:
        mask = "" if it.mask is None else str(Path(it.mask).resolve())
        h.update(f"{Path(it.image).resolve()}\0{mask}\0{it.label}\n".encode())
    return h.hexdigest()


__all__ = [
    "TrainItem",
    "batches",
    "check_training_set",
    "data_fingerprint",
    "epoch_order",
    "load_images",
    "load_masks",
    "read_training_set",
]
