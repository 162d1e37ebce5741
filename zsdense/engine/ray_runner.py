"""Ray Data engine: the same runs as the local engine, spread over a Ray cluster.

Pipeline: file listing (driver) → ``flat_map(decode_item)`` Ray tasks (one row per image: DICOM
frame, NIfTI slice, TIFF page, or an error row) → ``map_batches(SegmentBatch,
compute=ActorPoolStrategy(size=workers), num_gpus=gpus_per_worker)``: each actor holds one
runtime and its heads, computes a batch, writes the outputs atomically itself and returns one
manifest record per image → the driver appends each record to ``results.jsonl`` as it arrives.
Resume, ``--force`` / ``--retry-errors``, compaction, report and volume maps are the local
engine's (:func:`zsdense.engine.local.plan_run` / ``finish_run``), so the two engines are
interchangeable on one output folder.

Ray stays optional: it is imported only here, and a missing Ray is a DependencyError.
:class:`SegmentBatch` and :func:`decode_item` are plain Python, unit-tested without Ray.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np

from zsdense.config import DEFAULT_BATCH_SIZE, MAX_PIXELS
from zsdense.context import ImageContext
from zsdense.engine.inputs import read_units
from zsdense.engine.local import (
    _Progress,
    finish_run,
    image_batches,
    open_run,
    prepare_out_dir,
    run_settings,
)
from zsdense.engine.specs import META_KEYS, build_task_specs, parse_task_option
from zsdense.engine.summary import RunSummary
from zsdense.engine.units import _jsonable_meta, process_units
from zsdense.errors import ConfigError, DependencyError
from zsdense.io.manifest import (
    Manifest,
    Plan,
    WorkItem,
    check_settings,
    error_message,
    error_record,
    plan_run,
)
from zsdense.io.progress import Progress
from zsdense.io.writers import dumps_strict
from zsdense.options import options_for
from zsdense.runtime import Runtime, runtime_of
from zsdense.tasks import anomaly_methods


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise DependencyError("ray", "ray", "--engine ray") from exc
    return ray


# ---- rows ----------------------------------------------------------------------------------


def item_row(item: WorkItem, done_suffixes: Sequence[str] = ()) -> dict:
    """A work item as a plain row (strings only: safe for Arrow and pickling)."""
    return {
        "key": item.key,
        "path": str(item.path),
        "abspath": str(Path(item.path).resolve()),
        "rel": str(item.rel),
        "stem": "" if item.stem is None else str(item.stem),
        "params": json.dumps(item.params),
        "done": json.dumps(list(done_suffixes)),
    }


def row_item(row: dict) -> WorkItem:
    stem = str(row.get("stem") or "")
    return WorkItem(
        key=str(row["key"]),
        path=Path(str(row["path"])),
        rel=PurePosixPath(str(row["rel"])),
        params=json.loads(str(row.get("params") or "{}")),
        stem=PurePosixPath(stem) if stem else None,
    )


def _members(row: dict) -> list[dict]:
    """The item rows sharing this row's image (queries on one image), or the row itself."""
    got = row.get("members")
    if got:
        return [dict(m) for m in json.loads(str(got))]
    return [{k: row[k] for k in row if k != "members"}]


