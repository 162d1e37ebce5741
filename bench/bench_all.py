"""One benchmark table: every preset against its bare encoders, and folder throughput.

Full-size architectures with random weights (speed does not depend on the weights; nothing is
downloaded). For each preset, in one process and interleaved (pipeline, bare, bare, pipeline,
pipeline, bare, ...: a pair a run, which side first alternating; the minimum of ``--repeats``
runs of each is kept, and fast presets run more often, up to ``--min-seconds`` per side: the
machine may be shared):

- ``pipeline``: the preset's task run through its engine spec (``build_task_spec(...).run``) on
  fresh image contexts; models, text embeddings and few-shot memories are built by a warm-up run
  first (once per run in real use, so not counted);
- ``bare``: the plain encoder forwards the preset needs on the same inputs (``bench/common.py``:
  CLIP [+ DINOv2] for crane / crane+ / musc, DINOv2 for anomalydino, CLIP and DINOv2 on the
  windows [+ one SAM encoder pass] for trident / proxyclip, SAM encoder + CLIP on the 2N views
  and on the whole image (its heat map) for hybridgl+);
- their ratio (of the minima), and the ratio of each run's pair (pipeline and bare one after
  the other, which side first alternating): the pairs' median and quartiles. This VM's
  timings drift from minute to minute, and a pair shares its minute; the spread says how far
  one run's ratio can be trusted;
- the FLOPs of each (``torch.utils.flop_counter``: matrix products, convolutions,
  attention; one extra untimed run) and their ratio, the preset's floor: a pipeline that does
  more arithmetic than its encoders cannot run faster than that ratio allows, so the target is
  ``ratio <= max(1.15, FLOP ratio) + 0.05`` (the ``target (limit)`` column);
- the time outside matrix products, convolutions and attention (``non-matrix``): one untimed
  run of each side under ``torch.profiler``, by operator (``common.profile_by_op``); the
  pipeline's share of its own time outside those operators times its ratio, i.e. that time as
  a fraction of the bare encoders' time, and in brackets the bare encoders' own share (their
  LayerNorms, activations, softmaxes: the floor of the column). It is the part that does not
  shrink when matrix products get faster (bf16, a GPU); ``--top N`` names its largest
  operators per side;
- the peak memory of the preset's section (resident set on CPU, allocated GPU
  memory on CUDA) and the precision it ran at.

The first lines name the machine (CPU, its kernel capability, whether bf16 is native, the GPU on
CUDA) and the precision (``--precision auto`` picks the machine's best: bf16 where native).

``musc`` scores a set: its row is per image of a ``--musc-images`` set (20; 6 with ``--quick``).
Then images per second of ``crane`` through the local engine (``run_batch``: decoding in threads
ahead of the encoders, outputs written) at each ``--throughput-batches`` size (1 and 4; a GPU run
adds 16), on ViT-B/16 and, unless ``--quick``, ViT-L/14-336. The last line is
``ratios: name=value ...`` for every preset. ``bench/device_check.sh`` is the prepared script
for a lent GPU (README, "Benchmarks").

    python bench/bench_all.py [--quick] [--repeats 3] [--device cpu|cuda] [--set P.OPTION=V]
        [--precision fp32|bf16|auto] [--threads N] [--top N] [--throughput-batches 1,4,16]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_engine import make_data, runner  # noqa: E402

from zsdense.config import ALLOCATORS  # noqa: E402
from zsdense.runtime import precision_name  # noqa: E402

PRESETS = ("crane", "crane+", "anomalydino", "musc", "trident", "proxyclip", "hybridgl+")
CLASSES = "background; sky; wall; tree; grass; road, person, cat, dog, car, chair, sofa"
REFER_TEXT = "the red cup on the left"


def preset_cases(quick: bool, musc_images: int, ref_dir: Path) -> dict[str, dict]:
    """Per preset: the task config, images (count, h, w) and the bare-encoder call."""
    vit = "ViT-B-16" if quick else "ViT-L-14-336"
    size = 224 if quick else 518
    anomaly = {"task": "anomaly", "object": "object", "prompts": "ensemble"}
    # random SAM predicts meaningless IoUs: open the filters so every mask reaches CLIP
    open_filters = {"pred_iou_thresh": -1e9, "stability_score_thresh": -1e9}
    hw = (240, 320) if quick else (480, 640)
    return {
        "crane": dict(
            cfg={**anomaly, "preset": "crane", "clip_arch": vit, "image_size": size},
            n=1,
            hw=hw,
            bare=("anomaly", vit, size, None),
        ),
        "crane+": dict(
            cfg={**anomaly, "preset": "crane+", "clip_arch": vit, "image_size": size},
            n=1,
            hw=hw,
            bare=("anomaly", vit, size, "dinov2-reg-base"),
        ),
        "anomalydino": dict(
            cfg={"task": "anomaly", "preset": "anomalydino", "reference": str(ref_dir)},
            n=1,
            hw=hw,
            bare=("fewshot",),
        ),
        "musc": dict(
            cfg={"task": "anomaly", "preset": "musc", "clip_arch": vit, "image_size": size},
            n=musc_images,
            hw=hw,
            bare=("anomaly", vit, size, None),
        ),
        "trident": dict(
            cfg={"task": "openvocab", "preset": "trident", "dataset": "voc20", "classes": CLASSES},
            n=1,
            hw=hw,
            bare=("openvocab",),
        ),
        "proxyclip": dict(
            cfg={
                "task": "openvocab",
                "preset": "proxyclip",
                "dataset": "voc20",
                "classes": CLASSES,
            },
            n=1,
            hw=hw,
            bare=("openvocab",),
        ),
        "hybridgl+": dict(
            cfg={"task": "refer", "preset": "hybridgl+", "text": REFER_TEXT, **open_filters},
            n=1,
            hw=hw,
            bare=("refer",),
        ),
    }


def apply_settings(cases: dict[str, dict], settings: list[str]) -> None:
    """``--set PRESET.OPTION=VALUE``: the option added to that preset's task config (a JSON
    value where the text parses as one, else the text), and named in its row's note."""
    import json

    from zsdense.errors import ConfigError

    for item in settings:
        key, sep, text = item.partition("=")
        name, dot, option = key.rpartition(".")
        if not sep or not dot or not option or name not in cases:
            raise ConfigError(
                f"--set {item!r}: expected PRESET.OPTION=VALUE with PRESET one of "
                f"{', '.join(cases)}"
            )
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        cases[name]["cfg"][option] = value
        cases[name].setdefault("settings", []).append(f"{option}={text}")


