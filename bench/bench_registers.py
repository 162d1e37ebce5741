"""The cost of test-time registers (``--registers``) per preset, and ``registers find`` per image.

Full-size architectures with random weights at ``bench_all --quick``-like sizes (ViT-B/16 at
224, 240x320 images; ``--full``: ViT-L/14-336 at 518 and 480x640, as ``bench_all``), so nothing
is downloaded. Per preset, in one process:

- ``off``: the preset's task run through its engine spec (``build_task_spec(...).run``) on
  fresh image contexts, by a runtime without registers;
- ``on``: the same by a runtime with ``--registers``: a neuron file for every CLIP / DINOv2 the
  preset loads, shaped like the shipped DINOv2-L list (45 neurons in the 6 layers below three
  quarters of the depth: 17, 9, 9, 8, 1, 1; seeded, R = 1, mode ``zero``: the hooks do the same
  work whatever the neurons are);
- warm-up runs of both first (models, text embeddings, memories: once per run in real use), then
  interleaved runs (off, on, off, on, ...; at least ``--repeats`` each, more for fast presets up
  to ``--min-seconds`` per side), the minimum of each kept; their ratio ``on / off`` (target:
  at most 1.05) and the FLOP ratio (``torch.utils.flop_counter``, one untimed run each: the R
  extra tokens' arithmetic, the ratio's floor).

Then ``registers find`` per image (``registers_find.find_register_neurons``, as the command runs
it: the encoder's search preprocessing, batch 1, every layer's activations scored) on CLIP
ViT-B/16 and DINOv2-B, against the plain forward of the same images; the norm threshold is set
inside the random model's range (its 99.5th percentile) so that every image is scored.

The header names the CPU, the threads, the precision and the load average (before and after: the
machine may be shared; the minimum of interleaved runs is the least disturbed pair). The last
line is ``ratios: name=value ...`` (on / off per preset).

    python bench/bench_registers.py [--full] [--repeats 3] [--presets crane,sclip] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_all import CLASSES, REFER_TEXT  # noqa: E402
from bench_engine import make_data  # noqa: E402

PRESETS = (
    "crane",
    "crane+",
    "musc",
    "anomalydino",
    "crane+fewshot",
    "sclip",
    "clearclip",
    "naclip",
    "proxyclip",
    "trident",
    "hybridgl+",
)
TARGET = 1.05
MAX_REPEATS = 25
# the shipped DINOv2-L list's shape: neurons per layer, deepest first (layers 17..12 of 24)
HUB_SHAPE = (17, 9, 9, 8, 1, 1)


def preset_cases(full: bool, musc_images: int, ref_dir: Path) -> dict[str, dict]:
    """Per preset: the task config and the images (count, h, w)."""
    vit = "ViT-L-14-336" if full else "ViT-B-16"
    size = 518 if full else 224
    hw = (480, 640) if full else (240, 320)
    anomaly = {"task": "anomaly", "object": "object", "prompts": "ensemble"}
    crane = {"clip_arch": vit, "image_size": size}
    ov = {"task": "openvocab", "dataset": "voc20", "classes": CLASSES}
    open_filters = {"pred_iou_thresh": -1e9, "stability_score_thresh": -1e9}
    refs = {"reference": str(ref_dir)}
    cases = {
        "crane": {**anomaly, "preset": "crane", **crane},
        "crane+": {**anomaly, "preset": "crane+", **crane},
        "musc": {"task": "anomaly", "preset": "musc", **crane},
        "anomalydino": {"task": "anomaly", "preset": "anomalydino", **refs},
        "crane+fewshot": {**anomaly, "preset": "crane+fewshot", **refs},
        "hybridgl+": {"task": "refer", "preset": "hybridgl+", "text": REFER_TEXT, **open_filters},
    }
    for p in ("sclip", "clearclip", "naclip", "proxyclip", "trident"):
        cases[p] = {**ov, "preset": p}
    return {
        name: dict(cfg=cfg, n=musc_images if name == "musc" else 1, hw=hw)
        for name, cfg in cases.items()
    }


def hub_like_neurons(model, seed: int = 0):
    """A neuron set for ``model`` shaped like the shipped DINOv2-L list (module docstring)."""
    from zsdense.models import registers as R

    a = R._Adapter(model)
    top = max(0, (3 * a.num_layers) // 4 - 1)  # 17 of 24, as the shipped list
    layers = list(range(top, max(-1, top - len(HUB_SHAPE)), -1))
    g = torch.Generator().manual_seed(seed)
    neurons = {}
    for layer, count in zip(layers, HUB_SHAPE):
        neurons[layer] = torch.randperm(a.mlp_dim, generator=g)[: min(count, a.mlp_dim)].tolist()
    return R.NeuronSet(
        layers=tuple(neurons.items()),
        encoder=R.encoder_id(model),
        provenance="bench_registers: seeded, shaped like the shipped DINOv2-L list",
    )


def feature_encoders(seg) -> dict:
    """The CLIP / DINOv2 models a Segmenter's runtime served (label -> model)."""
    used = seg.runtime._models_used
    return {k: m for k, m in used.items() if k.split("/")[0] in ("clip", "dinov2")}


