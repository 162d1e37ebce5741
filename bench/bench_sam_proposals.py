"""SAM proposals (HybridGL's point grid) against the SAM image encoder, in one run.

Full-size SAM ViT-B with random weights (no downloads), one image (default 640×480 from
``assets/scenes/coffee.png``), the preset's point grid (``hybridgl+``: 8×8, batches of 64).
Random weights give meaningless IoU and stability scores, so the IoU and stability filters are
opened (``pred_iou_thresh = stability_score_thresh = -1e9``): every one of the 3 × 64 masks is
decoded, upsampled and scored, the worst case the issue's target is stated for. Box NMS and the
small-region cleaning run as configured.

Timed, interleaved, ``--reps`` times (the minimum is reported; wall and process CPU seconds):

- ``encoder``: ``SamModel.encode`` (what the decoding is compared with);
- ``before``: the previous implementation (predictor-style decoding of every prompt through the
  unchanged ``MaskDecoder``, IoU filter, then upsampling per batch), kept below for the
  comparison;
- ``after``: :func:`zsdense.models.sam_proposals.sam_proposals` (default, identical results);
- ``lowres``: the opt-in fast mode (stability on the 256² logits).

It checks that ``after`` equals ``before`` (masks, boxes, scores, order) and prints the
``lowres`` stability difference over every mask (untimed extra runs without NMS). Last line:
``ratios: before=... after=... lowres=...`` (decoding + filtering time / encoder time; wall,
then process CPU time, which is steadier on a shared machine). Target: after <= 0.25.

Usage: python bench/bench_sam_proposals.py [--arch vit_b] [--size 640] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def load_image(size: int) -> np.ndarray:
    from PIL import Image

    im = Image.open(REPO / "assets" / "scenes" / "coffee.png").convert("RGB")
    w, h = im.size
    s = size / max(w, h)
    return np.asarray(im.resize((round(w * s), round(h * s)), Image.BICUBIC))


@torch.no_grad()
def before_proposals(sam, state, cfg):
    """The previous implementation (zsdense before the move), for the comparison only."""
    from segment_anything.utils.amg import (
        batched_mask_to_box,
        build_point_grid,
        calculate_stability_score,
    )
    from torchvision.ops.boxes import batched_nms

    from zsdense.models.sam_proposals import Proposals, _clean_small_regions

    H, W = state.original_size
    pred = sam.predictor_for(state)
    points = build_point_grid(cfg.points_per_side) * np.array([[W, H]], dtype=np.float64)
    model = sam.model
    thr = model.mask_threshold
    dense_pe = model.prompt_encoder.get_dense_pe()
    masks_l, iou_l, box_l, stab_l = [], [], [], []
    for s in range(0, len(points), cfg.points_per_batch):
        pts = points[s : s + cfg.points_per_batch]
        tp = torch.as_tensor(pred.transform.apply_coords(pts, (H, W)), device=pred.device)
        labels = torch.ones(tp.shape[0], 1, dtype=torch.int, device=pred.device)
        sparse, dense = model.prompt_encoder(
            points=(tp[:, None, :], labels), boxes=None, masks=None
        )
        low, iou = model.mask_decoder(
            image_embeddings=state.embedding,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        low, iou = low.flatten(0, 1)[:, None], iou.flatten(0, 1)
        if cfg.pred_iou_thresh > 0:
            keep = iou > cfg.pred_iou_thresh
            low, iou = low[keep], iou[keep]
        logits = model.postprocess_masks(low, state.input_size, state.original_size)[:, 0]
        stab = calculate_stability_score(logits, thr, cfg.stability_score_offset)
        keep = (
            stab >= cfg.stability_score_thresh if cfg.stability_score_thresh > 0 else stab == stab
        )
        m = logits[keep] > thr
        masks_l.append(m)
        iou_l.append(iou[keep])
        stab_l.append(stab[keep])
        box_l.append(batched_mask_to_box(m))
        del logits
    masks, iou, boxes, stab = (torch.cat(x) for x in (masks_l, iou_l, box_l, stab_l))
    keep = batched_nms(boxes.float(), iou, torch.zeros(len(boxes)), cfg.box_nms_thresh)
    masks, iou, boxes, stab = masks[keep], iou[keep], boxes[keep], stab[keep]
    if cfg.min_mask_region_area > 0:
        masks, iou, boxes, stab = _clean_small_regions(
            masks, iou, boxes, stab, cfg.min_mask_region_area, max(cfg.box_nms_thresh, 0.7)
        )
    xywh = boxes.clone().to(torch.int64)
    xywh[:, 2] -= xywh[:, 0]
    xywh[:, 3] -= xywh[:, 1]
    return Proposals(masks=masks, boxes_xywh=xywh, iou_preds=iou, stability=stab)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--size", type=int, default=640, help="long side of the image")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--preset", default="hybridgl+")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from zsdense.config import REFER_PRESETS, with_overrides
    from zsdense.models.sam import build_sam
    from zsdense.models.sam_proposals import sam_proposals

    cfg = with_overrides(
        REFER_PRESETS[args.preset], pred_iou_thresh=-1e9, stability_score_thresh=-1e9
    )
    sam = build_sam(args.arch)
    img = load_image(args.size)
    print(
        f"SAM {args.arch} (full size, random weights), image {img.shape[1]}x{img.shape[0]}, "
        f"{cfg.points_per_side}x{cfg.points_per_side} points in batches of "
        f"{cfg.points_per_batch}, IoU/stability filters opened; torch threads "
        f"{torch.get_num_threads()}, {args.reps} interleaved reps (minimum)"
    )
    names = ("encoder", "before", "after", "lowres")
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    outs: dict = {}
    runs = {
        "encoder": lambda: sam.encode(img),
        "before": lambda: before_proposals(sam, outs["encoder"], cfg),
        "after": lambda: sam_proposals(sam, outs["encoder"], cfg),
        "lowres": lambda: sam_proposals(sam, outs["encoder"], cfg, stability="lowres"),
    }
    for rep in range(args.reps):
        for n in names:
            out, w, c = timed(runs[n])
            outs[n] = out
            wall[n].append(w)
            cpu[n].append(c)
            print(f"  rep {rep} {n:8s} {w:7.2f} s wall {c:7.2f} s cpu", flush=True)

    b, a = outs["before"], outs["after"]
    same = (
        torch.equal(a.masks, b.masks)
        and torch.equal(a.boxes_xywh, b.boxes_xywh)
        and torch.equal(a.iou_preds, b.iou_preds.float())
        and torch.equal(a.stability, b.stability.float())
    )
    print(
        f"after == before (masks, boxes, IoU, stability, order): {same}; {a.masks.shape[0]} masks"
    )
    # the fast mode's difference over every mask (no NMS, no cleaning; untimed)
    every = dict(box_nms_thresh=1.0, min_mask_region_area=0)
    ea = sam_proposals(sam, outs["encoder"], cfg, **every)
    ef = sam_proposals(sam, outs["encoder"], cfg, stability="lowres", **every)
    d = (ef.stability - ea.stability).abs()
    flips = int(((ea.stability >= 0.95) != (ef.stability >= 0.95)).sum())
    print(
        f"lowres stability vs exact over all {ea.masks.shape[0]} masks: max |d| {d.max():.4f}, "
        f"mean |d| {d.mean():.4f}; keep decisions changed at the SAM default 0.95: {flips} "
        "(random weights)"
    )
    enc_w, enc_c = min(wall["encoder"]), min(cpu["encoder"])
    print(f"\n{'':10s} {'wall s':>8s} {'/encoder':>9s} {'cpu s':>8s} {'/encoder':>9s}")
    ratios = {}
    for n in names:
        w, c = min(wall[n]), min(cpu[n])
        ratios[n] = w / enc_w
        ratios["cpu_" + n] = c / enc_c
        print(f"{n:10s} {w:8.2f} {w / enc_w:9.3f} {c:8.2f} {c / enc_c:9.3f}")
    print(f"after / before: {min(wall['after']) / min(wall['before']):.3f} (wall)")
    keys = ("before", "after", "lowres", "cpu_before", "cpu_after", "cpu_lowres")
    print("ratios: " + " ".join(f"{n}={ratios[n]:.3f}" for n in keys))


if __name__ == "__main__":
    main()
