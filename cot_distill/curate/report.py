"""What the curate stage writes besides the filtering: per-filter tallies, report.json, the console table, the
dataset card (README.md), the length histogram and the Arrow dataset. No filtering logic lives here."""

from __future__ import annotations

import hashlib
import time
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from cot_distill.grading import fast_verdict
from cot_distill.records import iter_jsonl, write_json_atomic


@dataclass
class FilterTally:
    """How many samples entered and left one filter, and why the others were dropped."""

    name: str
    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def record(self, reasons: list[str | None], started: float) -> None:
        self.seen += len(reasons)
        self.kept += reasons.count(None)
        self.dropped.update(reason for reason in reasons if reason is not None)
        self.seconds += time.perf_counter() - started

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "in": self.seen, "out": self.kept,
                "dropped": dict(sorted(self.dropped.items(), key=lambda item: (-item[1], item[0])))}


@dataclass
class RunRecord:
    """Everything the stage counted while streaming; turned into report.json by build_report."""

    tallies: list[FilterTally]
    source_in: Counter = field(default_factory=Counter)
    source_out: Counter = field(default_factory=Counter)
    routes_graded: Counter = field(default_factory=Counter)
    routes_kept: Counter = field(default_factory=Counter)
    grade_reasons: Counter = field(default_factory=Counter)
    grader_stats: dict[str, int] = field(default_factory=dict)
    contaminated_prompts: Counter = field(default_factory=Counter)
    benchmark_sizes: dict[str, int] = field(default_factory=dict)
    input_tokens: array = field(default_factory=lambda: array("q"))  # usage.completion_tokens of every sample
    output_tokens: array = field(default_factory=lambda: array("q"))  # tokens of every written row
    output_prompts: set = field(default_factory=set)
    input_prompts: set = field(default_factory=set)  # prompts with at least one current sample
    lines_read: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # stream, select, dataset
    feature_wait_s: float = 0.0  # the main process waiting for the feature workers
    # Several teachers (the names of `teachers:`, in order; empty for one teacher): by_teacher and
    # teacher_agreement. Counted by sample.teacher_name: admitted samples, graded correct, kept rows and their tokens.
    teachers: list[str] = field(default_factory=list)
    teacher_samples: Counter = field(default_factory=Counter)
    teacher_verified: Counter = field(default_factory=Counter)
    teacher_kept: Counter = field(default_factory=Counter)
    teacher_kept_tokens: Counter = field(default_factory=Counter)
    # (prompt id, teacher name) -> {extracted answer, whitespace removed: samples}: a few hundred bytes per pair
    teacher_answers: defaultdict = field(default_factory=lambda: defaultdict(Counter))

    def note_verdict(self, prompt_id: str, teacher_name: str | None, correct: bool | None, extracted: str | None):
        """A graded sample, for by_teacher and teacher_agreement (several teachers only)."""
        if self.teachers:
            self.teacher_verified[teacher_name] += correct is True
            if extracted is not None:
                self.teacher_answers[prompt_id, teacher_name]["".join(extracted.split())] += 1


def _token_summary(tokens: array) -> dict[str, Any]:
    if not tokens:
        return {"total": 0, "mean": 0, "p50": 0, "p90": 0, "max": 0}
    values = np.frombuffer(tokens, dtype=np.int64)
    return {"total": int(values.sum()), "mean": round(float(values.mean()), 1),
            "p50": int(np.percentile(values, 50)), "p90": int(np.percentile(values, 90)), "max": int(values.max())}


def same_answer(first: str, second: str) -> bool:
    """Two extracted answers agree: equal strings (whitespace removed), or plain numbers of equal value as the
    grader's fast path compares them (1,234 = 1234, 1/2 = \\frac{1}{2} = 0.5). Not math-verify: that would cost a
    worker call per pair, and teacher_agreement is a diagnostic, not a verdict."""
    return first == second or fast_verdict(first, second) is True or fast_verdict(second, first) is True


def by_teacher(run: RunRecord) -> dict[str, dict[str, Any]]:
    """Per teacher: admitted samples, verified (graded correct), kept rows, mean completion tokens of a kept row.
    Samples of unlisted teachers (only_current_samples: false) are reported under their name too."""
    names = run.teachers + sorted((name for name in run.teacher_samples if name not in run.teachers), key=str)
    return {str(name): {"samples": run.teacher_samples[name], "verified": run.teacher_verified[name],
                        "kept": run.teacher_kept[name],
                        "tokens_per_kept": round(run.teacher_kept_tokens[name] / run.teacher_kept[name], 1)
                        if run.teacher_kept[name] else None}
            for name in names}


