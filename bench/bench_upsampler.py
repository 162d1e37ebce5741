"""``--upsampler jafar``: what JAFAR costs next to the encoder it follows, and per preset.

One run, one process, full-size architectures with random weights (``--models random``: the
times are the real models' times; the maps mean nothing) and random-weight JAFAR upsamplers of
the released shape (qk 128, 4 heads) for each encoder's width:

1. **JAFAR against its encoder** (DINOv2 ViT-S/14 on a 448² image, a 32² grid: AnomalyDINO's
   input; CLIP ViT-B/16 on a 336² window, a 21² grid: the open-vocabulary windows), per
   precision (fp32, and bf16 where this CPU has native bf16 — as ``--precision auto`` runs):
   the encoder's forward as the preset runs it, the extra forward that gives JAFAR the features
   it was trained on, and JAFAR itself at 2×, 4× and 8× the grid; each as CPU seconds (min over
   interleaved repeats), as a ratio to the encoder forward, and in GFLOP (counted:
   ``torch.utils.flop_counter``, independent of the machine's load); plus JAFAR's peak extra
   resident memory per scale.
2. **per preset**: one image end to end (``Segmenter.anomaly`` / ``open_vocab``) with
   ``--upsampler bilinear`` and ``jafar:FILE`` (the preset family's default scale, and the ones
   of ``--anomaly-scales``), the ratio jafar / bilinear, and the peak extra memory of the call.

The machine may be shared: the load average is printed at the start and the end, every
measurement is repeated ``--repeats`` times interleaved with the others, and the minimum process
CPU time is kept (``--threads`` torch threads; 1 by default, so CPU time ≈ the work done).

    python bench/bench_upsampler.py [--repeats 3] [--threads 1] [--presets anomalydino,sclip]
    python bench/bench_upsampler.py --models tiny --quick      (smoke run, seconds)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCALES = (2, 4, 8)


def _load() -> str:
    try:
        a, b, c = os.getloadavg()
        return f"{a:.2f} {b:.2f} {c:.2f} ({os.cpu_count()} CPUs)"
    except OSError:
        return "unknown"


class Timer:
    """Interleaved measurements: each named item keeps its minimum CPU and wall seconds and the
    largest peak extra memory (VmHWM after clear_refs, minus the resident set before) of its
    calls after the first (which loads models, builds banks, copies modules; kept when it is
    the only call). Memory the allocator kept from earlier calls is not counted again: this is
    what a call adds to a process that already ran the pipeline."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._mem: dict[str, list[float]] = {}

    @property
    def mem(self) -> dict[str, float]:
        return {k: max(v[1:] or v) for k, v in self._mem.items()}

    def __call__(self, name: str, fn):
        common.sync(self.device)
        if self.device == "cpu":
            before = common.current_rss_mb()
        else:
            before = torch.cuda.memory_allocated() / 2**20
        common.reset_peak(self.device)
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        common.sync(self.device)
        c, w = time.process_time() - c, time.perf_counter() - w
        extra = common.peak_mb(self.device) - before
        self.cpu[name] = min(self.cpu.get(name, float("inf")), c)
        self.wall[name] = min(self.wall.get(name, float("inf")), w)
        self._mem.setdefault(name, []).append(extra)
        return out


def _jafar_file(folder: Path, v_dim: int, qk: int, name: str) -> Path:
    from zsdense.dense.jafar import JAFAR, JafarConfig
    from zsdense.train.checkpoint import save_jafar

    torch.manual_seed(v_dim)
    return save_jafar(JAFAR(JafarConfig(v_dim=v_dim, qk_dim=qk)), folder / f"{name}.pth")


def _precisions(args) -> list[str]:
    from zsdense.runtime import cpu_bf16_support

    out = []
    for p in args.precisions.split(","):
        if p == "bf16" and args.device == "cpu" and not cpu_bf16_support().native:
            print("bf16: skipped (this CPU has no native bf16)")
            continue
        out.append(p)
    return out


# ---- 1. JAFAR against the encoder forward ------------------------------------------------------


def _jafar_call(up, x, feats, side: int):
    """JAFAR alone (the features given): the upsampler's own cost at ``side``²."""
    return lambda: up.apply(x, feats, (side, side))


