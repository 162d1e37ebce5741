"""The decision rule of ``zsdense decide`` and the values it decides with.

:func:`decide` is the rule itself: one pure function over a map and a score. The values come,
in this order, from explicit options, a thresholds file (:mod:`zsdense.io.thresholds`; refused
when made for another preset or model set), the calibration on known-good images **that are
inputs of the run** (:func:`calibrate_values` over their saved maps and scores), and last the
run's current values: :func:`choose_thresholds` gathers them into a :class:`Decision`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from zsdense.engine.decide_settings import Decision, record_outputs, task_part
from zsdense.errors import ConfigError
from zsdense.io.saved_maps import read_map
from zsdense.io.thresholds import Thresholds, belongs_to, mismatches, pick, read_thresholds
from zsdense.tasks.thresholds import calibrate_threshold, calibration_rule

# ---- the rule --------------------------------------------------------------------------------


def decide(
    anomaly_map: np.ndarray,
    score: float,
    threshold: float,
    image_threshold: float | None,
) -> tuple[np.ndarray, bool | None]:
    """The decision of one image: ``(mask, label)`` with ``mask = map >= threshold`` and
    ``label = score >= image_threshold`` (None without an image threshold). Pure: the same
    rule as :mod:`zsdense.tasks.anomaly` applies when a run decides."""
    mask = np.asarray(anomaly_map) >= float(threshold)
    label = None if image_threshold is None else bool(float(score) >= float(image_threshold))
    return mask, label


def calibrate_values(values: Sequence[np.ndarray], percentile: float | None = None) -> float:
    """Max of known-good values (maps or scores), or their ``percentile``-th percentile (the
    rule of ``--calibrate-with``, on the saved maps)."""
    values = list(values)
    if not values:
        raise ConfigError("calibration needs at least one known-good image")
    return calibrate_threshold(values, percentile)


# ---- the values ------------------------------------------------------------------------------


def current_thresholds(records: list[dict], task: str, multi: bool) -> dict:
    """The run's current thresholds and their sources (the first ok record's: a run decides
    once for all its images)."""
    for rec in records:
        if rec.get("status") == "ok":
            r = json.loads(json.dumps(rec))
            s = task_part(r, "scores", task, multi)
            m = task_part(r, "meta", task, multi)
            return {
                "threshold": s.get("threshold"),
                "image_threshold": s.get("image_threshold"),
                "threshold_source": s.get("threshold_source") or m.get("threshold_source"),
                "image_threshold_source": m.get("image_threshold_source"),
            }
    return {}


def choose_thresholds(
    out_dir: Path,
    records: list[dict],
    settings: dict,
    task: str,
    multi: bool,
    fmt: str,
    *,
    threshold: float | None,
    image_threshold: float | None,
    thresholds: str | Path | Thresholds | None,
    calibrate_with: Any,
    calibrate_percentile: float | None,
) -> Decision:
    """The decision's values: the options given, then the thresholds file, then the
    calibration, then the run's current values (see the module docstring)."""
    tset = settings["tasks"][task]
    current = current_thresholds(records, task, multi)
    cur_thr, cur_ithr = current.get("threshold"), current.get("image_threshold")
    d = Decision(
        threshold=threshold,
        image_threshold=image_threshold,
        threshold_source="fixed" if threshold is not None else None,
        image_threshold_source="fixed" if image_threshold is not None else None,
        threshold_changed=False,
        image_threshold_changed=False,
        previous={"threshold": cur_thr, "image_threshold": cur_ithr},
    )
    if thresholds is not None:
        _from_file(d, thresholds, tset, settings)
    if calibrate_with and (d.threshold is None or d.image_threshold is None):
        good = _good_records(calibrate_with, records, out_dir)
        _calibrate(d, good, calibrate_with, calibrate_percentile, out_dir, task, multi)
    d.threshold_changed = d.threshold is not None
    d.image_threshold_changed = d.image_threshold is not None
    if d.threshold is None:  # only the image threshold changes
        if cur_thr is None:
            raise ConfigError("the run records no pixel threshold: give --threshold")
        d.threshold = float(cur_thr)
        d.threshold_source = current.get("threshold_source") or "fixed"
    if d.image_threshold is None and cur_ithr is not None and d.image_threshold_source is None:
        d.image_threshold = float(cur_ithr)
        d.image_threshold_source = current.get("image_threshold_source") or "fixed"
    d.threshold = float(d.threshold)
    d.image_threshold = None if d.image_threshold is None else float(d.image_threshold)
    return d


