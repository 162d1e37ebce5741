"""Options and the batch-run wrapper shared by every task command."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import click

from zsdense.config import DATTN_MEAN_MODES, DEFAULT_BATCH_SIZE, MAX_PIXELS
from zsdense.errors import ConfigError
from zsdense.options import OUTPUT_FORMATS as FORMATS


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose choices are read from a registry (a mapping) when used, so a
    method or preset registered at run time (a plug-in, a test) is offered without editing the
    CLI; reading it loads the plug-ins (:mod:`zsdense.plugins`)."""

    def __init__(self, registry: Mapping, case_sensitive: bool = True) -> None:
        self.registry = registry
        super().__init__(list(registry), case_sensitive=case_sensitive)

    @property
    def choices(self):  # type: ignore[override]
        return tuple(self.registry)

    @choices.setter
    def choices(self, value) -> None:  # click's __init__ assigns it; the registry is the truth
        pass


class LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices a function gives when first needed (a table in a
    module that is slow to import: ``--help`` must not import it)."""

    def __init__(self, get: Callable[[], Sequence[str]], case_sensitive: bool = True) -> None:
        self.get = get
        super().__init__((), case_sensitive=case_sensitive)

    @property
    def choices(self):  # type: ignore[override]
        return tuple(self.get())

    @choices.setter
    def choices(self, value) -> None:  # click's __init__ assigns it; the getter is the truth
        pass


def option(*decls: str, choices: Mapping | Sequence[str] | None = None, **kw: Any) -> Callable:
    """``click.option`` whose ``choices`` come from the library: a tuple of names (a
    ``click.Choice``), a registry mapping (a :class:`RegistryChoice`) or a ready choice type
    (a :class:`LazyChoice`)."""
    if isinstance(choices, click.Choice):
        kw["type"] = choices
    elif choices is not None:
        kw["type"] = (
            RegistryChoice(choices) if isinstance(choices, Mapping) else click.Choice(choices)
        )
    return click.option(*decls, **kw)


# options several commands take with the same flag, type and meaning (each words its own help)


def shots_option(help: str) -> Callable:
    """``--shots N``: use only the first N good images (N >= 1)."""
    return option("--shots", type=click.IntRange(min=1), help=help)


def thresholds_option(help: str) -> Callable:
    """``--thresholds FILE`` (``thresholds_file``): an existing thresholds.json."""
    return option(
        "--thresholds", "thresholds_file", type=click.Path(exists=True, dir_okay=False), help=help
    )


def out_option(help: str, dest: str = "out_dir") -> Callable:
    """``--out``, required: a run folder (``dest="out_dir"``) or one file to write
    (``dest="out_path"``)."""
    kind = click.Path(file_okay=False) if dest == "out_dir" else click.Path(dir_okay=False)
    return option("--out", dest, required=True, type=kind, help=help)


def preset_option(choices: Mapping | Sequence[str], default: str, help: str) -> Callable:
    """``--preset``: one of the library's presets (a registry or a table of names)."""
    return option("--preset", choices=choices, default=default, show_default=True, help=help)


def resume_option(help: str) -> Callable:
    """``--resume``: continue the run in --out."""
    return option("--resume", is_flag=True, default=False, help=help)


def quiet_option(help: str = "No progress output.") -> Callable:
    """``--quiet`` / ``-q``."""
    return option("--quiet", "-q", is_flag=True, default=False, help=help)


def upsampler_options(help: str, scale_help: str) -> Callable:
    """``--upsampler`` (a registered feature upsampler, ``jafar:FILE``) and
    ``--upsampler-scale`` (cells per patch side)."""

    def apply(f: Callable) -> Callable:
        f = option("--upsampler-scale", type=click.IntRange(1, 16), help=scale_help)(f)
        return option("--upsampler", help=help)(f)

    return apply


def dattn_mean_option(help: str) -> Callable:
    """``--dattn-mean image|batch``: Crane+'s D-Attn mean per image or over the batch."""
    return option("--dattn-mean", choices=DATTN_MEAN_MODES, help=help)


def _apply(f: Callable, opts: dict[str, Callable], exclude: Sequence[str] = ()) -> Callable:
    """Decorate ``f`` with the options of ``opts`` (in order, as --help lists them)."""
    for name, make in reversed(list(opts.items())):
        if name not in exclude:
            f = make()(f)
    return f


