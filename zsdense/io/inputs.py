"""Expand the CLI's DATA arguments (files, folders, glob patterns) into a list of inputs, and
account for every path seen that will not be processed.

Rules:

* A **file** named directly is always included, whatever its extension, so that a bad file gives
  an error record instead of being silently skipped. Its ``rel`` is its name.
* A **folder** is walked recursively in sorted order; only files with a supported extension are
  picked up (plus files without an extension that carry the DICOM ``DICM`` signature: DICOM series
  often have bare names). ``rel`` is the path relative to the folder.
* A **glob pattern** (``*``, ``?``, ``[...]``; ``**`` crosses folders) is expanded in sorted
  order; matched files are filtered like folder contents and matched folders are walked. ``rel``
  is relative to the pattern's root (its leading part without wildcards).
* **Skipped paths**: what a folder walk or a glob sees but will not process is returned in
  ``ListedInputs.skipped`` as :class:`SkippedInput` (path, ``rel``, reason): hidden files, hidden
  folders (reported once, not searched), unsupported file types, files without an extension that
  are not DICOM, links to folders (not followed) and things that are not regular files. A skipped
  path that is also processed (named directly, say) is not reported.
* **Excluded folders** (``exclude=``, e.g. the ``--out`` folder): a folder walk or glob never
  lists anything inside one of them when it lies inside (or is) the folder or pattern root being
  expanded; ``ListedInputs.excluded`` names each exclude folder that hid something, so the caller
  can say so once. Excluded paths are not in ``skipped``. A DATA root that lies strictly inside an
  excluded folder is read normally (the user pointed at it on purpose), and files named directly
  are always included.
* An argument that matches nothing raises :class:`~zsdense.errors.InputError`.
* The same file reached twice is kept once (first occurrence). When two inputs would write to the
  same output stem (``a/x.png`` and ``b/x.png`` named directly, or ``x.png`` and ``x.jpg`` in one
  folder), the later one keeps its extension in the stem (``x.jpg`` -> outputs ``x.jpg.mask.png``)
  and, if that is still taken, gets ``~2``, ``~3``...; the choice is deterministic.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from zsdense.errors import InputError
from zsdense.io.readers.common import SUPPORTED_EXTENSIONS, SUPPORTED_TEXT

__all__ = [
    "InputItem",
    "ListedInputs",
    "SkippedInput",
    "list_inputs",
    "strip_extension",
    "is_supported_name",
]

_GLOB_CHARS = set("*?[")

#: Reasons given in :class:`SkippedInput` (the engine writes ``"skipped: <reason>"``).
HIDDEN_FILE = "hidden file (name starts with '.')"
HIDDEN_FOLDER = "hidden folder (name starts with '.'), not searched"
LINKED_FOLDER = "link to a folder, not followed"
NO_EXTENSION = "no file extension and not a DICOM file"
NOT_A_FILE = "not a regular file (broken link, device, pipe or socket)"


@dataclass(frozen=True)
class InputItem:
    """One input file; ``rel`` mirrors its place in the input tree under ``--out``.

    ``stem`` is ``rel`` without its extension unless a collision forced another (see the module
    docstring); :func:`zsdense.io.manifest.out_stem` uses it.
    """

    path: Path
    rel: PurePosixPath
    stem: PurePosixPath | None = None

    @property
    def out_stem(self) -> PurePosixPath:
        return self.stem if self.stem is not None else strip_extension(self.rel)


@dataclass(frozen=True)
class SkippedInput:
    """A path seen while listing that will not be processed, and why.

    ``rel`` is relative to its DATA root, like :attr:`InputItem.rel`; ``reason`` is one short
    phrase (see the module docstring), e.g. ``"unsupported file type '.txt'"``.
    """

    path: Path
    rel: PurePosixPath
    reason: str

    @property
    def message(self) -> str:
        """``"skipped: <reason>"``, the text of its manifest line."""
        return f"skipped: {self.reason}"


class ListedInputs(list):
    """The :class:`InputItem` to process (it *is* that list), plus what was left out.

    ``skipped``: :class:`SkippedInput` for every path seen but not processed, in listing order.
    ``excluded``: the ``exclude`` folders (as given) that hid at least one path.
    """

    def __init__(
        self,
        items: Iterable[InputItem] = (),
        skipped: Iterable[SkippedInput] = (),
        excluded: Iterable[Path] = (),
    ) -> None:
        super().__init__(items)
        self.skipped: list[SkippedInput] = list(skipped)
        self.excluded: list[Path] = list(excluded)

    def __repr__(self) -> str:
        return (
            f"ListedInputs({list.__repr__(self)}, skipped={self.skipped!r}, "
            f"excluded={self.excluded!r})"
        )


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


def _skip_reason(path: Path) -> str | None:
    """Why a file found inside a folder / by a glob is not processed (None: it is)."""
    if not path.is_file():
        return NOT_A_FILE
    if is_supported_name(path.name):
        return None
    if "." not in path.name:
        return None if _looks_like_dicom(path) else NO_EXTENSION
    return f"unsupported file type {(PurePosixPath(path.name).suffix or '.').lower()!r}"


def _pick(path: Path) -> bool:
    """Should a file found inside a folder / by a glob be processed?"""
    return _skip_reason(path) is None


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


class _Listing:
    """What one DATA argument expands to: (path, rel) pairs, skipped paths, exclude hits."""

    def __init__(self, exclude: dict[Path, Path]) -> None:
        self.exclude = exclude  # real path -> as given
        self.found: list[tuple[Path, PurePosixPath]] = []
        self.skipped: list[SkippedInput] = []
        self.hit: set[Path] = set()

    def active(self, root: Path) -> list[Path]:
        """Exclude folders at or below ``root`` (real paths)."""
        real = _real(root)
        return [e for e in self.exclude if e == real or e.is_relative_to(real)]

    def excluded_by(self, path: Path, active: list[Path]) -> Path | None:
        """The exclude folder (real path) that ``path`` is or lies in, if any."""
        if not active:
            return None
        real = _real(path)
        for e in active:
            if real == e or real.is_relative_to(e):
                return e
        return None

    def skip(self, path: Path, root: Path, reason: str) -> None:
        self.skipped.append(SkippedInput(path, _rel(path, root), reason))

    def walk(self, top: Path, root: Path, active: list[Path]) -> None:
        """Walk ``top``; ``rel`` is taken relative to ``root``; ``active`` exclude folders."""
        hit = self.excluded_by(top, active)
        if hit is not None:
            self.hit.add(hit)
            return
        found: list[Path] = []
        skipped: list[tuple[Path, str]] = []
        for dirpath, dirnames, filenames in os.walk(top):
            keep = []
            for d in sorted(dirnames):
                full = Path(dirpath) / d
                if (e := self.excluded_by(full, active)) is not None:
                    self.hit.add(e)
                elif d.startswith("."):
                    skipped.append((full, HIDDEN_FOLDER))
                elif os.path.islink(full):
                    skipped.append((full, LINKED_FOLDER))
                else:
                    keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                p = Path(dirpath) / name
                reason = HIDDEN_FILE if name.startswith(".") else _skip_reason(p)
                if reason is None:
                    found.append(p)
                else:
                    skipped.append((p, reason))
        found.sort(key=lambda f: f.relative_to(top).parts)  # a/x before a/y/z before b
        skipped.sort(key=lambda fr: fr[0].relative_to(top).parts)
        self.found.extend((f, _rel(f, root)) for f in found)
        for f, reason in skipped:
            self.skip(f, root, reason)


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


def _nothing_left(listing: _Listing) -> str:
    """The tail of the 'nothing to read' message: what was skipped or excluded instead."""
    notes = []
    if listing.skipped:
        notes.append(f"{len(listing.skipped)} other path(s) skipped")
    if listing.hit:
        given = ", ".join(str(listing.exclude[e]) for e in sorted(listing.hit))
        notes.append(f"excluded: {given}")
    return f" ({'; '.join(notes)})" if notes else ""


def _expand(entry: str | Path, listing: _Listing) -> None:
    text = os.fspath(entry)
    p = Path(text).expanduser()
    if p.is_file():
        listing.found.append((p, PurePosixPath(p.name)))
        return
    if p.is_dir():
        listing.walk(p, p, listing.active(p))
        if not listing.found:
            raise InputError(
                p,
                f"folder contains no supported image files (supported: {SUPPORTED_TEXT})"
                + _nothing_left(listing),
            )
        return
    if _GLOB_CHARS & set(text):
        pattern = os.path.expanduser(text)
        root = _glob_root(pattern)
        active = listing.active(root)
        for m in sorted(glob.glob(pattern, recursive=True)):
            mp = Path(m)
            hidden = any(
                part.startswith(".") and part not in (".", "..") for part in _rel(mp, root).parts
            )
            if (e := listing.excluded_by(mp, active)) is not None:
                listing.hit.add(e)
            elif hidden:
                listing.skip(mp, root, HIDDEN_FOLDER if mp.is_dir() else HIDDEN_FILE)
            elif mp.is_dir():
                listing.walk(mp, root, active)
            else:
                reason = _skip_reason(mp)
                if reason is None:
                    listing.found.append((mp, _rel(mp, root)))
                else:
                    listing.skip(mp, root, reason)
        if not listing.found:
            raise InputError(
                text, "no supported image files match this pattern" + _nothing_left(listing)
            )
        return
    if p.exists():
        raise InputError(p, "is neither a regular file nor a folder")
    raise InputError(p, "no such file or folder")


def _ident(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def list_inputs(
    data: Sequence[str | Path] | str | Path, *, exclude: Sequence[str | Path] = ()
) -> ListedInputs:
    """Expand DATA (files, folders, glob patterns) into unique :class:`InputItem` in order.

    Returns a :class:`ListedInputs`: a list of the items to process (so callers that iterate,
    index or ``len()`` it work unchanged) with ``.skipped`` (every path seen but not processed,
    with its reason) and ``.excluded`` (the ``exclude`` folders that hid something). ``exclude``
    names folders whose contents are never listed from a folder walk or glob, typically the
    output folder: pass ``exclude=[out_dir]``.

    Raises :class:`InputError` for an argument that matches nothing.
    """
    if isinstance(data, (str, Path)):
        data = [data]
    excl: dict[Path, Path] = {}
    for e in [exclude] if isinstance(exclude, (str, Path)) else exclude:
        excl.setdefault(_real(e), Path(e))
    seen: set[str] = set()
    stems: set[str] = set()
    items: list[InputItem] = []
    skipped: list[SkippedInput] = []
    hits: set[Path] = set()
    for entry in data:
        listing = _Listing(excl)
        _expand(entry, listing)
        skipped.extend(listing.skipped)
        hits |= listing.hit
        for path, rel in listing.found:
            ident = _ident(path)
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
    reported: set[str] = set()
    kept: list[SkippedInput] = []
    for sk in skipped:
        ident = _ident(sk.path)
        if ident in seen or ident in reported:
            continue
        reported.add(ident)
        kept.append(sk)
    return ListedInputs(items, kept, [excl[e] for e in excl if e in hits])
