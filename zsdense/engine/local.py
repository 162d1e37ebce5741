"""Local batch runner: read → batch → heads → atomic writes → one manifest line per image.

Guarantees (what a demanding batch user needs):
- every input ends as ``ok`` or ``error`` line(s) in ``results.jsonl`` (one per image: a DICOM
  frame, a NIfTI slice and a TIFF page are images), appended and fsynced as soon as the image
  finishes; a broken file never stops the run; every path the listing saw but does not process
  (hidden, unsupported, no extension) gets one ``status: "skipped"`` line with its ``reason``
  (:func:`items_from_data` carries them; not failures). The progress line counts input files
  (or queries); the summary starts with the same count, then the image records;
- outputs are written atomically before their manifest line, so a rerun after a crash skips
  exactly the images whose line is ``ok`` and whose outputs all exist (``--force`` redoes all,
  ``--retry-errors`` redoes the failed ones); temporary files left by a killed writer are removed
  when the next run starts; at the end of every run the manifest is compacted (atomically) to one
  line per image in input order, so a killed-and-resumed run ends with the same manifest as an
  uninterrupted one (timings aside);
- a failing batch is retried one image at a time (this also catches CUDA out-of-memory) so one
  bad image only fails itself;
- SIGINT and SIGTERM finish the current batch, write the manifest and report.html, and stop with
  a resume hint (exit 130 for SIGINT, 143 for SIGTERM);
- decoding of the next batch runs in background threads while the encoders work, and the
  outputs of a batch are written (with their manifest lines) in a writer thread while the next
  batch computes: one batch in flight at most, all written before the run returns
  (``overlap_writes``); encoder batches are filled across images (``batch_size`` input files
  per batch: a head resizes them to its model input and runs them as one forward).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Sequence

from zsdense.config import ENGINE
from zsdense.context import ImageContext
from zsdense.engine.decide import save_run_thresholds
from zsdense.engine.report import write_report
from zsdense.engine.report_view import store_view
from zsdense.engine.specs import TaskSpec
from zsdense.engine.volumes import write_volume_maps
from zsdense.errors import ConfigError, InputError, ZsdenseError
from zsdense.io import list_inputs, read_image_records
from zsdense.io.instances import manifest_instances
from zsdense.io.manifest import (
    MANIFEST_NAME,
    Manifest,
    WorkItem,
    base_record,
    check_settings,
    clean_orphan_temp_files,
    compact_manifest,
    error_record,
    out_stem,
    plan_run,
)
from zsdense.io.progress import Progress, progress_scope
from zsdense.io.writers import to_jsonable
from zsdense.runtime import runtime_of
from zsdense.version import __version__

log = logging.getLogger("zsdense")


@dataclass
class RunSummary:
    total: int = 0  # manifest records produced in this run
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already complete (or already failed) from an earlier run
    not_processed: int = 0  # paths the listing saw but does not process (hidden, unsupported)
    inputs: int = 0  # input files (or referring queries) of the run: the progress line's unit
    interrupted: bool = False
    not_started: int = 0  # inputs left when interrupted
    stop_signal: int = int(signal.SIGINT)  # the signal that interrupted the run
    wall_seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)  # (key, message)
    fallbacks: int = 0  # ok records whose result is a method's stand-in ("fallback": true)
    extra_outputs: list = field(default_factory=list)  # report.html, volume maps
    # (key, message) of failures an earlier run recorded and this one left as they were
    previous_errors: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 all ok (skipped paths are not failures), 3 some inputs failed, 128 + the signal
        when interrupted (130 SIGINT, 143 SIGTERM)."""
        if self.interrupted:
            return 128 + int(self.stop_signal)
        return 3 if self.failed else 0

    def format(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.stage_seconds.items()))
        text = ""
        if self.inputs:  # the progress line's unit; records: one per image (page, frame...)
            records = self.total + self.skipped  # made now + settled earlier
            text = f"{self.inputs} input(s) -> {records} image record(s): "
        text += f"{self.ok} ok"
        if self.fallbacks:
            text += f" ({self.fallbacks} of them fallbacks: see 'fallback' in results.jsonl)"
        text += f", {self.failed} failed"
        if self.previous_errors:
            text += f" ({len(self.previous_errors)} in an earlier run, kept: --retry-errors)"
        text += f", {self.skipped} skipped (already done)"
        if self.not_processed:
            text += (
                f", {self.not_processed} path(s) not processed (see the 'skipped' lines of "
                "results.jsonl)"
            )
        text += f" in {self.wall_seconds:.1f}s" + (f"; stage time: {stages}" if stages else "")
        if self.interrupted:
            text += (
                f"\ninterrupted: {self.not_started} input(s) not processed; rerun the same "
                "command to resume where it stopped"
            )
        return text


