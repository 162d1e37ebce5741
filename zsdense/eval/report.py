"""Evaluation you can see: ``report_anomaly.html`` and the F1-optimal ``thresholds.json``.

``zsdense eval anomaly`` writes, next to ``metrics_anomaly.{json,csv,md}``:

- ``thresholds.json`` (:mod:`zsdense.io.thresholds`): per category the pixel and image thresholds
  that reach the pixel and image F1-max (the arg-max of :func:`zsdense.metrics.f1_max_threshold`;
  the pixel one on the binned scores unless ``--exact``: the lower edge of the bin), source
  ``eval-f1-max``, and the settings they belong to; ``zsdense anomaly --thresholds FILE
  --object CATEGORY`` and ``zsdense decide --thresholds FILE`` reuse them;
- ``report_anomaly.html``: one self-contained page (no network) with the per-category table and
  thresholds, per category the ROC and PR curves (image and pixel) and the PRO curve (pixel,
  FPR up to 1 with the 0.3 integration limit marked) drawn with matplotlib (the optional extra
  ``zsdense[plots]``; without it the page has the tables and says how to get the curves), and
  the worst false positives and false negatives at the image F1-optimal threshold as
  image | ground truth | prediction strips (prediction: the scored map, jet over the category's
  range, with the mask outline at the pixel F1-optimal threshold).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zsdense.io.thresholds import THRESHOLDS_NAME, Thresholds, write_thresholds
from zsdense.io.writers import atomic_path, jet_colors

__all__ = ["save_eval_thresholds", "write_anomaly_report", "REPORT_NAME", "WORST_K"]

REPORT_NAME = "report_anomaly.html"
WORST_K = 4  # strips per kind and category
STRIP_SIDE = 160
CURVE_POINTS = 400

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;color:#222;max-width:1200px}
table{border-collapse:collapse} th,td{border:1px solid #ccc;padding:3px 6px;font-size:13px}
th{background:#eee} td.num{text-align:right;font-variant-numeric:tabular-nums}
p.warn{background:#a00;color:#fff;font-weight:bold;padding:8px 12px}
section.cat{border-top:2px solid #888;margin-top:1.5em}
.strip{display:inline-block;margin:4px 8px 8px 0;font-size:12px;vertical-align:top}
.strip img{display:block;border:1px solid #ccc}
p.note{background:#ffd;padding:6px 10px;border:1px solid #cc9}
"""


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def save_eval_thresholds(out: Path, table: Any, thresholds: dict[str, dict]) -> Path:
    """``OUT/thresholds.json`` with the F1-optimal thresholds of every category."""
    cfg = dict(table.config)
    cats = {
        cat: {
            "threshold": t.get("threshold"),
            "image_threshold": t.get("image_threshold"),
            "pixel_f1_max": t.get("pixel_f1_max"),
            "image_f1_max": t.get("image_f1_max"),
        }
        for cat, t in thresholds.items()
    }
    single = next(iter(cats.values())) if len(cats) == 1 else {}
    th = Thresholds(
        threshold=single.get("threshold"),
        image_threshold=single.get("image_threshold"),
        source="eval-f1-max",
        detail={
            "data": cfg.get("data"),
            "layout": cfg.get("layout"),
            "size": cfg.get("size"),
            "pixel_bins": table.extra.get("pixel_bins"),
            "rule": "arg-max of F1 over the test set (pixel: map >= t; image: score >= t)",
            "note": "optimised on the evaluated test set: an optimistic choice for that set",
        },
        belongs_to={
            "preset": cfg.get("preset"),
            "models": cfg.get("models"),
            "precision": cfg.get("precision"),
            "dataset": cfg.get("dataset"),
        },
        categories=cats,
    )
    return write_thresholds(Path(out) / THRESHOLDS_NAME, th)


# ---- pictures ------------------------------------------------------------------------------


def _png_b64(arr_u8: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(arr_u8).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _square(img: Image.Image, side: int) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR))


