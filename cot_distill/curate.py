"""The curate stage: the teacher's samples -> a filtered, deduplicated, decontaminated training set.

run_curate(recipe) is linear: check the generate output -> load prompts -> log the resolved config -> stream
samples.jsonl in batches through the filters -> select per prompt -> write train.jsonl, the HF dataset, the
report, card and histogram -> manifest.json last. Filters run in this order, each counting what it drops and why:

  input          samples of prompts not in the recipe's data, or made with another teacher, prompt template or
                 sampling parameters (generate's ledger keeps those across recipe edits)
  completeness   finish_reason "stop", the reasoning block closed, some answer text after it
  repetition     degenerate loops in the tail (see RepetitionFilter in curate_config.py)
  length         completion tokens <= max_tokens (a named tokenizer, else usage.completion_tokens)
  correctness    cot_distill.grading on the answer text (after the reasoning) vs the gold answer; True kept
  exact_dedup    normalized identical completions, per prompt (or global)
  near_dup       MinHash estimated Jaccard >= threshold, per prompt (or global)
  decontaminate  the prompt's problem shares a word 8-gram with a benchmark problem: all its samples go
  select         per prompt: all, the k shortest, or k seeded-random

Speed: the work that needs only a text (word hashes, loop check, exact digest, MinHash signature) and a prompt's
decontamination run in worker processes a batch ahead of the main process, which reads, grades and writes.
Results do not depend on the number of workers. Output order is samples.jsonl order; dedup keeps the first seen.

Memory follows the kept samples, not the corpus: a batch at a time is in flight; what stays is the prompts, a
16-byte digest and a num_perm x 16-bit MinHash signature per kept sample (per prompt scope: compared pairwise
within the prompt, since a prompt has a handful of samples and LSH banding would only lose recall; the global scope
uses NearDupIndex's LSH), the ids of contaminated prompts and, for shortest/random, the k best (rank, position)
pairs per prompt. Survivors go straight to train.jsonl, or when selecting to a spool the selected are copied from.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import sys
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydantic import ValidationError

from cot_distill.curate_config import CurateSection, RepetitionFilter, Select
from cot_distill.curate_report import (FilterTally, RunRecord, build_report, format_table, save_dataset,
                                       write_dataset_card, write_length_histogram)
from cot_distill.data import load_prompts
from cot_distill.decontam import Decontaminator
from cot_distill.dedup import DEFAULT_BACKEND, SIGNATURE_BACKENDS, ExactDeduper, NearDupIndex, ngram_hashes, word_hashes
from cot_distill.generate import SAMPLES_FILE, sampling_params
from cot_distill.grading import Grader, Verdict
from cot_distill.prompts import load_template
from cot_distill.recipe import Recipe, recipe_snapshot
from cot_distill.records import (JsonlWriter, Prompt, RecordError, Sample, invalidate_manifest, iter_jsonl,
                                 read_manifest, write_json_atomic, write_manifest)

TRAIN_FILE, DATASET_DIR, REPORT_FILE = "train.jsonl", "dataset", "report.json"
CARD_FILE, HISTOGRAM_FILE, SPOOL_FILE = "README.md", "length_histogram.png", ".selection_spool.jsonl"
IN_PROCESS_BELOW_BYTES = 64 << 20  # smaller inputs: starting worker processes costs more than it saves
MAX_AUTO_FEATURE_WORKERS = 3  # past ~2 the main process (parse, grade, write) is the bottleneck


class CurateError(RuntimeError):
    """A curate run that cannot start; the message says why and what to do."""


@dataclass
class Candidate:
    """A sample on its way through the filters, with what is known about it so far."""

    position: int  # line number in samples.jsonl
    sample: Sample
    prompt: Prompt
    tokens: int = 0
    verdict: Verdict | None = None
    repetition: float = 0.0  # the text features, computed by a worker
    digest: bytes = b""
    signature: np.ndarray | None = None
    benchmark: str | None = None  # the benchmark the prompt overlaps with


# -------------------------------------------------------------------------------------------- text features

def repetition_coverage(words: np.ndarray, config: RepetitionFilter) -> float:
    """Fraction of the tail's n-gram positions whose n-gram occurs at least min_repeats times in the tail.
    `words` are the text's word hashes (cot_distill.dedup.word_hashes)."""
    words = words[-config.tail_words:]
    if len(words) < config.ngram + config.min_repeats - 1:  # too short to repeat anything min_repeats times
        return 0.0
    grams = np.sort(ngram_hashes(words, config.ngram))
    run_starts = np.flatnonzero(np.concatenate(([True], grams[1:] != grams[:-1])))
    run_lengths = np.diff(np.append(run_starts, len(grams)))  # equal grams sit together once sorted
    return float(run_lengths[run_lengths >= config.min_repeats].sum() / len(grams))


