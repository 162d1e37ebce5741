"""Re-deciding a run's records: per ``ok`` image of one anomaly task, from its saved map and
score, the mask (``mask = map >= threshold``), its overlay (the input is read again for the
picture; no model), the COCO RLE when the run wrote one, the manifest line (``scores``,
``instances``, ``meta.result`` with a ``decided`` note), and at the end the mask volumes of
NIfTI inputs when the run wrote them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from zsdense.engine.decide_settings import DECIDED_KEY, task_part
from zsdense.engine.decide_values import Decision, decide
from zsdense.errors import ConfigError
from zsdense.io.instances import manifest_instances, mask_instances
from zsdense.io.manifest import WorkItem
from zsdense.io.saved_maps import read_map
from zsdense.io.writers import atomic_path, dumps_strict, to_jsonable, write_outputs


@dataclass
class Redecider:
    """Re-decides the records of one anomaly task with a :class:`Decision`, in place.
    ``overlay`` None rewrites the overlays where the run wrote them; ``warnings`` receives
    the overlays that could not be rewritten."""

    out_dir: Path
    task: str
    multi: bool
    d: Decision
    decided_at: str
    overlay: bool | None = None
    max_pixels: int | None = None
    warnings: list[str] = field(default_factory=list)
    _images: dict[str, Any] = field(default_factory=dict)  # input -> {suffix: image}

    def record(self, rec: dict, outs: dict, key: str) -> tuple[bool, bool, bool]:
        """Re-decide one ``ok`` record (a copy: it is changed in place) whose task outputs are
        ``outs``; returns (mask changed, label changed, labelled anomalous)."""
        if not isinstance(outs.get("map"), str):
            raise ConfigError("the record names no saved map")
        amap = read_map(self.out_dir / outs["map"])
        scores = task_part(rec, "scores", self.task, self.multi)
        score = float(scores["score"])
        mask, label = decide(amap, score, self.d.threshold, self.d.image_threshold)
        mask_path = self.out_dir / outs["mask"]
        old_mask = np.asarray(_read_png(mask_path)) > 0 if mask_path.is_file() else None
        image, do_overlay = self._overlay_image(rec, outs, key)
        res_meta = task_part(rec, "meta", self.task, self.multi)
        new_outs = self._write_files(
            outs, mask_path, image, do_overlay, mask, amap, score, res_meta
        )
        if self.multi:
            rec["outputs"][self.task] = new_outs
        else:
            rec["outputs"] = new_outs
        old_label = scores.get("label")
        self._update(scores, res_meta, mask, label)
        kept, total = manifest_instances(mask_instances(mask, amap))
        set_instances(rec, self.task, self.multi, kept, total)
        mask_changed = old_mask is None or not np.array_equal(old_mask, mask)
        return mask_changed, old_label != label, bool(label)

    def _overlay_image(self, rec: dict, outs: dict, key: str) -> tuple[Any, bool]:
        """(the input image, whether to write the overlay): the overlay is rewritten where the
        run wrote one (or as ``overlay`` says) and its input can be read again."""
        do_overlay = ("overlay" in outs) if self.overlay is None else bool(self.overlay)
        if not do_overlay:
            return None, False
        src = str(rec.get("input"))
        if src not in self._images:
            self._images.clear()  # one input at a time: a volume's slices share the read
            self._images[src] = _read_inputs(src, self.max_pixels)
        got = self._images[src]
        if isinstance(got, Exception) or rec.get("suffix", "") not in got:
            why = got if isinstance(got, Exception) else "the image is not in the input"
            self.warnings.append(f"{key}: overlay not rewritten ({why})")
            return None, False
        return got[rec.get("suffix", "")], True

    def _write_files(
        self,
        outs: dict,
        mask_path: Path,
        image: Any,
        do_overlay: bool,
        mask: np.ndarray,
        amap: np.ndarray,
        score: float,
        res_meta: dict,
    ) -> dict:
        """Write the mask (and RLE, overlay) again; the task's new outputs (paths relative to
        the run; an overlay not rewritten is removed: it would show the old mask)."""
        written = write_outputs(
            str(mask_path)[: -len(".mask.png")],
            image if image is not None else np.zeros((*mask.shape, 3), np.float32),
            fmt="rle" if "rle" in outs else "tiff",
            overlay=do_overlay,
            mask=mask,
            float_map=None,
            heat=amap,
            caption=f"anomaly score {score:.3f}",
            random_weights=bool(res_meta.get("random_weights")),
        )
        new_outs = dict(outs)
        for k, v in written.items():
            new_outs[k] = _rel(v, self.out_dir)
        if not do_overlay and "overlay" in new_outs:
            old = self.out_dir / new_outs.pop("overlay")
            old.unlink(missing_ok=True)
        return new_outs

    def _update(self, scores: dict, res_meta: dict, mask: np.ndarray, label: bool | None) -> None:
        """The record's scores and result meta say the new decision (the same keys the run
        wrote), with a ``decided`` note holding the previous values."""
        d = self.d
        scores["threshold"] = d.threshold
        scores["threshold_source"] = d.threshold_source
        scores["image_threshold"] = d.image_threshold
        scores["label"] = label
        scores["defect_area"] = round(float(mask.mean()), 6) if mask.size else 0.0
        res_meta.update(
            threshold=d.threshold,
            threshold_source=d.threshold_source,
            image_threshold=d.image_threshold,
            image_threshold_source=d.image_threshold_source,
        )
        res_meta[DECIDED_KEY] = {"at": self.decided_at, "previous": d.previous}
        if d.calibration is not None:
            res_meta["calibration"] = {k: d.calibration[k] for k in ("n_images", "rule")}
        res_meta.pop("threshold_note", None)


def set_instances(rec: dict, task: str, multi: bool, kept: list, total: int | None) -> None:
    """The record's ``instances`` (and ``instances_total`` when some were left out) of the
    task."""
    if multi:
        rec.setdefault("instances", {})[task] = to_jsonable(kept)
        totals = rec.get("instances_total") or {}
        totals.pop(task, None)
        if total is not None:
            totals[task] = total
        if totals:
            rec["instances_total"] = totals
        else:
            rec.pop("instances_total", None)
        return
    rec["instances"] = to_jsonable(kept)
    if total is not None:
        rec["instances_total"] = total
    else:
        rec.pop("instances_total", None)


def write_manifest(path: Path, records: list[dict]) -> None:
    """Write the manifest lines again (atomically, synced)."""
    text = "".join(dumps_strict(r) + "\n" for r in records)
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def rewrite_mask_volumes(out_dir: Path, records: list[dict]) -> list[Path]:
    """Mask volumes (``<stem>[.<task>].mask.nii.gz``) the run wrote are written again from the
    new slice masks."""
    if not any(out_dir.rglob("*.mask.nii.gz")):
        return []
    from zsdense.engine.volumes import write_volume_maps

    items, seen = [], set()
    for r in records:
        item = str(r.get("item", r.get("key")))
        if item in seen or (r.get("meta", {}).get("image", {}) or {}).get("format") != "nifti":
            continue
        seen.add(item)
        items.append(
            WorkItem(key=item, path=Path(str(r.get("input"))), rel=PurePosixPath(r["rel"]))
        )
    try:
        return write_volume_maps(out_dir, items, masks_only=True)
    except Exception as exc:  # noqa: BLE001
        print(f"zsdense: warning: mask volumes not rewritten: {exc}", file=sys.stderr)
        return []


def _read_inputs(rec_input: str, max_pixels: int | None) -> dict[str, np.ndarray] | Exception:
    from zsdense.io import read_image_records

    try:
        return {r.suffix: r.image for r in read_image_records(rec_input, max_pixels=max_pixels)}
    except Exception as exc:  # noqa: BLE001 - the overlay is then left out, with a warning
        return exc


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _rel(path: str | Path, out_dir: Path) -> str:
    try:
        return Path(path).relative_to(out_dir).as_posix()
    except ValueError:
        return Path(path).as_posix()
