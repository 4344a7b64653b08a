"""The teacher as an in-process vLLM engine (no server), driven one engine step at a time.

Why a step loop: `LLM.chat(batch)` returns only when the batch's longest trace has finished, so handing it chunks
of `concurrency` requests lets the window drain to one straggler before the next chunk starts (a batch barrier),
and leaves every request of a chunk with the chunk's wall time as its latency. Here we drive vLLM's engine
ourselves with the calls `LLM.chat` makes inside (`LLMEngine.add_request / step / abort_request`, see
vllm/entrypoints/common/offline.py `_run_engine`): a request's completion goes out through `events.on_sample`
the step it finishes, and the next request takes its place, so min(concurrency, remaining) requests are in the
engine at all times. Each request is timed from its own add_request to its own finished output.

Failures are those of the OpenAI window (teachers/window.py), reported through the same WindowEvents:
- a request still in the engine after teacher.request_timeout_s, or one the engine ends with an internal error
  (what its server answers with a 500), is aborted and added again, up to generate.max_attempts attempts, then
  recorded as a transient failure (a rerun retries it);
- a request the engine refuses when it is added (a prompt longer than max_model_len, a chat template failing on
  its messages: what its server answers with a 400) is a permanent failure at once, and the run goes on.
There is no backoff between attempts: backoff spares an overloaded or rate-limiting server, while here the engine
is ours and its queue is this window, so the freed slot is best used at once.

Every finished completion is in the caller's samples.jsonl before the next step, so a kill -9 loses only the
requests in the engine at that moment; a rerun sends those again. The engine starts its own worker processes, so
a script calling this must sit under `if __name__ == "__main__":` (the cot-distill console script does).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from cot_distill.assets import resolve_model_path
from cot_distill.config import GenerateSection, TeacherSection
from cot_distill.reasoning import split_reasoning
from cot_distill.records import Completion, SampleRequest
from cot_distill.teachers.serve import check_cpu_sampling, cpu_engine_env, serving_dtype
from cot_distill.teachers.window import RequestQueue, WindowEvents, as_queue

CHAT_KWARGS = {"chat_template_kwargs"}  # extra_body keys that go to the chat template, not to SamplingParams
ENGINE_ERRORS = ("error", "abort")  # finish reasons of an engine-side failure: its server answers them with a 500


def to_sampling_params(params: dict[str, Any]):
    from vllm import SamplingParams

    known = set(SamplingParams.__struct_fields__)
    extra = {k: v for k, v in (params.get("extra_body") or {}).items() if k not in CHAT_KWARGS}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"generate.sampling.extra_body keys not understood by vllm.SamplingParams: {unknown}")
    base = {k: params[k] for k in ("temperature", "top_p", "max_tokens", "seed", "stop") if params.get(k) is not None}
    if params.get("logprobs"):
        base["logprobs"] = params["logprobs"]  # the sampled token and the top K per position
    return SamplingParams(n=1, **base, **extra)


def recorded_logprobs(choice, k: int):
    """A choice's per-position logprobs as a TokenLogprobs holding the same K entries the OpenAI server returns:
    the first K of vLLM's dict per position (the sampled token first, then the top ones; logprob_store.py)."""
    from cot_distill.logprob_store import TokenLogprobs

    positions = choice.logprobs or []
    topk = [[(token, entry.logprob) for token, entry in list(position.items())[:k]] for position in positions]
    return TokenLogprobs.from_lists(list(choice.token_ids), topk, k)


def to_completion(output, logprobs: int | None = None) -> Completion:
    choice = output.outputs[0]
    reasoning, answer, closed = split_reasoning(choice.text)
    return Completion(
        text=choice.text,
        reasoning=reasoning,
        content=answer,
        reasoning_closed=closed,
        finish_reason=choice.finish_reason,
        prompt_tokens=len(output.prompt_token_ids or []),
        completion_tokens=len(choice.token_ids),
        logprobs=recorded_logprobs(choice, logprobs) if logprobs else None,
    )


def rejection_errors() -> tuple[type[BaseException], ...]:
    """What vLLM's server turns into a 400 (vllm/entrypoints/serve/exception_handling/error_response.py): the
    request is bad, not the engine, and sending it again gets the same answer."""
    from jinja2 import TemplateError
    from vllm.exceptions import VLLMClientError

    return VLLMClientError, ValueError, TypeError, OverflowError, TemplateError


def start_engine(teacher: TeacherSection, engine_seed: int | None = None):
    """The `vllm.LLM` for teacher.model; the caller keeps it and may run several jobs on it (run_on_engine)."""
    from vllm import LLM

    # engine_seed: see generate.resume_seed; a seed in engine_kwargs was chosen on purpose and wins.
    engine_kwargs = {"dtype": serving_dtype("auto"), **({"seed": engine_seed} if engine_seed is not None else {}),
                     **teacher.engine_kwargs}
    cpu_engine_env(os.environ)  # read by the engine process it spawns
    return LLM(model=resolve_model_path(teacher.model), **engine_kwargs)


def run_in_process(teacher: TeacherSection, gen: GenerateSection, pending, events: WindowEvents,
                   engine_seed: int | None = None) -> None:
    """Run `pending` (SampleRequests, or a RequestQueue) on an in-process engine; every outcome goes back through
    `events`."""
    check_cpu_sampling(gen.sampling)
    to_sampling_params(gen.sampling.model_dump())  # a bad extra_body key fails now, not after a minute of loading
    llm = start_engine(teacher, engine_seed)
    try:
        events.on_ready()  # tok/s measures generation, not model loading
        run_on_engine(llm, teacher, gen, pending, events)
    finally:
        # Its engine process, weights and KV cache go now, not at some later garbage collection: the next stage
        # (eval launches a server for this model) or the next job in this process needs the memory and cores.
        llm.llm_engine.engine_core.shutdown()


def run_on_engine(llm, teacher: TeacherSection, gen: GenerateSection, pending, events: WindowEvents) -> None:
    """`pending` through an engine started by start_engine, with no barrier: see the module docstring."""
    StepLoop(llm, teacher, gen, events).run(as_queue(pending))


@dataclass
class Attempt:
    request: SampleRequest
    number: int  # 1 for the first attempt
    added_at: float  # time.monotonic() at add_request


class StepLoop:
    """Keeps the engine's window full, reports each request the step it ends, and aborts the overdue ones."""

    def __init__(self, llm, teacher: TeacherSection, gen: GenerateSection, events: WindowEvents):
        from vllm.sampling_params import RequestOutputKind

        self.llm, self.engine, self.events = llm, llm.llm_engine, events
        self.window, self.max_attempts, self.timeout_s = gen.concurrency, gen.max_attempts, teacher.request_timeout_s
        self.chat_kwargs = {k: v for k, v in (gen.sampling.extra_body or {}).items() if k in CHAT_KWARGS}
        self.final_only = RequestOutputKind.FINAL_ONLY
        self.rejected = rejection_errors()
        self.retries: deque[tuple[SampleRequest, int]] = deque()  # (request, attempt number) to add again
        self.in_flight: dict[str, Attempt] = {}  # engine request id -> its attempt

    def run(self, queue: RequestQueue) -> None:
        try:
            while self.retries or self.in_flight or not queue.exhausted():
                self.fill(queue)
                if self.in_flight:
                    self.step()
                    self.abort_overdue()
                elif not self.retries:
                    time.sleep(queue.POLL_S)  # the queue waits on a verdict: it may have more soon
        finally:
            # A run stopped early (too many rejections, Ctrl+C) must not leave the engine generating for nobody.
            if self.in_flight:
                self.engine.abort_request(list(self.in_flight))

    def fill(self, queue: RequestQueue) -> None:
        """Retries first (they keep their place), then new requests, while the window has room."""
        while len(self.in_flight) < self.window:
            if self.retries:
                self.add(*self.retries.popleft())
            elif (request := queue.take()) is not None:
                self.add(request, 1)
            else:
                return

    def add(self, request: SampleRequest, number: int) -> None:
        params = to_sampling_params(request.params)  # outside the try: a bad config is not the request's fault
        params.output_kind = self.final_only  # only the finished output, as LLM.chat asks for
        request_id = f"{request.key}#{number}"  # our own id, so outputs map back; an aborted one is never reused
        added_at = time.monotonic()
        try:
            # LLM.chat's own rendering of one conversation (template, chat_template_kwargs, length check), and its
            # Gemma4 fix-up for thinking; LLM.enqueue_chat would add under an id its outputs do not carry.
            prompt = self.llm._preprocess_chat_one(request.messages, **self.chat_kwargs)
            if (self.chat_kwargs.get("chat_template_kwargs") or {}).get("enable_thinking"):
                self.llm._adjust_params_for_parsing([params])
            self.engine.add_request(request_id, prompt, params)
        except self.rejected as exc:
            self.finish_failed(request, number, f"rejected by the engine ({type(exc).__name__}): {exc}",
                               permanent=True)
            return
        self.in_flight[request_id] = Attempt(request, number, added_at)

    def step(self) -> None:
        for output in self.engine.step():
            attempt = self.in_flight.pop(output.request_id, None) if output.finished else None
            if attempt is None:
                continue  # still running, or an attempt we aborted
            if output.outputs[0].finish_reason in ENGINE_ERRORS:
                self.retry_or_fail(attempt, f"engine error: the engine ended the request with "
                                            f"finish_reason={output.outputs[0].finish_reason}")
                continue
            latency_s = time.monotonic() - attempt.added_at
            self.events.on_sample(attempt.request, to_completion(output, attempt.request.params.get("logprobs")),
                                  latency_s, attempt.number, None)
            self.events.on_tick(len(self.in_flight))

    def abort_overdue(self) -> None:
        now = time.monotonic()
        overdue = [rid for rid, attempt in self.in_flight.items() if now - attempt.added_at > self.timeout_s]
        if not overdue:
            return
        self.engine.abort_request(overdue)
        for request_id in overdue:
            self.retry_or_fail(self.in_flight.pop(request_id),
                               f"TimeoutError: no finished output within {self.timeout_s:g} s in the engine "
                               f"(teacher.request_timeout_s); aborted")

    def retry_or_fail(self, attempt: Attempt, error: str) -> None:
        if attempt.number >= self.max_attempts:
            self.finish_failed(attempt.request, attempt.number, error, permanent=False)
            return
        self.events.on_error(error, True)
        self.retries.append((attempt.request, attempt.number + 1))  # it takes the next free slot

    def finish_failed(self, request: SampleRequest, attempts: int, error: str, *, permanent: bool) -> None:
        self.events.on_error(error, False)
        self.events.on_failure(request, error, attempts, permanent=permanent, status=None)
        self.events.on_tick(len(self.in_flight))
