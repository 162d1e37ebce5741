"""Settings and presets: the dataclasses that hold every default, and the preset tables.

Each task area keeps its settings in its own section below as frozen dataclasses; a preset is
data (constants from the specs), chosen by name with ``--preset`` / ``preset=``. The named
open-vocabulary and referring presets are registered with their method (one file per method in
``zsdense/methods/``, or a plug-in), so their tables here start empty and fill on first read
(:mod:`zsdense.plugins`). The model set (``default`` real weights or ``tiny`` random ones) is
chosen independently with ``--models``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from zsdense.errors import ConfigError
from zsdense.plugins import Registry

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# --allocator: how the C library's malloc serves the process (zsdense.runtime.tune_allocator)
ALLOCATORS = ("tuned", "system")
# --max-pixels: larger images are refused before decoding. 25 MP (6000 x 4000 photos pass) keeps
# a 2-core 8 GB machine safe: peak RSS of one image through `zsdense anomaly --models tiny` is
# 1.3 / 2.2 / 3.6 GB at 4 / 16 / 36 MP (bench/bench_max_pixels.py); real models add their weights.
MAX_PIXELS = 25_000_000
DEFAULT_BATCH_SIZE = 4  # images per encoder batch
# --registers (test-time registers, zsdense.models.registers_setting): what the register neurons'
# patch activations become, and how a batch is edited ("reference": only its first image, the
# reference code's defect, for comparisons)
REGISTER_MODES = ("zero", "mean", "only_outliers", "same")
REGISTER_BATCHES = ("per-image", "reference")


def register_entries(value: Any) -> tuple:
    """``RuntimeConfig.registers`` as given -> its entries: ``"auto"``, file paths (str) and
    neuron sets, in order; ``()`` means off. ``off`` / None / ``""`` are off; ``off`` cannot
    be combined with other entries."""
    import os

    if value is None:
        return ()
    single = isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple))
    items = [value] if single else list(value)
    out: list = []
    for v in items:
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if isinstance(v, str):
            s = v.strip()
            if s.lower() in ("", "off"):
                if len(items) > 1:
                    raise ConfigError("--registers off cannot be combined with other values")
                continue
            s = "auto" if s.lower() == "auto" else s
            if s not in out:
                out.append(s)
        elif hasattr(v, "layers") and hasattr(v, "encoder"):  # a NeuronSet (models layer)
            out.append(v)
        else:
            raise ConfigError(
                f"--registers takes auto, off, a neurons.json path or a NeuronSet, not {v!r}"
            )
    return tuple(out)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how encoders run; shared by every task."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16/fp16 on CUDA)
    models: str = "default"  # default (real weights) | tiny (random weights, tests and smoke runs)
    weights_dir: str | None = None  # --weights-dir / $ZSDENSE_WEIGHTS
    download: bool | None = None  # None: allowed unless ZSDENSE_OFFLINE / HF_HUB_OFFLINE is set
    batch_size: int = DEFAULT_BATCH_SIZE
    max_pixels: int = MAX_PIXELS
    # test-time registers (README "Test-time registers"): off | auto | neurons.json | NeuronSet,
    # or a list of auto and files (each file applies to the encoder it was found for)
    registers: Any = "off"
    registers_count: int | None = None  # R; None: the neuron list's own (1 for the shipped one)
    registers_mode: str | None = None  # REGISTER_MODES; None: the neuron list's own ("zero")
    registers_batch: str = "per-image"  # REGISTER_BATCHES
    # tuned: large blocks kept for reuse, not returned to the OS (zsdense.runtime.tune_allocator);
    # system: the C library's defaults. Process-wide; recorded, never changes an output.
    allocator: str = "tuned"

    def __post_init__(self) -> None:
        register_entries(self.registers)  # validated here; resolved by the Runtime
        if self.registers_mode is not None and self.registers_mode not in REGISTER_MODES:
            raise ConfigError(
                f"unknown register mode {self.registers_mode!r}; choose one of: "
                f"{', '.join(REGISTER_MODES)}"
            )
        if self.registers_batch not in REGISTER_BATCHES:
            raise ConfigError(
                f"unknown register batch behaviour {self.registers_batch!r}; choose one of: "
                f"{', '.join(REGISTER_BATCHES)}"
            )
        r = self.registers_count
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ConfigError(f"--registers-count must be an integer >= 0, not {r!r}")
        if self.allocator not in ALLOCATORS:
            raise ConfigError(
                f"unknown allocator {self.allocator!r}; choose one of: {', '.join(ALLOCATORS)}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}"
            )
        base = self.device.split(":", 1)[0]
        if base not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda[:N] or mps")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")


def with_overrides(preset: Any, what: str | None = None, **overrides: Any) -> Any:
    """A copy of a preset dataclass with the given fields replaced (None values are ignored).

    Unknown field names are a ConfigError naming the preset's fields (``what`` names the kind of
    options in the message), so typos don't pass.
    """
    names = {f.name for f in fields(preset)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:
        kind = (
            f"{what} option(s) {', '.join(unknown)}"
            if what
            else (f"option(s) {', '.join(unknown)} for {type(preset).__name__}")
        )
        raise ConfigError(f"unknown {kind}; valid: {', '.join(sorted(names))}")
    return replace(preset, **given)


def pick_preset(table: dict[str, Any], name: str, what: str) -> Any:
    """``table[name]`` or a ConfigError listing the valid names."""
    try:
        return table[name]
    except KeyError:
        raise ConfigError(
            f"unknown {what} preset {name!r}; choose one of: {', '.join(sorted(table))}"
        ) from None


def preset_from_spec(
    cls: type, name: str, method: str, spec: Any, defaults: dict[str, Any] | None = None
) -> tuple[Any, str]:
    """A registered preset: ``spec`` is a ``cls`` instance (renamed) or a mapping of its fields
    over the defaults (``defaults`` first), whose ``description`` key is returned apart.
    Unknown field names are a ConfigError naming the valid ones."""
    if isinstance(spec, cls):
        return replace(spec, name=name, method=method), ""
    values = {**(defaults or {}), **dict(spec)}
    desc = str(values.pop("description", "") or "")
    valid = {f.name for f in fields(cls)} - {"name", "method"}
    bad = sorted(set(values) - valid)
    if bad:
        raise ConfigError(
            f"preset {name!r}: unknown {cls.__name__} field(s) {', '.join(bad)}; "
            f"valid: {', '.join(sorted(valid))}"
        )
    return cls(name=name, method=method, **values), desc


# --- anomaly ---
DEFAULT_ANOMALY_PRESET = "crane"
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
    method: str  # the registered scorer (zsdense.tasks.anomaly_registry): crane, musc, ...
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
    # musc (zsdense.tasks.musc; the whole set is always scored at once, streamed)
    musc_layers: tuple[int, ...] = (6, 12, 18, 24)  # raw residual stream after these blocks
    musc_r: tuple[int, ...] = (1, 3, 5)
    musc_topmin: float = 0.3  # mean of the smallest 30% of per-image distances
    musc_k: tuple[int, ...] | None = None  # RsCIN k-list; None: by dataset (visa 1,8,9; 1,2,3)
    musc_min_images: int = 5
    musc_act: str = "as-run"  # CLIP MLP: as-run (GELU off the native size) | gelu | quick_gelu
    musc_backbone: str = "clip"  # clip | dinov2_vit{s,b,l}14 | a DINOv2 registry name


# The preset table, filled by the methods' files (zsdense/methods/crane.py, musc.py,
# anomalydino.py, crane_fewshot.py) and plug-ins (zsdense.tasks.anomaly_registry
# .register_anomaly_preset) on its first read.
ANOMALY_PRESETS: Registry[AnomalyPreset] = Registry("anomaly preset")
DATTN_MEAN_MODES = ("image", "batch")  # AnomalyPreset.dattn_mean (--dattn-mean)
KNN_METRICS = ("L2_normalized", "L2")  # few-shot distance (--knn-metric; tasks/fewshot/options)
FEWSHOT_PRESET_NAMES = ("anomalydino",)  # banks `zsdense memory build` makes (FEWSHOT_PRESETS)
TRAIN_CACHE_MODES = ("auto", "on", "off")  # train-prompts --cache-features
# --- end anomaly ---

# --- openvocab ---
DEFAULT_OPENVOCAB_PRESET = "trident"


@dataclass(frozen=True)
class OpenVocabPreset:
    """One open-vocabulary preset: a method with its constants (specs/openvocab.md).

    ``method`` names a registered method (``zsdense.dense.methods.METHODS``: ``trident``,
    ``proxyclip``, ``sclip``, ``clearclip``, ``naclip`` and plug-ins), which picks the pipeline.
    Dataset presets override the size/threshold fields.
    """

    name: str
    method: str
    clip_arch: str = "ViT-B-16"
    vfm: str | None = None  # DINOv2 registry name (trident, proxyclip)
    sam_arch: str | None = None  # trident
    short_side: int = 336  # mmseg resize: scale by min(max_long_side/long, short_side/short)
    max_long_side: int = 2048
    crop: int = 336
    stride: int = 112
    whole_image: bool = False  # one pass over the whole (padded) image instead of windows
    pad_multiple: int = 56  # crops zero-padded to a multiple of this (segment-then-splice)
    logit_scale: float = 40.0
    prob_thd: float = 0.0  # max probability below this -> background (class 0)
    beta: float = 1.2  # ProxyCLIP / Trident proxy attention
    gamma: float = 3.0
    cos_fac: float = 1.2  # Trident aggregation threshold factor
    refine_neg_cos: bool = True  # False: a negative tau becomes 0.6 (ADE, Cityscapes)
    sam_strips: int = 1  # Trident: SAM attention from this many vertical strips (City: 2)
    chunk_rows: int | None = 1024  # rows of W computed at once (None: all)
    upscale_small: bool = True  # Trident: sides below the crop are upscaled (reference crashes)
    sam_refine: bool = False  # Trident post-processing with SAM prompts
    coarse_thresh: float = 0.0
    sam_iou_thresh: float = 0.8
    sam_mask_coef: float = 0.005
    min_area: int = 225  # components smaller than this (at half resolution) get no prompt
    reference_prompts: bool = True  # reproduce Trident's prompt frame + 3-D dense prompt
    naclip_sigma: float = 5.0
    pamr: bool = False  # NACLIP post-processing
    pamr_iters: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    upsample: str = "bilinear"  # bilinear | jbu (joint bilateral, K-channel scores only)
    window_batch: int | None = None  # windows per forward (None: all windows of an image)


# The named presets (``trident``, ``sclip``...) and each method's benchmark settings per dataset
# (``--dataset-preset``) are registered with their method, one file per method in
# ``zsdense/methods/`` (``zsdense.dense.methods.register_method``); plug-ins add theirs through
# the ``zsdense.methods`` entry-point group. Reading either table loads them (zsdense.plugins).
OPENVOCAB_PRESETS: Registry[OpenVocabPreset] = Registry("open-vocabulary preset")
OPENVOCAB_DATASET_PRESETS: Registry[dict[str, dict[str, Any]]] = Registry("dataset presets")

# benchmark datasets: shipped class lists (``--classes-file voc21``) and ``--dataset-preset``
OPENVOCAB_DATASETS = (
    "voc21",
    "voc20",
    "context60",
    "context59",
    "coco-object",
    "coco-stuff",
    "cityscapes",
    "ade20k",
)
UPSAMPLE_MODES = ("bilinear", "jbu")  # OpenVocabPreset.upsample (zsdense.dense.upsample)


def openvocab_preset(
    name: str = "trident", dataset: str | None = None, **overrides: Any
) -> OpenVocabPreset:
    """The named preset, with a dataset preset's values and then ``overrides`` applied."""
    base = pick_preset(OPENVOCAB_PRESETS, name, "open-vocabulary")
    if dataset is not None:
        if dataset not in OPENVOCAB_DATASETS:
            raise ConfigError(
                f"unknown dataset preset {dataset!r}; "
                f"choose one of: {', '.join(OPENVOCAB_DATASETS)}"
            )
        base = replace(base, **OPENVOCAB_DATASET_PRESETS.get(base.method, {}).get(dataset, {}))
    return with_overrides(base, **overrides)


