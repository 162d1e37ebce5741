"""Few-shot scoring: each test patch's distance to its nearest good patch (exact kNN through
:mod:`zsdense.dense.knn`), the image score (mean of the top 1 %), the smoothed map, and the
references' own leave-one-out maps (the method's scale on good parts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from zsdense.dense.knn import knn_search, l2_normalize
from zsdense.errors import ConfigError
from zsdense.io.membank import MemoryBank
from zsdense.io.progress import phase
from zsdense.tasks.fewshot.bank import check_bank
from zsdense.tasks.fewshot.masking import foreground_mask
from zsdense.tasks.fewshot.options import FewShotOptions
from zsdense.tasks.fewshot.preprocess import (
    extract_features,
    prepare_image,
    resolve_pos_interp,
)

# ---- distances, scores, maps -----------------------------------------------------------------


def mean_top1p(dists: np.ndarray | torch.Tensor) -> float:
    """Mean of the top ``int(0.01·N)`` values (the max when that is 0), zeros included."""
    d = np.asarray(dists, dtype=np.float64).ravel()
    n = int(d.size * 0.01)
    if n == 0:
        return float(d.max())
    return float(np.sort(d)[-n:].mean())


def patch_distances(
    features: torch.Tensor,
    mask: np.ndarray | None,
    memory: Sequence[torch.Tensor] | torch.Tensor,
    options: FewShotOptions,
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(distance per patch (N,) float64 with 0 where masked, raw kNN D (K, k), kNN I (K, k)).

    ``memory`` holds the bank rows (already normalised for ``L2_normalized``); K = kept patches.
    """
    n = features.shape[0]
    keep = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    q = features[torch.from_numpy(keep)].float()
    if options.knn_metric == "L2_normalized":
        q = l2_normalize(q)
    dev = memory[0].device if not isinstance(memory, torch.Tensor) else memory.device
    d, i = knn_search(
        q.to(dev),
        memory,
        int(options.knn_neighbors),
        budget_bytes=int(options.knn_budget_mb) * 2**20,
        backend=options.knn_backend,
    )
    d, i = d.cpu(), i.cpu()
    dd = d.mean(dim=1) if d.shape[1] > 1 else d[:, 0]
    if options.knn_metric == "L2":
        dd = torch.sqrt(dd)
    else:
        dd = dd / 2
    out = np.zeros(n, dtype=np.float64)
    out[keep] = dd.numpy().astype(np.float64)
    return out, d, i


def dists_to_map(
    grid_dists: np.ndarray, size_hw: tuple[int, int], sigma: float = 4.0
) -> np.ndarray:
    """The reference's ``dists2map``: bilinear (OpenCV, float64) to (H, W), then
    ``scipy.ndimage.gaussian_filter(σ)`` (reflect mode, truncate 4). Float64 (H, W)."""
    import cv2
    from scipy.ndimage import gaussian_filter

    g = np.ascontiguousarray(grid_dists, dtype=np.float64)
    h, w = int(size_hw[0]), int(size_hw[1])
    m = cv2.resize(g, (w, h), interpolation=cv2.INTER_LINEAR)
    if sigma and sigma > 0:
        m = gaussian_filter(m, sigma=float(sigma))
    return m


# ---- scoring ---------------------------------------------------------------------------------


@dataclass
class FewShotImage:
    """One scored image: patch distances on the grid, the map at the original size, the score,
    and what the search found."""

    score: float
    anomaly_map: np.ndarray  # (H, W) float64
    patch_dist: np.ndarray  # (N,) float64
    grid: tuple[int, int]
    mask: np.ndarray  # (N,) bool
    knn_d: torch.Tensor  # (K, k) raw search output (squared L2) for the kept patches
    knn_i: torch.Tensor  # (K, k) bank rows
    map_resized: np.ndarray | None = None


