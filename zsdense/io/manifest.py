"""``results.jsonl``: one strict-JSON line per processed image, safe against crashes.

Why: a batch run over thousands of files must be resumable. Each finished image appends one line
(flushed and fsynced) naming its input, status, outputs, scores, metadata and timing. On a rerun
:meth:`Manifest.load` gives the last record per key and :meth:`Manifest.is_complete` says whether
its outputs all exist, so completed inputs are skipped.

Keys: every record carries an explicit ``"key"`` field, ``input + suffix`` (the suffix names the
DICOM frame / NIfTI slice, ``""`` for single images). Records without one (written by hand) fall
back to ``record["input"] + record.get("suffix", "")``. The last record for a key wins.

Crash safety: a line is written with a single ``write`` call and fsynced. If the process died
mid-line, the file ends with a partial line; :meth:`load` ignores unparseable lines (and counts
them in ``skipped_lines``) and the next :meth:`append` first terminates that fragment with a
newline, so the new record is never glued onto it.

Output paths in ``record["outputs"]`` may be absolute or relative; relative ones are resolved
against the manifest's folder (the ``--out`` folder), which keeps a moved output tree valid.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from zsdense.errors import ZsdenseError
from zsdense.io.writers import dumps_strict

__all__ = ["Manifest", "record_ok", "record_error", "record_key", "is_complete"]


def record_key(record: Mapping[str, Any]) -> str:
    """The record's key: its ``"key"`` field, else ``input + suffix``."""
    key = record.get("key")
    if key is not None:
        return str(key)
    return str(record.get("input", "")) + str(record.get("suffix", "") or "")


def _output_paths(outputs: Any) -> Iterator[str]:
    if outputs is None:
        return
    if isinstance(outputs, (str, os.PathLike)):
        yield os.fspath(outputs)
    elif isinstance(outputs, Mapping):
        for v in outputs.values():
            yield from _output_paths(v)
    elif isinstance(outputs, (list, tuple)):
        for v in outputs:
            yield from _output_paths(v)


def is_complete(record: Mapping[str, Any], base: str | Path | None = None) -> bool:
    """True if the record's status is ``ok`` and every path in ``record["outputs"]`` exists.

    Relative output paths are resolved against ``base`` (the manifest folder).
    """
    if record.get("status") != "ok":
        return False
    for p in _output_paths(record.get("outputs")):
        path = Path(p)
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        if not path.is_file():
            return False
    return True


def record_ok(
    input: str | Path,
    *,
    suffix: str = "",
    outputs: Mapping[str, Any] | None = None,
    scores: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    timing: Mapping[str, Any] | None = None,
    warnings: list[str] | None = None,
    key: str | None = None,
    **extra: Any,
) -> dict:
    """The standard record of a successfully processed image (extra fields are kept)."""
    inp = str(input)
    rec = {
        "input": inp,
        "suffix": suffix,
        "key": key if key is not None else inp + suffix,
        "status": "ok",
        "error": None,
        "outputs": dict(outputs or {}),
        "scores": dict(scores or {}),
        "meta": dict(meta or {}),
        "timing": dict(timing or {}),
        "warnings": list(warnings or []),
    }
    rec.update(extra)
    return rec


def record_error(
    path: str | Path,
    exc: BaseException,
    *,
    suffix: str = "",
    meta: Mapping[str, Any] | None = None,
    timing: Mapping[str, Any] | None = None,
    warnings: list[str] | None = None,
    key: str | None = None,
) -> dict:
    """The standard record of an input that failed; ``error`` is a one-line message.

    For :class:`~zsdense.errors.ZsdenseError` the message is the error's own text (it already
    names the file and what to do); for anything else it is prefixed with the exception type.
    """
    if isinstance(exc, ZsdenseError):
        msg = str(exc)
    else:
        msg = f"{type(exc).__name__}: {exc}"
    inp = str(path)
    return {
        "input": inp,
        "suffix": suffix,
        "key": key if key is not None else inp + suffix,
        "status": "error",
        "error": msg,
        "error_type": type(exc).__name__,
        "outputs": {},
        "scores": {},
        "meta": dict(meta or {}),
        "timing": dict(timing or {}),
        "warnings": list(warnings or []),
    }


class Manifest:
    """Append-only JSON-lines file of per-image records (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped_lines = 0
        self._lock = threading.Lock()

    @property
    def base(self) -> Path:
        """Folder that relative output paths are resolved against."""
        return self.path.parent

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a strict JSON line, then flush and fsync.

        Non-finite floats become null; numpy values and paths are converted.
        """
        line = dumps_strict(record)
        if "\n" in line:  # cannot happen with json.dumps without indent; guard the format
            raise ValueError("record serialised to more than one line")
        data = (line + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size > 0:
                    with open(self.path, "rb") as f:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":  # a partial line left by a crash: close it
                            data = b"\n" + data
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)

    def records(self) -> Iterator[dict]:
        """Every parseable record in file order; unparseable lines are skipped and counted."""
        self.skipped_lines = 0
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for raw in f:
                text = raw.strip()
                if not text:
                    continue
                try:
                    rec = json.loads(text.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    self.skipped_lines += 1
                    continue
                if not isinstance(rec, dict):
                    self.skipped_lines += 1
                    continue
                yield rec

    def load(self) -> dict[str, dict]:
        """Last record per key (see :func:`record_key`)."""
        out: dict[str, dict] = {}
        for rec in self.records():
            out[record_key(rec)] = rec
        return out

    def is_complete(self, record: Mapping[str, Any]) -> bool:
        """``status == "ok"`` and every output exists (relative paths: against :attr:`base`)."""
        return is_complete(record, self.base)

    def completed_keys(self) -> set[str]:
        """Keys whose last record is complete: what a rerun can skip."""
        return {k for k, r in self.load().items() if self.is_complete(r)}