@dataclass(frozen=True)
class FeatureSettings:
    repetition: RepetitionFilter | None  # None: that filter is off, so its feature is not computed
    exact_digest: bool
    signature: tuple[int, int, int, str] | None  # (shingle, num_perm, seed, backend) for per-prompt near-dup


def compute_features(texts: list[str], problems: dict[str, str], settings: FeatureSettings,
                     decontaminator: Decontaminator | None) -> tuple:
    """(loop coverages, exact digests, MinHash signatures, {prompt id: benchmark} for contaminated prompts)."""
    coverages, digests, shingles = [], [], []
    for text in texts:
        words = word_hashes(text) if settings.repetition or settings.signature else None
        coverages.append(repetition_coverage(words, settings.repetition) if settings.repetition else 0.0)
        digests.append(ExactDeduper.digest(text) if settings.exact_digest else b"")
        if settings.signature:
            shingles.append(ngram_hashes(words, settings.signature[0]))
    signatures = None
    if settings.signature and texts:  # what NearDupIndex.signatures() computes, from the word hashes at hand
        _, num_perm, seed, backend = settings.signature
        signatures = SIGNATURE_BACKENDS[backend](shingles, num_perm, seed).astype(np.uint16)
    contaminated = {}
    if decontaminator is not None:
        checked = {prompt_id: decontaminator.check(problem) for prompt_id, problem in problems.items()}
        contaminated = {prompt_id: benchmark for prompt_id, benchmark in checked.items() if benchmark}
    return coverages, digests, signatures, contaminated


_worker_decontaminator: Decontaminator | None = None


def _start_worker(decontaminator: Decontaminator | None) -> None:
    global _worker_decontaminator
    _worker_decontaminator = decontaminator


def _features_in_worker(texts: list[str], problems: dict[str, str], settings: FeatureSettings) -> tuple:
    return compute_features(texts, problems, settings, _worker_decontaminator)


class FeatureService:
    """Computes a batch's text features in a worker process (or in this one), and attaches them when done."""

    def __init__(self, settings: FeatureSettings, decontaminator: Decontaminator | None, workers: int) -> None:
        self.settings, self.decontaminator, self.workers = settings, decontaminator, workers
        self.pool = None
        if workers > 0:  # spawn: no locks or threads inherited from this process
            self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                            initargs=(decontaminator,))
        self.sent_prompts: set[str] = set()
        self.contaminated: dict[str, str] = {}

    def submit(self, candidates: list[Candidate]) -> Future:
        texts = [candidate.sample.text for candidate in candidates]
        problems = {c.prompt.id: c.prompt.problem for c in candidates if c.prompt.id not in self.sent_prompts}
        self.sent_prompts.update(problems)
        if self.pool is not None:
            return self.pool.submit(_features_in_worker, texts, problems, self.settings)
        done: Future = Future()
        done.set_result(compute_features(texts, problems, self.settings, self.decontaminator))
        return done

    def attach(self, candidates: list[Candidate], features: Future) -> None:
        coverages, digests, signatures, contaminated = features.result()
        self.contaminated.update(contaminated)
        for index, candidate in enumerate(candidates):
            candidate.repetition, candidate.digest = coverages[index], digests[index]
            candidate.signature = None if signatures is None else signatures[index]
            candidate.benchmark = self.contaminated.get(candidate.prompt.id)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ------------------------------------------------------------------------------------------------- filters