def score_features(
    features: torch.Tensor,
    grid: tuple[int, int],
    size_hw: tuple[int, int],
    memory: Sequence[torch.Tensor] | torch.Tensor,
    options: FewShotOptions,
    *,
    keep_unsmoothed: bool = False,
    mask: np.ndarray | None = None,
) -> FewShotImage:
    """Score one image's (N, D) features against ``memory`` (bank rows). ``mask`` (N,) bool:
    the patches to score, when decided elsewhere (upsampled features: the grid's mask)."""
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
    elif options.masking:
        mask = foreground_mask(features, grid, options.mask_threshold)
    else:
        mask = np.ones(features.shape[0], dtype=bool)
    dist, kd, ki = patch_distances(features, mask, memory, options)
    g = dist.reshape(int(grid[0]), int(grid[1]))
    amap = dists_to_map(g, size_hw, options.sigma)
    unsmoothed = dists_to_map(g, size_hw, 0.0) if keep_unsmoothed else None
    return FewShotImage(
        score=mean_top1p(dist),
        anomaly_map=amap,
        patch_dist=dist,
        grid=(int(grid[0]), int(grid[1])),
        mask=mask,
        knn_d=kd,
        knn_i=ki,
        map_resized=unsmoothed,
    )


def _memory_on(bank: MemoryBank, device: torch.device) -> list[torch.Tensor]:
    """The bank's rows on ``device`` (the bank itself on the CPU; other devices cached)."""
    dev = torch.device(device)
    if all(f.device == dev for f in bank.features):
        return bank.features
    key = ("memory_on", str(dev))
    if key not in bank._cache:
        bank._cache[key] = [f.to(dev) for f in bank.features]
    return bank._cache[key]


@torch.no_grad()
def score_images_with(
    dino,
    bank: MemoryBank,
    images_u8: Sequence[np.ndarray],
    options: FewShotOptions,
    *,
    keep_unsmoothed: bool = False,
) -> list[FewShotImage]:
    """Score uint8 test images against ``bank`` with a given DINOv2 wrapper.

    The search runs where the model runs: on a GPU the bank's rows are copied there once (and
    kept with the bank for later calls).
    """
    check_bank(bank, options, dino)
    memory = _memory_on(bank, dino.device)
    out = []
    for img in images_u8:
        [(f, grid)] = extract_features(dino, [img], options.image_size, options.pos_interp)
        out.append(
            score_features(
                f,
                grid,
                (img.shape[0], img.shape[1]),
                memory,
                options,
                keep_unsmoothed=keep_unsmoothed,
            )
        )
    return out


@torch.no_grad()
def score_contexts(
    dino,
    bank: MemoryBank,
    ctxs: Sequence,
    options: FewShotOptions,
    upsampler=None,
    scale: int = 1,
) -> list[FewShotImage]:
    """Score ImageContexts; each image's features are computed once per context and model
    setting (``ctx.get``), so several heads on one image (``anomalydino`` and
    ``crane+fewshot`` in one ``zsdense run``) share one DINOv2 forward.

    ``upsampler`` (a :class:`~zsdense.dense.upsamplers.LoadedUpsampler` for ``dino``): the test
    features are brought to ``scale`` × the patch grid (:func:`upsampled_features`) and each
    of those cells is compared with the memory as it is (the references' patches at their own
    grid); the mask (PCA foreground) is decided on the patch grid and repeated onto the cells.
    """
    check_bank(bank, options, dino)
    memory = _memory_on(bank, dino.device)
    mode = resolve_pos_interp(dino, options.pos_interp)
    key = ("fewshot-features", dino.name, int(options.image_size), mode)
    out = []
    for c in ctxs:
        f, grid = c.get(
            key, lambda c=c: extract_features(dino, [c.image_u8], options.image_size, mode)[0]
        )
        if upsampler is None:
            out.append(score_features(f, grid, c.size, memory, options))
            continue
        up_key = (*key, "upsampled", upsampler.spec.text, int(scale))
        fu, gu = c.get(
            up_key,
            lambda c=c, f=f, grid=grid: upsampled_features(
                dino, upsampler, c.image_u8, f, grid, options, scale
            ),
        )
        mask = None
        if options.masking:
            low = foreground_mask(f, grid, options.mask_threshold).reshape(grid)
            mask = np.repeat(np.repeat(low, scale, axis=0), scale, axis=1).reshape(-1)
        out.append(score_features(fu, gu, c.size, memory, options, mask=mask))
    return out