def _from_file(
    d: Decision, thresholds: str | Path | Thresholds, tset: dict, settings: dict
) -> None:
    """The values a thresholds file gives where no option did; refused when the file belongs
    to another preset or model set (warnings for smaller differences)."""
    file_th = thresholds if isinstance(thresholds, Thresholds) else read_thresholds(thresholds)
    where = str(thresholds) if not isinstance(thresholds, Thresholds) else "thresholds"
    hard, soft = mismatches(file_th, belongs_to(tset, settings))
    if hard:
        raise ConfigError(
            f"{where} was made for other settings ({'; '.join(hard)}): its values are on "
            "another scale; calibrate again for this run"
        )
    d.warnings += [f"{where} was made with other settings: {s}" for s in soft]
    d.file = str(thresholds)
    f_thr, f_ithr, _chosen = pick(file_th, tset.get("object_name"))
    if d.threshold is None and f_thr is not None:
        d.threshold, d.threshold_source = f_thr, file_th.source
    if d.image_threshold is None and f_ithr is not None:
        d.image_threshold, d.image_threshold_source = f_ithr, file_th.source


def _calibrate(
    d: Decision,
    good: list[dict],
    calibrate_with: Any,
    percentile: float | None,
    out_dir: Path,
    task: str,
    multi: bool,
) -> None:
    """The values not given yet, from the good images' saved maps and scores."""
    maps = [read_map(out_dir / record_outputs(r, task, multi)["map"]) for r in good]
    scores = [np.array([task_part(r, "scores", task, multi)["score"]]) for r in good]
    d.calibration = {
        "n_images": len(good),
        "rule": calibration_rule(percentile),
        "images": [r.get("key") for r in good],
        "calibrate_with": [str(c) for c in _as_list(calibrate_with)],
    }
    if d.threshold is None:
        d.threshold, d.threshold_source = calibrate_values(maps, percentile), "calibrated"
    if d.image_threshold is None:
        d.image_threshold = calibrate_values(scores, percentile)
        d.image_threshold_source = "calibrated"


def _good_records(calibrate_with: Any, records: list[dict], out_dir: Path) -> list[dict]:
    """The manifest records of the good images (all must be ok inputs of the run)."""
    from zsdense.io import list_inputs

    by_input: dict[str, list[dict]] = {}
    for r in records:
        by_input.setdefault(str(Path(str(r.get("input", ""))).resolve()), []).append(r)
    sources = _as_list(calibrate_with)
    listed = list_inputs([str(s) for s in sources], exclude=[out_dir])
    if not listed:
        raise ConfigError(f"--calibrate-with {' '.join(map(str, sources))}: no images found")
    missing, failed, recs = [], [], []
    for it in listed:
        got = by_input.get(str(Path(it.path).resolve()))
        if not got:
            missing.append(str(it.path))
            continue
        bad = [r for r in got if r.get("status") != "ok"]
        if bad:
            failed.append(f"{bad[0].get('key')}: {bad[0].get('error')}")
            continue
        recs.extend(got)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise ConfigError(
            f"--calibrate-with: {len(missing)} of the {len(listed)} good image(s) are not inputs "
            f"of the run in {out_dir} ({shown}); decide calibrates on maps already computed and "
            "loads no model. Add them to the run first: `zsdense anomaly GOOD --out "
            f"{out_dir}` with the run's settings (same preset and thresholds options), then "
            "`zsdense decide` again"
        )
    if failed:
        raise ConfigError(
            f"--calibrate-with: {len(failed)} good image(s) failed in the run ({failed[0]}); "
            "rerun the anomaly command with --retry-errors or leave them out"
        )
    return recs


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
