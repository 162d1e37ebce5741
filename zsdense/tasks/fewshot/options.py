"""Few-shot (AnomalyDINO) options: every setting, the reference's per-dataset table, the
few-shot draw of references."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from zsdense.config import KNN_METRICS, with_overrides
from zsdense.dense.knn import DEFAULT_BUDGET_MB
from zsdense.errors import ConfigError
from zsdense.io.membank import MemoryBank

ROT_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)
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
