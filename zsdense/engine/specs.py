"""What a task runs per image and what it writes: :class:`TaskSpec`, built from typed options.

Every face builds its specs here: ``zsdense anomaly|openvocab|refer`` (one spec from the
command's options), ``zsdense run`` and Ray workers (specs from task configs), ``Segmenter.run``
and the evaluation package. So one image gives the same files and manifest fields whichever way
it ran.

A task config is a plain dict (picklable, so Ray workers can rebuild the heads)::

    {"task": "anomaly", "preset": "crane", "object_name": "screw"}
    {"task": "openvocab", "preset": "trident", "classes": ["cat; kitten", "sofa"]}
    {"task": "refer", "text": "the cat on the left"}
    {"task": "mypkg.heads:make_spec", ...}       # a callable (rt, **options) -> TaskSpec

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

Options are validated once, when the config becomes a typed options object
(:mod:`zsdense.options`): an unknown option, preset or dataset fails before any model loads.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from zsdense.context import ImageContext
from zsdense.errors import ConfigError
from zsdense.io.writers import to_jsonable
from zsdense.options import (
    AnomalyOptions,
    OpenVocabOptions,
    OutputOptions,
    ReferOptions,
    options_for,
)
from zsdense.tasks import anomaly_methods as anomaly_scorers
from zsdense.tasks import openvocab as openvocab_head
from zsdense.tasks import referring as refer_head


@dataclass
class TaskSpec:
    """A head bound to its options.

    ``run(ctxs, params)`` returns one result per context (same order). ``write(result, ctx,
    out_stem, params)`` writes the result's files next to ``out_stem`` and returns
    ``{"outputs": {name: path}, "scores": {...}, "meta": {...}}``. ``group="all"`` hands the
    whole set of readable images to ``run`` at once (batch-level methods such as ``musc``).
    ``setup()`` loads what the head needs (models, weights, prompt checkpoints): the engines
    call it before the first input, so a missing checkpoint fails the run once, not every image.
    ``settings`` is what changes the outputs (JSON-able), recorded with the run.
    """

    name: str
    run: Callable[[list[ImageContext], list[dict]], list[Any]]
    write: Callable[[Any, ImageContext, Path, dict], dict]
    group: str = "batch"
    setup: Callable[[], None] | None = None
    settings: dict = field(default_factory=dict)


def _head_spec(
    kind: str, name: str, run, opts: Any, out: OutputOptions, setup, **extra
) -> TaskSpec:
    """A head's task: its ``run``, the result's own ``write`` with the output options, its
    ``setup`` and the options recorded as the task's settings."""

    def write(result: Any, ctx: ImageContext, stem: Path, params: dict) -> dict:
        return result.write(stem, ctx.image, out, params)

    return TaskSpec(
        name=name, run=run, write=write, setup=setup, settings=_settings(kind, opts, out), **extra
    )


def _settings(kind: str, opts: Any, out: OutputOptions) -> dict:
    """The options as JSON-able settings (values that are not, e.g. arrays, by their repr)."""
    d = asdict(opts)
    d.pop("classes_file", None)
    for k, v in d.items():
        try:
            to_jsonable(v)
        except TypeError:
            d[k] = repr(v)
    return {"task": kind, **d, "output": asdict(out)}


def anomaly_spec(
    rt, opts: AnomalyOptions, out: OutputOptions = OutputOptions(), name: str = "anomaly"
) -> TaskSpec:
    """Anomaly maps, masks and scores per batch (the whole readable set for a scorer that
    declares ``group="all"``, e.g. ``musc``). At setup the preset's scorer prepares once what
    it needs (models, the memory of good references and their statistics) and the run's
    thresholds are decided (calibration included), before the first input."""
    scorer = anomaly_scorers.check_options(opts)
    state: dict[str, Any] = {}

    def setup() -> None:
        state["prepared"] = anomaly_scorers.prepare(rt, opts)

    def run(ctxs: list[ImageContext], params: list[dict]) -> list:
        if "prepared" not in state:
            setup()
        return anomaly_scorers.run(rt, ctxs, opts, state["prepared"])

    return _head_spec("anomaly", name, run, opts, out, setup, group=scorer.group)


def openvocab_spec(
    rt, opts: OpenVocabOptions, out: OutputOptions = OutputOptions(), name: str = "openvocab"
) -> TaskSpec:
    """Label maps over the options' classes; probabilities only with ``save_probs``."""
    if not opts.save_probs:
        out = OutputOptions(fmt="none", overlay=out.overlay)

    def run(ctxs: list[ImageContext], params: list[dict]) -> list:
        return openvocab_head.run_open_vocab(rt, ctxs, opts)

    setup = lambda: openvocab_head.load_encoders(rt, opts)  # noqa: E731
    return _head_spec("openvocab", name, run, opts, out, setup)


