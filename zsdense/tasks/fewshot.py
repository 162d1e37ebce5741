"""Few-shot anomaly detection from a handful of good images (AnomalyDINO), and its fusion with
zero-shot Crane (``crane+fewshot``).

AnomalyDINO (Damm et al., WACV 2025) as its reference code runs it (``run_anomalydino.py`` ->
``run_anomaly_detection``; the recipe is ``shared/fixtures/anomalydino/README.md`` §1):

1. each image (uint8 RGB at its original size) is resized with Pillow's bicubic so that its
   smaller edge is ``image_size`` (448), aspect ratio kept, normalised with ImageNet mean/std
   and cropped **top-left** to multiples of 14 (:func:`prepare_image`);
2. features: the last block's patch tokens after the final LayerNorm of DINOv2 (ViT-S/14 by
   default), class/register tokens dropped; models without registers resize their positional
   embedding the torch-hub way (``+0.1`` offset, :mod:`zsdense.models.dinov2`);
3. references are rotated by 0, 45, ..., 315° on the original uint8 image (OpenCV, reflect-101
   border) when ``rotation`` is on; every angle's patches go into the memory;
4. test images (and, with ``mask_ref_images``, the references) may be masked: the first
   principal component of the patch features, thresholded at 10, flipped when it keeps ≤ 35 %
   of the centre crop, then dilated and closed with a 3-wide window **along the flattened patch
   list** (wrapping across rows, as the reference's (N, 1) OpenCV call does);
5. each kept test patch's distance to its nearest memory patch: ``1 − cos`` (``L2_normalized``,
   the mean over k for k > 1), or the Euclidean distance on raw features (``L2``); masked
   patches get 0 and still count;
6. image score: the mean of the top ``int(0.01·N)`` patch distances (the max when N < 100);
   pixel map: the patch grid resized bilinearly (OpenCV) to the **original** image size, then
   ``gaussian_filter(σ=4)``.

Per-dataset masking/rotation follow the reference table (:func:`preprocess_settings`).

Public entry points: :func:`build_memory` (a :class:`~zsdense.io.membank.MemoryBank` from good
images), :func:`run_fewshot` (``AnomalyResult`` per test image, ``reference`` = images or a
bank), :func:`run_crane_fewshot` and the fusion rule :func:`fuse_maps` / :func:`fuse_scores`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from zsdense.config import with_overrides
from zsdense.dense.knn import DEFAULT_BUDGET_MB, knn_search, l2_normalize
from zsdense.errors import ConfigError
from zsdense.io.membank import FORMAT_VERSION, MemoryBank, load_memory
from zsdense.tasks.anomaly import (
    AnomalyResult,
    _calibration_images,
    calibrate_threshold,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROT_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)
KNN_METRICS = ("L2_normalized", "L2")
PREPROCESS_MODES = (
    "agnostic",
    "informed",
    "masking_only",
    "agnostic_no_mask",
    "informed_no_mask",
    "force_no_mask_no_rotation",
    "force_mask_no_rotation",
    "force_no_mask_rotation",
    "force_mask_rotation",
)
# the reference's masking test (paper Fig. 2): MVTec objects whose test images are masked
MVTEC_MASKED = frozenset({"capsule", "hazelnut", "pill", "screw", "toothbrush"})
MVTEC_INFORMED_ROTATION = frozenset({"hazelnut", "screw"})
# options that decide the memory's rows: a bank is only usable with the same values
BANK_KEYS = ("model", "image_size", "pos_interp", "rotation", "rot_angles", "mask_refs")
BANK_KEYS += ("mask_threshold", "knn_metric")
FUSION_RULES = ("mean", "max")


# ---- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FewShotOptions:
    """Every setting of the few-shot scorer; defaults are ``run_anomalydino.py``'s.

    ``masking`` / ``rotation`` default to the reference's ``agnostic`` choice for data it does
    not know (no masking, rotation on); :func:`options_for` fills them from the reference's
    per-dataset table. ``pos_interp="auto"``: the hub resize (+0.1 offset) for DINOv2 without
    registers, transformers' own for ``-reg`` models (the hub ``_reg`` models agree with it).
    ``shots``: use only the first N reference images (None: all). ``knn_backend``: ``torch``
    (exact, chunked) or ``faiss`` / ``auto`` (faiss-cpu when installed; same neighbours).
    """

    model: str = "dinov2-small"
    image_size: int = 448  # smaller edge after the resize
    pos_interp: str = "auto"  # auto | hub | transformers
    masking: bool = False  # PCA foreground masking of test images
    rotation: bool = True  # 8 rotations of each reference
    rot_angles: tuple[int, ...] = ROT_ANGLES
    mask_ref_images: bool = False  # also mask the references (only when masking is on)
    mask_threshold: float = 10.0  # first-PC score threshold (absolute; ViT-S scale)
    knn_neighbors: int = 1
    knn_metric: str = "L2_normalized"  # L2_normalized (1 - cos) | L2
    sigma: float = 4.0  # Gaussian smoothing of the map at the original resolution
    shots: int | None = None
    knn_backend: str = "torch"
    knn_budget_mb: int = DEFAULT_BUDGET_MB  # distances held at once during the search

    def validate(self) -> FewShotOptions:
        """Self, or a ConfigError naming the bad option."""
        if self.knn_metric not in KNN_METRICS:
            raise ConfigError(
                f"knn_metric must be one of {', '.join(KNN_METRICS)}, not {self.knn_metric!r}"
            )
        if self.pos_interp not in ("auto", "hub", "transformers"):
            raise ConfigError(
                f"pos_interp must be auto, hub or transformers, not {self.pos_interp!r}"
            )
        if int(self.knn_neighbors) < 1:
            raise ConfigError(f"knn_neighbors must be >= 1, got {self.knn_neighbors}")
        if int(self.image_size) < 14:
            raise ConfigError(f"image_size must be at least 14 px, got {self.image_size}")
        if self.shots is not None and int(self.shots) < 1:
            raise ConfigError(f"--shots must be >= 1, got {self.shots}")
        if not self.rot_angles or (0 not in self.rot_angles and self.rotation):
            raise ConfigError("rot_angles must include 0 (the unrotated reference)")
        if float(self.sigma) < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        if int(self.knn_budget_mb) < 1:
            raise ConfigError(f"knn_budget_mb must be >= 1, got {self.knn_budget_mb}")
        return self

    @property
    def mask_refs(self) -> bool:
        """The reference masks references only when masking is on (``mask_ref_images and
        masking``)."""
        return bool(self.mask_ref_images and self.masking)

    def angles(self) -> tuple[int, ...]:
        return tuple(int(a) for a in self.rot_angles) if self.rotation else (0,)


FEWSHOT_PRESETS: dict[str, FewShotOptions] = {"anomalydino": FewShotOptions()}


def _norm_name(s: str | None) -> str:
    return (s or "").strip().lower().replace("-", "_").replace(" ", "_")


def preprocess_settings(
    preprocess: str, dataset: str | None, object_name: str | None
) -> tuple[bool, bool]:
    """(masking, rotation) as the reference's ``get_dataset_info`` decides them.

    MVTec: masking for capsule, hazelnut, pill, screw, toothbrush; rotation for all objects
    (``agnostic``), hazelnut and screw (``informed``) or none (``masking_only``). VisA: masking
    for all; rotation for all (``agnostic``) or none. ``*_no_mask`` turns masking off,
    ``force_{mask,no_mask}_{rotation,no_rotation}`` sets both. Data the reference does not know
    (``dataset`` None or other) is treated as an unlisted MVTec object: no masking, rotation
    per mode.
    """
    if preprocess not in PREPROCESS_MODES:
        raise ConfigError(
            f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, not {preprocess!r}"
        )
    if preprocess.startswith("force_"):
        return not preprocess.startswith("force_no_mask"), not preprocess.endswith("no_rotation")
    ds = _norm_name(dataset).replace("_", "")
    obj = _norm_name(object_name)
    visa = ds == "visa"
    if visa:
        masking = not preprocess.endswith("_no_mask")
        rotation = preprocess in ("agnostic", "agnostic_no_mask")
        return masking, rotation
    masking = obj in MVTEC_MASKED and not preprocess.endswith("_no_mask")
    if preprocess in ("agnostic", "agnostic_no_mask"):
        rotation = True
    elif preprocess in ("informed", "informed_no_mask"):
        rotation = obj in MVTEC_INFORMED_ROTATION
    else:
        rotation = False
    return masking, rotation


def options_for(
    object_name: str | None = None,
    dataset: str | None = None,
    preprocess: str = "agnostic",
    **overrides: Any,
) -> FewShotOptions:
    """Options with masking/rotation from the reference table, then ``overrides`` (None values
    ignored; unknown names are a ConfigError)."""
    masking, rotation = preprocess_settings(preprocess, dataset, object_name)
    given = dict(overrides)
    if given.get("rot_angles") is not None:
        given["rot_angles"] = tuple(int(a) for a in given["rot_angles"])
    base = FewShotOptions(masking=masking, rotation=rotation)
    return with_overrides(base, "few-shot", **given).validate()


def options_from_bank(bank: MemoryBank, **overrides: Any) -> FewShotOptions:
    """Options matching a bank's settings (test-time options from ``overrides``)."""
    s = bank.settings
    kw: dict[str, Any] = {
        "model": s["model"],
        "image_size": int(s["image_size"]),
        "pos_interp": s["pos_interp"],
        "rotation": bool(s["rotation"]),
        "rot_angles": tuple(int(a) for a in s["rot_angles"]),
        "mask_threshold": float(s["mask_threshold"]),
        "knn_metric": s["knn_metric"],
    }
    kw["masking"] = bool(s.get("masking", False))
    if s.get("mask_refs"):
        kw.update(masking=True, mask_ref_images=True)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if "rot_angles" in kw:
        kw["rot_angles"] = tuple(int(a) for a in kw["rot_angles"])
    return replace(FewShotOptions(), **kw).validate()