def teacher_agreement(run: RunRecord) -> dict[str, Any]:
    """How often the teachers give the same final answer. Per prompt, each teacher's answer is its majority
    extracted answer (over its samples the correctness filter graded: complete, no loop, within the length limit;
    ties: the smallest string); prompts where at least two teachers have one are compared. all_agree: the share of
    those prompts where every pair of them agrees (same_answer); pairwise["a|b"]: the share of agreeing prompts
    among those where both a and b have an answer (null where none has)."""
    majority: dict[str, dict[str, str]] = defaultdict(dict)  # prompt id -> teacher -> its answer
    for (prompt_id, name), answers in run.teacher_answers.items():
        if name in run.teachers:
            majority[prompt_id][name] = min(answers, key=lambda answer: (-answers[answer], answer))
    pairs = list(combinations(run.teachers, 2))
    compared, all_agree, both, agree = 0, 0, Counter(), Counter()
    for answers in majority.values():
        if len(answers) < 2:
            continue
        verdicts = {(a, b): same_answer(answers[a], answers[b]) for a, b in pairs if a in answers and b in answers}
        compared, all_agree = compared + 1, all_agree + all(verdicts.values())
        both.update(verdicts.keys())
        agree.update(pair for pair, same in verdicts.items() if same)
    return {"prompts_compared": compared, "all_agree": round(all_agree / compared, 4) if compared else None,
            "pairwise": {f"{a}|{b}": round(agree[a, b] / both[a, b], 4) if both[a, b] else None for a, b in pairs}}


def build_report(run: RunRecord, *, config: dict[str, Any], inputs: dict[str, Any], seconds: float) -> dict:
    """report.json: deterministic for the same input and config, except the `timing` section."""
    routes = sorted(set(run.routes_graded) | set(run.routes_kept))
    sources = sorted(run.source_in)
    return {
        "input": {**inputs, "lines": run.lines_read},
        "filters": [tally.as_dict() for tally in run.tallies],
        "output": {"rows": len(run.output_tokens), "prompts": len(run.output_prompts),
                   "tokens": _token_summary(run.output_tokens)},
        "input_tokens": _token_summary(run.input_tokens),
        "grading": {
            "routes": {route: {"graded": run.routes_graded[route], "correct": run.routes_kept[route]}
                       for route in routes},
            "reasons": dict(sorted(run.grade_reasons.items())),
            **run.grader_stats,
        },
        "sources": {source: {"in": run.source_in[source], "out": run.source_out[source],
                             "acceptance": round(run.source_out[source] / max(run.source_in[source], 1), 4)}
                    for source in sources},
        "decontamination": {"benchmarks": run.benchmark_sizes,
                            "contaminated_prompts": dict(sorted(run.contaminated_prompts.items()))},
        **({"by_teacher": by_teacher(run), "teacher_agreement": teacher_agreement(run)} if run.teachers else {}),
        "config": config,
        # by_filter_s is main-process time: the loop check, digests, MinHash and decontamination run in feature
        # workers ahead of it, and feature_wait_s is how long it waited for them
        "timing": {"seconds": round(seconds, 2), "samples_per_s": round(run.lines_read / max(seconds, 1e-9), 1),
                   "by_filter_s": {tally.name: round(tally.seconds, 2) for tally in run.tallies},
                   "feature_wait_s": round(run.feature_wait_s, 2),
                   **{f"{stage}_s": round(value, 2) for stage, value in run.stage_seconds.items()}},
    }


# ------------------------------------------------------------------------------------------------ the table

def _reasons_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count:,}" for reason, count in dropped.items()) or "-"


