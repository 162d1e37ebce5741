"""``zsdense openvocab``: label maps over user-given classes (Trident, ProxyCLIP, CLIP-only)."""

from __future__ import annotations

import click

from zsdense.cli.common import option, preset_option, task_command, upsampler_options
from zsdense.config import (
    DEFAULT_OPENVOCAB_PRESET,
    OPENVOCAB_DATASETS,
    OPENVOCAB_PRESETS,
    UPSAMPLE_MODES,
)

CLASSES_HELP = (
    'Classes separated by ",", synonyms of one class by ";" (e.g. "sky; cloud, cat, sofa; '
    'couch"). "NAME: a; b" names a class whose queries are a and b. The first class is the '
    "background of --prob-thd."
)


def classes_file_option(help_start: str = "A text file with one class per line") -> click.Option:
    """--classes-file (also ``zsdense eval openvocab``): a file or a shipped list's name."""
    return option(
        "--classes-file",
        help=f"{help_start} (synonyms separated by ';'), or a shipped list: "
        + ", ".join(OPENVOCAB_DATASETS)
        + ".",
    )


@click.command("openvocab")
@click.argument("data", nargs=-1, required=True)
@option("--classes", "classes_str", help=CLASSES_HELP)
@classes_file_option()
@preset_option(
    OPENVOCAB_PRESETS, DEFAULT_OPENVOCAB_PRESET,
    "A registered method preset (`zsdense info --methods`): trident (CLIP+DINOv2+SAM), "
    "trident-fixed, proxyclip (CLIP+DINOv2), sclip / clearclip / naclip (CLIP only, fastest).",
)  # fmt: skip
@option(
    "--dataset-preset", choices=OPENVOCAB_DATASETS,
    help="Benchmark settings (input size, stride, thresholds) of a dataset.",
)  # fmt: skip
@option(
    "--sam-refine", is_flag=True,
    help="Refine the labels with SAM prompts from connected components (presets whose method "
    "uses SAM: trident, trident-fixed).",
)  # fmt: skip
@option(
    "--prob-thd", type=float,
    help="Pixels whose best class probability is below this become class 0 (default: the "
    "preset's).",
)  # fmt: skip
@option(
    "--short-side", type=click.IntRange(min=32),
    help="Resize the image so its short side is this (default: the preset's).",
)  # fmt: skip
@option(
    "--upsample", choices=UPSAMPLE_MODES,
    help="Score upsampling: bilinear (the references) or jbu (joint bilateral, edge-aware).",
)  # fmt: skip
@upsampler_options(
    "Feature upsampling of the dense CLIP features before the text similarity: bilinear "
    "(default: the references) or jafar:FILE (a JAFAR upsampler trained for this CLIP with "
    "`zsdense train-upsampler`; no released one fits OpenAI's CLIP).",
    "With --upsampler jafar: cells per CLIP patch side (default 4; trident 2).",
)
@option(
    "--save-probs/--no-save-probs", default=False, show_default=True,
    help="Also write the per-class probabilities (K, H, W) as .map.tiff / .map.npy (--format).",
)  # fmt: skip
@task_command
def openvocab_cmd(data, classes_str, classes_file, preset, dataset_preset, batch, **opts) -> int:
    """Open-vocabulary segmentation: a label map over your classes for every image in DATA.

    \b
    Class syntax:
      --classes "background: sky; wall, cat, sofa; couch"
        classes are separated by ",", synonyms of one class by ";"; the class takes the
        best of its synonyms. "NAME: a; b" displays NAME. Class 0 is the background that
        low-confidence pixels fall back to (--prob-thd). An empty class ("cat,,cup") is an
        error: the label index of a class is its position.
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
    from zsdense.options import OpenVocabOptions

    if bool(classes_str) == bool(classes_file):
        raise click.UsageError('give exactly one of --classes "a, b; c" or --classes-file FILE')
    opts["sam_refine"] = opts["sam_refine"] or None  # not given: the preset's
    task = OpenVocabOptions.from_mapping(
        opts, classes=classes_str, classes_file=classes_file, preset=preset, dataset=dataset_preset
    )
    items = batch.items(data)
    return batch.run(items, lambda rt, out: [openvocab_spec(rt, task, out)])