def decode_item(row: dict, max_pixels: int | None = None) -> list[dict]:
    """One image row -> one row per decoded image (float32 bytes + shape + meta JSON, and the
    items that need it in ``members``) or one error row per item. The file is read once however
    many items (queries) it serves."""
    item = row_item(row)
    base = {k: row[k] for k in ("key", "path", "rel", "stem", "params")}
    members = _members(row)
    try:  # workers may run in another folder: read from the absolute path
        units = read_units(row_item(dict(row, path=row.get("abspath") or row["path"])), max_pixels)
    except Exception as exc:  # noqa: BLE001 - recorded, never raised
        msg = error_message(exc)
        if row.get("abspath") and row["abspath"] != row["path"]:  # name it as the user did
            msg = msg.replace(str(row["abspath"]), str(row["path"]))
        err = dict(suffix="", n_units=1, image=b"", shape="", meta="{}", members="", error=msg)
        err["error_type"] = type(exc).__name__
        return [
            dict({k: m[k] for k in ("key", "path", "rel", "stem", "params")}, **err)
            for m in members
        ]
    out = []
    for suffix, ctx in units:
        need = [m for m in members if suffix not in set(json.loads(str(m.get("done") or "[]")))]
        if not need:
            continue
        img = np.ascontiguousarray(ctx.image, dtype=np.float32)
        if ctx.meta.get("source") is not None:
            ctx.meta["source"] = str(item.path)  # as the user gave it, like the local engine
        out.append(
            dict(
                base,
                suffix=suffix,
                n_units=len(units),
                image=img.tobytes(),
                shape=json.dumps(list(img.shape)),
                meta=json.dumps(_jsonable(ctx.meta)),
                members=json.dumps(need),
                error="",
                error_type="",
            )
        )
    return out


def _jsonable(meta: dict) -> dict:

    return _jsonable_meta(meta)


class _RowError(Exception):
    """An error carried by a decode row (keeps the original type name in the record)."""

    def __init__(self, message: str, type_name: str):
        super().__init__(message)
        self.type_name = type_name


class SegmentBatch:
    """The per-batch callable of ``map_batches``: holds a runtime and the task heads.

    ``__call__`` takes a column batch (``dict[str, np.ndarray]``, as Ray's numpy batch format
    gives it) of decoded rows, runs the heads on the images (one batch; one by one after a
    failure), writes outputs under ``out_dir`` and returns ``{"record": [JSON text, ...]}``.
    """

    def __init__(
        self,
        seg_kwargs: dict,
        task_cfgs: list,
        out_dir: str,
        fmt: str = "tiff",
        overlay: bool = True,
        rt: Any = None,
        torch_threads: int | None = None,
        expect_precision: str | None = None,
    ):
        if torch_threads:  # CPU actors sharing a machine: don't oversubscribe its cores
            import torch

            torch.set_num_threads(int(torch_threads))

        rt = runtime_of(rt) if rt is not None else Runtime(**seg_kwargs)
        if expect_precision is not None and rt.precision != expect_precision:
            # a mixed cluster: this worker would resolve `auto` otherwise than the driver did
            raise ConfigError(
                f"this Ray worker runs precision {rt.precision} ({rt.precision_record()['reason']})"
                f" but the run records {expect_precision}: set --precision explicitly so every "
                "worker runs the same"
            )
        self.rt = rt
        self.tasks = build_task_specs(rt, task_cfgs, fmt=fmt, overlay=overlay)
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        records: list[dict] = []
        units = []
        for i in range(n):
            row = {k: _item(v, i) for k, v in batch.items()}
            item = row_item(row)
            n_units = int(row.get("n_units") or 1)
            if row.get("error"):
                exc = _RowError(str(row["error"]), str(row.get("error_type") or "Error"))
                rec = error_record(
                    item, str(row.get("suffix") or ""), [t.name for t in self.tasks], n_units, exc
                )
                rec["error"] = str(row["error"])
                rec["error_type"] = exc.type_name
                records.append(rec)
                continue
            shape = tuple(json.loads(str(row["shape"])))
            img = np.frombuffer(bytes(row["image"]), dtype=np.float32).reshape(shape).copy()
            ctx = ImageContext(image=img, meta=json.loads(str(row["meta"])))
            for member in _members(row):  # queries on one image share its context
                units.append((row_item(member), str(row.get("suffix") or ""), ctx, n_units))
        if units:
            process_units(units, self.tasks, self.out_dir, records.append)
        return {"record": np.array([dumps_strict(r) for r in records], dtype=object)}


def _item(v: Any, i: int) -> Any:
    x = v[i]
    if isinstance(x, np.generic):
        return x.item()
    return x


# ---- the driver ----------------------------------------------------------------------------