def reference_positions(n_given: int, shots: int | None, seed: int = 0) -> list[int]:
    """Positions in a list of ``n_given`` reference images that the reference's few-shot draw
    takes: ``seed·shots .. (seed+1)·shots − 1`` (consecutive, disjoint blocks per seed; the last
    block may be short); all of them when ``shots`` is None or -1 (full-shot)."""
    if shots is None or int(shots) == -1:
        return list(range(int(n_given)))
    n, s = int(shots), int(seed)
    if n < 1 or s < 0:
        raise ConfigError(f"--shots must be >= 1 (or -1 for all) and --seed >= 0; got {n}, {s}")
    chosen = list(range(s * n, min((s + 1) * n, int(n_given))))
    if not chosen:
        raise ConfigError(
            f"seed {s} with {n} shots needs more than {s * n} good images; there are {n_given}"
        )
    return chosen


def select_references(files: Sequence[Any], shots: int | None, seed: int = 0) -> list:
    """The reference's few-shot draw: ``sorted(files)[seed·n : (seed+1)·n]`` (consecutive files
    in name order, disjoint blocks per seed); ``shots`` None or -1 = all (full-shot)."""
    ordered = sorted(files, key=lambda p: str(p))
    return [ordered[i] for i in reference_positions(len(ordered), shots, seed)]


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


