"""Finding register neurons on images, streaming (the reference's ``find_register_neurons`` rules).

For each image, run alone through the plain model (no test-time registers; a trained-register
DINOv2 keeps its registers), with A_l the MLP activation (T, K) and Y_l the block output (T, D) of
every layer l (the last block's output is taken *before* the final norm):

1. **outliers** O = {t : ‖Y_det[t]‖₂ > threshold} over *every* token (class token and trained
   registers included), ``det = detect_outliers_layer`` a Python index into the blocks (−1 the
   last, −2 the second to last); the threshold is an absolute norm, strict;
2. an image without outliers is **skipped** (not counted in the mean);
3. per-image score ``s_l[k] = mean_{t∈O} |A_l[t, k]|``;
4. optional **sparsity filter**: ``s_l[k]`` is kept only where ``#{t : A_l[t, k] < 0.5} ≥ 0.5·T``
   (signed activations, all T tokens); a layer without any sparse neuron contributes zeros and the
   image still counts;
5. the mean over the counted images (float32), a **global ranking** of all (layer, neuron) by
   score, then the layer filter ``lowest ≤ layer ≤ highest_layer`` (−1 = no upper limit), then the
   first ``top_k``, grouped as ``{layer: [neurons in rank order]}`` in order of first appearance.

Only per-image sums are kept (:class:`NeuronScoreAccumulator`): an image's activations live only
while its batch is scored.

Defaults. The reference function ``find_register_neurons`` defaults to threshold 30, detect layer
−1, sparsity filter **off** (0.5 / 0.5), 500 images; ``filter_layers`` to highest layer −1; it has
no top_k. The repository's settings (``configs/*.yaml`` and the notebook, which turns the
sparsity filter **on** and samples 100 images): CLIP ViT-B/16 (OpenAI and LAION) threshold 30,
layer −1, highest layer 5, top 10; DINOv2-L threshold 150, layer −2, highest layer 17, top 50
(:data:`PRESETS`). The thresholds are absolute norms of those checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from zsdense.errors import ConfigError
from zsdense.models.registers import (
    REFERENCE_COMMIT,
    REFERENCE_REPO,
    NeuronSet,
    RegisterSpec,
    _Adapter,
    registers_applied,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "FUNCTION_DEFAULTS",
    "PRESETS",
    "NeuronScoreAccumulator",
    "Recording",
    "SearchResult",
    "SearchSettings",
    "filter_layers",
    "find_register_neurons",
    "group_neurons",
    "norms_with_registers",
    "preprocess_for_search",
    "record_activations",
    "search_preprocessing",
    "select_neurons",
]


@dataclass(frozen=True)
class SearchSettings:
    """Every knob of the search; the defaults are the reference function's.

    ``top_k`` None keeps every entry the layer filter leaves (the function returns the whole
    ranking; the yaml files set 10 / 50).
    """

    register_norm_threshold: float = 30.0
    detect_outliers_layer: int = -1
    apply_sparsity_filter: bool = False
    sparsity_activation_threshold: float = 0.5
    sparsity_frac_threshold: float = 0.5
    highest_layer: int = -1
    lowest_layer: int = 0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.register_norm_threshold):
            raise ConfigError("the register norm threshold must be a finite number")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, not {self.top_k}")
        if not 0.0 <= self.sparsity_frac_threshold <= 1.0:
            raise ConfigError("the sparsity fraction threshold must be in [0, 1]")
        if self.lowest_layer < 0:
            raise ConfigError("the lowest layer must be >= 0")

    def to_json(self) -> dict:
        return {
            "register_norm_threshold": float(self.register_norm_threshold),
            "detect_outliers_layer": int(self.detect_outliers_layer),
            "apply_sparsity_filter": bool(self.apply_sparsity_filter),
            "sparsity_activation_threshold": float(self.sparsity_activation_threshold),
            "sparsity_frac_threshold": float(self.sparsity_frac_threshold),
            "highest_layer": int(self.highest_layer),
            "lowest_layer": int(self.lowest_layer),
            "top_k": None if self.top_k is None else int(self.top_k),
        }


FUNCTION_DEFAULTS = SearchSettings()
# configs/openai_clip_base.yaml, openclip_base.yaml, dinov2_large.yaml + the notebook's
# apply_sparsity_filter=True
PRESETS: dict[str, SearchSettings] = {
    "clip": SearchSettings(
        register_norm_threshold=30.0,
        detect_outliers_layer=-1,
        apply_sparsity_filter=True,
        highest_layer=5,
        top_k=10,
    ),
    "dinov2": SearchSettings(
        register_norm_threshold=150.0,
        detect_outliers_layer=-2,
        apply_sparsity_filter=True,
        highest_layer=17,
        top_k=50,
    ),
}
NOTEBOOK_IMAGES = 100  # processed_image_cnt of register_neurons.ipynb
FUNCTION_IMAGES = 500  # find_register_neurons' default


# ---- selection ---------------------------------------------------------------------------------


def filter_layers(
    ranked: Iterable[tuple[int, int, float]], highest_layer: int = -1, lowest_layer: int = 0
) -> list[tuple[int, int, float]]:
    """Entries with ``lowest_layer ≤ layer ≤ highest_layer`` (``highest_layer`` −1: no limit)."""
    out = []
    for layer, neuron, score in ranked:
        if layer < lowest_layer:
            continue
        if highest_layer != -1 and layer > highest_layer:
            continue
        out.append((int(layer), int(neuron), float(score)))
    return out


def group_neurons(selected: Iterable[tuple[int, int, float]]) -> dict[int, list[int]]:
    """``{layer: [neurons in rank order]}``, layers in order of first appearance."""
    out: dict[int, list[int]] = {}
    for layer, neuron, _ in selected:
        out.setdefault(int(layer), []).append(int(neuron))
    return out


def select_neurons(
    ranked: Iterable[tuple[int, int, float]], settings: SearchSettings
) -> list[tuple[int, int, float]]:
    """The layer filter, then the first ``top_k`` (the notebook's order of operations)."""
    kept = filter_layers(ranked, settings.highest_layer, settings.lowest_layer)
    return kept if settings.top_k is None else kept[: settings.top_k]


# ---- streaming scores --------------------------------------------------------------------------


@dataclass
class ImageOutcome:
    """What one image contributed: outlier token positions, whether it counted, its per-image
    scores (L, K) float32 (None when skipped) and the layers with no sparse neuron."""

    outliers: list[int]
    used: bool
    scores: torch.Tensor | None = None
    skipped_layers: list[int] = field(default_factory=list)


class NeuronScoreAccumulator:
    """Per-image neuron scores summed over the images with outliers (float32), one image at a
    time: the caller drops each image's activations after :meth:`add`."""

    def __init__(self, num_layers: int, mlp_dim: int, settings: SearchSettings):
        self.settings = settings
        self.num_layers = int(num_layers)
        self.mlp_dim = int(mlp_dim)
        self.sum = torch.zeros(self.num_layers, self.mlp_dim, dtype=torch.float32)
        self.n_seen = 0
        self.n_used = 0

    @property
    def detect_index(self) -> int:
        det = int(self.settings.detect_outliers_layer)
        if not -self.num_layers <= det < self.num_layers:
            raise ConfigError(
                f"detect_outliers_layer {det} outside the model's {self.num_layers} blocks "
                f"(-{self.num_layers}..{self.num_layers - 1})"
            )
        return det % self.num_layers

    def image_scores(self, acts: Sequence[torch.Tensor], detect_norms: torch.Tensor):
        """(outlier positions, per-image scores (L, K) float32 or None, skipped layers)."""
        s = self.settings
        o = torch.nonzero(detect_norms > s.register_norm_threshold).flatten()
        if o.numel() == 0:
            return [], None, []
        rows = []
        skipped: list[int] = []
        for layer, a in enumerate(acts):  # a: (T, K)
            score = a[o.to(a.device)].float().abs().mean(dim=0)
            if s.apply_sparsity_filter:
                t = a.shape[0]
                low = (a.float() < s.sparsity_activation_threshold).sum(dim=0)
                sparse = low >= s.sparsity_frac_threshold * t
                if not bool(sparse.any()):
                    skipped.append(layer)
                score = score * sparse
            rows.append(score.cpu())
        return o.tolist(), torch.stack(rows), skipped

    def add(self, acts: Sequence[torch.Tensor], detect_norms: torch.Tensor) -> ImageOutcome:
        """Score one image: ``acts`` L tensors (T, K), ``detect_norms`` (T,)."""
        if len(acts) != self.num_layers:
            raise ValueError(f"{len(acts)} activation layers for a {self.num_layers}-layer model")
        self.n_seen += 1
        outliers, scores, skipped = self.image_scores(acts, detect_norms)
        if scores is None:
            return ImageOutcome(outliers=[], used=False)
        self.sum += scores
        self.n_used += 1
        return ImageOutcome(outliers=outliers, used=True, scores=scores, skipped_layers=skipped)

    def mean_scores(self) -> torch.Tensor:
        """S (L, K) float32: the mean over the counted images (zeros when none counted)."""
        if self.n_used == 0:
            return torch.zeros_like(self.sum)
        return self.sum / self.n_used

    def ranked(self) -> list[tuple[int, int, float]]:
        """Every (layer, neuron, score), highest score first (ties: lower flat index first)."""
        scores = self.mean_scores().flatten()
        order = torch.sort(scores, descending=True, stable=True).indices
        k = self.mlp_dim
        return [(int(i) // k, int(i) % k, float(scores[i])) for i in order]


# ---- running an encoder ----------------------------------------------------------------------


@dataclass
class Recording:
    """One batch through the plain model: ``acts`` L tensors (B, T, K) (model dtype),
    ``norms`` (L, B, T) float32 block-output norms; tokens in the model's order."""

    acts: list[torch.Tensor]
    norms: torch.Tensor


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _forward(model: Any, adapter: _Adapter, x: torch.Tensor, pos_interp: str | None) -> None:
    if adapter.family == "clip":
        model.run_blocks(model.embed(x))
    else:
        model.tokens(x, pos_interp=pos_interp)


def search_pos_interp(model: Any) -> str | None:
    """DINOv2 positional-embedding resize as the reference's hub model does it: the hub
    ``scale_factor=(g+0.1)/G`` bicubic without registers; transformers' (= the hub ``_reg``
    models') with registers; a wrapper already set to the hub resize keeps its own settings."""
    if not hasattr(model, "pos_interp"):
        return None
    if model.pos_interp == "hub":
        return "hub"
    return "transformers" if getattr(model, "num_registers", 0) else "hub"


@torch.no_grad()
def record_activations(
    model: Any,
    x_norm_bchw: torch.Tensor,
    *,
    acts: bool = True,
    pos_interp: str | None = None,
) -> Recording:
    """MLP activations and block-output norms of every layer for a normalised batch.

    Runs zsdense's own forward (CLIP: ``run_blocks(embed(x))``; DINOv2: ``tokens(x)``) with
    forward hooks on the activation modules and the blocks. With test-time registers attached,
    the tokens include them (after the patches) and the activations are the edited ones.
    """
    a = _Adapter(model)
    got_acts: list = [None] * a.num_layers
    got_norms: list = [None] * a.num_layers
    hooks = []

    def on_act(i):
        def hook(module, inputs, out):
            got_acts[i] = out.detach()

        return hook

    def on_block(i):
        def hook(module, inputs, out):
            got_norms[i] = _block_out(out).detach().float().norm(dim=-1).cpu()

        return hook

    try:
        for i in range(a.num_layers):
            if acts:
                hooks.append(a.acts[i].register_forward_hook(on_act(i)))
            hooks.append(a.blocks[i].register_forward_hook(on_block(i)))
        x = x_norm_bchw.to(model.device)
        _forward(model, a, x, pos_interp if pos_interp is not None else search_pos_interp(model))
    finally:
        for h in hooks:
            h.remove()
    if any(n is None for n in got_norms):
        raise RuntimeError("not every block ran: the forward pass skipped a block")
    return Recording(acts=got_acts if acts else [], norms=torch.stack(got_norms))


# ---- preprocessing (the reference's transforms) ----------------------------------------------


def search_preprocessing(model: Any) -> dict:
    """The reference's preprocessing for ``model``'s family: CLIP ``Resize(native, bicubic)`` +
    ``CenterCrop(native)`` with OpenAI mean/std; DINOv2 ``Resize(256)`` + ``CenterCrop(224)``
    with ImageNet mean/std (``make_classification_eval_transform``)."""
    a = _Adapter(model)
    if a.family == "clip":
        n = int(model.native_size)
        return {"resize": n, "crop": n, "mean": OPENAI_MEAN, "std": OPENAI_STD}
    return {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def preprocess_for_search(
    image: np.ndarray, *, resize: int, crop: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(H, W, 3) float [0, 1] (or uint8) -> (3, crop, crop) float32, as torchvision's
    ``Resize(resize, bicubic)`` (shorter side, PIL, antialiased) + ``CenterCrop(crop)`` +
    ``ToTensor`` + ``Normalize`` on a PIL image. 8-bit data goes through PIL's 8-bit path (the
    reference's, bit-exact); other data is resized per channel in PIL's float mode."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        u8: np.ndarray | None = arr
    else:
        scaled = np.asarray(arr, dtype=np.float64) * 255.0
        r = np.round(scaled)
        u8 = r.astype(np.uint8) if np.allclose(r, scaled, atol=1e-3) else None
    bicubic = InterpolationMode.BICUBIC
    if u8 is not None:
        pil = Image.fromarray(np.ascontiguousarray(u8[..., :3]), mode="RGB")
        pil = TF.center_crop(TF.resize(pil, resize, interpolation=bicubic), crop)
        t = TF.to_tensor(pil)
    else:
        chans = []
        for c in range(3):
            ch = Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32), mode="F")
            ch = TF.center_crop(TF.resize(ch, resize, interpolation=bicubic), crop)
            chans.append(torch.from_numpy(np.asarray(ch, dtype=np.float32).copy()))
        t = torch.stack(chans)
    return TF.normalize(t, list(mean), list(std))


# ---- the search --------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """What a search found.

    ``neurons`` the :class:`NeuronSet`; ``selected`` (layer, neuron, score) in rank order;
    ``ranked`` every entry (the reference's returned list); ``mean_scores`` (L, K);
    ``n_seen`` / ``n_used`` images; ``outlier_tokens`` total outlier tokens at the detect layer;
    ``outliers_per_layer`` (L,) tokens above the threshold at each block output, summed over the
    images (the detect layer's entry is the outlier count); ``images_with_outliers_per_layer``;
    ``detect_norms`` one float32 array of detect-layer token norms per image (for histograms);
    ``outcomes`` per image (outliers, used).
    """

    neurons: NeuronSet
    selected: list[tuple[int, int, float]]
    ranked: list[tuple[int, int, float]]
    mean_scores: torch.Tensor
    n_seen: int
    n_used: int
    outlier_tokens: int
    outliers_per_layer: list[int]
    images_with_outliers_per_layer: list[int]
    detect_norms: list[np.ndarray]
    outcomes: list[ImageOutcome]
    settings: SearchSettings
    max_detect_norm: float = 0.0


def _batches(images: Iterable[torch.Tensor], size: int):
    buf: list[torch.Tensor] = []
    for im in images:
        buf.append(im)
        if len(buf) >= size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


def _found_set(
    a: _Adapter,
    acc: NeuronScoreAccumulator,
    selected: list[tuple[int, int, float]],
    settings: SearchSettings,
    n_outliers: int,
    provenance: str,
    extra_rules: dict | None,
) -> NeuronSet:
    """The :class:`NeuronSet` of a search: the selected neurons, the encoder, the rules with the
    image and outlier counts (and ``extra_rules``), the provenance (default: the rules' source)."""
    rules = settings.to_json()
    rules.update(images_seen=acc.n_seen, images_used=acc.n_used, outlier_tokens=n_outliers)
    rules.update(extra_rules or {})
    return NeuronSet(
        layers=tuple(group_neurons(selected).items()),
        encoder=a.identity(),
        rules=rules,
        scores=tuple(selected),
        provenance=provenance
        or (
            f"found by zsdense with the rules of {REFERENCE_REPO} ({REFERENCE_COMMIT[:10]}): "
            f"find_register_neurons + filter_layers + top_k on {acc.n_used} of {acc.n_seen} "
            "images with outliers"
        ),
    )


def find_register_neurons(
    model: Any,
    images: Iterable[torch.Tensor],
    settings: SearchSettings = FUNCTION_DEFAULTS,
    *,
    batch_size: int = 1,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    provenance: str = "",
    extra_rules: dict | None = None,
) -> SearchResult:
    """Find register neurons of ``model`` on ``images`` (normalised (3, H, W) tensors, one size),
    streaming: only per-image score sums are kept.

    Images run ``batch_size`` at a time through the plain model (no interaction between images:
    the result equals one-at-a-time runs up to float rounding). ``dtype`` casts the inputs
    (the model's own dtype by default). ``progress(n)`` is called after each batch.
    """
    a = _Adapter(model)
    if getattr(model, "_registers", None) is not None:
        raise ConfigError("find register neurons on the plain model: detach its registers first")
    acc = NeuronScoreAccumulator(a.num_layers, a.mlp_dim, settings)
    det = acc.detect_index
    thr = float(settings.register_norm_threshold)
    per_layer = [0] * a.num_layers
    imgs_per_layer = [0] * a.num_layers
    detect_norms: list[np.ndarray] = []
    outcomes: list[ImageOutcome] = []
    n_outliers = 0
    max_norm = 0.0
    for batch in _batches(images, max(1, int(batch_size))):
        if dtype is not None:
            batch = batch.to(dtype)
        rec = record_activations(model, batch)
        above = rec.norms > thr  # (L, B, T)
        for layer in range(a.num_layers):
            per_layer[layer] += int(above[layer].sum())
            imgs_per_layer[layer] += int(above[layer].any(dim=1).sum())
        for b in range(batch.shape[0]):
            out = acc.add([t[b] for t in rec.acts], rec.norms[det, b])
            out.scores = None  # keep only the outcome, not the per-image scores
            outcomes.append(out)
            n_outliers += len(out.outliers)
            dn = rec.norms[det, b].numpy().astype(np.float32)
            detect_norms.append(dn)
            max_norm = max(max_norm, float(dn.max()) if dn.size else 0.0)
        del rec
        if progress is not None:
            progress(int(batch.shape[0]))
    ranked = acc.ranked() if acc.n_used else []
    selected = select_neurons(ranked, settings)
    neurons = _found_set(a, acc, selected, settings, n_outliers, provenance, extra_rules)
    return SearchResult(
        neurons=neurons,
        selected=selected,
        ranked=ranked,
        mean_scores=acc.mean_scores(),
        n_seen=acc.n_seen,
        n_used=acc.n_used,
        outlier_tokens=n_outliers,
        outliers_per_layer=per_layer,
        images_with_outliers_per_layer=imgs_per_layer,
        detect_norms=detect_norms,
        outcomes=outcomes,
        settings=settings,
        max_detect_norm=max_norm,
    )


@dataclass
class RegisterCheck:
    """Detect-layer token norms of the same images without and with the found registers:
    ``before`` / ``after`` the image tokens (class, trained registers, patches), ``registers``
    the test-time register tokens (with registers), each one float32 array."""

    before: np.ndarray
    after: np.ndarray
    registers: np.ndarray
    spec: RegisterSpec


def norms_with_registers(
    model: Any,
    images: Iterable[torch.Tensor],
    spec: RegisterSpec,
    settings: SearchSettings,
    *,
    batch_size: int = 1,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> RegisterCheck:
    """Run ``images`` without and with ``spec`` and return the detect-layer token norms of both
    (what the found neurons do to the outliers)."""
    a = _Adapter(model)
    det = NeuronScoreAccumulator(a.num_layers, a.mlp_dim, settings).detect_index
    before, after, regs = [], [], []
    for batch in _batches(images, max(1, int(batch_size))):
        if dtype is not None:
            batch = batch.to(dtype)
        before.append(record_activations(model, batch, acts=False).norms[det].flatten())
        with registers_applied(model, spec) as h:
            n = record_activations(model, batch, acts=False).norms[det]  # (B, T+R)
            k = h.extra_tokens
            if getattr(h, "reorder", False):  # reference layout: registers are the last R
                k = spec.num_registers
            after.append(n[:, : n.shape[1] - k].flatten())
            regs.append(n[:, n.shape[1] - k :].flatten())
        if progress is not None:
            progress(int(batch.shape[0]))
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0, np.float32)  # noqa: E731
    return RegisterCheck(before=cat(before), after=cat(after), registers=cat(regs), spec=spec)


def settings_for(model: Any, **overrides: Any) -> SearchSettings:
    """The repository's preset for ``model``'s family (:data:`PRESETS`) with ``overrides``
    (None values ignored)."""
    base = PRESETS[_Adapter(model).family]
    kw = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **kw)