# Each filter maps a batch to one drop reason per candidate (None: keep); it sees the survivors of earlier ones.

class InputCheck:
    name = "input"

    def __init__(self, recipe: Recipe, template_hash: str, enabled: bool) -> None:
        self.teacher, self.template_hash, self.enabled = recipe.teacher.model, template_hash, enabled
        self.params = [sampling_params(recipe, index) for index in range(recipe.generate.samples_per_prompt)]

    def reason(self, sample: Sample, prompt: Prompt | None) -> str | None:
        if prompt is None:
            return "unknown_prompt"
        if not self.enabled:
            return None
        if sample.teacher != self.teacher:
            return "other_teacher"
        if sample.template_hash != self.template_hash:
            return "other_template"
        if sample.sample_idx >= len(self.params) or sample.params != self.params[sample.sample_idx]:
            return "other_params"
        return None


class CompletenessCheck:
    name = "completeness"

    def reasons(self, batch: list[Candidate]) -> list[str | None]:
        return [self.reason(candidate.sample) for candidate in batch]

    @staticmethod
    def reason(sample: Sample) -> str | None:
        if sample.error:
            return "error"
        if sample.finish_reason != "stop":
            return "truncated" if sample.finish_reason == "length" else f"finish_{sample.finish_reason}"
        if not sample.reasoning_closed:
            return "unclosed_reasoning"
        if not sample.content.strip():
            return "empty_answer"
        return None


class RepetitionCheck:
    name = "repetition"

    def __init__(self, max_coverage: float) -> None:
        self.max_coverage = max_coverage

    def reasons(self, batch: list[Candidate]) -> list[str | None]:
        return ["loop" if candidate.repetition >= self.max_coverage else None for candidate in batch]


class LengthCheck:
    name = "length"

    def __init__(self, max_tokens: int | None, tokenizer: str | None) -> None:
        self.max_tokens = max_tokens
        self.tokenizer = None
        if tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def reasons(self, batch: list[Candidate]) -> list[str | None]:
        if self.tokenizer is None:
            counts = [candidate.sample.usage.completion_tokens for candidate in batch]
        else:  # one call: the fast tokenizer encodes the batch in parallel
            encoded = self.tokenizer([c.sample.text for c in batch], add_special_tokens=False)["input_ids"]
            counts = [len(ids) for ids in encoded]
        for candidate, count in zip(batch, counts):
            candidate.tokens = count
        limit = self.max_tokens
        return ["too_long" if limit is not None and count > limit else None for count in counts]


class CorrectnessCheck:
    name = "correctness"

    def __init__(self, grader: Grader, run: RunRecord) -> None:
        self.grader, self.run = grader, run

    def reasons(self, batch: list[Candidate]) -> list[str | None]:
        gradable = [candidate for candidate in batch if candidate.prompt.answer is not None]
        verdicts = self.grader.grade_batch([(c.sample.content, c.prompt.answer) for c in gradable])
        for candidate, verdict in zip(gradable, verdicts):
            candidate.verdict = verdict
            self.run.routes_graded[verdict.route] += 1
            self.run.routes_kept[verdict.route] += verdict.correct is True
            self.run.grade_reasons[verdict.reason] += 1
        return ["no_gold" if c.verdict is None else None if c.verdict.correct is True else c.verdict.reason
                for c in batch]