# ---- features and masks ----------------------------------------------------------------------


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


def first_pc_scores(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """Scores on the first principal component (N,), float64, exact (no randomized solver).

    Sign as scikit-learn >= 1.5 (the reference's as-run version): the component's
    largest-magnitude entry is positive. The reference's randomized PCA agrees to ~3e-5.
    """
    f = np.asarray(features, dtype=np.float32).astype(np.float64)
    centred = f - f.mean(axis=0, keepdims=True)
    # the top right-singular vector of the centred features = the top eigenvector of their
    # (D, D) scatter matrix (much cheaper than an SVD of the (N, D) matrix)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    v = vecs[:, -1]
    if v[np.argmax(np.abs(v))] < 0:
        v = -v
    return centred @ v


def morph_1d(mask: np.ndarray, kernel: int = 3) -> np.ndarray:
    """Dilation then closing (dilate, erode) with a ``kernel``-wide window along the flat index.

    This is OpenCV's 3×3 dilation/closing applied to the reference's (N, 1) column: only the
    neighbours n−1, n+1 of the flattened row-major list count (so a run wraps from the end of
    one grid row to the start of the next); positions outside the list are ignored.
    """
    m = np.asarray(mask, dtype=bool).ravel()
    r = kernel // 2

    def window(x: np.ndarray, op, pad_value: bool) -> np.ndarray:
        p = np.pad(x, r, constant_values=pad_value)
        stack = np.stack([p[i : i + x.size] for i in range(2 * r + 1)])
        return op(stack, axis=0)

    d = window(m, np.any, False)
    d = window(d, np.any, False)  # closing = dilate ...
    return window(d, np.all, True)  # ... then erode


def foreground_mask(
    features: torch.Tensor | np.ndarray,
    grid: tuple[int, int],
    threshold: float = 10.0,
    *,
    border: float = 0.2,
    centre_fraction: float = 0.35,
    kernel: int = 3,
) -> np.ndarray:
    """The reference's zero-shot foreground mask (N,) bool (``compute_background_mask``).

    m = first-PC score > ``threshold``; if m keeps ≤ ``centre_fraction`` of the centre crop
    (rows/cols ``int(border·g):int((1−border)·g)``), m = −score > ``threshold`` (no second
    check); then :func:`morph_1d`.
    """
    s = first_pc_scores(features)
    gh, gw = int(grid[0]), int(grid[1])
    m = s > threshold
    crop = m.reshape(gh, gw)[
        int(gh * border) : int(gh * (1 - border)), int(gw * border) : int(gw * (1 - border))
    ]
    if crop.sum() <= crop.size * centre_fraction:
        m = -s > threshold
    return morph_1d(m, kernel)


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


# ---- the memory ------------------------------------------------------------------------------


def bank_settings(options: FewShotOptions, dino) -> dict:
    """The bank-defining settings (``BANK_KEYS``) as JSON-able values."""
    return {
        "model": options.model,
        "image_size": int(options.image_size),
        "pos_interp": resolve_pos_interp(dino, options.pos_interp),
        "rotation": bool(options.rotation),
        "rot_angles": [int(a) for a in options.angles()],
        "mask_refs": options.mask_refs,
        "mask_threshold": float(options.mask_threshold),
        "knn_metric": options.knn_metric,
        "masking": bool(options.masking),  # test-time default recorded for options_from_bank
    }


def model_identity(dino, options: FewShotOptions) -> dict:
    """What a bank records about its backbone: registry name, model name, weights SHA-256."""
    return {
        "name": options.model,
        "model": dino.name,
        "weights_sha256": dino.weights_sha256(),
        "random_weights": bool(getattr(dino, "is_random", False)),
    }


def memory_from_features(
    per_reference: Sequence[Sequence[tuple[torch.Tensor, tuple[int, int]]]],
    sizes: Sequence[tuple[int, int]],
    options: FewShotOptions,
    *,
    settings: dict,
    model: dict,
    names: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
) -> MemoryBank:
    """A bank from features already extracted: ``per_reference[r][a]`` = (features (N, D),
    grid) of reference r at angle index a. Rows in the reference's order: reference, angle,
    patch; masks are computed for every reference and angle (rows are dropped only when
    ``options.mask_refs``).

    ``source`` rows are (position, angle index, patch): ``positions[r]`` is reference r's
    place in the list the user gave (default r), so a row names the image it came from even
    when a few-shot draw used only part of that list (as the reference numbers its memory).
    """
    pos = list(range(len(per_reference))) if positions is None else [int(p) for p in positions]
    if len(pos) != len(per_reference):
        raise ConfigError(f"{len(pos)} positions for {len(per_reference)} reference images")
    feats, source, masks, grids = [], [], [], []
    for r, per_angle in enumerate(per_reference):
        rows, src, mks = [], [], []
        for a, (f, grid) in enumerate(per_angle):
            if options.masking:
                m = foreground_mask(f, grid, options.mask_threshold)
            else:
                m = np.ones(f.shape[0], dtype=bool)
            mks.append(torch.from_numpy(m))
            keep = m if options.mask_refs else np.ones(f.shape[0], dtype=bool)
            idx = np.nonzero(keep)[0]
            sel = f[torch.from_numpy(idx)].float()
            if options.knn_metric == "L2_normalized":
                sel = l2_normalize(sel)
            rows.append(sel)
            s = np.stack([np.full(idx.size, pos[r]), np.full(idx.size, a), idx], axis=1)
            src.append(torch.from_numpy(s.astype(np.int32)))
        feats.append(torch.cat(rows, dim=0).contiguous())
        source.append(torch.cat(src, dim=0))
        masks.append(torch.stack(mks))
        grids.append(tuple(int(v) for v in per_angle[0][1]))
    n = len(feats)
    return MemoryBank(
        features=feats,
        source=source,
        masks=masks,
        grids=grids,
        sizes=[(int(h), int(w)) for h, w in sizes],
        names=[str(x) for x in (names or [f"ref{i}" for i in range(n)])][:n],
        settings=settings,
        model=model,
        format_version=FORMAT_VERSION,
    )


@torch.no_grad()
def build_memory_with(
    dino,
    images_u8: Sequence[np.ndarray],
    options: FewShotOptions,
    names: Sequence[str] | None = None,
    *,
    seed: int = 0,
) -> MemoryBank:
    """A bank from uint8 reference images with a given DINOv2 wrapper (see :func:`build_memory`).

    With ``options.shots`` the references are the reference's few-shot draw from the given
    list (:func:`reference_positions`: the block ``seed·shots ..``; the first ``shots`` at seed
    0); each bank row records its image's position in the given list. Each reference is rotated
    (``options.angles()``), its angles run through the model as one batch, and its rows are
    appended; the memory is a list of per-reference blocks, never concatenated into a second
    copy.
    """
    options = options.validate()
    given = list(images_u8)
    if not given:
        raise ConfigError("few-shot scoring needs at least one reference (good) image")
    positions = reference_positions(len(given), options.shots, seed)
    imgs = [given[i] for i in positions]
    angles = options.angles()
    settings = bank_settings(options, dino)
    model = model_identity(dino, options)
    parts: list[MemoryBank] = []
    for img, at in zip(imgs, positions, strict=True):
        rotated = [rotate_image(img, a) for a in angles]
        fg = extract_features(dino, rotated, options.image_size, options.pos_interp)
        parts.append(
            memory_from_features(
                [fg], [img.shape[:2]], options, settings=settings, model=model, positions=[at]
            )
        )
    bank = parts[0]
    for p in parts[1:]:
        bank.features.append(p.features[0])
        bank.source.append(p.source[0])
        bank.masks.append(p.masks[0])
        bank.grids.append(p.grids[0])
        bank.sizes.append(p.sizes[0])
    all_names = [str(x) for x in (names or [])]
    all_names += [f"ref{i}" for i in range(len(all_names), len(given))]
    bank.names = [all_names[i] for i in positions]
    return bank


def _reference_contexts(rt, images: Any) -> tuple[list, list[str]]:
    """Reference images (folder / glob / file / list of paths, arrays, PIL, contexts) ->
    (ImageContexts, names). Folders and globs are read in sorted name order."""
    if isinstance(images, (str, Path)):
        items = _calibration_images(images)
        items = sorted(items, key=lambda p: str(p))
    else:
        items = list(images)
    if not items:
        raise ConfigError("few-shot scoring needs at least one reference (good) image")
    names = [str(p) if isinstance(p, (str, Path)) else f"ref{i}" for i, p in enumerate(items)]
    return rt.contexts(items), names


def _reference_inputs(rt, images: Any) -> tuple[list[np.ndarray], list[str]]:
    """Like :func:`_reference_contexts`, as uint8 RGB arrays."""
    ctxs, names = _reference_contexts(rt, images)
    return [c.image_u8 for c in ctxs], names


def build_memory(
    rt, images: Any, options: FewShotOptions | None = None, *, object_name=None, dataset=None
) -> MemoryBank:
    """A :class:`MemoryBank` from known-good ``images`` with the runtime's DINOv2.

    ``images``: a folder, glob, file or a list of paths / arrays / PIL images. ``options``
    default to :func:`options_for` ``(object_name, dataset)``.
    """
    opts = options or options_for(object_name, dataset)
    imgs, names = _reference_inputs(rt, images)
    dino = rt.dinov2(opts.model)
    with rt.autocast():
        return build_memory_with(dino, imgs, opts, names)


def check_bank(bank: MemoryBank, options: FewShotOptions, dino) -> None:
    """ConfigError unless ``bank`` was built with this model and these bank-defining settings."""
    want_model = model_identity(dino, options)
    have = bank.model
    problems = []
    if have.get("name") != want_model["name"] or have.get("model") != want_model["model"]:
        problems.append(
            f"model: bank {have.get('model')!r} ({have.get('name')}), "
            f"now {want_model['model']!r} ({want_model['name']})"
        )
    elif have.get("weights_sha256") != want_model["weights_sha256"]:
        problems.append(
            "model weights: bank SHA-256 "
            f"{str(have.get('weights_sha256'))[:12]}..., loaded weights "
            f"{want_model['weights_sha256'][:12]}..."
        )
    want = bank_settings(options, dino)
    for k in BANK_KEYS:
        if bank.settings.get(k) != want[k]:
            problems.append(f"{k}: bank {bank.settings.get(k)!r}, now {want[k]!r}")
    if problems:
        raise ConfigError(
            "this memory bank was built with another model or other settings ("
            + "; ".join(problems)
            + "): rebuild it with `zsdense memory build` for these settings, or run with the "
            "bank's settings"
        )


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
) -> FewShotImage:
    """Score one image's (N, D) features against ``memory`` (bank rows)."""
    if options.masking:
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
    dino, bank: MemoryBank, ctxs: Sequence, options: FewShotOptions
) -> list[FewShotImage]:
    """Score ImageContexts; each image's features are computed once per context and model
    setting (``ctx.get``), so several heads on one image (``anomalydino`` and
    ``crane+fewshot`` in one ``zsdense run``) share one DINOv2 forward."""
    check_bank(bank, options, dino)
    memory = _memory_on(bank, dino.device)
    mode = resolve_pos_interp(dino, options.pos_interp)
    key = ("fewshot-features", dino.name, int(options.image_size), mode)
    out = []
    for c in ctxs:
        f, grid = c.get(
            key, lambda c=c: extract_features(dino, [c.image_u8], options.image_size, mode)[0]
        )
        out.append(score_features(f, grid, c.size, memory, options))
    return out


