"""Pieces the benchmark scripts share: peak memory per section, device sync, bare encoder
forwards on the inputs a preset's pipeline feeds them (so pipeline / bare is its overhead)."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Callable

import numpy as np
import torch


def setup_torch(args) -> int | None:
    """``--device`` / ``--threads`` of a bench's arguments: 2 (the exit status) when CUDA is asked
    for and torch has none, else None after setting torch's threads."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available to torch here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    return None


def crane_cfg(arch: str, size: int) -> dict:
    """The engine task of the folder throughput and fixed-cost runs: ``crane`` with the CLI's
    defaults on ``arch`` at ``size``."""
    return {
        "task": "anomaly",
        "preset": "crane",
        "object": "object",
        "prompts": "ensemble",
        "clip_arch": arch,
        "image_size": size,
    }


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (never goes down)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 1024.0 / 1024.0


def reset_peak(device: str) -> None:
    """Start a new peak-memory window: CUDA allocator stats, or Linux's VmHWM (clear_refs 5)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _proc_status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB; None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Resident memory now (Linux; the peak elsewhere)."""
    mb = _proc_status_mb("VmRSS")
    return peak_rss_mb() if mb is None else mb


def peak_mb(device: str) -> float:
    """Peak memory since :func:`reset_peak`: GPU allocated on CUDA, resident set (VmHWM) else."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    mb = _proc_status_mb("VmHWM")
    return peak_rss_mb() if mb is None else mb


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds of ``fn()`` (CUDA work finished before the clock stops)."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def cpu_line() -> str:
    """The CPU the figures belong to: name, CPU count, kernel capability, whether bf16 is
    native."""
    from zsdense.runtime import _cpu_name, cpu_bf16_support, cpu_capability

    sup = cpu_bf16_support()
    return (
        f"CPU {_cpu_name()} ({os.cpu_count()} CPUs, capability {cpu_capability()}, "
        f"bf16 {'native' if sup.native else 'emulated'}: {sup.detail})"
    )


def synthetic_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float32 HxWx3 image in [0, 1] with some structure (blocks plus noise)."""
    base = rng.random((max(1, h // 16), max(1, w // 16), 3))
    img = np.kron(base, np.ones((16, 16, 1)))[:h, :w]
    img = np.pad(img, ((0, h - img.shape[0]), (0, w - img.shape[1]), (0, 0)), mode="edge")
    return np.clip(0.8 * img + 0.2 * rng.random((h, w, 3)), 0, 1).astype(np.float32)


# ---- bare encoder forwards per pipeline ---------------------------------------------------


@torch.no_grad()
def bare_anomaly(seg, ctxs, clip_arch: str, image_size: int, dino_name: str | None) -> None:
    """Crane / Crane+ / MuSc: the plain CLIP vision forward on the model input [+ DINOv2]."""
    from zsdense.dense.crane import dino_input_from_clip
    from zsdense.tasks.common import model_input

    clip = seg.clip(clip_arch)
    with seg.autocast():
        x = clip.normalize(model_input(ctxs, image_size, seg.device))
        clip.encode_image_global(x, "bilinear")
        if dino_name:
            dino = seg.dinov2(dino_name)
            dino.patch_features(dino.normalize(dino_input_from_clip(x, clip.mean, clip.std)))


@torch.no_grad()
def bare_fewshot(seg, ctxs, dino_name: str, image_size: int, pos_interp: str = "auto") -> None:
    """AnomalyDINO: the plain DINOv2 forward on each test image as the scorer prepares it."""
    from zsdense.tasks import fewshot as fs

    dino = seg.dinov2(dino_name)
    mode = fs.resolve_pos_interp(dino, pos_interp)
    with seg.autocast():
        for ctx in ctxs:
            x, _ = fs.prepare_image(ctx.image_u8, image_size, dino.patch_size)
            dino.tokens(x[None].to(seg.device), pos_interp=mode)


@torch.no_grad()
def bare_openvocab(seg, ctx, cfg) -> None:
    """Trident / ProxyCLIP: CLIP and DINOv2 on the pipeline's windows [+ one SAM encoder pass]."""
    from zsdense.dense import windows as win
    from zsdense.tasks.openvocab import mmseg_resize_hw, resize_image, vfm_on_clip_windows

    clip = seg.clip(cfg.clip_arch)
    size = mmseg_resize_hw(ctx.size, cfg.short_side, cfg.max_long_side)
    with seg.autocast():
        x = clip.normalize(resize_image(ctx.image, size).to(seg.device))
        if cfg.method == "trident":
            x = win.trident_resize(x, clip.patch_size, cfg.crop)
            wb = win.make_windows(x, cfg.crop, cfg.stride, pad_multiple=None)
        else:
            wb = win.make_windows(x, cfg.crop, cfg.stride, pad_multiple=cfg.pad_multiple)
        clip.head(clip.run_blocks(clip.embed(wb.images, "bicubic-scale")))
        if cfg.vfm:
            vfm_on_clip_windows(seg.dinov2(cfg.vfm))(wb.images)
        if cfg.sam_arch:
            seg.sam(cfg.sam_arch).encode(ctx.image_u8, capture_last_attn=False)


@torch.no_grad()
def bare_refer(seg, ctx, cfg, n_views: int) -> None:
    """HybridGL: one SAM encoder pass, the plain CLIP forward of the 2N mask views, and the
    plain CLIP forward of the whole image that the heat map's dense features come from."""
    clip = seg.clip(cfg.clip_arch)
    size = cfg.view_size or clip.native_size
    heat = cfg.heat_size or clip.native_size
    with seg.autocast():
        seg.sam(cfg.sam_arch).encode(ctx.image_u8, capture_last_attn=False)
        views = torch.rand(max(1, n_views), 3, size, size, device=seg.device)
        clip.encode_image_global(clip.normalize(views), "bilinear")
        whole = torch.rand(1, 3, heat, heat, device=seg.device)
        clip.encode_image_global(clip.normalize(whole), "bilinear")


# ---- FLOP counts -------------------------------------------------------------------------


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, *args, out_shape=None, **kw):
    """``nn.MultiheadAttention``'s fused inference kernel: the q/k/v projections, the two
    attention products and the output projection (2 FLOPs per multiply-add)."""
    *lead_q, lq, e = query_shape
    *_, s, _ = key_shape
    b = 1
    for d in lead_q:
        b *= d
    proj = 2 * b * e * e * (lq + 2 * s + lq)  # q, k, v and the output projection
    return proj + 4 * b * lq * s * e


def count_flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of ``fn()`` counted by ``torch.utils.flop_counter`` (matrix
    products, convolutions, attention: 2 per multiply-add; element-wise work is not counted).
    torch's table lacks the CPU flash-attention kernel and ``nn.MultiheadAttention``'s fused
    inference kernel, which are added here."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_sdpa_flops
    mha = getattr(torch.ops.aten, "_native_multi_head_attention", None)
    if mha is not None:
        mapping[mha] = _native_mha_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return float(fc.get_total_flops())


# ---- time outside matrix products, convolutions and attention ----------------------------

# Operators whose own time is arithmetic that gets faster with the precision (matrix products,
# convolutions, attention kernels). Everything else (element-wise work, copies, reductions,
# resizes, indexing, Python between operators) is "non-matrix" time.
MATRIX_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::_addmm_activation",
        "aten::bmm",
        "aten::baddbmm",
        "aten::addbmm",
        "aten::matmul",
        "aten::linear",
        "aten::einsum",
        "aten::tensordot",
        "aten::dot",
        "aten::mv",
        "aten::addmv",
        "aten::conv1d",
        "aten::conv2d",
        "aten::conv3d",
        "aten::conv_transpose2d",
        "aten::convolution",
        "aten::_convolution",
        "aten::mkldnn_convolution",
        "aten::mkldnn_linear",
        "aten::_mkl_linear",
        "aten::slow_conv2d_forward",
        "aten::_slow_conv2d_forward",
        "aten::slow_conv_transpose2d",
        "aten::_nnpack_spatial_convolution",
        "aten::cudnn_convolution",
        "aten::cudnn_convolution_transpose",
        "aten::convolution_overrideable",
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
        "aten::_native_multi_head_attention",
    }
)


def is_matrix_op(name: str) -> bool:
    return name in MATRIX_OPS


def profile_by_op(fn: Callable[[], object], device: str = "cpu") -> dict:
    """One profiled run of ``fn()`` (``torch.profiler``, by operator): its wall seconds, the
    seconds spent inside matrix products / convolutions / attention (their own time: on CPU the
    operators' self CPU time, on CUDA their kernels' device time), the rest (``nonmatrix``:
    wall minus matrix, so Python between operators counts as non-matrix), and the operators
    outside the matrix set by self time, largest first (``top``: (name, seconds, calls); the
    matrix operators likewise in ``top_matrix``)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    matrix = 0.0
    others: list[tuple[str, float, int]] = []
    mats: list[tuple[str, float, int]] = []
    for ev in prof.key_averages():
        own = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / 1e6
        if is_matrix_op(ev.key):
            matrix += own
            mats.append((ev.key, own, ev.count))
        elif own > 0:
            others.append((ev.key, own, ev.count))
    others.sort(key=lambda r: -r[1])
    mats.sort(key=lambda r: -r[1])
    return dict(
        wall=wall, matrix=matrix, nonmatrix=max(0.0, wall - matrix), top=others, top_matrix=mats
    )
