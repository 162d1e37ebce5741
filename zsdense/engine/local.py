"""Local batch runner: read → batch → heads → atomic writes → one manifest line per image.

Guarantees (what a demanding batch user needs):
- every input ends as an ``ok`` or an ``error`` line in ``results.jsonl``, appended and fsynced
  as soon as the input finishes; a broken file never stops the run;
- outputs are written atomically before their manifest line, so a rerun after a crash skips
  exactly the inputs whose line is ``ok`` and whose outputs all exist (``--force`` redoes all,
  ``--retry-errors`` redoes the failed ones);
- a failing batch is retried one image at a time (this also catches CUDA out-of-memory) so one
  bad image only fails itself;
- SIGINT finishes the current batch, writes the manifest, and stops with a resume hint;
- decoding of the next batch runs in background threads while the encoders work.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Sequence

from zsdense.context import ImageContext
from zsdense.errors import ZsdenseError

log = logging.getLogger("zsdense")

MANIFEST_NAME = "results.jsonl"


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: an image file (and, for referring queries, the query's params)."""

    key: str  # unique manifest key: the mirrored relative path (+ "#id" for queries)
    path: Path
    rel: PurePosixPath  # relative path that is mirrored under --out
    params: dict = field(default_factory=dict, hash=False, compare=False)


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
    total: int = 0  # manifest records produced or found (images; frames count separately)
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already complete from an earlier run
    interrupted: bool = False
    stage_seconds: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)  # (key, message)

    @property
    def exit_code(self) -> int:
        """0 all ok, 3 some inputs failed, 130 interrupted."""
        if self.interrupted:
            return 130
        return 3 if self.failed else 0

    def format(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.stage_seconds.items()))
        text = (
            f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped (already complete)"
            + (f"; time: {stages}" if stages else "")
        )
        if self.interrupted:
            text += "\ninterrupted: rerun the same command to resume where it stopped"
        return text


# ---- inputs ------------------------------------------------------------------------------


def items_from_data(data: Sequence[str | Path]) -> list[WorkItem]:
    """Files, folders (recursed) and globs -> work items whose keys mirror the input tree."""
    from zsdense.io import list_inputs

    return [WorkItem(key=str(it.rel), path=it.path, rel=it.rel) for it in list_inputs(data)]


def _read(item: WorkItem, max_pixels: int) -> list[tuple[str, ImageContext]] | Exception:
    """Decode an item into (record suffix, context) pairs; exceptions are returned, not raised."""
    from zsdense.io import read_image_records

    try:
        records = read_image_records(item.path, max_pixels=max_pixels)
        out = []
        for rec in records:
            meta = dict(rec.meta)
            out.append((rec.suffix, ImageContext(image=rec.image, meta=meta)))
        if not out:
            raise ZsdenseError(f"{item.path}: the file holds no image")
        return out
    except Exception as exc:  # noqa: BLE001 - isolated per input, recorded in the manifest
        return exc


def _message(exc: BaseException) -> str:
    if isinstance(exc, ZsdenseError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def out_stem(out_dir: Path, item: WorkItem, suffix: str = "", task: str | None = None) -> Path:
    """``out/<rel without extension><suffix>[.<task>]``; query ids are added by the item key."""
    rel = item.rel
    stem = rel.name.rsplit(".", 1)[0] if "." in rel.name else rel.name
    name = stem + suffix
    if "#" in item.key:
        name += "." + item.key.split("#", 1)[1]
    if task:
        name += "." + task
    return out_dir.joinpath(*rel.parent.parts, name)


# ---- the runner --------------------------------------------------------------------------


class _Progress:
    """tqdm on a terminal, periodic log lines otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.t0, self.last = total, 0, time.monotonic(), 0.0
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last > 10 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(
                f"zsdense: {self.done}/{self.total} inputs, {rate:.2f}/s, ETA {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _output_paths(outputs) -> list[str]:
    if isinstance(outputs, dict):
        return [p for v in outputs.values() for p in _output_paths(v)]
    return [outputs] if isinstance(outputs, str) else []


def record_complete(record: dict, out_dir: Path) -> bool:
    """``ok`` and every output file it names exists (paths are relative to ``out_dir``;
    outputs may be nested per task)."""
    if record.get("status") != "ok":
        return False
    return all((out_dir / p).is_file() for p in _output_paths(record.get("outputs", {})))


def _item_done(records: list[dict], out_dir: Path) -> bool:
    return bool(records) and all(record_complete(r, out_dir) for r in records)


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
    read_workers: int = 2,
    on_record: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Run ``tasks`` over ``items``; see the module docstring for the guarantees."""
    from zsdense.io import Manifest

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out_dir / MANIFEST_NAME)
    previous = manifest.load() if not force else {}
    by_item: dict[str, list[dict]] = {}
    for rec in previous.values():
        by_item.setdefault(rec.get("item", rec.get("key")), []).append(rec)

    summary = RunSummary()
    todo: list[WorkItem] = []
    for it in items:
        recs = by_item.get(it.key, [])
        if recs and not force:
            if _item_done(recs, out_dir):
                summary.skipped += len(recs)
                continue
            if not retry_errors and all(r.get("status") == "error" for r in recs):
                summary.skipped += len(recs)
                summary.failed += len(recs)
                continue
        todo.append(it)

    batch_size = batch_size or seg.config.batch_size
    multi = len(tasks) > 1
    needs_all = any(t.group == "all" for t in tasks)
    if needs_all:
        batch_size = max(len(todo), 1)
    stop = threading.Event()
    prog = _Progress(len(todo), progress)

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

    def base_record(item: WorkItem, suffix: str) -> dict:
        return {
            "key": item.key + suffix,
            "item": item.key,
            "input": str(item.path),
            "rel": str(item.rel),
            "suffix": suffix,
            "params": dict(item.params),
            "tasks": [t.name for t in tasks],
        }

    def error_record(item: WorkItem, suffix: str, exc: BaseException, meta=None) -> dict:
        rec = base_record(item, suffix)
        rec.update(status="error", error=_message(exc), outputs={}, scores={}, meta=meta or {})
        return rec

    def add_time(stage: str, seconds: float) -> None:
        summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds

    old_handler = None
    if threading.current_thread() is threading.main_thread():

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
    try:
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        max_pixels = seg.config.max_pixels
        futures: list[list[Future]] = []

        def submit(b: int) -> None:
            if b < len(batches):
                futures.append([pool.submit(_timed_read, it, max_pixels) for it in batches[b]])

        submit(0)
        for b, batch in enumerate(batches):
            submit(b + 1)  # decode the next batch while this one computes
            units: list[tuple[WorkItem, str, ImageContext]] = []
            for it, fut in zip(batch, futures[b]):
                got, secs = fut.result()
                add_time("read", secs)
                if isinstance(got, Exception):
                    emit(error_record(it, "", got))
                    prog.update()
                    continue
                for suffix, ctx in got:
                    units.append((it, suffix, ctx))
            futures[b] = []
            if units:
                _process_units(seg, units, tasks, out_dir, multi, emit, error_record, base_record,
                               add_time)
            prog.update(len({id(u[0]) for u in units}))
            if stop.is_set():
                summary.interrupted = True
                break
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        prog.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    return summary


