"""``zsdense registers find | check``: test-time registers' neurons, found on your own images.

``zsdense registers find DATA --encoder NAME --out neurons.json`` runs the images (files,
folders, globs, any format zsdense reads) through the plain encoder, finds the MLP "register
neurons" that make its high-norm outlier tokens (the rules of Jiang et al., code
``nickjiang2378/test-time-registers``: every knob below is an option with the reference's
setting), writes them with the encoder's identity, prints what it found and writes a small
self-contained HTML report next to the JSON. ``zsdense registers check NEURONS [DATA]`` loads a
neuron file (or ``auto``, the shipped list) for an encoder, refusing one made for another
encoder, and shows what it does to the outlier norms of DATA.
"""

from __future__ import annotations

import html
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np

from zsdense.cli.common import (
    REGISTER_KEYS,
    make_runtime,
    out_option,
    quiet_option,
    runtime_options,
    warn,
)
from zsdense.config import REGISTER_MODES
from zsdense.errors import ConfigError, InputError

CLIP_KIND, DINO_KIND = "clip", "dinov2"


def _encoders() -> dict[str, str]:
    from zsdense.models.clip import CLIP_ARCHS
    from zsdense.models.dinov2 import DINOV2_MODELS

    return {**{a: CLIP_KIND for a in CLIP_ARCHS}, **{n: DINO_KIND for n in DINOV2_MODELS}}


def encoder_option(f):
    return click.option(
        "--encoder",
        "encoder",
        required=True,
        type=click.Choice(list(_encoders())),
        help="CLIP architecture (OpenAI weights) or DINOv2 registry name.",
    )(f)


def load_encoder(rt, name: str):
    """The zsdense model wrapper for ``--encoder``."""
    if _encoders()[name] == CLIP_KIND:
        return rt.clip(name)
    return rt.dinov2(name)


# ---- reading images ---------------------------------------------------------------------------


class _ImageStream:
    """Preprocessed images from DATA, read lazily (one image's pixels in memory at a time)."""

    def __init__(self, items, limit: int, prep: dict, max_pixels: int | None, bar=None):
        self.items, self.limit, self.prep = items, limit, prep
        self.max_pixels, self.bar = max_pixels, bar
        self.read = 0
        self.failed: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator:
        from zsdense.io import iter_image_records
        from zsdense.models.registers_find import preprocess_for_search

        for item in self.items:
            if self.read >= self.limit:
                return
            try:
                for rec in iter_image_records(item.path, max_pixels=self.max_pixels):
                    if self.read >= self.limit:
                        break
                    x = preprocess_for_search(rec.image, **self.prep)
                    self.read += 1
                    yield x
            except InputError as exc:
                self.failed.append((str(item.rel), exc.problem))
            if self.bar is not None:
                self.bar.update(1)


def _list(data, limit: int, seed: int | None):
    from zsdense.io import list_inputs

    items = list_inputs(list(data))
    if not items:
        raise ConfigError("no images found in " + " ".join(data))
    if len(items) > limit:  # the reference samples (unseeded); here a seeded sample
        items = random.Random(seed).sample(list(items), limit)
    return list(items)


def _progress(total: int, quiet: bool, label: str):
    if quiet:
        return None
    return click.progressbar(length=total, label=label, file=sys.stderr)


# ---- summaries ------------------------------------------------------------------------------


def _hist(before: np.ndarray, after: np.ndarray, bins: int = 12):
    top = float(max(before.max(initial=0.0), after.max(initial=0.0))) or 1.0
    edges = np.linspace(0.0, top * 1.0001, bins + 1)
    return edges, np.histogram(before, edges)[0], np.histogram(after, edges)[0]


def _fmt_neurons(selected, limit: int = 12) -> list[str]:
    by_layer: dict[int, list[str]] = {}
    for layer, neuron, score in selected:
        by_layer.setdefault(layer, []).append(f"{neuron} ({score:.3g})")
    lines = []
    for layer, ns in by_layer.items():
        more = f" … +{len(ns) - limit}" if len(ns) > limit else ""
        lines.append(f"  layer {layer}: " + ", ".join(ns[:limit]) + more)
    return lines


