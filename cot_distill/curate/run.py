"""The curate stage's streaming run: locate and read samples.jsonl, admit samples (InputCheck), stream batches through
the feature workers and the filters, copy the selected rows, write every output; run_curate and the uniform stage
entry run(). The filter order and the speed and memory design are in the package docstring (cot_distill.curate)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

from pydantic import ValidationError

from cot_distill.config import Recipe, recipe_snapshot
from cot_distill.config.curate import CurateSection
from cot_distill.curate.features import (
    IN_PROCESS_BELOW_BYTES,
    MAX_AUTO_FEATURE_WORKERS,
    Candidate,
    FeatureService,
    FeatureSettings,
)
from cot_distill.curate.filters import (
    CorrectnessCheck,
    CurateError,
    InputCheck,
    apply_filters,
    build_decontaminator,
    build_filters,
)
from cot_distill.curate.report import (
    FilterTally,
    RunRecord,
    build_report,
    format_table,
    save_dataset,
    write_dataset_card,
    write_length_histogram,
)
from cot_distill.curate.rows import PromptRenderer, Selector, source_of, training_row
from cot_distill.data import load_prompts
from cot_distill.dedup import DEFAULT_BACKEND
from cot_distill.generate.shards import combined_manifest, generate_parts, unfinished
from cot_distill.records import (
    JsonlWriter,
    Prompt,
    RecordError,
    Sample,
    invalidate_manifest,
    iter_jsonl,
    write_json_atomic,
    write_manifest,
)

TRAIN_FILE, DATASET_DIR, REPORT_FILE = "train.jsonl", "dataset", "report.json"
CARD_FILE, HISTOGRAM_FILE, SPOOL_FILE = "README.md", "length_histogram.png", ".selection_spool.jsonl"


# --------------------------------------------------------------------------------------------- input, stream

def locate_samples(recipe: Recipe) -> tuple[list[Path], dict[str, Any] | None, str]:
    """(the ledgers to read: generate's samples.jsonl, or one per shard; their manifest, None while unfinished;
    how to name them in messages)."""
    generate_dir = Path(recipe.generate.output_dir)
    parts = generate_parts(generate_dir)
    paths = [part.samples_path for part in parts]
    label = str(paths[0]) if len(parts) == 1 else f"{generate_dir} ({len(parts)} shards)"
    absent = [path for path in paths if not path.is_file()]
    if absent and len(parts) == 1:
        raise CurateError(f"{absent[0]} does not exist: run `cot-distill generate` with this recipe first")
    unfinished_parts = unfinished(parts)
    if unfinished_parts and not recipe.curate.allow_incomplete:
        where = (f"{generate_dir} has no manifest.json" if len(parts) == 1 else
                 f"shards {', '.join(folder.name for folder in unfinished_parts)} of {generate_dir} have no "
                 f"manifest.json")
        raise CurateError(f"{where}: the generate stage has not finished (rerun `cot-distill generate` to complete "
                          f"it, or set curate.allow_incomplete: true)")
    return [path for path in paths if path.is_file()], combined_manifest(parts), label


def read_batches(paths: list[Path], batch_size: int, tolerate_torn_tail: bool) -> Iterator[list[tuple[int, Sample]]]:
    """Validated samples in batches, file after file; a malformed line raises RecordError naming the file, line
    and field."""
    batch: list[tuple[int, Sample]] = []
    for path in paths:
        for line_no, obj in iter_jsonl(path, tolerate_torn_tail=tolerate_torn_tail):
            try:
                sample = Sample.model_validate(obj)
            except ValidationError as exc:
                error = exc.errors()[0]
                field = ".".join(str(part) for part in error["loc"]) or "(record)"
                raise RecordError(f"{path}:{line_no}: {field}: {error['msg']}") from None
            if sample.logprobs is not None:
                # generate writes its store next to its ledger, and the link holds the path as generate saw it
                # (relative to generate's working folder, or on the machine that generated): point it at the
                # store next to this ledger, wherever the folder now is.
                sample.logprobs["file"] = str(path.parent / Path(sample.logprobs["file"]).name)
            batch.append((line_no, sample))
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def admit(batch: list[tuple[int, Sample]], prompts: dict[str, Prompt], check: InputCheck,
          run: RunRecord) -> list[Candidate]:
    started = time.perf_counter()
    candidates, reasons = [], []
    for line_no, sample in batch:
        prompt = prompts.get(sample.prompt_id)
        reasons.append(check.reason(sample, prompt))
        run.input_tokens.append(sample.usage.completion_tokens)
        if reasons[-1] is None:
            candidates.append(Candidate(line_no, sample, prompt))
            run.source_in[source_of(prompt)] += 1
            run.input_prompts.add(prompt.id)
            run.teacher_samples[sample.teacher_name] += 1
    run.tallies[0].record(reasons, started)
    return candidates


def record_output(run: RunRecord, prompt: Prompt, tokens: int, teacher_name: str | None) -> None:
    run.output_tokens.append(tokens)
    run.output_prompts.add(prompt.id)
    run.source_out[source_of(prompt)] += 1
    run.teacher_kept[teacher_name] += 1
    run.teacher_kept_tokens[teacher_name] += tokens


def stream(recipe: Recipe, samples_paths: list[Path], prompts: dict[str, Prompt], complete: bool, run: RunRecord,
           rows: JsonlWriter, selector: Selector | None) -> None:
    """Read every sample once; write each survivor's row (to train.jsonl, or to the spool when selecting)."""
    cfg = recipe.curate
    render = PromptRenderer(recipe.generate.prompt_template)
    check = InputCheck(recipe, render.template.hash, cfg.only_current_samples)
    started, last_report, written = time.monotonic(), time.monotonic(), 0

    def finish(candidates: list[Candidate], features: Future) -> None:
        nonlocal written
        waiting = time.perf_counter()
        service.attach(candidates, features)
        run.feature_wait_s += time.perf_counter() - waiting
        for candidate in apply_filters(candidates, filters, run.tallies[1:]):
            rows.write(training_row(candidate, render(candidate.prompt), cfg.reasoning_format,
                                    with_logprobs=recipe.generate.logprobs is not None,
                                    with_teacher_name=bool(recipe.teachers)))
            if selector is None:
                record_output(run, candidate.prompt, candidate.tokens, candidate.sample.teacher_name)
            else:
                selector.offer(candidate, written)
            written += 1

    with ExitStack() as stack:
        filters = build_filters(recipe, run, stack)
        service = start_features(recipe, samples_paths, run, stack)
        run.tallies += [FilterTally(check.name) for check in filters]
        in_flight: deque = deque()  # batches whose features are being computed, oldest first
        for batch in read_batches(samples_paths, cfg.batch_size, tolerate_torn_tail=not complete):
            run.lines_read += len(batch)
            candidates = admit(batch, prompts, check, run)
            in_flight.append((candidates, service.submit(candidates)))
            if len(in_flight) > service.workers:  # keep every worker busy while this process grades
                finish(*in_flight.popleft())
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                rate = run.lines_read / (last_report - started)
                print(f"[curate] {run.lines_read:,} samples read, {written:,} kept so far, {rate:,.0f} samples/s",
                      file=sys.stderr, flush=True)
        while in_flight:
            finish(*in_flight.popleft())
        graders = [check.grader for check in filters if isinstance(check, CorrectnessCheck)]
        if graders:
            stats = graders[0].stats
            run.grader_stats = {"fast_path": stats.fast_path, "memo_hits": stats.memo_hits,
                                "math_verify": stats.math_verify, "timeouts": stats.timeouts, "errors": stats.errors}


