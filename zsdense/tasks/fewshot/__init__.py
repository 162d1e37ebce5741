"""Few-shot anomaly detection from a handful of good images (AnomalyDINO), and its fusion with
zero-shot Crane (``crane+fewshot``).

AnomalyDINO (Damm et al., WACV 2025) as its reference code runs it (``run_anomalydino.py`` ->
``run_anomaly_detection``; the recipe is ``shared/fixtures/anomalydino/README.md`` §1):

1. each image (uint8 RGB at its original size) is resized with Pillow's bicubic so that its
   smaller edge is ``image_size`` (448), aspect ratio kept, normalised with ImageNet mean/std
   and cropped **top-left** to multiples of 14 (:mod:`.preprocess`);
2. features: the last block's patch tokens after the final LayerNorm of DINOv2 (ViT-S/14 by
   default), class/register tokens dropped; models without registers resize their positional
   embedding the torch-hub way (``+0.1`` offset, :mod:`zsdense.models.dinov2`);
3. references are rotated by 0, 45, ..., 315° on the original uint8 image (OpenCV, reflect-101
   border) when ``rotation`` is on; every angle's patches go into the memory (:mod:`.bank`);
4. test images (and, with ``mask_ref_images``, the references) may be masked: the first
   principal component of the patch features, thresholded at 10, flipped when it keeps ≤ 35 %
   of the centre crop, then dilated and closed with a 3-wide window **along the flattened patch
   list** (wrapping across rows, as the reference's (N, 1) OpenCV call does) (:mod:`.masking`);
5. each kept test patch's distance to its nearest memory patch: ``1 − cos`` (``L2_normalized``,
   the mean over k for k > 1), or the Euclidean distance on raw features (``L2``); masked
   patches get 0 and still count (:mod:`.scoring`, exact search by :mod:`zsdense.dense.knn`);
6. image score: the mean of the top ``int(0.01·N)`` patch distances (the max when N < 100);
   pixel map: the patch grid resized bilinearly (OpenCV) to the **original** image size, then
   ``gaussian_filter(σ=4)``.

Per-dataset masking/rotation follow the reference table (:mod:`.options`). The parts:
:mod:`.options`, :mod:`.preprocess`, :mod:`.masking`, :mod:`.scoring`, :mod:`.bank` (the memory),
:mod:`.run` (AnomalyDINO over contexts, :func:`run_fewshot`) and :mod:`.fusion`
(``crane+fewshot``, :func:`run_crane_fewshot`). This package re-exports their public names.
"""

from __future__ import annotations

from zsdense.tasks.fewshot.bank import (
    bank_settings,
    build_memory,
    build_memory_with,
    check_bank,
    load_reference_bank,
    memory_from_features,
    model_identity,
    reference_contexts,
)
from zsdense.tasks.fewshot.fusion import (
    FUSED_THRESHOLD,
    FUSION_RULES,
    FusedState,
    MapStats,
    add_crane_stats,
    crane_reference_stats,
    fuse_maps,
    fuse_scores,
    fused_raw,
    fused_state,
    map_stats,
    normalise,
    run_crane_fewshot,
)
from zsdense.tasks.fewshot.masking import first_pc_scores, foreground_mask, morph_1d
from zsdense.tasks.fewshot.options import (
    BANK_KEYS,
    FEWSHOT_PRESETS,
    KNN_METRICS,
    MVTEC_INFORMED_ROTATION,
    MVTEC_MASKED,
    PREPROCESS_MODES,
    ROT_ANGLES,
    FewShotOptions,
    options_for,
    options_from_bank,
    preprocess_settings,
    reference_positions,
    select_references,
)
from zsdense.tasks.fewshot.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    extract_features,
    prepare_image,
    resize_smaller_edge,
    resized_size,
    resolve_pos_interp,
    rotate_image,
)
from zsdense.tasks.fewshot.run import (
    FewShotState,
    fewshot_raw,
    fewshot_state,
    reference_default,
    run_fewshot,
)
from zsdense.tasks.fewshot.scoring import (
    FewShotImage,
    dists_to_map,
    mean_top1p,
    patch_distances,
    reference_maps,
    score_contexts,
    score_features,
    score_images_with,
)

__all__ = [
    "BANK_KEYS",
    "FEWSHOT_PRESETS",
    "FUSED_THRESHOLD",
    "FUSION_RULES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNN_METRICS",
    "MVTEC_INFORMED_ROTATION",
    "MVTEC_MASKED",
    "PREPROCESS_MODES",
    "ROT_ANGLES",
    "FewShotImage",
    "FewShotOptions",
    "FewShotState",
    "FusedState",
    "MapStats",
    "add_crane_stats",
    "bank_settings",
    "build_memory",
    "build_memory_with",
    "check_bank",
    "crane_reference_stats",
    "dists_to_map",
    "extract_features",
    "fewshot_raw",
    "fewshot_state",
    "first_pc_scores",
    "foreground_mask",
    "fuse_maps",
    "fuse_scores",
    "fused_raw",
    "fused_state",
    "load_reference_bank",
    "map_stats",
    "mean_top1p",
    "memory_from_features",
    "model_identity",
    "morph_1d",
    "normalise",
    "options_for",
    "options_from_bank",
    "patch_distances",
    "prepare_image",
    "preprocess_settings",
    "reference_contexts",
    "reference_default",
    "reference_maps",
    "resize_smaller_edge",
    "resized_size",
    "resolve_pos_interp",
    "rotate_image",
    "run_crane_fewshot",
    "run_fewshot",
    "score_contexts",
    "score_features",
    "score_images_with",
    "reference_positions",
    "select_references",
]
