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