def _check_lines(check, thr: float) -> list[str]:
    b, a, r = check.before, check.after, check.registers
    spec = check.spec
    lines = [
        f"detect-layer token norms without -> with {spec.num_registers} register(s), "
        f"mode {spec.mode} ({b.size} image tokens):",
        f"  max {b.max(initial=0):.1f} -> {a.max(initial=0):.1f}; tokens above the threshold "
        f"{int((b > thr).sum())} -> {int((a > thr).sum())}"
        + (f"; register tokens: median {float(np.median(r)):.1f}" if r.size else ""),
    ]
    edges, hb, ha = _hist(b, a)
    lines.append("  norm range          without      with")
    for i in range(len(hb)):
        lines.append(f"  {edges[i]:7.1f} - {edges[i + 1]:7.1f}   {hb[i]:8d}  {ha[i]:8d}")
    return lines


def _svg_bars(title: str, labels, series: list[tuple[str, list[float], str]], log: bool) -> str:
    """A small grouped bar chart as inline SVG (no scripts, no external files)."""
    w, h, pad = 640, 220, 36
    n, k = max(1, len(labels)), max(1, len(series))
    vals = [v for _, vs, _ in series for v in vs]
    f = (lambda v: np.log10(1.0 + v)) if log else (lambda v: float(v))  # noqa: E731
    top = max([f(v) for v in vals] + [1e-9])
    gw = (w - 2 * pad) / n
    bw = gw * 0.8 / k
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 40}" '
        f'role="img"><title>{html.escape(title)}</title>',
        f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#444"/>',
    ]
    for si, (name, vs, color) in enumerate(series):
        for i, v in enumerate(vs):
            bh = (h - pad) * f(v) / top
            x = pad + i * gw + gw * 0.1 + si * bw
            out.append(
                f'<rect x="{x:.1f}" y="{h - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                f'fill="{color}"><title>{html.escape(name)} {html.escape(str(labels[i]))}: '
                f"{v:g}</title></rect>"
            )
        out.append(
            f'<rect x="{pad + si * 120}" y="6" width="10" height="10" fill="{color}"/>'
            f'<text x="{pad + 14 + si * 120}" y="15" font-size="11">{html.escape(name)}</text>'
        )
    step = max(1, n // 12)
    for i in range(0, n, step):
        x = pad + i * gw + gw / 2
        out.append(
            f'<text x="{x:.1f}" y="{h + 14}" font-size="10" text-anchor="middle">'
            f"{html.escape(str(labels[i]))}</text>"
        )
    axis = "count (log scale)" if log else "count"
    out.append(f'<text x="4" y="{pad - 8}" font-size="10">{axis}</text></svg>')
    return "".join(out)


def _html_report(title: str, facts: list[tuple[str, Any]], res, check) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>body{{font:14px sans-serif;margin:2em}}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 8px;"
        "text-align:left}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><table>{rows}</table>",
    ]
    if res is not None:
        layers = list(range(len(res.outliers_per_layer)))
        parts.append("<h2>Tokens above the threshold at each block output</h2>")
        parts.append(
            _svg_bars(
                "outlier tokens per layer",
                layers,
                [
                    ("tokens", res.outliers_per_layer, "#c0392b"),
                    ("images", res.images_with_outliers_per_layer, "#2980b9"),
                ],
                log=True,
            )
        )
        parts.append("<h2>Chosen neurons (rank order)</h2><table><tr><th>rank</th>")
        parts.append("<th>layer</th><th>neuron</th><th>mean score</th></tr>")
        for i, (layer, neuron, score) in enumerate(res.selected):
            parts.append(f"<tr><td>{i + 1}</td><td>{layer}</td><td>{neuron}</td>")
            parts.append(f"<td>{score:.4g}</td></tr>")
        parts.append("</table>")
    if check is not None:
        edges, hb, ha = _hist(check.before, check.after, bins=24)
        labels = [f"{edges[i]:.0f}" for i in range(len(hb))]
        parts.append(
            f"<h2>Detect-layer token norms without / with {check.spec.num_registers} "
            f"register(s), mode {html.escape(check.spec.mode)}</h2>"
        )
        parts.append(
            _svg_bars(
                "token norm histogram",
                labels,
                [("without", hb.tolist(), "#7f8c8d"), ("with", ha.tolist(), "#27ae60")],
                log=True,
            )
        )
        if check.registers.size:
            parts.append(
                f"<p>Register tokens: {check.registers.size}, median norm "
                f"{float(np.median(check.registers)):.1f}.</p>"
            )
    parts.append("</body></html>\n")
    return "".join(parts)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---- commands ---------------------------------------------------------------------------------


