"""Progress for long phases: a tqdm bar on a terminal, periodic plain lines otherwise.

:class:`Progress` is the batch engine's progress line (inputs of a run). :func:`phase` gives the
same display to the phases a run goes through before its first input (a calibration on
known-good images, the reference pass of a few-shot preset, building a memory bank), so none
is silent and none counts in the run's first ETA. Phases show only inside
:func:`progress_scope` (the engine opens one when its ``progress`` is on, ``zsdense memory
build`` always): a library call from Python stays quiet.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from dataclasses import dataclass
from typing import Iterator, TextIO


def fmt_eta(s: float) -> str:
    """Seconds as ``H:MM:SS`` (``?`` when unknown)."""
    if s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """tqdm (with ETA) on a terminal, periodic plain log lines otherwise.

    ``label`` names the phase (None: the run's inputs, as the engine prints them); ``unit`` is
    what is counted. The plain line always appears when the count reaches ``total``.
    """

    def __init__(
        self,
        total: int,
        enabled: bool,
        interval: float = 10.0,
        stream: TextIO | None = None,
        *,
        label: str | None = None,
        unit: str = "img",
    ):
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.last = self.t0
        self.bar = None
        self.enabled = enabled and total > 0
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.unit = unit
        self.failed = 0
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit=unit, dynamic_ncols=True, file=self.stream, desc=label
            )
        elif self.enabled and label is not None:
            print(f"zsdense: {label}: {total} {unit}(s)...", file=self.stream, flush=True)

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed = failed
        if self.bar is not None:
            self.bar.update(n)
            if failed:
                self.bar.set_postfix(failed=failed)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100 * self.done / self.total
        if self.label is None:
            text = (
                f"zsdense: {self.done}/{self.total} inputs ({pct:.0f}%), {rate:.2f}/s, "
                f"{self.failed} failed, ETA {fmt_eta(eta)}"
            )
        else:
            text = (
                f"zsdense: {self.label}: {self.done}/{self.total} {self.unit}(s) ({pct:.0f}%), "
                f"{rate:.2f}/s, ETA {fmt_eta(eta)}"
            )
        print(text, file=self.stream, flush=True)

    def set_failed(self, failed: int) -> None:
        """Correct the failed count after the last update (records written late, e.g. by a
        writer thread): the final line then agrees with the run's summary."""
        if failed == self.failed or not self.enabled:
            return
        self.failed = failed
        if self.bar is not None:
            self.bar.set_postfix(failed=failed)
        elif self.done >= self.total:
            self._line(time.monotonic())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _Scope:
    interval: float
    stream: TextIO | None


_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "zsdense_progress", default=None
)


@contextlib.contextmanager
def progress_scope(
    enabled: bool = True, interval: float = 10.0, stream: TextIO | None = None
) -> Iterator[None]:
    """Inside this block, :func:`phase` shows progress (when ``enabled``)."""
    token = _SCOPE.set(_Scope(interval, stream) if enabled else None)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def phase(label: str, total: int, unit: str = "img") -> Progress:
    """A :class:`Progress` for one phase (shown only inside an enabled :func:`progress_scope`)."""
    scope = _SCOPE.get()
    if scope is None:
        return Progress(total, False, label=label, unit=unit)
    return Progress(total, True, scope.interval, scope.stream, label=label, unit=unit)


__all__ = ["Progress", "fmt_eta", "phase", "progress_scope"]