def bench_preset(
    seg_off, make_on, name: str, case: dict, repeats: int, device: str, min_seconds: float
) -> dict:
    """Minimum off and on seconds over interleaved runs, FLOPs of each, the neurons used."""
    from zsdense.context import ImageContext
    from zsdense.engine.specs import build_task_spec

    rng = np.random.default_rng(len(name))
    images = [common.synthetic_image(rng, *case["hw"]) for _ in range(case["n"])]
    params = [dict(case["cfg"]) for _ in images]

    def fresh():
        return [ImageContext(image=im) for im in images]

    off = build_task_spec(seg_off, case["cfg"], fmt="none", overlay=False)
    if off.setup:
        off.setup()
    off.run(fresh(), params)  # warm-up: models, text embeddings, memories
    seg_on = make_on(feature_encoders(seg_off))
    on = build_task_spec(seg_on, case["cfg"], fmt="none", overlay=False)
    if on.setup:
        on.setup()
    got = on.run(fresh(), params)
    applied = seg_on.runtime.registers_applied()
    hooked = sorted(k for k, v in applied.items() if v["registers"] == "on")
    meta = getattr(got[0], "meta", {}) or {}
    if "registers" not in meta and "registers" not in meta.get("result", {}):
        raise RuntimeError(f"{name}: the results do not record the registers")
    f_off = common.count_flops(lambda: off.run(fresh(), params))
    f_on = common.count_flops(lambda: on.run(fresh(), params))
    t_one = common.timed(lambda: off.run(fresh(), params), device)
    runs = max(1, repeats, min(MAX_REPEATS, math.ceil(min_seconds / max(t_one, 1e-3))))
    t_off, t_on = [], []
    for _ in range(runs):
        c = fresh()
        t_off.append(common.timed(lambda c=c: off.run(c, params), device))
        c = fresh()
        t_on.append(common.timed(lambda c=c: on.run(c, params), device))
    n = len(images)
    return dict(
        name=name,
        off=min(t_off) / n,
        on=min(t_on) / n,
        ratio=min(t_on) / min(t_off),
        flop_ratio=f_on / f_off if f_off else float("nan"),
        runs=runs,
        hooked=hooked,
        neurons=sum(applied[k]["neurons"] for k in hooked),
        precision=seg_off.runtime.precision,
        note=f"per image of {n}" if n > 1 else "",
    )