def run_ray(
    items: Sequence[WorkItem],
    out_dir: str | Path,
    task_cfgs: Sequence[dict | str],
    *,
    seg_kwargs: dict | None = None,
    fmt: str = "tiff",
    overlay: bool = True,
    force: bool = False,
    retry_errors: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
    address: str | None = None,
    progress: bool = True,
    report: bool = True,
    volume_maps: bool = False,
    max_pixels: int | None = None,
) -> RunSummary:
    """Run ``task_cfgs`` (task configs, see :mod:`zsdense.engine.specs`) over ``items`` on
    Ray; same manifest, outputs, resume rules and summary as :func:`run_batch`."""
    ray = _require_ray()
    t_start = time.perf_counter()
    cfgs = _driver_checked_cfgs(task_cfgs)
    seg_kwargs = dict(seg_kwargs or {})
    if max_pixels is None:
        max_pixels = seg_kwargs.get("max_pixels", MAX_PIXELS)
    out_dir = prepare_out_dir(Path(out_dir).resolve())
    settings, expect_precision = _driver_settings(seg_kwargs, cfgs, fmt, overlay, gpus_per_worker)
    check_settings(out_dir, settings, force=force)
    plan = plan_run(items, out_dir, force=force, retry_errors=retry_errors)
    manifest, summary = open_run(out_dir, items, plan, [str(c.get("task")) for c in cfgs])
    rows = _image_rows(plan)
    n_items = len(plan.todo)

    if rows:
        cpus_per_worker, torch_threads = _start_ray(ray, address, workers, cpus_per_worker)
        prog = _Progress(n_items, progress)
        seen_items: set[str] = set()
        ds = _dataset(
            ray,
            rows,
            max_pixels=max_pixels,
            actor_kwargs={
                "seg_kwargs": seg_kwargs,
                "task_cfgs": cfgs,
                "out_dir": str(out_dir),
                "fmt": fmt,
                "overlay": overlay,
                "torch_threads": None if gpus_per_worker else torch_threads,
                "expect_precision": expect_precision,
            },
            batch_size=batch_size,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
        )
        old_term = _sigterm_as_interrupt(summary)
        try:
            _append_records(ds.iter_rows(), manifest, summary, prog, seen_items)
        except KeyboardInterrupt:
            summary.interrupted = True
            summary.not_started = n_items - len(seen_items)
            print("\nzsdense: interrupted; records received so far are saved", file=sys.stderr)
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            prog.close()
            finish_run(out_dir, items, summary, report=report, volume_maps=volume_maps)
    else:
        finish_run(out_dir, items, summary, report=report, volume_maps=volume_maps)
    summary.wall_seconds = time.perf_counter() - t_start
    summary.stage_seconds["ray"] = summary.wall_seconds
    return summary


# ---- the driver's steps, in the order they run ----------------------------------------------


def _driver_checked_cfgs(task_cfgs: Sequence[dict | str]) -> list[dict]:
    """The task configs as dicts, validated on the driver before Ray starts: a preset that
    scores images against each other needs the whole set in one process (the local engine)."""
    cfgs = [parse_task_option(c) if isinstance(c, str) else dict(c) for c in task_cfgs]
    for c in cfgs:  # validated here, on the driver, before Ray starts
        if str(c.get("task")) == "anomaly":
            opts = options_for("anomaly", {k: v for k, v in c.items() if k not in META_KEYS})
            if anomaly_methods.scorer(opts).group == "all":
                raise ConfigError(
                    f"preset {opts.preset!r} scores images against each other: use --engine local"
                )
    return cfgs


