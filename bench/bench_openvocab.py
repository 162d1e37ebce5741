"""Trident open-vocabulary timing and memory per image, against its bare encoders.

Full-size architectures with random weights (CLIP ViT-B/16, DINOv2-with-registers base, SAM
ViT-B; no downloads). For each image it prints Trident's total time (``run_open_vocab``, text
classifier already cached), the bare forward time of its encoders on the same inputs (CLIP on all
windows + DINOv2 on all windows + one SAM encoder pass), their ratio (target <= 1.15 on CPU at
the VOC preset size: ``--dataset voc20``, short side 336), and peak memory with and without row
chunking of the SAM aggregation: the whole process's peak resident set (each mode in its own
child process so peaks don't mix) and the aggregation's own extra memory (a child that runs only
the aggregation on a SAM-sized attention tensor of the image's grid). Times are the minimum over
``--repeat`` runs (the machine may be shared). Usage::

    python bench/bench_openvocab.py [--images N] [--repeat R] [--dataset voc20] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CLASSES = "background: sky; wall; tree; grass; road, person, cat, dog, car, chair, sofa"


def build_models():
    """A Segmenter on the full-size architectures with random weights, and its encoders."""
    from zsdense.api import Segmenter

    seg = Segmenter(device="cpu", models="random", precision="fp32")
    return seg, seg.clip("ViT-B-16"), seg.dinov2("dinov2-reg-base"), seg.sam("vit_b")


def images(n: int, first: int = 0) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    files = sorted((REPO / "assets" / "scenes").glob("*.png"))[first : first + n]
    out = [
        (f.name, np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0) for f in files
    ]
    rng = np.random.default_rng(0)
    while len(out) < n:  # generated scenes when the assets are missing
        arr = np.full((240, 320, 3), 0.45, np.float32) + rng.normal(0, 0.05, (240, 320, 3))
        out.append((f"generated{len(out)}", np.clip(arr, 0, 1).astype(np.float32)))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def agg_child(args) -> None:
    """Extra memory of the SAM aggregation alone on a (12, 4096, 4096) attention tensor."""
    from zsdense.dense.aggregation import sam_aggregation

    torch.set_num_threads(args.threads)
    hs, ws = args.grid
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(12, 4096, 4096, generator=g)
    attn.div_(attn.sum(-1, keepdim=True))  # rows like a softmax, one allocation
    v = torch.randn(12, 64, 64, 64, generator=g)
    tokens = torch.randn(hs * ws, 768, generator=g)
    before = rss_mb()
    t = time.perf_counter()
    sam_aggregation(tokens, attn, v, valid_hw=(hs, ws), chunk_rows=args.chunk or None)
    dt = time.perf_counter() - t
    print("RESULT " + json.dumps({"extra_mb": max(0.0, peak_rss_mb() - before), "agg_s": dt}))


@torch.no_grad()
def bare_encoders(clip, dino, sam, ctx, cfg) -> dict:
    """Plain forwards on Trident's inputs: CLIP and DINOv2 on the same windows, SAM once."""
    from zsdense.dense import windows as win
    from zsdense.tasks.openvocab import mmseg_resize_hw, resize_image, vfm_on_clip_windows

    size = mmseg_resize_hw(ctx.size, cfg.short_side, cfg.max_long_side)
    x = clip.normalize(resize_image(ctx.image, size))
    x = win.trident_resize(x, clip.patch_size, cfg.crop)
    wb = win.make_windows(x, cfg.crop, cfg.stride, pad_multiple=None)
    out: dict = {"windows": len(wb.boxes)}
    for name, fn in (
        ("clip", lambda: clip.head(clip.run_blocks(clip.embed(wb.images, "bicubic-scale")))),
        ("dino", lambda: vfm_on_clip_windows(dino)(wb.images)),
        ("sam", lambda: sam.encode(ctx.image_u8, capture_last_attn=False)),
    ):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out[f"{name}_s"] = time.perf_counter() - t
        out[f"{name}_cpu"] = time.process_time() - c
    return out