def copy_selected(spool: Path, train: Path, selector: Selector, prompts: dict[str, Prompt], run: RunRecord) -> None:
    started, selected, reasons = time.perf_counter(), selector.selected_lines(), []
    with JsonlWriter(train, fsync_every=4096) as writer:
        for index, (_, row) in enumerate(iter_jsonl(spool, tolerate_torn_tail=False)):
            reasons.append(None if index in selected else "not_selected")
            if index in selected:
                writer.write(row)
                record_output(run, prompts[row["prompt_id"]], row["tokens"], row.get("teacher_name"))
    run.tallies.append(FilterTally("select"))
    run.tallies[-1].record(reasons, started)
    spool.unlink()


def start_features(recipe: Recipe, samples_paths: list[Path], run: RunRecord, stack: ExitStack) -> FeatureService:
    cfg = recipe.curate
    decontaminator = build_decontaminator(recipe) if cfg.decontaminate.enabled else None
    run.benchmark_sizes = dict(decontaminator.problem_counts) if decontaminator else {}
    near = cfg.near_dup
    settings = FeatureSettings(
        repetition=cfg.repetition if cfg.repetition.enabled else None, exact_digest=cfg.exact_dedup.enabled,
        signature=(near.shingle, near.num_perm, near.seed, DEFAULT_BACKEND)
        if near.enabled and near.scope == "prompt" else None)
    workers = cfg.workers
    if workers is None:
        small = sum(path.stat().st_size for path in samples_paths) < IN_PROCESS_BELOW_BYTES
        workers = 0 if small else min(MAX_AUTO_FEATURE_WORKERS, max(1, (os.cpu_count() or 2) - 1))
    service = FeatureService(settings, decontaminator, workers)
    stack.callback(service.close)
    return service


# ------------------------------------------------------------------------------------------------ the stage

def clear_outputs(out_dir: Path) -> None:
    """Outputs of an earlier run must not mix with this one's (JsonlWriter appends)."""
    for name in (TRAIN_FILE, SPOOL_FILE, REPORT_FILE, CARD_FILE, HISTOGRAM_FILE):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / DATASET_DIR, ignore_errors=True)


