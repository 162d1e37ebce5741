"""Benchmark: Crane / Crane+ pipeline time vs the bare encoder forwards it needs (per image).

Full-size architectures with random weights (speed does not depend on the weights): CLIP
ViT-L/14-336 (``open_clip.CLIP(**get_model_config("ViT-L-14-336"))``) and DINOv2-with-registers
base, at the papers' 518×518 input. For each preset it prints, per image:

- ``pipeline``: ``run_anomaly`` on one image (preprocess, E-Attn dual path [+ DINOv2 + D-Attn],
  maps, smoothing, score, resize to the original size, decisions); text embeddings are cached
  (computed once per run, as in a real batch) and excluded;
- ``bare``: the plain encoder forwards the preset needs on the same input (CLIP vision tower
  [+ DINOv2]);
- their ratio, and the process's peak resident memory so far (``ru_maxrss``).

Usage: ``python bench/bench_anomaly.py [--repeats 2] [--image-size 518] [--threads N]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def build_models():
    from zsdense.models.clip import build_random_clip
    from zsdense.models.dinov2 import build_dinov2

    clip = build_random_clip("ViT-L-14-336")
    dino = build_dinov2("dinov2-reg-base", tiny=False)
    return clip, dino


def make_segmenter(clip, dino):
    from zsdense.api import Segmenter

    class BenchSegmenter(Segmenter):
        """A Segmenter whose encoders are the given random full-size models."""

        def clip(self, arch, pretrained="openai"):  # noqa: ARG002
            return clip

        def dinov2(self, name="dinov2-reg-base"):  # noqa: ARG002
            return dino

    return BenchSegmenter(device="cpu", precision="fp32", batch_size=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="timed images per preset")
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--presets", default="crane,crane+")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from zsdense.dense.crane import dino_input_from_clip
    from zsdense.tasks.anomaly import model_input, run_anomaly

    t0 = time.perf_counter()
    clip, dino = build_models()
    print(
        f"built ViT-L-14-336 + dinov2-reg-base (random) in {time.perf_counter() - t0:.1f}s; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"input {args.image_size}px; peak RSS {common.peak_rss_mb():.0f} MB",
        flush=True,
    )
    seg = make_segmenter(clip, dino)
    rng = np.random.default_rng(0)

    def image():
        return rng.random((600, 800, 3)).astype(np.float32)

    opts = dict(prompts="ensemble", image_size=args.image_size)
    # Text embeddings are computed once per run and cached on the Segmenter: pre-fill that cache
    # with a fixed (random) T so the 420-prompt ensemble through the random text tower is skipped.
    from zsdense.config import ANOMALY_PRESETS

    t_rand = torch.nn.functional.normalize(torch.randn(2, clip.embed_dim), dim=-1)
    for p in ANOMALY_PRESETS.values():
        seg.text_cache[("anomaly-ensemble", clip.arch, p.prompt_ensemble, "")] = t_rand

    def bare(ctx, with_dino: bool) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            x = clip.normalize(model_input([ctx], args.image_size, "cpu"))
            clip.encode_image_global(x, "bilinear")
            if with_dino:
                dino.patch_features(dino.normalize(dino_input_from_clip(x, clip.mean, clip.std)))
        return time.perf_counter() - t

    bare(seg.context(image()), True)  # warm-up (first-call allocations)
    rows = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        with_dino = preset == "crane+"
        for i in range(args.repeats):
            ctx = seg.context(image())
            tb = bare(ctx, with_dino)
            ctx2 = seg.context(ctx.image)  # fresh context: nothing cached
            t = time.perf_counter()
            run_anomaly(seg, [ctx2], preset=preset, **opts)
            tp = time.perf_counter() - t
            rows.append((preset, i, tp, tb))
            print(
                f"{preset:7s} image {i}: pipeline {tp:7.2f}s  bare encoders {tb:7.2f}s  "
                f"ratio {tp / tb:5.2f}  peak RSS {common.peak_rss_mb():.0f} MB",
                flush=True,
            )
    print("\nsummary per image (min over repeats: robust to other load on the machine; mean):")
    for preset in dict.fromkeys(r[0] for r in rows):
        tp = [r[2] for r in rows if r[0] == preset]
        tb = [r[3] for r in rows if r[0] == preset]
        print(
            f"  {preset:7s} pipeline min {min(tp):.2f}s mean {np.mean(tp):.2f}s | bare min "
            f"{min(tb):.2f}s mean {np.mean(tb):.2f}s | ratio of mins {min(tp) / min(tb):.2f}"
        )
    print(f"  peak RSS {common.peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
