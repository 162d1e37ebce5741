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

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from zsdense.cli.common import (
    RUNTIME_KEYS,
    LazyChoice,
    make_runtime,
    option,
    output_options,
    runtime_options,
)
from zsdense.cli.openvocab import classes_file_option
from zsdense.config import ANOMALY_PRESETS, OPENVOCAB_PRESETS, PIXEL_METRIC_BINS, REFER_PRESETS
from zsdense.errors import ZsdenseError
from zsdense.eval.protocols import ANOMALY_LAYOUT_CHOICES, ANOMALY_METRICS, REFER_LAYOUT_CHOICES


def _seg_layouts() -> tuple[str, ...]:
    # read when used: zsdense.eval.datasets imports numpy (`zsdense eval --help` stays fast)
    from zsdense.eval.datasets import SEG_LAYOUT_CHOICES

    return tuple(SEG_LAYOUT_CHOICES)


SEG_LAYOUT_CHOICES = LazyChoice(_seg_layouts)

__all__ = ["eval_group"]


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
    f = output_options(
        runtime_options(f), exclude=("out_dir", "fmt", "no_overlay", "volume_maps", "json_summary")
    )
    for o in reversed(
        [
            option(
                "--data", required=True, type=click.Path(exists=True, path_type=Path),
                help="Dataset root.",
            ),
            option(
                "--out", required=True, type=click.Path(path_type=Path),
                help="Output folder: predictions/, metrics_<task>.json, .csv and .md.",
            ),
            option(
                "--limit", type=click.IntRange(min=1),
                help="Evaluate at most N samples (per category for anomaly, spread over "
                "normal and defective images).",
            ),
            option("--recompute", is_flag=True, hidden=True, help="Deprecated: use --force."),
        ]
    ):  # fmt: skip
        f = o(f)
    return f


def _task_options(layouts: Sequence[str], presets: Mapping, default: str) -> Callable:
    """--layout and --preset (choices from the library's layouts and preset registry), and
    ``--split`` unless the task has none (anomaly)."""

    def deco(f: Callable) -> Callable:
        f = option("--preset", choices=presets, default=default, show_default=True)(f)
        if layouts is not ANOMALY_LAYOUT_CHOICES:
            f = option("--split", default="val", show_default=True)(f)
        return option("--layout", choices=layouts, default="auto", show_default=True)(f)

    return deco


def _run(ctx: click.Context, kw: dict[str, Any], fn: str) -> None:
    """Build the runtime, run one evaluation, print its table. User errors print one line
    and exit with their code (2; 130 when interrupted); failed predictions exit 3."""
    runtime = {k: kw.pop(k) for k in RUNTIME_KEYS if k in kw}
    if kw.pop("recompute", False):
        click.echo("zsdense: warning: --recompute is deprecated; use --force", err=True)
        kw["force"] = True
    quiet = kw.pop("quiet", False)
    obj = ctx.obj or {}
    if obj.get("task") is not None:
        kw["task"] = obj["task"]
    import zsdense.eval  # the protocols (torch), imported when a command runs, not for --help

    evaluate = getattr(zsdense.eval, fn)
    try:
        rt = make_runtime(**runtime)
        if quiet:
            kw["log"] = _silent
        table = evaluate(runtime=rt, progress=not quiet, batch_size=runtime.get("batch_size"), **kw)
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


EXIT_CODES = "Exit codes: 0 ok, 2 usage or data error, 3 some predictions failed, 130 interrupted."


@click.group("eval")
def eval_group() -> None:
    """Score a preset against ground truth (anomaly, openvocab, refer)."""


def _eval_command(
    name: str,
    evaluate: str,
    choices: tuple[Sequence[str], Mapping, str],
    options: Sequence[Callable],
    doc: str,
    prepare: Callable[[dict], dict] = lambda kw: kw,
) -> click.Command:
    """``zsdense eval NAME``: the common options, --layout/--preset(/--split) from ``choices``
    (layouts, preset registry, default preset), the task's own ``options``; the command runs
    ``evaluate`` (a function of :mod:`zsdense.eval`, by name) on the options ``prepare`` makes
    of its values."""

    @click.pass_context
    def command(ctx: click.Context, **kw: Any) -> None:
        _run(ctx, prepare(kw), evaluate)

    command.__doc__ = f"{doc}\n\n{EXIT_CODES}"
    for opt in reversed(options):
        command = opt(command)
    return eval_group.command(name)(_common(_task_options(*choices)(command)))


def _anomaly_kwargs(kw: dict) -> dict:
    kw = dict(kw)
    kw["categories"] = _split_list(kw.pop("categories"))
    kw["metrics"] = _split_list(kw.pop("metric_names")) or list(ANOMALY_METRICS)
    kw["fmt"] = "npy" if kw.pop("keep_maps") else "none"
    return kw


anomaly_cmd = _eval_command(
    "anomaly",
    "evaluate_anomaly",
    (ANOMALY_LAYOUT_CHOICES, ANOMALY_PRESETS, "crane"),
    [
        option("--categories", help="Comma-separated categories (default: all)."),
        option(
            "--metrics", "metric_names", default=",".join(ANOMALY_METRICS), show_default=True,
            help="Comma-separated metrics to compute.",
        ),
        option(
            "--bins", type=click.IntRange(min=16), default=PIXEL_METRIC_BINS, show_default=True,
            help="Histogram bins of the streaming pixel metrics.",
        ),
        option("--exact", is_flag=True, help="Exact pixel metrics, a category's maps in memory."),
        option(
            "--shots", type=int,
            help="Few-shot presets (anomalydino, crane+fewshot): good references per category, "
            "drawn from its train/good images as the reference does (-1 or unset: all).",
        ),
        option(
            "--seed", type=click.IntRange(min=0), default=0, show_default=True,
            help="Few-shot: which block of references (sorted names[seed*shots:(seed+1)*shots]).",
        ),
        option(
            "--keep-maps", is_flag=True,
            help="Also keep the full-size anomaly maps (.map.npy) beside the 518x518 ones scored.",
        ),
    ],
    "Image and pixel AUROC / AP / F1-max and AUPRO per category, at 518x518.",
    _anomaly_kwargs,
)  # fmt: skip

openvocab_cmd = _eval_command(
    "openvocab",
    "evaluate_openvocab",
    (SEG_LAYOUT_CHOICES, OPENVOCAB_PRESETS, "trident"),
    [
        classes_file_option("Class names, one per line, in label-index order"),
        option(
            "--reduce-zero-label/--no-reduce-zero-label", default=None,
            help="Override the layout's convention (label 0 ignored, others shifted by -1).",
        ),
    ],
    "Per-class IoU and mIoU (mmseg's protocol) at the original resolution.",
)  # fmt: skip

refer_cmd = _eval_command(
    "refer",
    "evaluate_refer",
    (REFER_LAYOUT_CHOICES, REFER_PRESETS, "hybridgl"),
    [
        option(
            "--images", "images_dir", type=click.Path(exists=True, path_type=Path),
            help="COCO train2014 image folder (RefCOCO layout).",
        ),
    ],
    "oIoU, mIoU and precision@0.5/0.7/0.9 over every expression.",
)  # fmt: skip