# ---- inputs ------------------------------------------------------------------------------


class WorkItems(list):
    """The :class:`WorkItem` list of a run, plus what the listing saw and left out.

    ``skipped``: :class:`zsdense.io.inputs.SkippedInput` (path, rel, reason) for every path seen
    but not processed (hidden files, unsupported types...); the runners write one
    ``status: "skipped"`` manifest line for each. ``excluded``: the exclude folders (the output
    folder) that hid at least one path.
    """

    def __init__(
        self, items: Iterable[WorkItem] = (), skipped: Iterable = (), excluded: Iterable = ()
    ) -> None:
        super().__init__(items)
        self.skipped: list = list(skipped)
        self.excluded: list[Path] = list(excluded)


def items_from_data(data: Sequence[str | Path], exclude: Sequence[str | Path] = ()) -> WorkItems:
    """Files, folders (recursed) and globs -> work items whose keys mirror the input tree.

    ``exclude``: folders never listed inside a folder walk or glob (pass the output folder, so
    a rerun with ``--out`` inside DATA never reads its own outputs). The skipped and excluded
    paths ride along on the returned :class:`WorkItems`."""
    listed = list_inputs(data, exclude=list(exclude))
    return WorkItems(
        (WorkItem(key=str(it.rel), path=it.path, rel=it.rel, stem=it.stem) for it in listed),
        skipped=listed.skipped,
        excluded=listed.excluded,
    )


def skipped_record(skipped, tasks: Sequence[str]) -> dict:
    """The manifest record of a path the listing saw but does not process: ``status:
    "skipped"``, its ``reason``, key = its relative path."""
    rel = str(skipped.rel)
    return {
        "key": rel,
        "item": rel,
        "input": str(skipped.path),
        "rel": rel,
        "suffix": "",
        "item_records": 1,
        "params": {},
        "tasks": list(tasks),
        "status": "skipped",
        "reason": skipped.reason,
        "error": None,
        "outputs": {},
        "scores": {},
        "meta": {},
    }


def record_skipped_inputs(
    manifest: Manifest,
    items: Sequence[WorkItem],
    tasks: Sequence[str],
    previous: dict[str, dict],
) -> int:
    """Append one ``skipped`` record per path in ``items.skipped`` (if ``items`` carries them)
    unless the manifest already holds that record; returns how many paths were skipped."""
    skipped = list(getattr(items, "skipped", ()) or ())
    keys = {it.key for it in items}
    seen: set[str] = set()
    for sk in skipped:
        rec = skipped_record(sk, tasks)
        key = rec["key"]
        if key in seen or key in keys:
            continue
        seen.add(key)
        old = previous.get(key)
        if old is not None and old.get("status") == "skipped" and old.get("reason") == sk.reason:
            continue
        manifest.append(rec)
    return len(seen)


