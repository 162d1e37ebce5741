"""COCO instances export of a run: ``zsdense export coco OUT``.

One COCO file (``instances`` format: ``images``, ``categories``, ``annotations``) per task of
the run in OUT, made from the masks it wrote (so it follows ``zsdense decide``):

- anomaly: category ``anomaly``; one annotation per defect (8-connected component of the mask)
  with ``score`` = the max of the anomaly map over it and ``score_mean``;
- open-vocabulary: one category per class (``id`` = class index + 1, the run's class names);
  one annotation per connected region of each class (``skip`` leaves classes out, e.g.
  ``background``), with the class probability statistics when the run saved them;
- referring: category ``referred``; one annotation per query (the whole mask, whatever its
  pieces) with the expression in ``text`` and the result's ``score``.

Segmentations are COCO compressed RLE (``{"size": [H, W], "counts": str}``), boxes
``[x, y, w, h]``, ``area`` the pixel count, ``iscrowd`` 0; pycocotools loads the file as a
dataset (``COCO(path)``) and ``annToMask`` gives each instance's mask back. Images are the
run's inputs (one per file and frame/slice; ``file_name`` the input's path relative to the data
folder, ``zsdense_key`` the manifest key); ``info`` names the run and the settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from zsdense.errors import ConfigError
from zsdense.io.instances import (
    instance_masks,
    label_map_instances,
    mask_instances,
    whole_mask_instance,
)
from zsdense.io.manifest import MANIFEST_NAME, SETTINGS_NAME, Manifest
from zsdense.io.saved_maps import read_map
from zsdense.io.writers import mask_to_rle, write_json
from zsdense.version import __version__

__all__ = ["export_coco", "coco_for_task"]


def _part(d: Any, task: str, multi: bool) -> dict:
    if not isinstance(d, dict):
        return {}
    return dict(d.get(task) or {}) if multi else dict(d)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _kind(task_settings: dict, name: str) -> str:
    kind = str(task_settings.get("task") or name)
    if kind not in ("anomaly", "openvocab", "refer"):
        raise ConfigError(
            f"task {name!r} ({kind}) has no COCO export: anomaly, openvocab and refer do"
        )
    return kind


def coco_for_task(
    out_dir: Path,
    records: Sequence[dict],
    name: str,
    task_settings: dict,
    multi: bool,
    skip: Sequence[str] = (),
) -> dict:
    """The COCO dict of one task of a run."""
    kind = _kind(task_settings, name)
    images: list[dict] = []
    image_ids: dict[tuple, int] = {}
    anns: list[dict] = []
    categories: dict[str, dict] = {}
    if kind == "anomaly":
        categories["anomaly"] = {"id": 1, "name": "anomaly", "supercategory": "defect"}
    elif kind == "refer":
        categories["referred"] = {"id": 1, "name": "referred", "supercategory": "object"}
    skipped = {s.strip().lower() for s in skip}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        outs = _part(rec.get("outputs"), name, multi)
        if not isinstance(outs.get("mask"), str):
            continue
        arr = _read_png(out_dir / outs["mask"])
        image_id = _image_id(rec, arr, image_ids, images)
        scores = _part(rec.get("scores"), name, multi)
        if kind == "anomaly":
            insts, masks, cats = _anomaly_instances(out_dir, outs, arr)
        elif kind == "refer":
            insts, masks, cats = _refer_instances(arr, scores)
        else:
            res_meta = _part((rec.get("meta") or {}).get("result"), name, multi)
            insts, masks, cats = _openvocab_instances(
                out_dir, outs, arr, res_meta, categories, skipped
            )
        for inst, m, cat in zip(insts, masks, cats):
            anns.append(_annotation(len(anns) + 1, image_id, cat, inst, m, kind, scores))
    return {
        "info": {
            "description": f"zsdense {kind} results of {out_dir}",
            "version": __version__,
            "date_created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "task": name,
            "settings": task_settings,
        },
        "licenses": [],
        "images": images,
        "categories": sorted(categories.values(), key=lambda c: c["id"]),
        "annotations": anns,
    }


def _image_id(rec: dict, arr: np.ndarray, image_ids: dict[tuple, int], images: list[dict]) -> int:
    """The COCO image id of the record's input (file and frame/slice), added on first sight."""
    img_key = (str(rec.get("input")), str(rec.get("suffix") or ""))
    if img_key not in image_ids:
        image_ids[img_key] = len(images) + 1
        entry = {
            "id": image_ids[img_key],
            "file_name": str(rec.get("rel") or rec.get("input")),
            "width": int(arr.shape[1]),
            "height": int(arr.shape[0]),
            "zsdense_key": str(rec.get("item", rec.get("key"))).split("#")[0] + img_key[1],
        }
        if img_key[1]:
            entry["frame"] = img_key[1].lstrip(".")
        images.append(entry)
    return image_ids[img_key]


