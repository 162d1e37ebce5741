"""``zsdense run``: several tasks in one pass over a data set, locally or on Ray."""

from __future__ import annotations

import click

from zsdense.cli.common import (
    RUNTIME_KEYS,
    no_inputs_error,
    option,
    print_summary,
    register_values,
    task_command,
)
from zsdense.config import DEFAULT_BATCH_SIZE, ENGINE, ENGINES
from zsdense.errors import ConfigError

RUN_TABLE_KEYS = (
    "batch_size",
    "models",
    "device",
    "precision",
    "max_pixels",
    "registers",  # a string or a list: auto, off, neurons.json files
    "registers_count",
    "registers_mode",
    "registers_batch",
    "allocator",
)


@click.command("run")
@click.argument("data", nargs=-1, required=True)
@option(
    "--config", "config_path", type=click.Path(dir_okay=False),
    help="TOML file: one table per task ([anomaly], [openvocab], [refer], [[task]]).",
)  # fmt: skip
@option(
    "--task", "task_opts", multiple=True, metavar="TASK[:PRESET][,k=v...]",
    help="Add a task: anomaly[:preset], openvocab[:preset], refer[:preset] or module:callable; "
    "options after commas, list items separated by '|' (classes=cat;kitten|sofa: two classes, "
    "';' joins synonyms as in --classes). Repeatable.",
)  # fmt: skip
@option("--object", "object_name", help="Object name for the anomaly task (e.g. screw).")
@option("--classes", help='Classes of the openvocab task, as openvocab\'s: "cat; kitten, sofa".')
@option("--text", help="Referring expression for the refer task.")
@option(
    "--engine", choices=ENGINES, default="local", show_default=True,
    help="local: one process (threads decode ahead); ray: Ray Data actor pool.",
)  # fmt: skip
@option("--ray-address", help="Ray cluster to join ('auto' or host:port); default: a local Ray.")
@option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True,
    help="Ray engine: number of model actors (each holds its own models).",
)  # fmt: skip
@option(
    "--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
    help="Ray engine: GPUs reserved per actor (0 on CPU-only machines).",
)  # fmt: skip
@option(
    "--read-workers", type=click.IntRange(min=1), default=ENGINE.read_workers, show_default=True,
    help="Local engine: decoding threads running ahead of the encoders.",
)  # fmt: skip
@option("--no-report", is_flag=True, help="Do not write report.html.")
@task_command
def run_cmd(data, config_path, task_opts, object_name, classes, text, batch, **engine) -> int:
    """Run several tasks over DATA in one pass: each image is decoded once and each encoder
    output (CLIP, DINOv2, SAM) computed at most once per image, shared by all heads.

    \b
    Examples:
      zsdense run scans/ --out res --config run.toml
      zsdense run imgs/ --out res --task anomaly:crane --object screw \\
          --task openvocab --classes "screw,background"
      zsdense run imgs/ --out res --task "openvocab:sclip,classes=cat;kitten|sofa"

    \b
    run.toml:
      [anomaly]
      preset = "crane"
      object = "screw"
      [openvocab]
      preset = "trident"
      classes = ["cat", "sofa", "background"]
      [refer]
      text = "the cup left of the laptop"
      [run]            # optional defaults for runtime options
      batch_size = 8
      registers = "auto"   # or a neurons.json, or a list of them

    Outputs go to OUT mirroring the input tree (<name>.<task>.mask.png, .map.tiff, .overlay.jpg
    when several tasks run), one line per image in OUT/results.jsonl and OUT/report.html. A rerun
    resumes; --force redoes everything, --retry-errors the failures.

    Exit codes: 0 all ok, 2 usage or setup error, 3 some inputs failed, 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM); after 130/143 rerun the same command to resume.
    """
    from zsdense.engine.specs import load_run_config, parse_task_option

    cfgs: list[dict] = []
    run_table: dict = {}
    if config_path:
        cfgs, run_table = load_run_config(config_path)
    cfgs += [_task_config(t, parse_task_option) for t in task_opts]
    _fill_task_options(cfgs, object_name=object_name, classes=classes, text=text)
    if not cfgs:
        raise ConfigError("no task given: use --config run.toml or --task (see zsdense run -h)")
    unknown = sorted(set(run_table) - set(RUN_TABLE_KEYS))
    if unknown:
        raise ConfigError(
            f"{config_path}: unknown [run] key(s) {', '.join(unknown)}; "
            f"valid: {', '.join(RUN_TABLE_KEYS)}"
        )
    click_ctx = click.get_current_context()
    engine["volume_maps"] = bool(click_ctx.meta.get("zsdense.volume_maps"))  # --volume-maps
    for key in RUN_TABLE_KEYS:  # the [run] table fills options not given on the command line
        source = click_ctx.get_parameter_source(key)
        if key in run_table and source in (None, click.core.ParameterSource.DEFAULT):
            value = run_table[key]
            batch.runtime[key] = register_values(value) if key == "registers" else value
    items = batch.items(data)
    if not items:
        raise no_inputs_error(items)
    summary = _run_ray(items, cfgs, batch, engine) if engine["engine"] == "ray" else None
    if summary is None:
        summary = _run_local(items, cfgs, batch, engine)
    print_summary(summary, batch.out_dir, quiet=batch.quiet)
    return summary.exit_code