@click.group("registers")
def registers_group() -> None:
    """Test-time registers (training-free, Jiang et al.): find register neurons on your images,
    check a neuron file against an encoder."""


@registers_group.command("find")
@click.argument("data", nargs=-1, required=True)
@encoder_option
@out_option(
    "The neuron file to write (neurons.json); the HTML report goes next to it.", dest="out_path"
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Outlier norm threshold (absolute, strict) at the detect layer. Default: 30 for CLIP, "
    "150 for DINOv2 (the reference's yaml, meant for ViT-B/16 and DINOv2-L).",
)
@click.option(
    "--detect-layer",
    type=int,
    default=None,
    help="Block whose output norms define the outliers (Python index: -1 the last, -2 the one "
    "before). Default: -1 CLIP, -2 DINOv2.",
)
@click.option(
    "--highest-layer",
    type=int,
    default=None,
    help="Keep neurons of layers 0..N only (-1: no limit). Default: 5 CLIP, 17 DINOv2.",
)
@click.option("--lowest-layer", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=None,
    help="Neurons kept after the layer filter. Default: 10 CLIP, 50 DINOv2.",
)
@click.option(
    "--sparsity-filter/--no-sparsity-filter",
    default=True,
    show_default=True,
    help="Keep only neurons below the activation threshold on at least the fraction of tokens "
    "(on in the reference notebook; off by default in its function).",
)
@click.option("--sparsity-activation-threshold", type=float, default=0.5, show_default=True)
@click.option("--sparsity-frac-threshold", type=click.FloatRange(0, 1), default=0.5)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="At most this many images (a seeded sample of the files when there are more; the "
    "reference function's default is 500, its notebook used 100).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of that sample.")
