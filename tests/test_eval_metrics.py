"""Eval metrics on hand-made outputs with known answers: pass@k, maj@K, truncation, breakdowns, grading rules."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from cot_distill.config.eval import EvalError
from cot_distill.evaluate import (
    benchmark_metrics,
    grade_benchmark,
    ks_up_to,
    majority_correct,
    pass_at_k,
    percentile,
    vote_key,
)
from cot_distill.evaluate.eval_sets import Benchmark
from cot_distill.records import Prompt, Sample, Usage


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The share of all k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(index < c for index in subset) for subset in subsets), len(subsets))


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_are_huge():
    # C(1024, 512) has over 300 digits: a float formula overflows, the product form must not.
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5, abs=1e-12)
    exact = 1 - Fraction(math.comb(900, 300), math.comb(1000, 300))
    assert pass_at_k(1000, 100, 300) == pytest.approx(float(exact), rel=1e-9)
    assert pass_at_k(64, 0, 64) == 0.0 and pass_at_k(64, 64, 1) == 1.0


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_ks_are_powers_of_two_up_to_k_and_k_itself():
    assert ks_up_to(1) == [1] and ks_up_to(4) == [1, 2, 4] and ks_up_to(6) == [1, 2, 4, 6]
    assert ks_up_to(64) == [1, 2, 4, 8, 16, 32, 64]


def row(problem, idx, extracted, correct, truncated=False, tokens=10, latency=1.0, **groups):
    return {"prompt_id": problem, "sample_idx": idx, "extracted": extracted, "correct": correct, "reason": "match",
            "truncated": truncated, "completion_tokens": tokens, "latency_s": latency, "route": "boxed",
            "groups": groups}


def test_majority_vote_counts_answers_and_breaks_ties_by_first_appearance():
    assert majority_correct([row("p", 0, "7", False), row("p", 1, "5", True), row("p", 2, "5", True)])
    assert not majority_correct([row("p", 0, "7", False), row("p", 1, "5", True)])  # tie: 7 came first
    assert majority_correct([row("p", 0, "5", True), row("p", 1, "7", False)])


def test_a_missing_answer_never_wins_the_vote():
    assert not majority_correct([row("p", 0, None, None), row("p", 1, None, None), row("p", 2, "7", False)])
    assert majority_correct([row("p", 0, None, None), row("p", 1, None, None), row("p", 2, "5", True)])
    assert not majority_correct([row("p", 0, None, None)])


def test_equivalent_spellings_vote_together():
    assert vote_key("\\dfrac{1}{2}") == vote_key("\\frac { 1 } { 2 }") == vote_key("\\left(\\frac{1}{2}\\right)")[1:-1]
    samples = [row("p", 0, "3", False), row("p", 1, "\\dfrac{1}{2}", True), row("p", 2, "\\frac{1}{2}", True)]
    assert majority_correct(samples)


def test_metrics_of_known_outputs():
    rows = [row("easy", i, "5", True, tokens=100, subject="Algebra", level=1) for i in range(4)]
    rows += [row("hard", 0, "9", True, tokens=300, latency=3.0, subject="Geometry", level=5),
             row("hard", 1, "8", False, tokens=300, latency=3.0, subject="Geometry", level=5),
             row("hard", 2, "8", False, tokens=300, latency=3.0, subject="Geometry", level=5),
             row("hard", 3, None, None, truncated=True, tokens=500, latency=5.0, subject="Geometry", level=5)]
    metrics = benchmark_metrics(rows, 4, ("subject", "level"))
    assert metrics["problems"] == 2 and metrics["samples"] == 8 and metrics["samples_per_problem"] == 4
    assert metrics["pass_at_1"] == pytest.approx((1 + 0.25) / 2)
    # hard: 1 of 4 correct -> pass@2 = 1 - C(3,2)/C(4,2) = 0.5
    assert metrics["pass_at_k"] == {"1": 0.625, "2": 0.75, "4": 1.0}
    assert metrics["maj_at_k"] == 0.5  # easy wins its vote, hard's majority answer 8 is wrong
    assert metrics["truncation_rate"] == 0.125 and metrics["no_answer_rate"] == 0.125
    assert metrics["mean_completion_tokens"] == pytest.approx((400 + 900 + 500) / 8)
    assert metrics["latency_s"] == {"p50": 2.0, "p95": pytest.approx(4.3)}
    assert metrics["by_subject"] == {"Algebra": {"problems": 1, "pass_at_1": 1.0},
                                     "Geometry": {"problems": 1, "pass_at_1": 0.25}}
    assert metrics["by_level"] == {"1": {"problems": 1, "pass_at_1": 1.0}, "5": {"problems": 1, "pass_at_1": 0.25}}


def test_fewer_samples_than_asked_is_an_error_not_a_metric():
    rows = [row("p", 0, "5", True), row("p", 1, "5", True), row("q", 0, "5", True)]
    with pytest.raises(EvalError, match=r"'q' has samples \[0\], expected 0..1"):
        benchmark_metrics(rows, 2)
    with pytest.raises(EvalError, match="expected 0..1"):
        benchmark_metrics([row("p", 0, "5", True), row("p", 0, "5", True)], 2)  # a duplicate is no second sample


def test_percentile_interpolates_like_numpy():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 95) == 5.0
    assert percentile(list(range(101)), 95) == 95 and percentile([], 50) is None


def sample(prompt_id, idx, text, finish="stop", tokens=12):
    return Sample(prompt_id=prompt_id, sample_idx=idx, request_key=f"{prompt_id}-{idx}", teacher="t", params={},
                  template_hash="h", reasoning=None, content=text, text=text, reasoning_closed=True,
                  finish_reason=finish, usage=Usage(completion_tokens=tokens), latency_s=0.5, attempts=1,
                  created_at="2026-12-02T00:00:00+00:00")


def test_reasoning_is_stripped_only_when_closed_and_unclosed_counts_truncated_and_wrong():
    from cot_distill.grading import Grader

    benchmark = Benchmark("toy", [Prompt(id="a", problem="2+3?", answer="5", meta={"level": 1}),
                                  Prompt(id="b", problem="x?", answer="\\frac{1}{2}", meta={"level": 2})],
                          "hand-made", ("level",))
    samples = [
        sample("a", 0, "<think>maybe \\boxed{7}</think>So the answer is \\boxed{5}."),  # reasoning's 7 is ignored
        sample("a", 1, "<think>it is \\boxed{5} surely", finish="length"),  # unclosed: no answer at all
        sample("b", 0, "Thinking... 0.5 hmm</think>\\boxed{\\dfrac{1}{2}}"),  # R1 template opened the block
        sample("b", 1, "\\boxed{2}", finish="length"),  # cut off after answering: graded, but counted truncated
    ]
    with Grader(workers=1) as grader:
        rows = {(r["prompt_id"], r["sample_idx"]): r for r in grade_benchmark(benchmark, samples, grader)}
    assert rows["a", 0]["correct"] is True and rows["a", 0]["extracted"] == "5" and not rows["a", 0]["truncated"]
    assert rows["a", 1]["correct"] is False and rows["a", 1]["extracted"] is None and rows["a", 1]["truncated"]
    assert rows["a", 1]["reason"] == "unclosed_reasoning"
    assert rows["b", 0]["correct"] is True and rows["b", 0]["route"] == "boxed"
    assert rows["b", 1]["correct"] is False and rows["b", 1]["truncated"]
    assert rows["b", 0]["groups"] == {"level": 2}
