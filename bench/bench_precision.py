"""bf16 autocast vs fp32 on a full-size CLIP image tower (random weights): speed and deviation.

Usage: python bench/bench_precision.py [--arch ViT-L-14-336] [--size 336] [--batch 2] [--reps 3]

Prints, in one run: fp32 and bf16 seconds per batch, their ratio, and the deviation of the
L2-normalised dense tokens (max |Δ|, mean cosine similarity) and of the global embedding. The
numbers back the tolerance documented in README ("Precision").
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

    def run(dtype):
        with autocast(cpu, dtype):
            t = clip.run_blocks(clip.embed(x, "bilinear"))
            dense = F.normalize(clip.head(t[:, 1:]).float(), dim=-1)
            glob = F.normalize(clip.head(t[:, 0]).float(), dim=-1)
        return dense, glob

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        run(dtype)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.reps):
            res = run(dtype)
        out[name] = ((time.perf_counter() - t0) / args.reps, res)
    (t32, (d32, g32)), (t16, (d16, g16)) = out["fp32"], out["bf16"]
    cos = (d32 * d16).sum(-1)
    print(
        f"arch {args.arch} input {args.size} batch {args.batch} threads {torch.get_num_threads()}"
    )
    print(f"fp32 {t32:.3f} s/batch  bf16 {t16:.3f} s/batch  speed-up {t32 / t16:.2f}x")
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
