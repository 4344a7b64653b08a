"""Text features of the curate stage: Candidate (a sample on its way through the filters) and what needs only a
sample's text or a prompt's problem (the loop coverage, exact digest, MinHash signature and the decontamination
check), computed a batch ahead by FeatureService in worker processes (or in this one, for small inputs)."""

from __future__ import annotations

from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

from cot_distill.config.curate import RepetitionFilter
from cot_distill.decontam import Decontaminator
from cot_distill.dedup import SIGNATURE_BACKENDS, ExactDeduper, ngram_hashes, word_hashes
from cot_distill.grading import Verdict
from cot_distill.records import Prompt, Sample

IN_PROCESS_BELOW_BYTES = 64 << 20  # smaller inputs: starting worker processes costs more than it saves
MAX_AUTO_FEATURE_WORKERS = 3  # past ~2 the main process (parse, grade, write) is the bottleneck


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
