"""A run's settings as ``zsdense decide`` reads and records them (``run_settings.json``).

Reading: the run's anomaly tasks and, per record, one task's part (nested when several tasks
ran). Recording: ``decide_pending`` before any file changes (an interrupted decide is then
visible), then the decision itself: the task's ``threshold`` / ``image_threshold`` become the
decided values (calibration options cleared once both are explicit) and ``decided`` keeps when,
how and the previous values (the last 20 decisions in ``history``). ``thresholds.json`` records
the values and where they came from, for reuse.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from zsdense.errors import ConfigError
from zsdense.io.manifest import MANIFEST_NAME, SETTINGS_NAME, Manifest
from zsdense.io.thresholds import THRESHOLDS_NAME, Thresholds, belongs_to, write_thresholds
from zsdense.io.writers import atomic_path

PENDING_KEY = "decide_pending"
DECIDED_KEY = "decided"
HISTORY = 20  # decisions kept in the settings' history


@dataclass
class Decision:
    """The thresholds a decision uses, where they came from (``*_source``), whether they were
    given anew (``*_changed``; else the run's current value is kept), the run's ``previous``
    values, the ``calibration`` details, the thresholds ``file`` used, and ``warnings``."""

    threshold: float | None  # a float once chosen
    image_threshold: float | None
    threshold_source: Any
    image_threshold_source: str | None
    threshold_changed: bool
    image_threshold_changed: bool
    previous: dict
    calibration: dict | None = None
    file: str | None = None
    warnings: list[str] = field(default_factory=list)


# ---- reading ---------------------------------------------------------------------------------


def load_settings(out_dir: Path) -> dict:
    """``run_settings.json`` of the run in ``out_dir`` (a ConfigError when it is no run)."""
    path = out_dir / SETTINGS_NAME
    if not (out_dir / MANIFEST_NAME).is_file() or not path.is_file():
        raise ConfigError(
            f"{out_dir} is not the output folder of a zsdense run (no {MANIFEST_NAME} and "
            f"{SETTINGS_NAME}); give the --out folder of `zsdense anomaly` or `zsdense run`"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the run's settings ({exc})") from None


def anomaly_tasks(settings: dict) -> dict[str, dict]:
    """The anomaly tasks of a run's settings: ``{task name: task settings}``."""
    tasks = settings.get("tasks") or {}
    return {n: t for n, t in tasks.items() if isinstance(t, dict) and t.get("task") == "anomaly"}


def record_outputs(rec: dict, task: str, multi: bool) -> dict:
    """The outputs (``scores``, ``meta``...) of one task in a record: nested when several
    tasks ran."""
    outs = rec.get("outputs") or {}
    return dict(outs.get(task) or {}) if multi else dict(outs)


def task_part(rec: dict, key: str, task: str, multi: bool) -> dict:
    """The task's sub-dict of ``rec[key]`` (``meta``: of ``rec["meta"]["result"]``), created
    when missing: changing it changes the record."""
    if key == "meta":
        res = rec.setdefault("meta", {}).setdefault("result", {})
        return res.setdefault(task, {}) if multi else res
    d = rec.setdefault(key, {})
    return d.setdefault(task, {}) if multi else d


def pick_task(out_dir: Path, settings: dict, task: str | None) -> tuple[str, dict, bool, str]:
    """The anomaly task to decide: (name, its settings, whether several tasks ran, the format
    of its saved maps). ConfigError when there is none, several and no ``task``, or the run
    kept no float maps."""
    tasks = anomaly_tasks(settings)
    all_tasks = settings.get("tasks") or {}
    if not tasks:
        kinds = ", ".join(sorted(str(t.get("task")) for t in all_tasks.values())) or "none"
        raise ConfigError(
            f"{out_dir} holds no anomaly run (tasks: {kinds}); decide re-derives anomaly masks "
            "from their maps"
        )
    if task is None:
        if len(tasks) > 1:
            raise ConfigError(f"the run has several anomaly tasks ({', '.join(tasks)}): --task")
        task = next(iter(tasks))
    if task not in tasks:
        raise ConfigError(f"no anomaly task {task!r} in the run; tasks: {', '.join(tasks)}")
    tset = tasks[task]
    fmt = (tset.get("output") or {}).get("fmt", "tiff")
    if fmt == "none":
        raise ConfigError(
            f"the run in {out_dir} was made with --format none: no float maps were saved, so "
            "its masks cannot be re-decided. Run the anomaly command again with --format tiff "
            "(or npy) into a new --out, then decide there"
        )
    return task, tset, len(all_tasks) > 1, fmt


# ---- recording -------------------------------------------------------------------------------


def write_settings(out_dir: Path, settings: dict) -> None:
    """Write ``run_settings.json`` (atomically, synced)."""
    with atomic_path(out_dir / SETTINGS_NAME, fsync=True) as tmp:
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def mark_pending(
    out_dir: Path, settings: dict, task: str, d: Decision, command: Sequence[str] | None
) -> dict:
    """Record the decision about to be written (``decide_pending``); returns that record."""
    pending = {
        "task": task,
        "threshold": d.threshold,
        "image_threshold": d.image_threshold,
        "command": " ".join(shlex.quote(c) for c in command) if command else None,
    }
    settings[PENDING_KEY] = pending
    write_settings(out_dir, settings)
    return pending


def record_decision(
    out_dir: Path, settings: dict, task: str, tset: dict, d: Decision, at: str, command: str | None
) -> dict:
    """The settings now say what the outputs were decided with: a changed value becomes an
    explicit option; a kept one keeps the option that made it (the default, an explicit value
    or the calibration, which then stays in the settings). Clears ``decide_pending``, adds the
    decision to ``decided``; returns the task's new settings."""
    tset = dict(tset)
    if d.threshold_changed:
        tset["threshold"] = d.threshold
    if d.image_threshold_changed:
        tset["image_threshold"] = d.image_threshold
    if tset.get("threshold") is not None and tset.get("image_threshold") is not None:
        tset["calibrate_with"] = None  # both values explicit: no calibration decides any more
        tset["calibrate_percentile"] = None
    settings["tasks"][task] = tset
    settings.pop(PENDING_KEY, None)
    history = list((settings.get(DECIDED_KEY) or {}).get("history", []))
    history.append(
        {
            "at": at,
            "task": task,
            "threshold": d.threshold,
            "threshold_source": d.threshold_source,
            "image_threshold": d.image_threshold,
            "image_threshold_source": d.image_threshold_source,
            "previous": d.previous,
            "calibration": d.calibration,
            "command": command,
        }
    )
    settings[DECIDED_KEY] = {**history[-1], "history": history[-HISTORY:]}
    write_settings(out_dir, settings)
    return tset


def save_decision_thresholds(
    out_dir: Path, settings: dict, task: str, tset: dict, d: Decision
) -> Path:
    """``OUT/thresholds.json``: the decided values and where they came from."""
    th = Thresholds(
        threshold=d.threshold,
        image_threshold=d.image_threshold,
        source="decide" if d.threshold_source == "fixed" else str(d.threshold_source),
        detail={
            "threshold_source": d.threshold_source,
            "image_threshold_source": d.image_threshold_source,
            "run": str(out_dir.resolve()),
            "task": task,
            **({"calibration": d.calibration} if d.calibration else {}),
            **({"file": d.file} if d.file is not None else {}),
        },
        belongs_to=belongs_to(tset, settings),
    )
    return write_thresholds(out_dir / THRESHOLDS_NAME, th)


def save_run_thresholds(out_dir: str | Path) -> list[Path]:
    """After a run: the calibrated thresholds of its anomaly task(s) in ``OUT/thresholds.json``
    (``thresholds.<task>.json`` when several anomaly tasks ran), for ``--thresholds`` and banks
    to reuse. Nothing when no threshold was calibrated."""
    out_dir = Path(out_dir)
    try:
        settings = load_settings(out_dir)
    except ConfigError:
        return []
    tasks = anomaly_tasks(settings)
    multi = len(settings.get("tasks") or {}) > 1
    records = list(Manifest(out_dir / MANIFEST_NAME).load().values())
    written = []
    for name, tset in tasks.items():
        meta = None
        for rec in records:
            if rec.get("status") == "ok":
                meta = task_part(json.loads(json.dumps(rec)), "meta", name, multi)
                break
        if not meta or "calibrated" not in (
            meta.get("threshold_source"),
            meta.get("image_threshold_source"),
        ):
            continue
        th = Thresholds(
            threshold=meta.get("threshold"),
            image_threshold=meta.get("image_threshold"),
            source="calibrated",
            detail={
                "threshold_source": meta.get("threshold_source"),
                "image_threshold_source": meta.get("image_threshold_source"),
                "calibrate_with": tset.get("calibrate_with"),
                "calibration": meta.get("calibration"),
                "run": str(out_dir.resolve()),
                "task": name,
            },
            belongs_to=belongs_to(tset, settings),
        )
        fname = THRESHOLDS_NAME if len(tasks) == 1 else f"thresholds.{name}.json"
        written.append(write_thresholds(out_dir / fname, th))
    return written
