"""The account of one batch run (local or Ray engine): how many records were made, ok, failed,
skipped from an earlier run, the paths left out, the stage times, the exit code and the summary
line the CLI prints."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field


@dataclass
class RunSummary:
    total: int = 0  # manifest records produced in this run
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already complete (or already failed) from an earlier run
    not_processed: int = 0  # paths the listing saw but does not process (hidden, unsupported)
    inputs: int = 0  # input files (or referring queries) of the run: the progress line's unit
    interrupted: bool = False
    not_started: int = 0  # inputs left when interrupted
    stop_signal: int = int(signal.SIGINT)  # the signal that interrupted the run
    wall_seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)  # (key, message)
    fallbacks: int = 0  # ok records whose result is a method's stand-in ("fallback": true)
    extra_outputs: list = field(default_factory=list)  # report.html, volume maps
    # (key, message) of failures an earlier run recorded and this one left as they were
    previous_errors: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 all ok (skipped paths are not failures), 3 some inputs failed, 128 + the signal
        when interrupted (130 SIGINT, 143 SIGTERM)."""
        if self.interrupted:
            return 128 + int(self.stop_signal)
        return 3 if self.failed else 0

    def format(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.stage_seconds.items()))
        text = ""
        if self.inputs:  # the progress line's unit; records: one per image (page, frame...)
            records = self.total + self.skipped  # made now + settled earlier
            text = f"{self.inputs} input(s) -> {records} image record(s): "
        text += f"{self.ok} ok"
        if self.fallbacks:
            text += f" ({self.fallbacks} of them fallbacks: see 'fallback' in results.jsonl)"
        text += f", {self.failed} failed"
        if self.previous_errors:
            text += f" ({len(self.previous_errors)} in an earlier run, kept: --retry-errors)"
        text += f", {self.skipped} skipped (already done)"
        if self.not_processed:
            text += (
                f", {self.not_processed} path(s) not processed (see the 'skipped' lines of "
                "results.jsonl)"
            )
        text += f" in {self.wall_seconds:.1f}s" + (f"; stage time: {stages}" if stages else "")
        if self.interrupted:
            text += (
                f"\ninterrupted: {self.not_started} input(s) not processed; rerun the same "
                "command to resume where it stopped"
            )
        return text