def read_units(item: WorkItem, max_pixels: int | None) -> list[tuple[str, ImageContext]]:
    """Decode an item into ``(record suffix, context)`` pairs (one per frame/slice/page)."""
    records = read_image_records(item.path, max_pixels=max_pixels)
    out: list[tuple[str, ImageContext]] = []
    for rec in records:
        out.append((rec.suffix, ImageContext(image=rec.image, meta=dict(rec.meta))))
    if not out:
        raise InputError(item.path, "the file holds no image")
    return out


def _read(item: WorkItem, max_pixels: int | None, reader=None):
    """``read_units`` that returns the exception instead of raising it (isolated per input)."""
    try:
        return (reader or read_units)(item, max_pixels)
    except Exception as exc:  # noqa: BLE001 - isolated per input, recorded in the manifest
        return exc


_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_id(value: Any) -> str:
    text = _ID_RE.sub("_", str(value)).strip("._")
    return text or "q"


def load_queries(path: str | Path) -> list[dict]:
    """Read a JSONL file of {"image", "text", optional "id"} lines.

    Relative image paths are resolved against the JSONL file's folder. Ids default to the line
    number; they are made file-name safe and must be unique. Blank lines are skipped. A line that
    is not a JSON object with a non-empty "image" and "text" is a ConfigError naming the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the queries file ({exc.strerror or exc})") from None
    out: list[dict] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f'{path}:{n}: expected an object like {{"image": ..., "text": ...}}')
        image, text = obj.get("image"), obj.get("text")
        if not isinstance(image, str) or not image.strip():
            raise ConfigError(f'{path}:{n}: missing "image" (a path to the image)')
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f'{path}:{n}: missing "text" (the referring expression)')
        qid = _safe_id(obj.get("id", n))
        if qid in seen:
            raise ConfigError(f"{path}:{n}: duplicate query id {qid!r}")
        seen.add(qid)
        img = Path(image).expanduser()
        if not img.is_absolute():
            img = path.parent / img
        out.append({"image": img, "text": text, "id": qid, "line": n})
    if not out:
        raise ConfigError(f"{path}: no queries in the file")
    return out


def items_from_queries(queries: list[dict], base: Path) -> list:
    """Queries -> WorkItems with params {"text", "id", "image"}; keys ``<rel>#<id>`` so the
    output stem is ``<rel without extension>.<id>``."""
    items = []
    for q in queries:
        img: Path = q["image"]
        try:
            rel = PurePosixPath(img.resolve().relative_to(base.resolve()).as_posix())
        except ValueError:
            rel = PurePosixPath(img.name)
        items.append(
            WorkItem(
                key=f"{rel}#{q['id']}",
                path=img,
                rel=rel,
                params={"text": q["text"], "id": q["id"], "image": str(img)},
            )
        )
    return items


# ---- progress ----------------------------------------------------------------------------


_Progress = Progress  # the run's progress line (zsdense.io.progress, as the setup phases)


def _jsonable_meta(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            out[str(k)] = to_jsonable(v)
        except TypeError:
            out[str(k)] = str(v)
    return out


def _encoder_counts(ctx: ImageContext) -> dict[str, int]:
    """How often each cached encoder output was computed for this image (1 = shared)."""
    out: dict[str, int] = {}
    for key, n in ctx.computed.items():
        if isinstance(key, tuple):
            name = "/".join(str(k) for k in key)
        else:
            name = str(key)
        out[name] = int(n)
    return out


def _stringify_paths(obj, out_dir: Path):
    """Output paths relative to the output folder (POSIX), so the folder can move."""
    if isinstance(obj, dict):
        return {k: _stringify_paths(v, out_dir) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_stringify_paths(v, out_dir) for v in obj]
    if isinstance(obj, (str, Path)):
        p = Path(obj)
        try:
            return p.relative_to(out_dir).as_posix()
        except ValueError:
            try:
                return p.resolve().relative_to(Path(out_dir).resolve()).as_posix()
            except ValueError:
                return p.as_posix()
    return obj


# ---- compute ------------------------------------------------------------------------------

Unit = tuple  # (WorkItem, suffix, ImageContext, n_units_of_item)


@dataclass
class Computed:
    """What :func:`compute_units` produced for a list of units, waiting to be written."""

    results: dict[str, list[Any]]
    failures: dict[int, BaseException]
    task_secs: list[float]


def compute_units(
    units: Sequence[Unit],
    tasks: Sequence[TaskSpec],
    add_time: Callable[[str, float], None] = lambda s, t: None,
) -> Computed:
    """Run every task on ``units`` as one batch (one image at a time after a failure)."""
    n = len(units)
    results: dict[str, list[Any]] = {}
    failures: dict[int, BaseException] = {}
    task_secs = [0.0] * n
    for task in tasks:
        live = [i for i in range(n) if i not in failures]
        res_all: list[Any] = [None] * n
        t0 = time.perf_counter()
        if live:
            ctxs = [units[i][2] for i in live]
            params = [units[i][0].params for i in live]
            try:
                res = task.run(ctxs, params)
                if len(res) != len(live):
                    raise RuntimeError(
                        f"task {task.name} returned {len(res)} results for {len(live)} inputs"
                    )
                for i, r in zip(live, res):
                    res_all[i] = r
            except Exception as exc:  # noqa: BLE001
                _free_accelerator_memory()
                if task.group == "all" or len(live) == 1:
                    # a set-level method cannot be split: every image of the set fails with it
                    for i in live:
                        failures.setdefault(i, exc)
                else:
                    for i in live:  # one image at a time: one bad image only fails itself
                        it, _s, ctx = units[i][:3]
                        try:
                            one = task.run([ctx], [it.params])
                            if len(one) != 1:
                                raise RuntimeError(f"task {task.name} returned {len(one)} results")
                            res_all[i] = one[0]
                        except Exception as exc1:  # noqa: BLE001
                            failures.setdefault(i, exc1)
                            _free_accelerator_memory()
        dt = time.perf_counter() - t0
        add_time(task.name, dt)
        for i in live:
            task_secs[i] += dt / max(len(live), 1)
        results[task.name] = res_all
    return Computed(results, failures, task_secs)


def write_units(
    units: Sequence[Unit],
    tasks: Sequence[TaskSpec],
    computed: Computed,
    out_dir: Path,
    emit: Callable[[dict], None],
    add_time: Callable[[str, float], None] = lambda s, t: None,
    release: bool = True,
) -> None:
    """Write the outputs of computed ``units`` and ``emit`` one record per unit (an error
    record for a unit whose task or write failed)."""
    out_dir = Path(out_dir)
    multi = len(tasks) > 1
    names = [t.name for t in tasks]
    results, failures, task_secs = computed.results, computed.failures, computed.task_secs
    for i, unit in enumerate(units):
        it, suffix, ctx, n_units = unit[0], unit[1], unit[2], unit[3]
        meta = _jsonable_meta(ctx.meta)
        if i in failures:
            emit(error_record(it, suffix, names, n_units, failures[i], meta))
            if release:
                ctx.release()
            continue
        t0 = time.perf_counter()
        rec = base_record(it, suffix, names, n_units)
        try:
            outputs: dict = {}
            scores: dict = {}
            res_meta: dict = {}
            instances: dict = {}  # task -> (instances kept, total when some were left out)
            fallbacks: dict = {}
            for task in tasks:
                stem = out_stem(out_dir, it, suffix, task.name if multi else None)
                got = task.write(results[task.name][i], ctx, stem, it.params) or {}
                _store_view(
                    out_dir, rec["key"], task.name if multi else None, got, results, task, i, ctx
                )
                if got.get("instances") is not None:
                    instances[task.name] = manifest_instances(list(got["instances"]))
                if got.get("fallback"):
                    fallbacks[task.name] = str(got["fallback"])
                if multi:
                    outputs[task.name] = got.get("outputs", {})
                    scores[task.name] = got.get("scores", {})
                    res_meta[task.name] = got.get("meta", {})
                else:
                    outputs = got.get("outputs", {})
                    scores = got.get("scores", {})
                    res_meta = got.get("meta", {})
        except Exception as exc:  # noqa: BLE001
            emit(error_record(it, suffix, names, n_units, exc, meta))
            if release:
                ctx.release()
            continue
        write_s = time.perf_counter() - t0
        add_time("write", write_s)
        rec.update(
            status="ok",
            error=None,
            fallback=bool(fallbacks),  # a method's stand-in, not an answer (write() says why)
            **({"fallback_reason": _fallback_reason(fallbacks, multi)} if fallbacks else {}),
            outputs=_stringify_paths(outputs, out_dir),
            scores=_jsonable_meta(scores),
            meta={"image": meta, "result": _jsonable_meta(res_meta)},
            encoders=_encoder_counts(ctx),
            timing={"compute_s": round(task_secs[i], 4), "write_s": round(write_s, 4)},
        )
        if instances:  # the connected components of each mask (zsdense.io.instances)
            add_instances(rec, instances, multi)
        emit(rec)
        if release:
            ctx.release()


def _store_view(out_dir, key, task_name, got, results, task, i, ctx) -> None:
    """Cache the report's view of an anomaly map while it is in memory (report_view)."""
    amap = getattr(results[task.name][i], "anomaly_map", None)
    map_path = (got.get("outputs") or {}).get("map")
    if amap is None or not map_path:
        return
    try:
        rel = _stringify_paths(map_path, out_dir)
        store_view(out_dir, key, task_name, rel, amap, ctx.image)
    except Exception as exc:  # noqa: BLE001 - the report makes it later from the files
        log.debug("report view of %s not cached: %s", key, exc)


