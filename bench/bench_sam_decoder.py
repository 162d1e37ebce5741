"""SAM's mask decoder alone: the float32 exact path against the reduced-precision ones, in one run.

One image embedding (random, 1 × 256 × 64 × 64: the decoder's cost does not depend on its
values) and the ``hybridgl+`` preset's 8 × 8 point grid (64 single-point prompts) decoded
multimask the way :func:`zsdense.models.sam_proposals.sam_proposals` decodes them
(``decode_in_chunks``: ``DECODE_CHUNK`` prompts a call), by

- ``fp32``: :func:`~zsdense.models.sam_decoder.decode_points` on the float32 model, the exact
  path (bit-identical to ``MaskDecoder``);
- ``fp32 arranged``: the arranged decoder (below) on a float32 copy of the decoder, the opt-in
  ``--proposal-decoder arranged``;
- ``<dtype> reference order``: ``decode_points`` on the reduced-precision copy of the decoder
  (``ReducedDecoderSam``), ``MaskDecoder``'s arithmetic in that dtype;
- ``<dtype> arranged``: :func:`~zsdense.models.sam_decoder_reduced.decode_points_reduced`, what
  ``sam_proposals`` runs at that precision (projections folded into the tokens, channels-last
  upscaling).

Full-size SAM (random weights; nothing is downloaded) unless ``--models tiny``. Timed
interleaved, the minimum of ``--repeats`` runs; FLOPs counted once (``torch.utils.flop_counter``:
matrix products, convolutions); each reduced path's logits against the float32 ones (largest
difference over the largest |logit|, and the share of logits on the same side of 0). Last line:
``ratios: <name>=<seconds / fp32 seconds> ...``.

    python bench/bench_sam_decoder.py [--arch vit_b] [--precision bf16] [--repeats 5]
        [--threads N] [--models random|tiny] [--points-per-side N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DTYPES = {"bf16": torch.bfloat16}  # the reduced decoder exists where the weights are cast


def _prompts(n_side: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An n × n point grid over SAM's square input frame: (P, 1, 2) coordinates, labels."""
    from segment_anything.utils.amg import build_point_grid

    pts = torch.as_tensor(build_point_grid(n_side), dtype=torch.float32) * img_size
    return pts[:, None, :], torch.ones(pts.shape[0], 1, dtype=torch.int)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs, minimum kept")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default="random", choices=["random", "tiny"])
    ap.add_argument("--preset", default="hybridgl+")
    ap.add_argument("--points-per-side", type=int, default=None, help="the preset's grid")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from zsdense.config import REFER_PRESETS
    from zsdense.models import _cast
    from zsdense.models import sam_proposals as SP
    from zsdense.models.sam import build_sam

    dtype = DTYPES[args.precision]
    tiny = args.models == "tiny"
    s32 = build_sam(args.arch, tiny=tiny)
    low_prec = build_sam(args.arch, tiny=tiny)
    low_prec.model.load_state_dict(s32.model.state_dict())  # the same weights, then cast
    _cast(low_prec, dtype)
    red = SP.decoder_for(low_prec)
    cfg = REFER_PRESETS[args.preset]
    size = int(s32.model.image_encoder.img_size)
    c = int(s32.model.prompt_encoder.embed_dim)
    g = int(s32.model.prompt_encoder.image_embedding_size[0])
    emb = torch.randn(1, c, g, g, generator=torch.Generator().manual_seed(0))
    coords, labels = _prompts(args.points_per_side or cfg.points_per_side, size)
    side32 = SP.decoder_image_side(s32.model, emb)
    side_red = SP.decoder_image_side(red, emb)
    autocast = torch.autocast("cpu", dtype=dtype)

    def fp32():
        return SP.decode_in_chunks(s32.model, side32, coords, labels)

    def reference_order():
        with autocast:
            return SP.decode_in_chunks(red, side_red, coords, labels, arranged=False)

    def arranged():
        with autocast:
            return SP.decode_in_chunks(red, side_red, coords, labels)

    red32 = SP.decoder_for(s32, arranged=True)  # the opt-in float32 arrangement
    side_red32 = SP.decoder_image_side(red32, emb)

    def fp32_arranged():
        return SP.decode_in_chunks(red32, side_red32, coords, labels)

    name = args.precision
    cases = {
        "fp32": fp32,
        "fp32 arranged": fp32_arranged,
        f"{name} reference order": reference_order,
        f"{name} arranged": arranged,
    }
    print(
        f"SAM {args.arch} mask decoder ({'tiny' if tiny else 'full size'}, random weights), "
        f"{coords.shape[0]} single-point prompts "
        f"({'the ' + args.preset if not args.points_per_side else 'a'} grid), "
        f"{SP.DECODE_CHUNK} per call; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    print(f"machine: {common.cpu_line()}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    ref_low, ref_iou = fp32()
    outs = {k: f() for k, f in cases.items()}  # warm-up, and the outputs compared
    flops = {k: common.count_flops(f) for k, f in cases.items()}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(max(1, args.repeats)):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    scale = float(ref_low.abs().max())
    print()
    print(
        f"| path | s ({coords.shape[0]} prompts) | vs fp32 | GFLOP "
        "| max abs(Δ logit) / max abs(logit) | same sign | max abs(Δ IoU) |"
    )
    print("|---|---|---|---|---|---|---|")
    best = {k: min(v) for k, v in times.items()}
    for k in cases:
        low, iou = outs[k]
        d = float((low.float() - ref_low).abs().max()) / max(scale, 1e-12)
        same = float(((low.float() > 0) == (ref_low > 0)).float().mean())
        di = float((iou.float() - ref_iou).abs().max())
        print(
            f"| {k} | {best[k]:.3f} | {best[k] / best['fp32']:.2f} | {flops[k] / 1e9:.1f} "
            f"| {d:.2e} | {same:.4f} | {di:.2e} |"
        )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print(
        "ratios: " + " ".join(f"{k.replace(' ', '_')}={best[k] / best['fp32']:.3f}" for k in cases)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
