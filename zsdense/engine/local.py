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

Read top-down: :func:`run_batch` names its steps, which follow it in the order they run. The
inputs (listing, skipped paths, decoding) are in :mod:`zsdense.engine.inputs`, the referring
queries file in :mod:`zsdense.engine.queries`, computing and writing a batch of units in
:mod:`zsdense.engine.units`, the run's account in :mod:`zsdense.engine.summary`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from zsdense.config import ENGINE
from zsdense.context import ImageContext
from zsdense.engine.decide import save_run_thresholds
from zsdense.engine.inputs import (
    WorkItems,
    items_from_data,
    read_units,
    record_skipped_inputs,
    skipped_record,
)
from zsdense.engine.queries import items_from_queries, load_queries
from zsdense.engine.report import write_report
from zsdense.engine.specs import TaskSpec
from zsdense.engine.summary import RunSummary
from zsdense.engine.units import (
    Computed,
    Unit,
    add_instances,
    compute_units,
    process_units,
    write_units,
)
from zsdense.engine.volumes import write_volume_maps
from zsdense.errors import ConfigError, ZsdenseError
from zsdense.io.manifest import (
    MANIFEST_NAME,
    Manifest,
    Plan,
    WorkItem,
    check_settings,
    clean_orphan_temp_files,
    compact_manifest,
    error_record,
    out_stem,
    plan_run,
)
from zsdense.io.progress import Progress, progress_scope
from zsdense.runtime import runtime_of
from zsdense.version import __version__

# what this module has always handed out, now made in its own modules (inputs, queries, units,
# summary)
__all__ = [
    "MANIFEST_NAME",
    "Computed",
    "RunSummary",
    "TaskSpec",
    "Unit",
    "WorkItem",
    "WorkItems",
    "add_instances",
    "clean_orphan_temp_files",
    "compute_units",
    "finish_run",
    "image_batches",
    "open_run",
    "items_from_data",
    "items_from_queries",
    "load_queries",
    "load_records",
    "out_stem",
    "prepare_out_dir",
    "process_units",
    "read_units",
    "record_registers",
    "record_skipped_inputs",
    "records_without_timing",
    "run_batch",
    "run_settings",
    "setup_tasks",
    "skipped_record",
    "write_units",
]

log = logging.getLogger("zsdense")


# ---- reading -----------------------------------------------------------------------------


_Progress = Progress  # the run's progress line (zsdense.io.progress, as the setup phases)


def _read(item: WorkItem, max_pixels: int | None, reader=None):
    """``read_units`` that returns the exception instead of raising it (isolated per input)."""
    try:
        return (reader or read_units)(item, max_pixels)
    except Exception as exc:  # noqa: BLE001 - isolated per input, recorded in the manifest
        return exc


def _timed_read(item: WorkItem, max_pixels: int | None, reader=None):
    t0 = time.perf_counter()
    got = _read(item, max_pixels, reader)
    return got, time.perf_counter() - t0


# ---- the runner --------------------------------------------------------------------------


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
    plan = _plan_and_set_up(
        rt,
        items,
        out_dir,
        tasks,
        force=force,
        retry_errors=retry_errors,
        progress=progress,
        progress_interval=progress_interval,
        record_settings=record_settings,
    )
    manifest, summary = open_run(out_dir, items, plan, [t.name for t in tasks])

    batch_size = batch_size or rt.config.batch_size
    needs_all = any(t.group == "all" for t in tasks)
    read_batch = max(len(plan.todo), 1) if needs_all else batch_size
    run = _RunState(tasks, out_dir, plan, manifest, summary, on_record)
    prog = _Progress(len(plan.todo), progress, progress_interval)
    max_pixels = rt.config.max_pixels
    old_handlers: dict[int, Any] = {}
    if handle_sigint and threading.current_thread() is threading.main_thread():
        old_handlers = _install_stop_handlers(run)
    pool = ThreadPoolExecutor(max_workers=max(1, read_workers), thread_name_prefix="zsdense-read")
    writes = _Writes(overlap_writes)
    batches = image_batches(plan.todo, read_batch)
    try:
        _compute_and_write(
            run,
            batches,
            pool,
            writes,
            prog,
            max_pixels=max_pixels,
            reader=reader,
            batch_size=batch_size,
            needs_all=needs_all,
        )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        writes.shutdown()  # the last batch's records land before the manifest is compacted
        prog.set_failed(summary.failed)  # records written after the last update count too
        prog.close()
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
        finish_run(out_dir, items, summary, report=report, volume_maps=volume_maps)
        summary.wall_seconds = time.perf_counter() - t_start
    return summary


