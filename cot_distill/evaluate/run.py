"""The eval stage: K samples per benchmark problem through the generate machinery, graded by the curate grader.

Per benchmark, OUT/<bench>/prompts.jsonl holds the problems and OUT/<bench>/generate/ is an ordinary generate
run, so its ledger makes eval resumable for free. A model we run ourselves (a local folder, a recipe teacher with
`launch` or the in-process `vllm` backend) is served by ONE local vLLM server for all benchmarks, which gives real
per-request latency, one model load, and a process tree whose memory we can watch.

Outputs: OUT/<bench>/graded.jsonl (one line per sample), OUT/results.json, OUT/results.md, OUT/manifest.json last.
`run(recipe, slot=...)` is the stage's uniform entry; `run_eval(settings, target, slot)` the run itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot_distill.config import GenerateSection, Recipe, TeacherSection
from cot_distill.config.eval import EvalSection
from cot_distill.evaluate.compare import results_table
from cot_distill.evaluate.eval_sets import Benchmark, load_benchmark
from cot_distill.evaluate.footprint import PeakMemory, describe_local_model, single_request_latency
from cot_distill.evaluate.metrics import GRADED_FILE, benchmark_metrics
from cot_distill.evaluate.targets import as_served, refuse_seed_on_cpu, serving, target_from_model
from cot_distill.generate import SAMPLES_FILE, SampleRequest, done_keys, generate_samples, plan_requests
from cot_distill.prompts import load_template
from cot_distill.reasoning import split_reasoning
from cot_distill.records import (
    JsonlWriter,
    Sample,
    invalidate_manifest,
    iter_jsonl,
    read_json,
    stable_hash,
    utc_now,
    write_json_atomic,
    write_manifest,
)
from cot_distill.teachers.identity import teacher_identity

RESULTS_FILE = "results.json"
RESULTS_TABLE = "results.md"
RUNS_FILE = "generation_runs.jsonl"


def run(recipe: Recipe, *, slot=None) -> Path:
    """The stage's uniform entry, what `cot-distill eval RECIPE` runs: `eval.model` when set, else the recipe's
    teacher, with the recipe's eval settings. `slot`: a teachers.serve.ServerSlot that keeps a server running
    across stages. Returns the eval's output folder."""
    settings = recipe.eval
    target = target_from_model(settings.model) if settings.model else recipe.teacher
    run_eval(settings, target, slot)
    return Path(settings.output_dir)


@dataclass(frozen=True)
class BenchmarkJob:
    """One benchmark's generation: its problems, a generate section writing into OUT/<bench>/generate, and its
    requests, planned once and used to find what is missing, to generate it and to read it back."""

    benchmark: Benchmark
    gen: GenerateSection
    requests: list[SampleRequest]
    identity: dict[str, Any]  # the target's weights (teachers/identity.py), part of every request key

    @property
    def ledger(self) -> Path:
        return Path(self.gen.output_dir) / SAMPLES_FILE


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a whole JSONL file atomically (JsonlWriter appends, for ledgers)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    with JsonlWriter(temporary) as writer:
        for record in records:
            writer.write(record)
    temporary.replace(path)


def prepare_benchmark(benchmark: Benchmark, target: TeacherSection, settings: EvalSection, template,
                      out_dir: Path, identity: dict[str, Any]) -> BenchmarkJob:
    bench_dir = out_dir / benchmark.name
    bench_dir.mkdir(parents=True, exist_ok=True)
    # For the reader: the problems this eval asked. Request keys hash the rendered messages, not this file.
    rewrite_jsonl(bench_dir / "prompts.jsonl", [{"id": problem.id, "problem": problem.problem,
                                                 "answer": problem.answer} for problem in benchmark.problems])
    gen = GenerateSection(output_dir=str(bench_dir / "generate"), prompt_template=settings.prompt_template,
                          samples_per_prompt=settings.samples, concurrency=settings.concurrency,
                          sampling=settings.sampling)
    return BenchmarkJob(benchmark, gen, plan_requests(benchmark.problems, template, target, gen, identity), identity)


def missing_samples(job: BenchmarkJob) -> int:
    """Samples of this job not yet in its ledger. Request keys hash the model name and its weights (for a model we
    launch: its folder's files), not the endpoint, so this can be asked before a server is started."""
    done = done_keys(job.ledger)
    return sum(request.key not in done for request in job.requests)


