"""Atomic files and strict JSON: the one way every output of zsdense reaches the disk.

:func:`atomic_path` yields a hidden temporary file in the destination folder, renamed over the
final name with ``os.replace`` only once it is complete: a run killed mid-write leaves either
the previous file or no file, never a half-written one, so a rerun can trust that an existing
output is whole. The temporary name keeps the final extension (encoders pick the format from
it) and starts with a dot (folder listings skip it). Every file gets :func:`output_mode`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "current_umask",
    "dumps_strict",
    "output_mode",
    "to_jsonable",
    "write_json",
]


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux
    ``/proc/self/status``); else set and restored under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def output_mode() -> int:
    """The one file mode of every output: ``0o666`` minus the umask, as ``open()`` creates
    files (so a bank or checkpoint written through a library that creates 0600 files gets the
    same mode as a mask or a manifest)."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_path(final_path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; on success rename it over ``final_path``.

    Parents are created. If the body raises, the temporary file is deleted and the exception
    propagates; ``final_path`` is untouched. ``fsync=True`` also flushes the file to disk before
    the rename (for data that must survive a power loss, not only a killed process). The file
    gets :func:`output_mode` (the umask's mode) whatever created it (safetensors writes 0600).
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    name = final.name
    ext = "".join(final.suffixes[-1:])
    stem = name[: len(name) - len(ext)] if ext else name
    tmp = final.parent / f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{ext}"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic_path: nothing was written to the temporary file {tmp}")
        os.chmod(tmp, output_mode())
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def to_jsonable(obj: Any) -> Any:
    """Make ``obj`` strict-JSON-serialisable: non-finite floats -> None, numpy -> Python, Path ->
    str, tuples/sets -> lists, dict keys -> str."""
    t = type(obj)  # the common exact types first (a manifest record is mostly these)
    if t is str or t is int or t is bool or obj is None:
        return obj
    if t is float:
        return obj if math.isfinite(obj) else None
    if t is dict:
        return {k if type(k) is str else str(k): to_jsonable(v) for k, v in obj.items()}
    if t is list:
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode("ascii", errors="replace")
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def dumps_strict(obj: Any, *, indent: int | None = None) -> str:
    """Strict JSON text (no NaN/Infinity) of ``to_jsonable(obj)``."""
    return json.dumps(to_jsonable(obj), allow_nan=False, ensure_ascii=False, indent=indent)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (UTF-8), atomically; non-finite floats become null."""
    text = dumps_strict(obj, indent=indent) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
