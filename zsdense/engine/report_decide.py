"""The "decide" section of ``report.html`` for an anomaly task: score histogram, the decision
in force and where it came from, and per image original | map | mask | overlay under two
sliders (pixel and image threshold) that recompute masks, pixel counts and labels in the page,
with the ``zsdense decide`` command that applies the chosen values.

The data (see :mod:`zsdense.engine.report_view`) sits in a ``<script type="application/json">``
block; the page needs no server and no network. Element ids end with the section index, so a
run with several anomaly tasks gets one section each.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

from zsdense.engine.report_view import CODES, MAX_COUNTS, MAX_PICTURES, load_view

GOOD_FOLDERS = ("good", "ok", "normal")
HIST_BINS = 30

STYLE = """
section.decide{border:1px solid #bbb;padding:8px 12px;margin:1em 0;background:#fafafa}
section.decide h2{margin:.2em 0 .4em 0;font-size:1.2em}
.decide .ctl{display:flex;flex-wrap:wrap;gap:1.5em;align-items:center;margin:.4em 0}
.decide input[type=range]{width:28em}
.decide code.cmd{display:block;background:#222;color:#eee;padding:6px 8px;margin:.4em 0;
 user-select:all;white-space:pre-wrap;word-break:break-all}
.decide .cards{display:flex;flex-wrap:wrap;gap:10px}
.decide .card{border:1px solid #ccc;background:#fff;padding:4px;font-size:12px}
.decide .card.anom{border-color:#c00}
.decide .pics{display:flex;gap:3px}
.decide .pics figure{margin:0;text-align:center}
.decide .pics img,.decide .pics canvas{width:128px;height:auto;image-rendering:pixelated;
 display:block;border:1px solid #ddd;max-width:none;max-height:none}
.decide figcaption{font-size:11px;color:#555}
.decide .key{font-weight:bold;word-break:break-all;max-width:540px}
.decide .calib{font-size:13px;color:#333}
.decide svg text{font-size:10px}
"""

SCRIPT = r"""
(function(){
function jet(x){x=Math.max(0,Math.min(1,x));
  function c(v){return Math.round(255*Math.max(0,Math.min(1,1.5-Math.abs(v))));}
  return [c(4*x-3),c(4*x-2),c(4*x-1)];}
function codeThreshold(lo,hi,t){var step=(hi-lo)/255;
  for(var c=0;c<256;c++){if(lo+c*step>=t) return c;} return 256;}
function fmtInt(n){return String(n).replace(/\B(?=(\d{3})+(?!\d))/g,',');}
document.querySelectorAll('script.zs-decide-data').forEach(function(node){
  var D=JSON.parse(node.textContent), sx=D.sx;
  var thr=document.getElementById('thr'+sx), ithr=document.getElementById('ithr'+sx);
  var thrv=document.getElementById('thrv'+sx), ithrv=document.getElementById('ithrv'+sx);
  var cmd=document.getElementById('cmd'+sx), tot=document.getElementById('tot'+sx);
  var line=document.getElementById('iline'+sx);
  var views=[];  // decoded maps: per picture {codes, w, h, orig pixels}
  D.images.forEach(function(im,i){ if(im.p<0) return;
    var card=document.getElementById('card'+sx+'-'+i), P=D.pics[im.p];
    var img=new Image(); img.onload=function(){
      var c=document.createElement('canvas'); c.width=P.w; c.height=P.h;
      var g=c.getContext('2d'); g.drawImage(img,0,0);
      var px=g.getImageData(0,0,P.w,P.h).data, codes=new Uint8Array(P.w*P.h);
      for(var k=0;k<codes.length;k++) codes[k]=px[4*k];
      var V={i:i,codes:codes,w:P.w,h:P.h,lo:im.lo,hi:im.hi,orig:null,card:card};
      var oi=card.querySelector('img.orig');
      function ready(){
        if(oi){var oc=document.createElement('canvas'); oc.width=P.w; oc.height=P.h;
          var og=oc.getContext('2d'); og.drawImage(oi,0,0,P.w,P.h);
          V.orig=og.getImageData(0,0,P.w,P.h).data;}
        views.push(V); drawMap(V); drawMasks(V); }
      if(!oi || oi.complete) ready(); else oi.addEventListener('load',ready);
    };
    img.src='data:image/png;base64,'+P.map;
  });
  function drawMap(V){var c=V.card.querySelector('canvas.map'); if(!c) return;
    c.width=V.w; c.height=V.h; var g=c.getContext('2d'), o=g.createImageData(V.w,V.h);
    for(var k=0;k<V.codes.length;k++){var j=jet(V.codes[k]/255);
      o.data[4*k]=j[0];o.data[4*k+1]=j[1];o.data[4*k+2]=j[2];o.data[4*k+3]=255;}
    g.putImageData(o,0,0);}
  function maskOf(V,t){var ct=codeThreshold(V.lo,V.hi,t), m=new Uint8Array(V.codes.length);
    for(var k=0;k<m.length;k++) m[k]=V.codes[k]>=ct?1:0; return m;}
  function drawMasks(V){var t=Number(tval()), m=maskOf(V,t), n=0;
    var c=V.card.querySelector('canvas.mask'); c.width=V.w; c.height=V.h;
    var g=c.getContext('2d'), o=g.createImageData(V.w,V.h);
    for(var k=0;k<m.length;k++){var v=m[k]?255:0; n+=m[k];
      o.data[4*k]=v;o.data[4*k+1]=v;o.data[4*k+2]=v;o.data[4*k+3]=255;}
    g.putImageData(o,0,0); V.card.setAttribute('data-small-count',String(n));
    var c2=V.card.querySelector('canvas.ovl'); c2.width=V.w; c2.height=V.h;
    var g2=c2.getContext('2d'), o2=g2.createImageData(V.w,V.h), W=V.w, H=V.h;
    for(var y=0;y<H;y++) for(var x=0;x<W;x++){var k=y*W+x, j=jet(V.codes[k]/255);
      var r=V.orig?V.orig[4*k]:128, gg=V.orig?V.orig[4*k+1]:128, b=V.orig?V.orig[4*k+2]:128;
      var R=0.5*r+0.5*j[0], G=0.5*gg+0.5*j[1], B=0.5*b+0.5*j[2];
      if(m[k] && (x==0||y==0||x==W-1||y==H-1||!m[k-1]||!m[k+1]||!m[k-W]||!m[k+W])){
        R=0;G=255;B=0;}
      o2.data[4*k]=R;o2.data[4*k+1]=G;o2.data[4*k+2]=B;o2.data[4*k+3]=255;}
    g2.putImageData(o2,0,0);}
  function tval(){return thr.dataset.moved?thr.value:String(D.thr0);}
  function ival(){return ithr.dataset.moved?ithr.value:(D.hasIthr?String(D.ithr0):null);}
  function counts(){var t=Number(tval()), iv=ival(), s=iv===null?NaN:Number(iv),
    withMask=0, anom=0;
    thrv.textContent=tval()+(thr.dataset.moved?'':' (in force)');
    ithrv.textContent=iv===null?'none':iv+(ithr.dataset.moved?'':' (in force)');
    D.images.forEach(function(im,i){ if(!im.hist) return;
      var ct=codeThreshold(im.lo,im.hi,t), n=0;
      for(var c=ct;c<256;c++) n+=im.hist[c];
      if(n>0) withMask++;
      var lab=iv===null?null:(im.s>=s); if(lab) anom++;
      var card=document.getElementById('card'+sx+'-'+i); if(!card) return;
      card.setAttribute('data-count',String(n));
      card.querySelector('.px').textContent=fmtInt(n);
      card.querySelector('.area').textContent=(100*n/im.N).toFixed(3);
      card.querySelector('.lab').textContent=lab===null?'-':(lab?'anomalous':'good');
      card.classList.toggle('anom',lab===true);});
    tot.textContent=withMask+' of '+D.nCounts+' image(s) with a non-empty mask'+
      (iv===null?'':', '+anom+' labelled anomalous');
    var c='zsdense decide '+D.out+(D.task?' --task '+D.task:'')+' --threshold '+tval();
    if(iv!==null) c+=' --image-threshold '+iv;
    cmd.textContent=c;
    if(line && iv!==null){var x=D.hx0+(s-D.smin)/(D.smax-D.smin||1)*D.hw;
      line.setAttribute('x1',x); line.setAttribute('x2',x);
      line.setAttribute('visibility','visible');}}
  thr.addEventListener('input',function(){thr.dataset.moved='1'; counts();
    views.forEach(drawMasks);});
  ithr.addEventListener('input',function(){ithr.dataset.moved='1'; counts();});
  counts();
  node.setAttribute('data-ready','1');
});
})();
"""


def _is_good_path(rel: str) -> bool | None:
    parts = [p.lower() for p in PurePosixPath(rel).parts[:-1]]
    return any(p in GOOD_FOLDERS for p in parts)


def _task_part(d: Any, task: str | None) -> dict:
    if not isinstance(d, dict):
        return {}
    return dict(d.get(task) or {}) if task else dict(d)


def anomaly_task_names(records: list[dict], settings: dict | None) -> list[str | None]:
    """The anomaly tasks of a run: names when several tasks ran (nested outputs), [None] for a
    single-task anomaly run, [] when none."""
    tasks = (settings or {}).get("tasks") or {}
    if tasks:
        names = [n for n, t in tasks.items() if isinstance(t, dict) and t.get("task") == "anomaly"]
        if not names:
            return []
        return [None] if len(tasks) == 1 else names
    for r in records:  # no settings (a library run): recognise the anomaly scores
        s = r.get("scores") or {}
        if "threshold" in s and "defect_area" in s:
            return [None]
    return []


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _svg_histogram(
    scores: list[tuple[float, bool | None]], ithr: float | None, sx: int
) -> tuple[str, dict]:
    """Stacked score histogram (good folders / other / unknown) as inline SVG; the geometry
    the page needs to move the image-threshold line."""
    vals = [s for s, _ in scores]
    smin, smax = min(vals), max(vals)
    if not smax > smin:
        smax = smin + 1.0
    W, H, x0, y0 = 560, 150, 36, 10
    hw, hh = W - x0 - 10, H - y0 - 24
    bins = [[0, 0, 0] for _ in range(HIST_BINS)]
    for s, good in scores:
        b = min(HIST_BINS - 1, int((s - smin) / (smax - smin) * HIST_BINS))
        bins[b][0 if good is True else (1 if good is False else 2)] += 1
    top = max(sum(b) for b in bins) or 1
    colors = ("#2a8", "#d33", "#888")
    bw = hw / HIST_BINS
    parts = [
        f"<svg id='hist{sx}' width='{W}' height='{H}' role='img' "
        "aria-label='histogram of image scores'>",
        f"<line x1='{x0}' y1='{y0 + hh}' x2='{x0 + hw}' y2='{y0 + hh}' stroke='#333'/>",
    ]
    for i, b in enumerate(bins):
        y = y0 + hh
        for k in range(3):
            if not b[k]:
                continue
            h = b[k] / top * hh
            y -= h
            parts.append(
                f"<rect x='{x0 + i * bw:.1f}' y='{y:.1f}' width='{bw - 1:.1f}' height='{h:.1f}' "
                f"fill='{colors[k]}'><title>{b[k]} image(s)</title></rect>"
            )
    parts.append(f"<text x='{x0}' y='{H - 8}'>{smin:.4g}</text>")
    parts.append(f"<text x='{x0 + hw}' y='{H - 8}' text-anchor='end'>{smax:.4g}</text>")
    parts.append(f"<text x='{x0 + hw / 2}' y='{H - 8}' text-anchor='middle'>image score</text>")
    parts.append(f"<text x='2' y='{y0 + 8}'>{top}</text>")
    x = x0 + ((ithr if ithr is not None else smin) - smin) / (smax - smin) * hw
    vis = "visible" if ithr is not None else "hidden"
    parts.append(
        f"<line id='iline{sx}' x1='{x:.1f}' y1='{y0}' x2='{x:.1f}' y2='{y0 + hh}' "
        f"stroke='#00f' stroke-width='2' stroke-dasharray='4 2' visibility='{vis}'/>"
    )
    parts.append("</svg>")
    geo = {"hx0": x0, "hw": hw, "smin": smin, "smax": smax}
    return "".join(parts), geo


def _slider_grid(lo: float, hi: float, steps: int = 1000) -> tuple[str, str, str]:
    """(min, max, step) as decimal strings for a range input over [lo, hi]: the step a power of
    ten near (hi - lo) / steps and the ends multiples of it, so every position is a short
    decimal number (what the page shows and puts in the command, parsed the same by Python)."""
    span = hi - lo if hi > lo else max(abs(lo), 1.0)
    e = math.floor(math.log10(span / steps))
    digits = max(0, -e)
    step = 10.0**e
    lo_k, hi_k = math.floor(lo / step), math.ceil(hi / step)
    if hi_k <= lo_k:
        hi_k = lo_k + 1

    def text(k: int) -> str:
        return f"{k * step:.{digits}f}" if digits else str(int(k * step))

    return text(lo_k), text(hi_k), f"{step:.{digits}f}" if digits else str(int(step))


def render_decide_section(
    records: list[dict],
    out_dir: Path,
    task: str | None,
    sx: int,
    settings: dict | None = None,
    multi: bool = False,
) -> str:
    """The HTML of one anomaly task's section (empty when no record has a saved map)."""
    part_of = task if multi else None
    rows = _decided_rows(records, part_of)
    if not rows:
        return ""
    thr = _f(rows[0][1].get("threshold"))
    ithr = _f(rows[0][1].get("image_threshold"))
    meta = _task_part((rows[0][0].get("meta") or {}).get("result"), part_of)
    title = f"Decide: anomaly task {task}" if task else "Decide: anomaly threshold"
    parts = [f"<section class='decide' id='decide{sx}'><h2>{html.escape(title)}</h2>"]
    parts.append(_decision_in_force(rows, meta, thr, ithr, task, settings))
    hist, geo = _histogram_block(rows, ithr, sx)
    parts.append(hist)
    with_maps = [x for x in rows if isinstance(x[2].get("map"), str)]
    if not with_maps:
        parts.append(
            "<p>This run kept no float maps (<code>--format none</code>): the threshold slider "
            "and <code>zsdense decide</code> need them. Run again with <code>--format tiff"
            "</code> to choose thresholds here.</p></section>"
        )
        return "".join(parts)
    images, pics, cards, (lo_all, hi_all) = _page_images(out_dir, with_maps, part_of, sx)
    if not images:
        parts.append("<p>The saved maps could not be read.</p></section>")
        return "".join(parts)
    svals = [e["s"] for e in images if e["s"] is not None] or [0.0, 1.0]
    smin, smax = min(svals), max(svals)
    t0 = thr if thr is not None else lo_all
    data = {
        "sx": sx,
        "out": shlex.quote(str(Path(out_dir).resolve())),
        "task": task if (multi and task) else None,
        "images": images,
        "pics": pics,
        "hasIthr": ithr is not None,
        "thr0": t0,
        "ithr0": ithr,
        "nCounts": len(images),
        **geo,
    }
    parts.append(_controls(sx, (min(lo_all, t0), max(hi_all, t0)), t0, ithr, (smin, smax)))
    parts.append(_counting_note(sx, len(with_maps), len(images), len(pics)))
    parts.append("<div class='cards'>" + "".join(cards) + "</div>")
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    parts.append(
        f"<script type='application/json' class='zs-decide-data' id='data{sx}'>{payload}"
        "</script></section>"
    )
    return "".join(parts)


def _decided_rows(records: list[dict], part_of: str | None) -> list[tuple[dict, dict, dict]]:
    """(record, its task's scores, its task's outputs) of the ok records with a decision."""
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        scores = _task_part(r.get("scores"), part_of)
        outs = _task_part(r.get("outputs"), part_of)
        if "threshold" not in scores:
            continue
        rows.append((r, scores, outs))
    return rows


def _decision_in_force(
    rows: list, meta: dict, thr: float | None, ithr: float | None, task: str | None, settings
) -> str:
    """The decision in force and where it came from (calibration, an earlier decide)."""
    esc = html.escape
    calib = meta.get("calibration") or {}
    tset = ((settings or {}).get("tasks") or {}).get(task or "", None)
    if tset is None and settings and len(settings.get("tasks") or {}) == 1:
        tset = next(iter(settings["tasks"].values()))
    lines = [
        f"pixel threshold <b>{esc(f'{thr:.6g}' if thr is not None else '-')}</b> "
        f"({esc(str(meta.get('threshold_source') or rows[0][1].get('threshold_source')))})",
        "image threshold <b>"
        + esc(f"{ithr:.6g}" if ithr is not None else "none (no labels)")
        + "</b>"
        + (f" ({esc(str(meta.get('image_threshold_source')))})" if ithr is not None else ""),
    ]
    if calib:
        decided_cal = ((settings or {}).get("decided") or {}).get("calibration") or {}
        src = (tset or {}).get("calibrate_with") or decided_cal.get("calibrate_with")
        lines.append(
            f"calibrated on {esc(str(calib.get('n_images')))} known-good image(s), rule "
            f"{esc(str(calib.get('rule')))}" + (f", from {esc(str(src))}" if src else "")
        )
    decided = (settings or {}).get("decided")
    if isinstance(decided, dict) and decided.get("at"):
        prev = decided.get("previous") or {}
        lines.append(
            f"re-decided by <code>zsdense decide</code> at {esc(str(decided['at']))} (before: "
            f"pixel {esc(str(prev.get('threshold')))}, image "
            f"{esc(str(prev.get('image_threshold')))})"
        )
    if meta.get("threshold_note"):
        lines.append(esc(str(meta["threshold_note"])))
    return "<p class='calib'>" + "<br>".join(lines) + "</p>"


def _histogram_block(rows: list, ithr: float | None, sx: int) -> tuple[str, dict]:
    """The score histogram with its legend ("" without scores), and its geometry."""
    labelled = [_is_good_path(str(r.get("rel") or r.get("key"))) for r, _s, _o in rows]
    known = any(labelled) and not all(labelled)
    hist_in = [
        (float(s["score"]), (g if known else None))
        for (_r, s, _o), g in zip(rows, labelled)
        if _f(s.get("score")) is not None
    ]
    geo: dict = {"hx0": 0, "hw": 1, "smin": 0.0, "smax": 1.0}
    if not hist_in:
        return "", geo
    svg, geo = _svg_histogram(hist_in, ithr, sx)
    legend = (
        "<span style='color:#2a8'>&#9632; images under a good/ folder</span> "
        "<span style='color:#d33'>&#9632; other images</span>"
        if known
        else "<span style='color:#888'>&#9632; images</span> (no good/ folder: no split)"
    )
    return f"<div>{svg}<br>{legend}; dashed line: image threshold</div>", geo


def _page_images(
    out_dir: Path, with_maps: list, part_of: str | None, sx: int
) -> tuple[list[dict], list[dict], list[str], tuple[float, float]]:
    """The page's data: counts for up to MAX_COUNTS images (highest scores first), pictures
    and cards (highest scores first) for up to MAX_PICTURES; and the range of every counted
    map."""
    by_score = sorted(
        range(len(with_maps)), key=lambda i: -(_f(with_maps[i][1].get("score")) or -math.inf)
    )
    counted = set(by_score[:MAX_COUNTS])
    pictured = set(by_score[:MAX_PICTURES])
    images, pics, cards = [], [], []
    lo_all, hi_all = math.inf, -math.inf
    for i, (r, s, o) in enumerate(with_maps):
        if i not in counted:
            continue
        view = load_view(out_dir, r, part_of, o["map"])
        if view is None:
            continue
        lo_all, hi_all = min(lo_all, view["lo"]), max(hi_all, view["hi"])
        entry = {
            "k": str(r.get("key")),
            "s": _f(s.get("score")),
            "lo": view["lo"],
            "hi": view["hi"],
            "N": int(view["H"]) * int(view["W"]),
            "hist": view["hist"],
            "p": -1,
        }
        if i in pictured:
            entry["p"] = len(pics)
            pics.append({"w": view["w"], "h": view["h"], "map": view["map"]})
            cards.append((-(entry["s"] or 0.0), _card(sx, len(images), entry, view)))
        images.append(entry)
    cards.sort(key=lambda c: c[0])
    return images, pics, [c[1] for c in cards], (lo_all, hi_all)


def _card(sx: int, idx: int, entry: dict, view: dict) -> str:
    """One image's card: original | map | mask | overlay (the canvases drawn by the page)."""
    esc = html.escape
    orig = (
        f"<img class='orig' alt='original' src='data:image/jpeg;base64,{view['orig']}'>"
        if view.get("orig")
        else "<div>(input not readable)</div>"
    )
    return (
        f"<div class='card' id='card{sx}-{idx}'><div class='key'>{esc(entry['k'])}"
        f"</div><div>score {entry['s']:.4g} | label <span class='lab'>-</span> | "
        f"mask <span class='px'>-</span> px (<span class='area'>-</span>%)</div>"
        "<div class='pics'>"
        f"<figure>{orig}<figcaption>original</figcaption></figure>"
        "<figure><canvas class='map'></canvas><figcaption>map</figcaption></figure>"
        "<figure><canvas class='mask'></canvas><figcaption>mask</figcaption></figure>"
        "<figure><canvas class='ovl'></canvas><figcaption>overlay</figcaption>"
        "</figure></div></div>"
    )


def _controls(
    sx: int,
    pixel_range: tuple[float, float],
    t0: float,
    ithr: float | None,
    score_range: tuple[float, float],
) -> str:
    """The pixel and image threshold sliders."""
    smin, smax = score_range
    pmin, pmax, pstep = _slider_grid(*pixel_range)
    imin, imax, istep = _slider_grid(
        min(smin, ithr if ithr is not None else smin), max(smax, ithr if ithr is not None else smax)
    )
    return (
        "<div class='ctl'><label>pixel threshold "
        f"<input type='range' id='thr{sx}' min='{pmin}' max='{pmax}' "
        f"step='{pstep}' value='{t0!r}'></label> <b id='thrv{sx}'></b></div>"
        "<div class='ctl'><label>image threshold "
        f"<input type='range' id='ithr{sx}' min='{imin}' max='{imax}' "
        f"step='{istep}' value='{(ithr if ithr is not None else smax)!r}'></label> "
        f"<b id='ithrv{sx}'></b></div>"
    )


def _counting_note(sx: int, n_maps: int, n_counted: int, n_pictured: int) -> str:
    """How the counts are made and what is left out; the command the sliders fill in."""
    notes = []
    if n_maps - n_counted:
        notes.append(
            f"{n_maps - n_counted} image(s) beyond the first {MAX_COUNTS} are not counted here"
        )
    if n_pictured < n_counted:
        notes.append(f"pictures for the {n_pictured} highest scores of {n_counted}")
    return (
        f"<p><span id='tot{sx}'></span>. Mask pixel counts are at full resolution from an 8-bit "
        f"histogram of each map ({CODES} levels over its range: exact up to pixels within half "
        "a level of the threshold); pictures at reduced size. "
        + html.escape("; ".join(notes))
        + "</p><p>Apply the chosen values to the run's files:</p>"
        f"<code class='cmd' id='cmd{sx}'></code>"
    )
