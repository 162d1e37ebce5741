"""``results.jsonl``: one strict-JSON line per processed image, safe against crashes.

Why: a batch run over thousands of files must be resumable. Each finished image appends one line
(flushed and fsynced) naming its input, status, outputs, scores, metadata and timing. On a rerun
:meth:`Manifest.load` gives the last record per key and :meth:`Manifest.is_complete` says whether
its outputs all exist, so completed inputs are skipped.

Keys: every record carries an explicit ``"key"`` field, ``input + suffix`` (the suffix names the
DICOM frame / NIfTI slice, ``""`` for single images). Records without one (written by hand) fall
back to ``record["input"] + record.get("suffix", "")``. The last record for a key wins.

Crash safety: a line is written with a single ``write`` call and fsynced. If the process died
mid-line, the file ends with a partial line; :meth:`load` ignores unparseable lines (and counts
them in ``skipped_lines``) and the next :meth:`append` first terminates that fragment with a
newline, so the new record is never glued onto it.

Output paths in ``record["outputs"]`` may be absolute or relative; relative ones are resolved
against the manifest's folder (the ``--out`` folder), which keeps a moved output tree valid.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from zsdense.config import ENGINE
from zsdense.errors import ConfigError, ZsdenseError
from zsdense.io.atomic import atomic_path, dumps_strict
from zsdense.io.inputs import strip_extension

MANIFEST_NAME = "results.jsonl"
REPORT_NAME = "report.html"
SETTINGS_NAME = "run_settings.json"  # what the outputs in the folder were made with


def record_key(record: Mapping[str, Any]) -> str:
    """The record's key: its ``"key"`` field, else ``input + suffix``."""
    key = record.get("key")
    if key is not None:
        return str(key)
    return str(record.get("input", "")) + str(record.get("suffix", "") or "")


def _output_paths(outputs: Any) -> Iterator[str]:
    if outputs is None:
        return
    if isinstance(outputs, (str, os.PathLike)):
        yield os.fspath(outputs)
    elif isinstance(outputs, Mapping):
        for v in outputs.values():
            yield from _output_paths(v)
    elif isinstance(outputs, (list, tuple)):
        for v in outputs:
            yield from _output_paths(v)


def is_complete(record: Mapping[str, Any], base: str | Path | None = None) -> bool:
    """True if the record's status is ``ok`` and every path in ``record["outputs"]`` exists.

    Relative output paths are resolved against ``base`` (the manifest folder).
    """
    if record.get("status") != "ok":
        return False
    for p in _output_paths(record.get("outputs")):
        path = Path(p)
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        if not path.is_file():
            return False
    return True


