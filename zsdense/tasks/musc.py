"""Batch mutual scoring (``musc``): the unlabelled images of one category score each other.

This is MuSc (Li et al., ICLR 2024) as its reference code runs it (xrli-U/MuSc, checked against
its own outputs in ``shared/fixtures/musc``):

1. **Features** (``zsdense.dense.musc_backbones``): the raw residual stream of CLIP after blocks
   6/12/18/24 of 24 (scaled to the model's depth), erf-GELU at 518 px as the reference rebuilds
   the model (``musc``; ``musc-fixed`` keeps OpenAI's QuickGELU), bicubic positional embedding.
2. **LNAMD** (:func:`layer_features`): per image and layer one LayerNorm over all patches and
   channels (no affine), then the r×r mean with zero padding counted (r ∈ {1, 3, 5}), then L2.
3. **MSM** (:func:`mutual_scores`): for image i and every other image j each patch of i gets its
   Euclidean distance to the nearest patch anywhere in j; its score is the mean of the
   k = floor(0.3·(M−1)) smallest of those M−1 distances. The **whole set is scored at once**,
   exactly: the image-against-image distances are streamed in blocks, so memory stays at the
   per-image nearest-distance table (M × M × N floats, or a slice of it) and never holds the
   (M·N)² distance matrix. The result does not depend on the order of the images.
4. Patch score = mean over layers, then over r (float64); upsampled to the input size with
   bilinear ``align_corners=True``; **no smoothing** (``sigma > 0`` adds it, an option).
5. **Image score** (:func:`rscin`): the max of the upsampled map, min-max normalised over the set,
   then RsCIN: averaged over k in the k-list, each score replaced by the similarity-weighted
   mean over its k most similar images (self included, weights not clamped). k-lists as the
   reference picks them by dataset: MVTec [1, 2, 3], VisA [1, 8, 9], anything else [1, 2, 3];
   ``musc_k`` overrides.

Fewer images than MSM needs (k = 0, i.e. M < 5 at 30 %) is a ConfigError, not the reference's
NaN. The reference's ``divide_num`` grouping is not offered: the category is one set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.config import AnomalyPreset
from zsdense.dense.crane import scale_layers
from zsdense.dense.musc_backbones import (
    clip_activation,
    clip_streams,
    dinov2_streams,
    resolve_backbone,
)
from zsdense.errors import ConfigError
from zsdense.tasks.common import batched_get, model_input

if TYPE_CHECKING:
    from zsdense.api import Segmenter

# streaming granularity of the distance step: rows of one matrix-product block (query patches)
BLOCK_ROWS = 2048
# memory for the per-image nearest-distance table; above it, query images go in slices
TABLE_BYTES = 1 << 30

RSCIN_K_LISTS = {"mvtec": (1, 2, 3), "visa": (1, 8, 9), "btad": (1, 2, 3)}
RSCIN_K_DEFAULT = (1, 2, 3)


# ---- building blocks (the reference's LNAMD, MSM, RsCIN) -----------------------------------


def layer_features(
    tokens_bnc: torch.Tensor, grid: tuple[int, int], r: int, *, normalize: bool = True
) -> torch.Tensor:
    """LNAMD: raw patch tokens (B, N, C) -> (B, N, C) float32.

    LayerNorm over all (N, C) of each image (eps 1e-5, no affine), r×r mean with zero padding
    counted in the divisor, then (``normalize``) L2 normalisation over C.
    """
    b, n, c = tokens_bnc.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not form the {grid[0]}x{grid[1]} grid")
    x = F.layer_norm(tokens_bnc.float(), (n, c))
    if r > 1:
        g = x.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        g = F.avg_pool2d(g, kernel_size=r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
        x = g.flatten(2).transpose(1, 2)
    return F.normalize(x, dim=-1) if normalize else x


def topmin_count(m: int, topmin: float = 0.3) -> int:
    """k = int((M−1)·topmin): how many of the M−1 per-image distances MSM averages."""
    return int((m - 1) * topmin) if topmin < 1 else int(topmin)


def min_images(topmin: float = 0.3) -> int:
    """The smallest set for which MSM averages at least one distance (5 at 30 %)."""
    m = 2
    while topmin_count(m, topmin) < 1:
        m += 1
        if m > 10_000:
            raise ConfigError(f"musc_topmin {topmin} never selects a distance")
    return m


def _check_set_size(m: int, topmin: float) -> int:
    k = topmin_count(m, topmin)
    if k < 1:
        need = min_images(topmin)
        raise ConfigError(
            f"preset musc scores images against each other and needs at least {need} images of "
            f"one category (it averages the {topmin:g} smallest of the M−1 per-image distances); "
            f"got {m}. Give more images (a folder of one product) or use --preset crane"
        )
    return k


@torch.no_grad()
def nearest_distance_table(
    z_mnc: torch.Tensor,
    rows: Sequence[int] | range | None = None,
    *,
    block_rows: int = BLOCK_ROWS,
) -> torch.Tensor:
    """d (R, N, M): for each query image i in ``rows`` (default all), patch p and image j the
    Euclidean distance from z[i, p] to its nearest patch in image j; +inf where j == i.

    ``z`` rows must be L2-normalised (‖a−b‖² = 2 − 2a·b). The distances come from blocked
    matrix products of ``block_rows`` patches at a time; a block whose both image ranges lie in
    ``rows`` is used in both directions (row and column maxima), so scoring the whole set costs
    half the products.
    """
    m, n, c = z_mnc.shape
    rows = range(m) if rows is None else rows
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    if list(rows) != list(range(r0, r1)):
        raise ValueError("rows must be a contiguous range of image indices")
    per = max(1, int(block_rows) // n)
    flat = z_mnc.reshape(m * n, c)
    d = torch.full((r1 - r0, n, m), float("inf"), dtype=torch.float32, device=z_mnc.device)
    a_blocks = _blocks(r0, r1, per)
    b_blocks = _blocks(0, r0, per) + a_blocks + _blocks(r1, m, per)
    for a0, a1 in a_blocks:
        za = flat[a0 * n : a1 * n]
        for b0, b1 in b_blocks:
            inside = r0 <= b0 and b1 <= r1  # (b0, b1) is one of the query blocks too
            if inside and b0 < a0:
                continue  # filled from block (b, a) in both directions
            s = za @ flat[b0 * n : b1 * n].t()  # (Ba·N, Bb·N)
            ba, bb = a1 - a0, b1 - b0
            row = s.view(ba * n, bb, n).amax(dim=2)  # best match of each query patch per image
            d[a0 - r0 : a1 - r0, :, b0:b1] = _dist(row).view(ba, n, bb)
            if inside and b0 != a0:
                col = s.view(ba, n, bb * n).amax(dim=1)  # (Ba, Bb·N): image b's patches vs a
                d[b0 - r0 : b1 - r0, :, a0:a1] = _dist(col).view(ba, bb, n).permute(1, 2, 0)
    idx = torch.arange(r0, r1, device=d.device)
    d[idx - r0, :, idx] = float("inf")
    return d


def _blocks(lo: int, hi: int, per: int) -> list[tuple[int, int]]:
    return [(s, min(s + per, hi)) for s in range(lo, hi, per)]


def _dist(sim: torch.Tensor) -> torch.Tensor:
    return (2.0 - 2.0 * sim).clamp_min_(0.0).sqrt_()


@torch.no_grad()
def mutual_scores(
    z_mnc: torch.Tensor,
    topmin: float = 0.3,
    *,
    block_rows: int = BLOCK_ROWS,
    table_bytes: int = TABLE_BYTES,
) -> torch.Tensor:
    """MSM: (M, N, C) L2-normalised features -> (M, N) float32 patch scores.

    Score of patch p of image i = mean of the k = int((M−1)·topmin) smallest nearest-patch
    distances to the other images. All M images are scored as one set; the work is streamed
    (see :func:`nearest_distance_table`) and, when the M × N × M table exceeds ``table_bytes``,
    query images are taken in slices. Exact in every case.
    """
    m, n, _ = z_mnc.shape
    k = _check_set_size(m, topmin)
    z = z_mnc.float()
    norms = torch.linalg.vector_norm(z, dim=-1)  # (M, N), no (M, N, C) temporary
    if float((norms - 1).abs().max()) > 1e-3:
        raise ValueError("mutual_scores needs L2-normalised feature vectors")
    per = max(1, int(block_rows) // n)
    slice_imgs = max(per, int(table_bytes) // max(1, 4 * n * m))
    slice_imgs = min(m, per * max(1, slice_imgs // per))
    out = torch.empty(m, n, dtype=torch.float32, device=z.device)
    for g0 in range(0, m, slice_imgs):
        g1 = min(g0 + slice_imgs, m)
        d = nearest_distance_table(z, range(g0, g1), block_rows=block_rows)
        out[g0:g1] = d.topk(k, dim=2, largest=False).values.mean(dim=2)
    return out


def rscin_k_list(dataset: str | None) -> tuple[int, ...]:
    """The reference's RsCIN k-list for a dataset name: VisA [1, 8, 9], otherwise [1, 2, 3]."""
    key = (dataset or "").lower().replace("-", "").replace("_", "")
    if key in ("mvtec", "mvtecad"):
        key = "mvtec"
    return RSCIN_K_LISTS.get(key, RSCIN_K_DEFAULT)


