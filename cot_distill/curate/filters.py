"""The curate filters, in the order run_curate applies them, behind one Filter protocol; build_filters makes the
enabled ones from the recipe, apply_filters runs a batch through them. InputCheck is the per-sample gate before a
Candidate exists (see run.admit), so it is not a Filter. CurateError lives here: build_decontaminator raises it and
every other curate module can import it from here without a cycle."""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import numpy as np

from cot_distill.config import Recipe
from cot_distill.curate.features import Candidate
from cot_distill.curate.report import FilterTally, RunRecord
from cot_distill.decontam import Decontaminator
from cot_distill.dedup import NearDupIndex
from cot_distill.errors import UserError
from cot_distill.generate import params_for
from cot_distill.grading import Grader, incomplete_reason
from cot_distill.records import Prompt, Sample


class CurateError(UserError, RuntimeError):
    """A curate run that cannot start; the message says why and what to do."""


class Filter(Protocol):
    """Each filter maps a batch to one drop reason per candidate (None: keep); it sees the survivors of earlier ones.
    A filter may also note what it learns on the candidates (LengthCheck sets .tokens, CorrectnessCheck .verdict)."""

    name: str  # the row name in report.json and the console table

    def reasons(self, batch: list[Candidate]) -> list[str | None]: ...


class InputCheck:
    """Admits the samples this recipe's generate makes: per teacher (by teacher_name: None for the one-teacher form,
    each entry's name with `teachers:`), that teacher's model and its own sampling parameters for the sample_idx,
    and the recipe's prompt template."""

    name = "input"

    def __init__(self, recipe: Recipe, template_hash: str, enabled: bool) -> None:
        self.template_hash, self.enabled = template_hash, enabled
        self.expected = {teacher.name: (teacher.model, [params_for(gen.sampling, index, gen.logprobs)
                                                        for index in range(gen.samples_per_prompt)])
                         for teacher, gen in recipe.teacher_jobs()}

    def reason(self, sample: Sample, prompt: Prompt | None) -> str | None:
        if prompt is None:
            return "unknown_prompt"
        if not self.enabled:
            return None
        model, params = self.expected.get(sample.teacher_name, (None, []))
        if sample.teacher != model:
            return "other_teacher"
        if sample.template_hash != self.template_hash:
            return "other_template"
        if sample.sample_idx >= len(params) or sample.params != params[sample.sample_idx]:
            return "other_params"
        return None


class CompletenessCheck:
    name = "completeness"

    def reasons(self, batch: list[Candidate]) -> list[str | None]:
        return [incomplete_reason(candidate.sample) for candidate in batch]


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
            self.run.note_verdict(candidate.prompt.id, candidate.sample.teacher_name, verdict.correct,
                                  verdict.extracted)
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


def build_filters(recipe: Recipe, run: RunRecord, stack: ExitStack) -> list[Filter]:
    cfg = recipe.curate
    filters: list[Filter] = [CompletenessCheck()] if cfg.completeness.enabled else []
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


def apply_filters(candidates: list[Candidate], filters: list[Filter], tallies: list[FilterTally]) -> list[Candidate]:
    for check, tally in zip(filters, tallies):
        started = time.perf_counter()
        reasons = check.reasons(candidates)
        tally.record(reasons, started)
        candidates = [candidate for candidate, reason in zip(candidates, reasons) if reason is None]
    return candidates