def _driver_settings(
    seg_kwargs: dict, cfgs: list[dict], fmt: str, overlay: bool, gpus_per_worker: float
) -> tuple[dict, str | None]:
    """The run's settings record, made on the driver like the local engine's, and the
    precision every worker must run (None: each GPU worker resolves ``auto`` for its card)."""
    # the driver validates the heads and records the settings like the local engine (no model
    # loads here: specs are lazy); the actors build their own
    driver_rt = Runtime(**seg_kwargs)
    settings = run_settings(driver_rt, build_task_specs(driver_rt, cfgs, fmt=fmt, overlay=overlay))
    expect_precision = settings["precision"]  # CPU workers must resolve `auto` as the driver did
    if gpus_per_worker and driver_rt.config.precision == "auto":
        # the driver may have no GPU: each GPU worker resolves `auto` for its own card
        expect_precision = None
        settings["precision"] = "auto (resolved per GPU worker)"
    return settings, expect_precision


def _image_rows(plan: Plan) -> list[dict]:
    """One row per image to do, carrying the items (queries) that need it in ``members``, each
    with the record suffixes an earlier run settled: one row, one decode."""
    rows = []
    for group in image_batches(plan.todo, 1):  # the queries of one image: one row, one decode
        members = []
        for it in group:
            done = [
                k[len(it.key) :]
                for k in plan.done_keys
                if k.startswith(it.key) and plan.previous.get(k, {}).get("item") == it.key
            ]
            members.append(item_row(it, done))
        rows.append(dict(members[0], members=json.dumps(members)))
    return rows


def _start_ray(
    ray, address: str | None, workers: int, cpus_per_worker: float | None
) -> tuple[float, int]:
    """Join (or start) the cluster, quiet Ray Data's progress output and share the CPUs out:
    returns (CPUs per actor, torch threads per CPU actor)."""
    if not ray.is_initialized():
        init_kw: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "configure_logging": False,
        }
        if address:
            init_kw["address"] = address
        ray.init(**init_kw)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if cpus_per_worker is None:
        # leave at least one CPU for the decode tasks, or the pipeline cannot progress
        cpus_per_worker = max(0.25, min(1.0, (cluster_cpus - 1.0) / workers))
    torch_threads = max(1, int(cluster_cpus // workers))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ctx.print_on_execution_start = False
    except AttributeError:  # pragma: no cover - older Ray
        pass
    return cpus_per_worker, torch_threads


def _dataset(
    ray,
    rows: list[dict],
    *,
    max_pixels: int | None,
    actor_kwargs: dict,
    batch_size: int,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
):
    """The lazy pipeline: rows → ``decode_item`` tasks → a pool of :class:`SegmentBatch`
    actors (built with ``actor_kwargs``) → one record per image."""
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * workers)))
    ds = ds.flat_map(decode_item, fn_kwargs={"max_pixels": max_pixels})
    return ds.map_batches(
        SegmentBatch,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=workers),
        num_gpus=gpus_per_worker or None,
        num_cpus=cpus_per_worker,
    )


def _sigterm_as_interrupt(summary: RunSummary):
    """On the main thread: SIGTERM stops the run like Ctrl-C (exit 143). Returns the handler it
    replaces (None elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):  # noqa: ARG001 - SIGTERM stops like Ctrl-C (exit 143)
        summary.stop_signal = int(signum)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, on_term)


def _append_records(
    rows: Iterable[dict],
    manifest: Manifest,
    summary: RunSummary,
    prog: Progress,
    seen_items: set[str],
) -> None:
    """Append each record the actors return to the manifest as it arrives and count it; the
    progress line counts items (``seen_items``), not images."""
    for row in rows:
        rec = json.loads(str(row["record"]))
        manifest.append(rec)
        summary.total += 1
        if rec.get("status") == "ok":
            summary.ok += 1
            summary.fallbacks += bool(rec.get("fallback"))
        else:
            summary.failed += 1
            summary.errors.append((rec["key"], rec.get("error")))
        if rec.get("item") not in seen_items:
            seen_items.add(rec.get("item"))
            prog.update(1, summary.failed)


def ray_available() -> bool:
    """True if Ray Data can be imported (tests skip otherwise)."""
    try:
        _require_ray()
        return True
    except DependencyError:
        return False


__all__ = ["SegmentBatch", "decode_item", "item_row", "row_item", "run_ray", "ray_available"]
