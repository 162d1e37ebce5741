"""The frozen encoders' side of prompt training: E-Attn (and D-Attn) token maps per image.

Nothing here has a gradient: Crane's ``VisionTransformer.forward`` runs under ``no_grad`` and
the prompts are the only trainable numbers. Because the frozen features of an image do not
depend on the prompts, the step counter or (with per-image D-Attn means) the other images of
its batch, they can be computed once and reused every epoch (:class:`FeatureCache`); the
reference recomputes them for every batch. Crane+'s batch-mean D-Attn (``dattn_mean="batch"``,
as run) ties an image's features to its shuffled batch, so that setting is never cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from zsdense.dense.crane import crane_features, dino_input_from_clip, scale_block, scale_layers
from zsdense.errors import ConfigError
from zsdense.train.recipe import TrainRecipe


@dataclass(frozen=True)
class VisionSetup:
    """Where E-Attn starts and which maps the losses see, for one CLIP (1-based blocks)."""

    start_block: int
    layers: tuple[int, ...] | None  # None: as run (the last refined map, aliased)
    n_aliased: int
    use_dattn: bool
    dattn_mean: str

    def counts(self) -> list[int]:
        """How many loss entries each distinct map stands for, in map order."""
        eattn = [self.n_aliased] if self.layers is None else [1] * len(self.layers)
        return ([1] if self.use_dattn else []) + eattn


def vision_setup(recipe: TrainRecipe, n_layers: int, **override) -> VisionSetup:
    """The recipe's blocks scaled to a ``n_layers``-block tower; ``override`` fixes any field."""
    start = scale_block(recipe.eattn_start_block, n_layers)
    layers = None if recipe.eattn_layers is None else scale_layers(recipe.eattn_layers, n_layers)
    kw = dict(
        start_block=start,
        layers=layers,
        n_aliased=recipe.n_aliased_maps,
        use_dattn=recipe.use_dattn,
        dattn_mean=recipe.dattn_mean,
    )
    kw.update(override)
    return VisionSetup(**kw)


@dataclass
class VisionBatch:
    """Distinct token maps (each (B, N, D), L2-normalised), their alias counts, the global
    embedding (B, D) and the patch grid."""

    maps: list[torch.Tensor]
    counts: list[int]
    global_embed: torch.Tensor
    grid: tuple[int, int]

    def select(self, idx: Sequence[int] | slice) -> VisionBatch:
        """The same for a subset of the images (micro-batches)."""
        return VisionBatch(
            [m[idx] for m in self.maps], list(self.counts), self.global_embed[idx], self.grid
        )

    def to(self, device) -> VisionBatch:
        return VisionBatch(
            [m.to(device) for m in self.maps],
            list(self.counts),
            self.global_embed.to(device),
            self.grid,
        )


@torch.no_grad()
def encode_images(
    clip,
    x_norm_bchw: torch.Tensor,
    recipe: TrainRecipe,
    setup: VisionSetup,
    *,
    dino=None,
    dino_feats_bchw: torch.Tensor | None = None,
) -> VisionBatch:
    """Frozen features of a CLIP-normalised batch (float32).

    Crane+ needs DINOv2 patch features: ``dino_feats_bchw`` when given (the fixtures' stand-in),
    else computed with ``dino`` from the same input as Crane feeds it.
    """
    if setup.use_dattn and dino_feats_bchw is None:
        if dino is None:
            raise ConfigError("the crane+ recipe needs a DINOv2 model for D-Attn")
        d_in = dino.normalize(dino_input_from_clip(x_norm_bchw, clip.mean, clip.std))
        dino_feats_bchw = dino.patch_features(d_in).float()
    f = crane_features(
        clip,
        x_norm_bchw,
        start_block=setup.start_block,
        attn_type=recipe.attn_type,
        layers=setup.layers,
        dino_feats_bchw=dino_feats_bchw if setup.use_dattn else None,
        dattn_beta=recipe.dattn_beta,
        dattn_gamma=recipe.dattn_gamma,
        dattn_mean=setup.dattn_mean,
        dattn_value_source=recipe.dattn_value_source,
    )
    counts = setup.counts()
    if len(counts) != len(f.maps):  # pragma: no cover - guards the counts bookkeeping
        raise RuntimeError(f"{len(f.maps)} maps but {len(counts)} alias counts")
    return VisionBatch([m.float() for m in f.maps], counts, f.global_embed.float(), tuple(f.grid))


class FeatureCache:
    """Per-image frozen features kept after their first computation (CPU memory, float32).

    Allowed only when features are per-image (no batch-mean D-Attn). The memory is
    ``L·N·D·4`` bytes per image (L distinct maps): ~4.2 MB for ViT-L/14 at 518 with one map.
    """

    def __init__(self, setup: VisionSetup) -> None:
        if not cacheable(setup):
            raise ConfigError(
                "feature caching needs per-image features: Crane+ with the batch-mean D-Attn "
                "(dattn_mean='batch', as run) depends on the shuffled batch; use "
                "dattn_mean='image' or turn caching off"
            )
        self._maps: dict[int, torch.Tensor] = {}  # index -> (L, N, D)
        self._glob: dict[int, torch.Tensor] = {}
        self._grid: tuple[int, int] | None = None
        self._counts: list[int] = setup.counts()
        self.computed = 0

    def __contains__(self, index: int) -> bool:
        return index in self._maps

    def put(self, indices: Sequence[int], batch: VisionBatch) -> None:
        stacked = torch.stack(batch.maps, dim=1).cpu()  # (B, L, N, D)
        for j, i in enumerate(indices):
            self._maps[int(i)] = stacked[j].clone()
            self._glob[int(i)] = batch.global_embed[j].cpu().clone()
        self._grid = batch.grid
        self.computed += len(indices)

    def get(self, indices: Sequence[int], device) -> VisionBatch:
        maps = torch.stack([self._maps[int(i)] for i in indices]).to(device)  # (B, L, N, D)
        glob = torch.stack([self._glob[int(i)] for i in indices]).to(device)
        assert self._grid is not None
        return VisionBatch(list(maps.unbind(1)), list(self._counts), glob, self._grid)


def cacheable(setup: VisionSetup) -> bool:
    """Whether an image's frozen features are independent of its batch."""
    return not (setup.use_dattn and setup.dattn_mean == "batch")


__all__ = [
    "FeatureCache",
    "VisionBatch",
    "VisionSetup",
    "cacheable",
    "encode_images",
    "vision_setup",
]
