"""``zsdense eval {anomaly,openvocab,refer}``: run a preset over a benchmark and score it.

The commands only parse options, call :mod:`zsdense.eval` (``evaluate_anomaly``,
``evaluate_openvocab``, ``evaluate_refer``) and print the table. Predictions are kept under
``--out/predictions/<task>/`` (the batch engine's outputs and ``results.jsonl``); a rerun with
the same settings reuses them and only recomputes the metrics (``--force`` predicts again).
Results go to ``--out/metrics_<task>.json``, ``.csv`` and ``.md``.

Tests (and embedders) may replace the head: ``ctx.obj["task"]`` is passed to the library as
its ``task`` factory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from zsdense.cli.common import RegistryChoice, make_runtime, runtime_options
from zsdense.config import (
    ANOMALY_PRESETS,
    OPENVOCAB_DATASETS,
    OPENVOCAB_PRESETS,
    PIXEL_METRIC_BINS,
    REFER_PRESETS,
)
from zsdense.errors import ZsdenseError
from zsdense.eval.protocols import ANOMALY_LAYOUTS, ANOMALY_METRICS, REFER_LAYOUTS


class _SegLayouts(click.Choice):
    """``auto``, ``generic`` and the segmentation layouts of :mod:`zsdense.eval.datasets`, read
    when first needed (that module imports numpy: ``zsdense eval --help`` stays fast)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self):  # type: ignore[override]
        from zsdense.eval.datasets import SEG_LAYOUTS

        return ("auto", "generic", *SEG_LAYOUTS)

    @choices.setter
    def choices(self, value) -> None:  # click's __init__ assigns it; the table is the truth
        pass

# the choices come from the live preset tables (registered presets included), read when used,
# without importing the protocols (they load torch: --help stays fast)
CLASS_FILES = OPENVOCAB_DATASETS

__all__ = ["eval_group"]

_RUNTIME_KEYS = (
    "models",
    "device",
    "precision",
    "weights_dir",
    "batch_size",
    "offline",
    "max_pixels",
)


def _split_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _silent(_msg: str) -> None:
    """The log of ``--quiet``: notes, warnings and errors are still printed by the command."""


def _common(f: Callable) -> Callable:
    """--data, --out, --limit, --force (--recompute: deprecated alias), --retry-errors,
    --quiet, then the shared runtime options (--models, --device, --precision, --weights-dir,
    --batch-size, --offline, --max-pixels)."""
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
            help="Output folder: predictions/, metrics_<task>.json, .csv and .md.",
        ),
        click.option(
            "--limit",
            type=click.IntRange(min=1),
            default=None,
            help="Evaluate at most N samples (per category for anomaly, spread over "
            "normal and defective images).",
        ),
        click.option(
            "--force", is_flag=True, help="Predict again even where stored predictions exist."
        ),
        click.option("--recompute", is_flag=True, hidden=True, help="Deprecated: use --force."),
        click.option(
            "--retry-errors", is_flag=True, help="Predict again the inputs that failed before."
        ),
        click.option("--quiet", "-q", is_flag=True, help="No progress or per-category log lines."),
    ]
    f = runtime_options(f)
    for o in reversed(opts):
        f = o(f)
    return f


def _run(ctx: click.Context, kw: dict[str, Any], fn: Callable[..., Any]) -> None:
    """Build the runtime, run one evaluation, print its table. User errors print one line
    and exit with their code (2; 130 when interrupted); failed predictions exit 3."""
    runtime = {k: kw.pop(k) for k in _RUNTIME_KEYS if k in kw}
    if kw.pop("recompute", False):
        click.echo("zsdense: warning: --recompute is deprecated; use --force", err=True)
        kw["force"] = True
    quiet = kw.pop("quiet", False)
    obj = ctx.obj or {}
    if obj.get("task") is not None:
        kw["task"] = obj["task"]
    if isinstance(fn, str):  # the protocol, imported when it runs
        import zsdense.eval

        fn = getattr(zsdense.eval, fn)
    try:
        rt = make_runtime(**runtime)
        if quiet:
            kw["log"] = _silent
        table = fn(runtime=rt, progress=not quiet, batch_size=runtime.get("batch_size"), **kw)
    except ZsdenseError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(exc.exit_code)
    click.echo(table.format())
    _print_files(table)
    for note in table.notes:
        click.echo(f"note: {note}", err=True)
    if table.warning:
        click.echo(f"warning: {table.warning}", err=True)
    if table.failed:
        click.echo(
            f"zsdense: {len(table.failed)} prediction(s) failed and are left out of the "
            f"metrics (see {kw['out'] / 'predictions'}; --retry-errors predicts them again):",
            err=True,
        )
        for key, msg in table.failed[:20]:
            click.echo(f"  failed: {key}: {msg}", err=True)
        ctx.exit(3)