def add_instances(rec: dict, instances: dict[str, tuple[list, int | None]], multi: bool) -> None:
    """``rec["instances"]`` (a list; ``{task: list}`` when several tasks ran) and, where the
    list was cut to the largest ones, ``rec["instances_total"]`` (the same nesting)."""
    if multi:
        rec["instances"] = {k: to_jsonable(v[0]) for k, v in instances.items()}
        totals = {k: v[1] for k, v in instances.items() if v[1] is not None}
        if totals:
            rec["instances_total"] = totals
        return
    kept, total = next(iter(instances.values()))
    rec["instances"] = to_jsonable(kept)
    if total is not None:
        rec["instances_total"] = total


def _fallback_reason(reasons: dict[str, str], multi: bool) -> str:
    if not multi:
        return next(iter(reasons.values()))
    return "; ".join(f"{task}: {why}" for task, why in reasons.items())


def process_units(
    units: Sequence[Unit],
    tasks: Sequence[TaskSpec],
    out_dir: Path,
    emit: Callable[[dict], None],
    add_time: Callable[[str, float], None] = lambda s, t: None,
    release: bool = True,
) -> None:
    """:func:`compute_units` then :func:`write_units`, one after the other (the Ray runner)."""
    write_units(
        units, tasks, compute_units(units, tasks, add_time), out_dir, emit, add_time, release
    )