def generate_benchmark(job: BenchmarkJob, endpoint: TeacherSection, settings: EvalSection, server=None) -> None:
    """`server`: the local server behind `endpoint` when we launched it; its death stops generation at once."""
    print(f"[eval] {job.benchmark.name}: {job.gen.samples_per_prompt} samples per problem", file=sys.stderr)
    snapshot = {"eval": settings.model_dump(mode="json"), "model": endpoint.model_dump(mode="json"),
                "benchmark": job.benchmark.name}
    stats = generate_samples(job.benchmark.problems, endpoint, job.gen, snapshot=snapshot, server=server,
                             requests=job.requests, identity=job.identity)
    if stats["samples_this_run"]:
        with JsonlWriter(Path(job.gen.output_dir).parent / RUNS_FILE) as runs:
            runs.write({"job": job_hash(endpoint, job.gen), "samples": stats["samples_this_run"],
                        "finished_at": utc_now(), "completion_tokens": stats["completion_tokens_this_run"],
                        "wall_seconds": stats["wall_seconds"]})


def job_hash(teacher: TeacherSection, gen: GenerateSection) -> str:
    return stable_hash([teacher.model, gen.model_dump(mode="json", exclude={"output_dir"})])[:16]


def throughput(bench_dir: Path, job_id: str) -> float | None:
    """Completion tokens per second over every run that generated samples of this job (resumed runs included)."""
    path = bench_dir / RUNS_FILE
    if not path.exists():
        return None
    runs = [run for _, run in iter_jsonl(path) if run.get("job") == job_id]
    seconds = sum(run["wall_seconds"] for run in runs)
    return round(sum(run["completion_tokens"] for run in runs) / seconds, 1) if seconds > 0 else None


def job_samples(job: BenchmarkJob) -> list[Sample]:
    """The ledger's samples of exactly this job; an earlier job with other parameters may share the ledger."""
    wanted = {request.key for request in job.requests}
    found = {}
    for _, sample in iter_jsonl(job.ledger):
        if sample.get("request_key") in wanted:
            found[sample["request_key"]] = sample
    return [Sample.model_validate(sample) for sample in found.values()]


def grade_benchmark(benchmark: Benchmark, samples: list[Sample], grader) -> list[dict[str, Any]]:
    problems = {problem.id: problem for problem in benchmark.problems}
    samples = sorted(samples, key=lambda sample: (sample.prompt_id, sample.sample_idx))
    verdicts = grader.grade_batch([(sample.text, problems[sample.prompt_id].answer) for sample in samples])
    rows = []
    for sample, verdict in zip(samples, verdicts):
        problem = problems[sample.prompt_id]
        closed = split_reasoning(sample.text).closed
        rows.append({
            "prompt_id": problem.id, "sample_idx": sample.sample_idx, "gold": problem.answer,
            "extracted": verdict.extracted, "route": verdict.route, "reason": verdict.reason,
            "correct": verdict.correct is True and closed,  # unclosed reasoning has no answer to be right
            "truncated": sample.finish_reason == "length" or not closed,
            "finish_reason": sample.finish_reason, "completion_tokens": sample.usage.completion_tokens,
            "latency_s": sample.latency_s,
            "groups": {field: problem.meta.get(field) for field in benchmark.group_by},
        })
    return rows