def _print_files(table: Any) -> None:
    """Where the report and the F1-optimal thresholds went (stderr)."""
    files = getattr(table, "files", {}) or {}
    th = (getattr(table, "extra", {}) or {}).get("f1_thresholds") or {}
    for cat, t in th.items():
        parts = []
        if t.get("threshold") is not None:
            f1 = t.get("pixel_f1_max", float("nan"))
            parts.append(f"pixel {t['threshold']:.6g} (F1 {f1:.3f})")
        if t.get("image_threshold") is not None:
            parts.append(
                f"image {t['image_threshold']:.6g} (F1 {t.get('image_f1_max', float('nan')):.3f})"
            )
        if parts:
            click.echo(f"zsdense: F1-optimal thresholds [{cat}]: " + ", ".join(parts), err=True)
    if files.get("thresholds"):
        click.echo(f"zsdense: thresholds saved: {files['thresholds']}", err=True)
    if files.get("report"):
        click.echo(f"zsdense: report: {files['report']}", err=True)


@click.group("eval")
def eval_group() -> None:
    """Score a preset against ground truth (anomaly, openvocab, refer)."""


@eval_group.command("anomaly")
@_common
@click.option(
    "--layout", type=click.Choice(("auto", *ANOMALY_LAYOUTS)), default="auto", show_default=True
)
@click.option(
    "--preset", type=RegistryChoice(ANOMALY_PRESETS), default="crane", show_default=True
)
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
    default=PIXEL_METRIC_BINS,
    show_default=True,
    help="Histogram bins of the streaming pixel metrics.",
)
@click.option(
    "--exact", is_flag=True, help="Exact pixel metrics with every map of a category in memory."
)
@click.option(
    "--shots",
    type=int,
    default=None,
    help="Few-shot presets (anomalydino, crane+fewshot): good references per category, drawn "
    "from its train/good images as the reference does (-1 or unset: all).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Few-shot: which block of references (sorted names[seed*shots:(seed+1)*shots]).",
)
@click.option(
    "--keep-maps",
    is_flag=True,
    help="Also keep the full-size anomaly maps (.map.npy) beside the 518x518 ones scored.",
)
@click.pass_context
def anomaly_cmd(
    ctx: click.Context,
    categories: str | None,
    metric_names: str,
    keep_maps: bool,
    **kw: Any,
) -> None:
    """Image and pixel AUROC / AP / F1-max and AUPRO per category, at 518x518.

    Exit codes: 0 ok, 2 usage or data error, 3 some predictions failed, 130 interrupted.
    """
    _run(
        ctx,
        {
            **kw,
            "categories": _split_list(categories),
            "metrics": _split_list(metric_names) or list(ANOMALY_METRICS),
            "fmt": "npy" if keep_maps else "none",
        },
        "evaluate_anomaly",
    )


@eval_group.command("openvocab")
@_common
@click.option(
    "--layout",
    type=_SegLayouts(),
    default="auto",
    show_default=True,
)
@click.option("--split", default="val", show_default=True)
@click.option(
    "--preset",
    type=RegistryChoice(OPENVOCAB_PRESETS),
    default="trident",
    show_default=True,
)
@click.option(
    "--classes-file",
    default=None,
    help="Class names, one per line, in label-index order (synonyms separated by ';'), or a "
    "shipped list: " + ", ".join(CLASS_FILES) + ".",
)
@click.option(
    "--reduce-zero-label/--no-reduce-zero-label",
    default=None,
    help="Override the layout's convention (label 0 ignored, others shifted by -1).",
)
@click.pass_context
def openvocab_cmd(ctx: click.Context, **kw: Any) -> None:
    """Per-class IoU and mIoU (mmseg's protocol) at the original resolution.

    Exit codes: 0 ok, 2 usage or data error, 3 some predictions failed, 130 interrupted.
    """
    _run(ctx, kw, "evaluate_openvocab")


@eval_group.command("refer")
@_common
@click.option(
    "--layout", type=click.Choice(("auto", *REFER_LAYOUTS)), default="auto", show_default=True
)
@click.option("--split", default="val", show_default=True)
@click.option(
    "--preset", type=RegistryChoice(REFER_PRESETS), default="hybridgl", show_default=True
)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="COCO train2014 image folder (RefCOCO layout).",
)
@click.pass_context
def refer_cmd(ctx: click.Context, **kw: Any) -> None:
    """oIoU, mIoU and precision@0.5/0.7/0.9 over every expression.

    Exit codes: 0 ok, 2 usage or data error, 3 some predictions failed, 130 interrupted.
    """
    _run(ctx, kw, "evaluate_refer")
