"""One batch of units through the task heads: :func:`compute_units` runs every task on the
batch (one image at a time after a failure, so one bad image only fails itself) and
:func:`write_units` writes each unit's outputs and emits its manifest record (an error record
for a unit whose task or write failed). A unit is one image of an input: ``(WorkItem, record
suffix, ImageContext, number of units of the item)``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from zsdense.context import ImageContext
from zsdense.engine.report_view import store_view
from zsdense.engine.specs import TaskSpec
from zsdense.io.instances import manifest_instances
from zsdense.io.manifest import base_record, error_record, out_stem
from zsdense.io.writers import to_jsonable

log = logging.getLogger("zsdense")


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
        picture = ctx.known_u8  # the same pixels as the floats give, without converting them
        store_view(out_dir, key, task_name, rel, amap, ctx.image if picture is None else picture)
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


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass
