"""HybridGL, the built-in referring method: one mask for an image and a parsed expression.

:func:`run_hybridgl` follows the referring contract (:mod:`zsdense.tasks.referring`; declared
with its presets ``hybridgl`` and ``hybridgl+`` in ``zsdense/methods/hybridgl.py``). Pipeline per
(image, expression), ``specs/referring.md``:

1. **proposals**: SAM automatic masks (8×8 point grid, IoU/stability 0.7, small regions < 800 px
   removed; ``zsdense.models.sam_proposals``) decoded from the image's SAM state, so SAM's encoder
   runs at most once per image (shared with other heads through the ImageContext); none found →
   the whole image, returned as a fallback (``ReferResult.fallback``, NaN score);
2. **mask features**: hybrid global-local CLIP features (``zsdense.dense.maskfeatures``), cached
   per image, so later expressions on the same image only pay for text and scoring;
3. **text** (parsed by the task: spaCy or the rules): t = L2norm(½E(sentence) + ½E(p)), context
   n = mean E("a photo of " + chunk) (raw embeddings);
4. **scores**: P = softmax(100·cos(f, t)), Q = softmax(100·cos(f, n)); relation guidance R over
   the top-k1 candidates T against the top-k2 context masks U; coherence C of each mask with a
   dense CLIP heat map of p (min-max, direction ramp, /mean); F = 0.4·R + 0.6·C; argmax.

The scoring functions are plain functions over tensors so that the reference's 30 fixture cases
can be replayed exactly (``tests/test_hybridgl_fixtures.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.config import ReferPreset
from zsdense.errors import ConfigError
from zsdense.models.sam_proposals import (  # noqa: F401 - re-exported for the task's users
    Proposals,
    sam_proposals,
    whole_image_proposal,
)
from zsdense.tasks.referring import ReferResult

# the reference's relations, then the rule parser's sensible reading (zsdense.text.parse)
RELATIONS = ("none", "left", "right", "up", "down", "big", "small", "within")
RELATIONS += ("near", "behind", "front")
DIRECTIONS = ("none", "left", "right", "middle", "up", "down")
MIXES = ("reference", "scaled")


# ---- relation guidance ------------------------------------------------------------------------


@dataclass
class RelationScores:
    T: torch.Tensor  # (k1,) candidate indices, top-k1 by P
    U: torch.Tensor  # (|U|,) context mask indices
    weights: str  # "Q" (context chunks exist) or "P" (U = T)
    R_raw: torch.Tensor  # (k1,) float64
    R: torch.Tensor  # (k1,) float32 softmax(R_raw)


def _box_terms(boxes_xywh: torch.Tensor):
    b = boxes_xywh.to(torch.float64)
    x, y, w, h = b.unbind(-1)
    return x, y, w, h, x + w / 2.0, y + h / 2.0, w * h


def relation_guidance(
    P: torch.Tensor,
    Q: torch.Tensor | None,
    boxes_xywh: torch.Tensor,
    relation: str,
    *,
    k1: int = 3,
    k2: int = 6,
    guard: bool = False,
    within_self: bool = True,
) -> RelationScores:
    """Relation guidance R over T = top-k1 by P.

    U = top-k2 by Q with weights Q_b, or U = T with weights P_b when there is no context chunk
    (``Q is None``). R_raw_a = Σ_{b∈U} P_a·w_b·[cond(a, b)] with boxes in SAM's integer XYWH:
    left/right/up/down compare box centres, big/small box areas w·h, within = box
    intersection / box area of a; relation ``none`` adds P_a for every b (R_raw = |U|·P_a, as the
    reference). Not in the reference (the rule parser's ``sensible`` reading): near =
    exp(−gap(a, b) / s) for b ≠ a, with gap the distance between the two boxes (0 when they touch
    or overlap) and s = √(mean of their areas); behind = near·[centre_y(a) < centre_y(b)];
    front = near·[centre_y(a) > centre_y(b)]. R = softmax(R_raw). ``guard`` avoids a division by
    zero for zero-area boxes; ``within_self=False`` drops the pair b = a from "within" (the
    reference counts it, ratio 1).
    """
    if relation not in RELATIONS:
        raise ConfigError(f"unknown relation {relation!r}; choose one of {', '.join(RELATIONS)}")
    n = P.shape[0]
    T = torch.topk(P, min(k1, n)).indices
    if Q is None:
        U, wts, kind = T, P, "P"
    else:
        U, wts, kind = torch.topk(Q, min(k2, n)).indices, Q, "Q"
    x, y, w, h, cx, cy, area = _box_terms(boxes_xywh)
    a, b = T[:, None], U[None, :]  # (k1, 1), (1, |U|)
    if relation == "none":
        cond = torch.ones(a.shape[0], b.shape[1], dtype=torch.float64)
        terms = P.double()[a] * cond  # the reference ignores w_b here
    else:
        if relation == "left":
            cond = (cx[a] < cx[b]).double()
        elif relation == "right":
            cond = (cx[a] > cx[b]).double()
        elif relation == "up":
            cond = (cy[a] < cy[b]).double()
        elif relation == "down":
            cond = (cy[a] > cy[b]).double()
        elif relation == "big":
            cond = (area[a] > area[b]).double()
        elif relation == "small":
            cond = (area[a] < area[b]).double()
        elif relation in ("near", "behind", "front"):
            gx = (torch.maximum(x[a], x[b]) - torch.minimum(x[a] + w[a], x[b] + w[b])).clamp(min=0)
            gy = (torch.maximum(y[a], y[b]) - torch.minimum(y[a] + h[a], y[b] + h[b])).clamp(min=0)
            scale = torch.sqrt((area[a] + area[b]) / 2.0).clamp(min=1.0)
            cond = torch.exp(-torch.hypot(gx, gy) / scale) * (a != b).double()
            if relation == "behind":
                cond = cond * (cy[a] < cy[b]).double()
            elif relation == "front":
                cond = cond * (cy[a] > cy[b]).double()
        else:  # within
            iw = (torch.minimum(x[a] + w[a], x[b] + w[b]) - torch.maximum(x[a], x[b])).clamp(min=0)
            ih = (torch.minimum(y[a] + h[a], y[b] + h[b]) - torch.maximum(y[a], y[b])).clamp(min=0)
            den = area[a].clamp(min=1.0) if guard else area[a]
            cond = iw * ih / den
            if not within_self:
                cond = cond * (a != b).double()
        terms = P.double()[a] * wts.double()[b] * cond
    R_raw = terms.sum(dim=1)
    if guard:
        R_raw = torch.nan_to_num(R_raw, nan=0.0)
    R = torch.softmax(R_raw.float(), dim=0)
    return RelationScores(T=T, U=U, weights=kind, R_raw=R_raw, R=R)


# ---- heat map, ramps, coherence ---------------------------------------------------------------


def direction_ramp(
    direction: str, height: int, width: int, *, vertical: bool = False
) -> torch.Tensor:
    """The reference's direction weighting (H, W): left linspace(1→0) across the width, right
    (0→1), middle rising to two 1s at W//2−1, W//2 and falling to 0; up/down all ones in the
    reference, vertical ramps (up 1→0 down the height, down 0→1) when ``vertical``."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    H, W = int(height), int(width)
    if direction == "left":
        row = torch.linspace(1, 0, W)
    elif direction == "right":
        row = torch.linspace(0, 1, W)
    elif direction == "middle":
        row = torch.cat([torch.linspace(0, 1, W // 2), torch.linspace(1, 0, W - W // 2)])
    elif direction in ("up", "down") and vertical:
        col = torch.linspace(1, 0, H) if direction == "up" else torch.linspace(0, 1, H)
        return col[:, None].expand(H, W).clone()
    else:
        return torch.ones(H, W)
    return row[None, :].expand(H, W).clone()


def heat_map(
    heat_lowres: torch.Tensor,
    size_hw: tuple[int, int],
    direction: str = "none",
    *,
    vertical_ramps: bool = False,
    guard: bool = False,
) -> torch.Tensor:
    """A (H, W): the low-resolution heat map resized to the image (bilinear), min-max
    normalised, times the direction ramp, divided by its mean. ``guard``: a flat map (or a ramp
    that zeroes everything) gives ones instead of NaN."""
    h = heat_lowres.float().reshape(1, 1, *heat_lowres.shape[-2:])
    A = F.interpolate(h, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=True)[
        0, 0
    ]
    lo, hi = A.min(), A.max()
    if guard and not bool(hi > lo):
        A = torch.ones_like(A)
    else:
        A = (A - lo) / (hi - lo)
    A = A * direction_ramp(direction, A.shape[0], A.shape[1], vertical=vertical_ramps).to(A)
    m = A.mean()
    if guard and not bool(m > 0):
        return torch.ones_like(A)
    return A / m


def coherence(
    A: torch.Tensor, masks_nhw: torch.Tensor, beta: float, *, guard: bool = False
) -> torch.Tensor:
    """C_i = (2−β)·mean_{M_i}(A) − β·mean_{outside M_i}(A), (N,). ``guard``: an empty mask
    gives mean 0 inside; a mask covering the whole image uses the image mean (1 after the /mean
    normalisation) outside, instead of the reference's NaN."""
    m = masks_nhw.to(A.device).float().reshape(masks_nhw.shape[0], -1)  # (N, HW)
    a = A.reshape(-1)
    inside_n, outside_n = m.sum(1), (1 - m).sum(1)
    inside = (m * a).sum(1)
    outside = ((1 - m) * a).sum(1)
    if guard:
        mean_in = torch.where(
            inside_n > 0, inside / inside_n.clamp(min=1), torch.zeros_like(inside)
        )
        mean_out = torch.where(
            outside_n > 0, outside / outside_n.clamp(min=1), a.mean().expand_as(outside)
        )
    else:
        mean_in, mean_out = inside / inside_n, outside / outside_n
    return (2.0 - beta) * mean_in - beta * mean_out


def beta_for(relation: str, preset: ReferPreset) -> float:
    return {"big": preset.beta_big, "small": preset.beta_small}.get(relation, preset.beta_default)


def final_mix(
    rel: RelationScores, C_all: torch.Tensor, *, alpha: float = 0.6, mix: str = "reference"
) -> torch.Tensor:
    """F over T. ``reference``: (1−α)·R + α·C_T with R = softmax(R_raw) (nearly uniform for any
    real relation, so C dominates). ``scaled``: both as distributions over T: R̃ = R_raw/ΣR_raw
    (uniform when all zero), C̃ = softmax(C_T); F = (1−α)·R̃ + α·C̃."""
    C_T = C_all[rel.T].float()
    if mix == "reference":
        return (1 - alpha) * rel.R + alpha * C_T
    if mix != "scaled":
        raise ConfigError(f"unknown mix {mix!r}; choose one of {', '.join(MIXES)}")
    r = rel.R_raw.float().clamp(min=0)
    s = r.sum()
    r = r / s if bool(s > 0) else torch.full_like(r, 1.0 / max(1, r.numel()))
    c = torch.softmax(torch.nan_to_num(C_T, nan=-1e4), dim=0)
    return (1 - alpha) * r + alpha * c


@dataclass
class Scores:
    P: torch.Tensor
    Q: torch.Tensor | None
    relation: RelationScores
    A: torch.Tensor
    C: torch.Tensor
    beta: float
    F: torch.Tensor  # over relation.T
    pick: int  # index into the masks


def score_masks(
    S: torch.Tensor,
    S_ctx: torch.Tensor | None,
    boxes_xywh: torch.Tensor,
    masks_nhw: torch.Tensor,
    heat_lowres: torch.Tensor,
    relation: str,
    direction: str,
    preset: ReferPreset,
    *,
    k1: int | None = None,
    k2: int | None = None,
) -> Scores:
    """All of §4 from logits S (N,) (and S_ctx, None without context chunks)."""
    guard = preset.nan_guards
    P = torch.softmax(S.float(), dim=0)
    Q = None if S_ctx is None else torch.softmax(S_ctx.float(), dim=0)
    rel = relation_guidance(
        P,
        Q,
        boxes_xywh,
        relation,
        k1=preset.k1 if k1 is None else k1,
        k2=preset.k2 if k2 is None else k2,
        guard=guard,
        within_self=preset.within_self,
    )
    A = heat_map(
        heat_lowres,
        masks_nhw.shape[-2:],
        direction,
        vertical_ramps=preset.vertical_ramps,
        guard=guard,
    )
    beta = beta_for(relation, preset)
    C = coherence(A, masks_nhw, beta, guard=guard)
    Fv = final_mix(rel, C, alpha=preset.alpha, mix=preset.mix)
    if guard:
        Fv = torch.nan_to_num(Fv, nan=float("-inf"))
    pick = int(rel.T[int(torch.argmax(Fv))])
    return Scores(P=P, Q=Q, relation=rel, A=A, C=C, beta=beta, F=Fv, pick=pick)


# ---- proposals ----------------------------------------------------------------------------------
# SAM's automatic masks live next to the SAM wrapper (zsdense.models.sam_proposals); re-exported
# here because the task and its benchmarks use them under these names.

# ---- text ---------------------------------------------------------------------------------------


def encode_text_raw(clip, tokens_bl: torch.Tensor) -> torch.Tensor:
    """Raw text embeddings (B, D), running the text transformer only up to the longest
    end-of-text position of the batch.

    CLIP's text tower is causal and pools at the end-of-text token, so positions after it cannot
    change the result: cutting the 77-token context to the used length (about 10 for a referring
    expression) gives the same embedding several times faster. Models without a causal mask or
    argmax pooling use open_clip's ``encode_text`` unchanged.
    """
    m = clip.model
    mask = getattr(m, "attn_mask", None)
    if mask is None or getattr(m, "text_pool_type", "argmax") != "argmax":
        return m.encode_text(tokens_bl)
    eot = tokens_bl.argmax(dim=-1)  # (B,) the end-of-text token has the largest id
    L = int(eot.max()) + 1
    cast = m.transformer.get_cast_dtype()
    x = m.token_embedding(tokens_bl[:, :L]).to(cast)  # (B, L, W)
    x = x + m.positional_embedding[:L].to(cast)
    x = m.transformer(x, attn_mask=mask[:L, :L])
    x = m.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = m.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def raw_text_embeddings(rt, clip, texts: Sequence[str]) -> torch.Tensor:
    """Raw (unnormalised) CLIP text embeddings (T, D), cached in ``rt.text_cache`` (``rt`` may
    also be a plain dict used as the cache, or None)."""
    if isinstance(rt, dict):
        cache = rt
    else:
        cache = rt.text_cache if rt is not None else {}
    keys = [("refer-raw", clip.arch, t) for t in texts]
    missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in cache))
    if missing:
        with torch.no_grad():
            emb = encode_text_raw(clip, clip.tokenize(missing)).float()
        for t, e in zip(missing, emb):
            cache[("refer-raw", clip.arch, t)] = e
    if not texts:
        return torch.zeros(0, clip.embed_dim, device=clip.device)
    return torch.stack([cache[k] for k in keys])


@dataclass
class TextFeatures:
    t: torch.Tensor  # (D,) L2norm(½E(sentence) + ½E(p))
    n: torch.Tensor | None  # (D,) mean raw E("a photo of " + chunk); None without context
    p: torch.Tensor  # (D,) raw E(p), for the heat map


def text_features(rt, clip, expr) -> TextFeatures:
    e = raw_text_embeddings(rt, clip, [expr.sentence, expr.noun_phrase])
    t = F.normalize(0.5 * e[0] + 0.5 * e[1], dim=-1)
    n = None
    if expr.context:
        n = raw_text_embeddings(rt, clip, ["a photo of " + c for c in expr.context]).mean(0)
    return TextFeatures(t=t, n=n, p=e[1])


# ---- the task ----------------------------------------------------------------------------------


def _dense_heat_features(ctx, clip, preset: ReferPreset) -> torch.Tensor:
    """Dense CLIP features of the whole image (D, gh, gw), L2-normalised, cached per image."""
    from zsdense.dense.lastblock import dense_clip_features
    from zsdense.models.clip import preprocess_images
    from zsdense.tasks.common import exact_inputs

    size = clip.native_size if preset.heat_size is None else int(preset.heat_size)
    key = ("clip-dense", clip.arch, (size, size), preset.heat_variant, "whole-image")

    def compute() -> torch.Tensor:
        x = preprocess_images(
            [ctx.image], size=(size, size), device=clip.device, exact=exact_inputs(clip)
        )
        return dense_clip_features(clip, clip.normalize(x), preset.heat_variant)[0]

    return ctx.get(key, compute)


def _proposal_key(sam, preset: ReferPreset, n_side: int) -> tuple:
    return (
        "refer-proposals",
        sam.arch,
        n_side,
        preset.pred_iou_thresh,
        preset.stability_score_thresh,
        preset.stability_score_offset,
        preset.box_nms_thresh,
        preset.min_mask_region_area,
        preset.proposal_stability,
        preset.proposal_decoder,
    )


def _sync(device) -> None:
    if getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def refine_with_sam(sam, state, mask: np.ndarray, box_xywh: Sequence[int], A: torch.Tensor):
    """One SAM prediction from the chosen mask's box plus the heat-map peak inside it.

    Returns (mask (H, W) bool, predicted IoU)."""
    pred = sam.predictor_for(state)
    x, y, w, h = (int(v) for v in box_xywh)
    inside = torch.as_tensor(mask, dtype=torch.bool)
    a = torch.where(inside, A.cpu(), torch.full_like(A.cpu(), float("-inf")))
    iy, ix = divmod(int(torch.argmax(a)), A.shape[1])
    masks, ious, _ = pred.predict(
        point_coords=np.array([[ix, iy]], dtype=np.float32),
        point_labels=np.array([1]),
        box=np.array([x, y, x + w, y + h], dtype=np.float32),
        multimask_output=False,
    )
    return masks[0].astype(bool), float(ious[0])


def _image_stage(rt, ctx, cfg: ReferPreset, n_side: int, timing: dict):
    """SAM state, proposals and normalised mask features of one image (cached in ``ctx``)."""
    from zsdense.dense.maskfeatures import blur_image_u8, mask_features

    clip = rt.clip(cfg.clip_arch)
    sam = rt.sam(cfg.sam_arch)
    t0 = time.perf_counter()
    state = ctx.sam_state(sam)
    _sync(rt.device)
    timing["sam_encoder"] = time.perf_counter() - t0

    pkey = _proposal_key(sam, cfg, n_side)
    t0 = time.perf_counter()
    props: Proposals = ctx.get(
        pkey,
        lambda: sam_proposals(
            sam,
            state,
            cfg,
            points_per_side=n_side,
            stability=cfg.proposal_stability,
            decoder=cfg.proposal_decoder,
        ),
    )
    _sync(rt.device)
    timing["sam_decoder"] = time.perf_counter() - t0

    def compute_features() -> torch.Tensor:
        blur = ctx.get(("blur15", "u8"), lambda: blur_image_u8(ctx.image_u8))
        f = mask_features(
            clip,
            ctx.image_u8,
            props.masks,
            size=cfg.view_size,
            mode=cfg.fusion,
            fusion_blocks=cfg.fusion_blocks,
            grid_antialias=cfg.grid_antialias,
            batch_size=cfg.feature_batch,
            blurred_u8_hwc=blur,
        )
        return F.normalize(f.float(), dim=-1)

    fkey = (
        "refer-maskfeat",
        clip.arch,
        pkey,
        cfg.view_size,
        cfg.fusion,
        cfg.fusion_blocks,
        cfg.grid_antialias,
    )
    t0 = time.perf_counter()
    feats = ctx.get(fkey, compute_features)  # (N, D) normalised
    _sync(rt.device)
    timing["clip_views"] = time.perf_counter() - t0
    return clip, sam, state, props, feats


def run_hybridgl(rt, ctx, expr, cfg: ReferPreset) -> ReferResult:
    """HybridGL on one image context and one parsed expression (the referring contract)."""
    n_side = cfg.tiny_points_per_side if getattr(rt, "tiny", False) else cfg.points_per_side
    timing = {"sam_encoder": 0.0, "sam_decoder": 0.0, "clip_views": 0.0, "heat": 0.0, "text": 0.0}
    rt.clip(cfg.clip_arch)  # load (cached) before the clock starts
    rt.sam(cfg.sam_arch)
    t_start = time.perf_counter()
    with rt.autocast():
        clip, sam, state, props, feats = _image_stage(rt, ctx, cfg, n_side, timing)

        t0 = time.perf_counter()
        tf = text_features(rt, clip, expr)
        timing["text"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        dense = _dense_heat_features(ctx, clip, cfg).float()  # (D, gh, gw)
        heat = torch.einsum("dhw,d->hw", dense, F.normalize(tf.p.float(), dim=-1))
        timing["heat"] = time.perf_counter() - t0

        S = cfg.logit_scale * feats @ tf.t.to(feats)
        S_ctx = None
        if tf.n is not None:
            S_ctx = cfg.logit_scale * feats @ F.normalize(tf.n.to(feats), dim=-1)
        # a lone whole-image fallback has no outside: score it with the NaN guards on
        scfg = replace(cfg, nan_guards=True) if props.fallback else cfg
        sc = score_masks(
            S.float().cpu(),
            None if S_ctx is None else S_ctx.float().cpu(),
            props.boxes_xywh,
            props.masks,
            heat.float().cpu(),
            expr.relation,
            expr.direction,
            scfg,
        )
    pick = sc.pick
    mask = props.masks[pick].numpy().copy()
    refined = False
    if cfg.refine:
        with rt.autocast():
            rmask, riou = refine_with_sam(sam, state, mask, props.boxes_xywh[pick].tolist(), sc.A)
        if riou > float(props.iou_preds[pick]) and rmask.any():
            mask, refined = rmask, True
    timing["total"] = time.perf_counter() - t_start
    meta = {
        "proposals": int(props.masks.shape[0]),
        "fallback": "whole-image" if props.fallback else None,
        "refined": refined,
        "timing": {k: round(v, 6) for k, v in timing.items()},
    }
    if props.fallback:  # a stand-in, not an answer: no score, no candidates
        meta["warning_fallback"] = "SAM found no mask: the whole image was used"
        return ReferResult(
            mask=mask.astype(bool), score=float("nan"), candidates=[], meta=meta, fallback=True
        )
    return ReferResult(
        mask=mask.astype(bool),
        score=float(sc.F.max()),
        candidates=_candidates(sc, props, cfg.top_candidates),
        meta=meta,
    )


def _candidates(sc: Scores, props: Proposals, top: int) -> list[dict]:
    """The ``top`` candidates by F: index, box, area, F and its terms P, R, C."""
    order = torch.argsort(sc.F, descending=True, stable=True)[:top]
    cands = []
    for j in order.tolist():
        i = int(sc.relation.T[j])
        cands.append(
            {
                "index": i,
                "box_xywh": [int(v) for v in props.boxes_xywh[i].tolist()],
                "area": int(props.masks[i].sum()),
                "score": float(sc.F[j]),
                "P": float(sc.P[i]),
                "R": float(sc.relation.R[j]),
                "C": float(sc.C[i]),
            }
        )
    return cands
