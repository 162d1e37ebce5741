"""``zsdense run``: several tasks in one pass over a data set, locally or on Ray."""

from __future__ import annotations

import click

from zsdense.cli.common import (
    batch_command,
    list_data,
    make_runtime,
    no_inputs_error,
    print_summary,
)
from zsdense.config import DEFAULT_BATCH_SIZE
from zsdense.errors import ConfigError

RUN_TABLE_KEYS = ("batch_size", "models", "device", "precision", "max_pixels")


@click.command("run")
@click.argument("data", nargs=-1, required=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML file: one table per task ([anomaly], [openvocab], [refer], [[task]]).",
)
@click.option(
    "--task",
    "task_opts",
    multiple=True,
    metavar="TASK[:PRESET][,k=v...]",
    help="Add a task: anomaly[:preset], openvocab[:preset], refer[:preset] or "
    "module:callable; options after commas (classes=a;b). Repeatable.",
)
@click.option(
    "--object", "object_name", default=None, help="Object name for the anomaly task (e.g. screw)."
)
@click.option("--classes", default=None, help="Comma-separated class names for the openvocab task.")
@click.option("--text", default=None, help="Referring expression for the refer task.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: one process (threads decode ahead); ray: Ray Data actor pool.",
)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster to join ('auto' or host:port); default starts a local Ray.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Ray engine: number of model actors (each holds its own models).",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Ray engine: GPUs reserved per actor (0 on CPU-only machines).",
)
@click.option(
    "--read-workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Local engine: decoding threads running ahead of the encoders.",
)
@click.option("--no-report", is_flag=True, default=False, help="Do not write report.html.")
@batch_command
def run_cmd(
    data,
    config_path,
    task_opts,
    object_name,
    classes,
    text,
    engine,
    ray_address,
    workers,
    gpus_per_worker,
    read_workers,
    volume_maps,
    no_report,
    out_dir,
    fmt,
    no_overlay,
    force,
    retry_errors,
    quiet,
    **runtime,
) -> int:
    """Run several tasks over DATA in one pass: each image is decoded once and each encoder
    output (CLIP, DINOv2, SAM) computed at most once per image, shared by all heads.

    \b
    Examples:
      zsdense run scans/ --out res --config run.toml
      zsdense run imgs/ --out res --task anomaly:crane --object screw \\
          --task openvocab --classes "screw,background"

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

    Outputs go to OUT mirroring the input tree (<name>.<task>.mask.png, .map.tiff, .overlay.jpg
    when several tasks run), one line per image in OUT/results.jsonl and OUT/report.html. A rerun
    resumes; --force redoes everything, --retry-errors the failures.

    Exit codes: 0 all ok, 2 usage or setup error, 3 some inputs failed, 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM); after 130/143 rerun the same command to resume.
    """
    from zsdense.engine.specs import (
        TASK_ALIASES,
        build_task_specs,
        load_run_config,
        parse_task_option,
    )

    cfgs: list[dict] = []
    run_table: dict = {}
    if config_path:
        cfgs, run_table = load_run_config(config_path)
    cfgs += [parse_task_option(t) for t in task_opts]
    for cfg in cfgs:  # command-line task options fill what the config leaves open
        kind = TASK_ALIASES.get(str(cfg.get("task")).lower())
        if kind == "anomaly" and object_name and not (cfg.get("object") or cfg.get("object_name")):
            cfg["object_name"] = object_name
        if kind == "openvocab" and classes and not cfg.get("classes"):
            cfg["classes"] = [c.strip() for c in classes.split(",") if c.strip()]
        if kind == "refer" and text and not cfg.get("text"):
            cfg["text"] = text
    if not cfgs:
        raise ConfigError("no task given: use --config run.toml or --task (see zsdense run -h)")
    unknown = sorted(set(run_table) - set(RUN_TABLE_KEYS))
    if unknown:
        raise ConfigError(
            f"{config_path}: unknown [run] key(s) {', '.join(unknown)}; "
            f"valid: {', '.join(RUN_TABLE_KEYS)}"
        )
    click_ctx = click.get_current_context()
    for key in RUN_TABLE_KEYS:  # the [run] table fills options not given on the command line
        source = click_ctx.get_parameter_source(key)
        if key in run_table and source in (None, click.core.ParameterSource.DEFAULT):
            runtime[key] = run_table[key]
    out_fmt = "none" if fmt == "none" else fmt
    items = list_data(data, out_dir, quiet)
    if not items:
        raise no_inputs_error(items)

    if engine == "ray":
        from zsdense.engine.ray_runner import run_ray

        summary = run_ray(
            items,
            out_dir,
            cfgs,
            seg_kwargs=_seg_kwargs(runtime),
            fmt=out_fmt,
            overlay=not no_overlay,
            force=force,
            retry_errors=retry_errors,
            batch_size=int(runtime.get("batch_size") or DEFAULT_BATCH_SIZE),
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            address=ray_address,
            progress=not quiet,
            report=not no_report,
            volume_maps=volume_maps,
        )
    else:
        from zsdense.engine.local import run_batch

        rt = make_runtime(**runtime)
        specs = build_task_specs(rt, cfgs, fmt=out_fmt, overlay=not no_overlay)
        summary = run_batch(
            rt,
            items,
            out_dir,
            specs,
            force=force,
            retry_errors=retry_errors,
            progress=not quiet,
            read_workers=read_workers,
            report=not no_report,
            volume_maps=volume_maps,
        )
    print_summary(summary, out_dir, quiet=quiet)
    return summary.exit_code


def _seg_kwargs(runtime: dict) -> dict:
    """The runtime settings Ray actors need (they build their own runtime)."""
    import os

    kw = {
        k: runtime[k]
        for k in ("models", "device", "precision", "weights_dir", "batch_size", "max_pixels")
        if runtime.get(k) is not None
    }
    if runtime.get("offline"):
        kw["download"] = False
        os.environ["ZSDENSE_OFFLINE"] = "1"
    return kw
