"""Benchmark: MuSc scoring of a whole category (``zsdense.tasks.musc``) for 20 and 40 images.

MuSc's mutual scoring costs about images² × patches² × channels per (layer, r): for a set of
M images it is the machine's matrix-product rate, not the encoder, that sets the time. For each
set size this prints, measured in one run:

- ``scoring``: the whole scoring of the set from the per-layer patch tokens: LNAMD and the
  streamed mutual scoring for 4 layers × r ∈ {1, 3, 5}, layer/r means, the align-corners
  upsampling to the input size and RsCIN (the encoder forward is not included: it is the same
  as any preset's and linear in M);
- ``distance step``: the time of the mutual scoring alone and its achieved GFLOP/s, counting the
  products it performs (each block of images once; a block is used in both directions) and the
  useful minimum (every unordered image pair once), against a plain ``torch.mm`` of the same
  block shapes timed between the scoring calls of the same run (target ≥ 70 %);
- ``memory``: the process's resident set before scoring (the tokens: M × patches × channels ×
  layers × 4 bytes, linear in M and held by any pipeline) and the peak *extra* resident memory of
  the scoring itself (target ≤ 4 GB, independent of M). Each set size runs in its own child
  process so that the peaks do not mix (Linux: the peak is reset through /proc/self/clear_refs).

Tokens are random (speed does not depend on their values) with the shapes of CLIP ViT-L/14 at
``--image-size`` (518 -> 37×37 patches, C = 1024). On a small CPU 518 px takes long (the cost
grows with patches²); ``--image-size 336`` (24×24) keeps the run short, and says so in the output.

``--disk`` measures the path ``run_musc`` takes by default: the per-layer tokens are written to
files (here in batches of ``--batch`` images, as encoder batches would be) in a temporary
directory, LNAMD features go to a file per (layer, r) and the distances are read back in blocks,
so the resident set before scoring holds no tokens and the scoring's peak does not grow with M
once the set's LNAMD features exceed what is read at once (``--group-mb``, default the
library's ``GROUP_BYTES``; below it a whole layer's features are read together). The peak then
also covers writing the tokens. Without it the tokens are in RAM as tensors.

Usage: ``python bench/bench_musc.py [--images 20 40] [--image-size 336] [--threads N] [--disk]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def performed_pairs(m: int, per: int) -> int:
    """Image pairs the blocked table multiplies when the whole set is one slice: every block
    pair (a, b) with a ≤ b once, full blocks (so a diagonal block counts |a|² pairs)."""
    blocks = [(s, min(s + per, m)) for s in range(0, m, per)]
    total = 0
    for i, (a0, a1) in enumerate(blocks):
        for b0, b1 in blocks[i:]:
            total += (a1 - a0) * (b1 - b0)
    return total


def child(args) -> dict:
    from zsdense.tasks.musc import (
        BLOCK_ROWS,
        GROUP_BYTES,
        TABLE_BYTES,
        DiskStack,
        lnamd_set,
        mutual_scores,
        rscin,
        upsample_aligned,
    )

    torch.manual_seed(0)
    m, c, layers = args.child, args.channels, args.layers
    g = args.image_size // args.patch
    n = g * g
    r_list = [int(r) for r in args.r.split(",")]
    embeds = torch.nn.functional.normalize(torch.randn(m, 64), dim=-1)
    per = max(1, BLOCK_ROWS // n)
    assert m * n * m * 4 <= TABLE_BYTES, "the table does not fit one slice: pair count differs"
    rows = min(per, m) * n  # one block of the distance step
    a = torch.nn.functional.normalize(torch.randn(rows, c), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(rows, c), dim=-1)
    a @ b.t()  # warm-up
    group_bytes = int(args.group_mb * 2**20) if args.group_mb else GROUP_BYTES
    tmp = tempfile.TemporaryDirectory(prefix="bench-musc-") if args.disk else None
    if tmp is None:
        tokens = [torch.randn(m, n, c) * 3.0 + torch.randn(1, n, c) for _ in range(layers)]
        base_kb = _status_kb("VmRSS")
        peak_ok = _reset_peak()
    else:
        base_kb = _status_kb("VmRSS")
        peak_ok = _reset_peak()
        tokens = []
        for li in range(layers):
            st = DiskStack(Path(tmp.name) / f"tokens-{li}.f32", (m, n, c))
            common = torch.randn(1, n, c)
            for i in range(0, m, args.batch):
                st.write(i, torch.randn(min(args.batch, m - i), n, c) * 3.0 + common)
            tokens.append(st)
        del common

    t_lnamd = t_msm = t_mm = 0.0
    mm_flops = 0.0
    t0 = time.perf_counter()
    per_r = []
    for r in r_list:
        acc = []
        for tok in tokens:
            t = time.perf_counter()
            out = None if tmp is None else DiskStack(Path(tmp.name) / "lnamd.f32", (m, n, c))
            z = lnamd_set(tok, (g, g), r, out=out)
            t_lnamd += time.perf_counter() - t
            t = time.perf_counter()
            acc.append(mutual_scores(z, 0.3, group_bytes=group_bytes))
            t_msm += time.perf_counter() - t
            del z
            if out is not None:
                out.remove()
            # the plain product of one block's shape, timed between the scoring calls
            t = time.perf_counter()
            for _ in range(args.mm_repeats):
                a @ b.t()
            t_mm += time.perf_counter() - t
            mm_flops += args.mm_repeats * 2.0 * a.shape[0] * b.shape[0] * c
        per_r.append(torch.stack(acc).double().mean(0))
    patch = torch.stack(per_r).mean(0)
    t = time.perf_counter()
    maps = upsample_aligned(patch, (g, g), args.image_size)
    raw = maps.flatten(1).amax(1)
    rscin(raw, embeds, (1, 2, 3))
    t_tail = time.perf_counter() - t
    total = time.perf_counter() - t0 - t_mm
    peak_kb = _status_kb("VmHWM")
    if tmp is not None:
        tmp.cleanup()
    calls = len(r_list) * layers
    performed = calls * 2.0 * c * n * n * performed_pairs(m, per)
    useful = calls * 2.0 * c * n * n * m * (m - 1) / 2
    return dict(
        images=m,
        patches=n,
        channels=c,
        block_images=min(per, m),
        scoring_s=total,
        lnamd_s=t_lnamd,
        distance_s=t_msm,
        tail_s=t_tail,
        distance_gflops=performed / t_msm / 1e9,
        distance_useful_gflops=useful / t_msm / 1e9,
        mm_gflops=mm_flops / t_mm / 1e9,
        tokens_mb=layers * m * n * c * 4 / 2**20,
        rss_before_mb=base_kb / 1024,
        peak_mb=peak_kb / 1024 if peak_ok else float("nan"),
        peak_extra_mb=(peak_kb - base_kb) / 1024 if peak_ok else float("nan"),
        threads=torch.get_num_threads(),
        disk=bool(args.disk),
        group_mb=group_bytes / 2**20,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[20, 40])
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--r", default="1,3,5")
    ap.add_argument("--mm-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--disk", action="store_true", help="tokens and LNAMD features on disk")
    ap.add_argument(
        "--group-mb", type=float, default=0, help="features read at once from disk (MB)"
    )
    ap.add_argument("--batch", type=int, default=8, help="images per token write (--disk)")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    g = args.image_size // args.patch
    print(
        f"MuSc scoring, random tokens of CLIP ViT-L/14 shape at {args.image_size}px: "
        f"{g}x{g} patches, C={args.channels}, {args.layers} layers, r={args.r}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if args.image_size != 518:
        print(f"  (measured at {args.image_size}px, not the preset's 518px, to keep it short)")
    for m in args.images:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(m)]
        for k in ("image_size", "patch", "channels", "layers", "r", "mm_repeats", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        cmd += ["--batch", str(args.batch), "--group-mb", str(args.group_mb)] + (
            ["--disk"] if args.disk else []
        )
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        where = f"tokens on disk, read {res['group_mb']:g} MB at a time" if res["disk"] else "RAM"
        print(
            f"M={res['images']:3d}  scoring {res['scoring_s']:7.1f} s "
            f"(LNAMD {res['lnamd_s']:.1f} s, distance step {res['distance_s']:.1f} s, "
            f"upsample+RsCIN {res['tail_s']:.2f} s)\n"
            f"        distance step {res['distance_gflops']:.1f} GFLOP/s performed "
            f"({res['distance_useful_gflops']:.1f} useful) vs plain torch.mm "
            f"{res['mm_gflops']:.1f} GFLOP/s of the same {res['block_images']}-image block: "
            f"{100 * res['distance_gflops'] / res['mm_gflops']:.0f} %\n"
            f"        memory ({where}): "
            f"tokens {res['tokens_mb']:.0f} MB (RSS before scoring "
            f"{res['rss_before_mb']:.0f} MB), scoring peak extra {res['peak_extra_mb']:.0f} MB, "
            f"peak RSS {res['peak_mb']:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
