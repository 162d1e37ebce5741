"""``zsdense models list | fetch | verify``: see, download and check the registered checkpoints.

User errors raise :class:`zsdense.errors.ZsdenseError` subclasses; ``cli/main.py`` prints them as
``error: <message>`` without a traceback and exits with their exit code (2).
"""

from __future__ import annotations

import click

from zsdense.models import registry

_WEIGHTS_DIR_HELP = (
    "Folder with checkpoints (also $ZSDENSE_WEIGHTS); looked in first, and downloads go there."
)


def _human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _names(names: tuple[str, ...]) -> list[str]:
    """Expand ``all`` and check every name (ConfigError listing the known ones)."""
    if not names or "all" in names:
        return list(registry.CHECKPOINTS)
    for n in names:
        registry.get_checkpoint(n)
    return list(dict.fromkeys(names))


@click.group("models")
def models_group() -> None:
    """List, download and verify the checkpoints zsdense uses."""


@models_group.command("list")
@click.option("--weights-dir", type=click.Path(file_okay=False), help=_WEIGHTS_DIR_HELP)
def list_cmd(weights_dir: str | None) -> None:
    """Every registered checkpoint and whether it is on this machine (hashes are not checked)."""
    rows = []
    for name, ck in registry.CHECKPOINTS.items():
        path, specs, _ = registry.find(name, weights_dir=weights_dir)
        if path is None:
            size = sum(s.size for s in ck.files if s.size) or None
            present, shown = "no", "-"
        else:
            folder = path if len(specs) > 1 else path.parent
            size = sum((folder / s.filename).stat().st_size for s in specs)
            present, shown = "yes", str(path)
        rows.append([name, ck.kind, ck.arch, present, _human_size(size), ck.license, shown])
    click.echo(_table(rows, ["name", "kind", "arch", "here", "size", "licence", "path"]))


@models_group.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option("--weights-dir", type=click.Path(file_okay=False), help=_WEIGHTS_DIR_HELP)
@click.option("--progress/--no-progress", default=True, help="Show a download progress bar.")
def fetch_cmd(names: tuple[str, ...], weights_dir: str | None, progress: bool) -> None:
    """Download (if needed) and verify checkpoints NAMES (``all`` for every one).

    Respects $ZSDENSE_OFFLINE / $HF_HUB_OFFLINE: offline, a missing checkpoint is an error that
    says where it was looked for and how to supply it.
    """
    for name in _names(names):
        path = registry.resolve(name, weights_dir=weights_dir, progress=progress)
        statuses = {r.status for r in registry.verify(name, weights_dir=weights_dir)}
        note = "hash ok" if statuses == {"ok"} else ", ".join(sorted(statuses))
        click.echo(f"{name}: {path} ({note})")


@models_group.command("verify")
@click.argument("names", nargs=-1)
@click.option("--weights-dir", type=click.Path(file_okay=False), help=_WEIGHTS_DIR_HELP)
def verify_cmd(names: tuple[str, ...], weights_dir: str | None) -> None:
    """Check the SHA-256 of the checkpoints present (all of them when no NAMES are given).

    Exit codes: 0 every file checked is ok (or has no published hash), 2 a file differs from
    its published hash or a checkpoint named in NAMES is missing, 130/143 interrupted.
    """
    results = []
    for name in _names(names):
        results += registry.verify(name, weights_dir=weights_dir)
    rows = [
        [r.name, r.filename, r.status, str(r.path) if r.path else "-"]
        for r in results
        if names or r.status != "missing"
    ]
    if rows:
        click.echo(_table(rows, ["name", "file", "status", "path"]))
    else:
        click.echo("no registered checkpoint is present here (see `zsdense models list`)")
    bad = [r for r in results if r.status == "mismatch"]
    missing = [r for r in results if names and r.status == "missing"]
    for r in bad:
        click.echo(
            f"error: {r.path}: SHA-256 {r.actual} differs from the published {r.expected} "
            f"for {r.name}; delete or replace the file, then `zsdense models fetch {r.name}`",
            err=True,
        )
    for r in missing:
        click.echo(
            f"error: {r.name}: {r.filename} is not present; `zsdense models fetch {r.name}`",
            err=True,
        )
    if bad or missing:
        raise SystemExit(2)