def preset_inputs(seg, name: str, case: dict) -> tuple[list, object, list[dict]]:
    """A preset's synthetic images (seeded by its name), its engine task spec (no outputs
    written) and one task config per image (``bench_allocator.py`` runs the same)."""
    from zsdense.engine.specs import build_task_spec

    rng = np.random.default_rng(len(name))
    images = [common.synthetic_image(rng, *case["hw"]) for _ in range(case["n"])]
    spec = build_task_spec(seg, case["cfg"], fmt="none", overlay=False)
    return images, spec, [dict(case["cfg"]) for _ in images]


def bench_preset(
    seg, name: str, case: dict, repeats: int, device: str, min_seconds: float = 0.0
) -> dict:
    """Minimum pipeline and bare seconds over interleaved runs, peak memory, precision.

    At least ``repeats`` runs of each; more for fast presets, until each side has run about
    ``min_seconds`` in total (at most ``MAX_REPEATS``): on a shared machine the minimum of many
    short runs is the least disturbed one."""
    from zsdense.context import ImageContext
    from zsdense.options import options_for

    images, spec, params = preset_inputs(seg, name, case)
    common.reset_peak(device)
    if spec.setup:
        spec.setup()
    results = spec.run([ImageContext(image=im) for im in images], params)  # warm-up
    kind = case["bare"][0]
    opts = options_for(spec.settings["task"], {k: v for k, v in case["cfg"].items() if k != "task"})

    def bare(ctxs) -> None:
        if kind == "anomaly":
            common.bare_anomaly(seg, ctxs, *case["bare"][1:])
        elif kind == "fewshot":
            from zsdense.tasks import fewshot as fs

            fo = fs.options_for("object", None, model="dinov2-small")
            common.bare_fewshot(seg, ctxs, fo.model, fo.image_size, fo.pos_interp)
        elif kind == "openvocab":
            for c in ctxs:
                common.bare_openvocab(seg, c, opts.config())
        else:
            n_views = 2 * int(results[0].meta.get("proposals", 1))
            for c in ctxs:
                common.bare_refer(seg, c, opts.config(), n_views)

    bare([ImageContext(image=im) for im in images])  # warm-up
    # the work each side does, counted once (untimed): their ratio is the preset's FLOP floor
    fp = common.count_flops(lambda: spec.run([ImageContext(image=im) for im in images], params))
    fb = common.count_flops(lambda: bare([ImageContext(image=im) for im in images]))
    # where each side's time goes, by operator (one untimed profiled run each)
    pp = common.profile_by_op(
        lambda: spec.run([ImageContext(image=im) for im in images], params), device
    )
    pb = common.profile_by_op(lambda: bare([ImageContext(image=im) for im in images]), device)
    t_one = common.timed(
        lambda: spec.run([ImageContext(image=im) for im in images], params), device
    )
    runs = max(1, repeats, min(MAX_REPEATS, math.ceil(min_seconds / max(t_one, 1e-3))))
    tp, tb = [], []

    def time_pipeline() -> None:
        ctxs = [ImageContext(image=im) for im in images]
        tp.append(common.timed(lambda: spec.run(ctxs, params), device))

    def time_bare() -> None:
        ctxs = [ImageContext(image=im) for im in images]
        tb.append(common.timed(lambda: bare(ctxs), device))

    for i in range(runs):  # one pair a run; which side goes first alternates
        for step in (time_pipeline, time_bare) if i % 2 == 0 else (time_bare, time_pipeline):
            step()
    n = len(images)
    ratio = min(tp) / min(tb)
    paired = paired_ratios(tp, tb)
    return dict(
        name=name,
        n=n,
        pipeline=min(tp) / n,
        bare=min(tb) / n,
        ratio=ratio,
        paired=paired,
        runs=runs,
        # the pipeline's time outside matrix products / convolutions / attention, as a
        # fraction of the bare encoders' time: its profiled share of the pipeline's time times
        # the timed ratio (shares are robust to a loaded machine; single wall times are not)
        nonmatrix=pp["nonmatrix"] / max(pp["wall"], 1e-12) * ratio,
        nonmatrix_bare=pb["nonmatrix"] / max(pb["wall"], 1e-12),
        top_pipeline=pp["top"],
        top_bare=pb["top"],
        gflop_pipeline=fp / n / 1e9,
        gflop_bare=fb / n / 1e9,
        flop_ratio=fp / fb if fb else float("nan"),
        peak_mb=common.peak_mb(device),
        precision=precision_name(seg.dtype),
        note="; ".join(([f"per image of {n}"] if n > 1 else []) + list(case.get("settings", []))),
    )


