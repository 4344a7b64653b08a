"""The one answer grader shared by curate and eval.

A verdict takes three steps:
1. extraction: the final answer is pulled from the text after the reasoning block by an anchored route
   (last \\boxed{}, "The answer is", GSM8K "####", "Answer:", user regexes; "lenient" adds the last number);
2. fast path: plain numbers (integers, decimals, simple fractions, thousands separators) are compared in
   exact rational arithmetic, and repeated (gold, answer) pairs come from a memo; whatever the fast path is
   not sure of is deferred, because it must give exactly math-verify's verdicts;
3. math-verify, in worker processes: its own SIGALRM timeouts only work in the main thread, so they are
   disabled and the parent enforces a per-item deadline, killing and replacing a stuck worker.

Model output is never evaluated as code: extraction is regex/brace matching, the fast path uses
fractions.Fraction on regex-validated digits, and math-verify only gets LaTeX extraction (no parse_expr).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing.connection import wait as wait_for_connections

from cot_distill.reasoning import split_reasoning

ANCHORS = ("required", "lenient")
MEMO_MAX_ENTRIES = 200_000


@dataclass(frozen=True)
class Verdict:
    correct: bool | None  # None: cannot judge (no answer, unparsable gold, timeout, error)
    reason: str  # match, mismatch, pred_unparsable, no_answer, unclosed_reasoning, gold_unparsable, timeout, error
    extracted: str | None  # the answer string pulled from the response
    route: str  # boxed, answer_phrase, gsm8k_hash, answer_colon, custom, last_number, none
    fast_path: bool = False  # decided by the fast path or the memo, without calling math-verify


@dataclass
class GradingStats:
    total: int = 0
    by_route: Counter = field(default_factory=Counter)
    fast_path: int = 0  # decided by the numeric / identical-string rules
    memo_hits: int = 0  # answered from an earlier math-verify verdict for the same (gold, answer)
    math_verify: int = 0  # items sent to a worker
    timeouts: int = 0
    errors: int = 0


# ----------------------------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_PHRASE = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s+is\s*:?")
_GSM8K_HASH = re.compile(r"####")
_ANSWER_COLON = re.compile(r"(?i)\banswer\s*:")
# Thousands groups first so "1,234" is one number; the lookarounds keep us from starting mid-number.
_LAST_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_MATH_WRAPPERS = (re.compile(r"^\$\$(.+?)\$\$"), re.compile(r"^\$(.+?)\$"),
                  re.compile(r"^\\\((.+?)\\\)"), re.compile(r"^\\\[(.+?)\\\]"))
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_GROUPING_BRACE = re.compile(r"(?<!\\)[{}]")  # \{ and \} are literal braces, not grouping


def _matching_braces(text: str, start: int) -> dict[int, int]:
    """Open-brace position -> its closing position, in one linear pass."""
    pairs, stack = {}, []
    for brace in _GROUPING_BRACE.finditer(text, start):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            pairs[stack.pop()] = brace.start()
    return pairs


def _last_boxed(text: str) -> str | None:
    openings = [match.end() - 1 for match in _BOXED.finditer(text)]
    if not openings:
        return None
    pairs = _matching_braces(text, openings[0])
    for brace in reversed(openings):  # a truncated last \boxed{ falls back to the one before it
        if brace in pairs:
            return text[brace + 1:pairs[brace]]
    return None


def unwrap_math(answer: str) -> str:
    """'$x$', '$$x$$', '\\(x\\)', '\\[x\\]' -> 'x'; applied to gold and extracted answers alike."""
    answer = answer.strip()
    for wrapper in _MATH_WRAPPERS:
        match = wrapper.fullmatch(answer)
        if match:
            return match.group(1).strip()
    return answer


def _answer_after(text: str, start: int) -> str | None:
    """The answer that follows an anchor phrase: a leading math span, else the line up to its sentence end."""
    line = text[start:].lstrip(" \t\n*:").split("\n", 1)[0].strip()  # "Answer:\n18" puts it on the next line
    for wrapper in _MATH_WRAPPERS:
        match = wrapper.match(line)
        if match:
            return match.group(1).strip() or None
    line = _SENTENCE_END.split(line, 1)[0].rstrip(" *.")
    return line or None


def _after_last(pattern: re.Pattern, text: str) -> str | None:
    last = None
    for last in pattern.finditer(text):
        pass
    return _answer_after(text, last.end()) if last else None


def extract_answer(text: str, anchor: str = "required",
                   patterns: list[re.Pattern] | None = None) -> tuple[str | None, str]:
    """(answer, route) from answer text (reasoning already removed); (None, 'none') when nothing anchors."""
    for pattern in patterns or ():  # the recipe's own format is the most specific signal
        matches = list(pattern.finditer(text))
        if matches and matches[-1].group(1) and matches[-1].group(1).strip():
            return unwrap_math(matches[-1].group(1)), "custom"
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return unwrap_math(boxed), "boxed"
    for route, pattern in (("answer_phrase", _ANSWER_PHRASE), ("gsm8k_hash", _GSM8K_HASH),
                           ("answer_colon", _ANSWER_COLON)):
        answer = _after_last(pattern, text)
        if answer:
            return unwrap_math(answer), route
    if anchor == "lenient":
        numbers = _LAST_NUMBER.findall(text)
        if numbers:
            return numbers[-1], "last_number"
    return None, "none"


# ------------------------------------------------------------------------------------------------ fast path

# Only forms whose math-verify parse we know exactly: it reads "1,234" as 1234, "x.y" as a sympy Float and
# fractions as exact Rationals. Digit counts are bounded so Float's 15 significant digits are never exceeded.
_SIMPLE_NUMBER = re.compile(r"""
    (?P<sign>-?)(?:
        (?P<integer>0|[1-9]\d{0,11})
      | (?P<thousands>[1-9]\d{0,2}(?:,\d{3}){1,3})
      | (?P<decimal>(?:0|[1-9]\d{0,8})\.\d{1,6})
      | \\[dt]?frac\{(?P<numerator>[1-9]\d{0,5})\}\{(?P<denominator>[1-9]\d{0,5})\}
      | (?P<slash_numerator>[1-9]\d{0,5})/(?P<slash_denominator>[1-9]\d{0,5})
    )""", re.VERBOSE)
_TEXT_INTEGER = re.compile(r"\\text\{(-?(?:0|[1-9]\d{0,11}))\}")
# math-verify rounds to 6 places when a Float is involved; values this far apart can never round together.
_SURELY_DIFFERENT = Fraction(1, 10**5)


@dataclass(frozen=True)
class _SimpleNumber:
    value: Fraction
    is_float: bool  # written with a decimal point: math-verify then compares after rounding
    is_integer_form: bool  # written as an integer (with or without thousands separators)


def _simple_number(text: str) -> _SimpleNumber | None:
    match = _SIMPLE_NUMBER.fullmatch(text)
    if not match:
        return None
    sign = -1 if match["sign"] else 1
    if match["integer"] or match["thousands"]:
        digits = (match["integer"] or match["thousands"]).replace(",", "")
        return _SimpleNumber(sign * Fraction(int(digits)), False, True)
    if match["decimal"]:
        return _SimpleNumber(sign * Fraction(match["decimal"]), True, False)
    numerator = match["numerator"] or match["slash_numerator"]
    denominator = match["denominator"] or match["slash_denominator"]
    return _SimpleNumber(sign * Fraction(int(numerator), int(denominator)), False, False)


def fast_verdict(gold: str, answer: str) -> bool | None:
    """math-verify's verdict for plain numbers, or None when it is not certain what math-verify would say."""
    gold_number = _simple_number(gold)
    if gold_number is None:
        return None
    text_integer = _TEXT_INTEGER.fullmatch(answer)
    if text_integer:
        # math-verify reads \text{18} as a Symbol and compares str(gold) with its name.
        if not gold_number.is_integer_form or text_integer[1] != str(int(text_integer[1])):
            return None
        return str(int(gold_number.value)) == text_integer[1]
    answer_number = _simple_number(answer)
    if answer_number is None:
        return None
    if gold_number.value == answer_number.value:
        return True
    if not (gold_number.is_float or answer_number.is_float):
        return False  # exact Integer/Rational comparison in sympy
    return False if abs(gold_number.value - answer_number.value) >= _SURELY_DIFFERENT else None