class ExactDedupCheck:
    name = "exact_dedup"

    def __init__(self, per_prompt: bool) -> None:
        self.per_prompt = per_prompt
        self.kept: set[bytes] = set()

    def reasons(self, batch: list[Candidate]) -> list[str | None]:
        return ["duplicate" if self.seen(candidate) else None for candidate in batch]

    def seen(self, candidate: Candidate) -> bool:
        digest = candidate.digest  # ExactDeduper.digest of the text
        if self.per_prompt:
            digest = hashlib.blake2b(candidate.prompt.id.encode() + b"\0" + digest, digest_size=16).digest()
        if digest in self.kept:
            return True
        self.kept.add(digest)
        return False


class NearDupCheck:
    name = "near_dup"

    def __init__(self, per_prompt: bool, threshold: float, index: NearDupIndex | None) -> None:
        self.per_prompt, self.threshold, self.index = per_prompt, threshold, index
        self.kept_signatures: dict[str, np.ndarray] = {}  # per prompt scope: prompt id -> (kept, num_perm) uint16

    def reasons(self, batch: list[Candidate]) -> list[str | None]:
        if not self.per_prompt:
            matches = self.index.add_batch([(c.position, c.sample.text) for c in batch]) if batch else []
            return [None if match is None else "near_duplicate" for match in matches]
        return [self.check_within_prompt(candidate.prompt.id, candidate.signature) for candidate in batch]

    def check_within_prompt(self, prompt_id: str, signature: np.ndarray) -> str | None:
        kept = self.kept_signatures.get(prompt_id)
        # the same estimate NearDupIndex verifies with: the share of equal (16-bit) MinHash slots
        if kept is not None and ((kept == signature).mean(axis=1) >= self.threshold).any():
            return "near_duplicate"
        self.kept_signatures[prompt_id] = signature[None] if kept is None else np.vstack((kept, signature))
        return None


class DecontaminationCheck:
    name = "decontaminate"

    def __init__(self, run: RunRecord) -> None:
        self.run = run
        self.counted: set[str] = set()  # contaminated prompts already in the report

    def reasons(self, batch: list[Candidate]) -> list[str | None]:
        for candidate in batch:
            if candidate.benchmark and candidate.prompt.id not in self.counted:
                self.counted.add(candidate.prompt.id)
                self.run.contaminated_prompts[candidate.benchmark] += 1
        return [candidate.benchmark for candidate in batch]


def build_decontaminator(recipe: Recipe) -> Decontaminator:
    config = recipe.curate.decontaminate
    if config.default_benchmarks:
        decontaminator = Decontaminator.with_default_benchmarks(config.ngram, config.min_coverage)
    else:
        decontaminator = Decontaminator(config.ngram, config.min_coverage)
    for index, extra in enumerate(config.extra):
        where = f"curate.decontaminate.extra[{index}]"
        if not Path(extra.path).is_file():
            raise CurateError(f"{where}.path: {extra.path} does not exist")
        try:
            decontaminator.add_jsonl(extra.name, extra.path, extra.field)
        except KeyError:
            raise CurateError(f"{where}.field: some line of {extra.path} has no field {extra.field!r}") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise CurateError(f"{where}.path: {extra.path} is not JSONL of objects ({exc})") from None
    return decontaminator


def build_filters(recipe: Recipe, run: RunRecord, stack: ExitStack) -> list:
    cfg = recipe.curate
    filters: list = [CompletenessCheck()] if cfg.completeness.enabled else []
    if cfg.repetition.enabled:
        filters.append(RepetitionCheck(cfg.repetition.max_coverage))
    filters.append(LengthCheck(cfg.length.max_tokens, cfg.length.tokenizer))  # always: it counts the tokens
    if cfg.correctness.enabled:
        grading = cfg.correctness
        grader = stack.enter_context(Grader(
            anchor=grading.answer_anchor, patterns=grading.answer_patterns, timeout_s=grading.timeout_s,
            workers=grading.workers or max(1, (os.cpu_count() or 2) - 1), fast_path=grading.fast_path,
            memo=grading.memo))
        filters.append(CorrectnessCheck(grader, run))
    if cfg.exact_dedup.enabled:
        filters.append(ExactDedupCheck(cfg.exact_dedup.scope == "prompt"))
    if cfg.near_dup.enabled:
        near, per_prompt = cfg.near_dup, cfg.near_dup.scope == "prompt"
        index = None if per_prompt else NearDupIndex(near.threshold, near.num_perm, near.shingle, near.seed)
        filters.append(NearDupCheck(per_prompt, near.threshold, index))
    if cfg.decontaminate.enabled:
        filters.append(DecontaminationCheck(run))
    return filters