def child(args) -> None:
    from zsdense.config import openvocab_preset
    from zsdense.context import ImageContext
    from zsdense.tasks.openvocab import run_open_vocab
    from zsdense.text.classifier import build_classifier, parse_classes

    torch.set_num_threads(args.threads)
    chunk = None if args.chunk <= 0 else args.chunk
    seg, clip, dino, sam = build_models()
    cfg = openvocab_preset("trident", args.dataset, chunk_rows=chunk)
    imgs = images(args.images, args.first)
    # the text classifier is built once per class list (cached), not per image
    build_classifier(clip, parse_classes(CLASSES), cache=seg.text_cache)
    base = peak_rss_mb()
    for name, img in imgs:
        rec: dict = {}
        for _ in range(args.repeat):
            ctx = ImageContext(image=img)
            t, c = time.perf_counter(), time.process_time()
            r = run_open_vocab(
                seg,
                [ctx],
                classes=CLASSES,
                preset="trident",
                dataset=args.dataset,
                chunk_rows=chunk,
            )[0]
            total, total_cpu = time.perf_counter() - t, time.process_time() - c
            rec["total_s"] = min(total, rec.get("total_s", float("inf")))
            rec["total_cpu"] = min(total_cpu, rec.get("total_cpu", float("inf")))
            del ctx
            if args.bare:
                b = bare_encoders(clip, dino, sam, ImageContext(image=img), cfg)
                for k, val in b.items():
                    timed = k.endswith("_s") or k.endswith("_cpu")
                    rec[k] = min(val, rec.get(k, float("inf"))) if timed else val
        rec.update(
            {
                "image": name,
                "hw": list(img.shape[:2]),
                "peak_rss_mb": peak_rss_mb(),
                "rss_after_warmup_mb": base,
                "sam_grid": r.meta.get("sam_grid"),
            }
        )
        print("RESULT " + json.dumps(rec), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per image; minimum reported")
    ap.add_argument("--first", type=int, default=0, help="index of the first assets/scenes image")
    ap.add_argument("--dataset", default="voc20", help="dataset preset (voc20: short side 336)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1024, help="rows of W per chunk (0: none)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--agg", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grid", type=int, nargs=2, default=(48, 64), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agg:
        agg_child(args)
        return
    if args.child:
        child(args)
        return

    def launch(extra: list[str]) -> list[dict]:
        cmd = [sys.executable, __file__, "--threads", str(args.threads), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"child {extra} failed")
        return [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]

    runs = {}
    for mode, chunk, bare in (("chunked", args.chunk, True), ("unchunked", 0, False)):
        t = time.perf_counter()
        extra = [
            "--child",
            "--images",
            str(args.images),
            "--first",
            str(args.first),
            "--dataset",
            args.dataset,
            "--chunk",
            str(chunk),
            "--repeat",
            str(args.repeat if bare else 1),
        ]
        runs[mode] = launch(extra + (["--bare"] if bare else []))
        print(f"[{mode}: child process {time.perf_counter() - t:.0f}s]", flush=True)
    for rec in runs["chunked"]:
        grid = [str(g) for g in rec["sam_grid"]]
        rec["agg_chunked"] = launch(["--agg", "--grid", *grid, "--chunk", str(args.chunk)])[0]
        rec["agg_unchunked"] = launch(["--agg", "--grid", *grid, "--chunk", "0"])[0]
    print(
        f"Trident ({args.dataset} preset), CPU, {args.threads} threads, full-size random "
        f"weights (CLIP ViT-B/16, DINOv2-reg-base, SAM ViT-B); chunk_rows={args.chunk}"
    )
    hdr = (
        f"{'image':<15}{'size':>8}{'grid':>6}{'win':>4} {'clock':>6}{'total':>7}{'clip':>6}"
        f"{'dino':>6}{'sam':>7}{'bare':>7}{'ratio':>7} | {'peak MB chunk/none':>18} | "
        f"{'agg extra MB chunk/none':>23}{'agg s':>11}"
    )
    print(hdr)
    for a, b in zip(runs["chunked"], runs["unchunked"]):
        ac, au = a["agg_chunked"], a["agg_unchunked"]
        for clock, suf in (("cpu", "_cpu"), ("wall", "_s")):
            bare = a["clip" + suf] + a["dino" + suf] + a["sam" + suf]
            head = (
                f"{a['image'][:14]:<15}{'x'.join(map(str, a['hw'])):>8}"
                f"{'x'.join(map(str, a['sam_grid'])):>6}{a['windows']:>4}"
            )
            line = (
                f"{head if suf == '_cpu' else ' ' * len(head)} {clock:>6}"
                f"{a['total' + suf]:>7.2f}{a['clip' + suf]:>6.2f}{a['dino' + suf]:>6.2f}"
                f"{a['sam' + suf]:>7.2f}{bare:>7.2f}{a['total' + suf] / bare:>7.3f}"
            )
            if suf == "_cpu":
                line += (
                    f" | {a['peak_rss_mb']:>8.0f} /{b['peak_rss_mb']:>8.0f} | "
                    f"{ac['extra_mb']:>10.0f} /{au['extra_mb']:>10.0f}"
                    f"{ac['agg_s']:>5.2f}/{au['agg_s']:.2f}"
                )
            print(line)
        print(f"{'':<33}unchunked run: total {b['total_s']:.2f} s wall, {b['total_cpu']:.2f} s cpu")
    print(
        "total = run_open_vocab (text classifier cached); bare = CLIP + DINOv2 on the same "
        "windows + one SAM encoder pass without capture; seconds, minima over runs; cpu = "
        "process CPU time (robust on a shared machine), wall = elapsed.\n"
        "peak MB = the process's peak resident set after the image (the SAM attention capture "
        "in the hook, heads x 4096 x 4096 float32 plus its temporaries, sets it in both "
        "modes); agg extra MB = the aggregation's own extra memory on that grid."
    )


if __name__ == "__main__":
    main()