# ------------------------------------------------------------------------------------- math-verify workers

def _worker_main(connection) -> None:
    """Runs in a spawned process: verify (gold, answer) pairs until told to stop."""
    logging.disable(logging.CRITICAL)  # math-verify warns on every process that timeouts are disabled
    from functools import lru_cache

    from math_verify import LatexExtractionConfig, parse, verify

    # LaTeX only: ExprExtractionConfig hands regex-filtered text to sympy's parse_expr, i.e. to eval().
    config = [LatexExtractionConfig()]

    def parse_answer(answer: str) -> list:
        return parse(f"\\boxed{{{answer}}}", extraction_config=config, parsing_timeout=None)

    @lru_cache(maxsize=4096)
    def parse_gold(gold: str) -> tuple[list, bool]:
        parsed = parse_answer(gold)
        usable = any(not isinstance(item, str) for item in parsed)
        return parsed, usable and verify(parsed, parsed, timeout_seconds=None)

    def judge(gold: str, answer: str) -> tuple[str, bool]:
        parsed_gold, gold_matches_itself = parse_gold(gold)
        if not any(not isinstance(item, str) for item in parsed_gold):
            return "gold_unparsable", False
        parsed_answer = parse_answer(answer)
        if not parsed_answer:
            return "pred_unparsable", gold_matches_itself
        correct = verify(parsed_gold, parsed_answer, timeout_seconds=None)
        return ("match" if correct else "mismatch"), gold_matches_itself

    connection.send("ready")
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            connection.send(judge(*job))
        except Exception:  # noqa: BLE001 - math-verify catches almost everything; a bad item must not kill us
            connection.send(("error", False))


