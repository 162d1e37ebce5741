"""Expand the CLI's DATA arguments (files, folders, glob patterns) into a list of inputs.

Rules:

* A **file** named directly is always included, whatever its extension, so that a bad file gives
  an error record instead of being silently skipped. Its ``rel`` is its name.
* A **folder** is walked recursively in sorted order; hidden files and folders (name starting with
  ``.``) are skipped, and only files with a supported extension are picked up (plus files without
  an extension that carry the DICOM ``DICM`` signature: DICOM series often have bare names).
  ``rel`` is the path relative to the folder.
* A **glob pattern** (``*``, ``?``, ``[...]``; ``**`` crosses folders) is expanded in sorted
  order; matched files are filtered like folder contents and matched folders are walked. ``rel``
  is relative to the pattern's root (its leading part without wildcards).
* An argument that matches nothing raises :class:`~zsdense.errors.InputError`.
* The same file reached twice is kept once (first occurrence). When two inputs would write to the
  same output stem (``a/x.png`` and ``b/x.png`` named directly, or ``x.png`` and ``x.jpg`` in one
  folder), the later one keeps its extension in the stem (``x.jpg`` -> outputs ``x.jpg.mask.png``)
  and, if that is still taken, gets ``~2``, ``~3``...; the choice is deterministic.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from zsdense.errors import InputError
from zsdense.io.readers import _SUPPORTED_TEXT, SUPPORTED_EXTENSIONS

__all__ = ["InputItem", "list_inputs", "output_stem", "strip_extension", "is_supported_name"]

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputItem:
    """One input file; ``rel`` mirrors its place in the input tree under ``--out``.

    ``stem`` is ``rel`` without its extension unless a collision forced another (see the module
    docstring); :func:`output_stem` uses it.
    """

    path: Path
    rel: PurePosixPath
    stem: PurePosixPath | None = None

    @property
    def out_stem(self) -> PurePosixPath:
        return self.stem if self.stem is not None else strip_extension(self.rel)


def strip_extension(rel: PurePosixPath) -> PurePosixPath:
    """``sub/img.png`` -> ``sub/img``; ``vol.nii.gz`` -> ``vol``; names without one unchanged."""
    name = rel.name
    low = name.lower()
    if low.endswith(".nii.gz") and len(name) > 7:
        return rel.with_name(name[:-7])
    suffix = PurePosixPath(name).suffix
    if suffix and len(name) > len(suffix):
        return rel.with_name(name[: -len(suffix)])
    return rel


def is_supported_name(name: str) -> bool:
    """True if ``name`` ends with a supported image extension (case-insensitive)."""
    low = name.lower()
    return any(low.endswith(ext) for ext in SUPPORTED_EXTENSIONS)


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _pick(path: Path) -> bool:
    """Should a file found inside a folder / by a glob be processed?"""
    if is_supported_name(path.name):
        return True
    return "." not in path.name and _looks_like_dicom(path)


def _walk(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if p.is_file() and _pick(p):
                found.append(p)
    found.sort(key=lambda f: f.relative_to(root).parts)  # path order: a/x before a/y/z before b
    return found


def _rel(path: Path, root: Path) -> PurePosixPath:
    return PurePosixPath(Path(os.path.relpath(path, root)).as_posix())


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed: list[str] = []
    for part in parts:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _expand(entry: str | Path) -> list[tuple[Path, PurePosixPath]]:
    text = os.fspath(entry)
    p = Path(text).expanduser()
    if p.is_file():
        return [(p, PurePosixPath(p.name))]
    if p.is_dir():
        found = _walk(p)
        if not found:
            raise InputError(
                p, f"folder contains no supported image files (supported: {_SUPPORTED_TEXT})"
            )
        return [(f, _rel(f, p)) for f in found]
    if _GLOB_CHARS & set(text):
        pattern = os.path.expanduser(text)
        root = _glob_root(pattern)
        out: list[tuple[Path, PurePosixPath]] = []
        for m in sorted(glob.glob(pattern, recursive=True)):
            mp = Path(m)
            if any(
                part.startswith(".") and part not in (".", "..") for part in _rel(mp, root).parts
            ):
                continue
            if mp.is_dir():
                out.extend((f, _rel(f, root)) for f in _walk(mp))
            elif mp.is_file() and _pick(mp):
                out.append((mp, _rel(mp, root)))
        if not out:
            raise InputError(text, "no supported image files match this pattern")
        return out
    if p.exists():
        raise InputError(p, "is neither a regular file nor a folder")
    raise InputError(p, "no such file or folder")


def list_inputs(data: Sequence[str | Path]) -> list[InputItem]:
    """Expand DATA (files, folders, glob patterns) into unique :class:`InputItem` in order.

    Raises :class:`InputError` for an argument that matches nothing.
    """
    if isinstance(data, (str, Path)):
        data = [data]
    seen: set[str] = set()
    stems: set[str] = set()
    items: list[InputItem] = []
    for entry in data:
        for path, rel in _expand(entry):
            ident = os.path.normcase(os.path.realpath(path))
            if ident in seen:
                continue
            seen.add(ident)
            stem = strip_extension(rel)
            chosen: PurePosixPath | None = None
            if str(stem) not in stems:
                chosen = None  # the natural stem
                stems.add(str(stem))
            else:
                cand = rel
                k = 2
                while str(cand) in stems:
                    cand = rel.with_name(f"{rel.name}~{k}")
                    k += 1
                stems.add(str(cand))
                chosen = cand
            items.append(InputItem(path=path, rel=rel, stem=chosen))
    return items


def output_stem(out_dir: str | Path, item: InputItem, suffix: str = "") -> Path:
    """``out_dir / rel`` without extension, plus ``suffix``: writers append ``.mask.png`` etc.

    E.g. ``output_stem("out", InputItem(Path("d/sub/img.png"), PurePosixPath("sub/img.png")),
    ".f003")`` -> ``out/sub/img.f003``.
    """
    stem = item.out_stem
    parts = [p for p in stem.parts if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"empty output stem for {item.path}")
    parts[-1] = parts[-1] + suffix
    return Path(out_dir).joinpath(*parts)