@click.option("--resize", type=click.IntRange(min=1), default=None, help="Shorter side first.")
@click.option("--crop", type=click.IntRange(min=1), default=None, help="Then a centre crop.")
@click.option(
    "--check-images",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Images rerun with the found registers for the before/after norms (0: skip).",
)
@click.option("--num-registers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--mode",
    type=click.Choice(REGISTER_MODES),
    default="zero",
    show_default=True,
    help="What the found neurons' patch activations become (the check and the file's "
    "recommendation).",
)
@click.option("--force", is_flag=True, default=False, help="Overwrite an existing file.")
@quiet_option("No progress bar.")
@runtime_options(exclude=REGISTER_KEYS)  # the plain encoder: its own --num-registers
def find_cmd(
    data,
    encoder,
    out_path,
    threshold,
    detect_layer,
    highest_layer,
    lowest_layer,
    top_k,
    sparsity_filter,
    sparsity_activation_threshold,
    sparsity_frac_threshold,
    max_images,
    seed,
    resize,
    crop,
    check_images,
    num_registers,
    mode,
    force,
    quiet,
    **runtime,
) -> None:
    """Find register neurons of ENCODER on DATA (files, folders, globs) and write them."""
    from zsdense.models import registers_find as rf
    from zsdense.models.registers import RegisterSpec

    out = Path(out_path)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    items = _list(data, max_images, seed)
    rt = make_runtime(**runtime)
    model = load_encoder(rt, encoder)
    settings = rf.settings_for(
        model,
        register_norm_threshold=threshold,
        detect_outliers_layer=detect_layer,
        highest_layer=highest_layer,
        lowest_layer=lowest_layer,
        top_k=top_k,
        apply_sparsity_filter=sparsity_filter,
        sparsity_activation_threshold=sparsity_activation_threshold,
        sparsity_frac_threshold=sparsity_frac_threshold,
    )
    prep = rf.search_preprocessing(model)
    prep.update({k: v for k, v in (("resize", resize), ("crop", crop)) if v is not None})
    batch = runtime.get("batch_size") or 1
    t0 = time.perf_counter()
    res, stream = _search(
        model,
        items,
        settings,
        prep,
        batch=batch,
        quiet=quiet,
        max_images=max_images,
        max_pixels=runtime.get("max_pixels"),
        rules={
            "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in prep.items()},
            "max_images": max_images,
            "seed": seed,
            "precision": rt.precision,
            "data": [str(d) for d in data],
        },
    )
    seconds = time.perf_counter() - t0
    for rel, problem in stream.failed[:10]:
        warn(f"skipped {rel}: {problem}")
    _require_outliers(res, settings, data)
    ns = res.neurons
    ns = type(ns)(
        layers=ns.layers,
        encoder=ns.encoder,
        rules=ns.rules,
        scores=ns.scores,
        provenance=ns.provenance,
        registers={"num_registers": num_registers, "mode": mode, "scale": 1.0},
    )
    check = None
    if check_images:
        spec = RegisterSpec(neurons=ns, num_registers=num_registers, mode=mode)
        sub = _ImageStream(items, min(check_images, res.n_seen), prep, runtime.get("max_pixels"))
        check = rf.norms_with_registers(model, sub, spec, settings, batch_size=batch)
    ns.save(out)
    report = out.with_suffix(".html")
    lines = _found_lines(rt, res, settings, ns, len(stream.failed), seconds, check)
    lines.append(f"wrote {out} and {report}")
    facts = _found_facts(res, settings, ns)
    _write_text(report, _html_report(f"Register neurons: {ns.encoder.name}", facts, res, check))
    click.echo("\n".join(lines))


def _search(model, items, settings, prep: dict, *, batch, quiet, max_images, max_pixels, rules):
    """The search over the images, with a progress bar: (the result, the image stream, which
    knows the files it could not read)."""
    from zsdense.models import registers_find as rf

    bar = _progress(len(items), quiet, "finding register neurons")
    stream = _ImageStream(items, max_images, prep, max_pixels, bar)
    try:
        res = rf.find_register_neurons(model, stream, settings, batch_size=batch, extra_rules=rules)
    finally:
        if bar is not None:
            bar.render_finish()
    return res, stream


def _require_outliers(res, settings, data) -> None:
    """Nothing read or no outlier token: nothing to find (a ConfigError saying what to do)."""
    det = settings.detect_outliers_layer
    if res.n_seen == 0:
        raise ConfigError("no image could be read from " + " ".join(data))
    if res.n_used == 0:
        raise ConfigError(
            f"no token of the {res.n_seen} image(s) has a norm above "
            f"{settings.register_norm_threshold:g} at layer {det} (the largest is "
            f"{res.max_detect_norm:.1f}): nothing to find. The "
            "default thresholds are absolute norms of CLIP ViT-B/16 (30) and DINOv2-L (150); "
            "pass a --threshold inside this encoder's range"
        )


def _found_lines(rt, res, settings, ns, n_failed: int, seconds: float, check) -> list[str]:
    """What ``registers find`` prints: the run, the outliers, the chosen neurons, the check."""
    thr = settings.register_norm_threshold
    det = settings.detect_outliers_layer
    lines = [
        f"zsdense registers find: {ns.encoder.describe()}, {rt.precision} on {rt.device}",
        f"images: {res.n_seen} read, {res.n_used} with outliers (used), "
        f"{res.n_seen - res.n_used} without (skipped), {n_failed} unreadable; "
        f"{seconds:.1f} s ({seconds / max(res.n_seen, 1) * 1000:.0f} ms/image)",
        f"outliers: token norm > {thr:g} at layer {det} ({res.outlier_tokens} tokens; largest "
        f"norm {res.max_detect_norm:.1f})",
        "tokens above the threshold per block output: "
        + ", ".join(f"L{i} {n}" for i, n in enumerate(res.outliers_per_layer)),
        f"chosen neurons ({ns.count}; sparsity filter "
        f"{'on' if settings.apply_sparsity_filter else 'off'}, "
        f"layers {settings.lowest_layer}..{settings.highest_layer}, top {settings.top_k}):",
        *_fmt_neurons(res.selected),
    ]
    if check is not None:
        lines.extend(_check_lines(check, thr))
    return lines