def _timed_read(item: WorkItem, max_pixels: int):
    t0 = time.perf_counter()
    got = _read(item, max_pixels)
    return got, time.perf_counter() - t0


def _process_units(seg, units, tasks, out_dir, multi, emit, error_record, base_record, add_time):
    """Run every task on the batch (falling back to one image at a time on failure), write."""
    n = len(units)
    results: dict[str, list[Any]] = {}
    failures: dict[int, BaseException] = {}
    task_secs = [0.0] * n
    for task in tasks:
        ctxs = [u[2] for u in units]
        params = [u[0].params for u in units]
        t0 = time.perf_counter()
        try:
            res = task.run(ctxs, params)
            if len(res) != n:
                raise RuntimeError(f"task {task.name} returned {len(res)} results for {n} inputs")
            results[task.name] = list(res)
        except Exception as exc:  # noqa: BLE001
            if task.group == "all" or n == 1:
                # a set-level method cannot be split: every image of the set fails with it
                for i in range(n):
                    failures.setdefault(i, exc)
                results[task.name] = [None] * n
            else:
                _free_accelerator_memory()
                res_one: list[Any] = []
                for i, (it, _s, ctx) in enumerate(units):
                    try:
                        res_one.append(task.run([ctx], [it.params])[0])
                    except Exception as exc1:  # noqa: BLE001
                        failures.setdefault(i, exc1)
                        res_one.append(None)
                        _free_accelerator_memory()
                results[task.name] = res_one
        dt = time.perf_counter() - t0
        add_time(task.name, dt)
        for i in range(n):
            task_secs[i] += dt / n

    for i, (it, suffix, ctx) in enumerate(units):
        meta = _jsonable_meta(ctx.meta)
        if i in failures:
            emit(error_record(it, suffix, failures[i], meta))
            continue
        t0 = time.perf_counter()
        rec = base_record(it, suffix)
        try:
            outputs: dict = {}
            scores: dict = {}
            res_meta: dict = {}
            for task in tasks:
                stem = out_stem(out_dir, it, suffix, task.name if multi else None)
                got = task.write(results[task.name][i], ctx, stem, it.params)
                if multi:
                    outputs[task.name] = got.get("outputs", {})
                    scores[task.name] = got.get("scores", {})
                    res_meta[task.name] = got.get("meta", {})
                else:
                    outputs, scores, res_meta = (
                        got.get("outputs", {}),
                        got.get("scores", {}),
                        got.get("meta", {}),
                    )
        except Exception as exc:  # noqa: BLE001
            emit(error_record(it, suffix, exc, meta))
            continue
        write_s = time.perf_counter() - t0
        add_time("write", write_s)
        rec.update(
            status="ok",
            error=None,
            outputs=_stringify_paths(outputs, out_dir),
            scores=scores,
            meta={"image": meta, "result": res_meta},
            timing={"compute_s": round(task_secs[i], 4), "write_s": round(write_s, 4)},
        )
        emit(rec)
        ctx.release()


def _stringify_paths(obj, out_dir: Path):
    """Output paths relative to the output folder (POSIX), so the folder can move."""
    if isinstance(obj, dict):
        return {k: _stringify_paths(v, out_dir) for k, v in obj.items()}
    if isinstance(obj, (str, Path)):
        p = Path(obj)
        try:
            return p.relative_to(out_dir).as_posix()
        except ValueError:
            return p.as_posix()
    return obj


def _jsonable_meta(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x)
                      for x in v]
        else:
            out[k] = str(v)
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