def encoder_section(args, files: dict, timer: Timer) -> list[dict]:
    from zsdense.dense.upsamplers import load_upsampler
    from zsdense.models.jafar_backbone import jafar_features
    from zsdense.runtime import Runtime
    from zsdense.tasks.fewshot import resolve_pos_interp

    rows = []
    cases = []
    for prec in _precisions(args):
        rt = Runtime(models=args.models, device=args.device, precision=prec)
        dino = rt.dinov2("dinov2-small")
        clip = rt.clip("ViT-B-16")
        side_d = args.dino_image // dino.patch_size * dino.patch_size
        side_c = args.clip_window // clip.patch_size * clip.patch_size
        g = torch.Generator().manual_seed(0)
        xd = torch.randn(1, 3, side_d, side_d, generator=g).to(rt.device)
        xc = torch.randn(1, 3, side_c, side_c, generator=g).to(rt.device)
        mode = resolve_pos_interp(dino, "auto")

        def dino_fwd(dino=dino, xd=xd, mode=mode):
            return dino.tokens(xd, pos_interp=mode)

        def clip_fwd(clip=clip, xc=xc):
            from zsdense.dense.lastblock import dense_clip_features

            return dense_clip_features(clip, xc, "sclip")  # SCLIP's window forward

        for label, enc, x, fwd, file in (
            (f"DINOv2 ViT-S/14 {side_d}²", dino, xd, dino_fwd, files["dino"]),
            (f"CLIP ViT-B/16 {side_c}²", clip, xc, clip_fwd, files["clip"]),
        ):
            up = load_upsampler(rt, f"jafar:{file}", enc)
            grid = side_d // enc.patch_size if enc is dino else side_c // enc.patch_size
            feats = jafar_features(enc, x)
            cases.append((prec, label, rt, enc, x, fwd, up, grid, feats))
    # interleaved repeats (the first call of each warms the kernels up and is also measured)
    for _ in range(args.repeats):
        for prec, label, rt, enc, x, fwd, up, grid, feats in cases:
            key = f"{prec}|{label}"
            with torch.no_grad(), rt.autocast():
                timer(f"{key}|forward", fwd)
                timer(f"{key}|features", lambda enc=enc, x=x: jafar_features(enc, x))
                for s in SCALES:
                    timer(f"{key}|x{s}", _jafar_call(up, x, feats, s * grid))
    for prec, label, rt, _enc, x, fwd, up, grid, feats in cases:
        key = f"{prec}|{label}"
        with torch.no_grad(), rt.autocast():
            fl_fwd = common.count_flops(fwd)
            fl = {s: common.count_flops(_jafar_call(up, x, feats, s * grid)) for s in SCALES}
        base = timer.cpu[f"{key}|forward"]
        row = {
            "precision": prec,
            "encoder": label,
            "grid": grid,
            "forward_s": base,
            "features_s": timer.cpu[f"{key}|features"],
            "forward_gflop": fl_fwd / 1e9,
        }
        for s in SCALES:
            row[f"x{s}_s"] = timer.cpu[f"{key}|x{s}"]
            row[f"x{s}_ratio"] = timer.cpu[f"{key}|x{s}"] / base
            row[f"x{s}_gflop"] = fl[s] / 1e9
            row[f"x{s}_mb"] = timer.mem[f"{key}|x{s}"]
        rows.append(row)
    print(
        "\n| precision | encoder (grid) | forward | JAFAR's features | "
        + " | ".join(f"JAFAR {s}×" for s in SCALES)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(SCALES))
    for r in rows:
        cells = [
            f"{r[f'x{s}_s']:.2f} s = {r[f'x{s}_ratio']:.2f}× fwd, "
            f"{r[f'x{s}_gflop']:.0f} GFLOP, +{r[f'x{s}_mb']:.0f} MB"
            for s in SCALES
        ]
        print(
            f"| {r['precision']} | {r['encoder']} ({r['grid']}²) | {r['forward_s']:.2f} s, "
            f"{r['forward_gflop']:.0f} GFLOP | {r['features_s']:.2f} s | "
            + " | ".join(cells)
            + " |"
        )
    return rows


# ---- 2. per preset ---------------------------------------------------------------------------


def preset_section(args, files: dict, timer: Timer, folder: Path) -> list[dict]:
    from zsdense import Segmenter

    rng = np.random.default_rng(0)
    h, w = args.image_hw
    image = common.synthetic_image(rng, h, w)
    good_images = [common.synthetic_image(rng, h, w) for _ in range(args.shots)]
    presets = [p for p in args.presets.split(",") if p]
    calls = []
    for prec in _precisions(args):
        seg = Segmenter(models=args.models, device=args.device, precision=prec)
        good = good_images
        if args.quick:  # a small memory (the default is 448 px and 8 rotations per good image)
            from zsdense.tasks.fewshot import FewShotOptions, build_memory

            small = FewShotOptions(image_size=args.dino_image, rotation=False)
            good = build_memory(seg.runtime, good, small)
        for preset in presets:
            if preset == "anomalydino":
                variants = [("bilinear", None)] + [
                    (f"jafar:{files['dino']}", s) for s in args.scales
                ]

                def call(seg=seg, up="bilinear", s=None, good=good):
                    kw = {} if s is None else {"upsampler_scale": s}
                    return seg.anomaly(
                        image, preset="anomalydino", reference=good, upsampler=up, **kw
                    )
            else:
                variants = [("bilinear", None), (f"jafar:{files['clip']}", None)]

                def call(seg=seg, up="bilinear", s=None, preset=preset):
                    kw = {} if s is None else {"upsampler_scale": s}
                    return seg.open_vocab(
                        image, "cat, grass, sky, road", preset=preset, upsampler=up,
                        short_side=args.short_side, **kw,
                    )  # fmt: skip

            for up, s in variants:
                calls.append((prec, preset, up, s, call))
    # the first round loads the models, builds the memory bank and loads the upsamplers: the
    # minimum over the rounds (at least 2) is a warm call
    results = {}
    for _ in range(max(2, args.repeats)):
        for prec, preset, up, s, call in calls:
            key = f"{prec}|{preset}|{up}|{s}"
            results[key] = timer(key, lambda call=call, up=up, s=s: call(up=up, s=s))
    rows = []
    for prec, preset, up, s, _call in calls:
        res = results[f"{prec}|{preset}|{up}|{s}"]
        scale = (res.meta.get("upsampler") or {}).get("scale")
        base = timer.cpu[f"{prec}|{preset}|bilinear|None"]
        t = timer.cpu[f"{prec}|{preset}|{up}|{s}"]
        rows.append(
            {
                "precision": prec,
                "preset": preset,
                "upsampler": "bilinear" if up == "bilinear" else f"jafar {scale}×",
                "cpu_s": t,
                "wall_s": timer.wall[f"{prec}|{preset}|{up}|{s}"],
                "ratio": t / base,
                "extra_mb": timer.mem[f"{prec}|{preset}|{up}|{s}"],
            }
        )
    print("\n| precision | preset | upsampler | CPU s | wall s | ratio | peak extra MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['precision']} | {r['preset']} | {r['upsampler']} | {r['cpu_s']:.2f} | "
            f"{r['wall_s']:.2f} | {r['ratio']:.2f} | {r['extra_mb']:.0f} |"
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="random", help="random (full size) or tiny (smoke)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="anomalydino,sclip,proxyclip")
    ap.add_argument("--scales", default="2,4", help="anomalydino scales besides bilinear")
    ap.add_argument("--dino-image", type=int, default=448)
    ap.add_argument("--clip-window", type=int, default=336)
    ap.add_argument("--image", default="336x448", help="the preset image, HxW")
    ap.add_argument("--short-side", type=int, default=336)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--skip-encoders", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke runs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.dino_image, args.clip_window, args.image, args.short_side = 56, 64, "64x96", 64
    args.image_hw = tuple(int(v) for v in args.image.lower().split("x"))
    args.scales = [int(v) for v in str(args.scales).split(",") if v]
    torch.set_num_threads(args.threads)
    from zsdense.runtime import Runtime, _cpu_name, cpu_bf16_support, cpu_capability

    sup = cpu_bf16_support()
    print(
        f"bench_upsampler: {_cpu_name()}, torch {torch.__version__}, {cpu_capability()}, "
        f"native bf16: {sup.native} ({sup.detail}); {args.threads} torch thread(s); "
        f"models={args.models}; device {args.device}"
    )
    print(f"load average at start: {_load()}")
    rt = Runtime(models=args.models, device=args.device, precision="fp32")
    timer = Timer(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        qk = 32 if args.models == "tiny" else 128
        files = {
            "dino": _jafar_file(folder, int(rt.dinov2("dinov2-small").width), qk, "dino"),
            "clip": _jafar_file(folder, int(rt.clip("ViT-B-16").width), qk, "clip"),
        }
        enc_rows = [] if args.skip_encoders else encoder_section(args, files, timer)
        pre_rows = preset_section(args, files, timer, folder) if args.presets else []
    print(f"load average at end: {_load()}")
    summary = []
    for r in enc_rows:
        summary.append(
            f"{r['precision']}:{r['encoder'].split()[0]}="
            + "/".join(f"{r[f'x{s}_ratio']:.2f}" for s in SCALES)
        )
    for r in pre_rows:
        if r["upsampler"] != "bilinear":
            summary.append(
                f"{r['precision']}:{r['preset']}:{r['upsampler'].replace(' ', '')}={r['ratio']:.2f}"
            )
    print("ratios: " + " ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