def refuse_if_nothing_matched(input_tally: FilterTally, samples_label: str) -> None:
    """Every sample of another teacher/template/parameter set or prompt file is a wrong recipe, not a result."""
    if input_tally.seen and not input_tally.kept:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in input_tally.dropped.most_common())
        raise CurateError(f"none of the {input_tally.seen:,} samples in {samples_label} belong to this recipe "
                          f"({reasons}); check teacher.model, data, generate.prompt_template and generate.sampling, "
                          f"or set curate.only_current_samples: false to curate them anyway")


def log_config(recipe: Recipe, samples_label: str, prompt_count: int, complete: bool) -> None:
    state = "complete" if complete else "INCOMPLETE (curate.allow_incomplete)"
    print(f"[curate] {samples_label} ({state}), {prompt_count:,} prompts -> {recipe.curate.output_dir}\n"
          f"[curate] config: {json.dumps(recipe.curate.model_dump(mode='json'), sort_keys=True)}",
          file=sys.stderr, flush=True)


def run_curate(recipe: Recipe) -> dict[str, Any]:
    """The curate stage. Returns report.json's content. Raises CurateError / RecordError on bad input."""
    cfg: CurateSection = recipe.curate
    started = time.monotonic()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(out_dir)  # from here on, a failure leaves the folder marked incomplete
    samples_paths, generate_manifest, samples_label = locate_samples(recipe)
    prompts = {prompt.id: prompt for prompt in load_prompts(recipe.data)}
    if cfg.correctness.enabled and all(prompt.answer is None for prompt in prompts.values()):
        raise CurateError("curate.correctness needs gold answers, and no prompt has one (map data.fields.answer, "
                          "or set curate.correctness.enabled: false)")
    log_config(recipe, samples_label, len(prompts), generate_manifest is not None)
    clear_outputs(out_dir)

    teacher_names = [teacher.name for teacher in recipe.teachers]
    run = RunRecord(tallies=[FilterTally("input")], teachers=teacher_names)
    keep_every_survivor = (cfg.select.strategy, cfg.select.k, cfg.select.across_form()) == ("all", None, "all")
    selector = None if keep_every_survivor else Selector(cfg.select, teacher_names)
    rows_path = out_dir / (TRAIN_FILE if selector is None else SPOOL_FILE)
    with JsonlWriter(rows_path, fsync_every=4096) as rows:
        stream(recipe, samples_paths, prompts, generate_manifest is not None, run, rows, selector)
    refuse_if_nothing_matched(run.tallies[0], samples_label)
    run.stage_seconds["stream"] = time.monotonic() - started
    if selector is not None:
        copy_selected(rows_path, out_dir / TRAIN_FILE, selector, prompts, run)
    else:  # every survivor is a row; the table still shows the stage
        run.tallies.append(FilterTally("select", seen=len(run.output_tokens), kept=len(run.output_tokens)))
    dataset_started = time.monotonic()
    dataset_files = save_dataset(out_dir / TRAIN_FILE, out_dir / DATASET_DIR, cfg.reasoning_format,
                                 recorded_logprobs=recipe.generate.logprobs is not None,
                                 teacher_names=bool(recipe.teachers))
    run.stage_seconds["dataset"] = time.monotonic() - dataset_started

    # Prompts the teacher rejected for good (generate.max_failed_fraction) have no sample: say how many.
    generate_counts = (generate_manifest or {}).get("counts") or {}
    inputs = {"samples_file": samples_label, "generate_complete": generate_manifest is not None,
              "prompts": len(prompts), "prompts_without_sample": len(prompts.keys() - run.input_prompts),
              "generate_failed_permanently": generate_counts.get("failed_permanently", 0)}
    report = build_report(run, config=cfg.model_dump(mode="json"), inputs=inputs, seconds=time.monotonic() - started)
    write_json_atomic(out_dir / REPORT_FILE, report)
    note = write_length_histogram(out_dir / HISTOGRAM_FILE, run.input_tokens, run.output_tokens, cfg.histogram_bins)
    teacher = ", ".join(f"{entry.name}: {entry.model}" for entry in recipe.teachers) or recipe.teacher.model
    write_dataset_card(out_dir / CARD_FILE, report, name=recipe.name, teacher=teacher,
                       prompts=recipe.data.prompts, template=recipe.generate.prompt_template, histogram_note=note)
    print(format_table(report), file=sys.stderr, flush=True)
    write_manifest(out_dir, stage="curate", recipe=recipe_snapshot(recipe),
                   counts={"samples_in": run.lines_read, "rows": report["output"]["rows"],
                           "prompts": report["output"]["prompts"]},
                   files=[TRAIN_FILE, REPORT_FILE, CARD_FILE, HISTOGRAM_FILE, *dataset_files],
                   extra={"input": {**inputs, "generate_finished_at": (generate_manifest or {}).get("finished_at")}})
    return report


def run(recipe: Recipe, *, slot: Any = None) -> Path:
    """The uniform stage entry: run_curate(recipe), then the output folder (curate.output_dir).

    `slot` is accepted for a signature shared with the other stages and unused: curate serves no model."""
    run_curate(recipe)
    return Path(recipe.curate.output_dir)
