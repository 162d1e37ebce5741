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
   **Memory independent of M**: :func:`run_musc` writes each layer's tokens to a file
   (:class:`DiskStack`, in a temporary directory under ``cache_dir`` / ``TMPDIR``, removed at the
   end) as the encoder batches finish, once they exceed :data:`SPILL_BYTES` (smaller sets stay in
   RAM); LNAMD goes chunk by chunk to a file per (layer, r) and the distances read it back in
   blocks, so RAM holds the table slice (≤ ``TABLE_BYTES``, plus about
   as much for its top-k), ``GROUP_BYTES`` of query blocks, one product block and one LNAMD
   chunk: a bound that does not depend on M (below it the table grows as M²·N until it is
   sliced). Bit-identical to the in-memory path (``in_memory=True``): the same products on the
   same shapes (tokens encoded in other batches move in the last bits, see :func:`run_musc`).
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

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from zsdense.config import AnomalyPreset
from zsdense.dense.crane import scale_layers
from zsdense.dense.musc_backbones import (
    clip_activation,
    clip_streams,
    dinov2_streams,
    resolve_backbone,
)
from zsdense.errors import ConfigError
from zsdense.tasks.common import batched_get, exact_inputs, model_input
from zsdense.tasks.musc_scoring import (
    BLOCK_ROWS,
    GROUP_BYTES,
    RSCIN_K_DEFAULT,
    RSCIN_K_LISTS,
    TABLE_BYTES,
    DiskStack,
    FeatureSet,
    check_set_size,
    layer_features,
    lnamd_set,
    min_images,
    musc_patch_scores,
    mutual_scores,
    nearest_distance_table,
    parse_k_list,
    reference_gt_mask,
    rscin,
    rscin_k_list,
    topmin_count,
    upsample_aligned,
)

