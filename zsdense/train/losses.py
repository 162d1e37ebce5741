"""Crane's training losses as run (``train.py:88-159``, ``utils/loss.py``).

Per map l (each (B, N, D), L2-normalised tokens) and per-image text pairs T (B, 2, D):

- logits_l = P_l·T_bᵀ / 0.07, softmax over [normal, abnormal], nearest-upsampled to the mask
  size (a patch becomes a block of pixels);
- focal_l: mean over all pixels of −(1−pt)^γ·ln pt with pt = oh·p summed over the 2 states plus
  1e-5, oh the one-hot of the mask clamped to [1e-5, 1−1e-5] (α = 1, no class balancing);
- dice_l = 1 − mean_b (2Σx·m + 1) / (Σx + Σm + 1), x = (1 − p_normal + p_abnormal) / 2;
- both summed over the maps (Crane's aliased copies count once each);
- image CE: score-based pooling f = l2n(α·l2n(Σ_n w_n·p̄_n) + (1−α)·g), w = softmax of the
  mean logits [abnormal], logits f·T_bᵀ / 0.01, cross-entropy with the image labels;
- total = 2·Σfocal + 2·Σdice + 0.2·CE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from zsdense.train.recipe import TrainRecipe


@dataclass
class LossTerms:
    """Everything one training forward produces (fixture names; shapes in comments)."""

    total: torch.Tensor  # ()
    focal: torch.Tensor  # () = focal_weight · Σ_l focal_l
    dice: torch.Tensor  # () = dice_weight · Σ_l dice_l
    image_ce: torch.Tensor  # ()
    focal_per_map: torch.Tensor  # (L,)
    dice_per_map: torch.Tensor  # (L,)
    image_logits: torch.Tensor  # (B, 2)
    sbp_clustered: torch.Tensor  # (B, D)
    image_feature_fused: torch.Tensor  # (B, D)
    pixel_logits: torch.Tensor  # (L, B, N, 2)
    extra: dict = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """The four scalar terms as floats (logs, train.jsonl)."""
        return {
            "total": float(self.total.detach()),
            "focal": float(self.focal.detach()),
            "dice": float(self.dice.detach()),
            "image_ce": float(self.image_ce.detach()),
        }


def upsample_probs(probs_bnk: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], mode):
    """(B, N, K) per-patch values -> (B, K, H, W) (Crane's ``regrid_upsample``)."""
    b, n, k = probs_bnk.shape
    g = probs_bnk.reshape(b, grid[0], grid[1], k).permute(0, 3, 1, 2)
    if mode == "nearest":
        return F.interpolate(g, size=size, mode="nearest")
    return F.interpolate(g, size=size, mode="bilinear", align_corners=False)


def focal_loss(
    probs_bkhw: torch.Tensor, mask_bhw: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Crane's ``FocalLoss`` on probabilities (2 classes, α = 1), mean over every pixel."""
    y = mask_bhw > 0.5
    hi, lo = 1.0 - smooth, smooth  # the one-hot clamped to [smooth / (K-1), 1 - smooth]
    p0, p1 = probs_bkhw[:, 0], probs_bkhw[:, 1]
    oh0 = torch.where(y, lo, hi).to(p0.dtype)
    oh1 = torch.where(y, hi, lo).to(p0.dtype)
    pt = (oh0 * p0 + oh1 * p1) + smooth
    return (-1 * torch.pow(1 - pt, gamma) * pt.log()).mean()


def dice_loss(
    x_bhw: torch.Tensor, mask_bhw: torch.Tensor, smooth: float = 1.0, squeeze_rows: bool = False
) -> torch.Tensor:
    """``BinaryDiceLoss``: 1 − mean over images of (2Σx·m + s) / (Σx + Σm + s).

    ``squeeze_rows`` reproduces the reference at a batch of one image, where ``mask.squeeze()``
    made the mask (H, W) and the loss treated each of its H rows as an image.
    """
    if squeeze_rows and x_bhw.shape[0] == 1:
        xf, mf = x_bhw.reshape(x_bhw.shape[1], -1), mask_bhw.reshape(mask_bhw.shape[1], -1)
    else:
        xf, mf = x_bhw.reshape(x_bhw.shape[0], -1), mask_bhw.reshape(mask_bhw.shape[0], -1)
    n = xf.shape[0]
    d = (2 * (xf * mf).sum(1) + smooth) / (xf.sum(1) + mf.sum(1) + smooth)
    return 1 - d.sum() / n


def training_losses(
    maps: Sequence[torch.Tensor],
    counts: Sequence[int],
    global_embed_bd: torch.Tensor,
    text_b2d: torch.Tensor,
    masks_bhw: torch.Tensor,
    labels_b: torch.Tensor,
    *,
    grid: tuple[int, int],
    recipe: TrainRecipe,
    keep_maps: bool = False,
) -> LossTerms:
    """All loss terms of one step. ``maps`` are the distinct token maps and ``counts`` how many
    of Crane's feature entries alias each one (4 copies of the block-24 map for ``crane``); a
    map's focal and dice count that many times and it weighs that much in the pooling mean."""
    size = tuple(masks_bhw.shape[-2:])
    masks = masks_bhw.to(text_b2d.dtype)
    logits, focal_l, dice_l, ups = [], [], [], []
    for tok, cnt in zip(maps, counts):
        lg = torch.einsum("bnd,bkd->bnk", tok.to(text_b2d.dtype), text_b2d)
        lg = lg / recipe.pixel_temperature  # (B, N, 2)
        probs = lg.softmax(dim=-1)
        up = upsample_probs(probs, grid, size, recipe.interpolation)  # (B, 2, H, W)
        fo = focal_loss(up, masks, recipe.focal_gamma, recipe.focal_smooth)
        x = (1 - up[:, 0] + up[:, 1]) / 2
        di = dice_loss(x, masks, recipe.dice_smooth, recipe.dice_squeeze_rows)
        for _ in range(int(cnt)):
            logits.append(lg)
            focal_l.append(fo)
            dice_l.append(di)
            if keep_maps:
                ups.append(up.permute(0, 2, 3, 1))
    focal_per_map = torch.stack(focal_l)
    dice_per_map = torch.stack(dice_l)
    focal = focal_per_map.sum() * recipe.focal_weight
    dice = dice_per_map.sum() * recipe.dice_weight
    # score-based pooling (Crane.py:395-400): p̄ = mean of the token maps, w from mean logits
    total_count = float(sum(int(c) for c in counts))
    p_bar = sum(tok.to(text_b2d.dtype) * float(c) for tok, c in zip(maps, counts))
    p_bar = p_bar / total_count  # (B, N, D)
    mean_logits = torch.stack(logits).mean(dim=0)  # (B, N, 2)
    w = mean_logits.softmax(dim=-1)[..., 1]  # (B, N)
    c = F.normalize((p_bar * w.unsqueeze(-1)).sum(dim=1), dim=-1)
    a = recipe.sbp_alpha
    f = F.normalize(a * c + (1 - a) * global_embed_bd.to(c.dtype), dim=-1)
    img_logits = torch.einsum("bd,bkd->bk", f, text_b2d) / recipe.image_temperature
    ce = F.cross_entropy(img_logits, labels_b.long())
    total = focal + dice + recipe.image_ce_weight * ce
    extra = {"similarity_maps": torch.stack(ups)} if keep_maps else {}
    return LossTerms(
        total=total,
        focal=focal,
        dice=dice,
        image_ce=ce,
        focal_per_map=focal_per_map,
        dice_per_map=dice_per_map,
        image_logits=img_logits,
        sbp_clustered=c,
        image_feature_fused=f,
        pixel_logits=torch.stack(logits),
        extra=extra,
    )


__all__ = ["LossTerms", "dice_loss", "focal_loss", "training_losses", "upsample_probs"]