def _found_facts(res, settings, ns) -> list[tuple[str, Any]]:
    """The facts table of the HTML report next to the neurons file."""
    thr = settings.register_norm_threshold
    det = settings.detect_outliers_layer
    return [
        ("encoder", ns.encoder.describe()),
        (
            "images read / used / skipped",
            f"{res.n_seen} / {res.n_used} / {res.n_seen - res.n_used}",
        ),
        ("threshold, detect layer", f"{thr:g}, {det}"),
        ("sparsity filter", settings.apply_sparsity_filter),
        ("layers, top k", f"{settings.lowest_layer}..{settings.highest_layer}, {settings.top_k}"),
        ("neurons", ns.count),
        ("provenance", ns.provenance),
    ]


@registers_group.command("check")
@click.argument("neurons")
@click.argument("data", nargs=-1)
@encoder_option
@click.option("--num-registers", type=click.IntRange(min=1), default=None)
@click.option("--mode", type=click.Choice(REGISTER_MODES), default=None)
@click.option("--max-images", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--threshold", type=float, default=None, help="Norm threshold (file's by default).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None)
@runtime_options(exclude=REGISTER_KEYS)  # the plain encoder: its own --num-registers
def check_cmd(
    neurons, data, encoder, num_registers, mode, max_images, threshold, html_path, **runtime
) -> None:
    """Load NEURONS (a neurons.json, or 'auto' for the shipped list) for ENCODER, refusing a
    file found for another encoder; with DATA, show the outlier norms without and with them."""
    from zsdense.models import registers_find as rf
    from zsdense.models.registers import RegisterSpec, resolve_neurons

    rt = make_runtime(**runtime)
    model = load_encoder(rt, encoder)
    ns = resolve_neurons(model, neurons)
    if ns is None:
        raise ConfigError(
            f"no shipped register-neuron list for {encoder}: the reference ships one for "
            "DINOv2-L (dinov2-large) only, and none for CLIP; find one with "
            f"`zsdense registers find DATA --encoder {encoder} --out neurons.json`"
        )
    lines = [
        f"{neurons}: {ns.count} neurons in layers {', '.join(str(k) for k in ns.neurons)}, "
        f"for {ns.encoder.describe()}",
        f"provenance: {ns.provenance}",
    ]
    if data:
        det = ns.rules.get("detect_outliers_layer")
        thr = threshold if threshold is not None else ns.rules.get("register_norm_threshold")
        settings = rf.settings_for(model, detect_outliers_layer=det, register_norm_threshold=thr)
        reg = dict(ns.registers)
        spec = RegisterSpec(
            neurons=ns,
            num_registers=num_registers or int(reg.get("num_registers", 1)),
            mode=mode or str(reg.get("mode", "zero")),
        )
        items = _list(data, max_images, 0)
        prep = rf.search_preprocessing(model)
        found = ns.rules.get("preprocess") or {}  # the sizes the neurons were found at
        prep.update({k: int(found[k]) for k in ("resize", "crop") if k in found})
        stream = _ImageStream(items, max_images, prep, runtime.get("max_pixels"))
        check = rf.norms_with_registers(
            model, stream, spec, settings, batch_size=runtime.get("batch_size") or 1
        )
        if not check.before.size:
            raise ConfigError("no image could be read from " + " ".join(data))
        lines.extend(_check_lines(check, settings.register_norm_threshold))
        if html_path:
            facts = [("encoder", ns.encoder.describe()), ("neurons", ns.count)]
            _write_text(
                Path(html_path), _html_report(f"Register check: {encoder}", facts, None, check)
            )
            lines.append(f"wrote {html_path}")
    click.echo("\n".join(lines))
