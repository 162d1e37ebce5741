"""``zsdense openvocab``: label maps over user-given classes (Trident, ProxyCLIP, CLIP-only)."""

from __future__ import annotations

import click

from zsdense.cli.common import batch_command, make_segmenter, run_cli_batch
from zsdense.config import OPENVOCAB_DATASETS
from zsdense.errors import ConfigError

PRESET_CHOICES = ("trident", "trident-fixed", "proxyclip", "sclip", "clearclip", "naclip")
DATASET_CHOICES = OPENVOCAB_DATASETS


def openvocab_task(
    seg,
    *,
    classes,
    preset: str,
    dataset: str | None,
    fmt: str,
    overlay: bool,
    options: dict | None = None,
):
    """The TaskSpec of ``zsdense openvocab``: run_open_vocab per batch, the engine's writer plus
    the classes present and their areas in the manifest."""
    from zsdense.engine.local import TaskSpec
    from zsdense.engine.multitask import write_result
    from zsdense.tasks.openvocab import run_open_vocab

    opts = dict(options or {})

    def run(ctxs, params):
        return run_open_vocab(seg, ctxs, classes=classes, preset=preset, dataset=dataset, **opts)

    def write(result, ctx, stem, params):
        got = write_result(result, ctx, stem, params, fmt=fmt, overlay=overlay)
        areas = result.areas()
        scores = got.setdefault("scores", {})
        scores["classes_present"] = sorted(areas, key=lambda k: -areas[k])
        scores["area"] = {k: round(v, 6) for k, v in areas.items()}
        meta = got.setdefault("meta", {})
        meta.pop("areas", None)
        meta["class_names"] = list(result.class_names)
        return got

    return TaskSpec(name="openvocab", run=run, write=write)


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
    type=click.Choice(PRESET_CHOICES),
    default="trident",
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
    present and their areas (pixel fractions). Exit codes: 0 all ok, 3 some images failed,
    2 usage error.
    """
    from zsdense.config import openvocab_preset
    from zsdense.engine.local import items_from_data
    from zsdense.text.classifier import load_class_file, parse_classes

    if bool(classes_str) == bool(classes_file):
        raise click.UsageError('give exactly one of --classes "a, b; c" or --classes-file FILE')
    classes = load_class_file(classes_file) if classes_file else parse_classes(classes_str)
    if len(classes) > 256:
        raise ConfigError(f"{len(classes)} classes: a label PNG holds at most 256")
    options: dict = {}
    if sam_refine:
        options["sam_refine"] = True
    if prob_thd is not None:
        options["prob_thd"] = prob_thd
    if short_side is not None:
        options["short_side"] = short_side
    if upsample is not None:
        options["upsample"] = upsample
    cfg = openvocab_preset(preset, dataset_preset, **options)  # validate before any model loads
    if cfg.sam_refine and cfg.method != "trident":
        raise click.UsageError("--sam-refine needs --preset trident or trident-fixed")
    items = items_from_data(data)
    seg = make_segmenter(**runtime)
    task = openvocab_task(
        seg,
        classes=classes,
        preset=preset,
        dataset=dataset_preset,
        fmt=fmt if save_probs else "none",
        overlay=not no_overlay,
        options=options,
    )
    return run_cli_batch(
        seg, items, out_dir, [task], force=force, retry_errors=retry_errors, quiet=quiet
    )