def reference_maps(bank: MemoryBank, options: FewShotOptions) -> list[tuple[np.ndarray, float]]:
    """Each reference's own (map, score), scored against the rest of the memory.

    Leave-one-out: reference i's unrotated patches against every row not from reference i.
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
    out = []
    for i in range(bank.n_shots):
        src = bank.source[i]
        a0 = src[:, 1] == angle0
        gh, gw = bank.grids[i]
        n = gh * gw
        d = bank.features[i].shape[1]
        feats = torch.zeros(n, d, dtype=torch.float32)
        present = torch.zeros(n, dtype=torch.bool)
        feats[src[a0, 2].long()] = bank.features[i][a0].float().cpu()
        present[src[a0, 2].long()] = True
        if bank.n_shots >= 2:
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
        out.append((amap, mean_top1p(dist)))
    bank._cache[key] = out
    return out


def _as_bank(rt, reference: Any, options: FewShotOptions | None, object_name, dataset):
    """(bank, options) from a bank object, a bank path or reference images."""
    if isinstance(reference, MemoryBank):
        bank = reference
    elif isinstance(reference, (str, Path)) and str(reference).endswith(".zsdmem"):
        bank = load_memory(reference)
    else:
        opts = options or options_for(object_name, dataset)
        return build_memory(rt, reference, opts), opts
    opts = options or options_from_bank(bank)
    if opts.shots is not None and int(opts.shots) != bank.n_shots:
        if int(opts.shots) > bank.n_shots:
            raise ConfigError(
                f"--shots {opts.shots}: the memory bank holds only {bank.n_shots} references"
            )
        bank = bank.first(int(opts.shots))
    return bank, opts


def run_fewshot(
    rt,
    ctxs: Sequence,
    *,
    reference: Any,
    options: FewShotOptions | None = None,
    object_name: str | None = None,
    dataset: str | None = None,
    threshold: float | None = None,
    image_threshold: float | None = None,
    calibrate_with: Any = None,
    calibrate_percentile: float | None = None,
) -> list[AnomalyResult]:
    """Few-shot (AnomalyDINO) results for ``ctxs`` against ``reference``.

    ``reference``: good images (folder, glob, paths, arrays), a ``.zsdmem`` path or a
    :class:`MemoryBank`. ``options``: :class:`FewShotOptions` (default: :func:`options_for`
    ``(object_name, dataset)`` for images, the bank's own settings for a bank; a bank built
    with other settings or another model is refused).

    Decisions as the zero-shot path: ``threshold`` fixed, else calibrated from
    ``calibrate_with`` good images (max of their maps or a percentile), else the max of the
    references' leave-one-out maps (:func:`reference_maps`, source ``"references"``), else
    0.5 with a note. ``image_threshold`` likewise from scores (no default: label None).
    The map is ``1 − cos`` distance (``L2_normalized``), not a probability.
    """
    from zsdense.config import ANOMALY_DEFAULT_THRESHOLD

    ctxs = rt.contexts(list(ctxs))
    if not ctxs:
        return []
    bank, opts = _as_bank(rt, reference, options, object_name, dataset)
    opts = opts.validate()
    dino = rt.dinov2(opts.model)
    check_bank(bank, opts, dino)
    with rt.autocast():
        scored = score_contexts(dino, bank, ctxs, opts)

    thr, thr_src = threshold, ("fixed" if threshold is not None else None)
    ithr, ithr_src = image_threshold, ("fixed" if image_threshold is not None else None)
    calib_n = None
    if calibrate_with is not None and (thr is None or ithr is None):
        cal_imgs = rt.contexts(_calibration_images(calibrate_with))
        with rt.autocast():
            cal = score_contexts(dino, bank, cal_imgs, opts)
        calib_n = len(cal)
        if thr is None:
            thr = calibrate_threshold([c.anomaly_map for c in cal], calibrate_percentile)
            thr_src = "calibrated"
        if ithr is None:
            ithr = calibrate_threshold([np.array([c.score]) for c in cal], calibrate_percentile)
            ithr_src = "calibrated"
    note = None
    if thr is None:
        try:
            refs = reference_maps(bank, opts)
            thr = calibrate_threshold([m for m, _ in refs], calibrate_percentile)
            thr_src = "references"
        except ConfigError as exc:
            thr, thr_src = ANOMALY_DEFAULT_THRESHOLD, "default"
            note = (
                f"few-shot maps are 1 - cos distances, not probabilities, and {exc}: pass "
                "--threshold or --calibrate-with for a meaningful mask"
            )
    thr = float(thr)
    ithr = None if ithr is None else float(ithr)

    results = []
    for r in scored:
        amap = r.anomaly_map.astype(np.float32)
        meta = dict(rt.result_meta())
        meta.update(
            preset="anomalydino",
            method="fewshot",
            fewshot={
                **{k: v for k, v in asdict(opts).items() if k != "rot_angles"},
                "rot_angles": list(opts.angles()),
                "n_shots": bank.n_shots,
                "memory_rows": bank.n_rows,
                "grid": list(r.grid),
                "kept_patches": int(r.mask.sum()),
            },
            threshold=thr,
            threshold_source=thr_src,
            image_threshold=ithr,
            image_threshold_source=ithr_src,
        )
        if calib_n is not None:
            meta["calibration"] = {
                "n_images": calib_n,
                "rule": "max"
                if calibrate_percentile is None
                else f"percentile {calibrate_percentile}",
            }
        if note:
            meta["threshold_note"] = note
        results.append(
            AnomalyResult(
                score=float(r.score),
                anomaly_map=amap,
                mask=amap >= thr,
                label=None if ithr is None else bool(r.score >= ithr),
                threshold=thr,
                image_threshold=ithr,
                meta=meta,
            )
        )
    return results


# ---- fusion with Crane: crane+fewshot ----------------------------------------------------------


@dataclass(frozen=True)
class MapStats:
    """A method's scale on good parts: the mean and the max of the reference images' maps."""

    mean: float
    high: float
    n_images: int

    @property
    def scale(self) -> float:
        return max(self.high - self.mean, 1e-12 * max(1.0, abs(self.high)))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "high": self.high, "n_images": self.n_images}


def map_stats(maps: Sequence[np.ndarray]) -> MapStats:
    """:class:`MapStats` of the references' own maps (mean over all pixels, max pixel)."""
    if not maps:
        raise ConfigError("fusion needs the maps of at least one reference image")
    flat = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    return MapStats(mean=float(flat.mean()), high=float(flat.max()), n_images=len(maps))


