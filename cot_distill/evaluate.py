"""The eval stage: K samples per benchmark problem through the generate machinery, graded by the curate grader.

Per benchmark, OUT/<bench>/prompts.jsonl holds the problems and OUT/<bench>/generate/ is an ordinary generate
run, so its ledger makes eval resumable for free. A model we run ourselves (a local folder, a recipe teacher with
`launch` or the in-process `vllm` backend) is served by ONE local vLLM server for all benchmarks, which gives real
per-request latency, one model load, and a process tree whose memory we can watch.

Outputs: OUT/<bench>/graded.jsonl (one line per sample), OUT/results.json, OUT/results.md, OUT/manifest.json last.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

from cot_distill.benchmarks import Benchmark, load_benchmark
from cot_distill.compare import PeakMemory, describe_local_model, results_table
from cot_distill.eval_config import EvalError, EvalSection, eval_settings
from cot_distill.generate import SAMPLES_FILE, build_requests, done_keys, run_generate
from cot_distill.prompts import load_template
from cot_distill.reasoning import split_reasoning
from cot_distill.recipe import DataSection, FieldMap, GenerateSection, LaunchSection, Recipe, SamplingSection, \
    TeacherSection
from cot_distill.records import JsonlWriter, invalidate_manifest, iter_jsonl, read_json, stable_hash, utc_now, \
    write_json_atomic, write_manifest

RESULTS_FILE = "results.json"
RESULTS_TABLE = "results.md"
GRADED_FILE = "graded.jsonl"
RUNS_FILE = "generation_runs.jsonl"
PROMPT_TOKEN_ALLOWANCE = 2048  # context for the prompt on top of max_tokens, for servers we launch


# ------------------------------------------------------------------------------------------------- metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021: 1 - C(n-c, k) / C(n, k), as a product that never overflows."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_up_to(samples: int) -> list[int]:
    """k = 1, 2, 4, ... <= K, and K itself."""
    ks = [2 ** power for power in range(samples.bit_length()) if 2 ** power <= samples]
    return ks if ks[-1] == samples else ks + [samples]


def vote_key(answer: str) -> str:
    """Answers that differ only in spacing or LaTeX sizing vote together ('\\dfrac{1}{2}' and '\\frac{1}{2}')."""
    key = "".join(answer.split())
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""), ("\\!", "")):
        key = key.replace(old, new)
    return key.rstrip(".")


def majority_correct(samples: list[dict[str, Any]]) -> bool:
    """maj@K of one problem: the most frequent extracted answer wins; a tie goes to the answer that appeared first
    (lowest sample_idx); a sample without an answer never votes. Samples are in sample_idx order."""
    votes: dict[str, list] = {}  # key -> [count, first sample_idx, any sample of this answer correct]
    for sample in samples:
        if sample["extracted"] is None:
            continue
        vote = votes.setdefault(vote_key(sample["extracted"]), [0, sample["sample_idx"], False])
        vote[0] += 1
        vote[2] = vote[2] or sample["correct"] is True
    if not votes:
        return False
    return max(votes.values(), key=lambda vote: (vote[0], -vote[1]))[2]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def samples_by_problem(rows: list[dict[str, Any]], samples: int) -> dict[str, list[dict[str, Any]]]:
    """Group graded rows by problem, checking each problem has exactly samples 0..K-1: an evaluator that silently
    generated fewer samples than asked (lighteval #771) reports a pass@k it never measured."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["problem_id"]].append(row)
    for problem_id, problem_rows in grouped.items():
        problem_rows.sort(key=lambda row: row["sample_idx"])
        indices = [row["sample_idx"] for row in problem_rows]
        if indices != list(range(samples)):
            raise EvalError(f"problem {problem_id!r} has samples {indices}, expected 0..{samples - 1}")
    return dict(grouped)


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def accuracy_by_group(grouped: dict[str, list[dict[str, Any]]], field: str) -> dict[str, dict[str, Any]]:
    per_value: dict[str, list[float]] = defaultdict(list)
    for problem_rows in grouped.values():
        value = str(problem_rows[0]["groups"].get(field))
        per_value[value].append(sum(row["correct"] is True for row in problem_rows) / len(problem_rows))
    return {value: {"problems": len(scores), "pass_at_1": round(statistics.fmean(scores), 4)}
            for value, scores in sorted(per_value.items())}


def benchmark_metrics(rows: list[dict[str, Any]], samples: int, group_by: tuple[str, ...] = ()) -> dict[str, Any]:
    """Metrics of one benchmark from its graded rows (one per sample). Incorrect and ungradable both count as wrong."""
    grouped = samples_by_problem(rows, samples)
    correct_counts = [sum(row["correct"] is True for row in problem_rows) for problem_rows in grouped.values()]
    per_problem_accuracy = [count / samples for count in correct_counts]
    latencies = [row["latency_s"] for row in rows if row.get("latency_s") is not None]
    metrics = {
        "problems": len(grouped),
        "samples_per_problem": samples,
        "samples": len(rows),
        "pass_at_1": round(statistics.fmean(per_problem_accuracy), 4),
        # the spread of pass@1 over problems: the error bar to keep in mind when comparing two models
        "pass_at_1_stderr": round(statistics.stdev(per_problem_accuracy) / math.sqrt(len(grouped)), 4)
        if len(grouped) > 1 else None,
        "pass_at_k": {str(k): round(statistics.fmean(pass_at_k(samples, c, k) for c in correct_counts), 4)
                      for k in ks_up_to(samples)},
        "maj_at_k": round(statistics.fmean(majority_correct(group) for group in grouped.values()), 4),
        "truncation_rate": round(statistics.fmean(row["truncated"] for row in rows), 4),
        "no_answer_rate": round(statistics.fmean(row["extracted"] is None for row in rows), 4),
        "mean_completion_tokens": round(statistics.fmean(row["completion_tokens"] for row in rows), 1),
        "latency_s": {"p50": _rounded(percentile(latencies, 50)), "p95": _rounded(percentile(latencies, 95))},
        "routes": dict(sorted(Counter(row["route"] for row in rows).items())),
        "reasons": dict(sorted(Counter(row["reason"] for row in rows).items())),  # timeouts, unparsable golds...
    }
    for field in group_by:
        metrics[f"by_{field}"] = accuracy_by_group(grouped, field)
    return metrics


# ------------------------------------------------------------------------------------------ model to serve

def engine_kwargs_as_server_args(engine_kwargs: dict[str, Any]) -> list[str]:
    """vllm.LLM(**kwargs) options as `vllm serve` flags: tensor_parallel_size=2 -> --tensor-parallel-size 2."""
    args = []
    for key, value in engine_kwargs.items():
        if key in ("max_model_len", "dtype"):
            continue  # set through LaunchSection
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return args


def eval_context(settings: EvalSection) -> int:
    """The context (max_model_len) a server we launch for this eval needs."""
    return settings.max_model_len or settings.sampling.max_tokens + PROMPT_TOKEN_ALLOWANCE


def as_served(target: TeacherSection, settings: EvalSection) -> TeacherSection:
    """Every model we run ourselves becomes one launched server: the in-process backend would reload the model
    for every benchmark (and keep the old engine's GPU memory until it is collected)."""
    context = eval_context(settings)
    if target.backend == "vllm":
        kwargs = target.engine_kwargs
        launch = LaunchSection(model_path=target.model, dtype=kwargs.get("dtype", "bfloat16"), max_model_len=context,
                               extra_args=engine_kwargs_as_server_args(kwargs))
        return target.model_copy(update={"backend": "openai", "launch": launch, "engine_kwargs": {}})
    if target.launch is not None:
        return target.model_copy(update={"launch": target.launch.model_copy(update={"max_model_len": context})})
    return target


def target_from_model(model_path: str, served_name: str | None = None) -> TeacherSection:
    """A local model folder (or 'smollm2-135m'), launched as a local vLLM server."""
    name = served_name or Path(model_path).name
    return TeacherSection(backend="openai", model=name, launch=LaunchSection(model_path=model_path))


def target_from_endpoint(base_url: str, served_name: str | None = None,
                         api_key_env: str | None = None) -> TeacherSection:
    """A running OpenAI-compatible server; the model name is asked from /models when not given."""
    base_url = base_url.rstrip("/")
    name = served_name or served_model_name(base_url, api_key_env)
    return TeacherSection(backend="openai", model=name, base_urls=[base_url], api_key_env=api_key_env)


def served_model_name(base_url: str, api_key_env: str | None = None) -> str:
    import os
    import urllib.request

    request = urllib.request.Request(f"{base_url}/models")
    if api_key_env and os.environ.get(api_key_env):
        request.add_header("Authorization", f"Bearer {os.environ[api_key_env]}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            names = [model["id"] for model in json.load(response).get("data", [])]
    except Exception as exc:  # noqa: BLE001 - any failure means the endpoint cannot be used
        raise EvalError(f"cannot list the models of {base_url} ({exc}); is the server up?") from None
    if len(names) != 1:
        raise EvalError(f"{base_url} serves {names}; choose one with --served-name")
    return names[0]


@contextlib.contextmanager
def serving(target: TeacherSection, out_dir: Path,
            slot=None) -> Iterator[tuple[TeacherSection, PeakMemory | None, Any]]:
    """(the target as an endpoint, a memory watcher or None, the launched server or None): one server for all
    benchmarks when we launch it; in `slot` (a teachers.serve.ServerSlot) when given, which keeps it running."""
    if target.launch is None:
        yield target, None, None
        return
    from cot_distill.teachers.serve import running_server

    with running_server(target.launch, target.model, out_dir / "vllm-server.log", slot) as server:
        with PeakMemory(server.process.pid) as memory:
            yield target.model_copy(update={"launch": None, "base_urls": [server.base_url]}), memory, server


def prepare_eval(recipe_path: str | Path | None = None, *, model: str | None = None, endpoint: str | None = None,
                 served_name: str | None = None, api_key_env: str | None = None, overrides: list[str] | None = None,
                 **options: Any) -> tuple[EvalSection, TeacherSection]:
    """What `cot-distill eval` runs: the eval settings and the model, from a recipe and/or --model / --endpoint.
    options: benchmarks, samples, max_tokens, limit, source, output_dir (None keeps the recipe's value)."""
    from cot_distill.recipe import load_recipe

    if model and endpoint:
        raise EvalError("give --model or --endpoint, not both")
    recipe = load_recipe(recipe_path, overrides or []) if recipe_path else None
    settings = eval_settings(recipe.eval if recipe else None, [] if recipe else overrides or [], **options)
    if endpoint:
        return settings, target_from_endpoint(endpoint, served_name, api_key_env)
    if model or settings.model:
        return settings, target_from_model(model or settings.model, served_name)
    if recipe is None:
        raise EvalError("nothing to evaluate: give a RECIPE (its teacher, or eval.model), --model PATH or "
                        "--endpoint URL")
    return settings, recipe.teacher


# ------------------------------------------------------------------------------------------------ the run

def generation_recipe(target: TeacherSection, settings: EvalSection, bench_dir: Path) -> Recipe:
    sampling = SamplingSection(**settings.sampling.model_dump())
    return Recipe(
        name=f"eval-{bench_dir.name}",
        teacher=target,
        data=DataSection(prompts=str(bench_dir / "prompts.jsonl"), source=bench_dir.name,
                         fields=FieldMap(id="id", problem="problem", answer="answer")),
        generate=GenerateSection(output_dir=str(bench_dir / "generate"), prompt_template=settings.prompt_template,
                                 samples_per_prompt=settings.samples, concurrency=settings.concurrency,
                                 sampling=sampling),
    )


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a whole JSONL file atomically (JsonlWriter appends, for ledgers)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    with JsonlWriter(temporary) as writer:
        for record in records:
            writer.write(record)
    temporary.replace(path)


def prepare_benchmark(benchmark: Benchmark, target: TeacherSection, settings: EvalSection, out_dir: Path) -> Recipe:
    bench_dir = out_dir / benchmark.name
    bench_dir.mkdir(parents=True, exist_ok=True)
    # Rewritten each run: request keys hash the rendered messages, not this file, so the ledger still matches.
    rewrite_jsonl(bench_dir / "prompts.jsonl", [{"id": problem.id, "problem": problem.problem,
                                                 "answer": problem.answer} for problem in benchmark.problems])
    return generation_recipe(target, settings, bench_dir)


def missing_samples(recipe: Recipe) -> int:
    """Samples of this job not yet in its ledger. Request keys hash the model name, not the endpoint, so this
    can be asked before a server is started."""
    requests, _, _ = build_requests(recipe)
    done = done_keys(Path(recipe.generate.output_dir) / SAMPLES_FILE)
    return sum(request.key not in done for request in requests)


def generate_benchmark(recipe: Recipe, endpoint: TeacherSection, server=None) -> None:
    """`server`: the local server behind `endpoint` when we launched it; its death stops generation at once."""
    recipe = recipe.model_copy(update={"teacher": endpoint})
    print(f"[eval] {recipe.data.source}: {recipe.generate.samples_per_prompt} samples per problem", file=sys.stderr)
    stats = run_generate(recipe, server=server)
    if stats["samples_this_run"]:
        with JsonlWriter(Path(recipe.generate.output_dir).parent / RUNS_FILE) as runs:
            runs.write({"job": job_hash(recipe), "samples": stats["samples_this_run"], "finished_at": utc_now(),
                        "completion_tokens": stats["completion_tokens_this_run"],
                        "wall_seconds": stats["wall_seconds"]})


def job_hash(recipe: Recipe) -> str:
    return stable_hash([recipe.teacher.model, recipe.generate.model_dump(mode="json", exclude={"output_dir"})])[:16]


def throughput(bench_dir: Path, recipe: Recipe) -> float | None:
    """Completion tokens per second over every run that generated samples of this job (resumed runs included)."""
    path = bench_dir / RUNS_FILE
    if not path.exists():
        return None
    runs = [run for _, run in iter_jsonl(path) if run.get("job") == job_hash(recipe)]
    seconds = sum(run["wall_seconds"] for run in runs)
    return round(sum(run["completion_tokens"] for run in runs) / seconds, 1) if seconds > 0 else None


def job_samples(recipe: Recipe) -> list[dict[str, Any]]:
    """The ledger's samples of exactly this job; an earlier job with other parameters may share the ledger."""
    requests, _, _ = build_requests(recipe)
    wanted = {request.key for request in requests}
    found = {}
    for _, sample in iter_jsonl(Path(recipe.generate.output_dir) / SAMPLES_FILE):
        if sample.get("request_key") in wanted:
            found[sample["request_key"]] = sample
    return list(found.values())


def grade_benchmark(benchmark: Benchmark, samples: list[dict[str, Any]], grader) -> list[dict[str, Any]]:
    problems = {problem.id: problem for problem in benchmark.problems}
    samples = sorted(samples, key=lambda sample: (sample["prompt_id"], sample["sample_idx"]))
    verdicts = grader.grade_batch([(sample["text"], problems[sample["prompt_id"]].answer) for sample in samples])
    rows = []
    for sample, verdict in zip(samples, verdicts):
        problem = problems[sample["prompt_id"]]
        closed = split_reasoning(sample["text"]).closed
        rows.append({
            "problem_id": problem.id, "sample_idx": sample["sample_idx"], "gold": problem.answer,
            "extracted": verdict.extracted, "route": verdict.route, "reason": verdict.reason,
            "correct": verdict.correct is True and closed,  # unclosed reasoning has no answer to be right
            "truncated": sample["finish_reason"] == "length" or not closed,
            "finish_reason": sample["finish_reason"], "completion_tokens": sample["usage"]["completion_tokens"],
            "latency_s": sample["latency_s"],
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

    recipes = {benchmark.name: prepare_benchmark(benchmark, target, settings, out_dir) for benchmark in benchmarks}
    unfinished = [recipe for recipe in recipes.values() if missing_samples(recipe)]
    memory = None
    if unfinished:  # a rerun that only regrades does not start (and wait minutes for) a server
        with serving(target, out_dir, slot) as (endpoint, memory, server):
            for recipe in unfinished:
                generate_benchmark(recipe, endpoint, server)
    results = {"created_at": utc_now(), "model": model_info(target, memory, out_dir),
               "generation": generation_info(settings, template), "benchmarks": {}}
    files = [RESULTS_FILE, RESULTS_TABLE]
    with Grader(anchor=settings.anchor, workers=settings.grading_workers) as grader:
        for benchmark in benchmarks:
            recipe = recipes[benchmark.name]
            rows = grade_benchmark(benchmark, job_samples(recipe), grader)
            rewrite_jsonl(out_dir / benchmark.name / GRADED_FILE, rows)
            files.append(f"{benchmark.name}/{GRADED_FILE}")
            metrics = benchmark_metrics(rows, settings.samples, benchmark.group_by)
            metrics["throughput_tokens_per_s"] = throughput(out_dir / benchmark.name, recipe)
            metrics["origin"] = benchmark.origin
            results["benchmarks"][benchmark.name] = metrics
    write_json_atomic(out_dir / RESULTS_FILE, results)
    (out_dir / RESULTS_TABLE).write_text(results_table(results) + "\n", encoding="utf-8")
    write_manifest(out_dir, stage="eval", recipe={"eval": settings.model_dump(mode="json"),
                                                  "model": target.model_dump(mode="json")},
                   counts={name: metrics["samples"] for name, metrics in results["benchmarks"].items()}, files=files)
    return results


def refuse_seed_on_cpu(target: TeacherSection, settings: EvalSection, out_dir: Path) -> None:
    """The check run_generate makes before launching a server, made here because we launch it ourselves."""
    if target.launch is not None:
        from cot_distill.teachers.serve import check_cpu_sampling

        check_cpu_sampling(generation_recipe(target, settings, out_dir / "_"))


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


def model_info(target: TeacherSection, memory: PeakMemory | None, out_dir: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"name": target.model}
    if target.launch is not None:
        from cot_distill.teachers.serve import resolve_model_path

        info["served_by"] = "local vLLM server launched by eval"
        info["max_model_len"] = target.launch.max_model_len
        info.update(describe_local_model(Path(resolve_model_path(target.launch.model_path))))
    else:
        info["served_by"] = "endpoint"
        info["endpoints"] = target.base_urls
        info.update({"path": None, "parameters": None, "layers": None, "size_on_disk_bytes": None})
    info["peak_memory"] = memory.report() if memory is not None else earlier_peak_memory(target, out_dir)
    return info


def earlier_peak_memory(target: TeacherSection, out_dir: Path) -> dict[str, Any]:
    if target.launch is None:
        return {"available": False, "why": "a remote endpoint: its process is not ours to measure"}
    earlier = read_json(out_dir / RESULTS_FILE)["model"]["peak_memory"] if (out_dir / RESULTS_FILE).exists() else {}
    if earlier.get("available"):
        return {**earlier, "measured": "in an earlier run; this one had nothing left to generate"}
    return {"available": False, "why": "nothing left to generate, so no server was started in this run"}
