"""What the three evaluation protocols share: predictions through the batch engine, metric tables.

Predictions of one task live under ``<out>/predictions/<task>/``: the engine's outputs (mirroring
the dataset tree) and its ``results.jsonl`` (one line per image or expression), plus
``settings.json`` saying what made them (task, data, preset, models, options). Running them
through :func:`zsdense.engine.local.run_batch` gives progress, per-image error isolation and
resume after a kill: a rerun with the same settings predicts only what is missing, so a
metric-only rerun recomputes nothing. Predictions made with other settings are removed first
(``force`` removes them in any case), so the metrics never mix two settings.

A :class:`MetricTable` holds the rows (one per category / class / split), the mean row and the
run's settings; :meth:`MetricTable.save` writes ``metrics_<task>.json``, ``.csv`` and ``.md``
atomically through :mod:`zsdense.io.writers`.

Every protocol (``evaluate_anomaly``, ``evaluate_openvocab``, ``evaluate_refer``) has the same
skeleton, kept here in :class:`Evaluation`: check the preset (:func:`check_preset`), read the
dataset, record the settings (:meth:`Evaluation.prepare`: the predictions folder holds those
settings only, the table's config carries the random-weights warning), predict through the
engine (:meth:`Evaluation.predict`), score, save the table (:meth:`Evaluation.save`). The
protocols keep only what differs: the dataset, the head, the metrics. They take the keywords of
:class:`RunOptions` for how predictions run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from zsdense.engine.local import load_records, run_batch
from zsdense.engine.specs import TaskSpec, build_task_spec
from zsdense.errors import ConfigError, ZsdenseError
from zsdense.io.manifest import WorkItem, record_complete
from zsdense.io.writers import atomic_path, to_jsonable, write_json

if TYPE_CHECKING:
    from zsdense.runtime import Runtime

__all__ = [
    "Log",
    "MetricTable",
    "EvalInterrupted",
    "PredictionRun",
    "RunOptions",
    "Evaluation",
    "check_preset",
    "preset_head",
    "runtime_settings",
    "stderr_log",
    "rel_key",
    "safe_rel",
    "mean_row",
    "prepare_predictions",
    "predict",
    "random_weights_warning",
]

Log = Callable[[str], None]
SETTINGS_NAME = "settings.json"
# errors of the setup (weights, optional packages), not of an image: a rerun tries them again
SETUP_ERRORS = frozenset({"WeightsError", "DependencyError"})
_SAFE_RE = re.compile(r"[^A-Za-z0-9._/-]+")


def stderr_log(msg: str) -> None:
    """Default log: one line on stderr."""
    print(f"zsdense: {msg}", file=sys.stderr, flush=True)


class EvalInterrupted(ZsdenseError):
    """The prediction run was interrupted (Ctrl-C); rerunning the same command resumes it."""

    exit_code = 130


def random_weights_warning(models: str) -> str | None:
    """The warning recorded in every table made with random-weight models, else None."""
    if models in ("tiny", "random"):
        return f"random weights (models={models}): these numbers are NOT meaningful"
    return None


# ============================================================================== tables


def _finite(v: Any) -> bool:
    real = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    return real and math.isfinite(float(v))


@dataclass
class MetricTable:
    """Metrics of one evaluation: ``rows`` (one dict per category / class / split, keyed by
    ``key``), the ``mean`` row (None when the protocol has none), the metric ``columns`` shown
    in the printed table, the run ``config``, protocol-specific ``extra`` fields written to the
    JSON file (``summary``, ``per_sample``, ``pixel_bins``...), the images or expressions whose
    prediction failed (``failed``: (key, message)), and the files written (``files``)."""

    task: str
    key: str
    columns: list[str]
    rows: list[dict]
    mean: dict | None
    config: dict
    extra: dict = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    percent: bool = True
    footer: str = ""
    show_mean: bool = True  # print the mean row (it is always in the JSON and CSV files)

    @property
    def warning(self) -> str | None:
        """The random-weights warning of the run, if any."""
        return self.config.get("warning")

    def to_dict(self) -> dict:
        """What ``metrics_<task>.json`` holds (strict JSON: NaN written as null)."""
        mean = self.mean if self.mean is not None else {}
        out = {"rows": self.rows, "mean": mean, **self.extra, "config": self.config}
        if self.failed:
            out["failed"] = [{"key": k, "error": m} for k, m in self.failed]
        if self.notes:
            out["notes"] = list(self.notes)
        return to_jsonable(out)

    def _cell(self, v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(v)
        if not _finite(v):
            return str(v)
        return f"{100 * float(v):.1f}" if self.percent else f"{float(v):.4f}"

    @property
    def _shown_mean(self) -> dict | None:
        return self.mean if self.show_mean else None

    def _body(self) -> tuple[list[str], list[list[str]]]:
        head = [self.key, *self.columns]
        every = self.rows + ([self.mean] if self._shown_mean is not None else [])
        body = [
            [str(r.get(self.key, ""))] + [self._cell(r.get(c)) for c in self.columns] for r in every
        ]
        return head, body

    def format(self) -> str:
        """Fixed-width table, metric values x100 with one decimal as the papers print them; the
        mean row (if any) last, under a rule."""
        head, body = self._body()
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)
            )

        rule = "  ".join("-" * w for w in widths)
        lines = [line(head), rule]
        for n, b in enumerate(body):
            if self._shown_mean is not None and n == len(body) - 1:
                lines.append(rule)
            lines.append(line(b))
        if self.footer:
            lines.append(self.footer)
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table as GitHub markdown (same cells as :meth:`format`), with the warning."""
        head, body = self._body()
        lines = [
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        text = "\n".join(lines) + "\n"
        if self.footer:
            text += f"\n{self.footer}\n"
        if self.warning:
            text += f"\n**Warning:** {self.warning}\n"
        return text

    def csv_text(self) -> str:
        """CSV: one row per entry then the mean row; empty cells for missing values."""
        every = self.rows + ([self.mean] if self.mean is not None else [])
        cols = list(dict.fromkeys([self.key] + [c for r in every for c in r]))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in every:
            clean = to_jsonable(r)
            w.writerow({c: ("" if clean.get(c) is None else clean.get(c)) for c in cols})
        return buf.getvalue()

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write ``metrics_<task>.json``, ``.csv`` and ``.md`` under ``out`` (atomically)."""
        out = Path(out)
        stem = f"metrics_{self.task}"
        self.files = {
            "json": write_json(out / f"{stem}.json", self.to_dict()),
            "csv": _write_text(out / f"{stem}.csv", self.csv_text()),
            "md": _write_text(out / f"{stem}.md", self.markdown()),
        }
        return self.files


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def mean_row(rows: Sequence[Mapping], cols: Sequence[str], key: str) -> dict:
    """The mean of each column over the rows that have a finite value (None if none has)."""
    mean: dict[str, Any] = {key: "mean"}
    for c in cols:
        vals = [float(r[c]) for r in rows if _finite(r.get(c))]
        mean[c] = sum(vals) / len(vals) if vals else None
    return mean


# ============================================================================== predictions


def safe_rel(text: str) -> PurePosixPath:
    """A relative POSIX path usable as a manifest key and mirrored output path: characters
    other than letters, digits and ``._-/`` become ``_``, as do ``.``/``..`` components."""
    rel = _SAFE_RE.sub("_", text.replace("\\", "/")).lstrip("/")
    parts = [p if p not in (".", "..") else "_" for p in rel.split("/") if p]
    return PurePosixPath(*(parts or ["_"]))


def rel_key(path: Path, root: Path) -> PurePosixPath:
    """``path`` relative to the dataset ``root``, else its absolute path, as :func:`safe_rel`:
    the manifest key and the mirrored output path of an image."""
    try:
        rel = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        rel = Path(path).as_posix()
    return safe_rel(rel)


def prepare_predictions(root: Path, settings: Mapping[str, Any], force: bool, log: Log) -> None:
    """Make ``root`` hold predictions of ``settings`` only: remove it when it was made with
    other settings (or when ``force``), then record the settings in ``settings.json``."""
    root = Path(root)
    wanted = to_jsonable(dict(settings))
    path = root / SETTINGS_NAME
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
    if root.exists() and not force and old is not None and old != wanted:
        changed = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
        log(
            f"predictions in {root} were made with other settings "
            f"({', '.join(changed)} changed); predicting again"
        )
    try:
        if root.exists() and (force or old != wanted):
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        write_json(path, wanted)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the predictions under {root}: {exc.strerror or exc}; "
            "choose another --out"
        ) from None


@dataclass
class PredictionRun:
    """Records of one prediction pass: ``records`` (key -> ``results.jsonl`` record, ``ok``
    and complete ones only), ``failed`` ((key, message) of the others) and ``predicted`` (how
    many records were made in this call; 0 when everything was reused)."""

    root: Path
    records: dict[str, dict]
    failed: list[tuple[str, str]]
    predicted: int

    def path(self, key: str, output: str) -> Path:
        """The file of output ``output`` of record ``key``."""
        return self.root / self.records[key]["outputs"][output]


def predict(
    rt: Any,
    items: Sequence[WorkItem],
    root: Path,
    task: TaskSpec,
    *,
    batch_size: int | None = None,
    force: bool = False,
    retry_errors: bool = False,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> PredictionRun:
    """Run ``task`` over ``items`` with the batch engine into ``root`` (only what is missing,
    unless ``force``) and return every item's record. Raises :class:`EvalInterrupted` when
    the run was interrupted (the records so far are kept: rerun to resume)."""
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ConfigError(f"duplicate sample ids in the dataset: {', '.join(dup[:5])}")
    wanted = set(keys)
    if any(
        r.get("status") == "error"
        and r.get("error_type") in SETUP_ERRORS
        and r.get("key") in wanted
        for r in load_records(root)
    ):
        retry_errors = True  # a missing checkpoint is no property of the images: try them again
    summary = run_batch(
        rt,
        items,
        root,
        [task],
        batch_size=batch_size,
        force=force,
        retry_errors=retry_errors,
        progress=progress,
        on_record=on_record,
        report=False,
        record_settings=False,  # one folder, one head per category: settings.json tracks them
    )
    if summary.interrupted:
        raise EvalInterrupted(
            f"interrupted: {summary.not_started} input(s) not predicted; rerun the same command "
            "to resume (stored predictions are kept)"
        )
    by_key = {r.get("key"): r for r in load_records(root)}
    now = [by_key.get(k, {}) for k in keys]
    if now and summary.total and all(r.get("error_type") in SETUP_ERRORS for r in now):
        raise ZsdenseError(
            f"no input could be predicted: {now[0].get('error')} (fix this and rerun the same "
            "command; the failed inputs are tried again)"
        )
    records: dict[str, dict] = {}
    failed: list[tuple[str, str]] = []
    for k in keys:
        rec = by_key.get(k)
        if rec is not None and record_complete(rec, root):
            records[k] = rec
        else:
            msg = "no prediction" if rec is None else str(rec.get("error") or "outputs missing")
            failed.append((k, msg))
    return PredictionRun(Path(root), records, failed, summary.total)


# ============================================================================== the skeleton


class RunOptions(TypedDict, total=False):
    """How an evaluation runs its predictions: the keywords every ``evaluate_*`` takes."""

    force: bool  # predict everything again (stored predictions are removed first)
    retry_errors: bool  # predict again the inputs whose prediction failed
    batch_size: int | None  # images per encoder batch (None: the engine's default)
    progress: bool  # a progress bar on stderr
    on_record: Callable[[dict], None] | None  # sees every manifest record
    log: Log  # notes and warnings (default: one line on stderr)


def check_preset(preset: str, presets: Mapping, family: str, task: Any) -> None:
    """A ConfigError for a preset not in the registry (unless ``task`` replaces the head)."""
    if task is None and preset not in presets:
        raise ConfigError(
            f"unknown {family} preset {preset!r}; choose one of: {', '.join(presets)}"
        )


def runtime_settings(rt: Runtime) -> dict[str, str]:
    """What the runtime adds to the recorded settings: the model set and resolved precision."""
    return {"models": str(rt.config.models), "precision": rt.precision}


def preset_head(rt: Runtime, cfg: dict, fmt: str = "none") -> TaskSpec:
    """The preset's head as its task command builds it from ``cfg``, writing no overlay."""
    return build_task_spec(rt, cfg, fmt=fmt, overlay=False)


@dataclass
class Evaluation:
    """One protocol's run around its metrics: how predictions run (:class:`RunOptions`), then,
    once :meth:`prepare` has recorded the settings, the runtime, the predictions folder
    ``<out>/predictions/<task>/`` and the table's ``config`` (settings + warning)."""

    out: Path
    force: bool = False
    retry_errors: bool = False
    batch_size: int | None = None
    progress: bool = True
    on_record: Callable[[dict], None] | None = None
    log: Log = stderr_log
    rt: Any = field(default=None, init=False)
    root: Path | None = field(default=None, init=False)
    config: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def prepare(self, rt: Runtime, settings: Mapping[str, Any]) -> Path:
        """Make the predictions folder of ``settings["task"]`` hold predictions of
        ``settings`` only (:func:`prepare_predictions`); the table's config gets the
        random-weights warning. Returns the folder."""
        self.rt = rt
        self.root = self.out / "predictions" / str(settings["task"])
        prepare_predictions(self.root, settings, self.force, self.log)
        self.config = dict(settings)
        warning = random_weights_warning(str(settings["models"]))
        if warning:
            self.config["warning"] = warning
        return self.root

    def predict(
        self,
        items: Sequence[WorkItem],
        spec: TaskSpec,
        what: str = "image(s)",
        *,
        label: str = "",
        force: bool = False,
    ) -> PredictionRun:
        """:func:`predict` ``items`` into the folder; the failures are said once (``label``
        prefixes the line, ``what`` names the items)."""
        assert self.root is not None, "prepare() records the settings first"
        run = predict(
            self.rt,
            items,
            self.root,
            spec,
            batch_size=self.batch_size,
            force=force,
            retry_errors=self.retry_errors,
            progress=self.progress,
            on_record=self.on_record,
        )
        if run.failed:
            self.log(f"{label}{len(run.failed)} {what} failed and are left out of the metrics")
        return run

    def save(self, table: MetricTable) -> MetricTable:
        """Write ``metrics_<task>.{json,csv,md}`` under ``out``; the table back."""
        table.save(self.out)
        return table
