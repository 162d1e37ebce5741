"""The data of JAFAR training: counter-based generators (epoch order, per-step draws), the
reference's image transform, the image listing and its fingerprint (:mod:`zsdense.train.jafar`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def step_generators(seed: int, step: int) -> tuple[torch.Generator, np.random.RandomState]:
    """The (torch, numpy) generators of step ``step``: a function of (seed, step) only."""
    s = _seed_of(seed, 1, step)
    return torch.Generator().manual_seed(s), np.random.RandomState(s % (2**32))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([int(seed), 0, int(epoch)]).permutation(n)


def transform_image(image01: np.ndarray, size: int) -> torch.Tensor:
    """The reference's data transform before normalisation: ``Resize(size, BILINEAR)`` of the
    shorter side (PIL, antialiased), ``CenterCrop(size)``, ``ToTensor`` -> (3, S, S) in [0, 1].

    8-bit images go through PIL exactly as the reference's; deeper ones through torchvision's
    antialiased tensor resize (same geometry, float precision kept)."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    u8 = np.round(image01 * 255.0)
    if np.allclose(u8, image01 * 255.0, atol=1e-3):
        pil = Image.fromarray(u8.astype(np.uint8), mode="RGB")
        pil = TF.center_crop(TF.resize(pil, size, InterpolationMode.BILINEAR), size)
        return TF.to_tensor(pil)
    t = torch.from_numpy(np.ascontiguousarray(image01.transpose(2, 0, 1), dtype=np.float32))
    t = TF.resize(t, size, InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(t, size).clamp_(0, 1)


@dataclass(frozen=True)
class ImageItem:
    path: Path
    rel: str


def list_images(data: Sequence[str | Path], exclude: Sequence[str | Path] = ()) -> list[ImageItem]:
    """Every input file under ``data`` that zsdense's readers accept (files, folders, globs)."""
    from zsdense.io.inputs import list_inputs

    listed = list_inputs(list(data), exclude=list(exclude))
    return [ImageItem(Path(it.path), str(it.rel)) for it in listed]


def fingerprint(items: Sequence[ImageItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.rel}\n".encode())
    return h.hexdigest()