def normalise(values: np.ndarray | float, stats: MapStats) -> np.ndarray | float:
    """(v − mean) / (high − mean): 0 = a typical good pixel, 1 = the worst good pixel."""
    return (np.asarray(values, dtype=np.float64) - stats.mean) / stats.scale


def fuse_maps(
    crane_map: np.ndarray,
    fewshot_map: np.ndarray,
    crane_stats: MapStats,
    fewshot_stats: MapStats,
    *,
    weight: float = 0.5,
    rule: str = "mean",
) -> np.ndarray:
    """The ``crane+fewshot`` map: each map normalised by its method's reference statistics
    (:func:`normalise`), then combined: ``rule="mean"`` → (1−w)·crane + w·fewshot (default
    w = 0.5), ``"max"`` → the pixelwise max. A value above 1 is above anything either method
    saw on the good references, so 1.0 is the natural threshold. Float32 (H, W)."""
    if rule not in FUSION_RULES:
        raise ConfigError(f"fusion rule must be one of {', '.join(FUSION_RULES)}, not {rule!r}")
    if not 0.0 <= float(weight) <= 1.0:
        raise ConfigError(f"fusion weight must be in [0, 1], got {weight}")
    c = normalise(crane_map, crane_stats)
    f = normalise(fewshot_map, fewshot_stats)
    if c.shape != f.shape:
        raise ConfigError(f"fusion maps differ in size: {c.shape} vs {f.shape}")
    out = np.maximum(c, f) if rule == "max" else (1.0 - weight) * c + weight * f
    return out.astype(np.float32)