def _task_config(value: str, parse) -> dict:
    """One --task value; a note when ';' (synonyms) may have been meant as a class list."""
    cfg = parse(value)
    cls = cfg.get("classes")
    if isinstance(cls, str) and ";" in cls:
        click.echo(
            f"zsdense: note: --task classes={cls!r} is one class with synonyms; separate "
            "classes with '|' (classes=cat;kitten|sofa)",
            err=True,
        )
    return cfg


def _fill_task_options(cfgs: list[dict], **given) -> None:
    """Command-line --object / --classes / --text fill what the task configs leave open."""
    from zsdense.engine.specs import TASK_ALIASES

    for cfg in cfgs:
        kind = TASK_ALIASES.get(str(cfg.get("task")).lower())
        if (
            kind == "anomaly"
            and given["object_name"]
            and not (cfg.get("object") or cfg.get("object_name"))
        ):
            cfg["object_name"] = given["object_name"]
        if kind == "openvocab" and given["classes"] and not cfg.get("classes"):
            cfg["classes"] = given["classes"]  # parsed by the options: "," classes, ";" synonyms
        if kind == "refer" and given["text"] and not cfg.get("text"):
            cfg["text"] = given["text"]


def _run_local(items, cfgs: list[dict], batch, engine: dict):
    from zsdense.cli.common import make_runtime
    from zsdense.engine.local import run_batch
    from zsdense.engine.specs import build_task_specs

    rt = make_runtime(**batch.runtime)
    specs = build_task_specs(rt, cfgs, fmt=batch.fmt, overlay=batch.overlay)
    return run_batch(
        rt,
        items,
        batch.out_dir,
        specs,
        force=batch.force,
        retry_errors=batch.retry_errors,
        progress=not batch.quiet,
        read_workers=engine["read_workers"],
        report=not engine["no_report"],
        volume_maps=engine["volume_maps"],
    )


def _run_ray(items, cfgs: list[dict], batch, engine: dict):
    from zsdense.engine.ray_runner import run_ray

    return run_ray(
        items,
        batch.out_dir,
        cfgs,
        seg_kwargs=_seg_kwargs(batch.runtime),
        fmt=batch.fmt,
        overlay=batch.overlay,
        force=batch.force,
        retry_errors=batch.retry_errors,
        batch_size=int(batch.runtime.get("batch_size") or DEFAULT_BATCH_SIZE),
        workers=engine["workers"],
        gpus_per_worker=engine["gpus_per_worker"],
        address=engine["ray_address"],
        progress=not batch.quiet,
        report=not engine["no_report"],
        volume_maps=engine["volume_maps"],
    )


def _seg_kwargs(runtime: dict) -> dict:
    """The runtime settings Ray actors need (they build their own runtime)."""
    import os

    kw = {k: runtime[k] for k in RUNTIME_KEYS if k != "offline" and runtime.get(k) is not None}
    if runtime.get("offline"):
        kw["download"] = False
        os.environ["ZSDENSE_OFFLINE"] = "1"
    return kw
