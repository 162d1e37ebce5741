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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from zsdense import metrics as M
from zsdense.config import ANOMALY_PRESETS
from zsdense.engine.local import load_records
from zsdense.engine.specs import TaskSpec
from zsdense.errors import ConfigError
from zsdense.eval.common import (
    Evaluation,
    Log,
    MetricTable,
    RunOptions,
    check_preset,
    mean_row,
    preset_head,
    rel_key,
    runtime_settings,
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

if TYPE_CHECKING:
    from typing_extensions import Unpack

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
    row.update(_image_metrics(preds, wanted, seen))
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
    pm = (
        _pixel_metrics_exact(pix, size, seen)
        if exact
        else _pixel_metrics(pix, size, bins, wanted, seen)
    )
    row.update({k: v for k, v in pm.items() if k in wanted})
    return row, False


def _image_metrics(preds: list[_Pred], wanted: set[str], seen: dict) -> dict[str, Any]:
    """The wanted image metrics; the image F1-optimal threshold and curves into ``seen``."""
    labels = [p.sample.label for p in preds]
    scores = [p.score for p in preds]
    f1_img, thr_img = M.f1_max_threshold(labels, scores)
    seen["thresholds"] = {"image_threshold": thr_img, "image_f1_max": f1_img}
    seen["curves"] = {
        "image_roc": M.roc_curve(labels, scores),
        "image_pr": M.pr_curve(labels, scores),
    }
    if not wanted & IMAGE_METRICS:
        return {}
    return {k: v for k, v in M.image_metrics(labels, scores).items() if k in wanted}


def _map_mask_pairs(pix: list[_Pred], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(stored map, ground-truth mask at ``size``) of each image, one at a time."""
    for p in pix:
        amap = np.load(p.map_path)
        if p.sample.mask_path:
            mask = resize_mask(load_anomaly_mask(p.sample), size)
        else:
            mask = np.zeros((size, size), dtype=bool)
        yield amap, mask


def _pixel_metrics_exact(pix: list[_Pred], size: int, seen: dict) -> dict[str, Any]:
    """Exact pixel metrics, every map of the category in memory at once."""
    maps, masks = zip(*_map_mask_pairs(pix, size))
    masks, maps = np.stack(masks), np.stack(maps)
    pm = M.pixel_metrics(masks, maps)
    f1_pix, thr_pix = M.f1_max_threshold(masks, maps)
    seen["thresholds"].update(threshold=thr_pix, pixel_f1_max=f1_pix)
    fpr, pro = M.pro_curve_mvtec(masks, maps)
    seen["curves"].update(
        pixel_roc=M.roc_curve(masks, maps), pixel_pr=M.pr_curve(masks, maps), pro=(fpr, pro)
    )
    return pm


def _pixel_metrics(
    pix: list[_Pred], size: int, bins: int, wanted: set[str], seen: dict
) -> dict[str, Any]:
    """Streamed pixel metrics in two passes over the stored maps: the category's score range,
    then ``bins`` histogram bins over it (and the papers' exact AUPRO counts when wanted)."""
    rt = M.RangeTracker()  # pass 1: the category's score range
    for p in pix:
        rt.update(np.load(p.map_path))
    if rt.lo is None:
        return {}
    hi = rt.hi if rt.hi > rt.lo else rt.lo + 1.0
    acc = M.PixelAccumulator(bins=bins, value_range=(float(rt.lo), float(hi)))
    pro = M.AuproAccumulator.from_range(rt.lo, rt.hi) if "aupro" in wanted else None
    for amap, mask in _map_mask_pairs(pix, size):  # pass 2
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
    return pm


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
    return anomaly_eval_task(preset_head(rt, cfg, fmt), size)


def _predict_category(
    ev: Evaluation, cat: str, samples: list[AnomalySample], spec: TaskSpec, data: Path
) -> tuple[list[_Pred], list[tuple[str, str]]]:
    """Predictions of one category (stored ones reused; a set-level head predicts its whole
    set again when one is missing) and its failures."""
    items = [
        WorkItem(key=str(r), path=s.image_path, rel=r)
        for s in samples
        for r in [rel_key(s.image_path, data)]
    ]
    stored = {rec.get("key"): rec for rec in load_records(ev.root)}
    missing = sum(not record_complete(stored.get(it.key, {}), ev.root) for it in items)
    redo_set = spec.group == "all" and missing > 0
    if missing:
        n = len(items) if redo_set else missing
        ev.log(f"[{cat}] predicting {n} of {len(items)} images")
    run = ev.predict(items, spec, label=f"[{cat}] ", force=redo_set)
    preds = [
        _Pred(s, float(run.records[it.key]["scores"]["score"]), run.path(it.key, "eval_map"))
        for s, it in zip(samples, items)
        if it.key in run.records
    ]
    return preds, list(run.failed)


def _evaluate_category(
    ev: Evaluation,
    cat: str,
    samples: list[AnomalySample],
    spec: TaskSpec,
    data: Path,
    metrics: Sequence[str],
    scoring: dict[str, Any],
) -> tuple[dict, list[tuple[str, str]], dict[str, Any], bool]:
    """Predict and score one category: its row, its failures, what the report shows of it
    (thresholds, curves, predictions) and whether its masks were missing."""
    preds, failed = _predict_category(ev, cat, samples, spec, data)
    seen: dict[str, Any] = {}
    got, masks_missing = _category_metrics(preds, set(metrics), log=ev.log, seen=seen, **scoring)
    seen["preds"] = preds
    got["n_failed"] = len(failed)
    row = {"category": cat, **{k: got[k] for k in (*_COUNTS, *ANOMALY_METRICS) if k in got}}
    shown = [f"{k}={row[k]:.4f}" for k in metrics if isinstance(row.get(k), float)]
    ev.log(f"[{cat}] " + ", ".join(shown))
    return row, failed, seen, masks_missing


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


def _check_choices(metrics: Sequence[str], preset: str, task: TaskFactory | None) -> None:
    unknown = sorted(set(metrics) - set(ANOMALY_METRICS))
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {', '.join(ANOMALY_METRICS)}")
    check_preset(preset, ANOMALY_PRESETS, "anomaly", task)


def _by_category(samples: list[AnomalySample]) -> dict[str, list[AnomalySample]]:
    by_cat: dict[str, list[AnomalySample]] = defaultdict(list)
    for s in samples:
        by_cat[s.category].append(s)
    return by_cat


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
    fmt: str = "none",
    task: TaskFactory | None = None,
    **run_options: Unpack[RunOptions],
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
    predictions, so give each head its own name); ``run_options``: how the predictions run
    (:class:`~zsdense.eval.common.RunOptions`; its ``on_record`` sees every manifest record).
    Returns the :class:`MetricTable` (rows per category, then the mean) after writing it.
    """
    _check_choices(metrics, preset, task)
    ev = Evaluation(out, **run_options)
    data = Path(data)
    if layout == "auto":
        layout = detect_anomaly_layout(data)
    by_cat = _by_category(read_anomaly(data, layout, categories))
    dataset = dataset or layout
    rt = runtime_of(runtime)
    opts = dict(options or {})
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
        **runtime_settings(rt),
        "fmt": fmt,
    }
    if any(t.group == "all" for t in tasks.values()):
        settings["limit"] = limit  # a set-level method scores each image against its set
    ev.prepare(rt, settings)

    scoring = {"size": size, "bins": bins, "exact": exact}
    rows, failed, no_masks, report_data = _evaluate_categories(
        ev, tasks, by_cat, limit, data, metrics, scoring
    )
    table = _table(rows, failed, no_masks, set(metrics), ev.config, None if exact else bins, ev.log)
    return _save(ev, table, report_data, size)


def _evaluate_categories(
    ev: Evaluation,
    tasks: dict[str, TaskSpec],
    by_cat: dict[str, list[AnomalySample]],
    limit: int | None,
    data: Path,
    metrics: Sequence[str],
    scoring: dict[str, Any],
) -> tuple[list[dict], list[tuple[str, str]], list[str], dict[str, dict]]:
    """Every category in turn (at most ``limit`` images each): the rows, the failures, the
    categories without masks, and per category what the report shows."""
    report_data: dict[str, dict] = {}  # category -> thresholds, curves, predictions
    rows: list[dict] = []
    failed: list[tuple[str, str]] = []
    no_masks: list[str] = []
    for cat, spec in tasks.items():
        cat_samples = limit_spread(by_cat[cat], limit)
        row, cat_failed, report_data[cat], masks_missing = _evaluate_category(
            ev, cat, cat_samples, spec, data, metrics, scoring
        )
        rows.append(row)
        failed.extend(cat_failed)
        if masks_missing:
            no_masks.append(cat)
    return rows, failed, no_masks, report_data


def _save(
    ev: Evaluation, table: MetricTable, report_data: dict[str, dict], size: int
) -> MetricTable:
    """Write the table, the F1-optimal ``thresholds.json`` and ``report_anomaly.html`` (a
    failure of either of the last two is said, not raised: the metrics are saved)."""
    thresholds = {cat: d.get("thresholds") or {} for cat, d in report_data.items()}
    table.extra["f1_thresholds"] = thresholds
    ev.save(table)
    from zsdense.eval.report import save_eval_thresholds, write_anomaly_report

    try:
        table.files["thresholds"] = save_eval_thresholds(ev.out, table, thresholds)
    except OSError as exc:
        ev.log(f"thresholds.json not written: {exc}")
    try:
        table.files["report"] = write_anomaly_report(ev.out, table, report_data, size=size)
    except Exception as exc:  # noqa: BLE001 - the metrics are saved; the page is a view
        ev.log(f"the evaluation report was not written: {exc}")
    return table
