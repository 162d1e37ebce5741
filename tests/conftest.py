"""Shared pytest fixtures: paths to ../shared fixtures and the bundled assets, a tiny Segmenter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HELPERS = Path(__file__).resolve().parent / "helpers"

# Test-only heads (engine_dummy) live in tests/helpers, not in the installed package: make them
# importable here, in CLI subprocesses and in Ray workers.
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HELPERS), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: reference fixtures unavailable")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir):
    def get(method: str) -> Path:
        d = shared_dir / "fixtures" / method
        if not d.is_dir():
            pytest.skip(f"reference fixtures for {method} not found at {d}")
        return d

    return get


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return REPO / "assets"


@pytest.fixture(scope="session")
def tiny_seg():
    from zsdense.api import Segmenter

    return Segmenter(device="cpu", models="tiny", precision="fp32")
