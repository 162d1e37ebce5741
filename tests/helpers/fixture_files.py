"""Reading the reference fixtures' ``.pt`` files (tests only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def load_pt(folder: Path, name: str):
    """``folder / name`` loaded with ``weights_only=True``; the test skips (saying which file)
    when it is absent."""
    p = Path(folder) / name
    if not p.is_file():
        pytest.skip(f"fixture {p} not found")
    return torch.load(p, weights_only=True)


def scalar_kernels() -> bool:
    """Whether torch runs its scalar CPU kernels (``ATEN_CPU_CAPABILITY=default``, or a CPU
    without AVX2). Their bilinear interpolation and ``normal_`` (Box–Muller) compute in another
    order than the vectorised ones the fixtures were made with: measured 1.6e-5 on resized
    values up to 3.5, and 2e-6 on normal draws; the vectorised kernels (AVX2, AVX-512) match the
    fixtures exactly."""
    return torch.backends.cpu.get_cpu_capability() == "DEFAULT"


# what the scalar kernels may differ by, where the vectorised ones are exact (see above)
SCALAR_KERNEL_TOL = 5e-5
