"""Local batch runner: read → batch → heads → atomic writes → one manifest line per image.

Guarantees (what a demanding batch user needs):
- every input ends as ``ok`` or ``error`` line(s) in ``results.jsonl`` (one per image: a DICOM
  frame, a NIfTI slice and a TIFF page are images), appended and fsynced as soon as the image
  finishes; a broken file never stops the run;
- outputs are written atomically before their manifest line, so a rerun after a crash skips
  exactly the images whose line is ``ok`` and whose outputs all exist (``--force`` redoes all,
  ``--retry-errors`` redoes the failed ones); temporary files left by a killed writer are removed
  when the next run starts; at the end of every run the manifest is compacted (atomically) to one
  line per image in input order, so a killed-and-resumed run ends with the same manifest as an
  uninterrupted one (timings aside);
- a failing batch is retried one image at a time (this also catches CUDA out-of-memory) so one
  bad image only fails itself;
- SIGINT finishes the current batch, writes the manifest, and stops with a resume hint (exit 130);
- decoding of the next batch runs in background threads while the encoders work.
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
from zsdense.errors import InputError, ZsdenseError

log = logging.getLogger("zsdense")

MANIFEST_NAME = "results.jsonl"
REPORT_NAME = "report.html"


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: an image file (and, for referring queries, the query's params).

    ``stem`` (optional) is the output stem chosen by :func:`zsdense.io.list_inputs` when two
    inputs would collide (``x.png`` and ``x.jpg``); ``None`` means ``rel`` without extension.
    """

    key: str  # unique manifest key: the mirrored relative path (+ "#id" for queries)
    path: Path
    rel: PurePosixPath  # relative path that is mirrored under --out
    params: dict = field(default_factory=dict, hash=False, compare=False)
    stem: PurePosixPath | None = field(default=None, compare=False)


@dataclass
class TaskSpec:
    """A head bound to its options.

    ``run(ctxs, params)`` returns one result per context (same order). ``write(result, ctx,
    out_stem, params)`` writes the result's files next to ``out_stem`` and returns
    ``{"outputs": {name: path}, "scores": {...}, "meta": {...}}``. ``group="all"`` hands the
    whole set of readable images to ``run`` at once (batch-level methods such as ``musc``).
    """

    name: str
    run: Callable[[list[ImageContext], list[dict]], list[Any]]
    write: Callable[[Any, ImageContext, Path, dict], dict]
    group: str = "batch"


@dataclass
class RunSummary:
    total: int = 0  # manifest records produced in this run
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already complete (or already failed) from an earlier run
    interrupted: bool = False
    not_started: int = 0  # inputs left when interrupted
    wall_seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)  # (key, message)
    extra_outputs: list = field(default_factory=list)  # report.html, volume maps

    @property
    def exit_code(self) -> int:
        """0 all ok, 3 some inputs failed, 130 interrupted."""
        if self.interrupted:
            return 130
        return 3 if self.failed else 0

    def format(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.stage_seconds.items()))
        text = (
            f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done)"
            f" in {self.wall_seconds:.1f}s" + (f"; stage time: {stages}" if stages else "")
        )
        if self.interrupted:
            text += (
                f"\ninterrupted: {self.not_started} input(s) not processed; rerun the same "
                "command to resume where it stopped"
            )
        return text


# ---- inputs ------------------------------------------------------------------------------


def items_from_data(data: Sequence[str | Path]) -> list[WorkItem]:
    """Files, folders (recursed) and globs -> work items whose keys mirror the input tree."""
    from zsdense.io import list_inputs

    return [
        WorkItem(key=str(it.rel), path=it.path, rel=it.rel, stem=it.stem)
        for it in list_inputs(data)
    ]


def read_units(item: WorkItem, max_pixels: int | None) -> list[tuple[str, ImageContext]]:
    """Decode an item into ``(record suffix, context)`` pairs (one per frame/slice/page)."""
    from zsdense.io import read_image_records

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