def start_features(recipe: Recipe, samples_path: Path, run: RunRecord, stack: ExitStack) -> FeatureService:
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
        small = samples_path.stat().st_size < IN_PROCESS_BELOW_BYTES
        workers = 0 if small else min(MAX_AUTO_FEATURE_WORKERS, max(1, (os.cpu_count() or 2) - 1))
    service = FeatureService(settings, decontaminator, workers)
    stack.callback(service.close)
    return service


# ------------------------------------------------------------------------------------------ selection, rows

class Selector:
    """Keeps the k best-ranked survivors per prompt in a bounded heap; the rank never depends on file order."""

    def __init__(self, config: Select) -> None:
        self.config, self.k = config, config.k or 1
        self.best: dict[str, list[tuple[tuple[int, int], int]]] = defaultdict(list)  # max-heaps (negated ranks)

    def rank(self, candidate: Candidate) -> tuple[int, int]:
        index = candidate.sample.sample_idx
        if self.config.strategy == "shortest":
            return candidate.tokens, index
        if self.config.strategy == "random":
            key = f"{self.config.seed}\0{candidate.prompt.id}\0{index}".encode()
            return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"), index
        return index, 0  # all with a cap: the lowest sample indices

    def offer(self, candidate: Candidate, spool_line: int) -> None:
        heap, rank = self.best[candidate.prompt.id], self.rank(candidate)
        entry = ((-rank[0], -rank[1]), spool_line)
        if len(heap) < self.k:
            heapq.heappush(heap, entry)
        else:
            heapq.heappushpop(heap, entry)  # drops the worst of the k + 1

    def selected_lines(self) -> set[int]:
        return {spool_line for heap in self.best.values() for _, spool_line in heap}


def assistant_message(sample: Sample, reasoning_format: str) -> dict[str, str]:
    if sample.reasoning is None:  # the teacher used no think tags: its text as it came
        return {"role": "assistant", "content": sample.text}
    reasoning, answer = sample.reasoning.strip(), sample.content.strip()
    if reasoning_format == "reasoning_content":
        return {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}


def training_row(candidate: Candidate, prompt_messages: list[dict[str, str]], reasoning_format: str) -> dict:
    sample, verdict = candidate.sample, candidate.verdict
    return {
        "messages": [*prompt_messages, assistant_message(sample, reasoning_format)],
        "reasoning": sample.reasoning, "answer_text": sample.content, "prompt_id": sample.prompt_id,
        "source": source_of(candidate.prompt), "teacher": sample.teacher,
        "grade": {"extracted": verdict.extracted if verdict else None,
                  "route": verdict.route if verdict else "not_graded"},
        "tokens": candidate.tokens, "sample_idx": sample.sample_idx,
    }


def source_of(prompt: Prompt) -> str:
    """A `source` column of the prompt data (NuminaMath has one) when present, else the data set's name."""
    meta_source = prompt.meta.get("source")
    return meta_source if isinstance(meta_source, str) and meta_source else prompt.source


