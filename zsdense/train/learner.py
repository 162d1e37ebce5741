"""Crane's trainable prompt learner (``models/prompt_ensemble.py`` as run), over our frozen CLIP.

Per state (normal = ``pos``, abnormal = ``neg``, Crane's names) the 77 input embeddings are
``[SOT, ctx_1..ctx_n, template tokens ("object ." / "damaged object ."), EOT, padding]``; the
``n_ctx`` context vectors and ``depth - 1`` deep prompts of ``t_n_ctx`` tokens (which replace
positions 1..t_n_ctx at the input of text blocks 2..depth) are the only trainable numbers.

At training time (``train_with_img_cls_type='pad_suffix'``) the L2-normalised global image
embedding ``g_b`` is inserted as one more token right after the context vectors, the suffix
loses its last padding row and the end-of-text index moves one position right; that gives one
text pair per image, (B, 2, D). At test time there is no image token: the plain
``[prefix, ctx, suffix]`` sequences give one shared pair (``LearnedPrompts``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsdense.errors import ConfigError
from zsdense.text.anomaly_prompts import (
    LearnedPrompts,
    encode_prompt_embeddings,
    learned_prompts_from_state_dict,
)
from zsdense.train.recipe import TrainRecipe

STATES = ("pos", "neg")  # Crane's names: pos = normal, neg = abnormal (logit order)


def text_blocks(clip) -> int:
    """Number of blocks of ``clip``'s text transformer."""
    return len(clip.model.transformer.resblocks)


def effective_depth(recipe: TrainRecipe, clip) -> int:
    """``recipe.depth`` capped at the text tower's block count (the tiny towers have few)."""
    return max(1, min(int(recipe.depth), text_blocks(clip)))


def prompt_texts(recipe: TrainRecipe) -> tuple[str, str]:
    """The two templates as Crane writes them: ``"X X … X object."`` / ``"… damaged object."``."""
    xs = " ".join(["X"] * recipe.n_ctx)
    return f"{xs} {recipe.normal_template}", f"{xs} {recipe.abnormal_template}"


