"""``zsdense memory build | info``: a few-shot memory bank from known-good images, kept on disk.

``zsdense memory build GOOD... --out bank.zsdmem`` extracts the AnomalyDINO memory (DINOv2 patch
features of the good images and their rotations, foreground masks, settings, model id and
weights SHA-256) once; ``zsdense anomaly DATA --reference bank.zsdmem`` then scores against it
without touching the good images again. A bank made with another model or other settings is
refused when used.
"""

from __future__ import annotations

import json
import sys
import time

import click

from zsdense.cli.common import (
    make_runtime,
    option,
    out_option,
    preset_option,
    runtime_options,
    shots_option,
    thresholds_option,
)
from zsdense.config import FEWSHOT_PRESET_NAMES, KNN_METRICS
from zsdense.errors import ConfigError


@click.group("memory")
def memory_group() -> None:
    """Build and inspect few-shot memory banks (.zsdmem)."""


@memory_group.command("build")
@click.argument("good", nargs=-1, required=True)
@out_option("The bank file to write (.zsdmem).", dest="out_path")
@preset_option(FEWSHOT_PRESET_NAMES, "anomalydino", "Few-shot method and its published settings.")
@option("--model", "model_name", help="DINOv2 registry name (dinov2-small).")
@option("--image-size", type=click.IntRange(min=14), help="Smaller edge (448).")
@shots_option("Use the first N images.")
@option("--object", "object_name", help="Object name (decides masking).")
@option("--dataset", help="mvtec | visa: the reference's per-dataset masking/rotation table.")
@option(
    "--preprocess", default="agnostic", show_default=True,
    help="The reference's preprocessing mode (agnostic, informed, masking_only, ...).",
)  # fmt: skip
@option("--rotation/--no-rotation", default=None, help="8 rotations of each good image.")
@option("--masking/--no-masking", default=None, help="PCA foreground masking.")
@option("--mask-ref-images", is_flag=True, default=None, help="Also mask the good images' patches.")
@option(
    "--knn-metric", choices=KNN_METRICS,
    help="L2_normalized (1 - cos, the paper) or L2 on raw features.",
)  # fmt: skip
@option(
    "--crane-preset",
    help="Also store Crane's statistics on these images (crane+fewshot from the bank).",
)
@thresholds_option(
    "Keep these thresholds (a thresholds.json from a calibrated run, `zsdense decide` or "
    "`zsdense eval anomaly`) in the bank: `zsdense anomaly --reference BANK` then uses them "
    "when no threshold option is given."
)
@option("--force", is_flag=True, default=False, help="Overwrite an existing bank.")
@runtime_options
def build_cmd(
    good,
    out_path,
    preset,
    model_name,
    image_size,
    shots,
    object_name,
    dataset,
    preprocess,
    rotation,
    masking,
    mask_ref_images,
    knn_metric,
    crane_preset,
    thresholds_file,
    force,
    **runtime,
) -> None:
    """Build a memory bank from GOOD images (files, folders, globs; read in name order)."""
    from pathlib import Path

    from zsdense.io import list_inputs
    from zsdense.io.membank import describe, save_memory
    from zsdense.io.progress import progress_scope
    from zsdense.tasks import fewshot as fs

    out = Path(out_path)
    kept = None
    if thresholds_file:
        from zsdense.io.thresholds import read_thresholds

        kept = read_thresholds(thresholds_file).to_dict()  # checked before any model loads
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    items = sorted(list_inputs(list(good)), key=lambda it: str(it.path))
    if not items:
        raise ConfigError("no good images found in " + " ".join(good))
    opts = fs.options_for(
        object_name,
        dataset,
        preprocess,
        model=model_name,
        image_size=image_size,
        shots=shots,
        rotation=rotation,
        masking=masking,
        mask_ref_images=mask_ref_images,
        knn_metric=knn_metric,
    )
    rt = make_runtime(**runtime)
    t0 = time.perf_counter()
    paths = [str(it.path) for it in items]
    rt.dinov2(opts.model)  # loaded (cached) first: a --registers file for another encoder
    if not crane_preset:  # is refused before the reference pass
        rt.check_registers_used()
    with progress_scope(True):  # the reference pass and Crane's statistics show progress
        bank = fs.build_memory(rt, paths, opts)
        if crane_preset:
            fs.add_crane_stats(rt, bank, paths[: bank.n_shots], crane_preset, object_name)
            rt.check_registers_used()
    if kept is not None:
        bank.extra["thresholds"] = kept
    save_memory(bank, out)
    summary = describe(bank)
    summary.update(
        path=str(out),
        preset=preset,
        seconds=round(time.perf_counter() - t0, 3),
        bytes=out.stat().st_size,
        references=bank.names,
    )
    if rt.random_weights:
        summary["warning"] = "random weights — not meaningful"
    click.echo(json.dumps(summary, indent=1, default=str))


@memory_group.command("info")
@click.argument("bank", type=click.Path(dir_okay=False))
def info_cmd(bank: str) -> None:
    """Print a bank's header (settings, model, shots) after checking it loads intact."""
    from zsdense.io.membank import describe, load_memory, read_header

    header = read_header(bank)
    load_memory(bank)  # checksum: a damaged file is an error here, not at scoring time
    out = describe(header)
    out.update(names=header.get("names"), extra=header.get("extra"))
    json.dump(out, sys.stdout, indent=1, default=str)
    click.echo()
