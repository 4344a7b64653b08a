"""generate.until_verified: sample each prompt until it has k verified traces, or max_samples samples.

Why: fixed-n sampling spends most teacher tokens on prompts that are already solved. Here a prompt stops getting
requests once k of its samples verify, and a prompt that never verifies stops at max_samples.

- VerifiedQueue (a teachers.window.RequestQueue) holds each prompt's unsent requests in sample index order and
  hands out a prompt's next request only while verified + open < k, where open counts requests sent, or finished
  and not yet graded. A teacher that is always right therefore gets exactly k requests per prompt, one that is
  always wrong exactly max_samples. The prompt being served keeps being served until it has enough open (its
  requests share a prefix, which vLLM's prefix cache reuses); a prompt whose sample failed to verify goes back to
  the front; the next prompt in order fills every other free slot, so the window stays full.
- Verdicts come from a thread of their own (VerdictThread) with the curate grader (grading.Grader: math-verify in
  worker processes with a per-item deadline, after grading.incomplete_reason): the backend hands it a finished
  sample and goes on, so grading a 32k-token trace never holds a request slot.
- Decisions come from the ledger. At start every sample of the job already in samples.jsonl is graded again
  (ledger_verdicts; the fast path decides plain numbers without math-verify). A kill -9 loses only requests in
  flight and verdicts not yet given, and both are rebuilt from the ledger. A prompt's requests are its sample
  indices 0..max_samples-1, each sent once per run, so no prompt goes past max_samples however often it resumes.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot_distill.config import CorrectnessFilter, UntilVerifiedSection
from cot_distill.errors import UserError
from cot_distill.generate.ledger import compact_key
from cot_distill.grading import Grader, incomplete_reason
from cot_distill.records import Prompt, Sample, SampleRequest, iter_jsonl
from cot_distill.teachers.window import RequestQueue


class UntilVerifiedError(UserError, ValueError):
    """generate.until_verified cannot run on these prompts; the message says which and why."""


def open_grader(grading: CorrectnessFilter) -> Grader:
    """The grader curate builds from the same settings, with one math-verify worker: generate's grading is a side
    task beside the requests, and the fast path decides plain numbers without it."""
    return Grader(anchor=grading.answer_anchor, patterns=grading.answer_patterns, timeout_s=grading.timeout_s,
                  fast_path=grading.fast_path, memo=grading.memo)


def accepted(grader: Grader, samples: list[Sample], golds: list[str]) -> list[bool]:
    """Whether each sample is a trace curate would keep for correctness: complete, and its answer verifies."""
    complete = [index for index, sample in enumerate(samples) if incomplete_reason(sample) is None]
    verdicts = grader.grade_batch([(samples[index].content, golds[index]) for index in complete])
    result = [False] * len(samples)
    for index, verdict in zip(complete, verdicts):
        result[index] = verdict.correct is True
    return result


def gold_answers(prompts: list[Prompt]) -> dict[str, str]:
    missing = [prompt.id for prompt in prompts if prompt.answer is None]
    if missing:
        raise UntilVerifiedError(f"generate.until_verified grades every sample against its gold answer, but "
                                 f"{len(missing)} prompts have none (e.g. {missing[:3]}); map data.fields.answer")
    return {prompt.id: prompt.answer for prompt in prompts}


def ledger_verdicts(samples_path: Path, job_keys: set[bytes], golds: dict[str, str],
                    grader: Grader) -> dict[str, tuple[int, int]]:
    """prompt id -> (samples graded, samples accepted) over this job's samples (keys: compact_key) already in the
    ledger."""
    samples = [Sample.model_validate(obj) for _, obj in iter_jsonl(samples_path)
               if compact_key(obj.get("request_key") or "") in job_keys]
    verdicts = accepted(grader, samples, [golds[sample.prompt_id] for sample in samples])
    counts: dict[str, tuple[int, int]] = {}
    for sample, ok in zip(samples, verdicts):
        graded, verified = counts.get(sample.prompt_id, (0, 0))
        counts[sample.prompt_id] = (graded + 1, verified + ok)
    return counts


@dataclass
class PromptState:
    unsent: deque  # SampleRequests not in the ledger and not yet sent by this run, in sample index order
    graded: int = 0
    verified: int = 0
    open: int = 0  # sent, or finished and not yet graded
    failed: int = 0  # failed after retries in this run: the next run sends those indices again

    def wants_more(self, k: int) -> bool:
        return bool(self.unsent) and self.verified + self.open < k

    def outcome(self, k: int) -> str:
        if self.verified >= k:
            return "solved"
        if not self.unsent and not self.open and not self.failed:
            return "exhausted"  # every index has a sample (or was rejected for good), none enough
        return "undecided"


class VerifiedQueue(RequestQueue):
    """See the module docstring. take() and on_failure() come from the backend, on_verdict() from VerdictThread:
    one lock guards the counts. Every prompt that wants more is in `ready` (a prompt starts wanting more only on
    a verdict or a failure, which requeue it); entries that stopped wanting more are dropped when met."""

    def __init__(self, settings: UntilVerifiedSection, states: dict[str, PromptState]):
        super().__init__()
        self.k, self.settings, self.states = settings.k, settings, states
        self.ready: deque[str] = deque(prompt_id for prompt_id, state in states.items() if state.wants_more(self.k))
        self.queued = set(self.ready)
        self.lock = threading.Lock()
        self.open = 0
        self.unsent = sum(len(state.unsent) for state in states.values())
        self.verified = sum(state.verified for state in states.values())
        self.graded = sum(state.graded for state in states.values())
        self.decided = Counter(state.outcome(self.k) for state in states.values())
        self.error: BaseException | None = None  # the grading thread's, raised by VerdictThread.close()

    @classmethod
    def build(cls, pending: list[SampleRequest], prompt_ids: list[str], settings: UntilVerifiedSection,
              from_ledger: dict[str, tuple[int, int]]) -> VerifiedQueue:
        states = {prompt_id: PromptState(deque(), *from_ledger.get(prompt_id, (0, 0))) for prompt_id in prompt_ids}
        for request in pending:
            states[request.prompt_id].unsent.append(request)
        return cls(settings, states)

    def take(self) -> SampleRequest | None:
        with self.lock:
            while self.ready and not self.stopped:
                state = self.states[self.ready[0]]
                if not state.wants_more(self.k):
                    self.queued.discard(self.ready.popleft())
                    continue
                state.open += 1
                self.open += 1
                self.unsent -= 1
                return state.unsent.popleft()
            return None

    def exhausted(self) -> bool:
        with self.lock:
            if self.stopped:
                return True
            if self.open:
                return False  # a verdict is coming that may make its prompt want more
            while self.ready and not self.states[self.ready[0]].wants_more(self.k):
                self.queued.discard(self.ready.popleft())
            return not any(self.states[prompt_id].wants_more(self.k) for prompt_id in self.ready)

    def __len__(self) -> int:
        return 0 if self.stopped else self.unsent

    def on_verdict(self, prompt_id: str, ok: bool) -> None:
        with self.lock:
            state = self.states[prompt_id]
            before = state.outcome(self.k)
            state.open, state.graded, state.verified = state.open - 1, state.graded + 1, state.verified + ok
            self.open, self.graded, self.verified = self.open - 1, self.graded + 1, self.verified + ok
            self.settle(prompt_id, state, before)

    def on_failure(self, request: SampleRequest, permanent: bool) -> None:
        """A request that ended without a sample: a permanent rejection uses up its index; a transient failure
        leaves it to the next run."""
        with self.lock:
            state = self.states[request.prompt_id]
            before = state.outcome(self.k)
            state.open -= 1
            state.failed += not permanent
            self.open -= 1
            self.settle(request.prompt_id, state, before)

    def settle(self, prompt_id: str, state: PromptState, before: str) -> None:
        after = state.outcome(self.k)
        self.decided[before] -= 1
        self.decided[after] += 1
        # A started prompt goes first: it finishes sooner, and a budget stop leaves fewer prompts half-sampled.
        if state.wants_more(self.k) and prompt_id not in self.queued:
            self.ready.appendleft(prompt_id)
            self.queued.add(prompt_id)

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self.error, self.stopped = error, True

    def summary(self) -> dict[str, Any]:
        """The until_verified block of stats.json."""
        with self.lock:
            per_prompt = Counter(state.graded for state in self.states.values())
            return {
                "k": self.k, "max_samples": self.settings.max_samples,
                "prompts_solved": self.decided["solved"], "prompts_exhausted": self.decided["exhausted"],
                "prompts_undecided": self.decided["undecided"],
                "prompts_with_a_verified_trace": sum(state.verified > 0 for state in self.states.values()),
                "samples_graded": self.graded, "samples_verified": self.verified,
                "samples_per_prompt_histogram": {str(count): per_prompt[count] for count in sorted(per_prompt)},
            }

    def progress_text(self) -> str:
        """For the progress line; read without the lock (a line may be one verdict behind)."""
        return (f"verified {self.verified}/{self.graded} graded | prompts solved {self.decided['solved']}, "
                f"exhausted {self.decided['exhausted']} of {len(self.states)}")


class VerdictThread:
    """Grades finished samples off the backend's thread and tells the queue. A grading error stops the queue
    (the run finishes what is in flight) and is raised by close()."""

    BATCH = 64  # samples graded in one grade_batch call when they pile up

    def __init__(self, verified_queue: VerifiedQueue, grader: Grader, golds: dict[str, str]):
        self.queue, self.grader, self.golds = verified_queue, grader, golds
        self.inbox: queue.Queue[Sample | None] = queue.Queue()
        self.thread = threading.Thread(target=self.loop, name="until-verified-grader", daemon=True)
        self.thread.start()

    def submit(self, sample: Sample) -> None:
        self.inbox.put(sample)

    def loop(self) -> None:
        while (batch := self.next_batch()) is not None:
            try:
                verdicts = accepted(self.grader, batch, [self.golds[sample.prompt_id] for sample in batch])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller; the queue must not wait forever
                self.queue.fail(exc)
                return
            for sample, ok in zip(batch, verdicts):
                self.queue.on_verdict(sample.prompt_id, ok)

    def next_batch(self) -> list[Sample] | None:
        first = self.inbox.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.BATCH:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.inbox.put(None)  # seen after this batch
                break
            batch.append(item)
        return batch

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()
        if self.queue.error is not None:
            raise self.queue.error