def format_table(report: dict[str, Any]) -> str:
    """The report as the plain-text tables printed at the end of a run."""
    lines = [f"{'filter':<14}{'in':>11}{'out':>11}  dropped (reason count)"]
    for row in report["filters"]:
        lines.append(f"{row['name']:<14}{row['in']:>11,}{row['out']:>11,}  {_reasons_text(row['dropped'])}")
    grading = report["grading"]
    if grading["routes"]:
        lines += ["", f"{'answer route':<14}{'graded':>11}{'correct':>11}"]
        for route, counts in grading["routes"].items():
            lines.append(f"{route:<14}{counts['graded']:>11,}{counts['correct']:>11,}")
        lines.append(f"verdicts: {_reasons_text(grading['reasons'])}; fast path {grading.get('fast_path', 0):,}, "
                     f"memo {grading.get('memo_hits', 0):,}, math-verify {grading.get('math_verify', 0):,}")
    lines += ["", f"{'source':<24}{'in':>11}{'out':>11}{'accepted':>10}"]
    for source, counts in report["sources"].items():
        lines.append(f"{source[:23]:<24}{counts['in']:>11,}{counts['out']:>11,}{counts['acceptance']:>10.1%}")
    contaminated = report["decontamination"]["contaminated_prompts"]
    if contaminated:
        lines.append(f"contaminated prompts: {_reasons_text(contaminated)}")
    if "by_teacher" in report:
        lines += ["", f"{'teacher':<24}{'samples':>11}{'verified':>11}{'kept':>11}{'tokens/kept':>13}"]
        for name, counts in report["by_teacher"].items():
            mean = "-" if counts["tokens_per_kept"] is None else f"{counts['tokens_per_kept']:,}"
            lines.append(f"{name[:23]:<24}{counts['samples']:>11,}{counts['verified']:>11,}{counts['kept']:>11,}"
                         f"{mean:>13}")
        agreement = report["teacher_agreement"]
        if agreement["prompts_compared"]:
            pairwise = ", ".join(f"{pair} {share:.1%}" for pair, share in agreement["pairwise"].items()
                                 if share is not None)
            lines.append(f"answers agree on {agreement['all_agree']:.1%} of {agreement['prompts_compared']:,} "
                         f"prompts with two or more teachers' answers ({pairwise})")
    output, timing = report["output"], report["timing"]
    if report["input"].get("prompts_without_sample"):
        lines.append(f"{report['input']['prompts_without_sample']:,} of {report['input']['prompts']:,} prompts have "
                     f"no sample (generate rejected {report['input'].get('generate_failed_permanently', 0):,} "
                     f"requests for good)")
    lines.append(f"\n{output['rows']:,} rows from {output['prompts']:,} prompts, mean {output['tokens']['mean']:,} "
                 f"tokens; {report['input']['lines']:,} samples in {timing['seconds']:,} s "
                 f"({timing['samples_per_s']:,} samples/s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- card, histogram

def write_dataset_card(path: Path, report: dict[str, Any], *, name: str, teacher: str, prompts: str,
                       template: str, histogram_note: str) -> None:
    filters = "\n".join(f"| {row['name']} | {row['in']:,} | {row['out']:,} | {_reasons_text(row['dropped'])} |"
                        for row in report["filters"])
    sources = "\n".join(f"| {source} | {counts['in']:,} | {counts['out']:,} | {counts['acceptance']:.1%} |"
                        for source, counts in report["sources"].items())
    output = report["output"]
    config = report["config"]
    benchmarks = ", ".join(report["decontamination"]["benchmarks"]) or "none"
    teachers = "".join(f"\n  - `{name}`: {counts['kept']:,} rows of {counts['samples']:,} samples"
                       for name, counts in report.get("by_teacher", {}).items())
    text = f"""---
tags: [reasoning, chain-of-thought, distillation, cot-distill]
---

# {name}: curated chain-of-thought traces

{output['rows']:,} conversations for {output['prompts']:,} prompts, written by `cot-distill curate`.

## Sources

- teacher: `{teacher}`{teachers}
- prompts: `{prompts}` (prompt template `{template}`)
- decontaminated against: {benchmarks} (word {config['decontaminate']['ngram']}-grams of the prompt problem)

## Format

`messages`: the rendered prompt (user, and system when the template has one) and the teacher's reply as the
assistant turn (reasoning format `{config['reasoning_format']}`). Columns `reasoning`, `answer_text`, `prompt_id`,
`source`, `teacher`, {"`teacher_name`, " if teachers else ""}`grade` (extracted answer and extraction route), `tokens`, `sample_idx`.
The same rows are in `train.jsonl`; `report.json` has every count below.

## Filters (in order)

| filter | in | out | dropped |
|---|---|---|---|
{filters}

## Acceptance per source

| source | samples in | rows out | accepted |
|---|---|---|---|
{sources}

## Length

Completion tokens: mean {output['tokens']['mean']:,}, median {output['tokens']['p50']:,},
p90 {output['tokens']['p90']:,}, max {output['tokens']['max']:,}. {histogram_note}
"""
    path.write_text(text, encoding="utf-8")


def write_length_histogram(path: Path, input_tokens: array, output_tokens: array, bins: int) -> str:
    """A PNG of token lengths (all samples vs curated rows); returns a sentence for the card."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training boxes
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no histogram: matplotlib is not installed)"
    before = np.frombuffer(input_tokens, dtype=np.int64) if input_tokens else np.zeros(0, dtype=np.int64)
    after = np.frombuffer(output_tokens, dtype=np.int64) if output_tokens else np.zeros(0, dtype=np.int64)
    # a few runaway samples would squash the plot: everything past this lands in the last bin
    upper = int(max(after.max(initial=1), np.percentile(before, 99) if len(before) else 1))
    edges = np.linspace(0, upper, bins + 1)
    before, after = np.minimum(before, upper), np.minimum(after, upper)
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    axes.hist(before, bins=edges, alpha=0.5, label=f"all samples ({len(before):,})")
    axes.hist(after, bins=edges, alpha=0.7, label=f"curated ({len(after):,})")
    axes.set_xlabel(f"completion tokens (the last bin holds everything from {edges[-2]:,.0f})")
    axes.set_ylabel("samples")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})  # no version/date stamp: reruns give the same bytes
    plt.close(figure)
    return f"Histogram: `{path.name}`."


# ------------------------------------------------------------------------------------------ the HF dataset

SHARD_CHARACTERS = 500_000_000  # ~500 MB of Arrow: save_to_disk's default shard size


def dataset_features(reasoning_format: str, recorded_logprobs: bool = False, teacher_names: bool = False):
    """`teacher_names` (several teachers): the rows' teacher_name column; one-teacher datasets keep their features."""
    import datasets

    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    if reasoning_format == "reasoning_content":
        message["reasoning_content"] = datasets.Value("string")
    link = {"teacher_logprobs": {"file": datasets.Value("string"), "offset": datasets.Value("int64"),
                                 "bytes": datasets.Value("int64"), "tokens": datasets.Value("int64"),
                                 "k": datasets.Value("int64"), "request_key": datasets.Value("string")}}
    return datasets.Features({
        **(link if recorded_logprobs else {}),
        "messages": datasets.List(message), "reasoning": datasets.Value("string"),
        "answer_text": datasets.Value("string"), "prompt_id": datasets.Value("string"),
        "source": datasets.Value("string"), "teacher": datasets.Value("string"),
        **({"teacher_name": datasets.Value("string")} if teacher_names else {}),
        "grade": {"extracted": datasets.Value("string"), "route": datasets.Value("string")},
        "tokens": datasets.Value("int64"), "sample_idx": datasets.Value("int64"),
    })


def row_characters(row: dict) -> int:
    text = [row["reasoning"], row["answer_text"], *(m.get(key) for m in row["messages"] for key in m)]
    return sum(len(value) for value in text if value)


def save_dataset(train: Path, target: Path, reasoning_format: str, recorded_logprobs: bool = False,
                 teacher_names: bool = False) -> list[str]:
    """train.jsonl -> a datasets.load_from_disk folder, written shard by shard with datasets' own ArrowWriter.

    Dataset.save_to_disk would read back a memory-mapped Arrow copy of the whole set, and those pages count as
    resident memory (GBs at a million rows); writing the shards directly keeps memory at one writer batch. The
    folder is what save_to_disk writes: data-XXXXX-of-YYYYY.arrow, dataset_info.json and state.json.

    Measured against Dataset.from_generator(cache_dir=<temp dir>) + save_to_disk (datasets 5.2, issue 14): on
    benchmarks/curate_throughput.py --n 200000 (111,571 rows, 1.2 GB of Arrow) the curate process peaked at
    1.57 GB RSS against 0.40 GB, and save_dataset alone at 1.40 GB against 0.23 GB (1.16 GB of it the mapped
    cache file), in twice the wall time (28 s against 14 s: the rows are written twice). from_generator also
    refuses a generator with no rows, and save_to_disk writes no data file for an empty dataset, which
    load_from_disk then fails on."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    features = dataset_features(reasoning_format, recorded_logprobs, teacher_names)
    target.mkdir(parents=True)
    shards: list[Path] = []
    writer, shard_characters, fingerprint = None, 0, hashlib.blake2b(digest_size=8)
    for _, row in iter_jsonl(train, tolerate_torn_tail=False):
        if writer is None or shard_characters >= SHARD_CHARACTERS:
            if writer is not None:
                writer.finalize()
                writer.close()
            shards.append(target / f".shard-{len(shards)}.arrow")
            writer, shard_characters = ArrowWriter(features=features, path=str(shards[-1])), 0
        writer.write(row)
        shard_characters += row_characters(row)
        fingerprint.update(f"{row['prompt_id']}\0{row['sample_idx']}\0".encode())
    if writer is None:  # no rows: one empty shard, as save_to_disk writes
        shards.append(target / ".shard-0.arrow")
        writer = ArrowWriter(features=features, path=str(shards[-1]))
    writer.finalize()
    writer.close()
    names = [f"data-{index:05d}-of-{len(shards):05d}.arrow" for index in range(len(shards))]
    for shard, name in zip(shards, names):
        shard.rename(target / name)
    datasets.DatasetInfo(features=features).write_to_directory(str(target))
    write_json_atomic(target / "state.json", {
        "_data_files": [{"filename": name} for name in names], "_fingerprint": fingerprint.hexdigest(),
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": "train"})
    return [f"{target.name}/{name}" for name in [*names, "dataset_info.json", "state.json"]]
