"""The request window over OpenAI-compatible endpoints: exactly `concurrency` requests in flight, no batch barrier.

Each worker takes the next request as soon as its previous one finished, so the window stays full however long a
single trace runs. Every outcome goes back through `WindowEvents`; this module never writes a record.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from cot_distill.config import GenerateSection, TeacherSection
from cot_distill.errors import UserError
from cot_distill.records import Completion
from cot_distill.teachers.openai_compat import (
    AllEndpointsDown,
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
    on_failure(request, error, attempts) once a request has used up its attempts; on_error(error, will_retry) on
    every failed attempt; on_ready() when the endpoints answered (the clock for tok/s starts);
    on_tick(in_flight) after each finished request."""

    on_sample: Callable[[Any, Completion, float, int, str | None], None]
    on_failure: Callable[[Any, str, int], None]
    on_error: Callable[[str, bool], None]
    on_ready: Callable[[], None]
    on_tick: Callable[[int], None]


def read_api_key(teacher: TeacherSection) -> str | None:
    env_name = teacher.api_key_env
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise TeacherError(f"teacher.api_key_env names {env_name}, but that environment variable is not set")
    return value


async def run_window(teacher: TeacherSection, gen: GenerateSection, base_urls: list[str], pending: list,
                     events: WindowEvents, server=None) -> None:
    """Send every request of `pending` (SampleRequests). `server`: a local server we launched; its death stops
    the run at once instead of minutes of retries."""
    pool = EndpointPool.from_urls(base_urls, eject_after_failures=gen.eject_after_failures,
                                  eject_cooldown_s=gen.eject_cooldown_s, give_up_after_s=gen.give_up_after_s)
    client = OpenAICompatClient(teacher.model, read_api_key(teacher), teacher.request_timeout_s,
                                max_connections=gen.concurrency)
    async with client:
        await preflight(client, pool, teacher.model)
        events.on_ready()
        queue = iter(pending)
        in_flight = [0]

        async def worker() -> None:
            for request in queue:  # a shared iterator: each worker takes the next request when it frees up
                in_flight[0] += 1
                try:
                    await one_request(client, pool, request, gen, events)
                finally:
                    in_flight[0] -= 1
                events.on_tick(in_flight[0])

        async def watch_local_server() -> None:
            # A server we launched that dies will not come back: stop at once instead of retrying for minutes.
            while True:
                server.check_alive()
                await asyncio.sleep(1.0)

        tasks = [asyncio.create_task(worker()) for _ in range(min(gen.concurrency, len(pending)))]
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
            served = await client.served_models(endpoint.base_url)
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


async def one_request(client: OpenAICompatClient, pool: EndpointPool, request, gen: GenerateSection,
                      events: WindowEvents) -> None:
    last_error = ""
    for attempt in range(1, gen.max_attempts + 1):
        endpoint = await pool.acquire()
        started = time.monotonic()
        try:
            completion = await client.complete(endpoint.base_url, request.messages, request.params)
        except (TransientError, PermanentError) as exc:
            pool.release(endpoint, failed=True)
            last_error = str(exc)
            will_retry = isinstance(exc, TransientError) and attempt < gen.max_attempts
            events.on_error(last_error, will_retry)
            if not will_retry:
                break
            backoff = min(gen.backoff_max_s, gen.backoff_initial_s * 2 ** (attempt - 1))
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # jitter spreads a thundering herd
            continue
        pool.release(endpoint, failed=False)
        events.on_sample(request, completion, time.monotonic() - started, attempt, endpoint.base_url)
        return
    events.on_failure(request, last_error, attempt)
