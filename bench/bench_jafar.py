"""JAFAR upsampler: peak extra memory of the memory-bounded forward per output size, and its
speed against the whole-tensor (reference) path.

Full-size JAFAR (qk_dim 128, 4 heads, kernel 1) with random weights, one image of
``--image`` pixels (448: the authors' evaluation size) and features on its ``/--patch`` grid
(32×32 for /14 backbones) with ``--dim`` channels (384: ViT-S). Each output size runs in a fresh
subprocess (a process's first call, so freed memory kept by the allocator cannot hide a peak):
peak resident set during the call (Linux VmHWM after ``clear_refs``; CUDA: allocator peak) minus
the resident set before it, minus the output tensor itself = the extra memory. Also prints the
size the whole head-averaged attention would have (what the chunking avoids) and the seconds.

``--speed S``: one process, ``--threads`` threads, image S×S, features on its /patch grid,
output S×S; the reference path (``forward_reference``, whole tensors) and the chunked path
interleaved, ``--repeats`` times each, the minimum process CPU time kept (the machine may be
shared), and their ratio (chunked / reference) with the max difference of the outputs.

    python bench/bench_jafar.py [--sizes 448 1024] [--chunk-mb 64] [--device cpu]
    python bench/bench_jafar.py --speed 224 [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return common.peak_rss_mb()


def child(args) -> dict:
    from zsdense.dense.jafar import JAFAR, JafarConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    chunk = None if args.chunk_mb <= 0 else int(args.chunk_mb * 2**20)
    model = JAFAR(JafarConfig(v_dim=args.dim), chunk_bytes=chunk).eval().to(dev)
    model.requires_grad_(False)
    grid = args.image // args.patch
    image = torch.randn(1, 3, args.image, args.image, device=dev)
    feats = torch.randn(1, args.dim, grid, grid, device=dev)
    out_bytes = args.dim * args.size * args.size * 4
    common.sync(dev)
    if dev.startswith("cuda"):
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mb()
    common.reset_peak(dev)
    t = time.perf_counter()
    out = model.forward_chunked(image, feats, (args.size, args.size))
    common.sync(dev)
    secs = time.perf_counter() - t
    peak = common.peak_mb(dev)
    assert out.shape == (1, args.dim, args.size, args.size)
    attn_whole = 4 * args.size * args.size * grid * grid * 4  # heads x Ho·Wo x h·w fp32
    return {
        "size": args.size,
        "image": args.image,
        "grid": grid,
        "dim": args.dim,
        "chunk_mb": args.chunk_mb,
        "extra_mb": round(peak - before - out_bytes / 2**20, 1),
        "output_mb": round(out_bytes / 2**20, 1),
        "whole_attention_mb": round(attn_whole / 2**20, 1),
        "seconds": round(secs, 2),
        "device": dev,
        "threads": args.threads,
    }


def speed(args) -> None:
    import platform

    from zsdense.dense.jafar import JAFAR, JafarConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chunk = None if args.chunk_mb <= 0 else int(args.chunk_mb * 2**20)
    model = JAFAR(JafarConfig(v_dim=args.dim), chunk_bytes=chunk).eval().requires_grad_(False)
    s = args.speed
    image = torch.randn(1, 3, s, s)
    feats = torch.randn(1, args.dim, s // args.patch, s // args.patch)
    ref_t, chk_t = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            t = time.process_time()
            a = model.forward_reference(image, feats, (s, s))
            ref_t.append(time.process_time() - t)
            t = time.process_time()
            b = model.forward_chunked(image, feats, (s, s))
            chk_t.append(time.process_time() - t)
    print(
        f"speed: image {s}, grid {s // args.patch}, output {s}, Cv {args.dim}, float32, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}: reference "
        f"{min(ref_t):.2f} s, chunked {min(chk_t):.2f} s CPU, ratio chunked/reference "
        f"{min(chk_t) / min(ref_t):.2f}, max |diff| {float((a - b).abs().max()):.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[448, 1024])
    ap.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--chunk-mb", type=float, default=64.0, help="0: no chunking")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", type=int, default=None, help="image side for the speed test")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.speed is not None:
        speed(args)
        return
    if args.size is not None:
        print(json.dumps(child(args)))
        return
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--size", str(size)]
        for k in ("image", "patch", "dim", "chunk_mb", "device", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(
        "peak extra MB: "
        + " ".join(f"{r['size']}x{r['size']}={r['extra_mb']}" for r in rows)
        + f" (image {args.image}, grid {args.image // args.patch}, Cv {args.dim}, "
        f"chunk {args.chunk_mb} MiB, {args.device}, float32)"
    )


if __name__ == "__main__":
    main()