class PromptRenderer:
    """The rendered prompt messages of a prompt, cached: samples of one prompt sit close together in the file."""

    def __init__(self, template_name: str, capacity: int = 4096) -> None:
        self.template, self.capacity = load_template(template_name), capacity
        self.cache: dict[str, list[dict[str, str]]] = {}

    def __call__(self, prompt: Prompt) -> list[dict[str, str]]:
        messages = self.cache.pop(prompt.id, None) or self.template.render(prompt.problem)
        self.cache[prompt.id] = messages  # re-inserted last: the dict's order is the recency order
        if len(self.cache) > self.capacity:
            del self.cache[next(iter(self.cache))]
        return messages


# --------------------------------------------------------------------------------------------- input, stream

def locate_samples(recipe: Recipe) -> tuple[Path, dict[str, Any] | None]:
    generate_dir = Path(recipe.generate.output_dir)
    samples_path = generate_dir / SAMPLES_FILE
    if not samples_path.is_file():
        raise CurateError(f"{samples_path} does not exist: run `cot-distill generate` with this recipe first")
    manifest = read_manifest(generate_dir)
    if manifest is None and not recipe.curate.allow_incomplete:
        raise CurateError(f"{generate_dir} has no manifest.json: the generate stage has not finished (rerun "
                          f"`cot-distill generate` to complete it, or set curate.allow_incomplete: true)")
    return samples_path, manifest


def read_batches(path: Path, batch_size: int, tolerate_torn_tail: bool) -> Iterator[list[tuple[int, Sample]]]:
    """Validated samples in batches; a malformed line raises RecordError naming the file, line and field."""
    batch: list[tuple[int, Sample]] = []
    for line_no, obj in iter_jsonl(path, tolerate_torn_tail=tolerate_torn_tail):
        try:
            batch.append((line_no, Sample.model_validate(obj)))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "(record)"
            raise RecordError(f"{path}:{line_no}: {field}: {error['msg']}") from None
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
    run.tallies[0].record(reasons, started)
    return candidates


def apply_filters(candidates: list[Candidate], filters: list, tallies: list[FilterTally]) -> list[Candidate]:
    for check, tally in zip(filters, tallies):
        started = time.perf_counter()
        reasons = check.reasons(candidates)
        tally.record(reasons, started)
        candidates = [candidate for candidate, reason in zip(candidates, reasons) if reason is None]
    return candidates


def record_output(run: RunRecord, prompt: Prompt, tokens: int) -> None:
    run.output_tokens.append(tokens)
    run.output_prompts.add(prompt.id)
    run.source_out[source_of(prompt)] += 1


def stream(recipe: Recipe, samples_path: Path, prompts: dict[str, Prompt], complete: bool, run: RunRecord,
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
            rows.write(training_row(candidate, render(candidate.prompt), cfg.reasoning_format))
            if selector is None:
                record_output(run, candidate.prompt, candidate.tokens)
            else:
                selector.offer(candidate, written)
            written += 1

    with ExitStack() as stack:
        filters = build_filters(recipe, run, stack)
        service = start_features(recipe, samples_path, run, stack)
        run.tallies += [FilterTally(check.name) for check in filters]
        in_flight: deque = deque()  # batches whose features are being computed, oldest first
        for batch in read_batches(samples_path, cfg.batch_size, tolerate_torn_tail=not complete):
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
                record_output(run, prompts[row["prompt_id"]], row["tokens"])
    run.tallies.append(FilterTally("select"))
    run.tallies[-1].record(reasons, started)
    spool.unlink()


# ------------------------------------------------------------------------------------------------ the stage

def clear_outputs(out_dir: Path) -> None:
    """Outputs of an earlier run must not mix with this one's (JsonlWriter appends)."""
    for name in (TRAIN_FILE, SPOOL_FILE, REPORT_FILE, CARD_FILE, HISTOGRAM_FILE):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / DATASET_DIR, ignore_errors=True)


