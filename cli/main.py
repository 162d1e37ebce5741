"""``zsdense`` console entry: a lazily loaded click group with one error policy.

Sub-commands live in their own modules and are imported only when used, so ``zsdense --version``
and ``zsdense info`` start fast and a broken optional dependency only affects its command. Every
:class:`~zsdense.errors.ZsdenseError` is printed as ``error: <message>`` without a traceback and
exits with its ``exit_code`` (2); input failures inside batch runs exit 3 after the summary.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

import zsdense

# command name -> "module:attribute"; loaded on first use
LAZY_COMMANDS: dict[str, str] = {
    "anomaly": "zsdense.cli.anomaly:anomaly_cmd",
    "openvocab": "zsdense.cli.openvocab:openvocab_cmd",
    "refer": "zsdense.cli.refer:refer_cmd",
    "run": "zsdense.cli.run:run_cmd",
    "eval": "zsdense.cli.eval:eval_group",
    "models": "zsdense.cli.models:models_group",
    "memory": "zsdense.cli.memory:memory_group",
    "train-prompts": "zsdense.cli.train:train_prompts_cmd",
    "train-upsampler": "zsdense.cli.train_upsampler:train_upsampler_cmd",
    "registers": "zsdense.cli.registers:registers_group",
    "decide": "zsdense.cli.decide:decide_cmd",
    "export": "zsdense.cli.export:export_group",
}


def lazy_short_help(spec: str, limit: int = 45) -> str | None:
    """The one-line help of a lazy command read from its module's source (its function's
    docstring, or ``short_help=`` of its decorator) without importing it: the modules pull in
    torch, which ``zsdense --help`` must not wait for. None when it cannot be read."""
    import ast
    import inspect

    module, attr = spec.split(":", 1)
    try:
        origin = importlib.util.find_spec(module).origin
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (ImportError, AttributeError, ValueError, OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            for dec in node.decorator_list:
                for kw in getattr(dec, "keywords", []):
                    if kw.arg == "short_help" and isinstance(kw.value, ast.Constant):
                        return str(kw.value.value)
            doc = ast.get_docstring(node, clean=False)
            # click's own shortening, through a bare command holding the same help text
            return click.Command(
                attr, help=inspect.cleandoc(doc) if doc else None
            ).get_short_help_str(limit)
    return None


# commands that read no method registry: they start without loading the plug-ins
NO_PLUGIN_COMMANDS = frozenset({"models"})


def load_plugins_once() -> None:
    """Load the method plug-ins (``zsdense.plugins``) before a command parses its options, so
    ``--preset`` offers theirs; a broken plug-in is one warning line, never a failed command."""
    import warnings

    from zsdense.plugins import PluginWarning, load_plugins, plugins_loaded

    if plugins_loaded():
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PluginWarning)
        load_plugins()
    for w in caught:
        if issubclass(w.category, PluginWarning):
            click.echo(f"zsdense: warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _available(spec: str) -> bool:
    module = spec.split(":", 1)[0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class LazyGroup(click.Group):
    """A group whose sub-commands are imported when invoked (or listed in --help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [n for n, spec in LAZY_COMMANDS.items() if _available(spec)]
        return sorted(set(super().list_commands(ctx)) | set(lazy))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``zsdense --help``, the lazy commands' lines read from their
        source (:func:`lazy_short_help`): nothing heavy is imported, so the help is instant."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max((len(n) for n in names), default=0)
        rows = []
        for name in names:
            text = None
            if name in LAZY_COMMANDS and name not in self.commands:
                text = lazy_short_help(LAZY_COMMANDS[name], limit)
            if text is None:
                cmd = self.get_command(ctx, name)
                if cmd is None or cmd.hidden:
                    continue
                text = cmd.get_short_help_str(limit)
            rows.append((name, text))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str):
        if name not in NO_PLUGIN_COMMANDS and (name in LAZY_COMMANDS or name in self.commands):
            load_plugins_once()
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        spec = LAZY_COMMANDS.get(name)
        if spec is None or not _available(spec):
            return None
        module, attr = spec.split(":", 1)
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(zsdense.__version__, prog_name="zsdense")
def cli() -> None:
    """Zero-shot dense perception on frozen CLIP, DINOv2 and SAM: anomaly, open-vocabulary and
    referring segmentation from one pipeline.

    Exit codes: 0 success, 2 usage or setup error (bad option, missing weights), 3 some inputs
    failed (see results.jsonl), 130 interrupted (rerun to resume).
    """