# ---- the runner --------------------------------------------------------------------------


# run_batch is longer than the house's ~80 lines: the signal handlers, the reader pool, the
# writer thread and the stop flag share the run's state through closures; splitting it means
# turning that state into an object, the engine's own refactor (issue 19), not the anomaly one.
def run_batch(
    rt,
    items: Sequence[WorkItem],
    out_dir: str | Path,
    tasks: Sequence[TaskSpec],
    *,
    batch_size: int | None = None,
    force: bool = False,
    retry_errors: bool = False,
    progress: bool = True,
    read_workers: int = ENGINE.read_workers,
    on_record: Callable[[dict], None] | None = None,
    progress_interval: float = ENGINE.progress_interval_s,
    reader: Callable[[WorkItem, int | None], list[tuple[str, ImageContext]]] | None = None,
    report: bool = True,
    volume_maps: bool = False,
    handle_sigint: bool = True,
    record_settings: bool = True,
    overlap_writes: bool = True,
) -> RunSummary:
    """Run ``tasks`` over ``items``; see the module docstring for the guarantees.

    ``record_settings=False`` leaves the settings check to the caller (the evaluation package
    keeps one folder per protocol with its own settings record).
    ``reader`` replaces :func:`read_units` (tests, custom sources); ``report`` writes
    ``report.html``; ``volume_maps`` stacks the float maps of each NIfTI volume back into
    ``<stem>[.<task>].map.nii.gz`` with the input's affine. ``overlap_writes`` writes a
    batch's outputs (and its manifest lines) in a thread while the next batch computes; one
    batch is in flight at most, and every record is in the manifest when this returns.
    """
    t_start = time.perf_counter()
    tasks = list(tasks)
    if not tasks:
        raise ZsdenseError("no task to run")
    out_dir = prepare_out_dir(out_dir)
    rt = runtime_of(rt)
    settings = run_settings(rt, tasks)
    if record_settings:  # refuse to mix settings, before loading models
        check_settings(out_dir, settings, force=force, record=False)
    plan = plan_run(items, out_dir, force=force, retry_errors=retry_errors)
    if plan.todo:  # load what the tasks need: missing weights fail here, nothing written
        record = getattr(rt, "weights_record", None)
        # setup phases (calibration, reference passes) show their own progress, before the
        # run's progress line starts its clock (so the first ETA does not include them)
        with progress_scope(progress, progress_interval):
            if callable(record):  # the hashes of the weights this run's tasks load
                settings["weights"] = record(during=lambda: setup_tasks(tasks))
            else:
                setup_tasks(tasks)
        if record_settings:
            check_settings(out_dir, settings, force=force)
    clean_orphan_temp_files(out_dir)
    manifest = Manifest(out_dir / MANIFEST_NAME)
    summary = RunSummary(skipped=plan.skipped, inputs=len(items))
    summary.failed += plan.skipped_failed
    summary.not_processed = record_skipped_inputs(
        manifest, items, [t.name for t in tasks], manifest.load()
    )
    todo = plan.todo
    for key in plan.done_keys:  # settled records inside items that are redone
        rec = plan.previous.get(key, {})
        summary.skipped += 1
        if rec.get("status") != "ok":
            summary.failed += 1
            summary.previous_errors.append((key, rec.get("error")))
    settled = {it.key for it in items} - {it.key for it in todo}
    for rec in plan.previous.values():  # failures of settled items: named, with the hint
        if rec.get("status") == "error" and rec.get("item", rec.get("key")) in settled:
            summary.previous_errors.append((rec.get("key"), rec.get("error")))

    batch_size = batch_size or rt.config.batch_size
    needs_all = any(t.group == "all" for t in tasks)
    read_batch = max(len(todo), 1) if needs_all else batch_size
    stop = threading.Event()
    prog = _Progress(len(todo), progress, progress_interval)
    max_pixels = rt.config.max_pixels

    lock = threading.Lock()  # records come from this thread and from the writer thread

    def emit(record: dict) -> None:
        with lock:
            manifest.append(record)
            summary.total += 1
            if record["status"] == "ok":
                summary.ok += 1
                summary.fallbacks += bool(record.get("fallback"))
            else:
                summary.failed += 1
                summary.errors.append((record["key"], record.get("error")))
        if on_record is not None:
            on_record(record)

    def add_time(stage: str, seconds: float) -> None:
        with lock:
            summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds

    old_handlers: dict[int, Any] = {}
    if handle_sigint and threading.current_thread() is threading.main_thread():

        def on_stop(signum, frame):  # noqa: ARG001
            if stop.is_set():
                raise KeyboardInterrupt
            summary.stop_signal = int(signum)
            stop.set()
            name = "interrupt" if signum == signal.SIGINT else "termination signal"
            print(
                f"\nzsdense: {name} received: finishing the current batch "
                "(press Ctrl-C again to abort now)",
                file=sys.stderr,
                flush=True,
            )

        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, on_stop)

    pool = ThreadPoolExecutor(max_workers=max(1, read_workers), thread_name_prefix="zsdense-read")
    # outputs of one batch are written while the next computes (overlap_writes)
    writer = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="zsdense-write")
        if overlap_writes
        else None
    )
    writing: Future | None = None

    def wait_writes() -> None:
        nonlocal writing
        if writing is not None:
            done, writing = writing, None
            done.result()  # what the writer raised (a manifest that cannot be written) is raised

    batches = image_batches(todo, read_batch)
    processed_items = 0
    try:
        futures: list[list[Future]] = []

        def submit(b: int) -> None:
            # one decode per file: referring queries on the same image share its context
            if b < len(batches):
                by_path: dict[str, Future] = {}
                for it in batches[b]:
                    if str(it.path) not in by_path:
                        by_path[str(it.path)] = pool.submit(_timed_read, it, max_pixels, reader)
                futures.append([by_path[str(it.path)] for it in batches[b]])

        submit(0)
        for b, batch in enumerate(batches):
            submit(b + 1)  # decode the next batch while this one computes
            units: list[Unit] = []
            t_wait = time.perf_counter()
            counted: set[int] = set()
            for it, fut in zip(batch, futures[b]):
                got, secs = fut.result()
                if id(fut) not in counted:
                    counted.add(id(fut))
                    add_time("read", secs)
                if isinstance(got, Exception):
                    emit(error_record(it, "", [t.name for t in tasks], 1, got))
                    continue
                for suffix, ctx in got:
                    if it.key + suffix in plan.done_keys:
                        continue
                    units.append((it, suffix, ctx, len(got)))
            add_time("wait-read", time.perf_counter() - t_wait)
            futures[b] = []
            chunk = max(len(units) if needs_all else batch_size, 1)
            computed = []
            for c in range(0, len(units), chunk):
                part = units[c : c + chunk]
                computed.append((part, compute_units(part, tasks, add_time)))
                # a multi-page file is one batch of many units: drop each context's encoder
                # outputs (SAM states, dense features) once no later unit of the batch shares
                # it, so memory follows batch_size, not the pages in a file (writes use ctx.image)
                later = {id(u[2]) for u in units[c + chunk :]}
                for u in part:
                    if id(u[2]) not in later:
                        u[2].release()

            def write_batch(computed=computed, units=units) -> None:
                for part, comp in computed:
                    write_units(part, tasks, comp, out_dir, emit, add_time, release=False)
                for u in units:  # every head of every unit sharing a context is done
                    u[2].release()

            # the previous batch's writes end before this one's start (one batch in flight);
            # a stop requested meanwhile is seen here, so it always takes effect at the same
            # point: the batch just computed is written, nothing more is started
            wait_writes()
            if writer is None:
                write_batch()
            else:
                writing = writer.submit(write_batch)
            processed_items += len(batch)
            prog.update(len(batch), summary.failed)
            if stop.is_set() and processed_items < len(todo):
                summary.interrupted = True
                summary.not_started = len(todo) - processed_items
                break
        wait_writes()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if writer is not None:  # the last batch's records land before the manifest is compacted
            writer.shutdown(wait=True)
        prog.set_failed(summary.failed)  # records written after the last update count too
        prog.close()
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
        finish_run(out_dir, items, summary, report=report, volume_maps=volume_maps)
        summary.wall_seconds = time.perf_counter() - t_start
    return summary


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and check that files can be written there (a setup error otherwise)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".zsdense-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the output folder {out_dir}: {exc.strerror or exc}; "
            "choose another --out"
        ) from None
    return out_dir


