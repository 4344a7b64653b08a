"""Eval metrics from graded rows (one per sample): unbiased pass@k, maj@K, percentiles, breakdowns by group.

Pure functions of the rows, no I/O: tests/test_eval_metrics.py checks them against brute force.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from typing import Any

from cot_distill.config.eval import EvalError

GRADED_FILE = "graded.jsonl"  # an eval's verdicts, one line per sample, in each benchmark's folder (run writes, compare reads)


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
        grouped[row["prompt_id"]].append(row)
    for prompt_id, problem_rows in grouped.items():
        problem_rows.sort(key=lambda row: row["sample_idx"])
        indices = [row["sample_idx"] for row in problem_rows]
        if indices != list(range(samples)):
            raise EvalError(f"problem {prompt_id!r} has samples {indices}, expected 0..{samples - 1}")
    return dict(grouped)


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def problem_score(problem_rows: list[dict[str, Any]]) -> float:
    """One problem's pass@1: the share of its K samples graded correct (ungradable counts as wrong)."""
    return sum(row["correct"] is True for row in problem_rows) / len(problem_rows)


def accuracy_by_group(grouped: dict[str, list[dict[str, Any]]], field: str) -> dict[str, dict[str, Any]]:
    per_value: dict[str, list[float]] = defaultdict(list)
    for problem_rows in grouped.values():
        value = str(problem_rows[0]["groups"].get(field))
        per_value[value].append(problem_score(problem_rows))
    return {value: {"problems": len(scores), "pass_at_1": round(statistics.fmean(scores), 4)}
            for value, scores in sorted(per_value.items())}


def benchmark_metrics(rows: list[dict[str, Any]], samples: int, group_by: tuple[str, ...] = ()) -> dict[str, Any]:
    """Metrics of one benchmark from its graded rows (one per sample). Incorrect and ungradable both count as wrong."""
    grouped = samples_by_problem(rows, samples)
    correct_counts = [sum(row["correct"] is True for row in problem_rows) for problem_rows in grouped.values()]
    per_problem_accuracy = [problem_score(problem_rows) for problem_rows in grouped.values()]
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
