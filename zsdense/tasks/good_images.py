"""Known-good images as the anomaly presets take them: references and calibration sets.

One function resolves every way a user names good images (``--reference`` and
``--calibrate-with`` alike): a folder, a glob (``'good/*.png'``), a file, a ``.zsdmem`` bank, or
a list of any of these and of in-memory images (arrays, PIL images, contexts). Another keys
run-level work on such a source for :meth:`Runtime.memo <zsdense.runtime.Runtime.memo>`, and
:func:`score_good_images` scores a set in batches with a progress line.
"""

from __future__ import annotations

import glob as _glob
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

from zsdense.errors import ConfigError, InputError
from zsdense.io.membank import SUFFIX as BANK_SUFFIX
from zsdense.io.membank import MemoryBank
from zsdense.io.progress import phase


class GroupedImages(tuple):
    """Good images of which several may come from one picture (the tiles of a large reference,
    :mod:`zsdense.tasks.tiling`): ``groups[i]`` numbers the picture of item ``i``. Leave-one-out
    statistics of the few-shot memory then leave out a whole picture, not just the one item."""

    groups: tuple[int, ...]

    def __new__(cls, items: Any = (), groups: Sequence[int] | None = None):
        self = super().__new__(cls, items)
        g = tuple(range(len(self))) if groups is None else tuple(int(v) for v in groups)
        if len(g) != len(self):
            raise ConfigError(f"{len(g)} groups for {len(self)} good images")
        self.groups = g
        return self


def is_bank(source: Any) -> bool:
    """A memory bank object or a ``.zsdmem`` path."""
    if isinstance(source, MemoryBank):
        return True
    return isinstance(source, (str, Path)) and str(source).endswith(BANK_SUFFIX)


def single(source: Any) -> Any:
    """A one-item list or tuple as its item (``--reference good/`` given once)."""
    if isinstance(source, (list, tuple)) and len(source) == 1:
        return source[0]
    return source


def _expand_path(entry: str | Path, what: str) -> list:
    """A file as given; a folder or glob as its images in name order."""
    from zsdense.io import list_inputs

    p = Path(entry).expanduser()
    if p.is_file():
        return [entry]
    if not p.is_dir() and not _glob.has_magic(str(entry)):
        raise ConfigError(f"{what} {entry}: no such file, folder or glob pattern")
    try:
        items = list_inputs([entry])
    except InputError as exc:  # a pattern that matches nothing
        raise ConfigError(f"{what} {entry}: {exc.problem}") from None
    return sorted((it.path for it in items), key=str)


def resolve_images(source: Any, what: str = "--reference") -> list:
    """Good images as a list: paths (a folder or glob expands to its images in name order) and
    in-memory images as given. ``what`` names the option in errors. An empty set is a
    ConfigError."""
    if source is None:
        raise ConfigError(f"{what}: no images given")
    entries = list(source) if isinstance(source, (list, tuple)) else [source]
    out: list = []
    for entry in entries:
        if isinstance(entry, (str, Path)):
            if is_bank(entry):
                raise ConfigError(f"{what} {entry}: a memory bank is not a set of images here")
            out.extend(_expand_path(entry, what))
        else:
            out.append(entry)
    if not out:
        raise ConfigError(f"{what} {source}: no images found")
    return out


def image_names(items: Sequence[Any]) -> list[str]:
    """Names recorded for good images: the path, else ``ref<i>``."""
    return [str(p) if isinstance(p, (str, Path)) else f"ref{i}" for i, p in enumerate(items)]


def source_key(source: Any, keep: list) -> Hashable:
    """A hashable key for a good-image source: paths by name, sequences item by item, other
    objects (arrays, banks) by identity, appended to ``keep`` so that they outlive the key."""
    if source is None or isinstance(source, (bool, int, float)):
        return source
    if isinstance(source, (str, Path)):
        return ("path", str(source))
    if isinstance(source, (list, tuple)):
        return ("seq", tuple(source_key(s, keep) for s in source))
    keep.append(source)
    return ("object", id(source))


def memo(rt, key: Hashable, keep: list, compute: Callable[[], Any]) -> Any:
    """``rt.memo(key, compute)``, holding ``keep`` (the objects keyed by identity) alive with
    the value so an identity is never reused for another object while the key exists."""
    return rt.memo(key, lambda: (list(keep), compute()))[1]


def score_good_images(
    rt,
    source: Any,
    score: Callable[[list], list],
    *,
    what: str,
    label: str,
    batch: int | None = None,
    min_images: int = 1,
    whole_set: bool = False,
) -> list:
    """``score(contexts)`` over a good-image source, ``batch`` images at a time (all at once
    with ``whole_set``), with a progress line; the raw results in order.

    ``min_images``: a set smaller than that is a ConfigError naming ``what`` (e.g. a set-level
    scorer calibrated on too few known-good images)."""
    items = resolve_images(source, what)
    if len(items) < min_images:
        raise ConfigError(
            f"{what}: the {label} set has {len(items)} image(s), but this preset scores a set "
            f"of at least {min_images} images at once; give at least {min_images} known-good "
            "images"
        )
    step = len(items) if whole_set else max(1, int(batch or len(items)))
    out: list = []
    with phase(label, len(items)) as prog:
        for i in range(0, len(items), step):
            chunk = items[i : i + step]
            out.extend(score(rt.contexts(chunk)))
            prog.update(len(chunk))
    return out


def calibration_values(
    rt,
    source: Any,
    score: Callable[[list], list],
    *,
    batch: int | None = None,
    min_images: int = 1,
    whole_set: bool = False,
) -> tuple[list, list]:
    """(maps, scores) of known-good calibration images scored by ``score`` (contexts -> raw
    results with ``anomaly_map`` and ``score``): what :func:`~zsdense.tasks.thresholds
    .resolve_thresholds` calibrates on."""
    raws = score_good_images(
        rt,
        source,
        score,
        what="--calibrate-with",
        label="calibration",
        batch=batch,
        min_images=min_images,
        whole_set=whole_set,
    )
    return [r.anomaly_map for r in raws], [float(r.score) for r in raws]


__all__ = [
    "GroupedImages",
    "calibration_values",
    "image_names",
    "is_bank",
    "memo",
    "resolve_images",
    "score_good_images",
    "single",
    "source_key",
]
