"""Options and the batch-run wrapper shared by every task command."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from zsdense.config import DEFAULT_BATCH_SIZE, MAX_PIXELS
from zsdense.errors import ConfigError
from zsdense.options import OUTPUT_FORMATS as FORMATS


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose choices are read from a registry (a dict) when used, so a method
    or preset registered at run time (a plug-in, a test) is offered without editing the CLI."""

    def __init__(self, registry: dict, case_sensitive: bool = True) -> None:
        self.registry = registry
        super().__init__(list(registry), case_sensitive=case_sensitive)

    @property
    def choices(self):  # type: ignore[override]
        return tuple(self.registry)

    @choices.setter
    def choices(self, value) -> None:  # click's __init__ assigns it; the registry is the truth
        pass


def runtime_options(f: Callable | None = None, *, exclude: Sequence[str] = ()) -> Callable:
    """--models, --device, --precision, --weights-dir, --batch-size, --offline, --max-pixels:
    every command takes the runtime options from here (``exclude`` drops the ones a command has
    no use for, e.g. ``max_pixels`` for training). Choices come from the library."""
    if f is None:
        return lambda g: runtime_options(g, exclude=exclude)
    from zsdense.config import PRECISIONS
    from zsdense.models import MODEL_SETS

    opts = {
        "models": click.option(
            "--models",
            type=click.Choice(MODEL_SETS),
            default="default",
            show_default=True,
            help="'tiny': small random-weight models for smoke runs; 'random': full-size "
            "architectures with random weights for benchmarks (results meaningless).",
        ),
        "device": click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."
        ),
        "precision": click.option(
            "--precision",
            type=click.Choice(PRECISIONS),
            default="auto",
            show_default=True,
            help="auto: bf16 on CUDA (else fp16) and on CPUs with native bf16, else fp32; "
            "the precision that ran is recorded in run_settings.json.",
        ),
        "weights_dir": click.option(
            "--weights-dir",
            type=click.Path(file_okay=False),
            default=None,
            envvar="ZSDENSE_WEIGHTS",
            help="Folder with checkpoints (searched first; env ZSDENSE_WEIGHTS).",
        ),
        "batch_size": click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=DEFAULT_BATCH_SIZE,
            show_default=True,
            help="Images per encoder batch.",
        ),
        "offline": click.option(
            "--offline",
            is_flag=True,
            default=False,
            help="Never download weights; fail with instructions if one is missing.",
        ),
        "max_pixels": click.option(
            "--max-pixels",
            type=click.IntRange(min=1),
            default=MAX_PIXELS,
            show_default=True,
            help=(
                "Refuse images with more pixels, before decoding (memory, decompression bombs); "
                "the default keeps a 2-core 8 GB machine safe (README: memory)."
            ),
        ),
    }
    for name, opt in reversed(list(opts.items())):
        if name not in exclude:
            f = opt(f)
    return f


def output_options(f: Callable) -> Callable:
    """--out, --format, --force, --retry-errors, --no-overlay."""
    opts = [
        click.option(
            "--out",
            "out_dir",
            required=True,
            type=click.Path(file_okay=False),
            help="Output folder; the input tree is mirrored inside it.",
        ),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(FORMATS),
            default="tiff",
            show_default=True,
            help="Float maps as tiff or npy; 'rle' also writes COCO RLE JSON masks; "
            "'none' writes masks and overlays only.",
        ),
        click.option(
            "--no-overlay",
            is_flag=True,
            default=False,
            help="Skip the JPEG overlays (faster on huge batches).",
        ),
        click.option(
            "--force",
            is_flag=True,
            default=False,
            help="Recompute every input even if its outputs are complete.",
        ),
        click.option(
            "--retry-errors",
            is_flag=True,
            default=False,
            help="Recompute inputs whose earlier result was an error.",
        ),
        click.option(
            "--quiet",
            "-q",
            is_flag=True,
            default=False,
            help=(
                "No progress and no summary when every input succeeds (failures and errors "
                "still go to stderr)."
            ),
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_runtime(
    models: str = "default",
    device: str = "auto",
    precision: str = "auto",
    weights_dir: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    offline: bool = False,
    max_pixels: int = MAX_PIXELS,
    **_: Any,
):
    """The :class:`~zsdense.runtime.Runtime` of the runtime options."""
    from zsdense.config import RuntimeConfig
    from zsdense.runtime import Runtime

    if offline:
        os.environ["ZSDENSE_OFFLINE"] = "1"
    return Runtime(
        RuntimeConfig(
            device=device,
            models=models,
            precision=precision,
            weights_dir=weights_dir,
            download=False if offline else None,
            batch_size=batch_size,
            max_pixels=max_pixels,
        )
    )


def list_data(data, out_dir: str | Path, quiet: bool = False):
    """DATA -> work items with the output folder excluded from the listing (a rerun with
    ``--out`` inside DATA never reads its own outputs); says so once on stderr."""
    from zsdense.engine.local import items_from_data

    items = items_from_data(list(data), exclude=[out_dir])
    if items.excluded and not quiet:
        for folder in items.excluded:
            click.echo(f"zsdense: excluded {folder} from the inputs (the output folder)", err=True)
    return items


def no_inputs_error(items) -> ConfigError:
    """'no inputs to process', with what the listing skipped and why (first 5 paths)."""
    skipped = list(getattr(items, "skipped", ()) or ())
    if not skipped:
        return ConfigError("no inputs to process")
    shown = "; ".join(f"{s.rel}: {s.reason}" for s in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return ConfigError(f"no inputs to process; skipped {len(skipped)} path(s): {shown}{more}")


def run_cli_batch(
    rt,
    items,
    out_dir: str | Path,
    tasks: Sequence,
    *,
    force: bool = False,
    retry_errors: bool = False,
    quiet: bool = False,
    batch_size: int | None = None,
) -> int:
    """Run the batch, print the summary, return the exit code (0 ok, 3 some failed, 130 stop).
    ``batch_size``: images per batch when not the runtime's (``--tile``: 1)."""
    from zsdense.engine.local import run_batch

    if not items:
        raise no_inputs_error(items)
    summary = run_batch(
        rt,
        items,
        out_dir,
        tasks,
        batch_size=batch_size,
        force=force,
        retry_errors=retry_errors,
        progress=not quiet,
    )
    print_summary(summary, out_dir, quiet=quiet)
    return summary.exit_code


def print_summary(summary, out_dir: str | Path, quiet: bool = False) -> None:
    """The end-of-run summary on stderr (counts, per-stage time, first failures, resume hint).

    ``quiet``: nothing when the run succeeded (exit 0); failures and interruptions still print.
    """
    if quiet and summary.exit_code == 0:
        return
    click.echo(f"zsdense: {summary.format()}", err=True)
    for key, msg in summary.errors[:20]:
        click.echo(f"  failed: {key}: {msg}", err=True)
    if len(summary.errors) > 20:
        click.echo(f"  ... and {len(summary.errors) - 20} more (see results.jsonl)", err=True)
    click.echo(f"results: {Path(out_dir) / 'results.jsonl'}", err=True)


def batch_command(f: Callable) -> Callable:
    """Runtime + output options, and turn the returned exit code into the process's."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any):
        code = f(*args, **kwargs)
        ctx = click.get_current_context()
        ctx.exit(int(code or 0))

    return output_options(runtime_options(wrapper))


def warn(msg: str) -> None:
    print(f"zsdense: warning: {msg}", file=sys.stderr)