def _strip(pred: Any, lo: float, hi: float, thr: float | None, side: int = STRIP_SIDE) -> str:
    """image | ground truth | prediction as one PNG (base64)."""
    from zsdense.eval.datasets import load_anomaly_mask

    with Image.open(pred.sample.image_path) as im:
        img = _square(im, side)
    gt = load_anomaly_mask(pred.sample)
    gt_img = (np.asarray(Image.fromarray((gt > 0).astype(np.uint8) * 255).resize(
        (side, side), Image.Resampling.NEAREST)) > 0)  # fmt: skip
    gt_rgb = np.repeat((gt_img * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    amap = np.load(pred.map_path).astype(np.float32)
    small = np.asarray(Image.fromarray(amap, mode="F").resize((side, side)), dtype=np.float32)
    norm = (small - lo) / (hi - lo) if hi > lo else np.zeros_like(small)
    heat = (0.5 * img / 255.0 + 0.5 * jet_colors(norm)) * 255
    heat = np.clip(heat, 0, 255).astype(np.uint8)
    if thr is not None:
        m = small >= thr
        p = np.pad(m, 1)
        edge = m & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
        heat[edge] = (0, 255, 0)
    gap = np.full((side, 4, 3), 255, np.uint8)
    return _png_b64(np.concatenate([img, gap, gt_rgb, gap, heat], axis=1))


def _worst(preds: list, image_thr: float | None) -> tuple[list, list]:
    """(false positives, false negatives) at the image threshold, worst first."""
    if image_thr is None:
        return [], []
    fps = sorted((p for p in preds if p.sample.label == 0 and p.score >= image_thr),
                 key=lambda p: -p.score)  # fmt: skip
    fns = sorted((p for p in preds if p.sample.label == 1 and p.score < image_thr),
                 key=lambda p: p.score)  # fmt: skip
    return fps, fns


# ---- curves --------------------------------------------------------------------------------


def _thin(x: Any, y: Any, n: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x if x is not None else [], dtype=np.float64)
    y = np.asarray(y if y is not None else [], dtype=np.float64)
    if x.size > n:
        idx = np.unique(np.linspace(0, x.size - 1, n).round().astype(int))
        x, y = x[idx], y[idx]
    return x, y


def _plot(curves: dict, title: str) -> str | None:
    """The category's ROC, PR and PRO panels as a base64 PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=80)
    panels = (
        ("ROC", "false positive rate", "true positive rate", ("image_roc", "pixel_roc")),
        ("PR", "recall", "precision", ("image_pr", "pixel_pr")),
        ("PRO (pixel)", "false positive rate", "per-region overlap", ("pro",)),
    )
    for ax, (name, xl, yl, keys) in zip(axes, panels):
        drawn = False
        for key in keys:
            x, y = _thin(*(curves.get(key) or (None, None)))
            if x.size:
                ax.plot(x, y, label=key.split("_")[0] if key != "pro" else "pixel")
                drawn = True
        if name.startswith("PRO"):
            ax.axvline(0.3, color="#999", linestyle="--", linewidth=1)
            ax.text(0.31, 0.05, "AUPRO limit 0.3", fontsize=8, color="#666")
        ax.set_title(name)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="lower right" if name != "PR" else "lower left", fontsize=8)
        else:
            ax.text(0.5, 0.5, "undefined (one class only)", ha="center", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- the page ------------------------------------------------------------------------------


def _cell(v: Any, percent: bool = True) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if _finite(v):
        return f"{100 * float(v):.1f}" if percent else f"{float(v):.6g}"
    return "-"


def render_anomaly_report(table: Any, report_data: dict[str, dict], size: int) -> str:
    """The page: settings, the per-category table with the F1-optimal thresholds, then per
    category its curves and worst false positives / negatives."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>zsdense eval anomaly</title><style>{_STYLE}</style></head><body>",
        "<h1>Anomaly evaluation</h1>",
    ]
    if table.warning:
        parts.append(f"<p class='warn'>{esc(table.warning)}</p>")
    cfg = table.config
    parts.append(
        "<p>"
        + ", ".join(
            f"{esc(k)}: <b>{esc(str(cfg.get(k)))}</b>"
            for k in ("preset", "models", "precision", "dataset", "layout", "size")
            if k in cfg
        )
        + f"; maps and masks scored at {size}x{size}.</p>"
    )
    parts.append(_metrics_table(table, report_data))
    have_plots = True
    for n, (cat, d) in enumerate(sorted(report_data.items())):
        section, plotted = _category_section(n, cat, d)
        parts.append(section)
        have_plots = have_plots and plotted
    if not have_plots:
        parts.insert(  # the 5th part: after the settings line, or after the warning
            4,
            "<p class='note'>The ROC, PR and PRO curves need matplotlib: "
            "<code>pip install 'zsdense[plots]'</code>, then run the same "
            "<code>zsdense eval anomaly</code> command again (the predictions are reused).</p>",
        )
    parts.append("</body></html>\n")
    return "".join(parts)


def _metrics_table(table: Any, report_data: dict[str, dict]) -> str:
    """The per-category metrics (x100) with the F1-optimal thresholds, and how to reuse them."""
    esc = html.escape
    cols = list(table.columns)
    head = ["category", "images", "anomalous", *cols, "pixel thr @F1", "image thr @F1"]
    parts = ["<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    parts.append("</thead><tbody>")
    every = list(table.rows) + ([table.mean] if table.mean else [])
    for r in every:
        cat = str(r.get("category"))
        th = (report_data.get(cat) or {}).get("thresholds") or {}
        cells = [esc(cat), _cell(r.get("n_images")), _cell(r.get("n_anomalous"))]
        cells += [_cell(r.get(c)) for c in cols]
        cells += [_cell(th.get("threshold"), False), _cell(th.get("image_threshold"), False)]
        parts.append(
            "<tr>"
            + "".join(f"<td{' class=num' if i else ''}>{c}</td>" for i, c in enumerate(cells))
            + "</tr>"
        )
    parts.append("</tbody></table>")
    parts.append(
        "<p>Metrics x100. The thresholds reach the F1-max on this test set (saved in "
        f"<code>{THRESHOLDS_NAME}</code>; reuse them with <code>zsdense anomaly --thresholds "
        f"{THRESHOLDS_NAME} --object CATEGORY</code> or <code>zsdense decide OUT --thresholds "
        f"{THRESHOLDS_NAME}</code>). Chosen on the test set itself, they are optimistic for it."
        "</p>"
    )
    return "".join(parts)


def _category_section(n: int, cat: str, d: dict) -> tuple[str, bool]:
    """One category: its curves (the flag says whether matplotlib drew them) and its worst
    false positives and false negatives at the image threshold."""
    esc = html.escape
    th = d.get("thresholds") or {}
    parts = [f"<section class='cat' id='cat{n}'><h2>{esc(cat)}</h2>"]
    png = _plot(d.get("curves") or {}, cat)
    if png is not None:
        parts.append(f"<img alt='ROC, PR and PRO curves of {esc(cat)}' "
                     f"src='data:image/png;base64,{png}'>")  # fmt: skip
    preds = d.get("preds") or []
    fps, fns = _worst(preds, th.get("image_threshold"))
    lo, hi = _map_range(preds)
    ithr = th.get("image_threshold")
    goods = sorted((p for p in preds if p.sample.label == 0), key=lambda p: -p.score)
    bads = sorted((p for p in preds if p.sample.label == 1), key=lambda p: p.score)
    for kind, items, closest, none_msg in (
        ("false positives", fps, goods, "no false positive; the highest-scored good images"),
        ("false negatives", fns, bads, "no false negative; the lowest-scored anomalous images"),
    ):
        parts.append(
            f"<h3>Worst {kind} at the image threshold {_cell(ithr, False)} "
            f"({len(items)} in all; image | ground truth | prediction)</h3>"
        )
        if not items:
            parts.append(f"<p>{none_msg} (the closest to being one):</p>")
            items = closest
        parts += [_strip_block(p, lo, hi, th.get("threshold")) for p in items[:WORST_K]]
    parts.append("</section>")
    return "".join(parts), png is not None


def _map_range(preds: list) -> tuple[float | None, float | None]:
    """(min, max) over the category's stored maps (None when none can be read)."""
    lo = hi = None
    for p in preds:
        try:
            m = np.load(p.map_path, mmap_mode="r")
        except OSError:
            continue
        lo = float(m.min()) if lo is None else min(lo, float(m.min()))
        hi = float(m.max()) if hi is None else max(hi, float(m.max()))
    return lo, hi


def _strip_block(p: Any, lo: float | None, hi: float | None, thr: float | None) -> str:
    """One prediction's strip with its caption (or why it cannot be drawn)."""
    esc = html.escape
    try:
        b64 = _strip(p, lo or 0.0, hi or 1.0, thr)
    except Exception as exc:  # noqa: BLE001 - a moved image: say so, go on
        return f"<p>{esc(str(p.sample.image_path))}: {esc(str(exc))}</p>"
    return (
        f"<div class='strip'><img alt='strip' src='data:image/png;base64,{b64}'>"
        f"{esc(p.sample.image_path.name)} ({esc(p.sample.defect)}), "
        f"score {p.score:.4g}</div>"
    )


def write_anomaly_report(out: Path, table: Any, report_data: dict[str, dict], size: int) -> Path:
    """Write ``OUT/report_anomaly.html`` (atomically)."""
    path = Path(out) / REPORT_NAME
    text = render_anomaly_report(table, report_data, size)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
