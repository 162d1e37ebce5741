"""Raw patch-token streams of the backbones MuSc's reference offers, computed as it computes them.

MuSc (Li et al., ICLR 2024; reference code xrli-U/MuSc) scores images with the tokens after a
few blocks of a frozen ViT. What the reference actually feeds its scorer differs from a natural
reading of the paper in ways that move the numbers (``shared/fixtures/musc/README.md`` §6.6):

- **CLIP** (OpenAI weights): the *raw residual stream* after the chosen 1-based blocks (no
  ``ln_post``, no projection). At an input size other than the checkpoint's own (518 ≠ 336) the
  reference rebuilds the model from its JSON config, which has no ``quick_gelu`` key, so the MLPs
  run the exact erf ``GELU`` although the weights were trained with QuickGELU (``act="as-run"``).
  The positional embedding is resized bicubically (``align_corners=False``, no antialias), the
  class slot kept. The image embedding for RsCIN is ``ln_post(class token) @ proj``, L2-normalised.
- **DINOv2** (torch.hub code): ``get_intermediate_layers(..., norm=True)``: the tokens after each
  chosen block *through the final LayerNorm*, class and register tokens dropped; the positional
  embedding resized with the hub's ``scale_factor = (g + 0.1) / G`` bicubic (which ``transformers``
  does not do); the image embedding is the final normed class token, *not* L2-normalised.
- The original **DINO** ViTs (``dino_vitbase8``...) are not available (no loader or registry entry
  for their checkpoints): asking for one is a :class:`~zsdense.errors.ConfigError`.

The functions take our model wrappers (``ClipModel``, ``DinoModel``) and never patch their
classes: the GELU variant of a CLIP block is computed from the block's own modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from zsdense.errors import ConfigError
from zsdense.models.registers import edit_activation

MUSC_ACTS = ("as-run", "gelu", "quick_gelu")

# the reference's backbone names -> our DINOv2 registry names (transformers checkpoints)
DINOV2_REFERENCE_NAMES = {
    "dinov2_vits14": "dinov2-small",
    "dinov2_vitb14": "dinov2-base",
    "dinov2_vitl14": "dinov2-large",
}
# the reference's original-DINO names: its configs offer them, we cannot build them
DINO_V1_NAMES = ("dino_vitbase8", "dino_vitbase16", "dino_deitsmall8_300ep", "dino_deitsmall16")


@dataclass
class BackboneStreams:
    """What MuSc takes from one batch of images.

    ``patches``: 1-based block -> (B, N, C) patch tokens (class/register tokens dropped), row-major
    over ``grid``; ``image_embed``: (B, D) the vectors RsCIN compares (as the reference forms them);
    ``info``: what ran (for result metadata).
    """

    patches: dict[int, torch.Tensor]
    image_embed: torch.Tensor
    grid: tuple[int, int]
    info: dict


def resolve_backbone(name: str) -> tuple[str, str | None]:
    """``("clip", None)`` or ``("dinov2", registry name)`` for a ``musc_backbone`` value.

    Accepts ``clip``, the reference's ``dinov2_vit{s,b,l}14`` and our registry names
    (``dinov2-base``, ``dinov2-reg-large``...). Original DINO names raise a ConfigError that says
    what is missing.
    """
    from zsdense.models.dinov2 import DINOV2_MODELS

    key = str(name).strip()
    if key.lower() == "clip":
        return "clip", None
    if key in DINOV2_REFERENCE_NAMES:
        return "dinov2", DINOV2_REFERENCE_NAMES[key]
    if key in DINOV2_MODELS:
        return "dinov2", key
    if key in DINO_V1_NAMES or key.startswith("dino_"):
        raise ConfigError(
            f"musc backbone {key!r} (original DINO, facebookresearch/dino) is not available: "
            "zsdense has no loader or weights-registry entry for DINO v1 checkpoints "
            "(dl.fbaipublicfiles.com/dino/...). Use 'clip' (the published setting) or a DINOv2 "
            f"backbone: {', '.join(DINOV2_REFERENCE_NAMES)} or {', '.join(DINOV2_MODELS)}"
        )
    raise ConfigError(
        f"unknown musc backbone {key!r}; choose 'clip', "
        f"{', '.join(DINOV2_REFERENCE_NAMES)} or one of {', '.join(DINOV2_MODELS)}"
    )


def _is_quick_gelu(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "QuickGELU"


def clip_activation(clip, image_size: int, act: str = "as-run") -> str:
    """The MLP activation MuSc's CLIP runs with: ``gelu`` or ``quick_gelu``.

    ``as-run``: the reference keeps the checkpoint's own model (QuickGELU for OpenAI weights) at
    the checkpoint's native input size and rebuilds it with erf GELU at any other size.
    """
    if act not in MUSC_ACTS:
        raise ConfigError(f"musc_act must be one of {', '.join(MUSC_ACTS)}, not {act!r}")
    if act != "as-run":
        return act
    if int(image_size) != clip.native_size:
        return "gelu"
    return "quick_gelu" if _is_quick_gelu(clip.blocks[0].mlp.gelu) else "gelu"


def clip_block_forward(block: torch.nn.Module, x_bnc: torch.Tensor, act: str) -> torch.Tensor:
    """One open_clip residual block on (B, N, C) with the MLP activation ``act``.

    When ``act`` is the block's own activation the block itself runs (bit-identical); otherwise
    the same modules are composed with the other activation (no patching of the class).
    """
    own = "quick_gelu" if _is_quick_gelu(block.mlp.gelu) else "gelu"
    if act == own:
        return block(x_bnc)
    x = x_bnc + block.ls_1(block.attention(q_x=block.ln_1(x_bnc)))
    h = block.mlp.c_fc(block.ln_2(x))
    h = F.gelu(h) if act == "gelu" else h * torch.sigmoid(1.702 * h)
    h = edit_activation(block.mlp.gelu, h)  # test-time registers' edit hooked on gelu, if any
    return x + block.ls_2(block.mlp.c_proj(h))


def clip_streams(
    clip,
    x_norm_bchw: torch.Tensor,
    layers: Sequence[int],
    *,
    act: str = "gelu",
    pos_mode: str = "bicubic",
) -> BackboneStreams:
    """Raw residual patch tokens after the 1-based ``layers`` and the L2-normalised image
    embedding, for CLIP-normalised images (B, 3, H, W)."""
    want = {int(i) for i in layers}
    if not want or min(want) < 1 or max(want) > clip.num_layers:
        raise ConfigError(f"musc layers {sorted(want)} outside 1..{clip.num_layers}")
    x = clip.embed(x_norm_bchw, pos_mode)
    grid = (x_norm_bchw.shape[-2] // clip.patch_size, x_norm_bchw.shape[-1] // clip.patch_size)
    out: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(clip.blocks, start=1):
        x = clip_block_forward(blk, x, act)
        if i in want:
            out[i] = clip.strip_registers(x)[:, 1:]
    embed = F.normalize(clip.head(x[:, 0]).float(), dim=-1)
    info = {"backbone": "clip", "arch": clip.arch, "act": act, "pos_resize": pos_mode}
    return BackboneStreams(patches=out, image_embed=embed, grid=grid, info=info)


def hub_pos_embed(pos_1nc: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """DINOv2 hub positional embedding for a grid: bicubic with ``scale_factor=(g+0.1)/G``, no
    antialias, in float32, class slot kept; returns (1, 1 + gh*gw, C) in the input dtype."""
    n = pos_1nc.shape[1] - 1
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    side = int(round(n**0.5))
    if n == gh * gw and gh == gw:
        return pos_1nc
    pe = pos_1nc.float()
    patch = pe[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(
        patch,
        scale_factor=((gh + 0.1) / side, (gw + 0.1) / side),
        mode="bicubic",
        antialias=False,
    )
    if tuple(patch.shape[-2:]) != (gh, gw):  # pragma: no cover - float rounding guard
        raise RuntimeError(f"positional-embedding resize gave {tuple(patch.shape[-2:])}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    return torch.cat([pe[:, :1], patch], dim=1).to(pos_1nc.dtype)


def dinov2_streams(dino, x_norm_bchw: torch.Tensor, layers: Sequence[int]) -> BackboneStreams:
    """DINOv2 tokens as MuSc's hub model gives them: per 1-based block in ``layers`` the output
    through the final LayerNorm (patches only), and the final normed class token (not
    L2-normalised) as the image embedding. ImageNet-normalised input (B, 3, H, W)."""
    m = dino.model
    n_layers = len(m.encoder.layer)
    want = {int(i) for i in layers}
    if not want or min(want) < 1 or max(want) > n_layers:
        raise ConfigError(f"musc layers {sorted(want)} outside 1..{n_layers}")
    emb = m.embeddings
    p = dino.patch_size
    dtype = next(m.parameters()).dtype
    x_in = x_norm_bchw.to(dino.device, dtype)
    grid = (x_in.shape[-2] // p, x_in.shape[-1] // p)
    x = emb.patch_embeddings(x_in)
    b = x.shape[0]
    x = torch.cat([emb.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
    x = x + hub_pos_embed(emb.position_embeddings, grid).to(x.dtype)
    regs = dino.num_registers
    if regs:
        x = torch.cat([x[:, :1], emb.register_tokens.expand(b, -1, -1).to(x.dtype), x[:, 1:]], 1)
    x = emb.dropout(x)  # identity at inference; test-time registers hook it
    out: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(m.encoder.layer, start=1):
        x = layer(x, None)
        if i in want:
            out[i] = dino.strip_registers(m.layernorm(x))[:, 1 + regs :]
    embed = m.layernorm(x)[:, 0].float()
    info = {"backbone": "dinov2", "arch": dino.name, "pos_resize": "bicubic+0.1 (hub)"}
    return BackboneStreams(patches=out, image_embed=embed, grid=grid, info=info)