def _saved_map(out_dir: Path, outs: dict) -> np.ndarray | None:
    """The float map the record saved, if any and readable (boxes and areas need only the
    mask)."""
    if not isinstance(outs.get("map"), str):
        return None
    try:
        return read_map(out_dir / outs["map"])
    except Exception:  # noqa: BLE001
        return None


def _anomaly_instances(out_dir: Path, outs: dict, arr: np.ndarray) -> tuple[list, list, list]:
    """One instance per defect (connected component), scored by the map when saved."""
    mask = arr > 0
    insts = mask_instances(mask, _saved_map(out_dir, outs))
    return insts, instance_masks(mask, insts), [1] * len(insts)


def _refer_instances(arr: np.ndarray, scores: dict) -> tuple[list, list, list]:
    """The whole mask as one instance, with the result's score."""
    mask = arr > 0
    insts = whole_mask_instance(mask, scores.get("score"))
    return insts, instance_masks(mask, insts, whole=True), [1] * len(insts)


def _openvocab_instances(
    out_dir: Path,
    outs: dict,
    arr: np.ndarray,
    res_meta: dict,
    categories: dict[str, dict],
    skipped: set[str],
) -> tuple[list, list, list]:
    """One instance per connected region of each class not ``skipped`` (the class names join
    ``categories``), with the class probability statistics when the run saved them."""
    names = list(res_meta.get("class_names") or [])
    for k, cname in enumerate(names):
        categories.setdefault(cname, {"id": k + 1, "name": cname, "supercategory": ""})
    probs = _saved_map(out_dir, outs)
    if probs is not None and (probs.ndim != 3 or probs.shape[1:] != arr.shape):
        probs = None
    skip_idx = [k for k, c in enumerate(names) if c.lower() in skipped]
    insts = label_map_instances(arr, names, probs, skip=skip_idx)
    return insts, instance_masks(arr, insts), [int(i["class_index"]) + 1 for i in insts]


def _annotation(
    ann_id: int, image_id: int, cat: int, inst: dict, m: np.ndarray, kind: str, scores: dict
) -> dict[str, Any]:
    """One COCO annotation: RLE, area, box, and the scores (the text for referring)."""
    ann: dict[str, Any] = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": mask_to_rle(m),
        "area": int(inst["area"]),
        "bbox": [float(v) for v in inst["box_xywh"]],
        "iscrowd": 0,
    }
    if "score_max" in inst:
        ann["score"] = float(inst["score_max"])
        ann["score_mean"] = float(inst["score_mean"])
    if kind == "refer":
        ann["text"] = scores.get("text")
        if scores.get("id") is not None:
            ann["query_id"] = scores["id"]
    return ann


def export_coco(
    out_dir: str | Path,
    to: str | Path | None = None,
    task: str | None = None,
    skip: Sequence[str] = (),
) -> list[Path]:
    """Write the COCO file(s) of the run in ``out_dir``: ``instances_coco.json`` (one task) or
    ``instances_coco.<task>.json`` (each task of a multi-task run; ``task`` picks one);
    ``to``: the file name (one task only). Returns the paths."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).is_file():
        raise ConfigError(f"{out_dir} is not the output folder of a zsdense run (no results.jsonl)")
    try:
        settings = json.loads((out_dir / SETTINGS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{out_dir}: no readable {SETTINGS_NAME} (which tasks ran?)") from None
    tasks = dict(settings.get("tasks") or {})
    if not tasks:
        raise ConfigError(f"{out_dir}: the run records no task")
    multi = len(tasks) > 1
    names = list(tasks)
    if task is not None:
        if task not in tasks:
            raise ConfigError(f"no task {task!r} in the run; tasks: {', '.join(tasks)}")
        names = [task]
    if to is not None and len(names) > 1:
        raise ConfigError(f"the run has several tasks ({', '.join(names)}): pick one with --task")
    records = list(Manifest(out_dir / MANIFEST_NAME).load().values())
    written = []
    for name in names:
        coco = coco_for_task(out_dir, records, name, tasks[name], multi, skip)
        path = (
            Path(to)
            if to is not None
            else out_dir / (f"instances_coco.{name}.json" if multi else "instances_coco.json")
        )
        written.append(write_json(path, coco, indent=None))
    return written
