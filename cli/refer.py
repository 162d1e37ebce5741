"""``zsdense refer``: one mask per (image, referring expression)."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

import click

from zsdense.cli.common import batch_command, make_segmenter, run_cli_batch
from zsdense.errors import ConfigError

_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_id(value: Any) -> str:
    text = _ID_RE.sub("_", str(value)).strip("._")
    return text or "q"


def load_queries(path: str | Path) -> list[dict]:
    """Read a JSONL file of {"image", "text", optional "id"} lines.

    Relative image paths are resolved against the JSONL file's folder. Ids default to the line
    number; they are made file-name safe and must be unique. Blank lines are skipped. A line that
    is not a JSON object with a non-empty "image" and "text" is a ConfigError naming the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the queries file ({exc.strerror or exc})") from None
    out: list[dict] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f'{path}:{n}: expected an object like {{"image": ..., "text": ...}}')
        image, text = obj.get("image"), obj.get("text")
        if not isinstance(image, str) or not image.strip():
            raise ConfigError(f'{path}:{n}: missing "image" (a path to the image)')
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f'{path}:{n}: missing "text" (the referring expression)')
        qid = _safe_id(obj.get("id", n))
        if qid in seen:
            raise ConfigError(f"{path}:{n}: duplicate query id {qid!r}")
        seen.add(qid)
        img = Path(image).expanduser()
        if not img.is_absolute():
            img = path.parent / img
        out.append({"image": img, "text": text, "id": qid, "line": n})
    if not out:
        raise ConfigError(f"{path}: no queries in the file")
    return out


def items_from_queries(queries: list[dict], base: Path) -> list:
    """Queries -> WorkItems with params {"text", "id", "image"}; keys ``<rel>#<id>`` so the
    output stem is ``<rel without extension>.<id>``."""
    from zsdense.engine.local import WorkItem

    items = []
    for q in queries:
        img: Path = q["image"]
        try:
            rel = PurePosixPath(img.resolve().relative_to(base.resolve()).as_posix())
        except ValueError:
            rel = PurePosixPath(img.name)
        items.append(
            WorkItem(
                key=f"{rel}#{q['id']}",
                path=img,
                rel=rel,
                params={"text": q["text"], "id": q["id"], "image": str(img)},
            )
        )
    return items


class _ImageReuse:
    """Keeps the per-image encoder outputs (SAM state, proposals, mask features, dense heat)
    of the last few images, so consecutive queries on one image reuse them although the batch
    runner gives every query its own ImageContext."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.store: OrderedDict[str, dict] = OrderedDict()

    def before(self, ctx, image: str | None) -> None:
        if image and image in self.store:
            self.store.move_to_end(image)
            for k, v in self.store[image].items():
                ctx.cache.setdefault(k, v)

    def after(self, ctx, image: str | None) -> None:
        if not image:
            return
        self.store[image] = {k: v for k, v in ctx.cache.items() if k != "_u8"}
        self.store.move_to_end(image)
        while len(self.store) > self.size:
            self.store.popitem(last=False)


def refer_task(
    seg,
    *,
    text: str | None,
    preset: str | None,
    fmt: str,
    overlay: bool,
    options: dict | None = None,
):
    """The TaskSpec of ``zsdense refer``: run_refer per query, writer from the engine."""
    from zsdense.engine.local import TaskSpec
    from zsdense.engine.multitask import write_result
    from zsdense.tasks.referring import run_refer

    reuse = _ImageReuse()
    options = dict(options or {})

    def run(ctxs, params):
        out = []
        for ctx, p in zip(ctxs, params):
            t = p.get("text") or text
            if not t:
                raise ConfigError("refer needs --text or --queries")
            image = p.get("image")
            reuse.before(ctx, image)
            out.extend(run_refer(seg, [ctx], [t], preset=preset, **options))
            reuse.after(ctx, image)
        return out

    def write(result, ctx, stem, params):
        got = write_result(result, ctx, stem, params, fmt=fmt, overlay=overlay)
        got.setdefault("scores", {})["candidates"] = result.candidates
        if params.get("id") is not None:
            got["scores"]["id"] = params["id"]
        got["scores"]["text"] = params.get("text") or text
        return got

    return TaskSpec(name="refer", run=run, write=write)


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
    default="hybridgl+",
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
@batch_command
def refer_cmd(
    data,
    text,
    queries_path,
    preset,
    refine,
    fusion,
    parser,
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
    and mask features. Exit codes: 0 all ok, 3 some queries failed, 2 usage error.
    """
    from zsdense.config import REFER_PRESETS
    from zsdense.engine.local import items_from_data

    if preset not in REFER_PRESETS:
        names = ", ".join(sorted(REFER_PRESETS))
        raise ConfigError(f"unknown referring preset {preset!r}; choose one of: {names}")
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
        items = items_from_data(data)
        for it in items:
            it.params.update({"text": text})
    options: dict = {}
    if refine:
        options["refine"] = True
    if fusion:
        options["fusion"] = fusion
    if parser:
        options["parser"] = parser
    seg = make_segmenter(**runtime)
    task = refer_task(
        seg, text=text, preset=preset, fmt=fmt, overlay=not no_overlay, options=options
    )
    return run_cli_batch(
        seg, items, out_dir, [task], force=force, retry_errors=retry_errors, quiet=quiet
    )
