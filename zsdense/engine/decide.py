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

:func:`decide` is the decision rule itself: one pure function over a map and a score.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from zsdense.errors import ConfigError
from zsdense.io.instances import manifest_instances, mask_instances
from zsdense.io.manifest import (
    MANIFEST_NAME,
    SETTINGS_NAME,
    Manifest,
    WorkItem,
    resume_options,
)
from zsdense.io.saved_maps import read_map
from zsdense.io.thresholds import (
    THRESHOLDS_NAME,
    Thresholds,
    belongs_to,
    mismatches,
    pick,
    read_thresholds,
    write_thresholds,
)
from zsdense.io.writers import atomic_path, dumps_strict, write_outputs

__all__ = [
    "decide",
    "calibrate_values",
    "decide_run",
    "DecideSummary",
    "anomaly_tasks",
    "read_map",
    "record_outputs",
]

PENDING_KEY = "decide_pending"
DECIDED_KEY = "decided"


# ---- the rule ----------------------------------------------------------------------------


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
    flat = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    flat = np.concatenate(flat) if flat else np.zeros(0)
    if flat.size == 0:
        raise ConfigError("calibration needs at least one known-good image")
    if percentile is None:
        return float(flat.max())
    if not 0.0 <= float(percentile) <= 100.0:
        raise ConfigError(f"--calibrate-percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(flat, float(percentile)))


# ---- reading a run -------------------------------------------------------------------------


def load_settings(out_dir: Path) -> dict:
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


def _part(rec: dict, key: str, task: str, multi: bool) -> dict:
    """The task's sub-dict of ``rec[key]`` (created when missing)."""
    if key == "meta":
        res = rec.setdefault("meta", {}).setdefault("result", {})
        return res.setdefault(task, {}) if multi else res
    d = rec.setdefault(key, {})
    return d.setdefault(task, {}) if multi else d


# ---- the run -------------------------------------------------------------------------------


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


def _current(records: list[dict], task: str, multi: bool) -> dict:
    """The run's current thresholds and their sources (the first ok record's: a run decides
    once for all its images)."""
    for rec in records:
        if rec.get("status") == "ok":
            r = json.loads(json.dumps(rec))
            s = _part(r, "scores", task, multi)
            m = _part(r, "meta", task, multi)
            return {
                "threshold": s.get("threshold"),
                "image_threshold": s.get("image_threshold"),
                "threshold_source": s.get("threshold_source") or m.get("threshold_source"),
                "image_threshold_source": m.get("image_threshold_source"),
            }
    return {}


def _good_records(
    calibrate_with: Any, by_input: dict[str, list[dict]], out_dir: Path, task: str, fmt: str
) -> list[dict]:
    """The manifest records of the good images (all must be ok inputs of the run)."""
    from zsdense.io import list_inputs

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


def _write_settings(path: Path, settings: dict) -> None:
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _read_inputs(rec_input: str, max_pixels: int | None) -> dict[str, np.ndarray] | Exception:
    from zsdense.io import read_image_records

    try:
        return {r.suffix: r.image for r in read_image_records(rec_input, max_pixels=max_pixels)}
    except Exception as exc:  # noqa: BLE001 - the overlay is then left out, with a warning
        return exc


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
    multi = len(all_tasks) > 1
    fmt = (tset.get("output") or {}).get("fmt", "tiff")
    if fmt == "none":
        raise ConfigError(
            f"the run in {out_dir} was made with --format none: no float maps were saved, so "
            "its masks cannot be re-decided. Run the anomaly command again with --format tiff "
            "(or npy) into a new --out, then decide there"
        )
    if calibrate_percentile is not None and calibrate_with is None:
        raise ConfigError("--calibrate-percentile needs --calibrate-with GOOD")
    if thresholds is not None and calibrate_with is not None:
        raise ConfigError("--thresholds and --calibrate-with are two sources: give one")
    if threshold is None and image_threshold is None and thresholds is None and not calibrate_with:
        raise ConfigError(
            "nothing to decide: give --threshold, --image-threshold, --thresholds FILE or "
            "--calibrate-with GOOD"
        )

    manifest = Manifest(out_dir / MANIFEST_NAME)
    records = list(manifest.load().values())
    ok = [r for r in records if r.get("status") == "ok"]
    no_map = [
        r.get("key") for r in ok if not isinstance(record_outputs(r, task, multi).get("map"), str)
    ]
    if ok and len(no_map) == len(ok):
        raise ConfigError(
            f"the records in {out_dir} name no saved map (--format none?): nothing to decide from"
        )
    current = _current(records, task, multi)
    cur_thr, cur_ithr = current.get("threshold"), current.get("image_threshold")
    previous = {"threshold": cur_thr, "image_threshold": cur_ithr}
    warnings: list[str] = []

    # the values and where they come from
    thr_src = "fixed" if threshold is not None else None
    ithr_src = "fixed" if image_threshold is not None else None
    calibration = None
    file_th = None
    if thresholds is not None:
        file_th = thresholds if isinstance(thresholds, Thresholds) else read_thresholds(thresholds)
        where = str(thresholds) if not isinstance(thresholds, Thresholds) else "thresholds"
        hard, soft = mismatches(file_th, belongs_to(tset, settings))
        if hard:
            raise ConfigError(
                f"{where} was made for other settings ({'; '.join(hard)}): its values are on "
                "another scale; calibrate again for this run"
            )
        warnings += [f"{where} was made with other settings: {s}" for s in soft]
        f_thr, f_ithr, _chosen = pick(file_th, tset.get("object_name"))
        if threshold is None and f_thr is not None:
            threshold, thr_src = f_thr, file_th.source
        if image_threshold is None and f_ithr is not None:
            image_threshold, ithr_src = f_ithr, file_th.source
    by_input: dict[str, list[dict]] = {}
    for r in records:
        by_input.setdefault(str(Path(str(r.get("input", ""))).resolve()), []).append(r)
    if calibrate_with and (threshold is None or image_threshold is None):
        good = _good_records(calibrate_with, by_input, out_dir, task, fmt)
        maps = [read_map(out_dir / record_outputs(r, task, multi)["map"]) for r in good]
        scores = [np.array([_part(r, "scores", task, multi)["score"]]) for r in good]
        calibration = {
            "n_images": len(good),
            "rule": "max" if calibrate_percentile is None else f"percentile {calibrate_percentile}",
            "images": [r.get("key") for r in good],
            "calibrate_with": [
                str(c)
                for c in (
                    calibrate_with
                    if isinstance(calibrate_with, (list, tuple))
                    else [calibrate_with]
                )
            ],
        }
        if threshold is None:
            threshold, thr_src = calibrate_values(maps, calibrate_percentile), "calibrated"
        if image_threshold is None:
            image_threshold = calibrate_values(scores, calibrate_percentile)
            ithr_src = "calibrated"
    thr_changed = threshold is not None
    ithr_changed = image_threshold is not None
    if threshold is None:  # only the image threshold changes
        if cur_thr is None:
            raise ConfigError("the run records no pixel threshold: give --threshold")
        threshold, thr_src = float(cur_thr), current.get("threshold_source") or "fixed"
    if image_threshold is None and cur_ithr is not None and ithr_src is None:
        image_threshold = float(cur_ithr)
        ithr_src = current.get("image_threshold_source") or "fixed"
    threshold = float(threshold)
    image_threshold = None if image_threshold is None else float(image_threshold)

    # record the decision before any file changes (an interrupted decide is then visible)
    spath = out_dir / SETTINGS_NAME
    pending = {
        "task": task,
        "threshold": threshold,
        "image_threshold": image_threshold,
        "command": " ".join(shlex.quote(c) for c in command) if command else None,
    }
    settings[PENDING_KEY] = pending
    _write_settings(spath, settings)

    summary = DecideSummary(
        out_dir=out_dir,
        task=task,
        threshold=threshold,
        image_threshold=image_threshold,
        threshold_source=str(thr_src),
        image_threshold_source=ithr_src,
        previous=previous,
        warnings=warnings,
        calibration=calibration,
    )
    want_overlay = overlay
    images: dict[str, Any] = {}  # input -> {suffix: image} for the overlays of one input
    decided_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    new_records = []
    n = len(ok)
    done = 0
    for rec in records:
        if rec.get("status") != "ok":
            new_records.append(rec)
            continue
        rec = json.loads(json.dumps(rec))
        outs = record_outputs(rec, task, multi)
        key = str(rec.get("key"))
        try:
            if not isinstance(outs.get("map"), str):
                raise ConfigError("the record names no saved map")
            amap = read_map(out_dir / outs["map"])
            scores = _part(rec, "scores", task, multi)
            score = float(scores["score"])
            mask, label = decide(amap, score, threshold, image_threshold)
            mask_path = out_dir / outs["mask"]
            old_mask = np.asarray(_read_png(mask_path)) > 0 if mask_path.is_file() else None
            do_overlay = ("overlay" in outs) if want_overlay is None else bool(want_overlay)
            image = None
            if do_overlay:
                src = str(rec.get("input"))
                if src not in images:
                    images.clear()  # one input at a time: a volume's slices share the read
                    images[src] = _read_inputs(src, max_pixels)
                got = images[src]
                if isinstance(got, Exception) or rec.get("suffix", "") not in got:
                    why = got if isinstance(got, Exception) else "the image is not in the input"
                    summary.warnings.append(f"{key}: overlay not rewritten ({why})")
                    do_overlay = False
                else:
                    image = got[rec.get("suffix", "")]
            res_meta = _part(rec, "meta", task, multi)
            stem = str(mask_path)[: -len(".mask.png")]
            written = write_outputs(
                stem,
                image if image is not None else np.zeros((*mask.shape, 3), np.float32),
                fmt="rle" if "rle" in outs else "tiff",
                overlay=do_overlay,
                mask=mask,
                float_map=None,
                heat=amap,
                caption=f"anomaly score {score:.3f}",
                random_weights=bool(res_meta.get("random_weights")),
            )
            new_outs = dict(outs)
            for k, v in written.items():
                new_outs[k] = _rel(v, out_dir)
            if not do_overlay and "overlay" in new_outs:
                old = out_dir / new_outs.pop("overlay")  # a stale picture is removed, not kept
                old.unlink(missing_ok=True)
            if multi:
                rec["outputs"][task] = new_outs
            else:
                rec["outputs"] = new_outs
            old_label = scores.get("label")
            scores["threshold"] = threshold
            scores["threshold_source"] = thr_src
            scores["image_threshold"] = image_threshold
            scores["label"] = label
            scores["defect_area"] = round(float(mask.mean()), 6) if mask.size else 0.0
            res_meta.update(
                threshold=threshold,
                threshold_source=thr_src,
                image_threshold=image_threshold,
                image_threshold_source=ithr_src,
            )
            res_meta[DECIDED_KEY] = {"at": decided_at, "previous": previous}
            if calibration is not None:
                res_meta["calibration"] = {k: calibration[k] for k in ("n_images", "rule")}
            res_meta.pop("threshold_note", None)
            kept, total = manifest_instances(mask_instances(mask, amap))
            _set_instances(rec, task, multi, kept, total)
            summary.decided += 1
            summary.changed_masks += int(old_mask is None or not np.array_equal(old_mask, mask))
            summary.changed_labels += int(old_label != label)
            summary.anomalous += int(bool(label))
        except Exception as exc:  # noqa: BLE001 - one bad record does not stop the others
            summary.errors.append((key, _message(exc)))
        new_records.append(rec)
        done += 1
        if progress is not None:
            progress(done, n)
    text = "".join(dumps_strict(r) + "\n" for r in new_records)
    with atomic_path(manifest.path, fsync=True) as tmp:
        tmp.write_text(text, encoding="utf-8")

    # the settings now say what the outputs were decided with
    # a changed value becomes an explicit option; a kept one keeps the option that made it (the
    # default, an explicit value or the calibration, which then stays in the settings)
    tset = dict(tset)
    if thr_changed:
        tset["threshold"] = threshold
    if ithr_changed:
        tset["image_threshold"] = image_threshold
    if tset.get("threshold") is not None and tset.get("image_threshold") is not None:
        tset["calibrate_with"] = None  # both values explicit: no calibration decides any more
        tset["calibrate_percentile"] = None
    settings["tasks"][task] = tset
    summary.resume_options = resume_options(tset)
    settings.pop(PENDING_KEY, None)
    history = list((settings.get(DECIDED_KEY) or {}).get("history", []))
    history.append(
        {
            "at": decided_at,
            "task": task,
            "threshold": threshold,
            "threshold_source": thr_src,
            "image_threshold": image_threshold,
            "image_threshold_source": ithr_src,
            "previous": previous,
            "calibration": calibration,
            "command": pending["command"],
        }
    )
    settings[DECIDED_KEY] = {**history[-1], "history": history[-20:]}
    _write_settings(spath, settings)

    th = Thresholds(
        threshold=threshold,
        image_threshold=image_threshold,
        source="decide" if thr_src == "fixed" else str(thr_src),
        detail={
            "threshold_source": thr_src,
            "image_threshold_source": ithr_src,
            "run": str(out_dir.resolve()),
            "task": task,
            **({"calibration": calibration} if calibration else {}),
            **({"file": str(thresholds)} if file_th is not None else {}),
        },
        belongs_to=belongs_to(tset, settings),
    )
    summary.outputs.append(write_thresholds(out_dir / THRESHOLDS_NAME, th))
    summary.outputs.extend(_rewrite_mask_volumes(out_dir, new_records))
    if report:
        from zsdense.engine.report import write_report

        try:
            summary.outputs.append(write_report(out_dir))
        except Exception as exc:  # noqa: BLE001
            summary.warnings.append(f"report.html not written: {exc}")
    summary.seconds = time.perf_counter() - t0
    return summary


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _rel(path: str | Path, out_dir: Path) -> str:
    try:
        return Path(path).relative_to(out_dir).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _message(exc: BaseException) -> str:
    from zsdense.io.manifest import error_message

    return error_message(exc)


def _set_instances(rec: dict, task: str, multi: bool, kept: list, total: int | None) -> None:
    from zsdense.io.writers import to_jsonable

    if multi:
        rec.setdefault("instances", {})[task] = to_jsonable(kept)
        totals = rec.get("instances_total") or {}
        totals.pop(task, None)
        if total is not None:
            totals[task] = total
        if totals:
            rec["instances_total"] = totals
        else:
            rec.pop("instances_total", None)
        return
    rec["instances"] = to_jsonable(kept)
    if total is not None:
        rec["instances_total"] = total
    else:
        rec.pop("instances_total", None)


def _rewrite_mask_volumes(out_dir: Path, records: list[dict]) -> list[Path]:
    """Mask volumes (``<stem>[.<task>].mask.nii.gz``) the run wrote are written again from the
    new slice masks."""
    if not any(out_dir.rglob("*.mask.nii.gz")):
        return []
    from zsdense.engine.volumes import write_volume_maps

    items, seen = [], set()
    for r in records:
        item = str(r.get("item", r.get("key")))
        if item in seen or (r.get("meta", {}).get("image", {}) or {}).get("format") != "nifti":
            continue
        seen.add(item)
        items.append(
            WorkItem(key=item, path=Path(str(r.get("input"))), rel=PurePosixPath(r["rel"]))
        )
    try:
        return write_volume_maps(out_dir, items, masks_only=True)
    except Exception as exc:  # noqa: BLE001
        print(f"zsdense: warning: mask volumes not rewritten: {exc}", file=sys.stderr)
        return []


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
                meta = _part(json.loads(json.dumps(rec)), "meta", name, multi)
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
