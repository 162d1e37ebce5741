"""The allocator setting (``--allocator tuned|system``) measured: per preset, its pipeline in
fresh processes, alternating the two settings, on the same machine in one run of this script.

The setting is process-wide (glibc's malloc, ``zsdense.runtime.tune_allocator``), so each
measurement is its own child process: models built, one warm-up run, then ``--runs`` timed runs
of the preset's task (``bench_all``'s cases: full-size architectures, random weights), keeping
the minimum. Each child also reports the minor page faults and the system CPU time of its timed
runs (per run) and its peak resident memory (VmHWM). Children alternate tuned, system, tuned,
system... for ``--rounds`` rounds, so a change in the machine's load hits both alike; the table
keeps each setting's best child, and the largest peak of its children (the peak varies between
processes with where the heap's blocks happen to land).

The last line is ``ratios: preset=tuned/system ...`` (below 1: tuned is faster).

    python bench/bench_allocator.py [--quick] [--presets crane,hybridgl+,trident]
        [--precision auto] [--rounds 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PRESETS = "crane,hybridgl+,trident"


def child(args) -> int:
    """One measurement: ``args.child`` is the allocator setting; prints one JSON line."""
    sys.path.insert(0, str(HERE))
    import common
    import torch
    from bench_all import preset_cases, preset_inputs
    from bench_engine import make_data

    from zsdense.api import Segmenter
    from zsdense.context import ImageContext
    from zsdense.runtime import allocator_state, precision_name

    if args.threads:
        torch.set_num_threads(args.threads)
    seg = Segmenter(
        device="cpu", models=args.models, precision=args.precision, allocator=args.child
    )
    ref_dir = Path(tempfile.mkdtemp(prefix="zsb-alloc-"))  # anomalydino's reference images
    try:
        make_data(ref_dir, 2, (240, 320) if args.quick else (480, 640))
        case = preset_cases(args.quick, 6 if args.quick else 20, ref_dir)[args.preset]
        images, spec, params = preset_inputs(seg, args.preset, case)
        if spec.setup:
            spec.setup()

        def run() -> None:
            spec.run([ImageContext(image=im) for im in images], params)

        run()  # warm-up: models, text embeddings, memories
        best = float("inf")
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(args.runs):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    state = allocator_state()
    print(
        json.dumps(
            {
                "setting": args.child,
                "applied": state.applied,
                "detail": state.detail,
                "seconds": best / len(images),
                "fault_mb": (r1.ru_minflt - r0.ru_minflt) * page / 2**20 / args.runs,
                "sys_s": (r1.ru_stime - r0.ru_stime) / args.runs,
                "peak_mb": common.peak_mb("cpu"),
                "precision": precision_name(seg.dtype),
            }
        ),
        flush=True,
    )
    return 0


def measure(args, preset: str, setting: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", setting, "--preset", preset]
    cmd += ["--precision", args.precision, "--models", args.models, "--runs", str(args.runs)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=False, cwd=tempfile.gettempdir()
    )
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(
        f"{preset} ({setting}) failed (exit {out.returncode}):\n{out.stderr[-3000:]}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="bench_all's --quick sizes")
    ap.add_argument("--presets", default=DEFAULT_PRESETS)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--models", default="random", help="random (full size) | tiny (smoke test)")
    ap.add_argument("--rounds", type=int, default=2, help="children per setting, alternating")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per child (minimum kept)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", choices=("tuned", "system"), help=argparse.SUPPRESS)  # ALLOCATORS
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    sys.path.insert(0, str(HERE))
    import common

    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    print(
        f"zsdense bench_allocator{' --quick' if args.quick else ''}: {common.cpu_line()}; "
        f"precision {args.precision}; {args.rounds} round(s) of tuned/system children, "
        f"minimum of {args.runs} runs each",
        flush=True,
    )
    rows = []
    for name in names:
        got: dict[str, list[dict]] = {"tuned": [], "system": []}
        for _ in range(max(1, args.rounds)):
            for setting in ("tuned", "system"):
                r = measure(args, name, setting)
                got[setting].append(r)
                print(
                    f"  {name} {setting}: {r['seconds']:.3f}s, {r['fault_mb']:.0f} MB faulted "
                    f"and {r['sys_s']:.2f}s system time a run, peak {r['peak_mb']:.0f} MB "
                    f"({r['detail']})",
                    flush=True,
                )
        best = {s: dict(min(rs, key=lambda r: r["seconds"])) for s, rs in got.items()}
        for s, rs in got.items():  # the peak: the largest of the setting's children
            best[s]["peak_mb"] = max(r["peak_mb"] for r in rs)
        rows.append((name, best["tuned"], best["system"]))
    print()
    print(
        "| preset | tuned s/img | system s/img | tuned / system | faulted MB a run (tuned / "
        "system) | system CPU s a run | peak MB | precision |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, t, s in rows:
        print(
            f"| `{name}` | {t['seconds']:.2f} | {s['seconds']:.2f} | "
            f"{t['seconds'] / s['seconds']:.2f} | {t['fault_mb']:.0f} / {s['fault_mb']:.0f} | "
            f"{t['sys_s']:.2f} / {s['sys_s']:.2f} | {t['peak_mb']:.0f} / {s['peak_mb']:.0f} | "
            f"{t['precision']} |"
        )
    print("ratios: " + " ".join(f"{n}={t['seconds'] / s['seconds']:.3f}" for n, t, s in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
