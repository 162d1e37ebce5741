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

# Playing a CPU of the other kind, for the whole run (this process, CLI subprocesses, Ray
# workers: they inherit the environment):
# - ZSDENSE_TEST_BF16=native|emulated: what `cpu_bf16_support()` answers, hence what
#   `--precision auto` resolves to (bf16 | fp32), through the library's $ZSDENSE_CPU_BF16;
# - ZSDENSE_TEST_THREADS=N: torch's intra-op threads (and OMP_NUM_THREADS for subprocesses);
#   MKL / oneDNN split matrix products by thread count, so an odd count moves the last bits of
#   products whose shapes differ (how "identical" claims are checked without another CPU);
# - torch's own ATEN_CPU_CAPABILITY=default|avx2|avx512 picks its vector kernels (read by torch).
_TEST_BF16 = {"native": "native", "emulated": "none", "none": "none"}
_bf16 = os.environ.get("ZSDENSE_TEST_BF16", "").strip().lower()
if _bf16:
    if _bf16 not in _TEST_BF16:
        raise pytest.UsageError(
            f"ZSDENSE_TEST_BF16={_bf16!r}: use native or emulated (or leave it unset)"
        )
    os.environ["ZSDENSE_CPU_BF16"] = _TEST_BF16[_bf16]
_threads = os.environ.get("ZSDENSE_TEST_THREADS", "").strip()
if _threads:
    import torch

    torch.set_num_threads(int(_threads))
    os.environ["OMP_NUM_THREADS"] = _threads


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """torch's thread count as each test found it: a test (or a bench it runs in-process) that
    sets another leaves the rest of the run unchanged. Results that depend on the summation
    order are compared with tolerances that hold at any thread count; this keeps one test's
    setting from reaching the next."""
    import sys

    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else None
    yield
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def pytest_report_header(config):
    import torch

    from zsdense import runtime

    sup = runtime.cpu_bf16_support()
    return (
        f"zsdense: torch {torch.__version__}, CPU capability {runtime.cpu_capability()}, "
        f"{torch.get_num_threads()} threads, bf16 {'native' if sup.native else 'not native'} "
        f"({sup.source}), precision auto -> {runtime.auto_precision(torch.device('cpu'))[0]}"
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
