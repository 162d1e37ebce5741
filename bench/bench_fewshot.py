"""Benchmark: few-shot (AnomalyDINO) scoring time, nearest-neighbour throughput, bank build time
and peak memory, on full-size random-weight DINOv2 ViT-S/14 at 448 px (CPU, fp32).

In one run it prints:

- ``forward``: the bare DINOv2 forward on one prepared 448×448 image (32×32 patches), the hub
  positional-embedding resize included (what the scorer runs);
- ``build``: bank build time per shot with the reference's 8 rotations (8 forwards + rotation,
  masks and normalisation), measured on ``--build-shots`` real shots;
- per shot count (1, 8, 64; with 8 rotations each): ``score`` = one test image end to end
  (``score_images_with``: preprocessing, forward, kNN, map, smoothing, score) against the bare
  forward; the kNN step alone, its GFLOP/s (2·Q·M·D FLOPs) and a plain ``torch.mm`` of the same
  shapes (the same memory blocks, into a preallocated output) timed in the same run;
- the peak resident memory (``ru_maxrss``) after each stage, and that peak minus the resident
  memory of the process once the model is built and has run (Python, torch, transformers and
  the weights: the part the few-shot scorer does not control).

Banks above ``--build-shots`` are made by repeating the built shots' rows (with a small
perturbation, re-normalised): the rows, their number and the memory they take are those of a
real bank of that many shots; only the pixels they came from differ (speed and memory do not
depend on them).

Usage: ``python bench/bench_fewshot.py [--repeats 2] [--build-shots 2] [--shots 1,8,64]``.
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


def timed(fn, repeats: int) -> tuple[float, object]:
    """(best seconds over ``repeats`` runs, last result)."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def grow_bank(bank, shots: int, seed: int = 0):
    """A bank of ``shots`` references made from ``bank``'s rows (see the module docstring)."""
    from zsdense.dense.knn import l2_normalize
    from zsdense.io.membank import MemoryBank

    g = torch.Generator().manual_seed(seed)
    feats, source, masks, grids, sizes = [], [], [], [], []
    for r in range(shots):
        j = r % bank.n_shots
        f = bank.features[j]
        if r >= bank.n_shots:
            f = l2_normalize(f + 0.01 * torch.randn(f.shape, generator=g))
        src = bank.source[j].clone()
        src[:, 0] = r
        feats.append(f)
        source.append(src)
        masks.append(bank.masks[j])
        grids.append(bank.grids[j])
        sizes.append(bank.sizes[j])
    return MemoryBank(
        features=feats,
        source=source,
        masks=masks,
        grids=grids,
        sizes=sizes,
        names=[f"ref{i}" for i in range(shots)],
        settings=bank.settings,
        model=bank.model,
    )


def mm_baseline(q: torch.Tensor, blocks: list[torch.Tensor], rows_per_step: int) -> None:
    """Plain ``torch.mm`` of the kNN's shapes: q (Q, D) against the same memory blocks."""
    out = torch.empty(q.shape[0], rows_per_step)
    for b in blocks:
        for m0 in range(0, b.shape[0], rows_per_step):
            mb = b[m0 : m0 + rows_per_step]
            torch.mm(q, mb.T, out=out[:, : mb.shape[0]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shots", default="1,8,64")
    ap.add_argument("--build-shots", type=int, default=2, help="shots built for real")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from zsdense.api import Segmenter
    from zsdense.dense.knn import DEFAULT_BUDGET_BYTES, knn_search, l2_normalize
    from zsdense.tasks import fewshot as fs

    t0 = time.perf_counter()
    seg = Segmenter(device="cpu", models="random", precision="fp32")
    dino = seg.dinov2("dinov2-small")
    s = args.image_size
    opts = fs.FewShotOptions(image_size=s, rotation=True)
    print(
        f"built dinov2-small (ViT-S/14, random weights) in {time.perf_counter() - t0:.1f}s; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {s}px; "
        f"peak RSS {common.peak_rss_mb():.0f} MB",
        flush=True,
    )
    rng = np.random.default_rng(0)

    def image() -> np.ndarray:
        base = rng.integers(60, 200, size=(s // 8, s // 8, 3), dtype=np.uint8)
        return np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))  # blocky, s x s

    test = image()
    x, grid = fs.prepare_image(test, s, dino.patch_size)
    mode = fs.resolve_pos_interp(dino, opts.pos_interp)
    with torch.no_grad():
        dino.tokens(x[None], pos_interp=mode)  # warm-up
        t_fwd, _ = timed(lambda: dino.tokens(x[None], pos_interp=mode), args.repeats)
    n_patches = grid[0] * grid[1]
    base_mb = common.current_rss_mb()
    print(
        f"forward  {t_fwd * 1e3:8.0f} ms  (bare DINOv2, 1 image, grid {grid[0]}x{grid[1]}); "
        f"resident {base_mb:.0f} MB after it (baseline)"
    )

    refs = [image() for _ in range(args.build_shots)]
    t_build = time.perf_counter()
    bank = fs.build_memory_with(dino, refs, opts)
    t_build = (time.perf_counter() - t_build) / len(refs)
    print(
        f"build    {t_build:8.2f} s per shot (8 rotations = 8 forwards; "
        f"{t_build / t_fwd:.1f}x one forward); peak RSS {common.peak_rss_mb():.0f} MB",
        flush=True,
    )

    rows_step = max(1, DEFAULT_BUDGET_BYTES // 4 // n_patches)
    print(
        "shots  rows      bank MB  score ms  x forward  knn ms  knn GFLOP/s  mm ms  mm GFLOP/s"
        "  knn/mm  peak RSS MB  peak-baseline MB"
    )
    for shots in [int(v) for v in args.shots.split(",")]:
        b = grow_bank(bank, shots)
        t_score, res = timed(lambda b=b: fs.score_images_with(dino, b, [test], opts), args.repeats)
        feats = fs.extract_features(dino, [test], s, opts.pos_interp)[0][0]
        q = l2_normalize(feats)
        # interleaved (knn, mm, knn, mm, ...) so that load changes hit both alike
        t_knn, t_mm = float("inf"), float("inf")
        for _ in range(max(1, args.repeats)):
            t, _ = timed(lambda b=b, q=q: knn_search(q, b.features, 1), 1)
            t_knn = min(t_knn, t)
            t, _ = timed(lambda b=b, q=q: mm_baseline(q, b.features, rows_step), 1)
            t_mm = min(t_mm, t)
        flops = 2.0 * q.shape[0] * b.n_rows * q.shape[1]
        print(
            f"{shots:5d}  {b.n_rows:8d}  {b.nbytes() / 2**20:7.0f}  {t_score * 1e3:8.0f}  "
            f"{t_score / t_fwd:9.2f}  {t_knn * 1e3:6.0f}  {flops / t_knn / 1e9:11.1f}  "
            f"{t_mm * 1e3:5.0f}  {flops / t_mm / 1e9:10.1f}  {t_mm / t_knn:6.2f}  "
            f"{common.peak_rss_mb():11.0f}  {common.peak_rss_mb() - base_mb:16.0f}",
            flush=True,
        )
        assert res[0].anomaly_map.shape == test.shape[:2]
        del b
    return 0


if __name__ == "__main__":
    sys.exit(main())
