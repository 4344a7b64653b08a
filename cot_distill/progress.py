"""Progress of the generate stage: a live rich bar on a terminal, plain periodic lines everywhere else.

Why two modes: a person watching a terminal wants one bar that updates in place, while CI logs, log files and
job schedulers want a short self-contained line every `interval_s` seconds that greps and tails well and never
fills the log with redraw escapes. Both modes end with the same plain summary line, so scrollback and logs
keep the totals after the bar is gone.

The bar is used only between start() and stop() (or inside `with progress:`) and only when the stream is an
interactive terminal (rich's Console.is_interactive: a tty, not TERM=dumb; FORCE_COLOR / TTY_COMPATIBLE /
TTY_INTERACTIVE are honoured as rich documents them). Set COT_DISTILL_PLAIN_PROGRESS=1 to force the plain
lines on a terminal too, e.g. when the terminal's output is also being logged.

Plain line format (tests and people parse it; keep it stable):
  [generate] {finished}/{total} samples (x.x%) | N tok/s | in flight K | errors E (failed F, retries R)
  | truncated T | eta M.M min [| what generate.until_verified and generate.budget add]
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn
from rich.progress import Progress as RichProgress
from rich.table import Column

if TYPE_CHECKING:
    from cot_distill.records import Completion

PLAIN_PROGRESS_ENV = "COT_DISTILL_PLAIN_PROGRESS"


def plain_forced() -> bool:
    return os.environ.get(PLAIN_PROGRESS_ENV, "").strip() not in ("", "0")


class Progress:
    """Counters of a run, reported as a live bar (terminal) or a periodic one-line report (anything else)."""

    def __init__(self, total: int, already_done: int, interval_s: float, stream=None, *,
                 console: Console | None = None):
        stream = stream if stream is not None else sys.stderr  # the stderr of now, not of import time
        self.total = total
        self.already_done = already_done
        self.done = 0
        self.failed = 0
        self.retries = 0
        self.truncated = 0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.errors_by_kind: dict[str, int] = {}
        self.started = time.monotonic()
        self.interval_s = interval_s
        self._last_report = self.started
        # `console` lets tests (or callers) decide what counts as a terminal; plain lines then go to its file.
        self._console = console if console is not None else Console(file=stream)
        self._stream = stream if console is None else console.file
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self._running = False
        self.extras: list[Callable[[], str]] = []  # more fields for the line and the bar, e.g. verdicts, spend

    def restart_clock(self) -> None:
        self.started = self._last_report = time.monotonic()

    def record_sample(self, completion: Completion) -> None:
        self.done += 1
        self.completion_tokens += completion.completion_tokens
        self.prompt_tokens += completion.prompt_tokens
        if completion.finish_reason == "length":
            self.truncated += 1

    def record_error(self, message: str) -> None:
        kind = message.split(":", 1)[0][:60]
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(self.elapsed(), 1e-9)

    def _eta(self) -> str:
        # Rate of this run's samples only: already_done ones (resume) would make the run look faster than it is.
        rate = self.done / max(self.elapsed(), 1e-9)
        remaining = self.total - self.already_done - self.done - self.failed
        return f"{remaining / rate / 60:.1f} min" if rate > 0 else "?"

    def line(self, in_flight: int | None = None) -> str:
        finished = self.already_done + self.done
        flight = f" | in flight {in_flight}" if in_flight is not None else ""
        return (f"[generate] {finished}/{self.total} samples ({100 * finished / max(self.total, 1):.1f}%)"
                f" | {self.tokens_per_s():,.0f} tok/s{flight} | errors {sum(self.errors_by_kind.values())}"
                f" (failed {self.failed}, retries {self.retries}) | truncated {self.truncated} | eta {self._eta()}"
                f"{self._extra_text()}")

    def _extra_text(self) -> str:
        return "".join(f" | {extra()}" for extra in self.extras)

    def maybe_report(self, in_flight: int | None = None, force: bool = False) -> None:
        if self._bar is not None:
            # Only new numbers for the bar; rich redraws on its own thread at its own rate, so this stays cheap.
            self._bar.update(self._task, completed=self.already_done + self.done, **self._bar_fields(in_flight))
            return
        now = time.monotonic()
        if force or now - self._last_report >= self.interval_s:
            self._last_report = now
            print(self.line(in_flight), file=self._stream, flush=True)

    def _bar_fields(self, in_flight: int | None) -> dict[str, str]:
        return {"tok_s": f"{self.tokens_per_s():,.0f}", "in_flight": "-" if in_flight is None else str(in_flight),
                "errors": str(sum(self.errors_by_kind.values())), "failed": str(self.failed),
                "retries": str(self.retries), "truncated": str(self.truncated), "eta": self._eta(),
                "extra": self._extra_text()}

    def start(self) -> Progress:
        """Show the live bar if the stream is an interactive terminal (and plain mode is not forced)."""
        if self._running:
            return self
        self._running = True
        if self._console.is_interactive and not plain_forced():
            # The counters are one column that may wrap: nine narrow columns get cut to "…" on 80-column terminals.
            stats = TextColumn("| {task.fields[tok_s]} tok/s | in flight {task.fields[in_flight]}"
                               " | errors {task.fields[errors]} (failed {task.fields[failed]},"
                               " retries {task.fields[retries]}) | truncated {task.fields[truncated]}"
                               " | eta {task.fields[eta]}{task.fields[extra]}", table_column=Column(no_wrap=False))
            self._bar = RichProgress(
                TextColumn("[bold]generate"), BarColumn(bar_width=20), MofNCompleteColumn(),
                TextColumn("{task.percentage:>5.1f}%"), stats,
                console=self._console, transient=False, refresh_per_second=4,
            )
            self._task = self._bar.add_task("generate", total=self.total, completed=self.already_done,
                                            **self._bar_fields(None))
            self._bar.start()  # also routes other print()s to stdout/stderr above the bar instead of through it
        return self

    def stop(self) -> None:
        """Stop the live bar (terminal left sane even on an exception) and print the final plain line once."""
        if not self._running:
            return
        self._running = False
        bar, self._bar = self._bar, None
        try:
            if bar is not None:
                # in_flight keeps its last reported value: stop() itself does not know it.
                fields = {name: value for name, value in self._bar_fields(None).items() if name != "in_flight"}
                try:
                    bar.update(self._task, completed=self.already_done + self.done, **fields)
                finally:
                    bar.stop()  # shows the cursor again and undoes rich's stdout/stderr redirection
        finally:
            print(self.line(), file=self._stream, flush=True)

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
