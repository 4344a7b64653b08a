"""Selection and training rows of the curate stage: Selector (all, the k shortest or k seeded-random per prompt, of
the teacher select.across_teachers picks), the assistant message in either reasoning format, training_row (one
train.jsonl line), source_of and the cached PromptRenderer."""

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
    """Keeps the k best-ranked survivors per prompt in a bounded heap (every survivor for strategy all without k);
    the rank never depends on file order. Choosing across teachers (select.across_teachers other than all), a heap
    per (prompt, teacher) instead, and selected_lines() first picks each prompt's teacher (chosen())."""

    def __init__(self, config: Select, teachers: list[str]) -> None:
        self.config, self.form = config, config.across_form()
        self.k = config.k or (None if config.strategy == "all" else 1)
        self.order = {name: index for index, name in enumerate(teachers)}
        # (prompt id, teacher name; None when pooled) -> max-heap of (negated rank, spool line)
        self.best: dict[tuple[str, str | None], list[tuple[tuple[int, int, int], int]]] = defaultdict(list)
        self.shortest: dict[tuple[str, str | None], int] = {}  # fewest tokens of a survivor (shortest_verified)

    def teacher_rank(self, name: str | None) -> int:
        return self.order.get(name, len(self.order))  # unlisted teachers (only_current_samples: false) come last

    def rank(self, candidate: Candidate) -> tuple[int, int, int]:
        index, name = candidate.sample.sample_idx, candidate.sample.teacher_name
        if self.config.strategy == "shortest":
            return candidate.tokens, index, self.teacher_rank(name)
        if self.config.strategy == "random":
            # a named teacher's samples draw their own numbers; one-teacher keys (and picks) stay as they were
            key = f"{self.config.seed}\0{candidate.prompt.id}\0{index}" + ("" if name is None else f"\0{name}")
            return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big"), index, 0
        return index, self.teacher_rank(name), 0  # all with a cap: the lowest sample indices

    def offer(self, candidate: Candidate, spool_line: int) -> None:
        group = (candidate.prompt.id, None if self.form == "all" else candidate.sample.teacher_name)
        heap, rank = self.best[group], self.rank(candidate)
        entry = ((-rank[0], -rank[1], -rank[2]), spool_line)
        if self.k is None or len(heap) < self.k:
            heapq.heappush(heap, entry)
        else:
            heapq.heappushpop(heap, entry)  # drops the worst of the k + 1
        self.shortest[group] = min(self.shortest.get(group, candidate.tokens), candidate.tokens)

    def selected_lines(self) -> set[int]:
        groups = self.best.keys() if self.form == "all" else self.chosen()
        return {spool_line for group in groups for _, spool_line in self.best[group]}

    def chosen(self) -> list[tuple[str, str | None]]:
        """The (prompt, teacher) groups whose rows are kept: at most one teacher per prompt."""
        by_prompt: dict[str, list[str | None]] = defaultdict(list)
        for prompt_id, name in self.best:
            by_prompt[prompt_id].append(name)
        across = self.config.across_teachers
        if self.form == "shortest_verified":  # survivors passed correctness: the shortest is a verified trace
            return [(prompt_id, min(names, key=lambda name: (self.shortest[prompt_id, name], self.teacher_rank(name))))
                    for prompt_id, names in by_prompt.items()]
        if self.form == "prefer":
            return [(prompt_id, next(name for name in across.prefer if name in names))
                    for prompt_id, names in by_prompt.items() if not set(across.prefer).isdisjoint(names)]
        return self.by_quota(by_prompt, across.quota)

    def by_quota(self, by_prompt: dict[str, list[str | None]], quota: dict[str, float]) -> list[tuple[str, str]]:
        """Greedy: prompts in a seeded hash order, each to the teacher with the fewest rows per unit of share so far
        (ties by the order of `teachers:`), among the quota's teachers that have survivors for it."""
        rows = dict.fromkeys(quota, 0)
        chosen = []
        for prompt_id in sorted(by_prompt, key=lambda prompt_id: hashlib.blake2b(
                f"{self.config.seed}\0{prompt_id}".encode(), digest_size=8).digest()):
            options = [name for name in quota if name in by_prompt[prompt_id]]
            if options:
                name = min(options, key=lambda name: (rows[name] / quota[name], self.teacher_rank(name)))
                rows[name] += len(self.best[prompt_id, name])
                chosen.append((prompt_id, name))
        return chosen


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
                 with_logprobs: bool = False, with_teacher_name: bool = False) -> dict:
    """One train.jsonl line. `with_logprobs` (generate.logprobs is set): the link to the sample's recorded top-K
    (logprob_store.py), with an absolute path so training may run from any folder, and its raw text.
    `with_teacher_name` (several teachers): the `teachers:` entry that wrote it; one-teacher rows (and their
    dataset's features) stay as they were."""
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
    if with_teacher_name:
        row["teacher_name"] = sample.teacher_name
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
