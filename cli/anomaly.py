"""``zsdense anomaly``: anomaly maps, defect masks and image scores (every registered preset)."""

from __future__ import annotations

import click

from zsdense.cli.common import (
    RUNTIME_KEYS,
    batch_command,
    dattn_mean_option,
    list_data,
    make_runtime,
    option,
    preset_option,
    run_cli_batch,
    shots_option,
    thresholds_option,
    upsampler_options,
)
from zsdense.config import ANOMALY_PRESETS, CORRELATION_TYPES, DEFAULT_ANOMALY_PRESET
from zsdense.options import DOMAINS


@click.command("anomaly")
@click.argument("data", nargs=-1, required=True)
@option(
    "--object", "object_name",
    help='Object name for the prompt ensemble ("screw", "pcb"); default "object". '
    "Learned prompts are object-agnostic.",
)  # fmt: skip
@preset_option(
    ANOMALY_PRESETS, DEFAULT_ANOMALY_PRESET,
    "No good images: crane (CLIP ViT-L/14-336, E-Attn), crane+ (plus DINOv2 D-Attn). "
    "A few good images (--reference): anomalydino (kNN to their DINOv2 patches), crane+fewshot "
    "(both, fused). A whole lot of one product: musc (the images score each other; >= 5), "
    "musc-fixed (QuickGELU).",
)  # fmt: skip
@option(
    "--prompts",
    help="learned (default: the published Crane checkpoint for the preset), ensemble "
    "(training-free prompt ensemble), a registry name (crane-mvtec, crane-visa, "
    "crane+-mvtec, crane+-visa, crane+-mvtec-epoch1), a prompt-learner .pth file, or a .json "
    "ensemble (normal_states, abnormal_states, templates).",
)  # fmt: skip
@option(
    "--reference", "reference", multiple=True,
    help="Few-shot presets (anomalydino, crane+fewshot): known-good images (a folder, files or "
    "globs; repeatable) or a memory bank from `zsdense memory build` (.zsdmem).",
)  # fmt: skip
@shots_option("Few-shot: use only the first N reference images (default: all).")
@option(
    "--threshold", type=float,
    help="Pixel threshold on the anomaly map (mask = map >= T). Default: calibrated "
    "with --calibrate-with, else 0.5 (the map is an anomaly probability).",
)  # fmt: skip
@option(
    "--calibrate-with", multiple=True,
    help="Known-good images (a folder, files or globs such as 'good/*.png'; repeatable), scored "
    "with the same preset and settings: the pixel threshold is the max over their maps and the "
    "image threshold the max of their scores.",
)  # fmt: skip
@option(
    "--calibrate-percentile", type=click.FloatRange(0, 100),
    help="With --calibrate-with: use this percentile of the good pixels/scores "
    "instead of the max (e.g. 99.9).",
)  # fmt: skip
@option(
    "--image-threshold", type=float,
    help="Image label = score >= this (no label without it or --calibrate-with).",
)  # fmt: skip
@thresholds_option(
    "thresholds.json from `zsdense decide`, a calibrated run or `zsdense eval anomaly` "
    "(per category: chosen by --object): fills --threshold / --image-threshold where not "
    "given. Refused when made for another preset or model set."
)
@option(
    "--domain", choices=DOMAINS, default="industrial", show_default=True,
    help="medical: the papers' medical settings (crane+: softmax-first fusion and the "
    "epoch-1 checkpoint).",
)  # fmt: skip
@option(
    "--dataset",
    help="Benchmark the data comes from; 'mvtec' selects the VisA-trained prompts as "
    "in the papers (otherwise the MVTec-trained ones).",
)  # fmt: skip
@option(
    "--eattn-layers",
    help="Per-layer E-Attn maps, e.g. 6,12,18,24 (the paper's description; NOT the "
    "published configuration). Default 'as-run': the last block only.",
)  # fmt: skip
@option("--attn-type", choices=CORRELATION_TYPES, help="E-Attn correlation (default qq+kk+vv).")
@dattn_mean_option(
    "crane+: mean of the DINO similarity per image (default; batch-independent) "
    "or over the batch (Crane's exact behaviour, results depend on the batch)."
)
@option(
    "--image-size", type=click.IntRange(min=28),
    help="Model input size (default 518 as the papers; must be a multiple of 14).",
)  # fmt: skip
@upsampler_options(
    "Feature upsampling (anomalydino): bilinear (default: the reference), jafar (the released "
    "JAFAR upsampler for the DINOv2 in use) or jafar:FILE (e.g. from `zsdense train-upsampler`). "
    "The test features are compared with the good patches on a grid --upsampler-scale times "
    "finer.",
    "With --upsampler jafar: cells per patch side (default 2; the search costs scale^2).",
)
@option(
    "--tile", metavar="SIZE[:OVERLAP]",
    help="Large images at full resolution: score SIZE x SIZE tiles (OVERLAP px shared, default "
    "SIZE/8, blended), stitch the maps; the image score is the max over tiles. Reference and "
    "calibration images are tiled alike. --batch-size then counts tiles per encoder batch and "
    "images are read one at a time. Not for musc or a memory bank (README: Large images).",
)  # fmt: skip
@batch_command
def anomaly_cmd(data, out_dir, fmt, no_overlay, force, retry_errors, quiet, **kw) -> int:
    """Anomaly segmentation: per image an anomaly map, a defect mask and a score.

    \b
    Examples:
      zsdense anomaly parts/ --out res --preset crane+
      zsdense anomaly parts/ --out res --calibrate-with good_parts/ --object "metal nut"
      zsdense anomaly lot_42/ --out res --preset musc --threshold 0.3
      zsdense anomaly parts/ --out res --preset anomalydino --reference good/ --shots 4
      zsdense anomaly assets/inspection --out res --models tiny     (offline smoke run)

    Outputs in OUT, mirroring the inputs: <name>.mask.png (0/255 defect mask),
    <name>.map.tiff|npy (float32 anomaly map at the original size), <name>.overlay.jpg, and
    one line per image in OUT/results.jsonl with the score, the label (with an image
    threshold) and the thresholds used.

    Exit codes: 0 all ok, 2 usage or setup error, 3 some images failed, 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM); after 130/143 rerun the same command to resume.
    """
    from zsdense.engine.specs import anomaly_spec
    from zsdense.options import OutputOptions
    from zsdense.tasks.anomaly_methods import check_options, check_set_size

    runtime = {k: kw.pop(k) for k in RUNTIME_KEYS if k in kw}
    opts = _task_options(kw, models=runtime.get("models"))
    check_options(opts)  # --reference as the preset's scorer declares it
    items = list_data(data, out_dir, quiet)
    check_set_size(opts, len(items))  # a set-level scorer (musc) refuses too small a DATA
    rt = make_runtime(**runtime)
    task = anomaly_spec(rt, opts, OutputOptions(fmt=fmt, overlay=not no_overlay))
    return run_cli_batch(
        rt,
        items,
        out_dir,
        [task],
        force=force,
        retry_errors=retry_errors,
        quiet=quiet,
        batch_size=1 if opts.tile else None,  # with tiles: one image in flight, tiles batched
    )


def _task_options(kw: dict, models: str | None):
    """The command's :class:`~zsdense.options.AnomalyOptions`; the thresholds resolved first
    from --threshold / --image-threshold, --thresholds and --calibrate-with (notes on stderr)."""
    from zsdense.io.thresholds import resolve_options
    from zsdense.options import AnomalyOptions
    from zsdense.tasks.good_images import single

    reference = list(kw.pop("reference")) or None
    calibrate_with = kw.pop("calibrate_with")
    threshold, image_threshold, notes = resolve_options(
        threshold=kw.pop("threshold"),
        image_threshold=kw.pop("image_threshold"),
        thresholds_file=kw.pop("thresholds_file"),
        calibrate_with=calibrate_with,
        reference=reference,
        settings={"preset": kw["preset"], "models": models, "object_name": kw["object_name"]},
    )
    for note in notes:
        click.echo(f"zsdense: {note}", err=True)
    return AnomalyOptions.from_mapping(
        kw,
        reference=reference,
        threshold=threshold,
        image_threshold=image_threshold,
        calibrate_with=single(list(calibrate_with)) or None,
    )
