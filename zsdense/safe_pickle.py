"""Load annotation pickles (RefCOCO's ``refs(unc).p``) without executing anything.

A pickle can name any importable callable and call it while loading (``os.system``,
``builtins.open``, ...). The only opcodes that reach such callables go through
``Unpickler.find_class`` (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*), so :class:`SafeUnpickler`
refuses every ``find_class`` call and every persistent id. What can still appear are the
objects the pickle machine builds by itself: dicts, lists, tuples, str, bytes, int, float,
bool, None (and sets/frozensets of protocol 4+). Python 2 pickles (RefCOCO's are) load with
their byte strings decoded as UTF-8, falling back to Latin-1.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import IO, Any

from zsdense.errors import InputError

__all__ = ["SafeUnpickler", "safe_load", "safe_load_path"]


class _Refused(pickle.UnpicklingError):
    """A pickle asked for a global or a persistent object."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global at all: only builtin data can come out."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"the pickle references {module}.{name}; only plain data is accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("the pickle references a persistent object; only plain data is accepted")


def _load(data: bytes, encoding: str) -> Any:
    return SafeUnpickler(io.BytesIO(data), encoding=encoding).load()


def safe_load(fileobj: IO[bytes], name: str | None = None) -> Any:
    """Unpickle plain data (containers, strings, numbers, bools, None) from a binary file.

    Raises :class:`~zsdense.errors.InputError` naming the file when the pickle references any
    class or function, or is corrupt; nothing it names is imported or called.
    """
    label = name or getattr(fileobj, "name", "<pickle>")
    data = fileobj.read()
    try:
        try:
            return _load(data, "utf-8")
        except UnicodeDecodeError:
            return _load(data, "latin-1")
    except _Refused as exc:
        raise InputError(
            label,
            f"refused to load: {exc}. Convert the annotations to JSON, or "
            "use the original RefCOCO pickle",
        ) from None
    except Exception as exc:  # corrupt/truncated data: any of many exception types
        raise InputError(
            label, f"not a readable annotation pickle ({type(exc).__name__}: {exc})"
        ) from None


def safe_load_path(path: str | Path) -> Any:
    """:func:`safe_load` on a file path."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return safe_load(f, str(p))
    except OSError as exc:
        raise InputError(p, f"cannot read ({exc.strerror})") from None
