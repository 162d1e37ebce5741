"""``--json``: the end-of-run summary as one JSON object on stdout, for scripts.

Every run command (anomaly, openvocab, refer, run; decide has its own) prints, with ``--json``::

    {"command": "anomaly", "out": "...", "exit_code": 0, "inputs": 15, "records": 15,
     "ok": 14, "failed": 1, "skipped": 0, "not_processed": 0, "interrupted": false,
     "not_started": 0, "wall_seconds": 12.3, "stage_seconds": {...},
     "failures": [{"key": "...", "error": "...", "earlier_run": false}],
     "outputs": {"results": ".../results.jsonl", "report": ".../report.html", "extra": [...]},
     "thresholds": {"anomaly": {"threshold": 0.5, "threshold_source": "default",
                                "image_threshold": null, "image_threshold_source": null}}}

The human summary still goes to stderr (unless ``--quiet``), so stdout holds only the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JSON_META_KEY = "zsdense.json_summary"


def _thresholds(out_dir: Path) -> dict[str, Any]:
    """The decisions of the run's anomaly task(s), from its settings and first ok record."""
    try:
        settings = json.loads((out_dir / "run_settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    tasks = settings.get("tasks") or {}
    names = [n for n, t in tasks.items() if isinstance(t, dict) and t.get("task") == "anomaly"]
    if not names:
        return {}
    from zsdense.io.manifest import MANIFEST_NAME, Manifest

    multi = len(tasks) > 1
    out: dict[str, Any] = {}
    for rec in Manifest(out_dir / MANIFEST_NAME).records():
        if rec.get("status") != "ok":
            continue
        for name in names:
            if name in out:
                continue
            res = (rec.get("meta") or {}).get("result") or {}
            res = res.get(name, {}) if multi else res
            if "threshold" in res:
                out[name] = {
                    k: res.get(k)
                    for k in (
                        "threshold",
                        "threshold_source",
                        "image_threshold",
                        "image_threshold_source",
                    )
                }
        if len(out) == len(names):
            break
    return out


def summary_json(summary: Any, out_dir: str | Path, command: str | None) -> dict[str, Any]:
    """The JSON object of a :class:`~zsdense.engine.local.RunSummary` (see the docstring)."""
    out_dir = Path(out_dir)
    failures = [{"key": k, "error": m, "earlier_run": False} for k, m in summary.errors]
    failures += [
        {"key": k, "error": m, "earlier_run": True}
        for k, m in getattr(summary, "previous_errors", []) or []
    ]
    extra = [str(p) for p in getattr(summary, "extra_outputs", []) or []]
    report = next((p for p in extra if p.endswith("report.html")), None)
    return {
        "command": command,
        "out": str(out_dir),
        "exit_code": summary.exit_code,
        "inputs": summary.inputs,
        "records": summary.total + summary.skipped,
        "ok": summary.ok,
        "failed": summary.failed,
        "skipped": summary.skipped,
        "not_processed": summary.not_processed,
        "interrupted": summary.interrupted,
        "not_started": summary.not_started,
        "wall_seconds": round(summary.wall_seconds, 3),
        "stage_seconds": {k: round(v, 3) for k, v in summary.stage_seconds.items()},
        "failures": failures,
        "outputs": {
            "results": str(out_dir / "results.jsonl"),
            "report": report,
            "extra": [p for p in extra if p != report],
        },
        "thresholds": _thresholds(out_dir),
    }


def print_json_summary(summary: Any, out_dir: str | Path, command: str | None) -> None:
    import click

    click.echo(json.dumps(summary_json(summary, out_dir, command), indent=1, default=str))