# ---- the runner's steps, in the order they run ---------------------------------------------


def _plan_and_set_up(
    rt,
    items: Sequence[WorkItem],
    out_dir: Path,
    tasks: list[TaskSpec],
    *,
    force: bool,
    retry_errors: bool,
    progress: bool,
    progress_interval: float,
    record_settings: bool,
) -> Plan:
    """Refuse settings that differ from the folder's, plan what is left to do and, when anything
    is, set the tasks up and record the settings (with the weights and registers loaded)."""
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
        record_registers(rt, settings)
        if record_settings:
            check_settings(out_dir, settings, force=force)
    return plan


def open_run(
    out_dir: Path, items: Sequence[WorkItem], plan: Plan, task_names: list[str]
) -> tuple[Manifest, RunSummary]:
    """The manifest (temporary files a killed run left removed first) and the summary before
    the first input: what earlier runs settled (skipped; their failures counted and named) and
    the paths the listing left out (one ``skipped`` record each). Local and Ray runs alike."""
    clean_orphan_temp_files(out_dir)
    manifest = Manifest(out_dir / MANIFEST_NAME)
    summary = RunSummary(skipped=plan.skipped, inputs=len(items))
    summary.failed += plan.skipped_failed
    summary.not_processed = record_skipped_inputs(manifest, items, task_names, manifest.load())
    for key in plan.done_keys:  # settled records inside items that are redone
        rec = plan.previous.get(key, {})
        summary.skipped += 1
        if rec.get("status") != "ok":
            summary.failed += 1
            summary.previous_errors.append((key, rec.get("error")))
    settled = {it.key for it in items} - {it.key for it in plan.todo}
    for rec in plan.previous.values():  # failures of settled items: named, with the hint
        if rec.get("status") == "error" and rec.get("item", rec.get("key")) in settled:
            summary.previous_errors.append((rec.get("key"), rec.get("error")))
    return manifest, summary


@dataclass
class _RunState:
    """What the steps of one run share. Records come from the run's thread and from the writer
    thread: :meth:`emit` and :meth:`add_time` update the manifest and the summary under one
    lock. ``stop`` is set by the first SIGINT / SIGTERM (:func:`_install_stop_handlers`)."""

    tasks: list[TaskSpec]
    out_dir: Path
    plan: Plan
    manifest: Manifest
    summary: RunSummary
    on_record: Callable[[dict], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, record: dict) -> None:
        """Append ``record`` to the manifest and count it (then ``on_record``)."""
        summary = self.summary
        with self.lock:
            self.manifest.append(record)
            summary.total += 1
            if record["status"] == "ok":
                summary.ok += 1
                summary.fallbacks += bool(record.get("fallback"))
            else:
                summary.failed += 1
                summary.errors.append((record["key"], record.get("error")))
        if self.on_record is not None:
            self.on_record(record)

    def add_time(self, stage: str, seconds: float) -> None:
        with self.lock:
            stages = self.summary.stage_seconds
            stages[stage] = stages.get(stage, 0.0) + seconds


def _install_stop_handlers(run: _RunState) -> dict[int, Any]:
    """SIGINT and SIGTERM set ``run.stop``: the current batch is finished and written, nothing
    more is started; a second signal aborts at once (KeyboardInterrupt). Returns the handlers
    they replace (restored at the end of the run)."""
    stop, summary = run.stop, run.summary

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

    old_handlers: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old_handlers[sig] = signal.signal(sig, on_stop)
    return old_handlers