def run_settings(rt, tasks: Sequence[TaskSpec]) -> dict:
    """What changes the outputs of a run: the zsdense version, the model set, the precision that
    runs (``auto`` resolved: a resume on a machine where it resolves otherwise is refused), and
    every task's settings (preset, options, output format). ``machine`` (device type, what was
    asked for, the CPU capability that decided) is recorded, not compared."""
    rt = runtime_of(rt)
    cfg = getattr(rt, "config", None)
    settings = {
        "zsdense": __version__,
        "models": getattr(cfg, "models", None),
        "precision": getattr(cfg, "precision", None),
        "tasks": {t.name: t.settings or {"task": t.name} for t in tasks},
    }
    record = getattr(rt, "precision_record", None)
    if callable(record):
        machine = record()
        settings["precision"] = machine.pop("precision")
        settings["machine"] = machine
    return settings


def setup_tasks(tasks: Sequence[TaskSpec]) -> None:
    """Run every task's ``setup`` (load models, weights, prompts) before the first input.

    A failure here is a setup error of the whole run (raised: the CLI exits 2 with its message),
    not a failure of each input."""
    for task in tasks:
        if task.setup is not None:
            task.setup()


def image_batches(items: Sequence[WorkItem], n_images: int) -> list[list[WorkItem]]:
    """Batches of ``n_images`` distinct input files; every item of one file (the queries on one
    image) lands in the same batch, so the file is decoded once and its encoder outputs (SAM,
    mask features) computed once for all of them. Files keep their first-appearance order."""
    groups: dict[str, list[WorkItem]] = {}
    for it in items:
        groups.setdefault(str(it.path), []).append(it)
    paths = list(groups)
    n = max(1, int(n_images))
    return [[it for p in paths[i : i + n] for it in groups[p]] for i in range(0, len(paths), n)]


