"""Device and precision selection, guarded so CPU runs never touch CUDA APIs."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps if available, else cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from zsdense.errors import ConfigError

        raise ConfigError(f"--device {device} was asked for but CUDA is not available here")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for a device. ``auto``: fp32 on CPU/MPS; bf16 on CUDA if supported,
    else fp16. fp32 is the reference path every fixture is matched on."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast for reduced precision; a no-op for fp32 (and for fp16 on CPU, unsupported)."""
    if dtype == torch.float32:
        with torch.no_grad():
            yield
        return
    if device.type == "cpu" and dtype == torch.float16:
        from zsdense.errors import ConfigError

        raise ConfigError("--precision fp16 is not supported on CPU; use bf16 or fp32")
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=dtype):
        yield
