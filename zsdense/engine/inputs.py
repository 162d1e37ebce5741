"""The inputs of a batch run: work items from files, folders and globs (keys mirror the input
tree), the ``status: "skipped"`` manifest records of the paths the listing saw but does not
process, and the decoding of one item into its units (one per DICOM frame, NIfTI slice, TIFF
page)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from zsdense.context import ImageContext
from zsdense.errors import InputError
from zsdense.io import list_inputs, read_image_records
from zsdense.io.manifest import Manifest, WorkItem


class WorkItems(list):
    """The :class:`WorkItem` list of a run, plus what the listing saw and left out.

    ``skipped``: :class:`zsdense.io.inputs.SkippedInput` (path, rel, reason) for every path seen
    but not processed (hidden files, unsupported types...); the runners write one
    ``status: "skipped"`` manifest line for each. ``excluded``: the exclude folders (the output
    folder) that hid at least one path.
    """

    def __init__(
        self, items: Iterable[WorkItem] = (), skipped: Iterable = (), excluded: Iterable = ()
    ) -> None:
        super().__init__(items)
        self.skipped: list = list(skipped)
        self.excluded: list[Path] = list(excluded)


def items_from_data(data: Sequence[str | Path], exclude: Sequence[str | Path] = ()) -> WorkItems:
    """Files, folders (recursed) and globs -> work items whose keys mirror the input tree.

    ``exclude``: folders never listed inside a folder walk or glob (pass the output folder, so
    a rerun with ``--out`` inside DATA never reads its own outputs). The skipped and excluded
    paths ride along on the returned :class:`WorkItems`."""
    listed = list_inputs(data, exclude=list(exclude))
    return WorkItems(
        (WorkItem(key=str(it.rel), path=it.path, rel=it.rel, stem=it.stem) for it in listed),
        skipped=listed.skipped,
        excluded=listed.excluded,
    )


def skipped_record(skipped, tasks: Sequence[str]) -> dict:
    """The manifest record of a path the listing saw but does not process: ``status:
    "skipped"``, its ``reason``, key = its relative path."""
    rel = str(skipped.rel)
    return {
        "key": rel,
        "item": rel,
        "input": str(skipped.path),
        "rel": rel,
        "suffix": "",
        "item_records": 1,
        "params": {},
        "tasks": list(tasks),
        "status": "skipped",
        "reason": skipped.reason,
        "error": None,
        "outputs": {},
        "scores": {},
        "meta": {},
    }


def record_skipped_inputs(
    manifest: Manifest,
    items: Sequence[WorkItem],
    tasks: Sequence[str],
    previous: dict[str, dict],
) -> int:
    """Append one ``skipped`` record per path in ``items.skipped`` (if ``items`` carries them)
    unless the manifest already holds that record; returns how many paths were skipped."""
    skipped = list(getattr(items, "skipped", ()) or ())
    keys = {it.key for it in items}
    seen: set[str] = set()
    for sk in skipped:
        rec = skipped_record(sk, tasks)
        key = rec["key"]
        if key in seen or key in keys:
            continue
        seen.add(key)
        old = previous.get(key)
        if old is not None and old.get("status") == "skipped" and old.get("reason") == sk.reason:
            continue
        manifest.append(rec)
    return len(seen)


def read_units(item: WorkItem, max_pixels: int | None) -> list[tuple[str, ImageContext]]:
    """Decode an item into ``(record suffix, context)`` pairs (one per frame/slice/page)."""
    records = read_image_records(item.path, max_pixels=max_pixels)
    out: list[tuple[str, ImageContext]] = []
    for rec in records:
        ctx = ImageContext(image=rec.image, meta=dict(rec.meta)).decoded_u8(rec.u8)
        out.append((rec.suffix, ctx))
    if not out:
        raise InputError(item.path, "the file holds no image")
    return out