__all__ = [
    "BLOCK_ROWS",
    "GROUP_BYTES",
    "RSCIN_K_DEFAULT",
    "RSCIN_K_LISTS",
    "SPILL_BYTES",
    "TABLE_BYTES",
    "DiskStack",
    "FeatureSet",
    "layer_features",
    "mutual_scores",
    "nearest_distance_table",
    "parse_k_list",
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

# the per-image features of one encoder batch: {"tokens": {layer: (N, C)}, "embed", "grid", "info"}
Features = Callable[[list], list[dict]]


def _backbone_features(
    rt: Any, cfg: AnomalyPreset, ctxs: list, layers_24: tuple[int, ...]
) -> list[dict]:
    """Per image: {layer: (N, C) float32 CPU patch tokens}, the RsCIN embedding, grid, info."""
    kind, dino_name = resolve_backbone(cfg.musc_backbone)
    if kind == "clip":
        clip = rt.clip(cfg.clip_arch)
        layers = scale_layers(layers_24, clip.num_layers)
        act = clip_activation(clip, cfg.image_size, cfg.musc_act)
        x = clip.normalize(model_input(ctxs, cfg.image_size, rt.device, exact=exact_inputs(clip)))
        with rt.autocast():
            st = clip_streams(clip, x, layers, act=act, pos_mode="bicubic")
    else:
        dino = rt.dinov2(dino_name)
        layers = scale_layers(layers_24, len(dino.model.encoder.layer))
        x01 = model_input(ctxs, cfg.image_size, rt.device, "bilinear", exact=exact_inputs(dino))
        x = dino.normalize(x01)
        with rt.autocast():
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
    rt: Any,  # a zsdense.runtime.Runtime (or the Segmenter over one)
    cfg: AnomalyPreset,
    ctxs: list,
    dataset: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    in_memory: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Maps (M, S, S) float32 at the input size and image scores (M,) for one category's set.

    ``dataset`` picks the RsCIN k-list as the reference does (``visa`` -> 1,8,9; otherwise
    1,2,3) unless the preset's ``musc_k`` is set.

    The per-layer patch tokens are gathered as each encoder batch finishes. A set whose tokens
    exceed :data:`SPILL_BYTES` (512 MiB; ``in_memory=None``, the default), or any set with
    ``in_memory=False``, has them written to one file per layer in a temporary directory under
    ``cache_dir`` (default: the system temp dir, ``TMPDIR``), and LNAMD and the distances are
    computed from there chunk by chunk, so the memory does not grow with the number of images
    (the files take 4 × M × N × C × 4 bytes of disk, plus one layer's LNAMD features per r at a
    time). The directory is removed at the end, also after an error. A smaller set keeps them
    in RAM for the call (writing and reading them back cost about 7 % of the encoders on a
    6-image ViT-B/16 set). ``in_memory=True`` keeps the tokens in the contexts' cache (reused
    by a later call on the same contexts). All three give bit-identical results. Tokens cached by an
    earlier call are used as they are: where they cover part of an encoder batch, the rest of
    that batch is encoded as a smaller batch, whose matrix products can differ in the last bits
    on some CPUs and thread counts (measured 2.3e-10 on the image scores).
    """
    m = len(ctxs)
    check_set_size(m, cfg.musc_topmin)
    ks = _k_list(cfg, dataset, m)
    key = (
        "musc-feats",
        cfg.musc_backbone,
        cfg.clip_arch,
        cfg.image_size,
        tuple(cfg.musc_layers),
        cfg.musc_act,
    )

    def features(cs: list) -> list[dict]:
        return _backbone_features(rt, cfg, cs, cfg.musc_layers)

    if in_memory:
        patch, grid, info, embeds = _score_in_memory(rt, cfg, ctxs, key, features)
    else:
        spill = None if in_memory is None else True
        patch, grid, info, embeds = _score_streamed(rt, cfg, ctxs, key, features, cache_dir, spill)
    maps64 = upsample_aligned(patch, grid, cfg.image_size)  # (M, S, S) float64
    if cfg.sigma and cfg.sigma > 0:
        from zsdense.dense.smoothing import smooth_maps

        maps64 = smooth_maps(maps64.float(), cfg.sigma, cfg.smoothing_backend).double()
    raw = maps64.flatten(1).amax(dim=1)
    scores = rscin(raw, embeds, ks)
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


def _k_list(cfg: AnomalyPreset, dataset: str | None, m: int) -> tuple[int, ...]:
    """The RsCIN k-list (the preset's ``musc_k``, else the dataset's), checked against M."""
    ks = parse_k_list(cfg.musc_k) if cfg.musc_k else rscin_k_list(dataset)
    if max(ks) > m:
        raise ConfigError(
            f"RsCIN k-list {list(ks)} needs at least {max(ks)} images; got {m}. Give more images "
            f"or set musc_k (e.g. 1,2,3)"
        )
    return ks


def _score_in_memory(
    rt: Any, cfg: AnomalyPreset, ctxs: list, key: tuple, features: Features
) -> tuple[torch.Tensor, tuple[int, int], dict, torch.Tensor]:
    """(patch scores, grid, info, RsCIN embeddings) with the tokens kept in the contexts'
    cache."""
    bs = int(rt.config.batch_size)
    feats: list[dict] = []
    for i in range(0, len(ctxs), bs):
        feats.extend(batched_get(ctxs[i : i + bs], key, features))
    grid = feats[0]["grid"]
    info = dict(feats[0]["info"])
    embeds = torch.stack([f["embed"] for f in feats])
    # one layer's (M, N, C) stack at a time (the per-image tokens stay in the contexts' cache)
    tokens = [
        (lambda layer=layer: torch.stack([f["tokens"][layer] for f in feats]))
        for layer in info["layers"]
    ]
    with rt.autocast():  # the distance products at the runtime's precision
        patch = musc_patch_scores(tokens, grid, cfg.musc_r, cfg.musc_topmin, device=rt.device)
    return patch, grid, info, embeds


def _score_streamed(
    rt: Any,
    cfg: AnomalyPreset,
    ctxs: list,
    key: tuple,
    features: Features,
    cache_dir: Any,
    spill: bool | None,
) -> tuple[torch.Tensor, tuple[int, int], dict, torch.Tensor]:
    """(patch scores, grid, info, RsCIN embeddings) with the tokens gathered per layer as the
    encoder batches finish: in one file per layer in a temporary directory under ``cache_dir``
    (removed at the end, also after an error) when ``spill`` is true, or when it is None and
    they exceed :data:`SPILL_BYTES`; else in RAM for this call only."""
    with contextlib.ExitStack() as cleanup:

        def spill_dir() -> Path:
            if cache_dir is not None:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
            tmp = tempfile.TemporaryDirectory(prefix="zsdense-musc-", dir=cache_dir)
            return Path(cleanup.enter_context(tmp))

        bs = int(rt.config.batch_size)
        stores, grid, info, embeds = _gather_tokens(ctxs, key, features, bs, spill_dir, spill)
        with rt.autocast():  # the distance products at the runtime's precision
            patch = musc_patch_scores(
                list(stores.values()), grid, cfg.musc_r, cfg.musc_topmin, device=rt.device
            )
    return patch, grid, info, embeds


# Above this many bytes of tokens (all layers, float32) a set's tokens go to disk when
# ``run_musc`` is left to choose: 22 ViT-L/14 images at 518 px (4 layers of 1369 × 1024), 213
# ViT-B/16 images at 224. In RAM the peak adds one layer's LNAMD features per r (3/4 of this).
SPILL_BYTES = 512 << 20


def _gather_tokens(
    ctxs: list,
    key: tuple,
    features: Features,
    bs: int,
    spill_dir: Callable[[], Path],
    spill: bool | None,
) -> tuple[dict[int, FeatureSet], tuple[int, int], dict, torch.Tensor]:
    """Encode ``bs`` images at a time and put each layer's tokens in its (M, N, C) store: a
    :class:`DiskStack` in ``spill_dir()`` or a tensor (see :func:`_score_streamed`), chosen once
    the first batch shows the token shapes; (stores by layer, grid, info, RsCIN embeddings)."""
    m = len(ctxs)
    stores: dict[int, FeatureSet] = {}
    embed_list: list[torch.Tensor] = []
    for i in range(0, m, bs):
        batch = ctxs[i : i + bs]
        missing = [c for c in batch if key not in c.cache]
        fresh = iter(features(missing) if missing else [])
        # cached features are used as they are; new ones are not cached (they go to the stores)
        for f in (c.cache[key] if key in c.cache else next(fresh) for c in batch):
            if not stores:
                grid, info = f["grid"], dict(f["info"])
                shapes = {
                    layer: (m, int(f["tokens"][layer].shape[0]), int(f["tokens"][layer].shape[1]))
                    for layer in info["layers"]
                }
                total = sum(4 * a * b * c for a, b, c in shapes.values())
                to_disk = total > SPILL_BYTES if spill is None else spill
                where = spill_dir() if to_disk else None
                for li, (layer, shape) in enumerate(shapes.items()):
                    stores[layer] = (
                        DiskStack(where / f"tokens-{li}.f32", shape)
                        if where is not None
                        else torch.empty(shape, dtype=torch.float32)
                    )
            j = len(embed_list)
            for layer, st in stores.items():
                t = f["tokens"][layer]
                if isinstance(st, DiskStack):
                    st.write(j, t.unsqueeze(0))
                else:
                    st[j] = t
            embed_list.append(f["embed"])
    return stores, grid, info, torch.stack(embed_list)
