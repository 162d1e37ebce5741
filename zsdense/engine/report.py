"""``report.html``: a static page over the whole manifest, for a person to look at a run.

It opens from the file system (no server, no network, no external scripts or styles):

- the failures, named, with the rerun hint (``--retry-errors``);
- for anomaly runs, a *decide* section per anomaly task (:mod:`zsdense.engine.report_decide`):
  score histogram (good/other split when the inputs sit in ``good/`` folders), the thresholds
  in force and where they came from (calibration details, an earlier ``zsdense decide``), and
  per image original | map | mask | overlay under a pixel-threshold and an image-threshold
  slider that recompute masks, pixel counts and labels in the page, with the ``zsdense decide``
  command that applies the chosen values (maps embedded at reduced size: see
  :mod:`zsdense.engine.report_view` for the bytes per image);
- one row per manifest record with its overlay thumbnail(s) (relative links to the overlay
  JPEGs, labelled per task when several tasks ran), status, scores and error message. Failures
  come first; clicking a column header sorts by it (inline JavaScript, numeric where the column
  is numeric).

Rewritten atomically at the end of every run and by ``zsdense decide``.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any, Iterable

from zsdense.engine import report_decide
from zsdense.io.manifest import MANIFEST_NAME, REPORT_NAME, SETTINGS_NAME, Manifest
from zsdense.io.writers import atomic_path

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px}
th{background:#eee;cursor:pointer;position:sticky;top:0;user-select:none}
th.sorted-asc::after{content:" \\25B2"} th.sorted-desc::after{content:" \\25BC"}
p.banner{background:#a00;color:#fff;font-weight:bold;padding:8px 12px}
tr.error{background:#fde8e8} td.err{color:#a00;max-width:40em;word-break:break-word}
img{max-width:160px;max-height:160px;display:block}
.summary span{margin-right:1.5em} .num{text-align:right;font-variant-numeric:tabular-nums}
figure.thumb{margin:0 0 4px 0} figure.thumb figcaption{font-size:11px;color:#555}
section.failures{border:1px solid #a00;padding:4px 12px;margin:1em 0;background:#fff5f5}
section.failures li{word-break:break-word}
"""

_SCRIPT = """
(function(){
  var table=document.getElementById('runs'); if(!table) return;
  var heads=table.tHead.rows[0].cells;
  function val(cell){var v=cell.getAttribute('data-v');
    if(v===null) v=cell.textContent; var n=parseFloat(v);
    return (v!=='' && !isNaN(n) && isFinite(v)) ? n : v.toLowerCase();}
  function sortBy(col){
    var th=heads[col], desc=!th.classList.contains('sorted-desc');
    for(var i=0;i<heads.length;i++) heads[i].classList.remove('sorted-asc','sorted-desc');
    th.classList.add(desc?'sorted-desc':'sorted-asc');
    var body=table.tBodies[0], rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=val(a.cells[col]), y=val(b.cells[col]);
      var ex=(x===''), ey=(y==='');
      if(ex!==ey) return ex?1:-1;               // empty cells last
      if(typeof x!==typeof y){x=String(x);y=String(y);}
      var c = x<y?-1:(x>y?1:0); return desc?-c:c;});
    rows.forEach(function(r){body.appendChild(r);});
  }
  for(var i=0;i<heads.length;i++){(function(i){
    heads[i].addEventListener('click',function(){sortBy(i);});})(i);}
})();
"""


def _flat_scores(scores: Any, prefix: str = "") -> dict[str, float | str]:
    """Nested score dicts -> flat ``{"task.score": value}`` with numbers and short strings."""
    out: dict[str, float | str] = {}
    if isinstance(scores, dict):
        for k, v in scores.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(_flat_scores(v, name + "."))
            elif isinstance(v, bool):
                out[name] = str(v).lower()
            elif isinstance(v, (int, float)):
                out[name] = float(v)
            elif isinstance(v, str) and len(v) < 80:
                out[name] = v
    return out


def _overlays(outputs: Any, task: str | None = None) -> list[tuple[str | None, str]]:
    """(task, overlay path) of a record's outputs (task None: a single-task record)."""
    if not isinstance(outputs, dict):
        return []
    found: list[tuple[str | None, str]] = []
    for k, v in outputs.items():
        if isinstance(v, dict):
            found.extend(_overlays(v, k))
        elif k == "overlay" and isinstance(v, str):
            found.append((task, v))
    return found


def _failures_section(recs: list[dict]) -> str:
    """The failed records named, with what to do about them."""
    failed = [r for r in recs if r.get("status") not in ("ok", "skipped")]
    if not failed:
        return ""
    esc = html.escape
    items = "".join(
        f"<li><b>{esc(str(r.get('key', r.get('input', ''))))}</b>: "
        f"{esc(str(r.get('error') or 'failed'))}</li>"
        for r in failed[:200]
    )
    more = f"<li>... and {len(failed) - 200} more</li>" if len(failed) > 200 else ""
    return (
        f"<section class='failures'><h2>{len(failed)} input(s) failed</h2><ul>{items}{more}</ul>"
        "<p>Fix the cause, then rerun the same command with <code>--retry-errors</code>: only "
        "the failed inputs are computed again (the others are kept).</p></section>"
    )


def _href(path: str) -> str:
    from urllib.parse import quote

    return quote(path.replace("\\", "/"), safe="/._-~")


def _random_weights(record: dict) -> bool:
    """True if the record's result meta (one task, or any task of a multi-task run) says the
    models had random weights."""
    res = record.get("meta", {}).get("result", {})
    if not isinstance(res, dict):
        return False
    if res.get("random_weights"):
        return True
    return any(isinstance(v, dict) and v.get("random_weights") for v in res.values())


