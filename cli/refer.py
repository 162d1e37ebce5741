"""``zsdense refer``: one mask per (image, referring expression)."""

from __future__ import annotations

from pathlib import Path

import click

from zsdense.cli.common import option, preset_option, task_command
from zsdense.config import (
    DEFAULT_REFER_PRESET,
    FUSION_MODES,
    PARSERS,
    PROPOSAL_DECODERS,
    PROPOSAL_STABILITY_MODES,
    REFER_PRESETS,
)


@click.command("refer")
@click.argument("data", nargs=-1, required=False)
@option("--text", help="The referring expression (one per run over DATA).")
@option(
    "--queries", "queries_path", type=click.Path(dir_okay=False),
    help='JSONL file of {"image": path, "text": "...", "id": optional} lines; relative '
    "image paths are resolved against the file's folder.",
)  # fmt: skip
@preset_option(
    REFER_PRESETS, DEFAULT_REFER_PRESET,
    "A registered referring preset (`zsdense info --methods`): hybridgl (the reference) "
    "or hybridgl+ (its defects fixed).",
)  # fmt: skip
@option("--refine", is_flag=True, help="Refine the chosen mask with SAM when SAM is surer.")
@option("--fusion", choices=FUSION_MODES, help="Hybrid feature fusion (the preset's: G2L).")
@option("--parser", choices=PARSERS, help="Expression parser: spaCy when installed, else rules.")
@option(
    "--proposal-stability", choices=PROPOSAL_STABILITY_MODES,
    help="SAM proposals' stability score on the image-size logits (image: the reference's) "
    "or on the 256x256 decoder logits (lowres: faster when masks fail the filter; the kept "
    "set can differ near the threshold).",
)  # fmt: skip
@option(
    "--proposal-decoder", choices=PROPOSAL_DECODERS,
    help="SAM's mask decoder for the proposals: auto (the reference's arithmetic in fp32, bit "
    "for bit; the arranged decoder in bf16), reference, or arranged (decoding about 1.5x "
    "faster in fp32: the same model, not the same bits).",
)  # fmt: skip
@task_command
def refer_cmd(data, text, queries_path, batch, **opts) -> int:
    """One mask per (image, expression): HybridGL over SAM proposals and CLIP, or any
    registered referring method.

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
    and mask features. When the method has no answer (SAM found no mask) the line says
    "fallback": true (the mask is the whole image, the score null) and the summary counts it.

    Exit codes: 0 all ok, 2 usage or setup error, 3 some queries failed, 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM); after 130/143 rerun the same command to resume.
    """
    from zsdense.engine.local import items_from_queries, load_queries
    from zsdense.engine.specs import refer_spec
    from zsdense.options import ReferOptions

    opts["refine"] = opts["refine"] or None  # not given: the preset's
    task = ReferOptions.from_mapping(opts, text=text)
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
        items = batch.items(data)
        for it in items:
            it.params.update({"text": text})
    return batch.run(items, lambda rt, out: [refer_spec(rt, task, out)])
