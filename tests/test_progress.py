"""The generate progress reporter: the plain line format and interval, the live bar on a terminal, the env switch."""

from __future__ import annotations

import io
import re
import sys
from types import SimpleNamespace

import pytest
from rich.console import Console

import cot_distill.progress as progress_module
from cot_distill.progress import PLAIN_PROGRESS_ENV, Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=fake))
    return fake


@pytest.fixture(autouse=True)
def no_plain_override(monkeypatch):
    monkeypatch.delenv(PLAIN_PROGRESS_ENV, raising=False)


def completion(tokens: int = 100, finish_reason: str = "stop"):
    return SimpleNamespace(completion_tokens=tokens, prompt_tokens=10, finish_reason=finish_reason)


def without_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def terminal_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=220)


def fill(progress: Progress) -> None:
    """3 samples this run (one truncated), 3 errors of 2 kinds, 1 failed request, 2 retries."""
    progress.record_sample(completion())
    progress.record_sample(completion(finish_reason="length"))
    progress.record_sample(completion())
    progress.record_error("HTTP 500: internal error")
    progress.record_error("HTTP 500: again")
    progress.record_error("Timeout")
    progress.failed += 1
    progress.retries += 2


def test_plain_line_has_the_exact_format_and_counts(clock):
    progress = Progress(total=10, already_done=2, interval_s=5, stream=io.StringIO())
    fill(progress)
    clock.now += 10
    # 300 tokens / 10 s; eta from this run's rate only (0.3/s, not 0.5/s counting the 2 resumed samples):
    # 10 - 5 finished - 1 failed = 4 left -> 13.3 s
    assert progress.line(in_flight=3) == ("[generate] 5/10 samples (50.0%) | 30 tok/s | in flight 3"
                                          " | errors 3 (failed 1, retries 2) | truncated 1 | eta 0.2 min")
    assert progress.line() == ("[generate] 5/10 samples (50.0%) | 30 tok/s | errors 3 (failed 1, retries 2)"
                               " | truncated 1 | eta 0.2 min")
    assert progress.errors_by_kind == {"HTTP 500": 2, "Timeout": 1}
    assert (progress.truncated, progress.prompt_tokens, progress.completion_tokens) == (1, 30, 300)


def test_plain_eta_is_unknown_before_the_first_sample(clock):
    progress = Progress(total=4, already_done=0, interval_s=5, stream=io.StringIO())
    assert progress.line().endswith("| eta ?")


def test_plain_mode_reports_every_interval_and_when_forced(clock):
    stream = io.StringIO()
    progress = Progress(total=10, already_done=0, interval_s=5, stream=stream)
    progress.start()  # not a terminal: start() changes nothing about the reporting
    for advance in (1, 5, 1):  # t = 1 (too soon), 6 (due), 7 (too soon again)
        clock.now += advance
        progress.record_sample(completion())
        progress.maybe_report(in_flight=2)
    assert stream.getvalue().splitlines() == ["[generate] 2/10 samples (20.0%) | 33 tok/s | in flight 2"
                                              " | errors 0 (failed 0, retries 0) | truncated 0 | eta 0.4 min"]
    progress.maybe_report(force=True)
    assert len(stream.getvalue().splitlines()) == 2
    assert "\x1b" not in stream.getvalue()


def test_stop_prints_the_final_line_once(clock):
    stream = io.StringIO()
    with Progress(total=2, already_done=1, interval_s=60, stream=stream) as progress:
        progress.record_sample(completion())
        progress.maybe_report()
    progress.stop()  # a second stop is harmless
    assert stream.getvalue().splitlines() == [progress.line()]
    assert progress.line().startswith("[generate] 2/2 samples (100.0%)")


def test_terminal_mode_shows_a_bar_and_ends_with_the_plain_line(clock):
    console = terminal_console()
    stdout, stderr = sys.stdout, sys.stderr
    with Progress(total=10, already_done=2, interval_s=0, console=console) as progress:
        fill(progress)
        clock.now += 10
        progress.maybe_report(in_flight=4, force=True)
        progress.maybe_report(in_flight=4)
        assert "[generate]" not in console.file.getvalue()  # the bar replaces the periodic lines
    out = console.file.getvalue()
    assert out.startswith("\x1b[?25l") and "\x1b[?25h" in out  # cursor hidden while live, shown again at stop
    bar, final_line = without_ansi(out).rstrip("\n").rsplit("\n", 1)
    for shown in ("generate", "5/10", "50.0%", "30 tok/s", "in flight 4", "errors 3 (failed 1, retries 2)",
                  "truncated 1", "eta 0.2 min"):
        assert shown in bar
    assert final_line == progress.line()
    assert out.count("[generate]") == 1
    assert (sys.stdout, sys.stderr) == (stdout, stderr)  # rich's print redirection is undone


def test_terminal_mode_stops_the_bar_when_the_run_raises(clock):
    console = terminal_console()
    with pytest.raises(KeyboardInterrupt):
        with Progress(total=3, already_done=0, interval_s=1, console=console) as progress:
            progress.record_sample(completion())
            raise KeyboardInterrupt
    out = console.file.getvalue()
    assert "\x1b[?25h" in out
    assert without_ansi(out).rstrip("\n").endswith("\n" + progress.line())


def test_env_var_forces_plain_lines_on_a_terminal(monkeypatch, clock):
    monkeypatch.setenv(PLAIN_PROGRESS_ENV, "1")
    console = terminal_console()
    with Progress(total=4, already_done=0, interval_s=5, console=console) as progress:
        clock.now += 1
        progress.record_sample(completion(finish_reason="length"))
        progress.maybe_report(in_flight=1, force=True)
    lines = console.file.getvalue().splitlines()
    assert lines[0] == ("[generate] 1/4 samples (25.0%) | 100 tok/s | in flight 1 | errors 0 (failed 0, retries 0)"
                        " | truncated 1 | eta 0.1 min")
    assert len(lines) == 2 and "\x1b" not in console.file.getvalue()


def test_env_var_zero_keeps_the_bar(monkeypatch):
    monkeypatch.setenv(PLAIN_PROGRESS_ENV, "0")
    console = terminal_console()
    with Progress(total=1, already_done=0, interval_s=5, console=console):
        pass
    assert "\x1b[?25l" in console.file.getvalue()
