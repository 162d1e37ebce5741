"""Few-shot preprocessing as AnomalyDINO's reference runs it: smaller-edge resize, top-left crop
to the patch grid, rotations, and DINOv2 patch features."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from zsdense.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- preprocessing ---------------------------------------------------------------------------


def resized_size(h: int, w: int, smaller_edge: int) -> tuple[int, int]:
    """(H', W') of torchvision's ``Resize(smaller_edge)``: short side -> S, long side
    ``int(S·long/short)``."""
    s = int(smaller_edge)
    if w <= h:
        return int(s * h / w), s
    return s, int(s * w / h)


def resize_smaller_edge(image_u8: np.ndarray, smaller_edge: int) -> np.ndarray:
    """Pillow bicubic resize (antialiased when shrinking) of an (H, W, 3) uint8 image so that its
    smaller edge is ``smaller_edge``: torchvision's ``Resize(S, BICUBIC)`` on a PIL image.
    Returns uint8 (the reference's resize output is 8-bit)."""
    from PIL import Image

    img = np.ascontiguousarray(image_u8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ConfigError(f"few-shot preprocessing needs an (H, W, 3) uint8 image, got {img.shape}")
    h, w = img.shape[:2]
    nh, nw = resized_size(h, w, smaller_edge)
    if (nh, nw) == (h, w):
        return img.copy()
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC), dtype=np.uint8)


def prepare_image(
    image_u8: np.ndarray, smaller_edge: int, patch_size: int = 14
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The reference's ``prepare_image``: (3, H', W') normalised tensor and its patch grid.

    :func:`resize_smaller_edge`, /255, ImageNet normalisation, then a top-left crop to multiples
    of ``patch_size`` (the right and bottom remainders are dropped).
    """
    arr = resize_smaller_edge(image_u8, smaller_edge)
    nh, nw = arr.shape[:2]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    x = (x - mean) / std
    gh, gw = nh // patch_size, nw // patch_size
    if gh < 1 or gw < 1:
        raise ConfigError(
            f"image resized to {nh}x{nw} is smaller than one {patch_size}-px patch: "
            "raise the few-shot image size"
        )
    x = x[:, : gh * patch_size, : gw * patch_size].contiguous()
    return x, (gh, gw)


def rotate_image(image_u8: np.ndarray, angle: float) -> np.ndarray:
    """The reference's rotation: about (w/2, h/2), same size, bilinear, reflect-101 border.

    Angle 0 returns a copy of the input (bit-exact, as OpenCV's identity warp does).
    """
    import cv2

    img = np.ascontiguousarray(image_u8)
    if float(angle) % 360 == 0:
        return img.copy()
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), float(angle), 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


# ---- features ----------------------------------------------------------------------------------


def resolve_pos_interp(dino, pos_interp: str) -> str:
    """``auto`` -> ``hub`` for DINOv2 without registers, the model's own otherwise."""
    if pos_interp != "auto":
        return pos_interp
    if getattr(dino, "pos_interp", "transformers") == "hub":
        return "hub"
    return "hub" if dino.num_registers == 0 else "transformers"


@torch.no_grad()
def extract_features(
    dino, images_u8: Sequence[np.ndarray], smaller_edge: int, pos_interp: str = "auto"
) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """[(features (N, D) float32 on the CPU, grid)] per image; same-size images are batched."""
    mode = resolve_pos_interp(dino, pos_interp)
    prepared = [prepare_image(im, smaller_edge, dino.patch_size) for im in images_u8]
    out: list = [None] * len(prepared)
    groups: dict[tuple, list[int]] = {}
    for i, (x, _) in enumerate(prepared):
        groups.setdefault(tuple(x.shape), []).append(i)
    for idx in groups.values():
        batch = torch.stack([prepared[i][0] for i in idx])
        tokens = dino.tokens(batch, pos_interp=mode)[:, 1 + dino.num_registers :]
        tokens = tokens.float().cpu()
        for j, i in enumerate(idx):
            out[i] = (tokens[j].contiguous(), prepared[i][1])
    return out
