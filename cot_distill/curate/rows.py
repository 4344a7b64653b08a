"""Selection and training rows of the curate stage: Selector (all, the k shortest or k seeded-random per prompt),
the assistant message in either reasoning format, training_row (one train.jsonl line), source_of and the cached
PromptRenderer."""

from __future__ import annotations

import hashlib
import heapq
from collections import defaultdict
from pathlib import Path

from cot_distill.config.curate import Select
from cot_distill.curate.features import Candidate
from cot_distill.prompts import load_template
from cot_distill.records import Prompt, Sample


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


def assistant_message(sample: Sample, reasoning_format: str, raw: bool = False) -> dict[str, str]:
    # No think tags, or `raw` (recorded logprobs: kd.teacher: recorded trains on exactly the tokens the teacher
    # wrote, and checks them against this text): the text as it came.
    if sample.reasoning is None or raw:
        return {"role": "assistant", "content": sample.text}
    reasoning, answer = sample.reasoning.strip(), sample.content.strip()
    if reasoning_format == "reasoning_content":
        return {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}


def training_row(candidate: Candidate, prompt_messages: list[dict[str, str]], reasoning_format: str,
                 with_logprobs: bool = False) -> dict:
    """One train.jsonl line. `with_logprobs` (generate.logprobs is set): the link to the sample's recorded top-K
    (logprob_store.py), with an absolute path so training may run from any folder, and its raw text."""
    sample, verdict = candidate.sample, candidate.verdict
    link = sample.logprobs if with_logprobs else None
    row = {
        "messages": [*prompt_messages, assistant_message(sample, reasoning_format, raw=link is not None)],
        "reasoning": sample.reasoning, "answer_text": sample.content, "prompt_id": sample.prompt_id,
        "source": source_of(candidate.prompt), "teacher": sample.teacher,
        "grade": {"extracted": verdict.extracted if verdict else None,
                  "route": verdict.route if verdict else "not_graded"},
        "tokens": candidate.tokens, "sample_idx": sample.sample_idx,
    }
    if with_logprobs:  # None for a sample made without them (curate.only_current_samples: false)
        row["teacher_logprobs"] = None if link is None else {
            **link, "file": str(Path(link["file"]).resolve()), "request_key": sample.request_key}
    return row


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