# the test-time register options (a runtime setting; commands that train or find neurons
# exclude them: runtime_options(exclude=REGISTER_KEYS))
REGISTER_KEYS = ("registers", "registers_count", "registers_mode", "registers_batch")
# the runtime options' parameter names (make_runtime's keywords)
RUNTIME_KEYS = (
    "models",
    "device",
    "precision",
    "weights_dir",
    "batch_size",
    "offline",
    "max_pixels",
    *REGISTER_KEYS,
    "allocator",
)


def register_values(values: Any) -> tuple:
    """``--registers`` values (or the ``[run]`` table's ``registers``: a string or a list) with
    file paths made absolute (Ray actors may start elsewhere); auto / off kept."""
    if values is None:
        return ()
    items = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    out = []
    for v in items:
        v = os.fspath(v) if isinstance(v, os.PathLike) else str(v)
        keep = v.strip().lower() in ("", "auto", "off")
        out.append(v.strip().lower() if keep else str(Path(v).expanduser().resolve()))
    return tuple(out)


def _register_values(ctx, param, value):  # noqa: ARG001 - click callback
    return register_values(value)


def _runtime_option_table() -> dict[str, Callable]:
    from zsdense.config import ALLOCATORS, PRECISIONS, REGISTER_BATCHES, REGISTER_MODES
    from zsdense.models import MODEL_SETS

    return {
        "models": lambda: option(
            "--models", choices=MODEL_SETS, default="default", show_default=True,
            help="'tiny': small random-weight models for smoke runs; 'random': full-size "
            "architectures with random weights for benchmarks (results meaningless).",
        ),
        "device": lambda: option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."
        ),
        "precision": lambda: option(
            "--precision", choices=PRECISIONS, default="auto", show_default=True,
            help="auto: bf16 on CUDA (else fp16) and on CPUs with native bf16, else fp32; "
            "the precision that ran is recorded in run_settings.json.",
        ),
        "weights_dir": lambda: option(
            "--weights-dir", type=click.Path(file_okay=False), envvar="ZSDENSE_WEIGHTS",
            help="Folder with checkpoints (searched first; env ZSDENSE_WEIGHTS).",
        ),
        "batch_size": lambda: option(
            "--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE,
            show_default=True, help="Images per encoder batch.",
        ),
        "offline": lambda: option(
            "--offline", is_flag=True,
            help="Never download weights; fail with instructions if one is missing.",
        ),
        "max_pixels": lambda: option(
            "--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS, show_default=True,
            help="Refuse images with more pixels, before decoding (memory, decompression bombs); "
            "the default keeps a 2-core 8 GB machine safe (README: memory).",
        ),
        "registers": lambda: option(
            "--registers", multiple=True, metavar="auto|FILE|off", callback=_register_values,
            help="Test-time registers for the CLIP / DINOv2 encoders (README: test-time "
            "registers). off (default): the plain encoders; auto: the shipped neuron list where "
            "one exists (real-weight dinov2-large only), else off; FILE: a neurons.json from "
            "`zsdense registers find`, applied to the encoder it was found for (repeatable: "
            "one file per encoder, may be combined with auto). Recorded in run_settings.json.",
        ),
        "registers_count": lambda: option(
            "--registers-count", type=click.IntRange(min=0), default=None,
            help="R, the register tokens appended (default: the neuron list's own, 1 for the "
            "shipped list; 0: off).",
        ),
        "registers_mode": lambda: option(
            "--registers-mode", choices=REGISTER_MODES, default=None,
            help="What the register neurons' patch activations become (default: the neuron "
            "list's own, zero).",
        ),
        "registers_batch": lambda: option(
            "--registers-batch", choices=REGISTER_BATCHES, default="per-image",
            show_default=True,
            help="per-image: every image of a batch is edited as if alone. reference: only the "
            "first image of each batch is edited, as the reference code does (a defect; for "
            "comparisons only).",
        ),
        "allocator": lambda: option(
            "--allocator", choices=ALLOCATORS, default="tuned", show_default=True,
            envvar="ZSDENSE_ALLOCATOR",
            help="tuned: glibc's malloc keeps large freed blocks for reuse instead of returning "
            "them to the OS (faster: the encoders' attention scores are not page-faulted in "
            "again for every block and image; the process keeps its peak memory until it "
            "exits); left alone where LD_PRELOAD or MALLOC_* settings tune it already. system: "
            "the C library's defaults. Never changes an output (env ZSDENSE_ALLOCATOR).",
        ),
    }  # fmt: skip