# --- end openvocab ---


# --- referring ---
PROPOSAL_STABILITY_MODES = ("image", "lowres")
# SAM's mask decoder for the proposals: auto (MaskDecoder's arithmetic in float32, the arranged
# decoder in reduced precision), reference (MaskDecoder's arithmetic), arranged (folded
# projections, channels-last upscaling: zsdense.models.sam_decoder_reduced)
PROPOSAL_DECODERS = ("auto", "reference", "arranged")
FUSION_MODES = ("G2L", "L2G", "G2L&L2G")  # hybrid global-local mask features
PARSERS = ("auto", "spacy", "fallback")  # expression parsers (zsdense.text.parse)
FALLBACK_READINGS = ("reference", "sensible")  # ReferPreset.fallback_reading


@dataclass(frozen=True)
class ReferPreset:
    """Referring segmentation (HybridGL): proposals, mask features, text, scoring.

    ``hybridgl`` reproduces the reference code (``specs/referring.md``) except that candidate
    counts never carry over between queries and an image without SAM proposals falls back to the
    whole image (flagged in ``meta``) instead of crashing. ``hybridgl+`` (the default) also fixes
    the reference's defects: the "right"/"east" relation fires, "up"/"down" get vertical ramps,
    NaN guards (zero-area boxes, a mask covering the whole image, a flat heat map), and R and C
    are mixed on comparable scales (``mix="scaled"``: both turned into distributions over the
    top-k1 candidates, R by normalising R_raw, C by a softmax), and "within" no longer counts a
    candidate as inside itself.
    """

    name: str = "hybridgl"
    method: str = "hybridgl"  # a registered referring method (zsdense.tasks.refer_methods)
    clip_arch: str = "ViT-B-16"
    sam_arch: str = "vit_b"
    # proposals: SAM automatic masks (HybridGL/TAS settings)
    points_per_side: int = 8
    # models="tiny": 2x2 prompts (SAM's mask decoder keeps its full width even when tiny)
    tiny_points_per_side: int = 2
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.7
    stability_score_thresh: float = 0.7
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 800
    # stability scored on the upsampled logits (image: as the reference) or, opt-in, on the
    # 256x256 decoder logits (lowres: masks failing it are never upsampled; scores differ)
    proposal_stability: str = "image"
    # the mask decoder (PROPOSAL_DECODERS): auto = the reference's arithmetic in float32 (bit for
    # bit SamAutomaticMaskGenerator's), the arranged decoder in bf16; "arranged" in float32 is
    # opt-in (decoding about 1.5x faster; the same model, not the same bits)
    proposal_decoder: str = "auto"
    # hybrid mask features
    view_size: int | None = None  # None: the CLIP's native input (224 for ViT-B/16)
    fusion: str = "G2L"  # FUSION_MODES: G2L | L2G | G2L&L2G
    fusion_blocks: int = 3  # fused last blocks (10-12 of ViT-B/16)
    grid_antialias: bool = False  # the reference's pinned torchvision: no antialias
    feature_batch: int = 32  # masks per encoder batch (2x views)
    # text and scores
    parser: str = "auto"  # PARSERS: auto (spaCy if installed with a model) | spacy | fallback
    logit_scale: float = 100.0
    k1: int = 3  # candidates T: top-k1 by P
    k2: int = 6  # context masks U: top-k2 by Q
    alpha: float = 0.6  # F = (1 - alpha)·R + alpha·C
    beta_big: float = 1.95
    beta_small: float = 1.5
    beta_default: float = 1.8
    heat_variant: str = "clearclip"  # dense CLIP last-block variant for the heat map of p
    heat_size: int | None = None  # None: native CLIP input size
    # defect fixes (off in the reference preset)
    right_relation: bool = False
    vertical_ramps: bool = False
    nan_guards: bool = False
    mix: str = "reference"  # reference | scaled
    within_self: bool = True  # the reference counts b = a in "within" (ratio 1 for itself)
    # how the rule parser's parses are read (spaCy's always as the reference): "reference", or
    # "sensible" (near / behind / front relations, sides of possessed parts; zsdense.text.parse)
    fallback_reading: str = "reference"
    # optional SAM refinement of the chosen mask (box + heat-map peak)
    refine: bool = False
    top_candidates: int = 3  # candidates reported in the result


