"""``zsdense openvocab``: label maps over user-given classes (Trident, ProxyCLIP, CLIP-only)."""

from __future__ import annotations

import click

from zsdense.cli.common import (
    RegistryChoice,
    batch_command,
    list_data,
    make_runtime,
    run_cli_batch,
)
from zsdense.config import DEFAULT_OPENVOCAB_PRESET, OPENVOCAB_DATASETS, OPENVOCAB_PRESETS

DATASET_CHOICES = OPENVOCAB_DATASETS


@click.command("openvocab")
@click.argument("data", nargs=-1, required=True)
@click.option(
    "--classes",
    "classes_str",
    default=None,
    help='Classes separated by ",", synonyms of one class by ";" '
    '(e.g. "sky; cloud, cat, sofa; couch"). "NAME: a; b" names a class whose '
    "queries are a and b. The first class is the background of --prob-thd.",
)
@click.option(
    "--classes-file",
    default=None,
    help="A text file with one class per line (synonyms separated by ';'), or a "
    "shipped list: " + ", ".join(DATASET_CHOICES) + ".",
)
@click.option(
    "--preset",
    type=RegistryChoice(OPENVOCAB_PRESETS),
    default=DEFAULT_OPENVOCAB_PRESET,
    show_default=True,
    help="trident (CLIP+DINOv2+SAM), trident-fixed (its SAM prompt quirks fixed), "
    "proxyclip (CLIP+DINOv2), sclip / clearclip / naclip (CLIP only, fastest).",
)
@click.option(
    "--dataset-preset",
    type=click.Choice(DATASET_CHOICES),
    default=None,
    help="Benchmark settings (input size, stride, thresholds) of a dataset.",
)
@click.option(
    "--sam-refine",
    is_flag=True,
    default=False,
    help="Trident: refine the labels with SAM prompts from connected components.",
)
@click.option(
    "--prob-thd",
    type=float,
    default=None,
    help="Pixels whose best class probability is below this become class 0.",
)
@click.option(
    "--short-side",
    type=click.IntRange(min=32),
    default=None,
    help="Resize the image so its short side is this (default: the preset's).",
)
@click.option(
    "--upsample",
    type=click.Choice(["bilinear", "jbu"]),
    default=None,
    help="Score upsampling: bilinear (the references) or joint bilateral (edge-aware).",
)
@click.option(
    "--save-probs/--no-save-probs",
    default=False,
    show_default=True,
    help="Also write the per-class probabilities (K, H, W) as .map.tiff / .map.npy (--format).",
)
@batch_command
def openvocab_cmd(
    data,
    classes_str,
    classes_file,
    preset,
    dataset_preset,
    sam_refine,
    prob_thd,
    short_side,
    upsample,
    save_probs,
    out_dir,
    fmt,
    no_overlay,
    force,
    retry_errors,
    quiet,
    **runtime,
) -> int:
    """Open-vocabulary segmentation: a label map over your classes for every image in DATA.

    \b
    Class syntax:
      --classes "background: sky; wall, cat, sofa; couch"
        classes are separated by ",", synonyms of one class by ";"; the class takes the
        best of its synonyms. "NAME: a; b" displays NAME. Class 0 is the background that
        low-confidence pixels fall back to (--prob-thd).
      --classes-file FILE   one class per line, synonyms separated by ";"
      --classes-file voc21  a shipped benchmark list (voc21, context60, ade20k, ...)

    \b
    Examples:
      zsdense openvocab photos/ --out res --classes "background: sky; wall, person, dog"
      zsdense openvocab img.jpg --out res --classes-file voc21 --dataset-preset voc21 --sam-refine
      zsdense openvocab imgs/ --out res --classes "road, car, tree" --preset sclip

    Outputs in OUT, mirroring the inputs: <name>.mask.png (palette label PNG, pixel value =
    class index), <name>.overlay.jpg (with a legend), with --save-probs <name>.map.tiff|npy
    (K x H x W probabilities), and one line per image in OUT/results.jsonl with the classes
    present and their areas (pixel fractions).

    Exit codes: 0 all ok, 2 usage or setup error, 3 some images failed, 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM); after 130/143 rerun the same command to resume.
    """
    from zsdense.engine.specs import openvocab_spec
    from zsdense.options import OpenVocabOptions, OutputOptions

    if bool(classes_str) == bool(classes_file):
        raise click.UsageError('give exactly one of --classes "a, b; c" or --classes-file FILE')
    opts = OpenVocabOptions.from_mapping(
        classes=classes_str,
        classes_file=classes_file,
        preset=preset,
        dataset=dataset_preset,
        save_probs=save_probs,
        sam_refine=sam_refine or None,
        prob_thd=prob_thd,
        short_side=short_side,
        upsample=upsample,
    )
    items = list_data(data, out_dir, quiet)
    rt = make_runtime(**runtime)
    task = openvocab_spec(rt, opts, OutputOptions(fmt=fmt, overlay=not no_overlay))
    return run_cli_batch(
        rt, items, out_dir, [task], force=force, retry_errors=retry_errors, quiet=quiet
    )