@torch.no_grad()
def upsampled_features(
    dino, upsampler, image_u8: np.ndarray, features, grid, options: FewShotOptions, scale: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(features (scale²·N, D) float32 on the CPU, grid × scale): the test image's patch
    features upsampled by ``upsampler``, guided by the image exactly as the scorer prepared it
    for DINOv2 (resized, ImageNet-normalised, cropped to the patch grid)."""
    x, g = prepare_image(image_u8, options.image_size, dino.patch_size)
    if tuple(g) != tuple(grid):
        raise ConfigError(f"few-shot upsampling: grid {g} of the image, features on {grid}")
    gh, gw = int(grid[0]), int(grid[1])
    values = features.t().reshape(1, -1, gh, gw).to(dino.device)
    out = upsampler.by_scale(x[None].to(dino.device), values, int(scale))
    d = out.shape[1]
    fu = out[0].reshape(d, -1).t().float().cpu().contiguous()
    return fu, (int(out.shape[-2]), int(out.shape[-1]))


def reference_maps(bank: MemoryBank, options: FewShotOptions) -> list[tuple[np.ndarray, float]]:
    """Each reference's own (map, score), scored against the rest of the memory.

    Leave-one-out: reference i's unrotated patches against every row not from reference i (not
    from its picture, for tiles of large references: ``bank.extra["groups"]``).
    With one reference, its rotated copies (angles other than 0) are the memory; with one
    reference and no rotation there is nothing to compare with and a ConfigError says so.
    These maps give the few-shot method's scale on good parts (thresholds, fusion).
    """
    key = ("reference_maps", options.knn_neighbors, options.sigma, options.masking)
    if key in bank._cache:
        return bank._cache[key]
    if bank.n_shots < 2 and len(bank.settings.get("rot_angles", [0])) < 2:
        raise ConfigError(
            "reference statistics need 2 or more reference images (or rotation on): "
            "the only reference cannot be compared with itself"
        )
    angles = [int(a) for a in bank.settings.get("rot_angles", [0])]
    angle0 = angles.index(0) if 0 in angles else 0  # the unrotated image's angle index
    with phase("leave-one-out maps of the references", bank.n_shots) as prog:
        out = []
        for i in range(bank.n_shots):
            out.append(_leave_one_out(bank, i, angle0, options))
            prog.update()
    bank._cache[key] = out
    return out


def _leave_one_out(
    bank: MemoryBank, i: int, angle0: int, options: FewShotOptions
) -> tuple[np.ndarray, float]:
    """Reference ``i``'s unrotated patches against the memory without it (or, for the only
    reference, against its own rotated copies): (map, score)."""
    src = bank.source[i]
    a0 = src[:, 1] == angle0
    gh, gw = bank.grids[i]
    n = gh * gw
    d = bank.features[i].shape[1]
    feats = torch.zeros(n, d, dtype=torch.float32)
    present = torch.zeros(n, dtype=torch.bool)
    feats[src[a0, 2].long()] = bank.features[i][a0].float().cpu()
    present[src[a0, 2].long()] = True
    groups = bank.extra.get("groups")
    if groups is not None and len(groups) == bank.n_shots and len(set(groups)) >= 2:
        # tiles of large references: leave out every tile of reference i's picture
        memory = [f for j, f in enumerate(bank.features) if groups[j] != groups[i]]
    elif bank.n_shots >= 2:
        memory = [f for j, f in enumerate(bank.features) if j != i]
    else:
        memory = [bank.features[i][~a0]]
    if options.masking:
        mask = bank.masks[i][angle0].numpy().astype(bool)
    else:
        mask = np.ones(n, dtype=bool)
    mask = mask & present.numpy()
    dist, _, _ = patch_distances(feats, mask, memory, options)
    amap = dists_to_map(dist.reshape(gh, gw), bank.sizes[i], options.sigma)
    return amap, mean_top1p(dist)