def refer_spec(
    rt, opts: ReferOptions, out: OutputOptions = OutputOptions(), name: str = "refer"
) -> TaskSpec:
    """One mask per (image, expression); the expression is the input's ``text`` param (queries
    files) or the options' ``text``. Queries on one image share its context (the engines give
    them the same one), so SAM and the mask features run once per image."""

    def run(ctxs: list[ImageContext], params: list[dict]) -> list:
        texts = [p.get("text") or opts.text for p in params]
        if any(not t for t in texts):
            raise ConfigError("task refer needs a text (--text, text = '...' or a queries file)")
        return refer_head.run_refer(rt, ctxs, texts, opts)

    setup = lambda: refer_head.load_encoders(rt, opts)  # noqa: E731
    return _head_spec("refer", name, run, opts, out, setup)


# task name -> spec builder; the option types are zsdense.options.TASK_OPTIONS
TASK_SPECS: dict[str, Callable[..., TaskSpec]] = {
    "anomaly": anomaly_spec,
    "openvocab": openvocab_spec,
    "refer": refer_spec,
}
TASK_ALIASES = {
    "anomaly": "anomaly",
    "openvocab": "openvocab",
    "open_vocab": "openvocab",
    "open-vocab": "openvocab",
    "refer": "refer",
    "referring": "refer",
}
META_KEYS = ("task", "name", "fmt", "overlay")


# ---- configs ------------------------------------------------------------------------------


def parse_task_option(value: str) -> dict:
    """``--task`` value -> config: ``anomaly``, ``anomaly:crane+`` (preset), ``mod.sub:func``
    (a callable ``(rt, **options) -> TaskSpec``), with ``key=value`` options after a comma.

    ``,`` separates the options, so a value that is a list separates its items with ``|``:
    ``openvocab:trident,classes=cat;kitten|sofa`` is two classes, the first with the synonyms
    cat and kitten (``;`` joins synonyms everywhere, as in ``--classes "cat;kitten, sofa"``).
    Values are text; the options give them their field's type (numbers, true/false)."""
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
        cfg[k.strip()] = [s.strip() for s in v.split("|")] if "|" in v else v.strip()
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


def _is_custom(kind: str) -> bool:
    return ":" in kind and kind.split(":", 1)[0].lower() not in TASK_ALIASES


def build_task_spec(rt, cfg: dict | str, *, fmt: str = "tiff", overlay: bool = True) -> TaskSpec:
    """One task config -> a :class:`TaskSpec` bound to ``rt`` (options validated here)."""
    if isinstance(cfg, str):
        cfg = parse_task_option(cfg)
    cfg = dict(cfg)
    kind = str(cfg.get("task", ""))
    name = task_name(cfg)
    out = OutputOptions(fmt=cfg.get("fmt", fmt), overlay=bool(cfg.get("overlay", overlay)))
    if _is_custom(kind):
        factory = _import_callable(kind)
        opts = {k: v for k, v in cfg.items() if k != "task"}
        opts.setdefault("name", name)
        opts.setdefault("fmt", out.fmt)
        opts.setdefault("overlay", out.overlay)
        spec = factory(rt, **opts)
        if not isinstance(spec, TaskSpec):
            raise ConfigError(f"task {kind!r} must return a TaskSpec, got {type(spec).__name__}")
        return spec
    kind = TASK_ALIASES.get(kind.lower(), kind)
    if kind not in TASK_SPECS:
        raise ConfigError(f"unknown task {kind!r}; use anomaly, openvocab, refer or mod:callable")
    opts = options_for(kind, {k: v for k, v in cfg.items() if k not in META_KEYS})
    return TASK_SPECS[kind](rt, opts, out, name=name)


def build_task_specs(
    rt, cfgs: Sequence[dict | str], *, fmt: str = "tiff", overlay: bool = True
) -> list[TaskSpec]:
    """Task configs -> TaskSpecs (names must be unique: they name the output files).

    Heads that need SAM's last-block attention (open-vocab) run first, so the one SAM encoding
    of an image captures it and every later head (referring) reuses that encoding.
    """
    cfgs = sorted(cfgs, key=_sam_attention_first)
    specs = [build_task_spec(rt, c, fmt=fmt, overlay=overlay) for c in cfgs]
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


def run_tasks(rt, image_or_ctx: Any, tasks: Sequence[dict | str]) -> dict[str, Any]:
    """Run several heads on one image with one shared encoder pass; ``{task name: result}``.

    ``tasks`` items are task configs (see the module docstring) or strings: ``"anomaly"``,
    ``{"task": "openvocab", "classes": [...]}``, ``{"task": "refer", "text": "..."}``. The image
    is decoded once and every encoder output is computed at most once (``ctx.computed``).
    """
    ctx = rt.context(image_or_ctx)
    cfgs = [parse_task_option(t) if isinstance(t, str) else dict(t) for t in tasks]
    if not cfgs:
        raise ConfigError("run() needs at least one task")
    order = {task_name(c): i for i, c in enumerate(cfgs)}
    out: dict[str, Any] = {}
    for spec in build_task_specs(rt, cfgs):
        out[spec.name] = spec.run([ctx], [{}])[0]
    return {k: out[k] for k in sorted(out, key=order.__getitem__)}