class PromptLearner(nn.Module):
    """ctx_pos, ctx_neg (1, 1, n_ctx, C) and compound_prompts_text.i (t_n_ctx, C), plus the six
    fixed buffers of Crane's checkpoint (same names, shapes, dtypes and key order)."""

    def __init__(
        self,
        clip,
        recipe: TrainRecipe,
        *,
        depth: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        model = clip.model
        width = int(model.ln_final.weight.shape[0])
        ctx_len = int(model.positional_embedding.shape[0])
        if clip.embed_dim != width:
            raise ConfigError(
                f"the image embedding ({clip.embed_dim}) must have the text width ({width}) to "
                f"be inserted as a prompt token (Crane trains on ViT-L-14-336: 768 = 768)"
            )
        self.n_ctx = int(recipe.n_ctx)
        self.t_n_ctx = int(recipe.t_n_ctx)
        self.depth = effective_depth(recipe, clip) if depth is None else int(depth)
        if self.depth > text_blocks(clip):
            raise ConfigError(f"depth {self.depth} exceeds the {text_blocks(clip)} text blocks")
        if self.depth > 1 and self.t_n_ctx > self.n_ctx:
            raise ConfigError("t_n_ctx cannot exceed n_ctx")
        dev = clip.device
        std = float(recipe.init_std)

        def draw(*shape: int) -> torch.Tensor:
            t = torch.empty(*shape, dtype=torch.float32)
            return nn.init.normal_(t, std=std, generator=generator)

        deep = [draw(self.t_n_ctx, width) for _ in range(self.depth - 1)]  # drawn first (Crane)
        self.ctx_pos = nn.Parameter(draw(1, 1, self.n_ctx, width).to(dev))
        self.ctx_neg = nn.Parameter(draw(1, 1, self.n_ctx, width).to(dev))
        texts = prompt_texts(recipe)
        tok = clip.tokenize(list(texts)).to(dev)  # (2, 77)
        if tok.shape[1] != ctx_len:
            raise ConfigError(f"tokenizer context {tok.shape[1]} != text context {ctx_len}")
        with torch.no_grad():
            emb = model.token_embedding(tok).float()  # (2, 77, C)
        for j, tag in enumerate(STATES):
            self.register_buffer(f"tokenized_prompts_{tag}", tok[j].reshape(1, 1, -1).int())
        for j, tag in enumerate(STATES):
            self.register_buffer(f"token_prefix_{tag}", emb[j, :1].reshape(1, 1, 1, width))
            self.register_buffer(
                f"token_suffix_{tag}", emb[j, 1 + self.n_ctx :].reshape(1, 1, -1, width)
            )
        self.compound_prompts_text = nn.ParameterList([nn.Parameter(d.to(dev)) for d in deep])

    # ---- views -----------------------------------------------------------------------------
    @property
    def deep(self) -> list[torch.Tensor]:
        return list(self.compound_prompts_text)

    def trainable_names(self) -> list[str]:
        """Optimizer order: ctx_pos, ctx_neg, compound_prompts_text.0, ..."""
        return [n for n, _ in self.named_parameters()]

    def unconditioned(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Test-time prompts (2, 77, C) ``[prefix, ctx, suffix]`` and their token ids (2, 77)."""
        rows, toks = [], []
        for tag in STATES:
            ctx = getattr(self, f"ctx_{tag}")[0, 0]
            pre = getattr(self, f"token_prefix_{tag}")[0, 0]
            suf = getattr(self, f"token_suffix_{tag}")[0, 0]
            rows.append(torch.cat([pre, ctx, suf], dim=0))
            toks.append(getattr(self, f"tokenized_prompts_{tag}")[0, 0])
        return torch.stack(rows), torch.stack(toks)

    def conditioned(
        self, img_emb_bd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training prompts with the image token (``pad_suffix``): prompts (2, B, 77, C),
        token ids (2, B, 77) with the id after the image slot duplicated, eot (2, B)."""
        b = img_emb_bd.shape[0]
        g = img_emb_bd.to(self.ctx_pos.dtype).unsqueeze(1)  # (B, 1, C)
        prompts, toks = [], []
        cut = 1 + self.n_ctx + 1  # Crane duplicates the id at this position
        for tag in STATES:
            ctx = getattr(self, f"ctx_{tag}")[0]  # (1, n, C)
            pre = getattr(self, f"token_prefix_{tag}")[0]  # (1, 1, C)
            suf = getattr(self, f"token_suffix_{tag}")[0, :, :-1]  # (1, 76-n, C)
            x = torch.cat(
                [pre.expand(b, -1, -1), ctx.expand(b, -1, -1), g, suf.expand(b, -1, -1)], dim=1
            )
            prompts.append(x)
            t = getattr(self, f"tokenized_prompts_{tag}")[0, 0]
            t = torch.cat([t[: cut + 1], t[cut:-1]])
            toks.append(t.unsqueeze(0).expand(b, -1))
        tok = torch.stack(toks)  # (2, B, 77)
        return torch.stack(prompts), tok, tok.argmax(dim=-1)

    # ---- text features ---------------------------------------------------------------------
    def text_features(
        self, clip, img_emb_bd: torch.Tensor, *, deep_fp16: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image text pairs: (normalised (B, 2, D), unnormalised (B, 2, D)); one text-tower
        pass per state over the B sequences, as Crane's ``encode_text_learn``."""
        prompts, _, eot = self.conditioned(img_emb_bd)
        outs = [
            encode_prompt_embeddings(clip, prompts[s], eot[s], self.deep, deep_fp16=deep_fp16)
            for s in range(2)
        ]
        raw = torch.stack(outs, dim=1)  # (B, 2, D)
        return F.normalize(raw, dim=-1), raw

    def to_learned_prompts(self, source: str = "") -> LearnedPrompts:
        """The test-time view (no image token), as the anomaly command uses a checkpoint."""
        sd = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        return learned_prompts_from_state_dict(sd, source=source)


__all__ = ["PromptLearner", "STATES", "effective_depth", "prompt_texts", "text_blocks"]