def bench_find(seg, encoders: list[tuple[str, str]], n_images: int, device: str) -> list[dict]:
    """``registers find`` seconds per image on each encoder vs its plain forward."""
    from zsdense.models import registers_find as rf

    rows = []
    rng = np.random.default_rng(1)
    raw = [common.synthetic_image(rng, 240, 320) for _ in range(n_images)]
    for kind, name in encoders:
        model = seg.clip(name) if kind == "clip" else seg.dinov2(name)
        prep = rf.search_preprocessing(model)
        xs = [rf.preprocess_for_search(im, **prep) for im in raw]
        with torch.no_grad():
            probe = rf.record_activations(model, xs[0][None], acts=False)
        st = rf.settings_for(model)
        thr = float(torch.quantile(probe.norms[st.detect_outliers_layer].flatten(), 0.995))
        st = rf.settings_for(model, register_norm_threshold=thr)

        def find(model=model, xs=xs, st=st):
            with torch.no_grad():
                return rf.find_register_neurons(model, xs, st, batch_size=1)

        def plain(model=model, xs=xs):
            with torch.no_grad():
                for x in xs:
                    rf.record_activations(model, x[None], acts=False)

        res = find()  # warm-up (and the counts)
        common.timed(plain, device)
        t_find, t_plain = [], []
        for _ in range(2):
            t_find.append(common.timed(find, device))
            t_plain.append(common.timed(plain, device))
        rows.append(
            dict(
                encoder=f"{kind} {name}",
                per_image=min(t_find) / n_images,
                forward=min(t_plain) / n_images,
                ratio=min(t_find) / min(t_plain),
                used=res.n_used,
                n=n_images,
            )
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="bench_all's full sizes (ViT-L/14-336)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs, minimum kept")
    ap.add_argument("--min-seconds", type=float, default=5.0, help="per side, for fast presets")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 | auto")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--musc-images", type=int, default=6)
    ap.add_argument("--find-images", type=int, default=8, help="0: skip the find timing")
    ap.add_argument("--find-encoders", default="clip:ViT-B-16,dinov2:dinov2-base")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default="random", help="random (full size) | tiny (smoke test)")
    args = ap.parse_args(argv)
    if (rc := common.setup_torch(args)) is not None:
        return rc
    from zsdense.api import Segmenter
    from zsdense.errors import ConfigError
    from zsdense.runtime import _cpu_name, cpu_capability

    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    bad = [p for p in names if p not in PRESETS]
    if bad:
        raise ConfigError(f"unknown preset(s) {', '.join(bad)}; choose from {', '.join(PRESETS)}")
    kw = dict(device=args.device, models=args.models, precision=args.precision, batch_size=4)
    seg_off = Segmenter(**kw)
    tmp = Path(tempfile.mkdtemp(prefix="zsb-reg-"))

    def make_on(encoders: dict):
        files = []
        for i, (label, model) in enumerate(sorted(encoders.items())):
            p = tmp / f"{label.replace('/', '_')}.json"
            if not p.exists():
                hub_like_neurons(model, seed=i).save(p)
            files.append(str(p))
        return Segmenter(**kw, registers=files)

    load0 = os.getloadavg()
    print(
        f"zsdense bench_registers{' --full' if args.full else ''}: {_cpu_name()} "
        f"({cpu_capability()}), torch {torch.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, precision "
        f"{seg_off.runtime.precision}, models {args.models}; load average "
        f"{load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} (1 / 5 / 15 min); minimum of >= "
        f"{args.repeats} interleaved runs",
        flush=True,
    )
    rows, find_rows = [], []
    ref_dir = tmp / "refs"
    try:
        make_data(ref_dir, 2, (480, 640) if args.full else (240, 320))
        cases = preset_cases(args.full, args.musc_images, ref_dir)
        for name in names:
            t = time.perf_counter()
            r = bench_preset(
                seg_off, make_on, name, cases[name], args.repeats, args.device, args.min_seconds
            )
            rows.append(r)
            print(
                f"  {name}: off {r['off']:.3f}s on {r['on']:.3f}s ratio {r['ratio']:.3f} "
                f"(FLOPs {r['flop_ratio']:.3f}); {r['neurons']} neurons on "
                f"{', '.join(r['hooked'])}; minimum of {r['runs']} runs "
                f"({time.perf_counter() - t:.0f}s incl. warm-up)",
                flush=True,
            )
        if args.find_images:
            encs = [tuple(e.split(":", 1)) for e in args.find_encoders.split(",") if e]
            find_rows = bench_find(seg_off, encs, args.find_images, args.device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    print()
    if rows:
        print(
            "| preset | off s/img | on s/img | on / off | FLOP ratio | target (<= 1.05) "
            "| encoders with registers | neurons | precision | note |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            met = "met" if r["ratio"] <= max(TARGET, r["flop_ratio"]) else "missed"
            print(
                f"| `{r['name']}` | {r['off']:.3f} | {r['on']:.3f} | {r['ratio']:.3f} | "
                f"{r['flop_ratio']:.3f} | {met} | {', '.join(r['hooked'])} | {r['neurons']} | "
                f"{r['precision']} | {r['note']} |"
            )
    if find_rows:
        print()
        print("| registers find | s/image | plain forward s/image | ratio | images scored |")
        print("|---|---|---|---|---|")
        for f in find_rows:
            print(
                f"| {f['encoder']} | {f['per_image']:.3f} | {f['forward']:.3f} | "
                f"{f['ratio']:.2f} | {f['used']} of {f['n']} |"
            )
    print(f"load average after: {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f}")
    print("ratios: " + " ".join(f"{r['name']}={r['ratio']:.3f}" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