TARGET = 1.15
MARGIN = 0.05
MAX_REPEATS = 25


def paired_ratios(pipeline: list[float], bare: list[float]) -> tuple[float, float, float]:
    """The ratio of each run's pipeline time to the bare time of the same run (run one after
    the other): their median and quartiles (the spread of the pairs; with fewer than four
    pairs the lowest and highest). The minima's ratio compares each side's least disturbed
    run, which need not be of the same minute; a pair shares its minute, so a machine that
    slows down for a while moves both of its sides."""
    r = sorted(p / b for p, b in zip(pipeline, bare))
    if not r:
        raise ValueError("no runs to pair")
    if len(r) < 4:
        return statistics.median(r), r[0], r[-1]
    q1, q2, q3 = statistics.quantiles(r, n=4, method="inclusive")
    return q2, q1, q3


def paired_cell(r: dict) -> str:
    """``median (first quartile–third quartile)`` of :func:`paired_ratios` (below four pairs:
    lowest–highest)."""
    med, lo, hi = r["paired"]
    return f"{med:.2f} ({lo:.2f}–{hi:.2f})"


def limit(r: dict) -> float:
    """This round's rule: max(1.15, FLOP ratio) + 0.05 (a preset that does more arithmetic
    than its encoders has that ratio as its floor)."""
    return max(TARGET, r["flop_ratio"]) + MARGIN


def target(r: dict) -> str:
    """``met`` when the ratio is within :func:`limit`; ``met (FLOP floor)`` when only the
    FLOP ratio's floor brings it there; else ``missed``."""
    if r["ratio"] <= TARGET + MARGIN:
        return "met"
    if r["ratio"] <= limit(r):
        return "met (FLOP floor)"
    return "missed"