def error_message(exc: BaseException) -> str:
    """One-line message for the manifest: a ZsdenseError's own text, else ``Type: text``."""
    if isinstance(exc, ZsdenseError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


_message = error_message  # backward-compatible alias


def out_stem(out_dir: Path, item: WorkItem, suffix: str = "", task: str | None = None) -> Path:
    """``out/<rel without extension><suffix>[.<query id>][.<task>]``."""
    from zsdense.io.inputs import strip_extension

    stem = item.stem if item.stem is not None else strip_extension(item.rel)
    parts = [p for p in stem.parts if p not in ("", ".", "..")] or ["image"]
    name = parts[-1] + suffix
    if "#" in item.key:
        name += "." + item.key.split("#", 1)[1]
    if task:
        name += "." + task
    return Path(out_dir).joinpath(*parts[:-1], name)


# ---- progress ----------------------------------------------------------------------------


class _Progress:
    """tqdm (with ETA) on a terminal, periodic plain log lines otherwise."""

    def __init__(self, total: int, enabled: bool, interval: float = 10.0, stream=None):
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.last = self.t0
        self.bar = None
        self.enabled = enabled and total > 0
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if failed:
                self.bar.set_postfix(failed=failed)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(
                f"zsdense: {self.done}/{self.total} inputs ({100 * self.done / self.total:.0f}%), "
                f"{rate:.2f}/s, {failed} failed, ETA {_fmt_eta(eta)}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_eta(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---- manifest bookkeeping ----------------------------------------------------------------


def _output_paths(outputs) -> list[str]:
    if isinstance(outputs, dict):
        return [p for v in outputs.values() for p in _output_paths(v)]
    if isinstance(outputs, (list, tuple)):
        return [p for v in outputs for p in _output_paths(v)]
    return [outputs] if isinstance(outputs, str) else []


def record_complete(record: dict, out_dir: Path) -> bool:
    """``ok`` and every output file it names exists (paths are relative to ``out_dir``;
    outputs may be nested per task)."""
    if record.get("status") != "ok":
        return False
    return all((Path(out_dir) / p).is_file() for p in _output_paths(record.get("outputs", {})))


def _item_of(rec: dict) -> str:
    return str(rec.get("item", rec.get("key")))


@dataclass
class Plan:
    """What a run has to do, after reading the manifest of earlier runs."""

    todo: list[WorkItem]
    done_keys: set[str]  # record keys that are settled and must not be recomputed
    skipped: int  # settled records of items not in ``todo`` (+ inside todo items: see run)
    skipped_failed: int
    previous: dict[str, dict]  # key -> last record


def plan_run(items: Sequence[WorkItem], out_dir: Path, *, force: bool, retry_errors: bool) -> Plan:
    """Which items to (re)process: an item is settled when it holds all its records (a volume
    holds one per slice) and each one is complete-``ok`` or (without ``retry_errors``) ``error``.
    Inside an unsettled item, settled records are not recomputed either."""
    from zsdense.io import Manifest

    previous = {} if force else Manifest(Path(out_dir) / MANIFEST_NAME).load()
    by_item: dict[str, list[dict]] = {}
    for rec in previous.values():
        by_item.setdefault(_item_of(rec), []).append(rec)
    todo: list[WorkItem] = []
    done_keys: set[str] = set()
    skipped = skipped_failed = 0
    for it in items:
        recs = by_item.get(it.key, [])
        settled = []
        for r in recs:
            if record_complete(r, out_dir) or (r.get("status") == "error" and not retry_errors):
                settled.append(r)
        expected = max([int(r.get("item_records", 1) or 1) for r in recs] or [0])
        if recs and len(settled) == len(recs) and len(recs) >= expected:
            skipped += len(recs)
            skipped_failed += sum(r.get("status") != "ok" for r in recs)
            continue
        # an item-level error (unreadable file) is redone as a whole when the item is redone
        done_keys.update(
            r["key"] for r in settled if r.get("suffix", "") != "" or r.get("status") == "ok"
        )
        todo.append(it)
    return Plan(todo, done_keys, skipped, skipped_failed, previous)


def compact_manifest(path: Path, order: Sequence[str] = ()) -> int:
    """Rewrite the manifest atomically with the last record per key: records of items in
    ``order`` first (that order, records of one item in file order), then the rest in file order.
    Drops torn lines left by a crash. Returns the number of records."""
    from zsdense.io import Manifest, atomic_path
    from zsdense.io.writers import dumps_strict

    path = Path(path)
    if not path.exists():
        return 0
    last = Manifest(path).load()  # dict: first-insertion order of keys, last value wins
    rank = {k: i for i, k in enumerate(order)}
    keyed = list(last.items())
    keyed.sort(key=lambda kv: (rank.get(_item_of(kv[1]), len(rank)),))  # stable
    text = "".join(dumps_strict(rec) + "\n" for _k, rec in keyed)
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return len(keyed)


_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}(\.[^.]*)?$")


def clean_orphan_temp_files(out_dir: Path, max_age_s: float = ENGINE.orphan_temp_max_age_s) -> int:
    """Remove temporary files of atomic writes killed before their rename.

    A temp file (``.<name>.tmp-<pid>-<hex><ext>``) is an orphan when its writer process is gone,
    or when it is older than ``max_age_s`` (pids are reused). Returns how many were removed.
    """
    removed = 0
    now = time.time()
    for dirpath, _dirs, files in os.walk(out_dir):
        for name in files:
            m = _TMP_RE.match(name)
            if not m:
                continue
            p = Path(dirpath) / name
            pid = int(m.group(1))
            try:
                stale = not _pid_alive(pid) or now - p.stat().st_mtime > max_age_s
                if stale and pid != os.getpid():
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


# ---- records -----------------------------------------------------------------------------


def base_record(item: WorkItem, suffix: str, tasks: Sequence[TaskSpec], n_units: int) -> dict:
    return {
        "key": item.key + suffix,
        "item": item.key,
        "input": str(item.path),
        "rel": str(item.rel),
        "suffix": suffix,
        "item_records": n_units,
        "params": dict(item.params),
        "tasks": [t.name for t in tasks],
    }


def error_record(item, suffix, tasks, n_units, exc: BaseException, meta=None) -> dict:
    rec = base_record(item, suffix, tasks, n_units)
    rec.update(
        status="error",
        error=error_message(exc),
        error_type=type(exc).__name__,
        outputs={},
        scores={},
        meta={"image": meta or {}},
    )
    return rec


def _jsonable_meta(meta: dict) -> dict:
    from zsdense.io.writers import to_jsonable

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


def process_units(
    seg,
    units: Sequence[Unit],
    tasks: Sequence[TaskSpec],
    out_dir: Path,
    emit: Callable[[dict], None],
    add_time: Callable[[str, float], None] = lambda s, t: None,
    release: bool = True,
) -> None:
    """Run every task on ``units`` as one batch (one image at a time after a failure), write the
    outputs and ``emit`` one record per unit. Used by the local and the Ray runner."""
    out_dir = Path(out_dir)
    n = len(units)
    multi = len(tasks) > 1
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

    for i, unit in enumerate(units):
        it, suffix, ctx, n_units = unit[0], unit[1], unit[2], unit[3]
        meta = _jsonable_meta(ctx.meta)
        if i in failures:
            emit(error_record(it, suffix, tasks, n_units, failures[i], meta))
            if release:
                ctx.release()
            continue
        t0 = time.perf_counter()
        rec = base_record(it, suffix, tasks, n_units)
        try:
            outputs: dict = {}
            scores: dict = {}
            res_meta: dict = {}
            for task in tasks:
                stem = out_stem(out_dir, it, suffix, task.name if multi else None)
                got = task.write(results[task.name][i], ctx, stem, it.params) or {}
                if multi:
                    outputs[task.name] = got.get("outputs", {})
                    scores[task.name] = got.get("scores", {})
                    res_meta[task.name] = got.get("meta", {})
                else:
                    outputs = got.get("outputs", {})
                    scores = got.get("scores", {})
                    res_meta = got.get("meta", {})
        except Exception as exc:  # noqa: BLE001
            emit(error_record(it, suffix, tasks, n_units, exc, meta))
            if release:
                ctx.release()
            continue
        write_s = time.perf_counter() - t0
        add_time("write", write_s)
        rec.update(
            status="ok",
            error=None,
            outputs=_stringify_paths(outputs, out_dir),
            scores=_jsonable_meta(scores),
            meta={"image": meta, "result": _jsonable_meta(res_meta)},
            encoders=_encoder_counts(ctx),
            timing={"compute_s": round(task_secs[i], 4), "write_s": round(write_s, 4)},
        )
        emit(rec)
        if release:
            ctx.release()


# ---- the runner --------------------------------------------------------------------------


def run_batch(
    seg,
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
) -> RunSummary:
    """Run ``tasks`` over ``items``; see the module docstring for the guarantees.

    ``reader`` replaces :func:`read_units` (tests, custom sources); ``report`` writes
    ``report.html``; ``volume_maps`` stacks the float maps of each NIfTI volume back into
    ``<stem>[.<task>].map.nii.gz`` with the input's affine.
    """
    from zsdense.io import Manifest

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(tasks)
    if not tasks:
        raise ZsdenseError("no task to run")
    clean_orphan_temp_files(out_dir)
    manifest = Manifest(out_dir / MANIFEST_NAME)
    plan = plan_run(items, out_dir, force=force, retry_errors=retry_errors)
    summary = RunSummary(skipped=plan.skipped)
    summary.failed += plan.skipped_failed
    todo = plan.todo
    for key in plan.done_keys:  # settled records inside items that are redone
        rec = plan.previous.get(key, {})
        summary.skipped += 1
        if rec.get("status") != "ok":
            summary.failed += 1

    batch_size = batch_size or seg.config.batch_size
    needs_all = any(t.group == "all" for t in tasks)
    read_batch = max(len(todo), 1) if needs_all else batch_size
    stop = threading.Event()
    prog = _Progress(len(todo), progress, progress_interval)
    max_pixels = seg.config.max_pixels

    def emit(record: dict) -> None:
        manifest.append(record)
        summary.total += 1
        if record["status"] == "ok":
            summary.ok += 1
        else:
            summary.failed += 1
            summary.errors.append((record["key"], record.get("error")))
        if on_record is not None:
            on_record(record)

    def add_time(stage: str, seconds: float) -> None:
        summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds

    old_handler = None
    if handle_sigint and threading.current_thread() is threading.main_thread():

        def on_sigint(signum, frame):  # noqa: ARG001
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()
            print(
                "\nzsdense: interrupt received: finishing the current batch "
                "(press Ctrl-C again to abort now)",
                file=sys.stderr,
                flush=True,
            )

        old_handler = signal.signal(signal.SIGINT, on_sigint)

    pool = ThreadPoolExecutor(max_workers=max(1, read_workers), thread_name_prefix="zsdense-read")
    batches = [todo[i : i + read_batch] for i in range(0, len(todo), read_batch)]
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
                    emit(error_record(it, "", tasks, 1, got))
                    continue
                for suffix, ctx in got:
                    if it.key + suffix in plan.done_keys:
                        continue
                    units.append((it, suffix, ctx, len(got)))
            add_time("wait-read", time.perf_counter() - t_wait)
            futures[b] = []
            chunk = len(units) if needs_all else batch_size
            for c in range(0, len(units), max(chunk, 1)):
                process_units(
                    seg, units[c : c + chunk], tasks, out_dir, emit, add_time, release=False
                )
            for u in units:  # every head of every unit sharing a context is done
                u[2].release()
            processed_items += len(batch)
            prog.update(len(batch), summary.failed)
            if stop.is_set() and processed_items < len(todo):
                summary.interrupted = True
                summary.not_started = len(todo) - processed_items
                break
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        prog.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        finish_run(out_dir, items, summary, report=report, volume_maps=volume_maps)
        summary.wall_seconds = time.perf_counter() - t_start
    return summary


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
            from zsdense.engine.volumes import write_volume_maps

            summary.extra_outputs.extend(write_volume_maps(out_dir, items))
        except Exception as exc:  # noqa: BLE001
            print(f"zsdense: warning: volume maps not written: {exc}", file=sys.stderr)
    if report:
        try:
            from zsdense.engine.report import write_report

            summary.extra_outputs.append(write_report(out_dir))
        except Exception as exc:  # noqa: BLE001
            print(f"zsdense: warning: report.html not written: {exc}", file=sys.stderr)


def _timed_read(item: WorkItem, max_pixels: int | None, reader=None):
    t0 = time.perf_counter()
    got = _read(item, max_pixels, reader)
    return got, time.perf_counter() - t0


def load_records(out_dir: str | Path) -> list[dict]:
    """Every record of ``results.jsonl`` (last per key, file order)."""
    from zsdense.io import Manifest

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


def iter_chunks(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