@cli.command()
@click.option(
    "--methods",
    "methods_only",
    is_flag=True,
    help="Print only the tables of the registered methods and presets (Markdown, as in the "
    "README).",
)
def info(methods_only: bool = False) -> None:
    """Versions, device, precision, the registered presets and methods, the plug-ins, and the
    folders where weights are looked for."""
    import platform

    from zsdense.config import ANOMALY_PRESETS
    from zsdense.plugins import plugin_status

    if methods_only:
        click.echo(method_tables())
        return

    import torch

    from zsdense.models import registry
    from zsdense.runtime import (
        allocator_plan,
        allocator_state,
        auto_precision,
        cpu_bf16_support,
        cpu_capability,
        resolve_device,
    )

    dev = resolve_device("auto")
    lines = [
        f"zsdense      {zsdense.__version__}",
        f"python       {platform.python_version()} ({sys.executable})",
        f"torch        {torch.__version__} (cuda available: {torch.cuda.is_available()})",
    ]
    for mod in (
        "open_clip",
        "transformers",
        "segment_anything",
        "numpy",
        "PIL",
        "cv2",
        "tifffile",
        "scipy",
        "pydicom",
        "nibabel",
        "ray",
        "spacy",
    ):
        try:
            m = importlib.import_module(mod)
            ver = getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001 - info must never fail on an optional package
            ver = "not installed"
        lines.append(f"{mod:<12} {ver}")
    lines.append(f"device       {dev} (auto)")
    sup = cpu_bf16_support()
    lines.append(f"cpu          {platform.machine()}, torch CPU capability {cpu_capability()}")
    lines.append(
        f"cpu bf16     {'native' if sup.native else 'not native (emulated, slow)'} "
        f"({sup.source}: {sup.detail})"
    )
    dtype, why = auto_precision(dev)
    lines.append(f"precision    {str(dtype).replace('torch.', '')} (auto on {dev.type}: {why})")
    if dev.type == "cpu":
        lines.append(f"cpu threads  {torch.get_num_threads()}")
    state = allocator_state()
    lines.append(f"allocator    {state.detail if state.applied else allocator_plan()}")
    lines.append(f"anomaly      presets: {', '.join(ANOMALY_PRESETS)}")
    lines.extend(f"  {row}" for row in method_tables().splitlines())
    plugins = [p for p in plugin_status() if p.dist != "zsdense"]
    lines.append(f"plug-ins     {len(plugins)} (entry-point group zsdense.methods)")
    for p in plugins:
        state = "loaded" if p.error is None else f"FAILED: {p.error}"
        lines.append(f"  {p.name} ({p.dist}, {p.target}): {state}")
    lines.append("weights dirs (searched in order):")
    for d in registry.search_locations():
        lines.append(f"  {d}")
    offline = registry.is_offline()
    lines.append(f"downloads    {'disabled (offline)' if offline else 'allowed'}")
    click.echo("\n".join(lines))


def method_tables() -> str:
    """The Markdown tables of the methods of every task family and their presets, as the
    README shows them (``zsdense info --methods``)."""
    from zsdense.dense.methods import methods_table
    from zsdense.tasks.anomaly_registry import anomaly_methods_table
    from zsdense.tasks.referring import refer_methods_table

    return (
        "Anomaly presets (`zsdense anomaly --preset`):\n\n"
        + anomaly_methods_table()
        + "\n\nOpen-vocabulary presets (`zsdense openvocab --preset`):\n\n"
        + methods_table()
        + "\n\nReferring presets (`zsdense refer --preset`):\n\n"
        + refer_methods_table()
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI with the zsdense error policy."""
    from zsdense.errors import ZsdenseError

    try:
        rc = cli.main(args=argv, prog_name="zsdense", standalone_mode=False)
    except ZsdenseError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)
    sys.exit(0)


if __name__ == "__main__":  # python -m zsdense.cli.main
    if os.environ.get("ZSDENSE_DEBUG"):  # full tracebacks for developers
        cli()
    else:
        main()