class _Worker:
    def __init__(self, context) -> None:
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_end,), daemon=True)
        self.process.start()
        child_end.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.connection.close()

    def stop(self) -> None:
        try:
            self.connection.send(None)
            self.process.join(2)
        except OSError:
            pass
        self.kill()  # a no-op for a worker that already exited


class VerifierPool:
    """A fixed number of math-verify processes; the parent enforces each item's deadline. Thread-safe."""

    def __init__(self, workers: int = 1) -> None:
        self._size = max(1, workers)
        self._context = multiprocessing.get_context("spawn")  # no locks or threads inherited from the parent
        self._starting: list[_Worker] = []  # spawned, not yet ready (importing sympy takes a second or two)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def run(self, jobs: list[tuple[str, str]], timeout_s: float) -> list[tuple]:
        """A (reason, gold_matches_itself) tuple per (gold, answer) job; reason 'timeout' past the deadline."""
        with self._lock:
            results: list[tuple | None] = [None] * len(jobs)
            pending = deque(enumerate(jobs))
            busy: dict = {}  # connection -> (worker, job index, deadline)
            while len(self._starting) + len(self._idle) < min(self._size, len(jobs)):
                self._starting.append(_Worker(self._context))
            while pending or busy:
                while pending and self._idle:
                    worker, (index, job) = self._idle.pop(), pending.popleft()
                    if self._send(worker, job):
                        busy[worker.connection] = (worker, index, time.monotonic() + timeout_s)
                    else:  # it died while idle and was replaced: the job waits for another worker
                        pending.appendleft((index, job))
                self._collect(busy, results)
            return results

    def _collect(self, busy: dict, results: list) -> None:
        """Wait for the next result, ready worker or deadline; kill whoever is past its deadline."""
        deadline = min((deadline for _, _, deadline in busy.values()), default=None)
        wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        starting = {worker.connection: worker for worker in self._starting}
        for connection in wait_for_connections(list(busy) + list(starting), timeout=wait_s):
            if connection in busy:
                worker, index, _ = busy.pop(connection)
                results[index] = self._receive(worker)
            else:
                self._finish_start(starting[connection])
        now = time.monotonic()
        for connection, (worker, index, deadline) in list(busy.items()):
            if deadline <= now:  # stuck inside sympy: only killing the process stops it
                del busy[connection]
                self._replace(worker)
                results[index] = ("timeout", False)

    def _send(self, worker: _Worker, job: tuple[str, str]) -> bool:
        try:
            if worker.process.is_alive():
                worker.connection.send(job)
                return True
        except OSError:
            pass
        self._replace(worker)
        return False

    def _receive(self, worker: _Worker) -> tuple:
        try:
            result = worker.connection.recv()
        except (EOFError, OSError):  # the worker crashed (say, a C stack overflow on absurd nesting)
            self._replace(worker)
            return ("error", False)
        self._idle.append(worker)
        return result

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._starting.append(_Worker(self._context))

    def _finish_start(self, worker: _Worker) -> None:
        self._starting.remove(worker)
        try:
            ready = worker.connection.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            worker.kill()
            raise RuntimeError("a math-verify worker failed to start; is math-verify installed?")
        self._idle.append(worker)

    def close(self) -> None:
        with self._lock:
            for worker in self._idle + self._starting:
                worker.stop()
            self._idle, self._starting = [], []