def runtime_options(f: Callable | None = None, *, exclude: Sequence[str] = ()) -> Callable:
    """--models, --device, --precision, --weights-dir, --batch-size, --offline, --max-pixels,
    --registers (with --registers-count, --registers-mode, --registers-batch), --allocator:
    every command takes the runtime options from here (``exclude`` drops the ones a command
    has no use for, e.g. ``max_pixels`` or the register options for training). Choices come
    from the library."""
    if f is None:
        return lambda g: runtime_options(g, exclude=exclude)
    return _apply(f, _runtime_option_table(), exclude)


OUTPUT_OPTIONS: dict[str, Callable] = {
    "out_dir": lambda: out_option("Output folder; the input tree is mirrored inside it."),
    "fmt": lambda: option(
        "--format", "fmt", choices=FORMATS, default="tiff", show_default=True,
        help="Float maps as tiff or npy; 'rle' also writes COCO RLE JSON masks; "
        "'none' writes masks and overlays only.",
    ),
    "no_overlay": lambda: option(
        "--no-overlay", is_flag=True, help="Skip the JPEG overlays (faster on huge batches)."
    ),
    "force": lambda: option(
        "--force", is_flag=True, help="Compute every input again, even where outputs are stored."
    ),
    "retry_errors": lambda: option(
        "--retry-errors", is_flag=True, help="Compute again the inputs that failed before."
    ),
    "quiet": lambda: option(
        "--quiet", "-q", is_flag=True,
        help="No progress and no summary when every input succeeds (failures and errors "
        "still go to stderr).",
    ),
    "volume_maps": lambda: option(
        "--volume-maps", is_flag=True,
        help="NIfTI inputs: after all slices of a volume are done, stack their float maps "
        "and masks into <stem>.map.nii.gz and <stem>.mask.nii.gz with the input's affine.",
    ),
    "json_summary": lambda: option(
        "--json", "json_summary", is_flag=True,
        help="Print a machine-readable summary (JSON: counts, outputs, failures with their "
        "keys and messages, thresholds) on stdout at the end.",
    ),
}  # fmt: skip


def output_options(f: Callable | None = None, *, exclude: Sequence[str] = ()) -> Callable:
    """--out, --format, --no-overlay, --force, --retry-errors, --quiet (``exclude`` drops some:
    ``zsdense eval`` has its own --out)."""
    if f is None:
        return lambda g: output_options(g, exclude=exclude)
    return _apply(f, OUTPUT_OPTIONS, exclude)


