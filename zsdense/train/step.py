"""One optimisation step of Crane's prompt training (``train.py:88-159``), with optional
gradient accumulation over micro-batches."""

from __future__ import annotations

import torch

from zsdense.train.features import VisionBatch
from zsdense.train.learner import PromptLearner
from zsdense.train.losses import LossTerms, training_losses
from zsdense.train.recipe import TrainRecipe


def make_optimizer(learner: PromptLearner, recipe: TrainRecipe) -> torch.optim.Adam:
    """``Adam(prompt_learner.parameters(), lr, betas=(0.6, 0.999))``: eps 1e-8, no decay."""
    return torch.optim.Adam(
        learner.parameters(), lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps
    )


def forward_losses(
    learner: PromptLearner,
    clip,
    vb: VisionBatch,
    masks_bhw: torch.Tensor,
    labels_b: torch.Tensor,
    recipe: TrainRecipe,
    *,
    keep_maps: bool = False,
) -> LossTerms:
    """Prompts conditioned on each image's global embedding -> text pairs -> every loss term.
    ``extra`` also holds the text features (normalised and raw)."""
    text, raw = learner.text_features(clip, vb.global_embed, deep_fp16=recipe.deep_fp16)
    terms = training_losses(
        vb.maps,
        vb.counts,
        vb.global_embed,
        text,
        masks_bhw,
        labels_b,
        grid=vb.grid,
        recipe=recipe,
        keep_maps=keep_maps,
    )
    terms.extra.update(text_features=text, text_features_unnormalized=raw)
    return terms


def train_step(
    learner: PromptLearner,
    optimizer: torch.optim.Optimizer,
    clip,
    vb: VisionBatch,
    masks_bhw: torch.Tensor,
    labels_b: torch.Tensor,
    recipe: TrainRecipe,
    *,
    micro_batch: int | None = None,
    keep: bool = False,
) -> tuple[dict[str, float], LossTerms | None]:
    """Forward, backward, Adam step. Returns the batch's scalar loss terms and, when the batch
    ran in one piece, the full :class:`LossTerms` (gradients stay on the parameters).

    ``micro_batch``: run the text tower and the losses on at most this many images at a time
    and add the gradients (each piece's loss weighted by its share of the batch: every term is
    a mean over images, so the sum equals the full batch's gradient up to float rounding). The
    frozen features are computed for the whole batch first, so Crane+'s batch-mean D-Attn keeps
    its meaning.
    """
    b = int(labels_b.shape[0])
    mb = b if not micro_batch or micro_batch >= b else int(micro_batch)
    optimizer.zero_grad(set_to_none=True)
    if mb == b:
        terms = forward_losses(learner, clip, vb, masks_bhw, labels_b, recipe, keep_maps=keep)
        terms.total.backward()
        optimizer.step()
        return terms.scalars(), terms
    sums = {"total": 0.0, "focal": 0.0, "dice": 0.0, "image_ce": 0.0}
    for s in range(0, b, mb):
        sl = slice(s, min(b, s + mb))
        share = (sl.stop - sl.start) / b
        t = forward_losses(learner, clip, vb.select(sl), masks_bhw[sl], labels_b[sl], recipe)
        (t.total * share).backward()
        for k, v in t.scalars().items():
            sums[k] += v * share
    optimizer.step()
    return sums, None


__all__ = ["forward_losses", "make_optimizer", "train_step"]
