"""Decide again from the saved maps: new thresholds without running a model.

An anomaly run leaves the float map of every image on disk (``<stem>.map.tiff`` / ``.npy``) and
its score in ``results.jsonl``. Choosing another threshold only changes the decisions made from
them, so :func:`decide_run` re-derives, for every ``ok`` image of the run:

- the mask (``mask = map >= threshold``), its overlay (the input is read again for the picture;
  no model), the COCO RLE when the run wrote one, and the mask volume of NIfTI inputs when the
  run wrote one;
- the manifest line: ``scores`` (threshold, its source, image threshold, label, defect area;
  the same keys the run wrote), ``instances`` and ``meta.result`` (thresholds, sources, and a
  ``decided`` note with the previous values);
- ``report.html`` and ``thresholds.json`` (the values and where they came from).

Thresholds come from ``threshold`` / ``image_threshold`` (explicit values), a thresholds file
(:mod:`zsdense.io.thresholds`) or ``calibrate_with``: known-good images **that are inputs of
this run** (their maps and scores are in the folder); the pixel threshold is the max over their
maps (or the ``calibrate_percentile``-th percentile of their pixels), the image threshold the
max (percentile) of their scores, as ``zsdense anomaly --calibrate-with`` computes them. Good
images that the run has not seen are refused with the command that adds them: computing maps
is the anomaly command's job, and ``decide`` never loads a model. A value not given keeps the
run's current one.

Settings. The decision is written into ``run_settings.json`` so that resume and the
changed-settings refusal stay true: the anomaly task's ``threshold`` and ``image_threshold``
become the decided values and its calibration options are cleared (the values are explicit
now), and ``decided`` (not compared) records when, how and the previous values. A later
``zsdense anomaly ... --out OUT`` resumes with ``--threshold X --image-threshold Y`` (or
``--thresholds OUT/thresholds.json``) and is refused with the old thresholds, naming the
decided ones. While a decision is being written, ``decide_pending`` (compared) is in the settings:
an interrupted ``decide`` makes every run refuse the folder until the same ``decide`` is run
again (masks may be half old, half new).

:func:`decide` is the decision rule itself: one pure function over a map and a score. The parts:
:mod:`~zsdense.engine.decide_values` (the rule and where the values come from),
:mod:`~zsdense.engine.decide_records` (the records and files rewritten),
:mod:`~zsdense.engine.decide_settings` (the run's settings read and recorded); this module
runs them in order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from zsdense.engine.decide_records import Redecider, rewrite_mask_volumes, write_manifest
from zsdense.engine.decide_settings import (
    DECIDED_KEY,
    PENDING_KEY,
    anomaly_tasks,
    load_settings,
    mark_pending,
    pick_task,
    record_decision,
    record_outputs,
    save_decision_thresholds,
    save_run_thresholds,
)
from zsdense.engine.decide_values import Decision, calibrate_values, choose_thresholds, decide
from zsdense.errors import ConfigError
from zsdense.io.manifest import MANIFEST_NAME, Manifest, error_message, resume_options
from zsdense.io.saved_maps import read_map
from zsdense.io.thresholds import Thresholds

__all__ = [
    "decide",
    "calibrate_values",
    "decide_run",
    "DecideSummary",
    "anomaly_tasks",
    "read_map",
    "record_outputs",
    "save_run_thresholds",
    "PENDING_KEY",
    "DECIDED_KEY",
]


@dataclass
class DecideSummary:
    """What :func:`decide_run` did."""

    out_dir: Path
    task: str
    threshold: float
    image_threshold: float | None
    threshold_source: str
    image_threshold_source: str | None
    previous: dict
    decided: int = 0  # records re-decided
    changed_masks: int = 0  # records whose mask changed
    changed_labels: int = 0
    anomalous: int = 0  # records labelled anomalous (with an image threshold)
    errors: list = field(default_factory=list)  # (key, message): records left as they were
    warnings: list = field(default_factory=list)
    outputs: list = field(default_factory=list)  # report.html, thresholds.json, volumes
    calibration: dict | None = None
    seconds: float = 0.0
    resume_options: str = ""  # the anomaly command's threshold options that resume the folder

    @property
    def exit_code(self) -> int:
        return 3 if self.errors else 0

    def command(self) -> str:
        """The ``zsdense anomaly`` options that resume this folder with these decisions."""
        return self.resume_options

    def format(self) -> str:
        ith = "none" if self.image_threshold is None else f"{self.image_threshold:.6g}"
        text = (
            f"decided {self.decided} image record(s) of task {self.task!r} with threshold "
            f"{self.threshold:.6g} ({self.threshold_source}), image threshold {ith}"
            + (f" ({self.image_threshold_source})" if self.image_threshold_source else "")
            + f": {self.changed_masks} mask(s) and {self.changed_labels} label(s) changed"
        )
        if self.image_threshold is not None:
            text += f", {self.anomalous} anomalous"
        text += f", {len(self.errors)} failed in {self.seconds:.1f}s"
        return text

    def to_json(self) -> dict:
        return {
            "command": "decide",
            "out": str(self.out_dir),
            "task": self.task,
            "decided": self.decided,
            "changed_masks": self.changed_masks,
            "changed_labels": self.changed_labels,
            "anomalous": self.anomalous if self.image_threshold is not None else None,
            "failed": len(self.errors),
            "failures": [{"key": k, "error": m} for k, m in self.errors],
            "thresholds": {
                "threshold": self.threshold,
                "threshold_source": self.threshold_source,
                "image_threshold": self.image_threshold,
                "image_threshold_source": self.image_threshold_source,
                "previous": self.previous,
            },
            "calibration": self.calibration,
            "resume_options": self.resume_options,
            "outputs": [str(p) for p in self.outputs],
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
        }


def decide_run(
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    image_threshold: float | None = None,
    thresholds: str | Path | Thresholds | None = None,
    calibrate_with: Any = None,
    calibrate_percentile: float | None = None,
    task: str | None = None,
    overlay: bool | None = None,
    report: bool = True,
    max_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    command: Sequence[str] | None = None,
) -> DecideSummary:
    """Re-decide the masks, labels and their files of an anomaly run from its saved maps (see
    the module docstring). ``task``: which anomaly task of a multi-task run (needed when it has
    several). ``overlay``: rewrite the overlays (default: where the run wrote them).
    ``command``: the command line, recorded in the settings."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    settings = load_settings(out_dir)
    task, tset, multi, fmt = pick_task(out_dir, settings, task)
    _check_sources(threshold, image_threshold, thresholds, calibrate_with, calibrate_percentile)
    manifest = Manifest(out_dir / MANIFEST_NAME)
    records = list(manifest.load().values())
    _check_maps(out_dir, records, task, multi)
    d = choose_thresholds(
        out_dir,
        records,
        settings,
        task,
        multi,
        fmt,
        threshold=threshold,
        image_threshold=image_threshold,
        thresholds=thresholds,
        calibrate_with=calibrate_with,
        calibrate_percentile=calibrate_percentile,
    )
    # record the decision before any file changes (an interrupted decide is then visible)
    pending = mark_pending(out_dir, settings, task, d, command)
    summary = _summary(out_dir, task, d)
    decided_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    rd = Redecider(out_dir, task, multi, d, decided_at, overlay, max_pixels, summary.warnings)
    new_records = _redecide(records, rd, summary, progress)
    write_manifest(manifest.path, new_records)
    tset = record_decision(out_dir, settings, task, tset, d, decided_at, pending["command"])
    summary.resume_options = resume_options(tset)
    summary.outputs.append(save_decision_thresholds(out_dir, settings, task, tset, d))
    summary.outputs.extend(rewrite_mask_volumes(out_dir, new_records))
    if report:
        from zsdense.engine.report import write_report

        try:
            summary.outputs.append(write_report(out_dir))
        except Exception as exc:  # noqa: BLE001
            summary.warnings.append(f"report.html not written: {exc}")
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_sources(
    threshold: float | None,
    image_threshold: float | None,
    thresholds: Any,
    calibrate_with: Any,
    calibrate_percentile: float | None,
) -> None:
    """A ConfigError for options that do not make one decision."""
    if calibrate_percentile is not None and calibrate_with is None:
        raise ConfigError("--calibrate-percentile needs --calibrate-with GOOD")
    if thresholds is not None and calibrate_with is not None:
        raise ConfigError("--thresholds and --calibrate-with are two sources: give one")
    if threshold is None and image_threshold is None and thresholds is None and not calibrate_with:
        raise ConfigError(
            "nothing to decide: give --threshold, --image-threshold, --thresholds FILE or "
            "--calibrate-with GOOD"
        )


