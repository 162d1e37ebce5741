"""Open-vocabulary evaluation: per-class IoU and mIoU (mmseg's protocol) at the label's size.

Every image of the split is predicted by the preset's head (the TaskSpec that ``zsdense
openvocab`` runs, through the batch engine, so label PNGs are stored and reused); the confusion
counts accumulate over the whole split, pixels labelled ``ignore_index`` are left out, and a
prediction of another size than its label is resized (nearest) to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from zsdense import metrics as M
from zsdense.config import OPENVOCAB_PRESETS
from zsdense.engine.specs import TaskSpec
from zsdense.errors import ConfigError
from zsdense.eval.common import (
    Evaluation,
    Log,
    MetricTable,
    PredictionRun,
    RunOptions,
    check_preset,
    preset_head,
    runtime_settings,
    safe_rel,
)
from zsdense.eval.datasets import SegDataset, SegSample, load_label, read_segmentation
from zsdense.io.manifest import WorkItem
from zsdense.runtime import runtime_of
from zsdense.text.classifier import ClassEntry, load_class_file, parse_classes

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["evaluate_openvocab", "resolve_classes"]

TaskFactory = Callable[[list[ClassEntry]], TaskSpec]  # classes -> the head's TaskSpec


def resolve_classes(ds: SegDataset, classes_file: str | Path | None) -> list[ClassEntry]:
    """The class list in label-index order: ``classes_file`` (a path or a shipped list name
    such as ``voc21``), else the dataset's own list; a ConfigError when there is none."""
    if classes_file is not None:
        return load_class_file(classes_file)
    if ds.class_names:
        return parse_classes(list(ds.class_names))
    raise ConfigError(
        f"no class list for the {ds.layout} layout: pass --classes-file FILE (one class per "
        "line, in label-index order"
        + (", after reduce_zero_label" if ds.reduce_zero_label else "")
        + ") or a shipped list name"
    )


def _load_prediction(path: Path, shape: tuple[int, int], log: Log, key: str) -> np.ndarray:
    pred = np.asarray(Image.open(path), dtype=np.int64)
    if pred.shape != shape:
        log(f"{key}: prediction {pred.shape} resized (nearest) to the label's {shape}")
        pred = np.asarray(
            Image.fromarray(pred.astype(np.int32), mode="I").resize(
                (shape[1], shape[0]), Image.NEAREST
            ),
            dtype=np.int64,
        )
    return pred


def evaluate_openvocab(
    data: str | Path,
    out: str | Path,
    runtime: Any = None,
    *,
    preset: str = "trident",
    layout: str = "auto",
    split: str = "val",
    classes_file: str | Path | None = None,
    reduce_zero_label: bool | None = None,
    limit: int | None = None,
    dataset: str | None = None,
    options: Mapping[str, Any] | None = None,
    task: TaskFactory | None = None,
    **run_options: Unpack[RunOptions],
) -> MetricTable:
    """Predict (or reuse stored label maps) and compute per-class IoU / accuracy and mIoU.

    ``data``: a VOC, Pascal Context, COCO-Object, ADE20K, Cityscapes or generic
    (``images/`` + ``labels/``) split; ``classes_file`` overrides the dataset's class list
    (a file, or a shipped list name: ``voc21``, ``ade20k``...); ``dataset`` applies a
    benchmark's settings to the head (``--dataset-preset`` of ``zsdense openvocab``);
    ``task`` replaces the head (classes -> TaskSpec; ``preset`` then only names the stored
    predictions); ``run_options``: how the predictions run
    (:class:`~zsdense.eval.common.RunOptions`). Rows per class, then the mean row;
    ``extra["summary"]`` holds aAcc, mIoU, mAcc and the number of images.
    """
    check_preset(preset, OPENVOCAB_PRESETS, "open-vocabulary", task)
    ev = Evaluation(out, **run_options)
    data = Path(data)
    ds = read_segmentation(data, layout, split, reduce_zero_label)
    classes = resolve_classes(ds, classes_file)
    samples = _labelled(ds, limit, ev.log)
    rt = runtime_of(runtime)
    opts = dict(options or {})
    settings: dict[str, Any] = {
        "task": "openvocab",
        "data": str(data.resolve()),
        "layout": ds.layout,
        "split": split,
        "reduce_zero_label": ds.reduce_zero_label,
        "classes": classes,
        "preset": preset,
        "dataset": dataset,
        "options": opts,
        **runtime_settings(rt),
    }
    head = {"task": "openvocab", "preset": preset, "classes": list(classes), **opts}
    if dataset:
        head["dataset"] = dataset
    spec = task(list(classes)) if task is not None else preset_head(rt, head)
    ev.prepare(rt, settings)
    items = [
        WorkItem(key=str(rel), path=s.image_path, rel=rel)
        for s in samples
        for rel in [safe_rel(s.id + s.image_path.suffix)]
    ]
    run = ev.predict(items, spec)
    acc, n_images = _confusion(ds, classes, samples, items, run, ev.log)
    iou, accs = acc.iou(), acc.acc()
    rows = [
        {"class": name, "iou": iou[i], "acc": accs[i], "gt_pixels": int(acc.area_label[i])}
        for i, (name, _syn) in enumerate(classes)
    ]
    summary = acc.metrics()
    table = MetricTable(
        task="openvocab",
        key="class",
        columns=["iou", "acc"],
        rows=rows,
        mean={"class": "mean", "iou": summary["miou"], "acc": summary["macc"]},
        config=ev.config,
        extra={"summary": {**summary, "n_images": n_images, "n_failed": len(run.failed)}},
        failed=run.failed,
        footer=f"aAcc {100 * summary['aacc']:.1f}  mIoU {100 * summary['miou']:.1f}",
    )
    return ev.save(table)


def _labelled(ds: SegDataset, limit: int | None, log: Log) -> list[SegSample]:
    """The samples that have a label file (the others are said and skipped), at most ``limit``."""
    samples = [s for s in ds.samples if s.label_path is not None]
    if len(samples) < len(ds.samples):
        log(f"{len(ds.samples) - len(samples)} images have no label file: skipped")
    return samples if limit is None else samples[:limit]


def _confusion(
    ds: SegDataset,
    classes: list[ClassEntry],
    samples: list[SegSample],
    items: list[WorkItem],
    run: PredictionRun,
    log: Log,
) -> tuple[M.IoUAccumulator, int]:
    """The split's confusion counts over the predicted images, and how many were counted."""
    acc = M.IoUAccumulator(len(classes), ds.ignore_index)
    n_images = 0
    for s, it in zip(samples, items):
        if it.key not in run.records:
            continue
        gt = load_label(s.label_path, ds.reduce_zero_label, ds.ignore_index)
        acc.update(_load_prediction(run.path(it.key, "mask"), gt.shape, log, s.id), gt)
        n_images += 1
    return acc, n_images