RANDOM_WEIGHTS_BANNER = (
    "RANDOM WEIGHTS: these results were made with random-weight models (--models tiny or "
    "random); they test the pipeline and are not meaningful."
)


def render_report(
    records: Iterable[dict],
    title: str = "zsdense run",
    out_dir: str | Path | None = None,
    settings: dict | None = None,
) -> str:
    """HTML text for ``records`` (manifest records; output paths relative to the page).

    ``out_dir`` (the run's folder) adds the decide section of anomaly runs, which reads the
    saved maps (through the view cache); ``settings`` (``run_settings.json``) names the tasks
    and the decisions' origin."""
    recs = list(records)
    sections = _decide_sections(recs, out_dir, settings) if out_dir is not None else ""
    recs.sort(key=lambda r: 0 if r.get("status") != "ok" else 1)  # stable: failures first
    score_cols: list[str] = []
    flat = []
    for r in recs:
        f = _flat_scores(r.get("scores", {}))
        flat.append(f)
        for k in f:
            if k not in score_cols:
                score_cols.append(k)
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_STYLE}{report_decide.STYLE}</style></head><body>",
        _summary_line(recs, title),
        (
            f"<p class='banner'>{esc(RANDOM_WEIGHTS_BANNER)}</p>"
            if any(_random_weights(r) for r in recs)
            else ""
        ),
        _failures_section(recs),
        sections,
        "<h2>All records</h2><p>Click a column header to sort. Failures are listed first.</p>",
        "<table id='runs'><thead><tr><th>#</th><th>status</th><th>input</th><th>overlay</th>",
    ]
    parts += [f"<th>{esc(c)}</th>" for c in score_cols]
    parts.append("<th>error / warnings</th></tr></thead><tbody>")
    parts += [_record_row(i, r, f, score_cols) for i, (r, f) in enumerate(zip(recs, flat))]
    script = _SCRIPT + (report_decide.SCRIPT if sections else "")
    parts.append(f"</tbody></table><script>{script}</script></body></html>\n")
    return "".join(parts)


def _decide_sections(recs: list[dict], out_dir: str | Path, settings: dict | None) -> str:
    """The decide section of each anomaly task of the run ("" when none)."""
    names = report_decide.anomaly_task_names(recs, settings)
    multi = len((settings or {}).get("tasks") or {}) > 1 or names not in ([], [None])
    return "".join(
        report_decide.render_decide_section(
            recs, Path(out_dir), name, sx, settings=settings, multi=multi and name is not None
        )
        for sx, name in enumerate(names)
    )


def _summary_line(recs: list[dict], title: str) -> str:
    """The title and the counts: images, ok, failed, fallbacks, not processed."""
    esc = html.escape
    n_ok = sum(r.get("status") == "ok" for r in recs)
    n_skip = sum(r.get("status") == "skipped" for r in recs)
    n_err = len(recs) - n_ok - n_skip
    n_fallback = sum(bool(r.get("fallback")) for r in recs)
    return (
        f"<h1>{esc(title)}</h1><p class='summary'><span>{len(recs)} images</span>"
        f"<span>{n_ok} ok</span><span>{n_err} failed</span>"
        + (f"<span>{n_fallback} fallbacks (not answers)</span>" if n_fallback else "")
        + (f"<span>{n_skip} not processed</span>" if n_skip else "")
        + f"<span>written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</span></p>"
    )


def _record_row(i: int, r: dict, f: dict, score_cols: list[str]) -> str:
    """One record's table row: number, status, input, overlay thumbnails, scores, messages."""
    esc = html.escape
    ok = r.get("status") == "ok"
    cls = "" if ok else " class='error'"
    thumbs = "".join(
        ("<figure class='thumb'>" if task else "")
        + f"<a href='{_href(p)}'><img loading='lazy' src='{_href(p)}' alt='overlay'></a>"
        + (f"<figcaption>{esc(task)}</figcaption></figure>" if task else "")
        for task, p in _overlays(r.get("outputs", {}))
    )
    row = [
        f"<tr{cls}><td class='num' data-v='{i}'>{i + 1}</td>",
        f"<td>{esc(str(r.get('status', '?')) + (' (fallback)' if r.get('fallback') else ''))}</td>",
        f"<td>{esc(str(r.get('key', r.get('input', ''))))}</td><td>{thumbs}</td>",
    ]
    for c in score_cols:
        v = f.get(c, "")
        if isinstance(v, float):
            row.append(f"<td class='num' data-v='{v!r}'>{v:.4g}</td>")
        else:
            row.append(f"<td data-v='{esc(str(v))}'>{esc(str(v))}</td>")
    warn = r.get("meta", {}).get("image", {}).get("warnings", []) if ok else []
    warn = ([r["fallback_reason"]] if r.get("fallback_reason") else []) + list(warn or [])
    msg = r.get("error") or r.get("reason") or "; ".join(str(w) for w in warn)
    row.append(f"<td class='err'>{esc(str(msg or ''))}</td></tr>")
    return "".join(row)


def write_report(out_dir: str | Path, title: str | None = None) -> Path:
    """Write ``out_dir/report.html`` from ``out_dir/results.jsonl`` (atomically)."""

    out_dir = Path(out_dir)
    records = Manifest(out_dir / MANIFEST_NAME).load().values()
    try:
        settings = json.loads((out_dir / SETTINGS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        settings = None
    text = render_report(
        records, title or f"zsdense run: {out_dir.name}", out_dir=out_dir, settings=settings
    )
    path = out_dir / REPORT_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
