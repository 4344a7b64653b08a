import json

import pytest

from cot_distill.decontam import Decontaminator, default_benchmarks, normalize_words

TEMPLATE = (
    "Solve the following math problem step by step. Put the final answer in \\boxed{{}}.\n\n"
    "{problem}\n\nThink carefully."
)
FRESH_PROBLEMS = [
    "Priya buys 7 notebooks at $3 each and 4 pens at $2 each. She pays with a $50 bill. How much change does she get?",
    "A train travels 240 miles in 4 hours. If it keeps the same speed, how far will it travel in 7 hours?",
    "Tom has 12 marbles. He gives 5 to his sister and then buys 9 more. How many marbles does Tom have now?",
]


@pytest.fixture(scope="module")
def benchmarks() -> dict[str, list[str]]:
    return default_benchmarks()


@pytest.fixture(scope="module")
def decontaminator() -> Decontaminator:
    return Decontaminator.with_default_benchmarks()


def test_default_benchmark_counts(benchmarks, decontaminator):
    expected = {"gsm8k": 1319, "math500": 500, "aime24": 30}
    assert {name: len(problems) for name, problems in benchmarks.items()} == expected
    assert decontaminator.problem_counts == expected
    assert decontaminator.benchmarks == ["gsm8k", "math500", "aime24"]


def test_normalization_drops_case_punctuation_and_latex_delimiters():
    assert normalize_words("Janet’s  ducks\nlay 16 EGGS!") == ["janet", "s", "ducks", "lay", "16", "eggs"]
    assert normalize_words(r"Find $\dfrac{1}{2}$, i.e. \(\frac{1}{2}\) or \[ \left( x \right) \]") == normalize_words(
        "find frac 1 2 i e frac 1 2 or x"
    )
    assert normalize_words("snake_case $$x$$") == ["snake", "case", "x"]
    assert normalize_words(r"\dbinom{3}{1} \leftarrow") == ["binom", "3", "1", "leftarrow"]


def test_gsm8k_question_and_reformatted_copy_are_flagged(benchmarks, decontaminator):
    question = benchmarks["gsm8k"][5]
    assert decontaminator.check(question) == "gsm8k"
    reformatted = "  " + question.upper().replace(" ", "\n  ").replace(",", " ;").replace("$", "USD ") + "??"
    assert reformatted != question
    assert decontaminator.check(reformatted) == "gsm8k"


def test_fresh_arithmetic_problems_are_clean(decontaminator):
    assert decontaminator.check_batch(FRESH_PROBLEMS) == [None, None, None]
    assert decontaminator.check(TEMPLATE.format(problem=FRESH_PROBLEMS[0])) is None
    assert decontaminator.check("") is None


def test_math500_problem_inside_a_longer_prompt_is_flagged(benchmarks, decontaminator):
    problem = benchmarks["math500"][10]
    assert decontaminator.check(TEMPLATE.format(problem=problem)) == "math500"
    # only a window of 8 consecutive words survives, the rest is rewritten
    words = problem.split()
    assert len(words) >= 12
    partial = "Here is a question. " + " ".join(words[2:10]) + " and nothing else matters here at all."
    assert decontaminator.check(partial) == "math500"


def test_short_benchmark_problem_is_found_inside_a_template(decontaminator):
    assert len(normalize_words("Compute $\\dbinom{31}{28}$.")) < 8
    assert decontaminator.check(TEMPLATE.format(problem="Compute $\\dbinom{31}{28}$.")) == "math500"
    assert decontaminator.check("compute   \\(\\dbinom{31}{28}\\)") == "math500"
    assert decontaminator.check(TEMPLATE.format(problem="Compute $\\dbinom{31}{27}$.")) is None


def test_aime24_problem_is_flagged(benchmarks, decontaminator):
    assert decontaminator.check(TEMPLATE.format(problem=benchmarks["aime24"][0])) == "aime24"


def test_min_coverage_ignores_shared_boilerplate_but_not_pasted_problems(benchmarks):
    boilerplate = "The answer can be written as m/n, where m and n are relatively prime positive integers. Find m+n."
    strict = Decontaminator.with_default_benchmarks()
    lenient = Decontaminator.with_default_benchmarks(min_coverage=0.5)
    assert strict.check(boilerplate) in {"math500", "aime24"}  # both use this phrasing
    assert lenient.check(boilerplate) is None
    for name, problems in benchmarks.items():
        assert lenient.check(TEMPLATE.format(problem=problems[-1])) == name


def test_add_jsonl_and_first_added_benchmark_wins(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"q": "A farmer has seventeen sheep and all but nine run away; how many are left?"}, {"q": "Tiny one."}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    decontaminator = Decontaminator(ngram=8)
    assert decontaminator.add_jsonl("riddles", path, "q") == 2
    assert decontaminator.add_benchmark("copy", [rows[0]["q"]]) == 1
    assert decontaminator.check("Q: a farmer has SEVENTEEN sheep, and all but nine run away. How many?") == "riddles"
    assert decontaminator.check("tiny one") == "riddles"  # shorter than 8 words: compared as one whole gram
    assert decontaminator.check("a tiny onerous task") is None
    assert decontaminator.problem_counts == {"riddles": 2, "copy": 1}


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        Decontaminator(ngram=0)
    with pytest.raises(ValueError):
        Decontaminator(min_coverage=1.5)