# ------------------------------------------------------------------------------------------------- grader

class Grader:
    """Grades (response, gold) pairs; holds the worker pool, the memo and route statistics. Not thread-safe."""

    def __init__(self, *, anchor: str = "required", patterns: list[str] | None = None, timeout_s: float = 5.0,
                 workers: int = 1, fast_path: bool = True, memo: bool = True,
                 pool: VerifierPool | None = None) -> None:
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        self.anchor, self.timeout_s = anchor, timeout_s
        self.patterns = [re.compile(pattern) for pattern in patterns or ()]
        for pattern in self.patterns:
            if pattern.groups < 1:
                raise ValueError(f"answer pattern {pattern.pattern!r} needs a capture group (group 1 = answer)")
        self.use_fast_path, self.use_memo = fast_path, memo
        self._owns_pool = pool is None
        self._pool = pool or VerifierPool(workers)
        self._memo: dict[tuple[str, str], tuple[bool | None, str]] = {}
        self._gold_matches_itself: dict[str, bool] = {}
        self.stats = GradingStats()

    def grade(self, response: str, gold: str) -> Verdict:
        return self.grade_batch([(response, gold)])[0]

    def grade_batch(self, pairs: list[tuple[str, str]]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(pairs)
        # One math-verify job per distinct (gold, answer) when the memo is on, one per item when it is off.
        deferred: dict[object, tuple[tuple[str, str], list[tuple[int, str]]]] = {}
        for index, (response, gold) in enumerate(pairs):
            verdict, job, route = self._grade_without_math_verify(response, gold)
            if verdict is not None:
                verdicts[index] = verdict
            else:
                deferred.setdefault(job if self.use_memo else index, (job, []))[1].append((index, route))
        self._verify_deferred(list(deferred.values()), verdicts)
        self.stats.total += len(pairs)
        for verdict in verdicts:
            self.stats.by_route[verdict.route] += 1
        return verdicts

    def _grade_without_math_verify(self, response: str, gold: str):
        """(verdict, None, route) when decided here, else (None, (gold, answer), route) for math-verify."""
        split = split_reasoning(response)
        if not split.closed:
            return Verdict(None, "unclosed_reasoning", None, "none"), None, "none"
        answer, route = extract_answer(split.answer, self.anchor, self.patterns)
        if answer is None:
            return Verdict(None, "no_answer", None, "none"), None, route
        gold = unwrap_math(gold)
        if not gold:
            return Verdict(None, "gold_unparsable", answer, route), None, route
        if self.use_memo and (gold, answer) in self._memo:
            self.stats.memo_hits += 1
            correct, reason = self._memo[(gold, answer)]
            return Verdict(correct, reason, answer, route, fast_path=True), None, route
        if self.use_fast_path:
            correct = fast_verdict(gold, answer)
            if correct is None and answer == gold and self._gold_matches_itself.get(gold):
                correct = True  # identical strings parse identically, and this gold is known to verify
            if correct is not None:
                self.stats.fast_path += 1
                return Verdict(correct, "match" if correct else "mismatch", answer, route, True), None, route
        return None, (gold, answer), route

    def _verify_deferred(self, deferred: list[tuple[tuple[str, str], list[tuple[int, str]]]], verdicts: list) -> None:
        jobs = [job for job, _ in deferred]
        self.stats.math_verify += len(jobs)
        results = self._pool.run(jobs, self.timeout_s) if jobs else []
        for (job, copies), result in zip(deferred, results):
            reason, gold_matches_itself = result
            correct = {"match": True, "mismatch": False, "pred_unparsable": False}.get(reason)
            self.stats.timeouts += reason == "timeout"
            self.stats.errors += reason == "error"
            if reason not in ("timeout", "error"):
                self._remember(job, correct, reason, gold_matches_itself)
            for position, (index, route) in enumerate(copies):
                from_memo = position > 0  # later copies of the same pair reuse the first one's verdict
                self.stats.memo_hits += from_memo
                verdicts[index] = Verdict(correct, reason, job[1], route, fast_path=from_memo)

    def _remember(self, job: tuple[str, str], correct: bool | None, reason: str, gold_matches_itself: bool) -> None:
        if reason != "gold_unparsable":
            self._gold_matches_itself[job[0]] = gold_matches_itself
        if self.use_memo:
            if len(self._memo) >= MEMO_MAX_ENTRIES:
                self._memo.clear()  # crude but bounded; a curate run rarely repeats pairs this far apart
            self._memo[job] = (correct, reason)

    def close(self) -> None:
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def incomplete_reason(sample) -> str | None:
    """Why a Sample (or anything with its error, finish_reason, reasoning_closed and content) cannot be accepted
    whatever its answer: curate's completeness filter, and generate's until_verified before it grades."""
    if sample.error:
        return "error"
    if sample.finish_reason != "stop":
        return "truncated" if sample.finish_reason == "length" else f"finish_{sample.finish_reason}"
    if not sample.reasoning_closed:
        return "unclosed_reasoning"
    if not sample.content.strip():
        return "empty_answer"
    return None


# ------------------------------------------------------------------------------------- single-item entry

_shared_pool: VerifierPool | None = None
_shared_graders: dict[tuple, Grader] = {}
_shared_lock = threading.Lock()  # Grader's memo and stats are not thread-safe


def grade(response: str, gold: str, *, anchor: str = "required", patterns: list[str] | None = None,
          timeout_s: float = 5.0) -> Verdict:
    """Grade one response against its gold answer with the shared lazily started worker."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is None:
            _shared_pool = VerifierPool(workers=1)
            atexit.register(_shared_pool.close)
        settings = (anchor, tuple(patterns or ()), timeout_s)
        if settings not in _shared_graders:
            _shared_graders[settings] = Grader(anchor=anchor, patterns=patterns, timeout_s=timeout_s,
                                               pool=_shared_pool)
        return _shared_graders[settings].grade(response, gold)
