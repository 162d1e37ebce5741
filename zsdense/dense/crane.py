"""Crane's training-free dense CLIP features: the E-Attn dual path and DINOv2-guided D-Attn.

E-Attn (``specs/anomaly.md``): from a start block on, two streams run side by side. The original
stream ``o`` is CLIP unchanged; the refined stream ``r`` starts equal to the start block's input
and, in every later block, adds ``out_proj(A·v)`` where q, k, v come from the block's
in-projection of ``LN1(o)`` and ``A`` is a sum of self-correlation softmaxes (``qq+kk+vv``...),
with no MLP. Dense tokens = ``l2n(ln_post(r) @ proj)``; the global embedding = the original
stream's class token after the last block (identical to plain CLIP).

Crane "as run" (what produced the published numbers, fixtures README §6 D1): every requested
layer aliases the refined stream after the last block, so the preset uses that one map
(``layers=None``). ``layers=(6, 12, 18, 24)`` gives the per-layer variant the paper describes.

D-Attn (Crane+): ``A_D = softmax(γ·(S − β·mean(S)))`` with entries < 0 set to −∞, S the cosine
similarity of DINOv2 patch features; the same ``A_D`` serves every head of the last block and is
applied to its values (as run: values from ``LN1(o_mid)``, ``o_mid = o_in + Attn(LN1(o_in))``,
§6 D2) followed by out_proj, with no residual and no MLP.

Everything here is a function over a :class:`~zsdense.models.clip.ClipModel` and its blocks'
weights; nothing is patched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from zsdense.dense.attention import (
    CORRELATION_TYPES,
    MATERIALISE_DTYPES,
    dual_attention_heads,
    merge_heads,
    out_proj,
    qkv_heads,
    qkv_heads_packed,
    vfm_guided_attention,
)
from zsdense.errors import ConfigError

REFERENCE_LAYERS = 24  # the presets' block numbers are written for 24-block ViT-L/14


def scale_block(block_24: int, num_layers: int) -> int:
    """Map a 1-based block number of a 24-block model onto ``num_layers`` blocks.

    Same relative depth, rounded half up, clamped to 1..num_layers: 6 -> 6 for 24 blocks, 6 -> 2
    for the tiny 6-block model, 24 -> num_layers always.
    """
    if num_layers == REFERENCE_LAYERS:
        return int(block_24)
    pos = int(block_24) * num_layers / REFERENCE_LAYERS
    return max(1, min(num_layers, int(pos + 0.5)))


def scale_layers(layers_24: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """:func:`scale_block` over a list, duplicates removed, order kept."""
    out: list[int] = []
    for layer in layers_24:
        s = scale_block(layer, num_layers)
        if s not in out:
            out.append(s)
    return tuple(out)


@dataclass
class DualPathOutput:
    """What the E-Attn dual path produces for a batch (shapes in comments).

    ``dense``: one entry per map: (B, N, D) L2-normalised tokens (class token dropped);
    ``dense_raw``: the same before L2 normalisation; ``layers``: the 1-based block each map was
    taken after; ``global_embed`` (B, D) L2-normalised; ``global_raw`` (B, D).
    ``last_in`` / ``last_mid``: original-stream input of the last block and ``o_in + Attn`` (both
    (B, 1+N, C)), kept for D-Attn. ``refined`` / ``original``: per-block streams when
    ``keep_streams`` (tests).
    """

    dense: list[torch.Tensor]
    dense_raw: list[torch.Tensor]
    layers: list[int]
    global_embed: torch.Tensor
    global_raw: torch.Tensor
    grid: tuple[int, int]
    last_in: torch.Tensor | None = None
    last_mid: torch.Tensor | None = None
    refined: dict[int, torch.Tensor] = field(default_factory=dict)
    original: dict[int, torch.Tensor] = field(default_factory=dict)


def _layer_scale(module: torch.nn.Module, name: str):
    ls = getattr(module, name, None)
    return ls if ls is not None else (lambda t: t)


def eattn_dual_path(
    clip,
    x_norm_bchw: torch.Tensor,
    *,
    start_block: int,
    attn_type: str = "qq+kk+vv",
    layers: Sequence[int] | None = None,
    pos_mode: str = "bilinear",
    keep_last_inputs: bool = False,
    keep_streams: bool = False,
) -> DualPathOutput:
    """Run CLIP's vision tower with Crane's E-Attn dual path from ``start_block`` (1-based).

    ``layers=None``: as run (one map: the refined stream after the last block). Otherwise the
    refined stream after each listed block (each >= ``start_block``). The original stream is
    computed from the same q, k, v as the correlation attention (one in-projection per block).
    """
    if attn_type not in CORRELATION_TYPES:
        raise ConfigError(
            f"unknown attention type {attn_type!r}; choose one of {', '.join(CORRELATION_TYPES)}"
        )
    n_layers = clip.num_layers
    if not 1 <= start_block <= n_layers:
        raise ConfigError(f"E-Attn start block {start_block} outside 1..{n_layers}")
    want = [n_layers] if layers is None else [int(i) for i in layers]
    bad = [i for i in want if not start_block <= i <= n_layers]
    if bad:
        raise ConfigError(
            f"E-Attn layers {bad} outside {start_block}..{n_layers} (the refined stream exists "
            f"only from the start block on)"
        )
    o = clip.embed(x_norm_bchw, pos_mode)  # (B, 1+N[+R], C): test-time registers at the end
    gh = x_norm_bchw.shape[-2] // clip.patch_size
    gw = x_norm_bchw.shape[-1] // clip.patch_size
    n_tok = gh * gw
    o = clip.run_blocks(o, 0, start_block - 1)
    r = o  # the refined stream starts as the start block's input (never modified in place)
    refined_at: dict[int, torch.Tensor] = {}
    out = DualPathOutput([], [], [], o, o, (gh, gw))
    blocks = clip.blocks
    # the materialised attention (bf16 on the CPU) wants contiguous heads: one copy per block
    materialised = o.device.type == "cpu" and o.dtype in MATERIALISE_DTYPES
    heads = qkv_heads_packed if materialised else qkv_heads
    # Reduced precision on the CPU, the refined stream read after the last block only (as run):
    # it is the start block's input plus every block's out_proj(A·v), so the blocks' merged
    # heads are kept side by side and projected by one product with the blocks' projections
    # side by side (ClipModel.stacked_out_proj): one bf16 rounding instead of one per block
    # (closer to float32), and 0.85x the time of the per-block products and sums for ViT-B/16
    # at 224 (197 tokens, 10 blocks, one image; 0.92x for four), 1.4 ms of the 120 ms forward
    # (median of 80 paired runs, AMD EPYC). float32 keeps the per-block sums (its bits).
    stacked = None
    if materialised and want == [n_layers] and not keep_streams:
        stacked = o.new_empty(o.shape[:-1] + (o.shape[-1] * (n_layers - start_block + 1),))
    for i in range(start_block - 1, n_layers):
        bw = clip.block(i)
        mod = blocks[i]
        last = i == n_layers - 1
        x_ln = bw.ln_1(o)
        q, k, v = heads(bw, x_ln)  # (B, H, 1+N, d)
        # the last block's original stream is only read at its class token (unless kept):
        # the materialised (bf16 CPU) attention then computes that row alone
        cls_only = last and not keep_last_inputs and not keep_streams
        plain, corr = dual_attention_heads(
            q, k, v, attn_type, plain_rows=1 if cls_only else None
        )  # each (B, H, 1+N, d); plain (B, H, 1, d) where only the class row was computed
        attn_o = out_proj(bw, merge_heads(plain))
        if stacked is None:
            r = r + out_proj(bw, merge_heads(corr))
        else:  # this block's merged heads in its place: (B, H, T, d) -> (B, T, H·d)
            width, j = o.shape[-1], i - (start_block - 1)
            place = stacked[..., j * width : (j + 1) * width]
            place.unflatten(-1, (corr.shape[1], corr.shape[3])).copy_(corr.transpose(1, 2))
        rows = plain.shape[2]
        del plain, corr
        o_mid = (o if rows == o.shape[1] else o[:, :rows]) + _layer_scale(mod, "ls_1")(attn_o)
        if last and keep_last_inputs:
            out.last_in, out.last_mid = clip.strip_registers(o), clip.strip_registers(o_mid)
        if last and not keep_streams:
            # Only the class token of the final original stream is used (global embedding).
            c = o_mid[:, :1]
            o = c + _layer_scale(mod, "ls_2")(bw.mlp(bw.ln_2(c)))
        else:
            o = o_mid + _layer_scale(mod, "ls_2")(bw.mlp(bw.ln_2(o_mid)))
        if stacked is not None and last:
            weight, bias = clip.stacked_out_proj(start_block - 1, n_layers)
            r = r + F.linear(stacked, weight, bias)
            stacked = None
        if (i + 1) in want:
            refined_at[i + 1] = r
        if keep_streams:
            out.refined[i + 1] = clip.strip_registers(r)
            out.original[i + 1] = clip.strip_registers(o)
    for layer in want:
        raw = clip.head(clip.strip_registers(refined_at[layer])[:, 1:])  # (B, N, D)
        assert raw.shape[1] == n_tok
        out.dense_raw.append(raw)
        out.dense.append(F.normalize(raw, dim=-1))
        out.layers.append(layer)
    out.global_raw = clip.head(o[:, 0])
    out.global_embed = F.normalize(out.global_raw, dim=-1)
    return out


# ---- D-Attn ------------------------------------------------------------------------------


def dattn_weights(
    dino_feats_bchw: torch.Tensor, beta: float = 1.2, gamma: float = 3.0, mean: str = "image"
) -> torch.Tensor:
    """D-Attn weights A_D (B, N, N) from DINO patch features (B, C, H, W); rows sum to 1.

    ``mean="batch"``: one scalar mean over the whole (B, N, N) similarity tensor (Crane as run;
    an image's result then depends on its batch); ``"image"``: one mean per image (default).
    The same attention as ProxyCLIP's: :func:`zsdense.dense.attention.vfm_guided_attention`.
    """
    if mean not in ("image", "batch"):
        raise ConfigError(f"--dattn-mean must be 'image' or 'batch', not {mean!r}")
    return vfm_guided_attention(dino_feats_bchw, beta, gamma, mean=mean)


def dattn_raw(
    clip,
    block_index: int,
    x_bnc: torch.Tensor,
    weights_bnn: torch.Tensor,
    clip_grid: tuple[int, int],
    dino_grid: tuple[int, int],
) -> torch.Tensor:
    """``out_proj(A_D · v)`` (B, Nd, C) for block ``block_index`` (0-based) and its input tokens.

    ``x_bnc`` (B, 1+N, C) is the (un-normalised) stream whose ``ln_1`` gives the values; the class
    token is dropped; v is resized bilinearly to the DINO grid when the grids differ.
    """
    bw = clip.block(block_index)
    _, _, v = qkv_heads(bw, bw.ln_1(x_bnc))  # (B, H, 1+N, d)
    v = v[:, :, 1:]
    b, h, n, d = v.shape
    if tuple(clip_grid) != tuple(dino_grid):
        g = v.reshape(b * h, clip_grid[0], clip_grid[1], d).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=tuple(dino_grid), mode="bilinear", align_corners=False)
        v = g.permute(0, 2, 3, 1).reshape(b, h, -1, d)
    y = weights_bnn.to(v.dtype).unsqueeze(1) @ v  # (B, H, Nd, d): one A_D for every head
    return out_proj(bw, merge_heads(y))


def dino_input_from_clip(x_clip_norm: torch.Tensor, clip_mean, clip_std) -> torch.Tensor:
    """What Crane feeds DINOv2: undo CLIP normalisation, clamp to [0, 1] (ImageNet norm after)."""
    mean = torch.tensor(clip_mean, dtype=x_clip_norm.dtype, device=x_clip_norm.device)
    std = torch.tensor(clip_std, dtype=x_clip_norm.dtype, device=x_clip_norm.device)
    return (x_clip_norm * std[:, None, None] + mean[:, None, None]).clamp(0.0, 1.0)


@dataclass
class CraneFeatures:
    """Dense token maps (each (B, N, D), L2-normalised) and the global embedding (B, D)."""

    maps: list[torch.Tensor]
    names: list[str]
    global_embed: torch.Tensor
    grid: tuple[int, int]


def crane_features(
    clip,
    x_norm_bchw: torch.Tensor,
    *,
    start_block: int,
    attn_type: str = "qq+kk+vv",
    layers: Sequence[int] | None = None,
    dino_feats_bchw: torch.Tensor | None = None,
    dattn_beta: float = 1.2,
    dattn_gamma: float = 3.0,
    dattn_mean: str = "image",
    dattn_value_source: str = "mid",
) -> CraneFeatures:
    """Crane (``dino_feats_bchw=None``) or Crane+ token maps for a CLIP-normalised batch.

    Crane+: maps = [D-Attn tokens, E-Attn tokens] of the last block, in that order (as run).
    ``layers`` applies to the E-Attn maps (None = as run).
    """
    use_d = dino_feats_bchw is not None
    dp = eattn_dual_path(
        clip,
        x_norm_bchw,
        start_block=start_block,
        attn_type=attn_type,
        layers=layers,
        keep_last_inputs=use_d,
    )
    maps: list[torch.Tensor] = []
    names: list[str] = []
    if use_d:
        if dattn_value_source == "mid":
            src = dp.last_mid
        elif dattn_value_source == "in":
            src = dp.last_in
        else:
            raise ConfigError(
                f"D-Attn value source must be 'mid' or 'in', not {dattn_value_source!r}"
            )
        a = dattn_weights(dino_feats_bchw, dattn_beta, dattn_gamma, dattn_mean)
        raw = dattn_raw(
            clip, clip.num_layers - 1, src, a, dp.grid, tuple(dino_feats_bchw.shape[-2:])
        )
        maps.append(F.normalize(clip.head(raw), dim=-1))
        names.append("dattn")
        dgrid = tuple(dino_feats_bchw.shape[-2:])
        for tok, layer in zip(dp.dense, dp.layers):
            if dgrid != dp.grid:  # E-Attn tokens resized to the D-Attn grid (Crane.py)
                b, n, d = tok.shape
                g = tok.transpose(1, 2).reshape(b, d, dp.grid[0], dp.grid[1])
                g = F.interpolate(g, size=dgrid, mode="bilinear", align_corners=False)
                tok = g.flatten(2).transpose(1, 2)
            maps.append(tok)
            names.append(f"eattn{layer}")
        grid = dgrid
    else:
        maps.extend(dp.dense)
        names.extend(f"eattn{layer}" for layer in dp.layers)
        grid = dp.grid
    return CraneFeatures(maps=maps, names=names, global_embed=dp.global_embed, grid=grid)


# ---- maps and image score ------------------------------------------------------------------


@dataclass
class CraneMaps:
    """Every step from logits to the anomaly map and the image score (fixture names).

    Shapes: ``logits`` (L, B, N, 2); ``score_map`` (B, S, S, 2) (None when only the abnormal
    channel was made); ``anomaly_map`` (B, S, S); ``sbp_*`` score-based pooling;
    ``anomaly_score`` (B,). Channel 0 normal, 1 abnormal.
    """

    logits: torch.Tensor
    score_map: torch.Tensor | None
    anomaly_map: torch.Tensor
    sbp_mean_tokens: torch.Tensor
    sbp_mean_logits: torch.Tensor
    sbp_weights: torch.Tensor
    sbp_clustered: torch.Tensor
    image_feature_fused: torch.Tensor
    image_logits: torch.Tensor
    image_probs: torch.Tensor
    anomaly_score: torch.Tensor
    steps: dict = field(default_factory=dict)


def upsample_grid(values_bnk: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]):
    """(B, N, K) per-patch values -> (B, H, W, K), bilinear, align_corners=False.

    The small grid is made contiguous (B, K, h, w) first: interpolated from the channels-last
    view of the tokens, torch took 4-7x as long for K = 2 (1.2-1.8 against 0.3-0.6 ms for four
    224x224 maps). For K <= 3 torch's CPU bilinear kernel is chosen by the channel count and the
    output size, not the layout (its vectorised channels-last kernel is for K > 3), so the
    values are the same (and were in every shape and CPU capability tried)."""
    b, n, k = values_bnk.shape
    g = values_bnk.reshape(b, grid[0], grid[1], k).permute(0, 3, 1, 2).contiguous()
    g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
    return g.permute(0, 2, 3, 1)


def crane_maps(
    maps: Sequence[torch.Tensor],
    text_2d: torch.Tensor,
    global_embed: torch.Tensor,
    *,
    grid: tuple[int, int],
    size: tuple[int, int],
    soft_mean: bool = True,
    temperature: float = 0.07,
    alpha: float = 0.5,
    keep_steps: bool = False,
    abnormal_only: bool = False,
) -> CraneMaps:
    """Anomaly maps (at ``size``, before smoothing) and image scores from token maps.

    ``soft_mean=True``: softmax per map, upsample, average (crane); False: upsample the logits,
    average, softmax (crane+ industrial). Image score by score-based pooling: p̄ = mean of the
    (normalised) maps, w = softmax(mean logits)[abnormal] (always logits first), c = l2n(Σ w·p̄),
    f = l2n(α·c + (1−α)·global), score = softmax(f·Tᵀ/temperature)[abnormal].

    ``abnormal_only`` (the heads; ignored with ``keep_steps``): with ``soft_mean``, only the
    abnormal probabilities are upsampled and averaged, the normal channel being unused (half the
    work, the same ``anomaly_map``: every channel is interpolated and averaged on its own), and
    ``score_map`` is None.
    """
    tokens = torch.stack(list(maps), dim=0)  # (L, B, N, D)
    t = text_2d.to(tokens.dtype)
    logits = tokens @ t.t() / temperature  # (L, B, N, 2)
    steps: dict = {}
    L, B = logits.shape[:2]
    if soft_mean and abnormal_only and not keep_steps:
        probs = logits.softmax(dim=-1)[..., 1:]  # (L, B, N, 1)
        up = upsample_grid(probs.reshape(L * B, -1, 1), grid, size).reshape(L, B, *size)
        anomaly_map = up.mean(dim=0)
        score_map = None
    elif soft_mean:
        probs = logits.softmax(dim=-1)
        up = upsample_grid(probs.reshape(L * B, -1, 2), grid, size).reshape(L, B, *size, 2)
        score_map = up.mean(dim=0)
        if keep_steps:
            steps.update(layer_probs=probs, layer_probs_upsampled=up)
    else:
        up = upsample_grid(logits.reshape(L * B, -1, 2), grid, size).reshape(L, B, *size, 2)
        # (B, S, S, 2) laid out channel last, as the softmax over the channels always ran
        mean_logits = up.mean(dim=0).contiguous()
        score_map = mean_logits.softmax(dim=-1)
        if keep_steps:
            steps.update(layer_logits_upsampled=up, mean_logits_map=mean_logits)
    if score_map is not None:
        anomaly_map = score_map[..., 1]
    p_bar = tokens.mean(dim=0)  # (B, N, D), not re-normalised
    mean_logits_tok = logits.mean(dim=0)  # (B, N, 2)
    w = mean_logits_tok.softmax(dim=-1)[..., 1]  # (B, N)
    c = F.normalize((p_bar * w.unsqueeze(-1)).sum(dim=1), dim=-1)
    f = F.normalize(alpha * c + (1.0 - alpha) * global_embed.to(c.dtype), dim=-1)
    img_logits = f @ t.t() / temperature
    img_probs = img_logits.softmax(dim=-1)
    return CraneMaps(
        logits=logits,
        score_map=score_map,
        anomaly_map=anomaly_map,
        sbp_mean_tokens=p_bar,
        sbp_mean_logits=mean_logits_tok,
        sbp_weights=w,
        sbp_clustered=c,
        image_feature_fused=f,
        image_logits=img_logits,
        image_probs=img_probs,
        anomaly_score=img_probs[:, 1],
        steps=steps,
    )


__all__ = [
    "CraneFeatures",
    "CraneMaps",
    "DualPathOutput",
    "crane_features",
    "crane_maps",
    "dattn_raw",
    "dattn_weights",
    "dino_input_from_clip",
    "eattn_dual_path",
    "scale_block",
    "scale_layers",
]