def refuse_if_nothing_matched(input_tally: FilterTally, samples_path: Path) -> None:
    """Every sample of another teacher/template/parameter set or prompt file is a wrong recipe, not a result."""
    if input_tally.seen and not input_tally.kept:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in input_tally.dropped.most_common())
        raise CurateError(f"none of the {input_tally.seen:,} samples in {samples_path} belong to this recipe "
                          f"({reasons}); check teacher.model, data, generate.prompt_template and generate.sampling, "
                          f"or set curate.only_current_samples: false to curate them anyway")


def log_config(recipe: Recipe, samples_path: Path, prompt_count: int, complete: bool) -> None:
    state = "complete" if complete else "INCOMPLETE (curate.allow_incomplete)"
    print(f"[curate] {samples_path} ({state}), {prompt_count:,} prompts -> {recipe.curate.output_dir}\n"
          f"[curate] config: {json.dumps(recipe.curate.model_dump(mode='json'), sort_keys=True)}",
          file=sys.stderr, flush=True)


def run_curate(recipe: Recipe) -> dict[str, Any]:
    """The curate stage. Returns report.json's content. Raises CurateError / RecordError on bad input."""
    cfg: CurateSection = recipe.curate
    started = time.monotonic()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(out_dir)  # from here on, a failure leaves the folder marked incomplete
    samples_path, generate_manifest = locate_samples(recipe)
    prompts = {prompt.id: prompt for prompt in load_prompts(recipe.data)}
    if cfg.correctness.enabled and all(prompt.answer is None for prompt in prompts.values()):
        raise CurateError("curate.correctness needs gold answers, and no prompt has one (map data.fields.answer, "
                          "or set curate.correctness.enabled: false)")
    log_config(recipe, samples_path, len(prompts), generate_manifest is not None)
    clear_outputs(out_dir)

    run = RunRecord(tallies=[FilterTally("input")])
    selector = None if cfg.select.strategy == "all" and cfg.select.k is None else Selector(cfg.select)
    rows_path = out_dir / (TRAIN_FILE if selector is None else SPOOL_FILE)
    with JsonlWriter(rows_path, fsync_every=4096) as rows:
        stream(recipe, samples_path, prompts, generate_manifest is not None, run, rows, selector)
    refuse_if_nothing_matched(run.tallies[0], samples_path)
    run.stage_seconds["stream"] = time.monotonic() - started
    if selector is not None:
        copy_selected(rows_path, out_dir / TRAIN_FILE, selector, prompts, run)
    else:  # every survivor is a row; the table still shows the stage
        run.tallies.append(FilterTally("select", seen=len(run.output_tokens), kept=len(run.output_tokens)))
    dataset_started = time.monotonic()
    dataset_files = save_dataset(out_dir / TRAIN_FILE, out_dir / DATASET_DIR, cfg.reasoning_format)
    run.stage_seconds["dataset"] = time.monotonic() - dataset_started

    inputs = {"samples_file": str(samples_path), "generate_complete": generate_manifest is not None,
              "prompts": len(prompts)}
    report = build_report(run, config=cfg.model_dump(mode="json"), inputs=inputs, seconds=time.monotonic() - started)
    write_json_atomic(out_dir / REPORT_FILE, report)
    note = write_length_histogram(out_dir / HISTOGRAM_FILE, run.input_tokens, run.output_tokens, cfg.histogram_bins)
    write_dataset_card(out_dir / CARD_FILE, report, name=recipe.name, teacher=recipe.teacher.model,
                       prompts=recipe.data.prompts, template=recipe.generate.prompt_template, histogram_note=note)
    print(format_table(report), file=sys.stderr, flush=True)
    write_manifest(out_dir, stage="curate", recipe=recipe_snapshot(recipe),
                   counts={"samples_in": run.lines_read, "rows": report["output"]["rows"],
                           "prompts": report["output"]["prompts"]},
                   files=[TRAIN_FILE, REPORT_FILE, CARD_FILE, HISTOGRAM_FILE, *dataset_files],
                   extra={"input": {**inputs, "generate_finished_at": (generate_manifest or {}).get("finished_at")}})
    return report
