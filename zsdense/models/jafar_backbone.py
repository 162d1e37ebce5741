"""The features a JAFAR upsampler was trained on, from zsdense's own encoder wrappers.

JAFAR's backbone wrapper (timm ``forward_intermediates(x, 1, norm=True)``) gives the **last
block's output after the final norm, patch tokens only** (class token and registers dropped),
reshaped row-major to (B, D, H/p, W/p); the position embeddings of another grid are resized
with timm's ``resample_abs_pos_embed``: **bicubic, antialias=True, size=(H/p, W/p)**, class slot
kept, skipped at the native square grid. Image sides must be multiples of the patch size.

- DINOv2 (:class:`~zsdense.models.dinov2.DinoModel`): ``last_hidden_state`` is already after the
  final LayerNorm; transformers' own position-embedding resize (bicubic without antialias)
  differs from timm's by up to 1.06 on features of magnitude ~4, so the embeddings are built
  with the antialiased resize (the wrapper's ``hub`` path with offset 0 and antialias on, on a
  shallow copy: the shared model is not changed).
- CLIP (:class:`~zsdense.models.clip.ClipModel`, open_clip): ``ln_post`` applied to every token,
  class token dropped, **before** ``proj`` (open_clip's ``output_tokens``); open_clip never
  resizes its position embeddings, so it is done here the timm way.

These are not necessarily the dense features a preset scores with (MaskCLIP-style last blocks,
intermediate layers, ...): an upsampler is fed what it was trained on.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from zsdense.errors import ConfigError

__all__ = [
    "encoder_id",
    "encoder_kind",
    "encoder_patch_size",
    "encoder_width",
    "jafar_features",
    "registry_encoder_id",
    "resample_pos_embed",
]


def encoder_kind(encoder) -> str:
    """``"dinov2"`` or ``"clip"``; ConfigError for anything else."""
    from zsdense.models.clip import ClipModel
    from zsdense.models.dinov2 import DinoModel

    if isinstance(encoder, DinoModel):
        return "dinov2"
    if isinstance(encoder, ClipModel):
        return "clip"
    raise ConfigError(
        f"JAFAR works on zsdense's DINOv2 and CLIP encoders, not on {type(encoder).__name__}"
    )


def encoder_width(encoder) -> int:
    """Channels of the patch features (transformer width, before any projection)."""
    return int(encoder.width)


def encoder_patch_size(encoder) -> int:
    return int(encoder.patch_size)


def encoder_id(encoder) -> str:
    """What identifies the features an encoder gives (recorded by training, checked at load):
    ``dinov2:<registry name>`` / ``clip:<arch> (<checkpoint>)``, "(random weights)" marked."""
    if encoder_kind(encoder) == "dinov2":
        return f"dinov2:{encoder.name}" + (" (random weights)" if encoder.is_random else "")
    return f"clip:{encoder.base_model_id}"


def registry_encoder_id(name: str) -> str:
    """:func:`encoder_id` of the real-weights encoder a registry name loads (``dinov2-small``,
    ``clip-ViT-B-16-openai``), without loading it."""
    if name.startswith("dinov2"):
        return f"dinov2:{name}"
    if name.startswith("clip-"):
        arch = name[len("clip-") :].rsplit("-", 1)[0]
        return f"clip:{arch} ({name})"
    raise ConfigError(f"{name!r} is not a DINOv2 or CLIP registry name")


def resample_pos_embed(grid_pe: torch.Tensor, native: tuple[int, int], size: tuple[int, int]):
    """timm's resize of a (N, C) patch-position grid stored row-major at ``native``: bicubic,
    antialias, ``size=``, computed in float32, returned in the input dtype."""
    gh, gw = native
    c = grid_pe.shape[-1]
    g = grid_pe.float().reshape(1, gh, gw, c).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=size, mode="bicubic", align_corners=False, antialias=True)
    return g.permute(0, 2, 3, 1).reshape(size[0] * size[1], c).to(grid_pe.dtype)


def _check_sides(x: torch.Tensor, patch: int) -> tuple[int, int]:
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % patch or w % patch:
        raise ConfigError(
            f"JAFAR's backbone features need image sides that are multiples of the patch size "
            f"{patch}; got {h}x{w} (resize to {max(patch, h // patch * patch)}x"
            f"{max(patch, w // patch * patch)} or pad)"
        )
    return h // patch, w // patch


def _dinov2_features(dino, x: torch.Tensor) -> torch.Tensor:
    _check_sides(x, dino.patch_size)
    timm_like = dataclasses.replace(
        dino, pos_interp="hub", hub_interpolate_offset=0.0, hub_interpolate_antialias=True
    )
    return timm_like.patch_features(x, pos_interp="hub")


def _clip_features(clip, x: torch.Tensor) -> torch.Tensor:
    v = clip.model.visual
    gh, gw = _check_sides(x, clip.patch_size)
    dtype = v.conv1.weight.dtype
    t = v.conv1(x.to(clip.device, dtype))  # (B, C, gh, gw)
    b = t.shape[0]
    t = t.flatten(2).transpose(1, 2)
    cls = v.class_embedding.to(t.dtype).expand(b, 1, -1)
    t = torch.cat([cls, t], dim=1)
    pe = v.positional_embedding
    g = clip.native_grid
    if (gh, gw) != (g, g):
        pe = torch.cat([pe[:1], resample_pos_embed(pe[1:], (g, g), (gh, gw))], dim=0)
    # open_clip's order: + positions, patch_dropout (identity; test-time registers hook it), ln_pre
    t = v.ln_pre(v.patch_dropout(t + pe.to(t.dtype)))
    t = clip.strip_registers(clip.run_blocks(t))
    t = v.ln_post(t)[:, 1:]
    return t.transpose(1, 2).reshape(b, -1, gh, gw)


@torch.no_grad()
def jafar_features(encoder, x_norm: torch.Tensor) -> torch.Tensor:
    """Patch features (B, D, H/p, W/p) of a batch normalised with the encoder's mean/std, as the
    JAFAR backbone wrapper computes them (see the module docstring)."""
    if x_norm.dim() != 4 or x_norm.shape[1] != 3:
        raise ConfigError(f"expected an image batch (B, 3, H, W), got {tuple(x_norm.shape)}")
    if encoder_kind(encoder) == "dinov2":
        return _dinov2_features(encoder, x_norm)
    return _clip_features(encoder, x_norm)
