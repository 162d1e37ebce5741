"""Settings and named presets: the one place where defaults live.

Each task area keeps its presets in its own section below as frozen dataclasses; a preset is
data (constants from the specs), chosen by name with ``--preset`` / ``preset=``. The model set
(``default`` real weights or ``tiny`` random ones) is chosen independently with ``--models``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from zsdense.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_PIXELS = 200_000_000


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how encoders run; shared by every task."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16/fp16 on CUDA)
    models: str = "default"  # default (real weights) | tiny (random weights, tests and smoke runs)
    weights_dir: str | None = None  # --weights-dir / $ZSDENSE_WEIGHTS
    download: bool | None = None  # None: allowed unless ZSDENSE_OFFLINE / HF_HUB_OFFLINE is set
    batch_size: int = 4
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}"
            )
        base = self.device.split(":", 1)[0]
        if base not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda[:N] or mps")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")


def with_overrides(preset: Any, **overrides: Any) -> Any:
    """A copy of a preset dataclass with the given fields replaced (None values are ignored).

    Unknown field names are a ConfigError naming the preset's fields, so typos don't pass.
    """
    names = {f.name for f in fields(preset)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {type(preset).__name__}; "
            f"valid: {', '.join(sorted(names))}"
        )
    return replace(preset, **given)


def pick_preset(table: dict[str, Any], name: str, what: str) -> Any:
    """``table[name]`` or a ConfigError listing the valid names."""
    try:
        return table[name]
    except KeyError:
        raise ConfigError(
            f"unknown {what} preset {name!r}; choose one of: {', '.join(sorted(table))}"
        ) from None


# --- anomaly ---
ANOMALY_PROMPT_SOURCES = ("learned", "ensemble")  # or a checkpoint name / .pth file path
ANOMALY_DEFAULT_THRESHOLD = 0.5  # on the anomaly probability map, when nothing else is given


@dataclass(frozen=True)
class AnomalyPreset:
    """Every constant of one anomaly method (``specs/anomaly.md``); override with options.

    ``eattn_start_block`` / ``eattn_layers`` count blocks 1-based as the papers do and are
    written for 24-block CLIP ViT-L/14; a model with fewer blocks uses the same quarter-points
    (start = round(L/4), layers = L/4, L/2, 3L/4, L), see ``zsdense.dense.crane.scale_layers``.
    ``eattn_layers=None`` is the published "as run" behaviour: one map from the refined stream
    after the last block (Crane's aliased views; fixtures README §6 D1).
    """

    name: str
    method: str  # "crane" | "musc"
    clip_arch: str = "ViT-L-14-336"
    image_size: int = 518  # whole image resized (bicubic, no crop) to size×size
    temperature: float = 0.07
    attn_type: str = "qq+kk+vv"  # E-Attn correlation (qq+kk+vv | vv | qq | kk | qq+kk | (q+k+v)^2)
    eattn_start_block: int = 6  # of 24: blocks 6..24 run the dual path
    eattn_layers: tuple[int, ...] | None = None  # None = as run (last block only)
    use_dattn: bool = False  # Crane+: DINOv2-guided attention on the last block
    dino_name: str = "dinov2-reg-base"
    dattn_beta: float = 1.2
    dattn_gamma: float = 3.0
    dattn_mean: str = "image"  # "image" (zsdense default) | "batch" (Crane as run)
    dattn_value_source: str = "mid"  # "mid" = LN1(o + Attn(LN1(o))) as run | "in" = LN1(o_in)
    soft_mean: bool = True  # True: softmax per map then average; False: average logits first
    soft_mean_medical: bool = True
    sigma: float = 4.0  # Gaussian smoothing at image_size (scipy reflect, truncate 4)
    smoothing_backend: str = "torch"  # torch | scipy (identical within 3e-7)
    fusion_alpha: float = 0.5  # image score: f = l2n(alpha·c + (1-alpha)·global)
    prompts: str = "learned"  # learned (registry checkpoint) | ensemble | checkpoint name | .pth
    prompt_ensemble: str = "april-gan"  # key in prompts/anomaly_prompts.json
    checkpoint: str = "crane-mvtec"  # learned prompts for non-MVTec data (papers' protocol)
    checkpoint_mvtec: str = "crane-visa"  # learned prompts when the data is MVTec itself
    checkpoint_medical: str = "crane-mvtec"
    deep_prompt_fp16: bool = True  # Crane rounds deep prompts to fp16 (.half())
    # musc
    musc_layers: tuple[int, ...] = (6, 12, 18, 24)
    musc_r: tuple[int, ...] = (1, 3, 5)
    musc_topmin: float = 0.3  # mean of the smallest 30% of per-image distances
    musc_k: tuple[int, ...] = (1, 2, 3)  # image-score smoothing over k nearest images
    musc_min_images: int = 5
    musc_group_size: int = 32  # images scored together (memory grows with its square)
    musc_backbone: str = "clip"  # clip | dinov2


ANOMALY_PRESETS: dict[str, AnomalyPreset] = {
    "crane": AnomalyPreset(name="crane", method="crane"),
    "crane+": AnomalyPreset(
        name="crane+",
        method="crane",
        use_dattn=True,
        soft_mean=False,  # test.sh: MVTec/VisA/MPDD/SDD/BTAD/DTD; True with --domain medical
        checkpoint="crane+-mvtec",
        checkpoint_mvtec="crane+-visa",
        checkpoint_medical="crane+-mvtec-epoch1",
    ),
    "musc": AnomalyPreset(name="musc", method="musc", prompts="none", soft_mean=True, sigma=4.0),
}
# --- end anomaly ---

# --- openvocab ---
# --- end openvocab ---

# --- referring ---
# --- end referring ---

# --- engine ---
# --- end engine ---