def throughput(
    seg,
    archs: list[str],
    n: int,
    hw: tuple[int, int],
    size_for,
    repeats: int,
    batches: tuple[int, ...] = (1, 4),
) -> list[dict]:
    """Images per second of ``crane`` through the local engine at each batch size of
    ``batches`` (the minimum wall time of ``repeats`` interleaved runs; every output
    written)."""
    rows = []
    root = Path(tempfile.mkdtemp(prefix="zsb-all-"))
    try:
        data = root / "data"
        make_data(data, n, hw)
        for arch in archs:
            cfg = common.crane_cfg(arch, size_for(arch))
            runner(seg, data, [cfg], root / "warm", 1)  # models, text embeddings
            best = {int(bs): float("inf") for bs in batches}
            for _ in range(max(1, repeats)):  # interleaved: load changes hit both alike
                for bs in best:
                    best[bs] = min(best[bs], runner(seg, data, [cfg], root / f"b{bs}", bs)[0])
            for bs, wall in best.items():
                rows.append(dict(arch=arch, batch=bs, n=n, ips=n / wall, wall=wall))
                print(f"  crane {arch} batch {bs}: {n / wall:.3f} img/s ({wall:.1f}s)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def parse_batches(text: str) -> tuple[int, ...]:
    """``--throughput-batches``: comma-separated positive batch sizes, in order, each once."""
    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive batch sizes such as 1,4,16, got {text!r}"
        )
    return tuple(dict.fromkeys(sizes))


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_line(seg) -> str:
    """The machine the figures belong to: CPU name and kernel capability, whether bf16 is
    native, the GPU's name on CUDA, and the precision that ran (and what ``auto`` picks)."""
    from zsdense.runtime import auto_precision

    dev = seg.device
    parts = []
    if dev.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(dev)}")
    parts.append(common.cpu_line())
    auto = precision_name(auto_precision(dev)[0])
    parts.append(f"precision {precision_name(seg.dtype)} (auto picks {auto})")
    from zsdense.runtime import allocator_state

    parts.append(f"allocator {allocator_state().mode}")
    return "; ".join(parts)