def make_runtime(
    models: str = "default",
    device: str = "auto",
    precision: str = "auto",
    weights_dir: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    offline: bool = False,
    max_pixels: int = MAX_PIXELS,
    registers: Any = (),
    registers_count: int | None = None,
    registers_mode: str | None = None,
    registers_batch: str = "per-image",
    allocator: str = "tuned",
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
            registers=registers or "off",
            registers_count=registers_count,
            registers_mode=registers_mode,
            registers_batch=registers_batch or "per-image",
            allocator=allocator or "tuned",
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
    ctx = click.get_current_context(silent=True)
    summary = run_batch(
        rt,
        items,
        out_dir,
        tasks,
        batch_size=batch_size,
        force=force,
        retry_errors=retry_errors,
        progress=not quiet,
        volume_maps=bool(ctx is not None and ctx.meta.get("zsdense.volume_maps")),
    )
    print_summary(summary, out_dir, quiet=quiet)
    return summary.exit_code


def print_summary(summary, out_dir: str | Path, quiet: bool = False) -> None:
    """The end-of-run summary on stderr (counts, per-stage time, first failures, resume hint).

    ``quiet``: nothing when the run succeeded (exit 0); failures and interruptions still print.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("zsdense.json_summary"):
        from zsdense.cli.summary import print_json_summary

        print_json_summary(summary, out_dir, ctx.info_name)
    if quiet and summary.exit_code == 0:
        return
    click.echo(f"zsdense: {summary.format()}", err=True)
    for key, msg in summary.errors[:20]:
        click.echo(f"  failed: {key}: {msg}", err=True)
    if len(summary.errors) > 20:
        click.echo(f"  ... and {len(summary.errors) - 20} more (see results.jsonl)", err=True)
    earlier = list(getattr(summary, "previous_errors", []) or [])
    for key, msg in earlier[:20]:
        click.echo(f"  failed in an earlier run (kept): {key}: {msg}", err=True)
    if len(earlier) > 20:
        click.echo(f"  ... and {len(earlier) - 20} more (see results.jsonl)", err=True)
    if earlier:
        click.echo(
            "  rerun the same command with --retry-errors to compute the failed input(s) again",
            err=True,
        )
    click.echo(f"results: {Path(out_dir) / 'results.jsonl'}", err=True)


def batch_command(f: Callable) -> Callable:
    """Runtime + output options, and turn the returned exit code into the process's.

    ``--json`` and ``--volume-maps`` are handled here (the context's ``meta`` carries them to
    :func:`run_cli_batch` and :func:`print_summary`); a command that declares a
    ``volume_maps`` parameter receives it."""

    import inspect

    params = inspect.signature(f).parameters

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any):
        # --json: print_summary reads it from the context (the commands' signatures stay)
        meta = click.get_current_context().meta
        meta["zsdense.json_summary"] = bool(kwargs.pop("json_summary", False))
        meta["zsdense.volume_maps"] = bool(kwargs.pop("volume_maps", False))
        if "volume_maps" in params:  # a command that handles it itself (zsdense run)
            kwargs["volume_maps"] = meta["zsdense.volume_maps"]
        code = f(*args, **kwargs)
        ctx = click.get_current_context()
        ctx.exit(int(code or 0))

    return output_options(runtime_options(wrapper))


@dataclass
class BatchRun:
    """What a batch command's output and runtime options ask for (:func:`task_command`)."""

    out_dir: str
    fmt: str = "tiff"
    overlay: bool = True
    force: bool = False
    retry_errors: bool = False
    quiet: bool = False
    runtime: dict = field(default_factory=dict)  # RUNTIME_KEYS -> value

    @property
    def output(self):
        """The writers' :class:`~zsdense.options.OutputOptions`."""
        from zsdense.options import OutputOptions

        return OutputOptions(fmt=self.fmt, overlay=self.overlay)

    def items(self, data):
        """DATA as work items (the output folder left out; see :func:`list_data`)."""
        return list_data(data, self.out_dir, self.quiet)

    def run(self, items, specs: Callable[[Any, Any], Sequence]) -> int:
        """Build the runtime, the task specs (``specs(runtime, output options)``), run the
        batch and print its summary; returns the exit code."""
        rt = make_runtime(**self.runtime)
        return run_cli_batch(
            rt,
            items,
            self.out_dir,
            list(specs(rt, self.output)),
            force=self.force,
            retry_errors=self.retry_errors,
            quiet=self.quiet,
        )


def task_command(f: Callable) -> Callable:
    """Runtime + output options handed to the command as one ``batch``
    (:class:`BatchRun`) argument; the returned exit code becomes the process's."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kw: Any):
        runtime = {k: kw.pop(k) for k in RUNTIME_KEYS if k in kw}
        out = {k: kw.pop(k) for k in OUTPUT_OPTIONS}
        meta = click.get_current_context().meta  # read by run_cli_batch / print_summary
        meta["zsdense.json_summary"] = bool(out.pop("json_summary", False))
        meta["zsdense.volume_maps"] = bool(out.pop("volume_maps", False))
        batch = BatchRun(
            out_dir=out["out_dir"],
            fmt=out["fmt"],
            overlay=not out["no_overlay"],
            force=out["force"],
            retry_errors=out["retry_errors"],
            quiet=out["quiet"],
            runtime=runtime,
        )
        code = f(*args, batch=batch, **kw)
        click.get_current_context().exit(int(code or 0))

    return output_options(runtime_options(wrapper))


def warn(msg: str) -> None:
    print(f"zsdense: warning: {msg}", file=sys.stderr)
