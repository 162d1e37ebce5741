"""bf16 vs fp32 on a full-size CLIP image tower (random weights): speed and deviation.

Usage: python bench/bench_precision.py [--arch ViT-L-14-336] [--size 336] [--batch 2] [--reps 3]

Prints, in one run: seconds per batch for fp32, for autocast alone over fp32 weights, and for
what ``--precision bf16`` does (bf16 weights + autocast), the speed-ups against fp32, and the
deviation of the L2-normalised dense tokens (max |d|, cosine) and of the global embedding. The
numbers back the tolerance documented in README ("Devices and precision").
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-L-14-336")
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import open_clip

    from zsdense.models.clip import ClipModel
    from zsdense.runtime import autocast

    torch.manual_seed(0)
    model = open_clip.CLIP(**open_clip.get_model_config(args.arch), quick_gelu=True)
    clip = ClipModel(
        model=model.float().eval().requires_grad_(False), arch=args.arch, is_random=True
    )
    x = clip.normalize(torch.rand(args.batch, 3, args.size, args.size))
    cpu = torch.device("cpu")

    import copy

    clip16 = ClipModel(model=copy.deepcopy(clip.model).to(torch.bfloat16), arch=args.arch)
    out = {}
    for name, model, dtype in (
        ("fp32", clip, torch.float32),
        ("autocast", clip, torch.bfloat16),
        ("bf16", clip16, torch.bfloat16),
    ):
        clip_ = model

        def run_(c=clip_, d=dtype):
            with autocast(cpu, d):
                t = c.run_blocks(c.embed(x, "bilinear"))
                dense = F.normalize(c.head(t[:, 1:]).float(), dim=-1)
                glob = F.normalize(c.head(t[:, 0]).float(), dim=-1)
            return dense, glob

        run_()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.reps):
            res = run_()
        out[name] = ((time.perf_counter() - t0) / args.reps, res)
    tac = out["autocast"][0]
    (t32, (d32, g32)), (t16, (d16, g16)) = out["fp32"], out["bf16"]
    cos = (d32 * d16).sum(-1)
    print(
        f"arch {args.arch} input {args.size} batch {args.batch} threads {torch.get_num_threads()}"
    )
    print(
        f"fp32 {t32:.3f} s/batch; autocast over fp32 weights {tac:.3f} s ({t32 / tac:.2f}x); "
        f"bf16 weights + autocast (zsdense) {t16:.3f} s ({t32 / t16:.2f}x)"
    )
    print(
        f"dense tokens: max|d| {(d32 - d16).abs().max():.4f}  mean cos {cos.mean():.5f}  "
        f"min cos {cos.min():.5f}"
    )
    print(
        f"global embedding: max|d| {(g32 - g16).abs().max():.4f}  cos "
        f"{(g32 * g16).sum(-1).min():.5f}"
    )


if __name__ == "__main__":
    main()