def parse_k_list(value: str | Sequence[int]) -> tuple[int, ...]:
    """``musc_k`` as given (``"1,8,9"`` or a sequence) -> a tuple of ints (ConfigError if not)."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        ks = tuple(int(k) for k in items if str(k) != "")
    except (TypeError, ValueError):
        raise ConfigError(f"musc_k {value!r}: give k values like 1,2,3") from None
    if not ks or min(ks) < 0:
        raise ConfigError(f"musc_k {value!r}: give non-negative k values like 1,2,3")
    return ks


def rscin(
    raw_scores: torch.Tensor, embeds_md: torch.Tensor, ks: Sequence[int] = (1, 2, 3)
) -> torch.Tensor:
    """RsCIN: min-max normalise ``raw_scores`` (M,) over the set, then average over k in ``ks``
    of P_k s, where P_k keeps the k largest similarities W = E Eᵀ of each row (self included,
    negatives not clamped) and divides the row by their sum. ``embeds_md`` are used as given
    (the reference's CLIP embeddings are unit vectors, its DINO ones are not).

    A 0 in ``ks`` returns ``raw_scores`` unchanged, as the reference does. float64 result.
    """
    ks = [int(k) for k in ks]
    raw = raw_scores.double()
    if not ks or 0 in ks:
        return raw
    m = raw.shape[0]
    if max(ks) > m or min(ks) < 0:
        raise ConfigError(
            f"RsCIN k-list {ks} needs at least {max(ks)} images (got {m}); give more images "
            f"or a shorter list (musc_k, e.g. 1,2,3)"
        )
    span = raw.max() - raw.min()
    s = (raw - raw.min()) / span if float(span) > 0 else torch.zeros_like(raw)
    e = embeds_md.double()
    w = e @ e.t()
    outs = []
    for k in ks:
        idx = w.topk(k, dim=1).indices
        wk = torch.zeros_like(w).scatter_(1, idx, w.gather(1, idx))
        outs.append((wk / wk.sum(dim=1, keepdim=True)) @ s)
    return torch.stack(outs).mean(dim=0)


def upsample_aligned(patch_mn: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(M, N) patch scores -> (M, size, size) float64, bilinear with ``align_corners=True``."""
    m = patch_mn.shape[0]
    g = patch_mn.double().reshape(m, 1, grid[0], grid[1])
    return F.interpolate(g, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def lnamd_set(
    tokens_mnc: torch.Tensor, grid: tuple[int, int], r: int, *, device=None, chunk: int = 16
) -> torch.Tensor:
    """:func:`layer_features` of a whole set, ``chunk`` images at a time into one (M, N, C)
    float32 tensor (LNAMD is per image; this bounds its temporaries to a chunk)."""
    m, n, c = tokens_mnc.shape
    dev = tokens_mnc.device if device is None else torch.device(device)
    z = torch.empty(m, n, c, dtype=torch.float32, device=dev)
    for i in range(0, m, chunk):
        z[i : i + chunk] = layer_features(tokens_mnc[i : i + chunk].to(dev), grid, r)
    return z


def musc_patch_scores(
    tokens: Sequence[torch.Tensor | Callable[[], torch.Tensor]],
    grid: tuple[int, int],
    r_list: Sequence[int] = (1, 3, 5),
    topmin: float = 0.3,
    *,
    device=None,
    block_rows: int = BLOCK_ROWS,
    table_bytes: int = TABLE_BYTES,
    keep_per_layer: bool = False,
):
    """LNAMD + MSM over layers and r: per-layer raw patch tokens (M, N, C) -> (M, N) float64
    patch scores (mean over layers of each r, then over r). With ``keep_per_layer`` also the
    (R, L, M, N) per-(r, layer) MSM scores.

    A layer may be given as a zero-argument callable returning its tokens: it is called once,
    so only one layer's (M, N, C) tokens need to exist at a time.
    """
    if not tokens:
        raise ValueError("no layers")
    r_list = [int(r) for r in r_list]
    scores = None  # (R, L, M, N) float32
    for li, item in enumerate(tokens):
        tok = item() if callable(item) else item
        m, n = int(tok.shape[0]), int(tok.shape[1])
        _check_set_size(m, topmin)
        if scores is None:
            scores = torch.empty(len(r_list), len(tokens), m, n, dtype=torch.float32)
        for ri, r in enumerate(r_list):
            z = lnamd_set(tok, grid, r, device=device)
            scores[ri, li] = mutual_scores(
                z, topmin, block_rows=block_rows, table_bytes=table_bytes
            ).cpu()
            del z
        del tok
    patch = scores.double().mean(dim=1).mean(dim=0)
    return (patch, scores) if keep_per_layer else patch


def reference_gt_mask(
    mask_hw: np.ndarray | torch.Tensor, size: int, dataset: str | None
) -> torch.Tensor:
    """A ground-truth mask binarised at ``size`` × ``size`` the way MuSc's evaluation does it
    (README §6.7), for evaluating ``musc`` against its published numbers.

    The mask (0/255 or 0/1, any nonzero pixel anomalous) is resized as an 8-bit 'L' image with
    PIL bilinear; then **MVTec / BTAD** keep only pixels that are exactly 255 (the reference
    truncates ``mask / 255`` to int, so masks shrink at their edges) and **VisA** keeps every
    nonzero pixel (masks grow). Returns a (size, size) bool tensor.
    """
    from PIL import Image

    arr = np.asarray(mask_hw)
    u8 = np.where(arr > 0, 255, 0).astype(np.uint8)
    im = Image.fromarray(u8, mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    out = np.asarray(im)
    key = (dataset or "").lower().replace("-", "").replace("_", "")
    keep = out > 0 if key == "visa" else out == 255
    return torch.from_numpy(keep.copy())


# ---- the task ------------------------------------------------------------------------------


def _backbone_features(
    seg: Segmenter, cfg: AnomalyPreset, ctxs: list, layers_24: tuple[int, ...]
) -> list[dict]:
    """Per image: {layer: (N, C) float32 CPU patch tokens}, the RsCIN embedding, grid, info."""
    kind, dino_name = resolve_backbone(cfg.musc_backbone)
    if kind == "clip":
        clip = seg.clip(cfg.clip_arch)
        layers = scale_layers(layers_24, clip.num_layers)
        act = clip_activation(clip, cfg.image_size, cfg.musc_act)
        x = clip.normalize(model_input(ctxs, cfg.image_size, seg.device))
        with seg.autocast():
            st = clip_streams(clip, x, layers, act=act, pos_mode="bicubic")
    else:
        dino = seg.dinov2(dino_name)
        layers = scale_layers(layers_24, len(dino.model.encoder.layer))
        x = dino.normalize(model_input(ctxs, cfg.image_size, seg.device, "bilinear"))
        with seg.autocast():
            st = dinov2_streams(dino, x, layers)
    per_layer = {layer: st.patches[layer].float().cpu() for layer in layers}
    embed = st.image_embed.float().cpu()
    info = dict(st.info, layers=list(layers))
    return [
        {
            "tokens": {layer: t[i] for layer, t in per_layer.items()},
            "embed": embed[i],
            "grid": st.grid,
            "info": info,
        }
        for i in range(len(ctxs))
    ]


@torch.no_grad()
def run_musc(
    seg: Segmenter, cfg: AnomalyPreset, ctxs: list, dataset: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Maps (M, S, S) float32 at the input size and image scores (M,) for one category's set.

    ``dataset`` picks the RsCIN k-list as the reference does (``visa`` -> 1,8,9; otherwise
    1,2,3) unless the preset's ``musc_k`` is set.
    """
    m = len(ctxs)
    _check_set_size(m, cfg.musc_topmin)
    ks = parse_k_list(cfg.musc_k) if cfg.musc_k else rscin_k_list(dataset)
    if max(ks) > m:
        raise ConfigError(
            f"RsCIN k-list {list(ks)} needs at least {max(ks)} images; got {m}. Give more images "
            f"or set musc_k (e.g. 1,2,3)"
        )
    key = (
        "musc-feats",
        cfg.musc_backbone,
        cfg.clip_arch,
        cfg.image_size,
        tuple(cfg.musc_layers),
        cfg.musc_act,
    )
    bs = int(seg.config.batch_size)
    feats: list[dict] = []
    for i in range(0, m, bs):
        feats.extend(
            batched_get(
                ctxs[i : i + bs], key, lambda cs: _backbone_features(seg, cfg, cs, cfg.musc_layers)
            )
        )
    grid = feats[0]["grid"]
    layers = feats[0]["info"]["layers"]
    # one layer's (M, N, C) stack at a time (the per-image tokens stay in the contexts' cache)
    tokens = [
        (lambda layer=layer: torch.stack([f["tokens"][layer] for f in feats])) for layer in layers
    ]
    patch = musc_patch_scores(tokens, grid, cfg.musc_r, cfg.musc_topmin, device=seg.device)
    maps64 = upsample_aligned(patch, grid, cfg.image_size)  # (M, S, S) float64
    if cfg.sigma and cfg.sigma > 0:
        from zsdense.dense.smoothing import smooth_maps

        maps64 = smooth_maps(maps64.float(), cfg.sigma, cfg.smoothing_backend).double()
    raw = maps64.flatten(1).amax(dim=1)
    embeds = torch.stack([f["embed"] for f in feats])
    scores = rscin(raw, embeds, ks)
    info = dict(feats[0]["info"])
    info.update(
        r=list(cfg.musc_r),
        topmin=cfg.musc_topmin,
        k=list(ks),
        n_images=m,
        grid=list(grid),
        scored_as="one set",
        upsample="bilinear align_corners=True",
        smoothing_sigma=float(cfg.sigma or 0.0),
    )
    return maps64.float(), scores.float(), info


__all__ = [
    "layer_features",
    "mutual_scores",
    "nearest_distance_table",
    "rscin",
    "rscin_k_list",
    "upsample_aligned",
    "reference_gt_mask",
    "musc_patch_scores",
    "lnamd_set",
    "min_images",
    "topmin_count",
    "run_musc",
]
