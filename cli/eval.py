"""``zsdense eval {anomaly,openvocab,refer}``: run a model over a benchmark and score it.

Each run keeps its predictions under ``--out/predictions/<task>/`` (anomaly maps at the
evaluation size as ``.npy``, label maps and masks as PNG) with a ``manifest.jsonl`` line per
sample and a ``config.json`` saying which preset/models made them. A rerun with the same
preset/models reuses them and only recomputes metrics (``--recompute`` forces prediction);
predictions made with another preset or model set are replaced. Results go to
``--out/metrics_<task>.json`` and ``.csv`` (one row per category / class, then the mean row),
and a table like the papers' is printed.

Anomaly pixel metrics stream over the stored maps in two passes per category, never holding
them all: pass 1 finds the category's min and max score, pass 2 fills ``--bins`` histogram bins
over that range (pixel AUROC / AP / F1-max / MVTec AUPRO, see
:class:`~zsdense.metrics.PixelAccumulator`) and the exact per-threshold counts of the
papers' AUPRO. ``--exact`` loads a category's maps at once and uses the exact functions.

The work is done by plain functions (:func:`eval_anomaly`, :func:`eval_openvocab`,
:func:`eval_refer`) that take the predictor as a parameter; the click commands only parse
options and build the default predictor from :class:`zsdense.api.Segmenter`. Tests inject a
stub through ``ctx.obj["predictor"]``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image

from zsdense import metrics as M
from zsdense.datasets import (
    ANOMALY_LAYOUTS,
    REFER_LAYOUTS,
    SEG_LAYOUTS,
    AnomalySample,
    ReferSample,
    SegDataset,
    class_display_name,
    detect_anomaly_layout,
    load_anomaly_mask,
    load_label,
    read_anomaly,
    read_class_file,
    read_referring,
    read_segmentation,
)
from zsdense.errors import ConfigError, InputError, ZsdenseError

__all__ = [
    "eval_group",
    "eval_anomaly",
    "eval_openvocab",
    "eval_refer",
    "EVAL_SIZE",
    "ANOMALY_METRICS",
    "resize_map",
    "resize_mask",
    "PredictionStore",
]

EVAL_SIZE = 518  # anomaly maps and masks are scored at 518x518 (specs/anomaly.md)
ANOMALY_METRICS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "aupro_mvtec",
)
_PIXEL = {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "aupro_mvtec"}

# Predictors (the model, injected): each returns objects with the attributes of the API results.
AnomalyPredictor = Callable[[list[Path], str], Sequence[Any]]  # -> .score, .anomaly_map
OpenVocabPredictor = Callable[[list[Path], list[str]], Sequence[Any]]  # -> .labels
ReferPredictor = Callable[[Path, list[str]], Sequence[Any]]  # -> .mask, .score
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    click.echo(msg, err=True)


# ============================================================================== file helpers


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    _atomic_write_bytes(path, buf.getvalue())


def _save_png(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    _atomic_write_bytes(path, buf.getvalue())


def _clean(v: Any) -> Any:
    """JSON-safe value: NaN -> None, numpy scalars -> Python numbers."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _write_table(
    out: Path, stem: str, key: str, rows: list[dict], mean: dict, extra: dict
) -> tuple[Path, Path]:
    """``<stem>.json`` (rows, mean, run settings) and ``<stem>.csv`` (rows then a mean row)."""
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    _atomic_write_text(
        json_path, json.dumps(_clean({"rows": rows, "mean": mean, **extra}), indent=2) + "\n"
    )
    cols = list(dict.fromkeys([key] + [c for r in rows + [mean] for c in r]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows + [mean]:
        w.writerow({c: ("" if _clean(r.get(c)) is None else _clean(r.get(c))) for c in cols})
    _atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def _format_table(
    key: str, rows: list[dict], mean: dict | None, cols: Sequence[str], percent: bool = True
) -> str:
    """Fixed-width table, metric values x100 with one decimal as the papers print them; the
    mean row (if any) last, under a rule."""

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(v)
        return f"{100 * float(v):.1f}" if percent else f"{float(v):.4f}"

    head = [key] + list(cols)
    every = rows + ([mean] if mean is not None else [])
    body = [[str(r.get(key, ""))] + [fmt(r.get(c)) for c in cols] for r in every]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [
        "  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(head))
    ]
    lines.append("  ".join("-" * w for w in widths))
    for n, b in enumerate(body):
        if mean is not None and n == len(body) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append(
            "  ".join(x.ljust(widths[i]) if i == 0 else x.rjust(widths[i]) for i, x in enumerate(b))
        )
    return "\n".join(lines)


# ============================================================================== prediction store


class PredictionStore:
    """Predictions of one task under ``<out>/predictions/<task>/``: files plus a manifest.

    ``config.json`` records what made the predictions (task, preset, models, data root); when
    it differs from the current run, or ``recompute`` is set, the old predictions are removed.
    Each finished sample appends one JSON line to ``manifest.jsonl`` after its file is written
    (atomically), so an interrupted run resumes where it stopped.
    """

    def __init__(
        self, out: Path, task: str, config: dict, recompute: bool = False, log: Log = _stderr
    ) -> None:
        self.root = out / "predictions" / task
        self.manifest = self.root / "manifest.jsonl"
        cfg_path = self.root / "config.json"
        old = None
        if cfg_path.is_file():
            try:
                old = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = None
        if self.root.exists() and (recompute or old != _clean(config)):
            if not recompute and old is not None:
                log(f"predictions in {self.root} were made with {old}; recomputing")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(cfg_path, json.dumps(_clean(config), indent=2) + "\n")
        self.entries: dict[str, dict] = {}
        if self.manifest.is_file():
            for line in self.manifest.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted run
                if (self.root / e.get("file", "")).is_file():
                    self.entries[e["key"]] = e

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def path(self, entry: dict) -> Path:
        return self.root / entry["file"]

    def add(self, key: str, rel_file: str, data: np.ndarray, **fields: Any) -> dict:
        """Write the prediction file, then its manifest line."""
        target = self.root / rel_file
        if rel_file.endswith(".npy"):
            _save_npy(target, data)
        else:
            _save_png(target, data)
        entry = _clean({"key": key, "file": rel_file, **fields})
        with open(self.manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self.entries[key] = entry
        return entry


def _rel_key(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix().lstrip("/")


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "._-/" else "_" for c in key).replace("..", "_")


# ============================================================================== anomaly


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


def _eval_map(result: Any, size: int) -> np.ndarray:
    """The map to score: the head's own smoothed map at the evaluation size when it kept one
    (``result.model_map``, asked for with ``keep_model_map=True``), else the full-size map
    resized bilinearly to ``size``."""
    m = getattr(result, "model_map", None)
    if m is not None and np.asarray(m).shape == (size, size):
        return np.asarray(m, dtype=np.float32)
    return resize_map(np.asarray(result.anomaly_map), size)


def _limit_spread(samples: list, n: int | None) -> list:
    """At most n samples, evenly spread over the sorted list (keeps normal and defective)."""
    if n is None or len(samples) <= n:
        return samples
    idx = np.unique(np.linspace(0, len(samples) - 1, n).round().astype(int))
    return [samples[i] for i in idx]


@dataclass
class _Pred:
    sample: AnomalySample
    score: float
    map_path: Path


def _predict_anomaly(
    samples: list[AnomalySample],
    category: str,
    store: PredictionStore,
    predictor: AnomalyPredictor,
    data_root: Path,
    size: int,
    batch_size: int,
    whole_category: bool,
    log: Log,
) -> list[_Pred]:
    keys = [_rel_key(s.image_path, data_root) for s in samples]
    todo = [i for i, k in enumerate(keys) if store.get(k) is None]
    if todo and whole_category:
        todo = list(range(len(samples)))  # mutual scoring needs the whole category at once
    if todo:
        log(f"[{category}] predicting {len(todo)} of {len(samples)} images")
    step = len(todo) if whole_category else max(1, batch_size)
    object_name = category.replace("_", " ")
    for start in range(0, len(todo), max(step, 1)):
        chunk = todo[start : start + step]
        results = predictor([samples[i].image_path for i in chunk], object_name)
        if len(results) != len(chunk):
            raise ConfigError(
                f"the predictor returned {len(results)} results for {len(chunk)} images"
            )
        for i, r in zip(chunk, results):
            s = samples[i]
            store.add(
                keys[i],
                _safe_name(keys[i]).rsplit(".", 1)[0] + ".npy",
                _eval_map(r, size),
                image=str(s.image_path),
                category=s.category,
                defect=s.defect,
                label=s.label,
                score=float(r.score),
            )
    return [
        _Pred(s, float(store.get(k)["score"]), store.path(store.get(k)))
        for s, k in zip(samples, keys)
    ]


def _category_metrics(
    preds: list[_Pred], wanted: set[str], size: int, bins: int, exact: bool, log: Log
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "n_images": len(preds),
        "n_anomalous": sum(p.sample.label for p in preds),
    }
    labels = [p.sample.label for p in preds]
    if wanted & {"image_auroc", "image_ap", "image_f1_max"}:
        row.update(
            {
                k: v
                for k, v in M.image_metrics(labels, [p.score for p in preds]).items()
                if k in wanted
            }
        )
    if not wanted & _PIXEL:
        return row
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
            mask = (
                resize_mask(load_anomaly_mask(p.sample), size)
                if p.sample.mask_path
                else (np.zeros((size, size), dtype=bool))
            )
            yield amap, mask

    if exact:  # in memory: every map of the category at once
        maps, masks = zip(*pairs()) if pix else ((), ())
        pm = M.pixel_metrics(np.stack(masks), np.stack(maps)) if pix else {}
        row.update({k: v for k, v in pm.items() if k in wanted})
        return row
    rt = M.RangeTracker()  # pass 1: the category's score range
    for p in pix:
        rt.update(np.load(p.map_path))
    if rt.lo is None:
        return row
    hi = rt.hi if rt.hi > rt.lo else rt.lo + 1.0
    acc = M.PixelAccumulator(bins=bins, value_range=(float(rt.lo), float(hi)))
    pro = M.AuproAccumulator.from_range(rt.lo, rt.hi) if "aupro" in wanted else None
    for amap, mask in pairs():  # pass 2
        acc.update(amap, mask)
        if pro is not None:
            pro.update(amap, mask)
    pm = {
        "pixel_auroc": acc.auroc(),
        "pixel_ap": acc.ap(),
        "pixel_f1_max": acc.f1_max(),
    }
    if "aupro_mvtec" in wanted:
        pm["aupro_mvtec"] = acc.aupro_mvtec()
    if pro is not None:
        pm["aupro"] = pro.aupro()
    row.update({k: v for k, v in pm.items() if k in wanted})
    return row


def _mean_row(rows: list[dict], cols: Sequence[str], key: str) -> dict:
    mean: dict[str, Any] = {key: "mean"}
    for c in cols:
        vals = [float(r[c]) for r in rows if r.get(c) is not None and math.isfinite(float(r[c]))]
        mean[c] = float(np.mean(vals)) if vals else float("nan")
    return mean


def eval_anomaly(
    data: Path,
    out: Path,
    predictor: AnomalyPredictor,
    *,
    layout: str = "auto",
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    metrics: Sequence[str] = ANOMALY_METRICS,
    recompute: bool = False,
    run_config: dict | None = None,
    size: int = EVAL_SIZE,
    bins: int = M.DEFAULT_BINS,
    exact: bool = False,
    batch_size: int = 8,
    whole_category: bool = False,
    log: Log = _stderr,
) -> dict:
    """Predict (or reuse predictions) and score an anomaly test set per category.

    Returns ``{"rows": [...], "mean": {...}, ...}`` as written to ``metrics_anomaly.json``.
    ``whole_category`` sends each category to the predictor in one call (mutual scoring).
    """
    unknown = sorted(set(metrics) - set(ANOMALY_METRICS))
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {', '.join(ANOMALY_METRICS)}")
    samples = read_anomaly(data, layout, categories)
    by_cat: dict[str, list[AnomalySample]] = defaultdict(list)
    for s in samples:
        by_cat[s.category].append(s)
    cfg = {"task": "anomaly", "data": str(Path(data).resolve()), "size": size, **(run_config or {})}
    store = PredictionStore(out, "anomaly", cfg, recompute, log)
    rows = []
    for cat in sorted(by_cat):
        cat_samples = _limit_spread(by_cat[cat], limit)
        preds = _predict_anomaly(
            cat_samples, cat, store, predictor, Path(data), size, batch_size, whole_category, log
        )
        got = _category_metrics(preds, set(metrics), size, bins, exact, log)
        counts = ("n_images", "n_anomalous", "n_pixel_images")
        row = {"category": cat, **{k: got[k] for k in (*counts, *ANOMALY_METRICS) if k in got}}
        rows.append(row)
        log(f"[{cat}] " + ", ".join(f"{k}={row[k]:.4f}" for k in metrics if k in row))
    cols = [m for m in ANOMALY_METRICS if m in metrics]
    mean = _mean_row(rows, cols, "category")
    result = {"rows": rows, "mean": mean, "config": cfg, "pixel_bins": None if exact else bins}
    _write_table(
        out,
        "metrics_anomaly",
        "category",
        rows,
        mean,
        {"config": cfg, "pixel_bins": None if exact else bins},
    )
    result["table"] = _format_table("category", rows, mean, cols)
    return result


# ============================================================================== open vocabulary


def _resolve_classes(ds: SegDataset, classes_file: Path | None) -> list[str]:
    if classes_file is not None:
        return read_class_file(classes_file)
    if ds.class_names:
        return ds.class_names
    raise ConfigError(
        f"no class list for the {ds.layout} layout: pass --classes-file FILE (one class per "
        "line, in label-index order"
        + (", after reduce_zero_label" if ds.reduce_zero_label else "")
        + ")"
    )


def eval_openvocab(
    data: Path,
    out: Path,
    predictor: OpenVocabPredictor,
    *,
    layout: str = "auto",
    split: str = "val",
    classes_file: Path | None = None,
    reduce_zero_label: bool | None = None,
    limit: int | None = None,
    recompute: bool = False,
    run_config: dict | None = None,
    batch_size: int = 4,
    log: Log = _stderr,
) -> dict:
    """Predict (or reuse) label maps and compute mmseg-style per-class IoU and mIoU."""
    ds = read_segmentation(data, layout, split, reduce_zero_label)
    names = _resolve_classes(ds, classes_file)
    samples = [s for s in ds.samples if s.label_path is not None]
    if len(samples) < len(ds.samples):
        log(f"{len(ds.samples) - len(samples)} images have no label file: skipped")
    if limit is not None:
        samples = samples[:limit]
    cfg = {
        "task": "openvocab",
        "data": str(Path(data).resolve()),
        "layout": ds.layout,
        "split": split,
        "classes": names,
        **(run_config or {}),
    }
    store = PredictionStore(out, "openvocab", cfg, recompute, log)
    todo = [s for s in samples if store.get(s.id) is None]
    if todo:
        log(f"predicting {len(todo)} of {len(samples)} images")
    dtype = np.uint8 if len(names) <= 256 else np.uint16
    for start in range(0, len(todo), max(1, batch_size)):
        chunk = todo[start : start + batch_size]
        results = predictor([s.image_path for s in chunk], names)
        for s, r in zip(chunk, results):
            store.add(
                s.id,
                _safe_name(s.id) + ".png",
                np.asarray(r.labels).astype(dtype),
                image=str(s.image_path),
            )
    acc = M.IoUAccumulator(len(names), ds.ignore_index)
    for s in samples:
        pred = np.asarray(Image.open(store.path(store.get(s.id))), dtype=np.int64)
        gt = load_label(s.label_path, ds.reduce_zero_label, ds.ignore_index)
        if pred.shape != gt.shape:
            log(f"{s.id}: prediction {pred.shape} resized (nearest) to the label's {gt.shape}")
            pred = np.asarray(
                Image.fromarray(pred.astype(np.int32), mode="I").resize(
                    (gt.shape[1], gt.shape[0]), Image.NEAREST
                ),
                dtype=np.int64,
            )
        acc.update(pred, gt)
    iou, accs = acc.iou(), acc.acc()
    rows = [
        {
            "class": class_display_name(n),
            "iou": iou[i],
            "acc": accs[i],
            "gt_pixels": int(acc.area_label[i]),
        }
        for i, n in enumerate(names)
    ]
    summary = acc.metrics()
    mean = {"class": "mean", "iou": summary["miou"], "acc": summary["macc"]}
    extra = {"summary": {**summary, "n_images": len(samples)}, "config": cfg}
    _write_table(out, "metrics_openvocab", "class", rows, mean, extra)
    table = _format_table("class", rows, mean, ["iou", "acc"])
    table += f"\naAcc {100 * summary['aacc']:.1f}  mIoU {100 * summary['miou']:.1f}"
    return {"rows": rows, "mean": mean, **extra, "table": table}


# ============================================================================== referring


def eval_refer(
    data: Path,
    out: Path,
    predictor: ReferPredictor,
    *,
    layout: str = "auto",
    split: str = "val",
    images_dir: Path | None = None,
    limit: int | None = None,
    recompute: bool = False,
    run_config: dict | None = None,
    log: Log = _stderr,
) -> dict:
    """Predict (or reuse) one mask per sentence; oIoU, mIoU and precision@0.5/0.7/0.9."""
    samples: list[ReferSample] = read_referring(data, layout, split, images_dir)
    if limit is not None:
        samples = samples[:limit]
    cfg = {"task": "refer", "data": str(Path(data).resolve()), "split": split, **(run_config or {})}
    store = PredictionStore(out, "refer", cfg, recompute, log)
    todo: dict[Path, list[ReferSample]] = defaultdict(list)
    for s in samples:
        if store.get(s.id) is None:
            todo[s.image_path].append(s)
    if todo:
        log(f"predicting {sum(map(len, todo.values()))} of {len(samples)} expressions")
    for image, group in todo.items():  # one image's expressions together: shared features
        results = predictor(image, [s.text for s in group])
        for s, r in zip(group, results):
            store.add(
                s.id,
                _safe_name(s.id) + ".png",
                np.asarray(r.mask).astype(np.uint8) * 255,
                image=str(image),
                text=s.text,
                score=float(getattr(r, "score", float("nan"))),
            )
    acc = M.ReferAccumulator()
    per_sample = []
    for s in samples:
        e = store.get(s.id)
        pred = np.asarray(Image.open(store.path(e))) > 0
        gt = s.load_mask(pred.shape)
        if gt.shape != pred.shape:
            raise InputError(
                s.id, f"prediction {pred.shape} and ground truth {gt.shape} differ in size"
            )
        per_sample.append({"id": s.id, "iou": acc.update(pred, gt), "text": s.text})
    summary = acc.metrics()
    row = {"split": split, **summary}
    cols = ["oiou", "miou", *(f"prec@{t:g}" for t in acc.thresholds)]
    extra = {"config": cfg, "per_sample": per_sample}
    _write_table(out, "metrics_refer", "split", [row], {"split": "all", **summary}, extra)
    return {
        "rows": [row],
        "mean": summary,
        **extra,
        "table": _format_table("split", [row], None, cols),
    }


# ============================================================================== click


def _run_config(preset: str, models: str) -> dict:
    cfg: dict[str, Any] = {"preset": preset, "models": models}
    if models in ("tiny", "random"):
        cfg["warning"] = f"random weights (--models {models}): these numbers are NOT meaningful"
    return cfg


def _split_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _segmenter(runtime: dict[str, Any]):
    from zsdense.cli.common import make_segmenter

    return make_segmenter(**runtime)


def _run(ctx: click.Context, fn: Callable[[], dict]) -> None:
    """Run an evaluation, print its table; user errors print one line and exit non-zero."""
    try:
        result = fn()
    except ZsdenseError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(exc.exit_code)
    click.echo(result["table"])
    warning = (result.get("config") or {}).get("warning")
    if warning:
        click.echo(f"warning: {warning}", err=True)


def _common(f: Callable) -> Callable:
    """--data, --out, --limit, --recompute, then the shared runtime options (--models, --device,
    --precision, --weights-dir, --batch-size, --offline, --max-pixels)."""
    from zsdense.cli.common import runtime_options

    opts = [
        click.option(
            "--data",
            "data",
            required=True,
            type=click.Path(exists=True, path_type=Path),
            help="Dataset root.",
        ),
        click.option(
            "--out",
            "out",
            required=True,
            type=click.Path(path_type=Path),
            help="Output folder: predictions/, metrics_<task>.json and .csv.",
        ),
        click.option(
            "--limit",
            type=click.IntRange(min=1),
            default=None,
            help="Evaluate at most N samples (per category for anomaly, spread over "
            "normal and defective images).",
        ),
        click.option(
            "--recompute", is_flag=True, help="Predict again even where stored predictions exist."
        ),
    ]
    f = runtime_options(f)
    for o in reversed(opts):
        f = o(f)
    return f


_RUNTIME_KEYS = (
    "models",
    "device",
    "precision",
    "weights_dir",
    "batch_size",
    "offline",
    "max_pixels",
)


def _pop_runtime(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: kw.pop(k) for k in _RUNTIME_KEYS if k in kw}


@click.group("eval")
def eval_group() -> None:
    """Score a preset against ground truth (anomaly, openvocab, refer)."""


@eval_group.command("anomaly")
@_common
@click.option(
    "--layout", type=click.Choice(("auto", *ANOMALY_LAYOUTS)), default="auto", show_default=True
)
@click.option("--preset", default="crane", show_default=True)
@click.option("--categories", default=None, help="Comma-separated categories (default: all).")
@click.option(
    "--metrics",
    "metric_names",
    default=",".join(ANOMALY_METRICS),
    show_default=True,
    help="Comma-separated metrics to compute.",
)
@click.option(
    "--bins",
    type=click.IntRange(min=16),
    default=M.DEFAULT_BINS,
    show_default=True,
    help="Histogram bins of the streaming pixel metrics.",
)
@click.option(
    "--exact", is_flag=True, help="Exact pixel metrics with every map of a category in memory."
)
@click.pass_context
def anomaly_cmd(
    ctx: click.Context,
    data: Path,
    out: Path,
    limit: int | None,
    recompute: bool,
    layout: str,
    preset: str,
    categories: str | None,
    metric_names: str,
    bins: int,
    exact: bool,
    **kw: Any,
) -> None:
    """Image and pixel AUROC / AP / F1-max and AUPRO per category, at 518x518."""
    runtime = _pop_runtime(kw)
    predictor = (ctx.obj or {}).get("predictor")

    def go() -> dict:
        nonlocal predictor
        # the papers' protocol picks prompts by benchmark (MVTec -> VisA-trained prompts)
        dataset = layout if layout != "auto" else detect_anomaly_layout(data)
        if predictor is None:
            seg = _segmenter(runtime)

            def predictor(paths: list[Path], object_name: str) -> list:
                return seg.anomaly_batch(
                    paths,
                    object_name=object_name,
                    preset=preset,
                    dataset=dataset,
                    keep_model_map=True,
                )

        return eval_anomaly(
            data,
            out,
            predictor,
            layout=layout,
            categories=_split_list(categories),
            limit=limit,
            metrics=_split_list(metric_names) or list(ANOMALY_METRICS),
            recompute=recompute,
            run_config={**_run_config(preset, runtime["models"]), "dataset": dataset},
            bins=bins,
            exact=exact,
            batch_size=runtime["batch_size"],
            whole_category=preset == "musc",
        )

    _run(ctx, go)


@eval_group.command("openvocab")
@_common
@click.option(
    "--layout",
    type=click.Choice(("auto", "generic", *SEG_LAYOUTS)),
    default="auto",
    show_default=True,
)
@click.option("--split", default="val", show_default=True)
@click.option("--preset", default="trident", show_default=True)
@click.option(
    "--classes-file",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Class names, one per line, in label-index order.",
)
@click.option(
    "--reduce-zero-label/--no-reduce-zero-label",
    default=None,
    help="Override the layout's convention (label 0 ignored, others shifted by -1).",
)
@click.pass_context
def openvocab_cmd(
    ctx: click.Context,
    data: Path,
    out: Path,
    limit: int | None,
    recompute: bool,
    layout: str,
    split: str,
    preset: str,
    classes_file: Path | None,
    reduce_zero_label: bool | None,
    **kw: Any,
) -> None:
    """Per-class IoU and mIoU (mmseg's protocol) at the original resolution."""
    runtime = _pop_runtime(kw)
    predictor = (ctx.obj or {}).get("predictor")

    def go() -> dict:
        nonlocal predictor
        if predictor is None:
            seg = _segmenter(runtime)

            def predictor(paths: list[Path], classes: list[str]) -> list:
                return seg.open_vocab_batch(paths, classes=classes, preset=preset)

        return eval_openvocab(
            data,
            out,
            predictor,
            layout=layout,
            split=split,
            classes_file=classes_file,
            reduce_zero_label=reduce_zero_label,
            limit=limit,
            recompute=recompute,
            run_config=_run_config(preset, runtime["models"]),
            batch_size=runtime["batch_size"],
        )

    _run(ctx, go)


@eval_group.command("refer")
@_common
@click.option(
    "--layout", type=click.Choice(("auto", *REFER_LAYOUTS)), default="auto", show_default=True
)
@click.option("--split", default="val", show_default=True)
@click.option("--preset", default="hybridgl", show_default=True)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="COCO train2014 image folder (RefCOCO layout).",
)
@click.pass_context
def refer_cmd(
    ctx: click.Context,
    data: Path,
    out: Path,
    limit: int | None,
    recompute: bool,
    layout: str,
    split: str,
    preset: str,
    images_dir: Path | None,
    **kw: Any,
) -> None:
    """oIoU, mIoU and precision@0.5/0.7/0.9 over every expression."""
    runtime = _pop_runtime(kw)
    predictor = (ctx.obj or {}).get("predictor")

    def go() -> dict:
        nonlocal predictor
        if predictor is None:
            seg = _segmenter(runtime)

            def predictor(image: Path, texts: list[str]) -> list:
                ctx_img = seg.context(image)  # one context: features shared by the texts
                return seg.refer_batch([ctx_img] * len(texts), texts, preset=preset)

        return eval_refer(
            data,
            out,
            predictor,
            layout=layout,
            split=split,
            images_dir=images_dir,
            limit=limit,
            recompute=recompute,
            run_config=_run_config(preset, runtime["models"]),
        )

    _run(ctx, go)
