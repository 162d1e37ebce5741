"""Referring evaluation: oIoU, mIoU and precision@0.5/0.7/0.9 over every expression.

Every (image, expression) pair is predicted by the preset's head (the TaskSpec that ``zsdense
refer --queries`` runs, through the batch engine); the pairs are ordered by image so that the
expressions of one image share its decoding and encoder outputs. oIoU sums intersections and
unions over the split; mIoU averages the per-expression IoU (ReferAccumulator).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from zsdense import metrics as M
from zsdense.config import REFER_PRESETS
from zsdense.engine.specs import TaskSpec
from zsdense.errors import InputError
from zsdense.eval.common import (
    Evaluation,
    MetricTable,
    PredictionRun,
    RunOptions,
    check_preset,
    preset_head,
    rel_key,
    runtime_settings,
)
from zsdense.eval.datasets import ReferSample, read_referring
from zsdense.io.manifest import WorkItem
from zsdense.runtime import runtime_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["evaluate_refer", "refer_items"]

_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")

TaskFactory = Callable[[], TaskSpec]  # -> the head's TaskSpec (the text comes in the params)


def _safe_id(value: Any) -> str:
    return _ID_RE.sub("_", str(value)).strip("._") or "q"


def refer_items(samples: list[ReferSample], base: Path) -> list[WorkItem]:
    """One work item per expression, ordered by image (expressions of one image together);
    key ``<image rel>#<id>``, params ``text``, ``id``, ``image`` as ``zsdense refer
    --queries`` makes them."""
    order = sorted(range(len(samples)), key=lambda i: str(samples[i].image_path))
    items = []
    for i in order:
        s = samples[i]
        rel = rel_key(s.image_path, base)
        sid = _safe_id(s.id)
        items.append(
            WorkItem(
                key=f"{rel}#{sid}",
                path=s.image_path,
                rel=rel,
                params={"text": s.text, "id": sid, "image": str(s.image_path)},
            )
        )
    return items


def evaluate_refer(
    data: str | Path,
    out: str | Path,
    runtime: Any = None,
    *,
    preset: str = "hybridgl",
    layout: str = "auto",
    split: str = "val",
    images_dir: str | Path | None = None,
    limit: int | None = None,
    options: Mapping[str, Any] | None = None,
    task: TaskFactory | None = None,
    **run_options: Unpack[RunOptions],
) -> MetricTable:
    """Predict (or reuse stored masks) one mask per expression and score them.

    ``data``: a JSONL file (``{"image", "text", "mask"|"rle"|"polygon", "id"}`` lines) or a
    RefCOCO/+/g folder (``refs(*).p`` + ``instances.json``; ``images_dir`` = COCO train2014).
    ``options`` are referring options (``refine``, ``fusion``, ``parser``); ``task`` replaces
    the head (``preset`` then only names the stored predictions); ``run_options``: how the
    predictions run (:class:`~zsdense.eval.common.RunOptions`: ``force``, ``retry_errors``,
    ``batch_size``, ``progress``, ``on_record``, ``log``). One row (the split) with oIoU,
    mIoU and precision@0.5/0.7/0.9; ``extra["per_sample"]`` holds every expression's IoU.
    """
    check_preset(preset, REFER_PRESETS, "referring", task)
    ev = Evaluation(out, **run_options)
    data = Path(data)
    samples = read_referring(data, layout, split, images_dir)
    if limit is not None:
        samples = samples[:limit]
    rt = runtime_of(runtime)
    opts = dict(options or {})
    settings: dict[str, Any] = {
        "task": "refer",
        "data": str(data.resolve()),
        "split": split,
        "preset": preset,
        "options": opts,
        **runtime_settings(rt),
    }
    head = {"task": "refer", "preset": preset, **opts}
    spec = task() if task is not None else preset_head(rt, head)
    ev.prepare(rt, settings)
    base = data if data.is_dir() else data.parent
    run = ev.predict(refer_items(samples, base), spec, "expression(s)")
    per_sample, summary, thresholds = _score(samples, base, run)
    table = MetricTable(
        task="refer",
        key="split",
        columns=["oiou", "miou", *(f"prec@{t:g}" for t in thresholds)],
        rows=[{"split": split, **summary}],
        mean={"split": "all", **summary},
        config=ev.config,
        extra={"per_sample": per_sample},
        failed=run.failed,
        show_mean=False,
    )
    n_fallback = sum(p["fallback"] for p in per_sample)
    if n_fallback:  # scored as predicted (the whole image), but they are not answers
        table.notes.append(
            f"{n_fallback} of {len(per_sample)} expression(s) got the method's fallback (SAM "
            "found no mask: the whole image); they are scored as such (per_sample 'fallback')"
        )
    return ev.save(table)


def _score(
    samples: list[ReferSample], base: Path, run: PredictionRun
) -> tuple[list[dict], dict, tuple]:
    """Every predicted expression's IoU (``per_sample``), the split's metrics, and the
    precision thresholds."""
    acc = M.ReferAccumulator()
    per_sample = []
    for s in samples:
        key = f"{rel_key(s.image_path, base)}#{_safe_id(s.id)}"
        if key not in run.records:
            continue
        pred = np.asarray(Image.open(run.path(key, "mask"))) > 0
        gt = s.load_mask(pred.shape)
        if gt.shape != pred.shape:
            raise InputError(
                s.id, f"prediction {pred.shape} and ground truth {gt.shape} differ in size"
            )
        fallback = bool(run.records[key].get("fallback"))
        per_sample.append(
            {"id": s.id, "iou": acc.update(pred, gt), "text": s.text, "fallback": fallback}
        )
    return per_sample, acc.metrics(), tuple(acc.thresholds)