def fuse_scores(
    crane_score: float,
    fewshot_score: float,
    crane_stats: MapStats,
    fewshot_stats: MapStats,
    *,
    weight: float = 0.5,
    rule: str = "mean",
) -> float:
    """The image score, fused like the maps: each method's score normalised with the same
    reference statistics as its map (both scores are in their map's units: Crane's is an
    abnormal probability, AnomalyDINO's a mean of patch distances), then mean / max."""
    c = float(normalise(crane_score, crane_stats))
    f = float(normalise(fewshot_score, fewshot_stats))
    if rule == "max":
        return max(c, f)
    return (1.0 - weight) * c + weight * f


FUSED_THRESHOLD = 1.0


def run_crane_fewshot(
    rt,
    ctxs: Sequence,
    *,
    reference: Any,
    options: FewShotOptions | None = None,
    crane_preset: str = "crane+",
    object_name: str | None = None,
    dataset: str | None = None,
    weight: float = 0.5,
    rule: str = "mean",
    threshold: float | None = None,
    image_threshold: float | None = None,
    crane_options: dict | None = None,
    reference_images: Any = None,
) -> list[AnomalyResult]:
    """``crane+fewshot``: Crane(+) and AnomalyDINO, each normalised on the good references.

    The references are scored by both methods: Crane's maps of the reference images, and the
    few-shot leave-one-out maps (:func:`reference_maps`); their :class:`MapStats` put both maps
    on one scale (0 = typical good pixel, 1 = the worst good pixel) and :func:`fuse_maps` /
    :func:`fuse_scores` combine them. ``reference``: good images or a bank; with a bank, the
    Crane statistics come from ``bank.extra["crane_stats"][crane_preset]`` (stored by
    ``zsdense memory build --crane-preset``) or from ``reference_images``. Default thresholds:
    1.0 on the fused map, none on the score (fixed values override).
    """
    from zsdense.tasks.anomaly import run_anomaly

    ctxs = rt.contexts(list(ctxs))
    if not ctxs:
        return []
    bank, opts = _as_bank(rt, reference, options, object_name, dataset)
    few = run_fewshot(rt, ctxs, reference=bank, options=opts, threshold=0.0, image_threshold=0.0)
    few_stats_maps = reference_maps(bank, opts)
    few_stats = map_stats([m for m, _ in few_stats_maps])
    copts = dict(crane_options or {})
    copts.update(threshold=1.0, image_threshold=None)
    crane = run_anomaly(rt, ctxs, object_name=object_name, preset=crane_preset, **copts)
    crane_stats = crane_reference_stats(
        rt, bank, crane_preset, object_name, reference, reference_images, copts
    )
    thr = FUSED_THRESHOLD if threshold is None else float(threshold)
    out = []
    for c, f in zip(crane, few):
        fmap = fuse_maps(
            c.anomaly_map, f.anomaly_map, crane_stats, few_stats, weight=weight, rule=rule
        )
        score = fuse_scores(c.score, f.score, crane_stats, few_stats, weight=weight, rule=rule)
        meta = dict(rt.result_meta())
        meta.update(
            preset="crane+fewshot",
            method="crane+fewshot",
            crane_preset=crane_preset,
            fusion={
                "rule": rule,
                "weight": weight,
                "crane_stats": crane_stats.to_dict(),
                "fewshot_stats": few_stats.to_dict(),
                "crane_score": c.score,
                "fewshot_score": f.score,
            },
            fewshot=f.meta.get("fewshot"),
            threshold=thr,
            threshold_source="fixed" if threshold is not None else "default",
            image_threshold=image_threshold,
            image_threshold_source="fixed" if image_threshold is not None else None,
        )
        out.append(
            AnomalyResult(
                score=float(score),
                anomaly_map=fmap,
                mask=fmap >= thr,
                label=None if image_threshold is None else bool(score >= image_threshold),
                threshold=thr,
                image_threshold=None if image_threshold is None else float(image_threshold),
                meta=meta,
            )
        )
    return out