def _check_maps(out_dir: Path, records: list[dict], task: str, multi: bool) -> None:
    """A ConfigError when no ok record names a saved map (nothing to decide from)."""
    ok = [r for r in records if r.get("status") == "ok"]
    no_map = [
        r.get("key") for r in ok if not isinstance(record_outputs(r, task, multi).get("map"), str)
    ]
    if ok and len(no_map) == len(ok):
        raise ConfigError(
            f"the records in {out_dir} name no saved map (--format none?): nothing to decide from"
        )


def _summary(out_dir: Path, task: str, d: Decision) -> DecideSummary:
    return DecideSummary(
        out_dir=out_dir,
        task=task,
        threshold=d.threshold,
        image_threshold=d.image_threshold,
        threshold_source=str(d.threshold_source),
        image_threshold_source=d.image_threshold_source,
        previous=d.previous,
        warnings=d.warnings,
        calibration=d.calibration,
    )


def _redecide(
    records: list[dict],
    rd: Redecider,
    summary: DecideSummary,
    progress: Callable[[int, int], None] | None,
) -> list[dict]:
    """Every ``ok`` record re-decided (a copy; one that fails is kept as far as it got and
    named in ``summary.errors``), the others as they were."""
    n = sum(r.get("status") == "ok" for r in records)
    new_records = []
    done = 0
    for rec in records:
        if rec.get("status") != "ok":
            new_records.append(rec)
            continue
        rec = json.loads(json.dumps(rec))
        outs = record_outputs(rec, rd.task, rd.multi)
        key = str(rec.get("key"))
        try:
            mask_changed, label_changed, anomalous = rd.record(rec, outs, key)
            summary.decided += 1
            summary.changed_masks += int(mask_changed)
            summary.changed_labels += int(label_changed)
            summary.anomalous += int(anomalous)
        except Exception as exc:  # noqa: BLE001 - one bad record does not stop the others
            summary.errors.append((key, error_message(exc)))
        new_records.append(rec)
        done += 1
        if progress is not None:
            progress(done, n)
    return new_records