class Manifest:
    """Append-only JSON-lines file of per-image records (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped_lines = 0
        self._lock = threading.Lock()

    @property
    def base(self) -> Path:
        """Folder that relative output paths are resolved against."""
        return self.path.parent

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a strict JSON line, then flush and fsync.

        Non-finite floats become null; numpy values and paths are converted.
        """
        line = dumps_strict(record)
        if "\n" in line:  # cannot happen with json.dumps without indent; guard the format
            raise ValueError("record serialised to more than one line")
        data = (line + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # umask
            try:
                size = os.fstat(fd).st_size
                if size > 0:
                    with open(self.path, "rb") as f:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":  # a partial line left by a crash: close it
                            data = b"\n" + data
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)

    def records(self) -> Iterator[dict]:
        """Every parseable record in file order; unparseable lines are skipped and counted."""
        self.skipped_lines = 0
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for raw in f:
                text = raw.strip()
                if not text:
                    continue
                try:
                    rec = json.loads(text.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    self.skipped_lines += 1
                    continue
                if not isinstance(rec, dict):
                    self.skipped_lines += 1
                    continue
                yield rec

    def load(self) -> dict[str, dict]:
        """Last record per key (see :func:`record_key`)."""
        out: dict[str, dict] = {}
        for rec in self.records():
            out[record_key(rec)] = rec
        return out

    def is_complete(self, record: Mapping[str, Any]) -> bool:
        """``status == "ok"`` and every output exists (relative paths: against :attr:`base`)."""
        return is_complete(record, self.base)

    def completed_keys(self) -> set[str]:
        """Keys whose last record is complete: what a rerun can skip."""
        return {k for k, r in self.load().items() if self.is_complete(r)}


# ---- work items, records, resume ------------------------------------------------------


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


def error_message(exc: BaseException) -> str:
    """One-line message for the manifest: a ZsdenseError's own text, else ``Type: text``."""
    if isinstance(exc, ZsdenseError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def out_stem(out_dir: Path, item: WorkItem, suffix: str = "", task: str | None = None) -> Path:
    """``out/<rel without extension><suffix>[.<query id>][.<task>]``."""
    stem = item.stem if item.stem is not None else strip_extension(item.rel)
    parts = [p for p in stem.parts if p not in ("", ".", "..")] or ["image"]
    name = parts[-1] + suffix
    if "#" in item.key:
        name += "." + item.key.split("#", 1)[1]
    if task:
        name += "." + task
    return Path(out_dir).joinpath(*parts[:-1], name)


# ---- manifest bookkeeping ----------------------------------------------------------------


def record_complete(record: Mapping[str, Any], out_dir: str | Path) -> bool:
    """``ok`` and every output file it names exists (paths relative to ``out_dir``; outputs
    may be nested per task)."""
    return is_complete(record, out_dir)


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


def base_record(item: WorkItem, suffix: str, tasks: Sequence[str], n_units: int) -> dict:
    """The fields every record of one image (``item`` + ``suffix``) carries; ``tasks``: names."""
    return {
        "key": item.key + suffix,
        "item": item.key,
        "input": str(item.path),
        "rel": str(item.rel),
        "suffix": suffix,
        "item_records": n_units,
        "params": dict(item.params),
        "tasks": list(tasks),
    }


def error_record(
    item: WorkItem,
    suffix: str,
    tasks: Sequence[str],
    n_units: int,
    exc: BaseException,
    meta: dict | None = None,
) -> dict:
    """The record of an image (or a whole unreadable input) that failed."""
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


# ---- the settings a folder's outputs were made with -----------------------------------------


def _diff(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _diff(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def resume_options(task_settings: Mapping[str, Any]) -> str:
    """The threshold options of ``zsdense anomaly`` that give an anomaly task's recorded
    decision settings (what a resume must pass)."""
    parts = []
    if task_settings.get("threshold") is not None:
        parts.append(f"--threshold {task_settings['threshold']!r}")
    if task_settings.get("image_threshold") is not None:
        parts.append(f"--image-threshold {task_settings['image_threshold']!r}")
    cal = task_settings.get("calibrate_with")
    if cal:
        for c in cal if isinstance(cal, (list, tuple)) else [cal]:
            parts.append(f"--calibrate-with {c}")
        if task_settings.get("calibrate_percentile") is not None:
            parts.append(f"--calibrate-percentile {task_settings['calibrate_percentile']!r}")
    return " ".join(parts)


def _decided_hint(path: Path) -> str:
    """What to pass to continue a folder whose masks ``zsdense decide`` re-decided."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    decided = old.get("decided") if isinstance(old, Mapping) else None
    if not isinstance(decided, Mapping):
        return ""
    task = (old.get("tasks") or {}).get(decided.get("task"))
    if not isinstance(task, Mapping):
        return ""
    opts = resume_options(task) or "no threshold option"
    thr_file = path.parent / "thresholds.json"
    alt = (
        f" (or --thresholds {thr_file})"
        if thr_file.is_file() and not task.get("calibrate_with")
        else ""
    )
    return (
        f"Its masks were re-decided by `zsdense decide`: to add inputs with the same decisions "
        f"pass {opts}{alt}; to change them, run `zsdense decide` again. "
    )


def check_settings(
    out_dir: str | Path,
    settings: Mapping[str, Any],
    *,
    force: bool,
    record: bool = True,
    partial: Sequence[str] = ("weights",),
    informational: Sequence[str] = ("machine", "decided"),
) -> None:
    """Record ``settings`` in ``out_dir/run_settings.json``, or refuse a rerun that would mix them.

    A rerun with the same settings resumes; with other settings it is a ConfigError naming what
    changed (the old outputs would otherwise stay as if made with the new ones), unless ``force``
    (everything is recomputed and the new settings recorded). ``record=False`` only checks.
    Keys in ``partial`` (the weight hashes, known only once the models are loaded) are compared
    only when both records hold them; keys in ``informational`` (the machine that ran, the
    history of ``zsdense decide``) are recorded, never compared.
    """
    path = Path(out_dir) / SETTINGS_NAME
    new = json.loads(dumps_strict(settings))
    if path.exists() and not force:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is not None:
            old = {
                k: v
                for k, v in old.items()
                if k not in informational and (k not in partial or k in new)
            }
        cmp_new = {
            k: v
            for k, v in new.items()
            if k not in informational and (k not in partial or (old and k in old))
        }
        if old is not None and old != cmp_new:
            pending = old.get("decide_pending")
            if isinstance(pending, Mapping) and not new.get("decide_pending"):
                again = pending.get("command") or "zsdense decide OUT ..."
                raise ConfigError(
                    f"a `zsdense decide` on {out_dir} was interrupted: its masks may be half "
                    f"re-decided. Run it again first: {again}"
                )
            changes = _diff(old, cmp_new)
            shown = "; ".join(changes[:6]) + (
                f"; and {len(changes) - 6} more" if len(changes) > 6 else ""
            )
            raise ConfigError(
                f"{out_dir} holds outputs made with other settings ({shown}). "
                + (_decided_hint(path) if any("threshold" in c for c in changes) else "")
                + "Rerun with --force to recompute everything with the new settings, "
                "or choose another --out"
            )
        if old is not None:
            return
    if not record:
        return
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n", encoding="utf-8")
