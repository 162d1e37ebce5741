"""Several heads in one pass: task configs (TOML / ``--task``), TaskSpecs, ``Segmenter.run``.

Why: a site that wants anomaly maps *and* open-vocabulary labels *and* a referring mask for each
image should decode each image once and run each encoder once per image. Every head asks the
image's :class:`~zsdense.context.ImageContext` for encoder outputs (``ctx.get`` /
``ctx.sam_state``), so running all heads on the *same* contexts shares those outputs; the
runners build one context per image and hand it to every task.

A task config is a plain dict (picklable, so Ray workers can rebuild the heads)::

    {"task": "anomaly", "preset": "crane", "object_name": "screw"}
    {"task": "openvocab", "preset": "trident", "classes": ["cat", "sofa"]}
    {"task": "refer", "text": "the cat on the left"}
    {"task": "mypkg.heads:make_spec", ...}       # a callable (seg, **options) -> TaskSpec

The TOML file of ``zsdense run --config run.toml`` holds one table per task (the table name is
the task; ``name`` renames it when the same head runs twice)::

    [anomaly]
    preset = "crane"
    object = "screw"

    [openvocab]
    preset = "trident"
    classes = ["cat", "sofa", "background"]

    [refer]
    text = "the cup left of the laptop"

    [[task]]                       # any number of extra heads, e.g. a custom callable
    task = "mypkg.heads:make_spec"
    name = "custom"
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from zsdense.context import ImageContext
from zsdense.engine.local import TaskSpec
from zsdense.errors import ConfigError

TASK_ALIASES = {
    "anomaly": "anomaly",
    "openvocab": "openvocab",
    "open_vocab": "openvocab",
    "open-vocab": "openvocab",
    "refer": "refer",
    "referring": "refer",
}
# option spellings accepted in configs -> the keyword of the task function
_OPTION_ALIASES = {
    "anomaly": {"object": "object_name"},
    "openvocab": {},
    "refer": {"expression": "text"},
}
_META_KEYS = ("task", "name", "fmt", "overlay")


# ---- configs ------------------------------------------------------------------------------


def parse_task_option(value: str) -> dict:
    """``--task`` value -> config: ``anomaly``, ``anomaly:crane+`` (preset), ``mod.sub:func``
    (a callable ``(seg, **options) -> TaskSpec``), with ``key=value`` options after a comma:
    ``openvocab:trident,classes=cat;sofa`` (``;`` separates list items)."""
    head, _, rest = value.partition(",")
    cfg: dict[str, Any] = {}
    name, _, preset = head.partition(":")
    name = name.strip()
    if name.lower() in TASK_ALIASES:
        cfg["task"] = TASK_ALIASES[name.lower()]
        if preset.strip():
            cfg["preset"] = preset.strip()
    elif preset and ("." in name or name.isidentifier()):
        cfg["task"] = f"{name}:{preset.strip()}"
    else:
        raise ConfigError(
            f"unknown task {value!r}; use anomaly[:preset], openvocab[:preset], refer[:preset] "
            "or module.path:callable"
        )
    for part in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = part.partition("=")
        if not eq:
            raise ConfigError(f"--task option {part!r} must be key=value")
        cfg[k.strip()] = [s.strip() for s in v.split(";") if s.strip()] if ";" in v else v.strip()
    return cfg


def load_run_config(path: str | Path) -> tuple[list[dict], dict]:
    """Read a run TOML: returns (task configs, the optional ``[run]`` table)."""
    path = Path(path)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise ConfigError(
                "reading --config needs 'tomli' on Python 3.10: pip install tomli"
            ) from exc
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return tasks_from_mapping(data, source=str(path))


def tasks_from_mapping(data: dict, source: str = "config") -> tuple[list[dict], dict]:
    """The TOML schema (module docstring) as a dict -> (task configs, run table)."""
    tasks: list[dict] = []
    run = dict(data.get("run", {}) or {})
    for key, value in data.items():
        if key == "run":
            continue
        if key == "task":
            entries = value if isinstance(value, list) else [value]
            for entry in entries:
                if not isinstance(entry, dict) or "task" not in entry:
                    raise ConfigError(f"{source}: every [[task]] table needs a 'task' key")
                cfg = dict(entry)
                if cfg["task"].lower() in TASK_ALIASES:
                    cfg["task"] = TASK_ALIASES[cfg["task"].lower()]
                tasks.append(cfg)
            continue
        if key.lower() not in TASK_ALIASES:
            raise ConfigError(
                f"{source}: unknown table [{key}]; use [anomaly], [openvocab], [refer], "
                "[[task]] or [run]"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table of options")
        tasks.append({"task": TASK_ALIASES[key.lower()], **value})
    names = [task_name(c) for c in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{source}: task name(s) {', '.join(dup)} used twice; add name = '...'")
    return tasks, run


def task_name(cfg: dict) -> str:
    """The name used in output file names and manifest fields."""
    if cfg.get("name"):
        return str(cfg["name"])
    t = str(cfg["task"])
    return t.rsplit(":", 1)[-1] if ":" in t else t


def _normalise_options(kind: str, cfg: dict) -> dict:
    opts = {k: v for k, v in cfg.items() if k not in _META_KEYS}
    for src, dst in _OPTION_ALIASES.get(kind, {}).items():
        if src in opts:
            opts[dst] = opts.pop(src)
    return opts


# ---- results -> files ---------------------------------------------------------------------


def _scalar(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def write_result(
    result: Any,
    ctx: ImageContext,
    stem: Path,
    params: dict,
    *,
    fmt: str = "tiff",
    overlay: bool = True,
) -> dict:
    """Write any zsdense result next to ``stem``, by what it holds.

    Anomaly (``anomaly_map``): ``.mask.png``, ``.map.tiff|.npy``, overlay with heat + outline.
    Open-vocab (``labels``): ``.mask.png`` label PNG (palette), ``.map.*`` probabilities
    (K, H, W), overlay with legend. Referring (``mask`` + ``score``): ``.mask.png``, overlay with
    the expression as caption. ``fmt='rle'`` adds ``.rle.json`` for binary masks.
    """
    from zsdense.io import (
        mask_to_rle,
        write_label_png,
        write_map_npy,
        write_map_tiff,
        write_mask_png,
        write_overlay_jpg,
        write_rle_json,
    )

    stem = Path(stem)
    outputs: dict[str, str] = {}
    scores: dict[str, Any] = {}

    def write_map(arr: np.ndarray, metadata: dict | None = None) -> None:
        if fmt == "npy":
            outputs["map"] = str(write_map_npy(f"{stem}.map.npy", arr))
        elif fmt in ("tiff", "rle"):
            outputs["map"] = str(write_map_tiff(f"{stem}.map.tiff", arr, metadata=metadata))

    amap = getattr(result, "anomaly_map", None)
    labels = getattr(result, "labels", None)
    mask = getattr(result, "mask", None)
    if amap is not None:
        outputs["mask"] = str(write_mask_png(f"{stem}.mask.png", mask))
        write_map(np.asarray(amap, dtype=np.float32))
        scores["score"] = float(result.score)
        if getattr(result, "label", None) is not None:
            scores["label"] = bool(result.label)
        scores["threshold"] = _scalar(getattr(result, "threshold", None))
        if overlay:
            outputs["overlay"] = str(
                write_overlay_jpg(
                    f"{stem}.overlay.jpg",
                    ctx.image,
                    heat=amap,
                    mask=mask,
                    caption=f"anomaly score {float(result.score):.3f}",
                )
            )
    elif labels is not None:
        names = list(getattr(result, "class_names", []) or [])
        outputs["mask"] = str(write_label_png(f"{stem}.mask.png", labels))
        probs = getattr(result, "probs", None)
        if probs is not None:
            write_map(np.asarray(probs, dtype=np.float32), {"class_names": names})
        counts = np.bincount(np.asarray(labels).ravel(), minlength=len(names))
        total = max(int(counts.sum()), 1)
        scores["area"] = {
            names[i] if i < len(names) else str(i): round(int(c) / total, 6)
            for i, c in enumerate(counts)
            if c
        }
        if overlay:
            outputs["overlay"] = str(
                write_overlay_jpg(
                    f"{stem}.overlay.jpg", ctx.image, labels=labels, class_names=names
                )
            )
    elif mask is not None:
        outputs["mask"] = str(write_mask_png(f"{stem}.mask.png", mask))
        scores["score"] = float(getattr(result, "score", 0.0))
        if overlay:
            text = params.get("text") or getattr(result, "meta", {}).get("text")
            outputs["overlay"] = str(
                write_overlay_jpg(
                    f"{stem}.overlay.jpg", ctx.image, mask=mask, caption=str(text) if text else None
                )
            )
    else:
        raise TypeError(f"cannot write a result of type {type(result).__name__}")
    if fmt == "rle" and mask is not None and labels is None:
        outputs["rle"] = str(write_rle_json(f"{stem}.rle.json", mask_to_rle(mask)))
    meta = dict(getattr(result, "meta", {}) or {})
    return {"outputs": outputs, "scores": scores, "meta": meta}


# ---- configs -> TaskSpecs -----------------------------------------------------------------


def _import_callable(spec: str) -> Callable:
    module, _, attr = spec.rpartition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"task {spec!r}: cannot import module {module!r}: {exc}") from exc
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"task {spec!r}: module {module!r} has no attribute {attr!r}")
    if not callable(obj):
        raise ConfigError(f"task {spec!r} is not callable")
    return obj


def _classes(opts: dict) -> Any:
    """Pop ``classes`` (list or "a, b; synonym" string) / ``classes_file`` from ``opts``."""
    classes = opts.pop("classes", None)
    classes_file = opts.pop("classes_file", None)
    if classes and classes_file:
        raise ConfigError("task openvocab: give classes or classes_file, not both")
    if not classes and not classes_file:
        raise ConfigError("task openvocab needs classes (e.g. classes = ['cat', 'sofa'])")
    try:
        from zsdense.text.classifier import load_class_file, parse_classes
    except ImportError:  # pragma: no cover - the text module is part of the package
        if isinstance(classes, str):
            return [c.strip() for c in classes.split(",") if c.strip()]
        return classes
    return load_class_file(classes_file) if classes_file else parse_classes(classes)


def _command_task(seg, kind: str, options: dict, fmt: str, overlay: bool) -> TaskSpec | None:
    """The TaskSpec that the single-task command (``zsdense anomaly`` ...) builds, so that
    ``zsdense run`` writes the same files and manifest scores; None without the CLI package."""
    opts = dict(options)
    try:
        if kind == "anomaly":
            from zsdense.cli.anomaly import anomaly_task

            preset = opts.pop("preset", "crane")
            object_name = opts.pop("object_name", None)
            return anomaly_task(
                seg, object_name=object_name, preset=preset, options=opts, fmt=fmt, overlay=overlay
            )
        if kind == "openvocab":
            from zsdense.cli.openvocab import openvocab_task

            preset = opts.pop("preset", "trident")
            dataset = opts.pop("dataset", None)
            classes = _classes(opts)
            return openvocab_task(
                seg,
                classes=classes,
                preset=preset,
                dataset=dataset,
                fmt=fmt,
                overlay=overlay,
                options=opts,
            )
        if kind == "refer":
            from zsdense.cli.refer import refer_task

            text = opts.pop("text", None)
            preset = opts.pop("preset", None)
            return refer_task(seg, text=text, preset=preset, fmt=fmt, overlay=overlay, options=opts)
    except ImportError:
        return None
    return None


def task_runner(seg, kind: str, options: dict) -> Callable[[list[ImageContext], list[dict]], list]:
    """``run(ctxs, params)`` for a built-in head, calling the task function of the API."""
    opts = dict(options)
    if kind == "anomaly":
        from zsdense.tasks.anomaly import run_anomaly

        preset = opts.pop("preset", "crane")
        object_name = opts.pop("object_name", None)
        return lambda ctxs, params: run_anomaly(
            seg, ctxs, object_name=object_name, preset=preset, **opts
        )
    if kind == "openvocab":
        from zsdense.tasks.openvocab import run_open_vocab

        preset = opts.pop("preset", "trident")
        classes = _classes(opts)
        return lambda ctxs, params: run_open_vocab(
            seg, ctxs, classes=classes, preset=preset, **opts
        )
    if kind == "refer":
        from zsdense.tasks.referring import run_refer

        preset = opts.pop("preset", None)
        text = opts.pop("text", None)

        def run(ctxs, params):
            texts = [p.get("text") or text for p in params]
            if any(not t for t in texts):
                raise ConfigError("task refer needs a text (text = '...' or a queries file)")
            return run_refer(seg, ctxs, texts, preset=preset, **opts)

        return run
    raise ConfigError(f"unknown task {kind!r}")


def build_task_spec(seg, cfg: dict | str, *, fmt: str = "tiff", overlay: bool = True) -> TaskSpec:
    """One task config -> a :class:`TaskSpec` bound to ``seg``."""
    if isinstance(cfg, str):
        cfg = parse_task_option(cfg)
    cfg = dict(cfg)
    kind = str(cfg.get("task", ""))
    name = task_name(cfg)
    fmt = cfg.get("fmt", fmt)
    overlay = bool(cfg.get("overlay", overlay))
    if ":" in kind and kind.split(":", 1)[0] not in TASK_ALIASES:
        factory = _import_callable(kind)
        opts = {k: v for k, v in cfg.items() if k not in ("task",)}
        opts.setdefault("name", name)
        opts.setdefault("fmt", fmt)
        opts.setdefault("overlay", overlay)
        spec = factory(seg, **opts)
        if not isinstance(spec, TaskSpec):
            raise ConfigError(f"task {kind!r} must return a TaskSpec, got {type(spec).__name__}")
        return spec
    kind = TASK_ALIASES.get(kind.lower(), kind)
    if kind not in ("anomaly", "openvocab", "refer"):
        raise ConfigError(f"unknown task {kind!r}; use anomaly, openvocab, refer or mod:callable")
    options = _normalise_options(kind, cfg)
    if kind == "openvocab":
        _classes(dict(options))  # a missing class list is a ConfigError before any work
    spec = _command_task(seg, kind, options, fmt, overlay)
    if spec is not None:
        spec.name = name
        return spec
    run = task_runner(seg, kind, options)
    group = "all" if kind == "anomaly" and str(options.get("preset", "")) == "musc" else "batch"

    def write(result, ctx, stem, params):
        return write_result(result, ctx, stem, params, fmt=fmt, overlay=overlay)

    return TaskSpec(name=name, run=run, write=write, group=group)


def build_task_specs(
    seg, cfgs: Sequence[dict | str], *, fmt: str = "tiff", overlay: bool = True
) -> list[TaskSpec]:
    """Task configs -> TaskSpecs (names must be unique: they name the output files).

    Heads that need SAM's last-block attention (open-vocab) run first, so the one SAM encoding
    of an image captures it and every later head (referring) reuses that encoding.
    """
    cfgs = sorted(cfgs, key=_sam_attention_first)
    specs = [build_task_spec(seg, c, fmt=fmt, overlay=overlay) for c in cfgs]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"task name(s) {', '.join(dup)} given twice; set name=... on one")
    return specs


def _sam_attention_first(cfg: dict | str) -> int:
    """Sort key: open-vocab tasks (which capture SAM's attention) before the others."""
    kind = cfg if isinstance(cfg, str) else str(cfg.get("task", ""))
    kind = kind.split(":", 1)[0].lower()
    return 0 if TASK_ALIASES.get(kind, kind) == "openvocab" else 1


# ---- the Python API: Segmenter.run --------------------------------------------------------


def run_tasks(seg, image_or_ctx: Any, tasks: Sequence[dict | str]) -> dict[str, Any]:
    """Run several heads on one image with one shared encoder pass; ``{task name: result}``.

    ``tasks`` items are task configs (see the module docstring) or strings: ``"anomaly"``,
    ``{"task": "openvocab", "classes": [...]}``, ``{"task": "refer", "text": "..."}``. The image
    is decoded once and every encoder output is computed at most once (``ctx.computed``).
    """
    ctx = seg.context(image_or_ctx)
    cfgs = [parse_task_option(t) if isinstance(t, str) else dict(t) for t in tasks]
    if not cfgs:
        raise ConfigError("run() needs at least one task")
    out: dict[str, Any] = {}
    order = {task_name(c): i for i, c in enumerate(cfgs)}
    for cfg in sorted(cfgs, key=_sam_attention_first):
        name = task_name(cfg)
        if name in out:
            raise ConfigError(f"task name {name!r} given twice; set 'name' on one")
        kind = str(cfg.get("task"))
        if ":" in kind and kind.split(":", 1)[0] not in TASK_ALIASES:
            spec = build_task_spec(seg, cfg)
            out[name] = spec.run([ctx], [{}])[0]
            continue
        kind = TASK_ALIASES.get(kind.lower(), kind)
        if kind not in ("anomaly", "openvocab", "refer"):
            raise ConfigError(f"unknown task {kind!r}")
        out[name] = task_runner(seg, kind, _normalise_options(kind, cfg))([ctx], [{}])[0]
    return {k: out[k] for k in sorted(out, key=order.__getitem__)}
