"""``zsdense decide OUT``: new thresholds for an anomaly run, from its saved maps, in seconds."""

from __future__ import annotations

import json
import sys
import time

import click


@click.command("decide")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--threshold", type=float,
    help="Pixel threshold: mask = map >= T (default: keep the run's, or calibrate).",
)  # fmt: skip
@click.option(
    "--image-threshold", type=float,
    help="Image threshold: label = score >= T (default: keep the run's, or calibrate).",
)  # fmt: skip
@click.option(
    "--thresholds", type=click.Path(exists=True, dir_okay=False),
    help="A thresholds.json (from decide, anomaly --calibrate-with or eval anomaly) for the "
    "values not given above; a file made for another preset or model set is refused.",
)  # fmt: skip
@click.option(
    "--calibrate-with", "calibrate_with", multiple=True,
    help="Known-good images (folder, files or globs; repeatable) that are inputs of this "
    "run: pixel threshold = max over their saved maps, image threshold = max of their "
    "scores. Images the run has not seen are refused: add them with the run's `zsdense "
    "anomaly` command first (decide loads no model).",
)  # fmt: skip
@click.option(
    "--calibrate-percentile", type=click.FloatRange(0, 100),
    help="With --calibrate-with: this percentile of the good pixels/scores instead of the max.",
)  # fmt: skip
@click.option("--task", help="The anomaly task to decide (only for a `zsdense run` with several).")
@click.option(
    "--no-overlay", is_flag=True,
    help="Do not rewrite the overlays (they are removed: they would show the old masks).",
)  # fmt: skip
@click.option("--no-report", is_flag=True, help="Do not rewrite report.html.")
@click.option(
    "--json", "json_summary", is_flag=True,
    help="Print a machine-readable summary (JSON) on stdout.",
)  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary.")
def decide_cmd(
    out_dir, calibrate_with, no_overlay, no_report, json_summary, quiet, **decision
) -> None:
    """Re-decide the masks, labels, overlays, manifest lines and report of an anomaly run in
    OUT from the float maps it saved: no model runs (except reading the inputs again for the
    overlays), so choosing a threshold takes seconds.

    \b
    Examples:
      zsdense decide res --threshold 0.565
      zsdense decide res --image-threshold 0.7
      zsdense decide res --calibrate-with parts/good/ --calibrate-percentile 99.9
      zsdense decide res --thresholds eval_out/thresholds.json

    The decision is recorded in OUT/run_settings.json: a later `zsdense anomaly ... --out OUT`
    resumes with the decided --threshold / --image-threshold (or --thresholds
    OUT/thresholds.json) and is refused with the old ones. The values and where they came
    from are saved in OUT/thresholds.json for reuse. A run made with --format none kept no maps
    and cannot be re-decided.

    Exit codes: 0 ok, 2 usage error (no maps, unknown good images...), 3 some records failed.
    """
    from zsdense.engine.decide import decide_run

    state = {"t": time.monotonic()}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if not quiet and (now - state["t"] >= 5.0 or done == total) and total >= 50:
            state["t"] = now
            click.echo(f"zsdense: decided {done}/{total}", err=True)

    # ``decision``: --threshold, --image-threshold, --thresholds, --calibrate-percentile and
    # --task, decide_run's own keywords
    summary = decide_run(
        out_dir,
        calibrate_with=list(calibrate_with) or None,
        overlay=False if no_overlay else None,
        report=not no_report,
        progress=progress,
        command=["zsdense", "decide", *sys.argv[2:]] if sys.argv[1:2] == ["decide"] else None,
        **decision,
    )
    _print_summary(summary, out_dir, quiet, json_summary)
    click.get_current_context().exit(summary.exit_code)


def _print_summary(summary, out_dir: str, quiet: bool, json_summary: bool) -> None:
    """What was decided, warnings and failures (stderr; failures even when quiet), the options
    that resume the folder, and the JSON summary (stdout) when asked."""
    if not quiet or summary.errors:
        click.echo(f"zsdense: {summary.format()}", err=True)
        for w in summary.warnings[:10]:
            click.echo(f"zsdense: warning: {w}", err=True)
        for key, msg in summary.errors[:20]:
            click.echo(f"  failed: {key}: {msg}", err=True)
        if not quiet:
            click.echo(
                f"to add inputs with these decisions: zsdense anomaly ... --out {out_dir} "
                f"{summary.command()}",
                err=True,
            )
    if json_summary:
        click.echo(json.dumps(summary.to_json(), indent=1))