def run_eval(settings: EvalSection, target: TeacherSection, slot=None) -> dict[str, Any]:
    """Load benchmarks -> generate K samples each (resumable) -> grade -> metrics -> results.json -> manifest.json.
    `slot`: a teachers.serve.ServerSlot to launch the target's server in (the pipeline reuses the teacher's)."""
    from cot_distill.grading import Grader

    out_dir = Path(settings.output_dir)
    benchmarks = [load_benchmark(spec, settings.source, settings.limit) for spec in settings.benchmarks]
    template = load_template(settings.prompt_template)  # fail before any model starts
    target = as_served(target, settings)
    refuse_seed_on_cpu(target, settings, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(out_dir)

    identity = teacher_identity(target)
    jobs = {benchmark.name: prepare_benchmark(benchmark, target, settings, template, out_dir, identity)
            for benchmark in benchmarks}
    unfinished = [job for job in jobs.values() if missing_samples(job)]
    memory, probe = None, None
    if unfinished:  # a rerun that only regrades does not start (and wait minutes for) a server
        with serving(target, out_dir, slot) as (endpoint, memory, server):
            for job in unfinished:
                generate_benchmark(job, endpoint, settings, server)
            probe = footprint_probe(settings, endpoint, benchmarks[0], template)
    results = {"created_at": utc_now(), "model": model_info(target, memory, out_dir, probe),
               "generation": generation_info(settings, template), "benchmarks": {}}
    files = [RESULTS_FILE, RESULTS_TABLE]
    with Grader(anchor=settings.anchor, workers=settings.grading_workers) as grader:
        for benchmark in benchmarks:
            job = jobs[benchmark.name]
            rows = grade_benchmark(benchmark, job_samples(job), grader)
            rewrite_jsonl(out_dir / benchmark.name / GRADED_FILE, rows)
            files.append(f"{benchmark.name}/{GRADED_FILE}")
            metrics = benchmark_metrics(rows, settings.samples, benchmark.group_by)
            metrics["throughput_tokens_per_s"] = throughput(out_dir / benchmark.name, job_hash(target, job.gen))
            metrics["origin"] = benchmark.origin
            results["benchmarks"][benchmark.name] = metrics
    write_json_atomic(out_dir / RESULTS_FILE, results)
    (out_dir / RESULTS_TABLE).write_text(results_table(results) + "\n", encoding="utf-8")
    write_manifest(out_dir, stage="eval", recipe={"eval": settings.model_dump(mode="json"),
                                                  "model": target.model_dump(mode="json")},
                   counts={name: metrics["samples"] for name, metrics in results["benchmarks"].items()}, files=files)
    return results


def generation_info(settings: EvalSection, template) -> dict[str, Any]:
    return {
        "samples_per_problem": settings.samples,
        "sampling": settings.sampling.model_dump(mode="json"),
        "prompt_template": {"name": template.name, "hash": template.hash, "system": template.system,
                            "user": template.user},
        "source": settings.source,
        "limit": settings.limit,
        "grading": {"anchor": settings.anchor},
    }


def footprint_probe(settings: EvalSection, endpoint: TeacherSection, benchmark, template) -> dict[str, Any] | None:
    """Latency of single fixed-length requests (evaluate/footprint.py), on the first problems of the first
    benchmark, after the benchmarks ran on the same server."""
    probe = settings.footprint
    if not probe.enabled:
        return None
    conversations = [template.render(problem.problem) for problem in benchmark.problems[:probe.requests]]
    print(f"[eval] footprint: {len(conversations)} single requests of {probe.max_tokens} tokens, one at a time",
          file=sys.stderr)
    return single_request_latency(endpoint.base_urls[0], endpoint.model, conversations, probe.max_tokens,
                                  endpoint.api_key_env, endpoint.request_timeout_s)


def model_info(target: TeacherSection, memory: PeakMemory | None, out_dir: Path,
               probe: dict[str, Any] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"name": target.model}
    if target.launch is not None:
        from cot_distill.assets import resolve_model_path

        info["served_by"] = "local vLLM server launched by eval"
        info["max_model_len"] = target.launch.max_model_len
        info.update(describe_local_model(Path(resolve_model_path(target.launch.model_path))))
    else:
        info["served_by"] = "endpoint"
        info["endpoints"] = target.base_urls
        info.update({"path": None, "parameters": None, "layers": None, "size_on_disk_bytes": None})
    info["peak_memory"] = memory.report() if memory is not None else earlier_peak_memory(target, out_dir)
    info["single_request"] = probe if probe is not None else earlier_model_field(out_dir, "single_request")
    return info


def earlier_model_field(out_dir: Path, field: str) -> dict[str, Any] | None:
    """A measurement of an earlier run of this eval folder, when this run started no server."""
    earlier = read_json(out_dir / RESULTS_FILE).get("model", {}).get(field) if (out_dir / RESULTS_FILE).exists() else None
    return {**earlier, "measured": "in an earlier run"} if earlier else None


def earlier_peak_memory(target: TeacherSection, out_dir: Path) -> dict[str, Any]:
    if target.launch is None:
        return {"available": False, "why": "a remote endpoint: its process is not ours to measure"}
    earlier = read_json(out_dir / RESULTS_FILE)["model"]["peak_memory"] if (out_dir / RESULTS_FILE).exists() else {}
    if earlier.get("available"):
        return {**earlier, "measured": "in an earlier run; this one had nothing left to generate"}
    return {"available": False, "why": "nothing left to generate, so no server was started in this run"}
