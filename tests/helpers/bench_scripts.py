"""The scripts of ``bench/`` in tests: they import each other as top-level modules
(``import common``), so their folder is on ``sys.path`` while a test module uses them."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


@contextlib.contextmanager
def bench_on_path() -> Iterator[Path]:
    """``bench/`` on ``sys.path`` inside, removed after."""
    sys.path.insert(0, str(BENCH))
    try:
        yield BENCH
    finally:
        sys.path.remove(str(BENCH))