# named referring presets, registered with their method (zsdense/methods/hybridgl.py;
# zsdense.tasks.refer_methods.register_refer_method)
REFER_PRESETS: Registry[ReferPreset] = Registry("referring preset")
DEFAULT_REFER_PRESET = "hybridgl+"
# --- end referring ---


# --- engine ---
ENGINES = ("local", "ray")  # zsdense run --engine


@dataclass(frozen=True)
class EngineConfig:
    """Batch-runner defaults (local and Ray engines)."""

    read_workers: int = 2  # decoding threads running ahead of the encoders
    progress_interval_s: float = 10.0  # plain progress lines when stderr is not a terminal
    orphan_temp_max_age_s: float = 86400.0  # temp files of dead writers are removed at start
    ray_workers: int = 1  # model actors
    ray_gpus_per_worker: float = 0.0


ENGINE = EngineConfig()
# --- end engine ---


# Attention types of Crane's E-Attn (and AnomalyCLIP's V-V). Each sum term is a separate softmax;
# the sum is deliberately not renormalised (as in the reference).
CORRELATION_TYPES: dict[str, tuple[str, ...]] = {
    "qq+kk+vv": ("q", "k", "v"),
    "vv": ("v",),
    "qq": ("q",),
    "kk": ("k",),
    "qq+kk": ("q", "k"),
    "(q+k+v)^2": ("qkv",),
}

# bins of the streaming pixel metrics (zsdense.metrics.DEFAULT_BINS; here for the CLI's --help)
PIXEL_METRIC_BINS = 16384
