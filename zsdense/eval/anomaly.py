"""Anomaly evaluation: image and pixel AUROC / AP / F1-max and AUPRO per category, at 518x518.

Protocol (specs/anomaly.md, as the papers' code): every test image is predicted by the preset's
head (the TaskSpec that ``zsdense anomaly`` runs, through the batch engine); the map scored is
the head's own smoothed map at the evaluation size when it keeps one (``keep_model_map``), else
the full-size map resized bilinearly; ground-truth masks are resized bilinearly as 8-bit images
and kept where > 0.5. ``musc`` scores a category as one set (its TaskSpec has ``group="all"``):
a category with a missing prediction is predicted again as a whole.

Pixel metrics stream over the stored maps in two passes per category, never holding them all:
pass 1 finds the category's min and max score, pass 2 fills ``bins`` histogram bins over that
range (pixel AUROC / AP / F1-max / MVTec AUPRO, see :class:`~zsdense.metrics.PixelAccumulator`)
and the exact per-threshold counts of the papers' AUPRO. ``exact=True`` loads a category's maps
at once and uses the exact functions. A category without any ground-truth mask gets image
metrics only (pixel metrics need masks; said once).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zsdense import metrics as M
from zsdense.config import ANOMALY_PRESETS
from zsdense.engine.local import load_records
from zsdense.engine.specs import TaskSpec, build_task_spec
from zsdense.errors import ConfigError
from zsdense.eval.common import (
    Log,
    MetricTable,
    mean_row,
    predict,
    prepare_predictions,
    random_weights_warning,
    rel_key,
    stderr_log,
)
from zsdense.eval.datasets import (
    AnomalySample,
    detect_anomaly_layout,
    load_anomaly_mask,
    read_anomaly,
    train_good_images,
)
from zsdense.eval.protocols import ANOMALY_METRICS, EVAL_SIZE, IMAGE_METRICS, PIXEL_METRICS
from zsdense.io.manifest import WorkItem, record_complete
from zsdense.io.writers import write_map_npy
from zsdense.runtime import runtime_of
from zsdense.tasks.anomaly_registry import scorer_for
from zsdense.tasks.fewshot import select_references

__all__ = [
    "EVAL_SIZE",
    "ANOMALY_METRICS",
    "PIXEL_METRICS",
    "ANOMALY_PRESET_CHOICES",
    "evaluate_anomaly",
    "anomaly_eval_task",
    "resize_map",
    "resize_mask",
    "eval_map",
    "limit_spread",
]

ANOMALY_PRESET_CHOICES = ANOMALY_PRESETS  # the live preset table: registered presets included
_COUNTS = ("n_images", "n_anomalous", "n_pixel_images", "n_failed")

TaskFactory = Callable[[str], TaskSpec]  # object name -> the head's TaskSpec


def resize_map(amap: np.ndarray, size: int = EVAL_SIZE) -> np.ndarray:
    """(H, W) float map -> (size, size) float32, bilinear (PIL, as torchvision's Resize)."""
    a = np.asarray(amap, dtype=np.float32)
    if a.shape == (size, size):
        return a
    return np.asarray(
        Image.fromarray(a, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32
    )


def resize_mask(mask01: np.ndarray, size: int = EVAL_SIZE) -> np.ndarray:
    """(H, W) 0/1 mask -> (size, size) bool: 8-bit image resized bilinearly, kept where > 0.5
    (the papers' ``Resize`` + ``ToTensor`` + ``> 0.5``)."""
    im = Image.fromarray((np.asarray(mask01) > 0).astype(np.uint8) * 255, mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0 > 0.5


def eval_map(result: Any, size: int = EVAL_SIZE) -> np.ndarray:
    """The map to score: the head's own smoothed map at the evaluation size when it kept one
    (``result.model_map``, asked for with ``keep_model_map=True``), else the full-size map
    resized bilinearly to ``size``."""
    m = getattr(result, "model_map", None)
    if m is not None and np.asarray(m).shape == (size, size):
        return np.asarray(m, dtype=np.float32)
    return resize_map(np.asarray(result.anomaly_map), size)


def limit_spread(samples: list, n: int | None) -> list:
    """At most n samples, evenly spread over the sorted list (keeps normal and defective)."""
    if n is None or len(samples) <= n:
        return samples
    idx = np.unique(np.linspace(0, len(samples) - 1, n).round().astype(int))
    return [samples[i] for i in idx]


def anomaly_eval_task(inner: TaskSpec, size: int = EVAL_SIZE) -> TaskSpec:
    """``inner`` (a head's TaskSpec) whose writer also stores the map to score,
    ``<stem>.eval<size>.npy`` (output ``eval_map``), and the image score in the record."""

    def write(result: Any, ctx: Any, stem: Path, params: dict) -> dict:
        got = dict(inner.write(result, ctx, stem, params) or {})
        outputs = dict(got.get("outputs") or {})
        outputs["eval_map"] = str(write_map_npy(f"{stem}.eval{size}.npy", eval_map(result, size)))
        scores = dict(got.get("scores") or {})
        scores["score"] = float(result.score)
        return {**got, "outputs": outputs, "scores": scores}

    return dataclasses.replace(inner, write=write)


@dataclass
class _Pred:
    sample: AnomalySample
    score: float
    map_path: Path


def _category_metrics(
    preds: list[_Pred],
    wanted: set[str],
    size: int,
    bins: int,
    exact: bool,
    log: Log,
    seen: dict | None = None,
) -> tuple[dict[str, Any], bool]:
    """Metrics of one category; the flag says whether pixel metrics were wanted but no mask
    exists (image metrics only). ``seen`` (a dict) receives what the evaluation report shows:
    the F1-optimal thresholds (``thresholds``) and the curves (``curves``)."""
    seen = {} if seen is None else seen
    row: dict[str, Any] = {
        "n_images": len(preds),
        "n_anomalous": sum(p.sample.label for p in preds),
    }
    if not preds:
        return row, False
    labels = [p.sample.label for p in preds]
    scores = [p.score for p in preds]
    f1_img, thr_img = M.f1_max_threshold(labels, scores)
    seen["thresholds"] = {"image_threshold": thr_img, "image_f1_max": f1_img}
    seen["curves"] = {
        "image_roc": M.roc_curve(labels, scores),
        "image_pr": M.pr_curve(labels, scores),
    }
    if wanted & IMAGE_METRICS:
        got = M.image_metrics(labels, scores)
        row.update({k: v for k, v in got.items() if k in wanted})
    if not wanted & PIXEL_METRICS:
        return row, False
    anomalous = [p for p in preds if p.sample.label == 1]
    if anomalous and not any(p.sample.mask_path is not None for p in anomalous):
        return row, True  # no ground-truth mask at all: pixel metrics cannot be computed
    pix = [p for p in preds if p.sample.label == 0 or p.sample.mask_path is not None]
    if len(pix) < len(preds):
        log(
            f"[{preds[0].sample.category}] {len(preds) - len(pix)} anomalous images have no "
            "mask: left out of the pixel metrics"
        )
    row["n_pixel_images"] = len(pix)

    def pairs():
        for p in pix:
            amap = np.load(p.map_path)
            if p.sample.mask_path:
                mask = resize_mask(load_anomaly_mask(p.sample), size)
            else:
                mask = np.zeros((size, size), dtype=bool)
            yield amap, mask

    if exact:  # in memory: every map of the category at once
        maps, masks = zip(*pairs())
        pm = M.pixel_metrics(np.stack(masks), np.stack(maps))
        row.update({k: v for k, v in pm.items() if k in wanted})
        f1_pix, thr_pix = M.f1_max_threshold(np.stack(masks), np.stack(maps))
        seen["thresholds"].update(threshold=thr_pix, pixel_f1_max=f1_pix)
        fpr, pro = M.pro_curve_mvtec(np.stack(masks), np.stack(maps))
        seen["curves"].update(
            pixel_roc=M.roc_curve(np.stack(masks), np.stack(maps)),
            pixel_pr=M.pr_curve(np.stack(masks), np.stack(maps)),
            pro=(fpr, pro),
        )
        return row, False
    rt = M.RangeTracker()  # pass 1: the category's score range
    for p in pix:
        rt.update(np.load(p.map_path))
    if rt.lo is None:
        return row, False
    hi = rt.hi if rt.hi > rt.lo else rt.lo + 1.0
    acc = M.PixelAccumulator(bins=bins, value_range=(float(rt.lo), float(hi)))
    pro = M.AuproAccumulator.from_range(rt.lo, rt.hi) if "aupro" in wanted else None
    for amap, mask in pairs():  # pass 2
        acc.update(amap, mask)
        if pro is not None:
            pro.update(amap, mask)
    pm = {"pixel_auroc": acc.auroc(), "pixel_ap": acc.ap(), "pixel_f1_max": acc.f1_max()}
    f1_pix, thr_pix = acc.f1_max_threshold()
    seen["thresholds"].update(threshold=thr_pix, pixel_f1_max=f1_pix)
    cv = acc.curves()
    seen["curves"].update(
        pixel_roc=(cv.get("fpr"), cv.get("tpr")),
        pixel_pr=(cv.get("recall"), cv.get("precision")),
        pro=(cv.get("pro_fpr"), cv.get("pro")),
    )
    if "aupro_mvtec" in wanted:
        pm["aupro_mvtec"] = acc.aupro_mvtec()
    if pro is not None:
        pm["aupro"] = pro.aupro()
    row.update({k: v for k, v in pm.items() if k in wanted})
    return row, False


def _category_task(
    rt,
    cat: str,
    task: TaskFactory | None,
    base: dict,
    data: Path,
    layout: str,
    shots: int | None,
    seed: int,
    fmt: str,
    size: int,
) -> TaskSpec:
    """The head that predicts one category: ``task`` (object name -> TaskSpec) or the preset's
    spec for the category's object; a preset whose scorer takes good references draws them
    from the category's good training images (``shots``, ``seed``) as the reference does."""
    object_name = cat.replace("_", " ")
    if task is not None:
        return anomaly_eval_task(task(object_name), size)
    cfg = {**base, "object_name": object_name, "keep_model_map": True}
    if scorer_for(cfg["preset"]).references != "none":
        pool = train_good_images(data, layout, cat)
        cfg["reference"] = [str(p) for p in select_references(pool, shots, seed)]
    return anomaly_eval_task(build_task_spec(rt, cfg, fmt=fmt, overlay=False), size)


def _predict_category(
    rt,
    cat: str,
    samples: list[AnomalySample],
    spec: TaskSpec,
    data: Path,
    root: Path,
    run_kw: dict,
    log: Log,
) -> tuple[list[_Pred], list[tuple[str, str]]]:
    """Predictions of one category (stored ones reused; a set-level head predicts its whole
    set again when one is missing) and its failures."""
    items = [
        WorkItem(key=str(r), path=s.image_path, rel=r)
        for s in samples
        for r in [rel_key(s.image_path, data)]
    ]
    stored = {rec.get("key"): rec for rec in load_records(root)}
    missing = sum(not record_complete(stored.get(it.key, {}), root) for it in items)
    redo_set = spec.group == "all" and missing > 0
    if missing:
        n = len(items) if redo_set else missing
        log(f"[{cat}] predicting {n} of {len(items)} images")
    run = predict(rt, items, root, spec, force=redo_set, **run_kw)
    preds = [
        _Pred(s, float(run.records[it.key]["scores"]["score"]), run.path(it.key, "eval_map"))
        for s, it in zip(samples, items)
        if it.key in run.records
    ]
    if run.failed:
        log(f"[{cat}] {len(run.failed)} image(s) failed and are left out of the metrics")
    return preds, list(run.failed)


def _table(
    rows: list[dict],
    failed: list,
    no_masks: list[str],
    wanted: set[str],
    config: dict,
    bins: int | None,
    log: Log,
) -> MetricTable:
    """The evaluation's table: per-category rows, their mean, the notes."""
    notes = []
    if no_masks:
        notes.append(
            "pixel metrics need ground-truth masks: none found for "
            f"{', '.join(no_masks)}; image metrics only there"
        )
        log(notes[-1])
    cols = [m for m in ANOMALY_METRICS if m in wanted]
    return MetricTable(
        task="anomaly",
        key="category",
        columns=cols,
        rows=rows,
        mean=mean_row(rows, cols, "category"),
        config=config,
        extra={"pixel_bins": bins},
        failed=failed,
        notes=notes,
    )


def evaluate_anomaly(
    data: str | Path,
    out: str | Path,
    runtime: Any = None,
    *,
    preset: str = "crane",
    layout: str = "auto",
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    metrics: Sequence[str] = ANOMALY_METRICS,
    dataset: str | None = None,
    options: Mapping[str, Any] | None = None,
    shots: int | None = None,
    seed: int = 0,
    size: int = EVAL_SIZE,
    bins: int = M.DEFAULT_BINS,
    exact: bool = False,
    force: bool = False,
    retry_errors: bool = False,
    batch_size: int | None = None,
    fmt: str = "none",
    task: TaskFactory | None = None,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
    log: Log = stderr_log,
) -> MetricTable:
    """Predict (or reuse stored predictions) and score an anomaly test set per category.

    ``data``: an MVTec AD, VisA or folder-layout test set (``layout``); ``out``: the output
    folder (``predictions/anomaly/`` and ``metrics_anomaly.{json,csv,md}``); ``runtime``: a
    :class:`~zsdense.runtime.Runtime` or ``Segmenter`` (default: a new one). ``dataset`` picks
    the prompts as the papers do (default: the detected layout, so MVTec gets the VisA-trained
    prompts); ``options`` are further anomaly options (``prompts``, ``domain``, ``attn_type``...).
    Presets whose scorer takes good references (``anomalydino``, ``crane+fewshot``) draw
    ``shots`` per category from its good training images as the reference does
    (``sorted(files)[seed·n:(seed+1)·n]``).
    ``limit`` keeps at most N images per category, spread over normal and defective ones.
    ``fmt`` ``npy``/``tiff`` also keeps the full-size maps; ``task`` replaces the head
    (object name -> TaskSpec, e.g. a custom method; ``preset`` then only names the stored
    predictions, so give each head its own name); ``on_record`` sees every manifest record.
    Returns the :class:`MetricTable` (rows per category, then the mean) after writing it.
    """
    unknown = sorted(set(metrics) - set(ANOMALY_METRICS))
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {', '.join(ANOMALY_METRICS)}")
    if task is None and preset not in ANOMALY_PRESETS:
        raise ConfigError(
            f"unknown anomaly preset {preset!r}; choose one of: {', '.join(ANOMALY_PRESETS)}"
        )
    data, out = Path(data), Path(out)
    if layout == "auto":
        layout = detect_anomaly_layout(data)
    samples = read_anomaly(data, layout, categories)
    dataset = dataset or layout
    rt = runtime_of(runtime)
    opts = dict(options or {})
    by_cat: dict[str, list[AnomalySample]] = defaultdict(list)
    for s in samples:
        by_cat[s.category].append(s)

    base = {"task": "anomaly", "preset": preset, "dataset": dataset, **opts}
    tasks = {
        cat: _category_task(rt, cat, task, base, data, layout, shots, seed, fmt, size)
        for cat in sorted(by_cat)
    }
    settings = {
        "task": "anomaly",
        "data": str(data.resolve()),
        "layout": layout,
        "size": size,
        "preset": preset,
        "dataset": dataset,
        "options": opts,
        "shots": shots,
        "seed": seed,
        "models": str(rt.config.models),
        "precision": rt.precision,
        "fmt": fmt,
    }
    if any(t.group == "all" for t in tasks.values()):
        settings["limit"] = limit  # a set-level method scores each image against its set
    root = out / "predictions" / "anomaly"
    prepare_predictions(root, settings, force, log)
    config = dict(settings)
    warning = random_weights_warning(settings["models"])
    if warning:
        config["warning"] = warning

    wanted = set(metrics)
    report_data: dict[str, dict] = {}  # category -> thresholds, curves, predictions
    rows: list[dict] = []
    failed: list[tuple[str, str]] = []
    no_masks: list[str] = []
    run_kw = dict(
        batch_size=batch_size, retry_errors=retry_errors, progress=progress, on_record=on_record
    )
    for cat, spec in tasks.items():
        cat_samples = limit_spread(by_cat[cat], limit)
        preds, cat_failed = _predict_category(rt, cat, cat_samples, spec, data, root, run_kw, log)
        failed.extend(cat_failed)
        seen: dict[str, Any] = {}
        got, masks_missing = _category_metrics(preds, wanted, size, bins, exact, log, seen)
        seen["preds"] = preds
        report_data[cat] = seen
        got["n_failed"] = len(cat_failed)
        if masks_missing:
            no_masks.append(cat)
        row = {"category": cat, **{k: got[k] for k in (*_COUNTS, *ANOMALY_METRICS) if k in got}}
        rows.append(row)
        shown = [f"{k}={row[k]:.4f}" for k in metrics if isinstance(row.get(k), float)]
        log(f"[{cat}] " + ", ".join(shown))
    thresholds = {cat: d.get("thresholds") or {} for cat, d in report_data.items()}
    table = _table(rows, failed, no_masks, set(metrics), config, None if exact else bins, log)
    table.extra["f1_thresholds"] = thresholds
    table.save(out)
    from zsdense.eval.report import save_eval_thresholds, write_anomaly_report

    try:
        table.files["thresholds"] = save_eval_thresholds(out, table, thresholds)
    except OSError as exc:
        log(f"thresholds.json not written: {exc}")
    try:
        table.files["report"] = write_anomaly_report(out, table, report_data, size=size)
    except Exception as exc:  # noqa: BLE001 - the metrics are saved; the page is a view
        log(f"the evaluation report was not written: {exc}")
    return table