def print_top(r: dict, n: int) -> None:
    """The ``n`` largest operators outside matrix products, pipeline and bare side by side."""
    for side in ("pipeline", "bare"):
        top = r[f"top_{side}"][:n]
        cells = ", ".join(f"{k.removeprefix('aten::')} {sec:.3f}s/{calls}" for k, sec, calls in top)
        print(f"    {side} non-matrix ops (self s/calls): {cells}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smallest sizes (ViT-B/16, small images)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs, minimum kept")
    ap.add_argument(
        "--min-seconds",
        type=float,
        default=10.0,
        help="fast presets repeat until each side ran about this long (at most 25 runs)",
    )
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 | auto")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--musc-images", type=int, default=None, help="set size (20; quick: 6)")
    ap.add_argument("--throughput-images", type=int, default=None, help="16 (quick: 8)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument(
        "--throughput-batches",
        type=parse_batches,
        default=(1, 4),
        help="comma-separated batch sizes of the folder throughput (1,4; on a GPU 1,4,16)",
    )
    ap.add_argument(
        "--throughput-archs",
        default=None,
        help="comma-separated CLIP archs for the folder throughput (ViT-B-16; without "
        "--quick also ViT-L-14-336)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--allocator",
        default="tuned",
        choices=ALLOCATORS,
        help="the runtime's --allocator (tuned, as the CLI; bench_allocator.py measures both)",
    )
    ap.add_argument("--models", default="random", help="random (full size) | tiny (smoke test)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PRESET.OPTION=VALUE",
        help="a preset option for this run, as the task config spells it (repeatable), e.g. "
        "hybridgl+.proposal_decoder=arranged; the row's note names it",
    )
    ap.add_argument(
        "--top",
        type=int,
        default=0,
        help="print each preset's N largest operators outside matrix products (profiled)",
    )
    args = ap.parse_args(argv)
    if (rc := common.setup_torch(args)) is not None:
        return rc
    from zsdense.api import Segmenter
    from zsdense.errors import ConfigError

    names = [p.strip() for p in args.presets.split(",") if p.strip()]  # "" : throughput only
    bad = [p for p in names if p not in PRESETS]
    if bad:
        raise ConfigError(f"unknown preset(s) {', '.join(bad)}; choose from {', '.join(PRESETS)}")
    musc_n = args.musc_images or (6 if args.quick else 20)
    seg = Segmenter(
        device=args.device,
        models=args.models,
        precision=args.precision,
        batch_size=4,
        allocator=args.allocator,
    )
    load = _load()
    print(
        f"zsdense bench_all{' --quick' if args.quick else ''}: torch {torch.__version__}, "
        f"device {args.device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load:.1f}; models {args.models}; minimum of >= {args.repeats} "
        "interleaved runs",
        flush=True,
    )
    print(f"machine: {machine_line(seg)}", flush=True)
    ref_dir = Path(tempfile.mkdtemp(prefix="zsb-refs-"))
    rows = []
    try:
        make_data(ref_dir, 2, (240, 320) if args.quick else (480, 640))
        cases = preset_cases(args.quick, musc_n, ref_dir)
        apply_settings(cases, args.set)
        for name in names:
            t = time.perf_counter()
            r = bench_preset(seg, name, cases[name], args.repeats, args.device, args.min_seconds)
            rows.append(r)
            print(
                f"  {name}: pipeline {r['pipeline']:.2f}s bare {r['bare']:.2f}s ratio "
                f"{r['ratio']:.2f} (paired {paired_cell(r)}), FLOPs {r['gflop_pipeline']:.1f} / "
                f"{r['gflop_bare']:.1f} G = "
                f"{r['flop_ratio']:.2f}; minimum of {r['runs']} runs "
                f"({time.perf_counter() - t:.0f}s incl. warm-up); outside matrix products "
                f"{r['nonmatrix']:.3f} of the bare encoders (theirs {r['nonmatrix_bare']:.3f})",
                flush=True,
            )
            if args.top:
                print_top(r, args.top)
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)
    tp_rows = []
    if not args.skip_throughput:
        archs = ["ViT-B-16"] if args.quick else ["ViT-B-16", "ViT-L-14-336"]
        if args.throughput_archs:
            archs = [a.strip() for a in args.throughput_archs.split(",") if a.strip()]
        n_tp = args.throughput_images or (8 if args.quick else 16)
        hw = (240, 320) if args.quick else (480, 640)
        tp_rows = throughput(
            seg,
            archs,
            n_tp,
            hw,
            lambda a: 224 if args.quick else (518 if "L" in a else 224),
            args.repeats,
            args.throughput_batches,
        )
    if rows:
        print()
        print(f"machine: {machine_line(seg)}; load average {_load():.1f} at the end")
        print()
        print(
            "| preset | pipeline s/img | bare encoders s/img | ratio | paired ratio: median "
            "(quartiles) | GFLOP pipeline / bare "
            "| FLOP ratio | target (limit) | non-matrix / bare (bare's own) | peak MB | precision "
            "| note |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| `{r['name']}` | {r['pipeline']:.2f} | {r['bare']:.2f} | {r['ratio']:.2f} | "
                f"{paired_cell(r)} | "
                f"{r['gflop_pipeline']:.1f} / {r['gflop_bare']:.1f} | {r['flop_ratio']:.2f} | "
                f"{target(r)} ({limit(r):.2f}) | "
                f"{r['nonmatrix']:.3f} ({r['nonmatrix_bare']:.3f}) | "
                f"{r['peak_mb']:.0f} | {r['precision']} | {r['note']} |"
            )
    if tp_rows:
        print()
        sizes = list(dict.fromkeys(t["batch"] for t in tp_rows))
        print(
            "| crane through the local engine | "
            + " | ".join(f"batch {bs} img/s" for bs in sizes)
            + " |"
        )
        print("|---" * (len(sizes) + 1) + "|")
        for arch in dict.fromkeys(t["arch"] for t in tp_rows):
            b = {t["batch"]: t["ips"] for t in tp_rows if t["arch"] == arch}
            print(f"| {arch} | " + " | ".join(f"{b[bs]:.3f}" for bs in sizes) + " |")
    if rows:
        print("non-matrix: " + " ".join(f"{r['name']}={r['nonmatrix']:.3f}" for r in rows))
    print("ratios: " + " ".join(f"{r['name']}={r['ratio']:.2f}" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