def crane_reference_stats(
    rt,
    bank: MemoryBank,
    crane_preset: str,
    object_name: str | None,
    reference: Any,
    reference_images: Any,
    crane_options: dict,
) -> MapStats:
    """Crane's :class:`MapStats` on the good references (from the images, or stored in the
    bank's ``extra`` by :func:`add_crane_stats`)."""
    from zsdense.tasks.anomaly import run_anomaly

    images = reference_images
    if (
        images is None
        and not isinstance(reference, (MemoryBank,))
        and not (isinstance(reference, (str, Path)) and str(reference).endswith(".zsdmem"))
    ):
        images = reference
    if images is None:
        stored = (bank.extra.get("crane_stats") or {}).get(crane_preset)
        if stored is None:
            raise ConfigError(
                f"crane+fewshot with a memory bank needs Crane's statistics for {crane_preset!r}"
                ": build the bank with `zsdense memory build ... --crane-preset "
                f"{crane_preset}` or give the reference images too"
            )
        if stored.get("models") != rt.config.models:
            raise ConfigError(
                f"the bank's Crane statistics were made with models={stored.get('models')!r}, "
                f"this run uses {rt.config.models!r}: rebuild the bank"
            )
        return MapStats(float(stored["mean"]), float(stored["high"]), int(stored["n_images"]))
    ctxs, _ = _reference_contexts(rt, images)
    n = bank.n_shots
    res = run_anomaly(rt, ctxs[:n], object_name=object_name, preset=crane_preset, **crane_options)
    return map_stats([r.anomaly_map for r in res])


def add_crane_stats(
    rt,
    bank: MemoryBank,
    images: Any,
    crane_preset: str = "crane+",
    object_name: str | None = None,
    crane_options: dict | None = None,
) -> MemoryBank:
    """Store Crane's reference statistics in ``bank.extra`` (for ``crane+fewshot`` from a bank)."""
    copts = dict(crane_options or {})
    copts.update(threshold=1.0, image_threshold=None)
    st = crane_reference_stats(rt, bank, crane_preset, object_name, images, images, copts)
    extra = dict(bank.extra)
    cs = dict(extra.get("crane_stats") or {})
    cs[crane_preset] = {**st.to_dict(), "models": rt.config.models, "object": object_name}
    extra["crane_stats"] = cs
    bank.extra = extra
    return bank
