"""Benchmark: seconds per prompt-training step (Crane recipe) with and without feature caching.

Full-size architectures with random weights (speed does not depend on the weights): CLIP
ViT-L/14-336 (vision 24 blocks at 518×518 → 37×37 patches, text 12 blocks of width 768),
batch 8, Crane's 4 aliased maps, deep prompts into text blocks 2..9. A step is:

- ``vision``: the frozen E-Attn forward of the batch (no grad) — what caching removes;
- ``cached step``: prompts conditioned on the 8 image embeddings → text tower forward and
  backward (16 sequences) → maps, focal, dice, pooling, CE → Adam, from cached features;
- ``uncached step`` = vision + cached step (the reference recomputes the encoder every batch).

It prints each, the caching speed-up, and the process's peak memory (``ru_maxrss``; on CUDA
also ``max_memory_allocated``). fp32 only on CPUs without native bf16 (``avx512_bf16`` /
``amx_bf16``); ``--bf16`` casts the frozen vision tower to bf16 where it is native.

Usage: ``python bench/bench_train.py [--steps 3] [--batch 8] [--image-size 518]
[--device cpu|cuda] [--threads N] [--micro-batch M]``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 1024.0 / 1024.0


def native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="cached steps timed (after 1 warm-up)")
    ap.add_argument("--vision-repeats", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="bf16 vision tower (native bf16 only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from zsdense.models.clip import build_random_clip
    from zsdense.train.features import FeatureCache, encode_images, vision_setup
    from zsdense.train.learner import PromptLearner
    from zsdense.train.recipe import get_recipe
    from zsdense.train.step import make_optimizer, train_step

    dev = args.device
    t0 = time.perf_counter()
    clip = build_random_clip("ViT-L-14-336").to(dev)
    if args.bf16:
        if dev == "cpu" and not native_bf16():
            sys.exit("this CPU has no native bf16 (avx512_bf16 / amx_bf16): fp32 only")
        clip.model.visual.to(torch.bfloat16)
    print(f"model built in {time.perf_counter() - t0:.1f}s, peak RSS {peak_rss_mb():.0f} MB")
    recipe = get_recipe("crane", image_size=args.image_size, batch_size=args.batch)
    setup = vision_setup(recipe, clip.num_layers)
    learner = PromptLearner(clip, recipe, generator=torch.Generator().manual_seed(0)).to(dev)
    opt = make_optimizer(learner, recipe)
    n_train = sum(p.numel() for p in learner.parameters())
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.image_size
    x01 = torch.rand(b, 3, s, s, generator=g)
    masks = torch.zeros(b, s, s)
    masks[: b // 2, s // 4 : s // 2, s // 4 : s // 2] = 1
    labels = torch.tensor([1] * (b // 2) + [0] * (b - b // 2))
    x = clip.normalize(x01).to(dev)
    if args.bf16:
        x = x.to(torch.bfloat16)
    masks, labels = masks.to(dev), labels.to(dev)
    print(
        f"CLIP ViT-L-14-336 (random), {dev}, threads {torch.get_num_threads()}, batch {b}, "
        f"{s}x{s}, {n_train:,} trainable numbers, depth {learner.depth}, "
        f"vision {'bf16' if args.bf16 else 'fp32'}"
    )

    times = []
    vb = None
    for _ in range(max(1, args.vision_repeats)):
        _sync(dev)
        t = time.perf_counter()
        vb = encode_images(clip, x, recipe, setup)
        _sync(dev)
        times.append(time.perf_counter() - t)
    vision_s = min(times)
    print(f"vision (E-Attn, no grad):      {vision_s:8.2f} s / batch   peak {peak_rss_mb():.0f} MB")
    cache = FeatureCache(setup)
    cache.put(list(range(b)), vb)
    cached = cache.get(list(range(b)), dev)

    def step():
        _sync(dev)
        t = time.perf_counter()
        train_step(learner, opt, clip, cached, masks, labels, recipe, micro_batch=args.micro_batch)
        _sync(dev)
        return time.perf_counter() - t

    warm = step()
    st = [step() for _ in range(args.steps)]
    step_s = sum(st) / len(st)
    print(
        f"cached step (text fwd+bwd, losses, Adam): {step_s:8.2f} s  (warm-up {warm:.2f} s, "
        f"{len(st)} steps: {', '.join(f'{v:.2f}' for v in st)})   peak {peak_rss_mb():.0f} MB"
    )
    unc = vision_s + step_s
    print(f"uncached step (reference):     {unc:8.2f} s")
    print(f"caching speed-up:              {unc / step_s:8.2f}x")
    print(
        f"feature cache: {sum(m.numel() for m in vb.maps) * 4 / b / 2**20:.1f} MB per image "
        f"(float32, {len(vb.maps)} distinct map(s))"
    )
    if dev.startswith("cuda"):
        print(f"CUDA max_memory_allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
    print(f"peak RSS: {peak_rss_mb():.0f} MB; native bf16 on this CPU: {native_bf16()}")


if __name__ == "__main__":
    main()