class _Writes:
    """Where a batch's outputs (and its manifest lines) are written: in one writer thread while
    the next batch computes (``overlap``), or at once. One batch is in flight at most."""

    def __init__(self, overlap: bool) -> None:
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="zsdense-write")
            if overlap
            else None
        )
        self.pending: Future | None = None

    def wait(self) -> None:
        """End the previous batch's writes; what the writer raised (a manifest that cannot be
        written) is raised here."""
        if self.pending is not None:
            done, self.pending = self.pending, None
            done.result()

    def start(self, job: Callable[[], None]) -> None:
        if self.pool is None:
            job()
        else:
            self.pending = self.pool.submit(job)

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _compute_and_write(
    run: _RunState,
    batches: list[list[WorkItem]],
    pool: ThreadPoolExecutor,
    writes: _Writes,
    prog: Progress,
    *,
    max_pixels: int | None,
    reader: Callable | None,
    batch_size: int,
    needs_all: bool,
) -> None:
    """The loop over the batches: the next batch decodes in ``pool`` while this one computes,
    then this one's writes start; after a stop request the loop ends once the batch just
    computed is handed to the writer (the caller's ``finally`` waits for it)."""
    todo, summary = run.plan.todo, run.summary
    futures: list[list[Future]] = []

    def submit(b: int) -> None:
        # one decode per file: referring queries on the same image share its context
        if b < len(batches):
            by_path: dict[str, Future] = {}
            for it in batches[b]:
                if str(it.path) not in by_path:
                    by_path[str(it.path)] = pool.submit(_timed_read, it, max_pixels, reader)
            futures.append([by_path[str(it.path)] for it in batches[b]])

    processed_items = 0
    submit(0)
    for b, batch in enumerate(batches):
        submit(b + 1)  # decode the next batch while this one computes
        units = _decoded_units(run, batch, futures[b])
        futures[b] = []
        chunk = max(len(units) if needs_all else batch_size, 1)
        computed = _compute_batch(run, units, chunk)
        # the previous batch's writes end before this one's start (one batch in flight);
        # a stop requested meanwhile is seen here, so it always takes effect at the same
        # point: the batch just computed is written, nothing more is started
        writes.wait()
        writes.start(functools.partial(_write_batch, run, computed, units))
        processed_items += len(batch)
        prog.update(len(batch), summary.failed)
        if run.stop.is_set() and processed_items < len(todo):
            summary.interrupted = True
            summary.not_started = len(todo) - processed_items
            break
    writes.wait()


def _decoded_units(run: _RunState, batch: list[WorkItem], futures: list[Future]) -> list[Unit]:
    """Wait for a batch's decodes: the units still to do (an error record for an input that
    could not be read; records settled earlier left out), with the read and wait times."""
    units: list[Unit] = []
    t_wait = time.perf_counter()
    counted: set[int] = set()
    for it, fut in zip(batch, futures):
        got, secs = fut.result()
        if id(fut) not in counted:
            counted.add(id(fut))
            run.add_time("read", secs)
        if isinstance(got, Exception):
            run.emit(error_record(it, "", [t.name for t in run.tasks], 1, got))
            continue
        for suffix, ctx in got:
            if it.key + suffix in run.plan.done_keys:
                continue
            units.append((it, suffix, ctx, len(got)))
    run.add_time("wait-read", time.perf_counter() - t_wait)
    return units


def _compute_batch(run: _RunState, units: list[Unit], chunk: int) -> list[tuple[list, Computed]]:
    """Run the tasks on ``units`` in encoder batches of ``chunk`` units."""
    computed = []
    for c in range(0, len(units), chunk):
        part = units[c : c + chunk]
        computed.append((part, compute_units(part, run.tasks, run.add_time)))
        # a multi-page file is one batch of many units: drop each context's encoder
        # outputs (SAM states, dense features) once no later unit of the batch shares
        # it, so memory follows batch_size, not the pages in a file (writes use ctx.image)
        later = {id(u[2]) for u in units[c + chunk :]}
        for u in part:
            if id(u[2]) not in later:
                u[2].release()
    return computed


def _write_batch(run: _RunState, computed: list[tuple[list, Computed]], units: list[Unit]) -> None:
    """Write a computed batch (in the writer thread when writes overlap)."""
    for part, comp in computed:
        write_units(part, run.tasks, comp, run.out_dir, run.emit, run.add_time, release=False)
    for u in units:  # every head of every unit sharing a context is done
        u[2].release()


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
    registers = getattr(rt, "registers_settings", None)
    if callable(registers) and registers() is not None:  # off: no key (older runs resume)
        settings["registers"] = registers()
    return settings


def record_registers(rt, settings: dict) -> None:
    """After setup: which encoders of the run's tasks got test-time registers (neurons, their
    fingerprint, R, mode) as ``settings["registers_applied"]``; a ``--registers`` file that
    matched none of them is a setup error (ConfigError)."""
    applied = getattr(rt, "registers_applied", None)
    if not callable(applied) or not getattr(rt, "registers_on", False):
        return
    labels = settings.get("weights")  # the encoders the tasks' setup loaded
    if labels != {}:  # a setup that loads nothing (a plug-in task) tells nothing
        rt.check_registers_used(labels)
    settings["registers_applied"] = applied(labels)


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
