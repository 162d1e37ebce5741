"""``zsdense refer``: one mask per (image, referring expression)."""

from __future__ import annotations

from pathlib import Path

import click

from zsdense.cli.common import (
    RegistryChoice,
    batch_command,
    list_data,
    make_runtime,
    run_cli_batch,
)
from zsdense.config import DEFAULT_REFER_PRESET, PROPOSAL_STABILITY_MODES, REFER_PRESETS


@click.command("refer")
@click.argument("data", nargs=-1, required=False)
@click.option("--text", default=None, help="The referring expression (one per run over DATA).")
@click.option(
    "--queries",
    "queries_path",
    type=click.Path(dir_okay=False),
    default=None,
    help='JSONL file of {"image": path, "text": "...", "id": optional} lines; relative '
    "image paths are resolved against the file's folder.",
)
@click.option(
    "--preset",
    type=RegistryChoice(REFER_PRESETS),
    default=DEFAULT_REFER_PRESET,
    show_default=True,
    help="hybridgl (the reference) or hybridgl+ (its defects fixed).",
)
@click.option(
    "--refine",
    is_flag=True,
    default=False,
    help="Refine the chosen mask with SAM (box + heat-map peak) when SAM is surer.",
)
@click.option(
    "--fusion",
    type=click.Choice(["G2L", "L2G", "G2L&L2G"]),
    default=None,
    help="Hybrid feature fusion mode (default: the preset's, G2L).",
)
@click.option(
    "--parser",
    type=click.Choice(["auto", "spacy", "fallback"]),
    default=None,
    help="Expression parser: spaCy when installed with an English model, else rules.",
)
@click.option(
    "--proposal-stability",
    type=click.Choice(PROPOSAL_STABILITY_MODES),
    default=None,
    help="SAM proposals' stability score on the image-size logits (image: the reference's) "
    "or on the 256x256 decoder logits (lowres: faster when masks fail the filter; the kept "
    "set can differ near the threshold).",
)
@batch_command
def refer_cmd(
    data,
    text,
    queries_path,
    preset,
    refine,
    fusion,
    parser,
    proposal_stability,
    out_dir,
    fmt,
    no_overlay,
    force,
    retry_errors,
    quiet,
    **runtime,
) -> int:
    """One mask per (image, expression): HybridGL over SAM proposals and CLIP.

    \b
    Examples:
      zsdense refer photo.jpg --text "the cup left of the laptop" --out res
      zsdense refer --queries queries.jsonl --out res

    \b
    queries.jsonl:
      {"image": "imgs/kitchen.jpg", "text": "the red cup", "id": "cup"}
      {"image": "imgs/kitchen.jpg", "text": "the laptop on the right"}

    Outputs in OUT, mirroring the inputs: <name>[.<id>].mask.png (0/255), <name>[.<id>].overlay.jpg
    (with the expression as caption) and one line per query in OUT/results.jsonl (score, top
    candidates, parsed phrase and relation). Queries on the same image reuse its SAM proposals
    and mask features.

    Exit codes: 0 all ok, 2 usage or setup error, 3 some queries failed, 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM); after 130/143 rerun the same command to resume.
    """
    from zsdense.engine.local import items_from_queries, load_queries
    from zsdense.engine.specs import refer_spec
    from zsdense.options import OutputOptions, ReferOptions

    opts = ReferOptions.from_mapping(
        preset=preset,
        text=text,
        refine=refine or None,
        fusion=fusion,
        parser=parser,
        proposal_stability=proposal_stability,
    )
    if queries_path and text:
        raise click.UsageError("give either --text (with DATA) or --queries, not both")
    if queries_path:
        if data:
            raise click.UsageError("with --queries the images come from the file; drop DATA")
        qp = Path(queries_path)
        items = items_from_queries(load_queries(qp), qp.parent)
    else:
        if not text or not text.strip():
            raise click.UsageError('give --text "..." (and DATA) or --queries FILE.jsonl')
        if not data:
            raise click.UsageError("no DATA given: pass image files, folders or globs")
        items = list_data(data, out_dir, quiet)
        for it in items:
            it.params.update({"text": text})
    rt = make_runtime(**runtime)
    task = refer_spec(rt, opts, OutputOptions(fmt=fmt, overlay=not no_overlay))
    return run_cli_batch(
        rt, items, out_dir, [task], force=force, retry_errors=retry_errors, quiet=quiet
    )