def finish_run(
    out_dir: Path,
    items: Sequence[WorkItem],
    summary: RunSummary,
    *,
    report: bool,
    volume_maps: bool,
) -> None:
    """End of every run (also interrupted ones): compact the manifest, write volume maps and
    ``report.html``. Failures here are logged, never raised: the manifest is already safe."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        compact_manifest(path, [it.key for it in items])
    except Exception as exc:  # noqa: BLE001
        log.warning("could not compact %s: %s", path, exc)
    if volume_maps and not summary.interrupted:
        try:
            summary.extra_outputs.extend(write_volume_maps(out_dir, items))
        except Exception as exc:  # noqa: BLE001
            print(f"zsdense: warning: volume maps not written: {exc}", file=sys.stderr)
    try:  # calibrated thresholds kept for reuse (--thresholds, memory banks)
        summary.extra_outputs.extend(save_run_thresholds(out_dir))
    except Exception as exc:  # noqa: BLE001
        print(f"zsdense: warning: thresholds.json not written: {exc}", file=sys.stderr)
    if report:
        try:
            summary.extra_outputs.append(write_report(out_dir))
        except Exception as exc:  # noqa: BLE001
            print(f"zsdense: warning: report.html not written: {exc}", file=sys.stderr)


def _timed_read(item: WorkItem, max_pixels: int | None, reader=None):
    t0 = time.perf_counter()
    got = _read(item, max_pixels, reader)
    return got, time.perf_counter() - t0


def load_records(out_dir: str | Path) -> list[dict]:
    """Every record of ``results.jsonl`` (last per key, file order)."""
    return list(Manifest(Path(out_dir) / MANIFEST_NAME).load().values())


def records_without_timing(records: Iterable[dict]) -> list[dict]:
    """Records minus their timing fields (what must equal between two runs of the same data)."""
    out = []
    for r in records:
        r = json.loads(json.dumps(r))
        r.pop("timing", None)
        out.append(r)
    return out


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass
