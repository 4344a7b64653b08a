"""The request window over OpenAI-compatible endpoints: exactly `concurrency` requests in flight, no batch barrier.

Each worker takes the next request as soon as its previous one finished, so the window stays full however long a
single trace runs. Every outcome goes back through `WindowEvents`; this module never writes a record.

Retries are tenacity's (stop after generate.max_attempts, jittered exponential backoff, or what a 429/503's
Retry-After asks for, capped by generate.backoff_max_s). Retry-After also pauses that endpoint for every worker:
the server throttles the client, not the one request. generate.rate_limit adds client-side leaky buckets
(aiolimiter) for hosted teachers.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from cot_distill.config import GenerateSection, RateLimitSection, TeacherSection
from cot_distill.errors import UserError
from cot_distill.records import Completion
from cot_distill.teachers.openai_compat import (
    AllEndpointsDown,
    Endpoint,
    EndpointPool,
    OpenAICompatClient,
    PermanentError,
    TransientError,
)


class TeacherError(UserError, RuntimeError):
    """The teacher cannot be reached or does not serve the model; the message says which and what to do."""


@dataclass
class WindowEvents:
    """What the window reports. on_sample(request, completion, latency_s, attempts, endpoint);
    on_failure(request, error, attempts, permanent, status) once a request has used up its attempts, or at once
    when the server rejected it for good (permanent; status: the HTTP status, None in-process);
    on_error(error, will_retry) on every failed attempt; on_ready() when the endpoints answered (the clock for
    tok/s starts); on_tick(in_flight) after each finished request. The in-process backend reports the same."""

    on_sample: Callable[[Any, Completion, float, int, str | None], None]
    on_failure: Callable[[Any, str, int, bool, int | None], None]
    on_error: Callable[[str, bool], None]
    on_ready: Callable[[], None]
    on_tick: Callable[[int], None]


class RequestQueue:
    """The requests of a job, handed out one at a time as slots free up: from a list, or from an iterator that
    makes them as they are asked for (generate streams millions that way). generate's until_verified queue
    (generate/until_verified.py) decides per prompt as verdicts arrive, so it can have nothing to give now and
    more later. Both backends poll it: take() -> a request, or None for "nothing now"; exhausted() -> nothing will
    ever come. stop() ends the handing out (a spent budget); what is in flight finishes. Thread-safe where it
    matters: only the until_verified queue is touched by a second thread."""

    POLL_S = 0.02  # how often a free slot asks again while take() has nothing: far below one request's time

    def __init__(self, requests: Iterable | None = None, size_hint: int | None = None):
        self._requests = iter(requests or ())
        self._next = next(self._requests, None)  # one ahead: exhausted() must know without taking
        self._left = size_hint if size_hint is not None else len(requests) if isinstance(requests, list) else 1
        self.stopped = False

    def take(self):
        if self.stopped or self._next is None:
            return None
        request, self._next = self._next, next(self._requests, None)
        self._left -= 1
        return request

    def exhausted(self) -> bool:
        return self.stopped or self._next is None

    def stop(self) -> None:
        self.stopped = True

    def __len__(self) -> int:
        """How many requests may still be handed out, as far as known: the window starts no more workers."""
        return 0 if self.exhausted() else max(1, self._left)


def as_queue(pending) -> RequestQueue:
    return pending if isinstance(pending, RequestQueue) else RequestQueue(pending)


def read_api_key(teacher: TeacherSection) -> str | None:
    env_name = teacher.api_key_env
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise TeacherError(f"teacher.api_key_env names {env_name}, but that environment variable is not set")
    return value


async def run_window(teacher: TeacherSection, gen: GenerateSection, base_urls: list[str], pending,
                     events: WindowEvents, server=None) -> None:
    """Send every request of `pending` (SampleRequests, or a RequestQueue). `server`: a local server we launched; its death stops
    the run at once instead of minutes of retries."""
    pool = EndpointPool.from_urls(base_urls, eject_after_failures=gen.eject_after_failures,
                                  eject_cooldown_s=gen.eject_cooldown_s, give_up_after_s=gen.give_up_after_s)
    client = OpenAICompatClient(teacher.model, read_api_key(teacher), teacher.request_timeout_s,
                                max_connections=gen.concurrency)
    limiter = RateLimiter(gen.rate_limit, gen.sampling.max_tokens)
    async with client:
        await preflight(client, pool, teacher.model)
        events.on_ready()
        queue = as_queue(pending)
        in_flight = [0]

        async def next_request():
            while (request := queue.take()) is None:
                if queue.exhausted():
                    return None
                await asyncio.sleep(queue.POLL_S)  # the queue waits on a verdict: it may have more soon
            return request

        async def worker() -> None:
            while (request := await next_request()) is not None:  # each worker takes the next when it frees up
                in_flight[0] += 1
                try:
                    await one_request(client, pool, limiter, request, gen, events)
                finally:
                    in_flight[0] -= 1
                events.on_tick(in_flight[0])

        async def watch_local_server() -> None:
            # A server we launched that dies will not come back: stop at once instead of retrying for minutes.
            while True:
                server.check_alive()
                await asyncio.sleep(1.0)

        tasks = [asyncio.create_task(worker()) for _ in range(min(gen.concurrency, len(queue)))]
        all_workers = asyncio.gather(*tasks)
        watcher = asyncio.create_task(watch_local_server()) if server is not None else None
        try:
            if watcher is not None:
                await asyncio.wait([all_workers, watcher], return_when=asyncio.FIRST_COMPLETED)
                if watcher.done():
                    watcher.result()  # raises ServerError: the server we launched died
            await all_workers
        except AllEndpointsDown as exc:
            raise TeacherError(f"{exc}; finished samples are saved, rerun to resume") from None
        finally:
            for task in [*tasks, *([watcher] if watcher else [])]:
                task.cancel()


async def preflight(client: OpenAICompatClient, pool: EndpointPool, model: str) -> None:
    """Check every endpoint before sending work: fail fast and clearly when none can serve the model."""
    problems = []
    for endpoint in pool.endpoints:
        try:
            served = [entry.get("id", "") for entry in await client.served_models(endpoint.base_url)]
        except Exception as exc:  # noqa: BLE001 - any failure means: not usable now
            problems.append(f"{endpoint.base_url}: unreachable ({exc})")
            endpoint.ejected_until = time.monotonic() + pool.eject_cooldown_s
            continue
        if model not in served:
            raise TeacherError(f"{endpoint.base_url} does not serve model {model!r} (it serves: {served}); "
                               f"set teacher.model to the served name")
    if len(problems) == len(pool.endpoints):
        raise TeacherError("no teacher endpoint is reachable:\n  " + "\n  ".join(problems))
    for problem in problems:
        print(f"[generate] warning: {problem}; cooling it down and carrying on with the others", file=sys.stderr)


class RateLimiter:
    """generate.rate_limit as two leaky buckets (aiolimiter), each as deep as one minute's allowance. Every attempt
    takes a request; tokens are reserved at the mean prompt + completion tokens of the finished requests
    (max_tokens before the first) and the shortfall is taken once the usage is known."""

    def __init__(self, limits: RateLimitSection, max_tokens: int):
        self.requests = AsyncLimiter(limits.requests_per_minute, 60) if limits.requests_per_minute else None
        self.tokens = AsyncLimiter(limits.tokens_per_minute, 60) if limits.tokens_per_minute else None
        self.token_cap = limits.tokens_per_minute or 0
        self.first_estimate = max_tokens
        self.finished = self.used = 0

    async def before_attempt(self) -> float:
        if self.requests is not None:
            await self.requests.acquire()
        if self.tokens is None:
            return 0.0
        estimate = self.used / self.finished if self.finished else self.first_estimate
        reserved = min(float(estimate), self.token_cap)  # aiolimiter refuses more than a bucket holds
        await self.tokens.acquire(reserved)
        return reserved

    async def settle(self, reserved: float, completion: Completion) -> None:
        if self.tokens is None:
            return
        used = completion.prompt_tokens + completion.completion_tokens
        self.finished += 1
        self.used += used
        if used > reserved:
            await self.tokens.acquire(min(used - reserved, self.token_cap))


class BackoffOrRetryAfter:
    """tenacity wait: what the server asked for (Retry-After), else jittered exponential backoff; both capped by
    generate.backoff_max_s, so a server asking for an hour cannot stall the job for an hour."""

    def __init__(self, gen: GenerateSection):
        self.cap = gen.backoff_max_s
        self.backoff = wait_random_exponential(multiplier=gen.backoff_initial_s, max=gen.backoff_max_s)

    def __call__(self, retry_state) -> float:
        asked = getattr(retry_state.outcome.exception(), "retry_after_s", None)
        return min(asked, self.cap) if asked is not None else self.backoff(retry_state)


async def one_request(client: OpenAICompatClient, pool: EndpointPool, limiter: RateLimiter, request,
                      gen: GenerateSection, events: WindowEvents) -> None:
    """One request through its retries; exactly one of events.on_sample / on_failure at the end."""
    retrying = AsyncRetrying(
        stop=stop_after_attempt(gen.max_attempts),
        retry=retry_if_exception_type(TransientError),
        wait=BackoffOrRetryAfter(gen),
        before_sleep=lambda state: events.on_error(str(state.outcome.exception()), True),
        reraise=True,
    )
    attempts = 0
    try:
        async for attempt in retrying:
            with attempt:
                attempts = attempt.retry_state.attempt_number
                completion, latency_s, base_url = await one_attempt(client, pool, limiter, request, gen)
    except TransientError as exc:
        events.on_error(str(exc), False)
        events.on_failure(request, str(exc), attempts, False, exc.status)
        return
    except PermanentError as exc:
        events.on_error(str(exc), False)
        events.on_failure(request, str(exc), attempts, True, exc.status)
        return
    events.on_sample(request, completion, latency_s, attempts, base_url)


async def one_attempt(client: OpenAICompatClient, pool: EndpointPool, limiter: RateLimiter, request,
                      gen: GenerateSection) -> tuple[Completion, float, str]:
    """Send once to the least busy live endpoint; the endpoint's health learns the outcome."""
    reserved = await limiter.before_attempt()
    endpoint = await pool.acquire()
    started = time.monotonic()
    try:
        completion = await client.complete(endpoint.base_url, request.messages, request.params)
    except TransientError as exc:
        pool.release(endpoint, failed=note_retry_after(pool, endpoint, exc, gen))
        raise
    except PermanentError:
        pool.release(endpoint, failed=None)  # the request is bad, not the endpoint
        raise
    pool.release(endpoint, failed=False)
    latency_s = time.monotonic() - started
    await limiter.settle(reserved, completion)
    return completion, latency_s, endpoint.base_url


def note_retry_after(pool: EndpointPool, endpoint: Endpoint, exc: TransientError, gen: GenerateSection) -> bool | None:
    """A 429/503 with Retry-After pauses the endpoint as asked (capped) and says nothing of its health (None);
    any other transient error counts against it (True)."""
    if exc.retry_after_s is None:
        return True
    pool.pause(endpoint, min(exc.retry_after_s, gen.backoff_max_s))
    return None
